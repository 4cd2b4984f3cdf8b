//! The engine's compute threads: a small fixed team that runs one parallel loop at a
//! time for the thread that owns the model.
//!
//! A decode step of a small model is a few hundred short loops (a matmul of 576 rows
//! takes tens of microseconds), so the cost of starting a loop matters more than its
//! scheduling. rayon's `join`/latch round trip put 25% of a one-thread decode into the
//! kernel scheduler; here the calling thread works on the loop itself, the other
//! threads spin briefly between loops (then sleep), and a one-thread team runs
//! everything inline with no synchronisation at all.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A loop body: `f(task, thread)` for every task index; `thread` is `0..threads()`.
type Body<'a> = dyn Fn(usize, usize) + Sync + 'a;

/// The loop being run, lifetime erased (see the SAFETY comment in [`Pool::run`]).
#[derive(Clone, Copy)]
struct Job {
    body: *const Body<'static>,
    tasks: usize,
}

// SAFETY: the pointer is only dereferenced while `Pool::run`, which owns the borrow it
// was made from, waits for every worker to finish with it; the body itself is `Sync`.
#[allow(unsafe_code)]
unsafe impl Send for Job {}

struct Shared {
    /// Bumped for every loop; workers wait for it to change.
    generation: AtomicU64,
    job: Mutex<Option<Job>>,
    next: AtomicUsize,
    /// Workers that have not yet finished the current loop.
    pending: AtomicUsize,
    panicked: AtomicBool,
    stop: AtomicBool,
    /// Sleeping workers wait here (after spinning for [`SPIN`]).
    sleep: Mutex<()>,
    wake: Condvar,
    /// Workers between deciding to sleep and waking: a loop notifies only when there
    /// are some (a notify is a system call even with nobody waiting, and a decode step
    /// starts a few hundred loops).
    sleepers: AtomicUsize,
}

/// How long an idle worker spins for the next loop before it sleeps.
const SPIN: Duration = Duration::from_millis(2);

/// A team of `threads` (the caller included).
pub struct Pool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("threads", &self.threads())
            .finish()
    }
}

impl Pool {
    /// A team of `threads` threads in all (at least 1: the caller).
    pub fn new(threads: usize) -> Self {
        let shared = Arc::new(Shared {
            generation: AtomicU64::new(0),
            job: Mutex::new(None),
            next: AtomicUsize::new(0),
            pending: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            sleep: Mutex::new(()),
            wake: Condvar::new(),
            sleepers: AtomicUsize::new(0),
        });
        let workers = (1..threads.max(1))
            .filter_map(|i| {
                let s = shared.clone();
                std::thread::Builder::new()
                    .name(format!("engine-{i}"))
                    .spawn(move || worker(&s, i))
                    .ok()
            })
            .collect();
        Self { shared, workers }
    }

    /// Threads in the team, the caller included.
    pub fn threads(&self) -> usize {
        self.workers.len() + 1
    }

    /// Runs `body(task, thread)` for every `task` in `0..tasks`, spread over the team;
    /// returns when all have run. Tasks are claimed one at a time, in order.
    pub fn run(&self, tasks: usize, body: &(dyn Fn(usize, usize) + Sync)) {
        if self.workers.is_empty() || tasks <= 1 {
            for t in 0..tasks {
                body(t, 0);
            }
            return;
        }
        let s = &*self.shared;
        // SAFETY: the `'static` is a lie told only to store the pointer; it is
        // dereferenced by workers strictly between the generation bump below and their
        // decrement of `pending`, and this function does not return (nor unwind: it only
        // panics after the wait) until `pending` is zero, so `body` outlives every use.
        #[allow(unsafe_code)]
        let erased: *const Body<'static> = unsafe {
            std::mem::transmute::<*const Body<'_>, *const Body<'static>>(body as *const Body<'_>)
        };
        *lock(&s.job) = Some(Job {
            body: erased,
            tasks,
        });
        s.next.store(0, Ordering::Relaxed);
        s.pending.store(self.workers.len(), Ordering::Relaxed);
        // SeqCst pairs with the worker's increment of `sleepers` before it looks at the
        // generation: either it sees this loop's generation, or this sees it sleeping
        // (and then cannot notify before it waits: both hold `sleep`).
        s.generation.fetch_add(1, Ordering::SeqCst);
        if s.sleepers.load(Ordering::SeqCst) > 0 {
            let _g = lock(&s.sleep);
            s.wake.notify_all();
        }
        // The caller's share; a panic in it waits for the workers before unwinding.
        let own = catch_unwind(AssertUnwindSafe(|| loop {
            let t = s.next.fetch_add(1, Ordering::Relaxed);
            if t >= tasks {
                break;
            }
            body(t, 0);
        }));
        let mut spins = 0u32;
        while s.pending.load(Ordering::Acquire) != 0 {
            spins += 1;
            if spins < 1 << 16 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        *lock(&s.job) = None;
        if let Err(p) = own {
            std::panic::resume_unwind(p);
        }
        if s.panicked.swap(false, Ordering::Relaxed) {
            panic!("an engine compute thread panicked");
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        self.shared.generation.fetch_add(1, Ordering::Release);
        {
            let _g = lock(&self.shared.sleep);
            self.shared.wake.notify_all();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn worker(s: &Shared, index: usize) {
    let mut seen = 0u64;
    loop {
        // Wait for the next loop: spin, then sleep until woken.
        let started = Instant::now();
        let mut spins = 0u32;
        loop {
            let g = s.generation.load(Ordering::Acquire);
            if g != seen {
                seen = g;
                break;
            }
            spins = spins.wrapping_add(1);
            if !spins.is_multiple_of(1024) || started.elapsed() < SPIN {
                std::hint::spin_loop();
                continue;
            }
            let guard = lock(&s.sleep);
            s.sleepers.fetch_add(1, Ordering::SeqCst);
            if s.generation.load(Ordering::SeqCst) == seen {
                // Woken by the next loop's notify (or spuriously: then look again).
                let _ = s
                    .wake
                    .wait_timeout(guard, Duration::from_millis(100))
                    .map(|(g, _)| drop(g));
            } else {
                drop(guard);
            }
            s.sleepers.fetch_sub(1, Ordering::SeqCst);
        }
        if s.stop.load(Ordering::Acquire) {
            return;
        }
        let job = *lock(&s.job);
        if let Some(job) = job {
            // SAFETY: see `Pool::run`: the body lives until `pending` reaches zero, and
            // this worker has not yet decremented it for this generation.
            #[allow(unsafe_code)]
            let body: &Body<'_> = unsafe { &*job.body };
            let ran = catch_unwind(AssertUnwindSafe(|| loop {
                let t = s.next.fetch_add(1, Ordering::Relaxed);
                if t >= job.tasks {
                    break;
                }
                body(t, index);
            }));
            if ran.is_err() {
                s.panicked.store(true, Ordering::Relaxed);
            }
        }
        s.pending.fetch_sub(1, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_task_runs_once_on_any_team() {
        for threads in [1, 2, 3] {
            let pool = Pool::new(threads);
            assert_eq!(pool.threads(), threads);
            for tasks in [0, 1, 7, 1000] {
                let hits: Vec<AtomicUsize> = (0..tasks).map(|_| AtomicUsize::new(0)).collect();
                let seen_threads = Mutex::new(std::collections::BTreeSet::new());
                pool.run(tasks, &|t, th| {
                    hits[t].fetch_add(1, Ordering::Relaxed);
                    assert!(th < threads);
                    seen_threads.lock().unwrap().insert(th);
                });
                assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
            }
        }
    }

    #[test]
    fn a_panicking_task_is_reported_and_the_team_survives() {
        let pool = Pool::new(2);
        let r = catch_unwind(AssertUnwindSafe(|| {
            pool.run(64, &|t, _| {
                if t == 40 {
                    panic!("boom");
                }
            })
        }));
        assert!(r.is_err());
        let n = AtomicUsize::new(0);
        pool.run(10, &|_, _| {
            n.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(n.load(Ordering::Relaxed), 10);
    }

    #[test]
    fn workers_sleep_and_wake() {
        let pool = Pool::new(2);
        std::thread::sleep(SPIN * 3);
        let n = AtomicUsize::new(0);
        pool.run(100, &|_, _| {
            n.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(n.load(Ordering::Relaxed), 100);
    }
}
