//! The supervisor: one `appliance worker` process per configured model, watched.
//!
//! Each worker has a task that owns its child process and publishes a [`WorkerStatus`]
//! on a watch channel: spawn → wait until the worker answers `hello` on its socket
//! (Starting) → Ready → if it exits or stops answering health checks, back off
//! exponentially and spawn again (BackingOff) → on shutdown SIGTERM, a grace period,
//! then SIGKILL (Draining) → Stopped. Every child is waited for, so none is left a zombie;
//! children are killed if their task is dropped, and the worker itself asks the kernel to
//! end it if the supervisor dies (see the binary's worker start-up).
//!
//! This crate is the only one that spawns processes. It knows nothing of HTTP, tenants
//! or policy.

pub mod cgroup;
pub mod client;
pub mod inventory;
pub mod placement;

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use appliance_api::worker::WireModelInfo;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Environment variable through which a worker learns its supervisor's pid.
pub const PARENT_PID_ENV: &str = "APPLIANCE_SUPERVISOR_PID";

/// The exit status of a worker whose model file cannot be used (not GGUF, an
/// architecture or tensor type the engine does not run, missing metadata): starting it
/// again would fail the same way, so the supervisor stops restarting it (`EX_DATAERR`).
pub const EXIT_UNUSABLE_MODEL: i32 = 65;

/// Where a worker that exits with [`EXIT_UNUSABLE_MODEL`] leaves its one-line reason:
/// beside its socket, in the directory only the appliance's own processes can write.
pub fn error_file(socket: &std::path::Path) -> PathBuf {
    socket.with_extension("error")
}

/// How one worker is started.
#[derive(Debug, Clone)]
pub struct WorkerSpec {
    /// The model's public name (what API clients ask for).
    pub name: String,
    pub model: PathBuf,
    pub socket: PathBuf,
    /// The program to run (the appliance binary itself); `worker` is the first argument.
    pub program: PathBuf,
    /// Further arguments for `appliance worker` (threads, batch, context).
    pub extra_args: Vec<OsString>,
    /// Time between SIGTERM and SIGKILL at shutdown.
    pub grace: Duration,
    /// Time a starting worker gets to answer `hello`.
    pub ready_timeout: Duration,
    /// A cgroup v2 memory limit in bytes, applied where the host offers cgroups.
    pub memory_limit: Option<u64>,
}

/// Restart back-off: `base · 2^(n-1)` after the n-th consecutive failure, at most `max`;
/// the count resets once a worker has stayed up for `reset_after`. After
/// `crash_loop_after` failures in a row the worker is reported `failed` (a crash loop)
/// while restarts go on at the back-off's pace.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub base: Duration,
    pub max: Duration,
    pub reset_after: Duration,
    pub crash_loop_after: u32,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            base: Duration::from_secs(1),
            max: Duration::from_secs(300),
            reset_after: Duration::from_secs(120),
            crash_loop_after: 5,
        }
    }
}

/// Liveness: a ready worker is asked `health` every `interval`; after `misses` unanswered
/// (each within `timeout`) it is killed (SIGKILL: a hung or stopped process ignores
/// SIGTERM) and restarted. Detection takes at most `interval + misses · (interval +
/// timeout)`.
#[derive(Debug, Clone, Copy)]
pub struct Liveness {
    pub interval: Duration,
    pub timeout: Duration,
    pub misses: u32,
}

impl Default for Liveness {
    fn default() -> Self {
        Liveness {
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(2),
            misses: 2,
        }
    }
}

impl Liveness {
    /// The longest a hung worker goes unnoticed.
    pub fn bound(&self) -> Duration {
        self.interval + (self.interval + self.timeout) * self.misses
    }
}

impl Backoff {
    pub fn delay(&self, consecutive_failures: u32) -> Duration {
        let exp = consecutive_failures.saturating_sub(1).min(16);
        self.base.saturating_mul(1 << exp).min(self.max)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerState {
    Starting,
    Ready,
    BackingOff,
    /// A crash loop: many failures in a row; restarts continue at the back-off's pace.
    Failed,
    Draining,
    Stopped,
}

impl WorkerState {
    pub const ALL: [WorkerState; 6] = [
        WorkerState::Starting,
        WorkerState::Ready,
        WorkerState::BackingOff,
        WorkerState::Failed,
        WorkerState::Draining,
        WorkerState::Stopped,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            WorkerState::Starting => "starting",
            WorkerState::Ready => "ready",
            WorkerState::BackingOff => "backing_off",
            WorkerState::Failed => "failed",
            WorkerState::Draining => "draining",
            WorkerState::Stopped => "stopped",
        }
    }
}

#[derive(Debug, Clone)]
pub struct WorkerStatus {
    pub state: WorkerState,
    /// Restarts after an unexpected exit or failed start.
    pub restarts: u64,
    pub pid: Option<u32>,
    /// What the worker said about its model once ready.
    pub info: Option<WireModelInfo>,
    /// Why the last run ended, if it ended badly.
    pub last_error: Option<String>,
    /// Failures since the worker was last healthy for the back-off's reset period.
    pub consecutive_failures: u32,
    /// The state is `Failed` for good: the model file cannot be used, no restart is
    /// attempted until the model is unloaded and loaded again.
    pub gave_up: bool,
}

/// A supervised worker as the rest of the daemon sees it.
#[derive(Debug)]
pub struct Worker {
    pub name: String,
    pub socket: PathBuf,
    status: watch::Receiver<WorkerStatus>,
}

impl Worker {
    pub fn status(&self) -> WorkerStatus {
        self.status.borrow().clone()
    }

    pub fn is_ready(&self) -> bool {
        self.status.borrow().state == WorkerState::Ready
    }

    /// Failed for good (an unusable model file): waiting will not make it ready.
    pub fn gave_up(&self) -> bool {
        self.status.borrow().gave_up
    }

    /// Waits until the worker is ready, has failed for good (`false` at once), or
    /// `timeout` passes.
    pub async fn wait_ready(&self, timeout: Duration) -> bool {
        let mut rx = self.status.clone();
        let settled = rx.wait_for(|s| s.state == WorkerState::Ready || s.gave_up);
        let ready = match tokio::time::timeout(timeout, settled).await {
            Ok(Ok(s)) => s.state == WorkerState::Ready,
            _ => false,
        };
        ready
    }
}

struct Entry {
    worker: Arc<Worker>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

/// The set of supervised workers; workers are added and removed while it runs.
pub struct Supervisor {
    entries: std::sync::Mutex<Vec<Entry>>,
    backoff: Backoff,
    liveness: Liveness,
    cgroups: Option<cgroup::Cgroups>,
}

impl Supervisor {
    /// Starts one task per worker. Must be called inside a tokio runtime.
    pub fn start(specs: Vec<WorkerSpec>, backoff: Backoff, liveness: Liveness) -> Supervisor {
        let s = Supervisor {
            entries: std::sync::Mutex::new(Vec::new()),
            backoff,
            liveness,
            cgroups: None,
        };
        for spec in specs {
            // Names are unique in a fresh set.
            let _ = s.add(spec);
        }
        s
    }

    /// Workers started from now on get their memory limit through these cgroups.
    pub fn set_cgroups(&mut self, cgroups: Option<cgroup::Cgroups>) {
        self.cgroups = cgroups;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Entry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts supervising one more worker; refused if the name is taken.
    pub fn add(&self, spec: WorkerSpec) -> Result<Arc<Worker>, String> {
        let mut entries = self.lock();
        if entries.iter().any(|e| e.worker.name == spec.name) {
            return Err(format!("a worker for {} is already running", spec.name));
        }
        let (tx, rx) = watch::channel(WorkerStatus {
            state: WorkerState::Starting,
            restarts: 0,
            pid: None,
            info: None,
            last_error: None,
            consecutive_failures: 0,
            gave_up: false,
        });
        let worker = Arc::new(Worker {
            name: spec.name.clone(),
            socket: spec.socket.clone(),
            status: rx,
        });
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(run_worker(
            spec,
            tx,
            stop_rx,
            self.backoff,
            self.liveness,
            self.cgroups.clone(),
        ));
        entries.push(Entry {
            worker: worker.clone(),
            stop,
            task,
        });
        Ok(worker)
    }

    /// Stops one worker (SIGTERM, grace, SIGKILL) and waits for it; false if unknown.
    pub async fn remove(&self, name: &str) -> bool {
        let entry = {
            let mut entries = self.lock();
            match entries.iter().position(|e| e.worker.name == name) {
                Some(i) => entries.remove(i),
                None => return false,
            }
        };
        let _ = entry.stop.send(true);
        let _ = entry.task.await;
        true
    }

    pub fn workers(&self) -> Vec<Arc<Worker>> {
        self.lock().iter().map(|e| e.worker.clone()).collect()
    }

    /// Stops every worker (SIGTERM, grace, SIGKILL), all at once, and waits for them.
    pub async fn shutdown(&self) {
        let entries: Vec<Entry> = std::mem::take(&mut *self.lock());
        for e in &entries {
            let _ = e.stop.send(true);
        }
        for e in entries {
            let _ = e.task.await;
        }
    }
}

enum Event {
    Exited(std::io::Result<ExitStatus>),
    Stop,
    Tick,
}

async fn run_worker(
    spec: WorkerSpec,
    status: watch::Sender<WorkerStatus>,
    mut stop: watch::Receiver<bool>,
    backoff: Backoff,
    liveness: Liveness,
    cgroups: Option<cgroup::Cgroups>,
) {
    let mut failures = 0u32;
    loop {
        if *stop.borrow() {
            break;
        }
        status.send_modify(|s| {
            s.state = WorkerState::Starting;
            s.pid = None;
        });
        let error_file = error_file(&spec.socket);
        let _ = std::fs::remove_file(&error_file);
        let mut cmd = tokio::process::Command::new(&spec.program);
        cmd.arg("worker")
            .arg("--model")
            .arg(&spec.model)
            .arg("--socket")
            .arg(&spec.socket)
            .args(&spec.extra_args)
            .env(PARENT_PID_ENV, std::process::id().to_string())
            // systemd talks to the daemon only.
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .kill_on_drop(true);
        let failure = match cmd.spawn() {
            Err(e) => format!("cannot start {}: {e}", spec.program.display()),
            Ok(mut child) => {
                let pid = child.id();
                status.send_modify(|s| s.pid = pid);
                if let (Some(cg), Some(limit), Some(pid)) = (&cgroups, spec.memory_limit, pid) {
                    if let Err(e) = cg.limit(&spec.name, pid, limit) {
                        log::warn!("worker {}: no memory limit: {e}", spec.name);
                    }
                }
                log::info!("worker {}: started (pid {})", spec.name, pid.unwrap_or(0));
                match supervise(&spec, &mut child, &status, &mut stop, &backoff, &liveness).await {
                    Outcome::Stopped => {
                        status.send_modify(|s| s.state = WorkerState::Draining);
                        terminate(&spec, &mut child).await;
                        break;
                    }
                    Outcome::Unusable(status_text) => {
                        let _ = child.kill().await;
                        let reason = std::fs::read_to_string(&error_file)
                            .ok()
                            .map(|r| r.trim().to_string())
                            .filter(|r| !r.is_empty())
                            .unwrap_or_else(|| {
                                format!("the model file cannot be used ({status_text})")
                            });
                        let _ = std::fs::remove_file(&error_file);
                        log::error!(
                            "worker {}: {reason}; not restarting it: replace the model file, then unload and load the model",
                            spec.name
                        );
                        status.send_modify(|s| {
                            s.state = WorkerState::Failed;
                            s.pid = None;
                            s.info = None;
                            s.gave_up = true;
                            s.consecutive_failures = failures + 1;
                            s.last_error = Some(reason);
                        });
                        // Nothing to do but wait to be stopped.
                        while !*stop.borrow() {
                            if stop.changed().await.is_err() {
                                break;
                            }
                        }
                        break;
                    }
                    Outcome::Failed { reason, up_for } => {
                        // Make sure it is gone and reaped before starting another
                        // (SIGKILL: a hung or stopped worker ignores SIGTERM).
                        let _ = child.kill().await;
                        if up_for >= backoff.reset_after {
                            failures = 0;
                        }
                        reason
                    }
                }
            }
        };
        failures += 1;
        let delay = backoff.delay(failures);
        let crash_loop = failures >= backoff.crash_loop_after;
        if crash_loop {
            log::error!(
                "worker {}: crash loop: {failures} failures in a row, the last: {failure}; next attempt in {:.0}s",
                spec.name,
                delay.as_secs_f64()
            );
        } else {
            log::warn!(
                "worker {}: {failure}; restarting in {:.1}s (failure {failures} in a row)",
                spec.name,
                delay.as_secs_f64()
            );
        }
        status.send_modify(|s| {
            s.state = if crash_loop {
                WorkerState::Failed
            } else {
                WorkerState::BackingOff
            };
            s.pid = None;
            s.info = None;
            s.restarts += 1;
            s.consecutive_failures = failures;
            s.last_error = Some(failure);
        });
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.changed() => break,
        }
    }
    status.send_modify(|s| {
        s.state = WorkerState::Stopped;
        s.pid = None;
    });
    if let Some(cg) = &cgroups {
        cg.release(&spec.name);
    }
    log::info!("worker {}: stopped", spec.name);
}

enum Outcome {
    Stopped,
    Failed {
        reason: String,
        up_for: Duration,
    },
    /// Exited with [`EXIT_UNUSABLE_MODEL`] before it was ready.
    Unusable(String),
}

fn describe(exit: std::io::Result<ExitStatus>) -> String {
    match exit {
        Ok(st) => {
            use std::os::unix::process::ExitStatusExt;
            match (st.code(), st.signal()) {
                (Some(c), _) => format!("exited with status {c}"),
                (None, Some(s)) => format!(
                    "killed by signal {}",
                    Signal::try_from(s).map(|s| s.as_str()).unwrap_or("?")
                ),
                _ => format!("ended ({st})"),
            }
        }
        Err(e) => format!("could not be waited for: {e}"),
    }
}

/// Runs one child from start to exit or stop request.
async fn supervise(
    spec: &WorkerSpec,
    child: &mut tokio::process::Child,
    status: &watch::Sender<WorkerStatus>,
    stop: &mut watch::Receiver<bool>,
    backoff: &Backoff,
    liveness: &Liveness,
) -> Outcome {
    let started = Instant::now();
    // Until ready: probe the socket every 100 ms.
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        let ev = tokio::select! {
            e = child.wait() => Event::Exited(e),
            _ = stop.changed() => Event::Stop,
            _ = tick.tick() => Event::Tick,
        };
        match ev {
            Event::Exited(e) => {
                if matches!(&e, Ok(st) if st.code() == Some(EXIT_UNUSABLE_MODEL)) {
                    return Outcome::Unusable(describe(e));
                }
                return Outcome::Failed {
                    reason: format!("{} before it was ready", describe(e)),
                    up_for: started.elapsed(),
                };
            }
            Event::Stop => return Outcome::Stopped,
            Event::Tick => {
                if let Ok(info) = client::hello(&spec.socket, Duration::from_secs(2)).await {
                    log::info!(
                        "worker {}: ready after {:.1}s ({}, {}, context {})",
                        spec.name,
                        started.elapsed().as_secs_f64(),
                        info.architecture,
                        info.quantization,
                        info.context
                    );
                    status.send_modify(|s| {
                        s.state = WorkerState::Ready;
                        s.info = Some(info);
                    });
                    break;
                }
                if started.elapsed() > spec.ready_timeout {
                    return Outcome::Failed {
                        reason: format!("not ready within {:?}", spec.ready_timeout),
                        up_for: started.elapsed(),
                    };
                }
            }
        }
    }
    // Ready: a health check every `interval`; `misses` in a row and it is restarted.
    let ready_at = Instant::now();
    let mut tick = tokio::time::interval(liveness.interval);
    tick.reset();
    let mut misses = 0;
    loop {
        let ev = tokio::select! {
            e = child.wait() => Event::Exited(e),
            _ = stop.changed() => Event::Stop,
            _ = tick.tick() => Event::Tick,
        };
        match ev {
            Event::Exited(e) => {
                return Outcome::Failed {
                    reason: describe(e),
                    up_for: ready_at.elapsed(),
                }
            }
            Event::Stop => return Outcome::Stopped,
            Event::Tick => match client::health(&spec.socket, liveness.timeout).await {
                Ok(_) => {
                    misses = 0;
                    if ready_at.elapsed() >= backoff.reset_after {
                        status.send_modify(|s| s.consecutive_failures = 0);
                    }
                }
                Err(e) => {
                    misses += 1;
                    log::warn!(
                        "worker {}: health check failed ({misses}/{}): {e}",
                        spec.name,
                        liveness.misses
                    );
                    if misses >= liveness.misses {
                        return Outcome::Failed {
                            reason: format!("stopped answering health checks ({e})"),
                            up_for: ready_at.elapsed(),
                        };
                    }
                }
            },
        }
    }
}

/// SIGTERM, then SIGKILL after the grace period; always reaps.
async fn terminate(spec: &WorkerSpec, child: &mut tokio::process::Child) {
    if let Some(pid) = child.id() {
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
        match tokio::time::timeout(spec.grace, child.wait()).await {
            Ok(_) => return,
            Err(_) => log::warn!(
                "worker {}: still running {:?} after SIGTERM; killing it",
                spec.name,
                spec.grace
            ),
        }
    }
    let _ = child.kill().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One worker running `program`, restarted 10-20 ms apart, a crash loop after 3.
    fn quick(model: &str, socket: PathBuf, program: PathBuf) -> (Supervisor, Arc<Worker>) {
        let spec = WorkerSpec {
            name: "m".into(),
            model: model.into(),
            socket,
            program,
            extra_args: vec![],
            grace: Duration::from_secs(1),
            ready_timeout: Duration::from_secs(5),
            memory_limit: None,
        };
        let backoff = Backoff {
            base: Duration::from_millis(10),
            max: Duration::from_millis(20),
            reset_after: Duration::from_secs(60),
            crash_loop_after: 3,
        };
        let sup = Supervisor::start(vec![spec], backoff, Liveness::default());
        let w = sup.workers()[0].clone();
        (sup, w)
    }

    #[test]
    fn backoff_doubles_to_a_cap() {
        let b = Backoff::default();
        assert_eq!(b.delay(1), Duration::from_secs(1));
        assert_eq!(b.delay(2), Duration::from_secs(2));
        assert_eq!(b.delay(5), Duration::from_secs(16));
        assert_eq!(b.delay(100), Duration::from_secs(300));
        assert_eq!(Liveness::default().bound(), Duration::from_secs(10));
    }

    #[tokio::test]
    async fn a_worker_that_cannot_start_backs_off_and_stops_cleanly() {
        // `false` exits at once with status 1: a worker that dies on start.
        let socket = std::env::temp_dir().join(format!("sup-test-{}.sock", std::process::id()));
        let (sup, w) = quick("/nonexistent.gguf", socket, "false".into());
        let t0 = Instant::now();
        while w.status().state != WorkerState::Failed {
            assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", w.status());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Three failures in a row: reported as a crash loop, with the reason.
        let st = w.status();
        assert!(st.consecutive_failures >= 3 && st.restarts >= 3, "{st:?}");
        assert!(st.last_error.unwrap().contains("status 1"));
        assert!(!w.is_ready());
        sup.shutdown().await;
        assert_eq!(w.status().state, WorkerState::Stopped);
    }

    #[tokio::test]
    async fn a_worker_with_an_unusable_model_is_failed_for_good_with_its_reason() {
        let dir = std::env::temp_dir().join(format!("sup-unusable-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // Called as `worker --model M --socket S ...`: says why next to S, exits 65.
        let script = dir.join("worker.sh");
        std::fs::write(
            &script,
            "#!/bin/sh\necho \"$3 is not a valid GGUF file\" > \"${5%.sock}.error\"\nexit 65\n",
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let socket = dir.join("w.sock");
        let (sup, w) = quick("/models/junk.gguf", socket.clone(), script);
        let t0 = Instant::now();
        while !w.gave_up() {
            assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", w.status());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Long enough for several restarts at this back-off: none happens.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let st = w.status();
        assert_eq!(st.state, WorkerState::Failed, "{st:?}");
        assert_eq!(st.restarts, 0, "{st:?}");
        assert_eq!(
            st.last_error.as_deref(),
            Some("/models/junk.gguf is not a valid GGUF file")
        );
        assert!(!error_file(&socket).exists(), "the reason file is consumed");
        // Waiting for it to be ready ends at once: it never will be.
        let t = Instant::now();
        assert!(!w.wait_ready(Duration::from_secs(30)).await);
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
        sup.shutdown().await;
        assert_eq!(w.status().state, WorkerState::Stopped);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
