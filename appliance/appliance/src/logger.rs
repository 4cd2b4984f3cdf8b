//! Logging behind the `log` facade: to the journal (with structured fields such as
//! REQUEST_ID, TENANT, KEY_ID, MODEL from the records' key-values) when stderr is
//! connected to journald (`JOURNAL_STREAM`), else a small stderr logger. Level from
//! `APPLIANCE_LOG` (error, warn, info, debug; default info).

use log::{Level, LevelFilter, Log, Metadata, Record};

struct Stderr {
    level: Level,
}

impl Log for Stderr {
    fn enabled(&self, m: &Metadata<'_>) -> bool {
        m.level() <= self.level
    }
    fn log(&self, r: &Record<'_>) {
        if self.enabled(r.metadata()) {
            // One write per line (stderr is unbuffered: formatting straight into it would
            // cost a system call per fragment, and lines from threads could interleave).
            use std::io::Write;
            let line = format!("[{} {}] {}\n", r.level(), r.target(), r.args());
            let _ = std::io::stderr().lock().write_all(line.as_bytes());
        }
    }
    fn flush(&self) {}
}

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
    if log::set_boxed_logger(Box::new(Stderr { level })).is_ok() {
        log::set_max_level(filter);
    }
}
