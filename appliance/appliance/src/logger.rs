//! Logging behind the `log` facade: to the journal (with structured fields such as
//! REQUEST_ID, TENANT, KEY_ID, MODEL from the records' key-values) when stderr is
//! connected to journald (`JOURNAL_STREAM`), else a small stderr logger. Level from
//! `APPLIANCE_LOG` (error, warn, info, debug; default info).

use std::io::Write;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use log::{Level, LevelFilter, Log, Metadata, Record};

/// Access lines (one per request) wait at most this long, or until this many bytes are
/// waiting, to be written together; any other line writes them first, then itself.
const ACCESS_EVERY: Duration = Duration::from_millis(100);
const ACCESS_BYTES: usize = 64 << 10;

struct Stderr {
    level: Level,
    waiting: Mutex<Lines>,
}

/// Lines not yet written, in order.
#[derive(Default)]
struct Lines(Vec<u8>);

impl Lines {
    /// Adds `line`; writes everything waiting to `out` unless the line may wait (an
    /// access line, with room left). One write per call that writes.
    fn push(&mut self, line: &str, may_wait: bool, out: &mut impl Write) {
        self.0.extend_from_slice(line.as_bytes());
        if !(may_wait && self.0.len() < ACCESS_BYTES) {
            self.write(out);
        }
    }

    fn write(&mut self, out: &mut impl Write) {
        if !self.0.is_empty() {
            let _ = out.write_all(&self.0);
            self.0.clear();
        }
    }
}

impl Log for Stderr {
    fn enabled(&self, m: &Metadata<'_>) -> bool {
        m.level() <= self.level
    }
    fn log(&self, r: &Record<'_>) {
        if self.enabled(r.metadata()) {
            // Whole lines, written together (stderr is unbuffered: formatting straight
            // into it would cost a system call per fragment, and lines from threads
            // could interleave); a request's access line is not worth one of its own.
            let line = format!("[{} {}] {}\n", r.level(), r.target(), r.args());
            let may_wait = r.target() == "access" && r.level() >= Level::Info;
            let mut w = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
            w.push(&line, may_wait, &mut std::io::stderr().lock());
        }
    }
    fn flush(&self) {
        let mut w = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        w.write(&mut std::io::stderr().lock());
    }
}

static STDERR: OnceLock<Stderr> = OnceLock::new();

pub fn init() {
    let level = match std::env::var("APPLIANCE_LOG").as_deref() {
        Ok("error") => Level::Error,
        Ok("warn") => Level::Warn,
        Ok("debug") => Level::Debug,
        Ok("trace") => Level::Trace,
        _ => Level::Info,
    };
    let filter = match level {
        Level::Error => LevelFilter::Error,
        Level::Warn => LevelFilter::Warn,
        Level::Info => LevelFilter::Info,
        Level::Debug => LevelFilter::Debug,
        Level::Trace => LevelFilter::Trace,
    };
    if systemd_journal_logger::connected_to_journal() {
        if let Ok(journal) = systemd_journal_logger::JournalLog::new() {
            if journal.install().is_ok() {
                log::set_max_level(filter);
                return;
            }
        }
    }
    let logger = STDERR.get_or_init(|| Stderr {
        level,
        waiting: Mutex::new(Lines::default()),
    });
    if log::set_logger(logger).is_ok() {
        log::set_max_level(filter);
        // A panic's message comes after the lines made before it.
        let hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            log::logger().flush();
            hook(info)
        }));
        let _ = std::thread::Builder::new()
            .name("log-flush".into())
            .spawn(|| loop {
                std::thread::sleep(ACCESS_EVERY);
                log::logger().flush();
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_lines_wait_and_any_other_line_writes_them_first_in_order() {
        let (mut lines, mut out) = (Lines::default(), Vec::new());
        lines.push("a1\n", true, &mut out);
        lines.push("a2\n", true, &mut out);
        assert!(out.is_empty(), "access lines wait");
        lines.push("warn\n", false, &mut out);
        assert_eq!(out, b"a1\na2\nwarn\n");
        lines.push("a3\n", true, &mut out);
        lines.write(&mut out);
        assert_eq!(out, b"a1\na2\nwarn\na3\n", "a flush writes what waits");
        // Past the bound, an access line writes everything too.
        out.clear();
        let long = "x".repeat(ACCESS_BYTES);
        lines.push(&long, true, &mut out);
        assert_eq!(out.len(), ACCESS_BYTES);
        assert!(lines.0.is_empty());
    }
}
