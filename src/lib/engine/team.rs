//! The engine's worker threads: a parallel `for` over task indices whose workers spin between
//! calls instead of sleeping.
//!
//! A token is ~110 parallel regions a few microseconds apart. Rayon's workers yield and then
//! sleep between them, and waking a sleeping thread costs tens of microseconds on a VM: two
//! threads spent a third of each token waiting. Here the caller publishes a region with one
//! atomic store, takes tasks itself, and the workers, still spinning from the last region, take
//! the rest. After `SPIN` without work a worker parks until the next region unparks it.
//!
//! One word holds a region's generation, task count and next unclaimed index, so a claim (one
//! compare-and-swap) succeeds only on the word as it is now: a claim on the current region. A
//! worker reads the job only after claiming, and the job stays valid while any claimed task is
//! unfinished, because the caller waits for all of them before it returns.

use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long an idle worker spins before it parks: longer than the gaps inside a token and
/// between tokens, short enough that an idle engine stops using the CPU at once.
const SPIN: Duration = Duration::from_micros(300);

/// Bits of the task index and of the task count in the shared word; the generation takes the rest.
const IDX_BITS: u32 = 24;
const IDX_MASK: u64 = (1 << IDX_BITS) - 1;

type Job = dyn Fn(usize) + Sync;

struct Shared {
    /// generation << 48 | task count << 24 | next index.
    word: AtomicU64,
    /// The current region's job, lifetime erased; read only by a thread holding a claim.
    job: Mutex<Option<&'static Job>>,
    /// Tasks of the current region finished (by anyone).
    done: AtomicUsize,
    panicked: AtomicBool,
    stop: AtomicBool,
}

/// `threads − 1` workers; the caller of [`Team::run`] is the last one.
pub struct Team {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    /// One region at a time (engine clones share a team).
    region: Mutex<()>,
}

impl Team {
    /// Starts `threads − 1` workers named `tb-engine-N`.
    pub fn new(threads: usize) -> std::io::Result<Team> {
        let shared = Arc::new(Shared {
            word: AtomicU64::new(0),
            job: Mutex::new(None),
            done: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            stop: AtomicBool::new(false),
        });
        let mut workers = Vec::new();
        for i in 1..threads.max(1) {
            let s = shared.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("tb-engine-{i}"))
                .spawn(move || worker(&s));
            match spawned {
                Ok(h) => workers.push(h),
                Err(e) => {
                    // Stop the ones already started before reporting.
                    drop(Team {
                        shared,
                        workers,
                        region: Mutex::new(()),
                    });
                    return Err(e);
                }
            }
        }
        Ok(Team {
            shared,
            workers,
            region: Mutex::new(()),
        })
    }

    /// Runs `f(0)`, …, `f(n − 1)`, each once, spread over the team; returns when all are done.
    /// A panic in any task is raised here after the others finish. A task must not call `run`
    /// on the same team (the region lock is not re-entrant).
    pub fn run<'f>(&self, n: usize, f: &'f (dyn Fn(usize) + Sync + 'f)) {
        assert!((n as u64) <= IDX_MASK, "too many tasks for one region");
        if n == 0 {
            return;
        }
        let _one = self.region.lock().unwrap_or_else(|p| p.into_inner());
        let s = &*self.shared;
        // SAFETY: the erased reference is used only by threads holding a claim of this region,
        // and this function returns only after every claimed task has finished.
        let job =
            unsafe { std::mem::transmute::<&'f (dyn Fn(usize) + Sync + 'f), &'static Job>(f) };
        *s.job.lock().unwrap_or_else(|p| p.into_inner()) = Some(job);
        s.done.store(0, Ordering::Relaxed);
        let generation = (s.word.load(Ordering::Relaxed) >> (2 * IDX_BITS)) + 1;
        s.word.store(
            (generation << (2 * IDX_BITS)) | ((n as u64) << IDX_BITS),
            Ordering::Release,
        );
        for w in &self.workers {
            w.thread().unpark();
        }
        while let Some(i) = claim(s) {
            finish(s, job, i);
        }
        let mut spins = 0u32;
        while s.done.load(Ordering::Acquire) < n {
            spin(&mut spins);
        }
        *s.job.lock().unwrap_or_else(|p| p.into_inner()) = None;
        if s.panicked.swap(false, Ordering::Relaxed) {
            resume_unwind(Box::new("an engine task panicked"));
        }
    }
}

impl Drop for Team {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        for w in self.workers.drain(..) {
            w.thread().unpark();
            let _ = w.join();
        }
    }
}

/// Claims the next task of the region in `word`, if one is left.
fn claim(s: &Shared) -> Option<usize> {
    let mut w = s.word.load(Ordering::Acquire);
    loop {
        let (count, next) = ((w >> IDX_BITS) & IDX_MASK, w & IDX_MASK);
        if next >= count {
            return None;
        }
        match s
            .word
            .compare_exchange_weak(w, w + 1, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => return Some(next as usize),
            Err(now) => w = now,
        }
    }
}

/// Runs a claimed task and counts it done, whether or not it panicked. The panic's payload is
/// leaked, not dropped: a payload whose drop panics would otherwise escape uncounted.
fn finish(s: &Shared, job: &Job, i: usize) {
    if let Err(payload) = catch_unwind(AssertUnwindSafe(|| job(i))) {
        std::mem::forget(payload);
        s.panicked.store(true, Ordering::Relaxed);
    }
    s.done.fetch_add(1, Ordering::Release);
}

/// One turn of a busy wait. Every 1024th gives the CPU away: with more threads than CPUs
/// (`-t` up to twice the cores) the thread being waited for may need this one's CPU.
fn spin(spins: &mut u32) {
    *spins = spins.wrapping_add(1);
    if spins.is_multiple_of(1024) {
        std::thread::yield_now();
    } else {
        std::hint::spin_loop();
    }
}

fn worker(s: &Shared) {
    let mut idle_since = Instant::now();
    let mut spins = 0u32;
    while !s.stop.load(Ordering::Acquire) {
        if let Some(i) = claim(s) {
            // Holding a claim keeps the region's job in place (see the module comment).
            let job = s
                .job
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .expect("a claimed region has a job");
            finish(s, job, i);
            idle_since = Instant::now();
        } else if !spins.is_multiple_of(64) || idle_since.elapsed() < SPIN {
            // The clock only every 64 turns: on some VMs reading it is a system call.
            spin(&mut spins);
        } else {
            // `run` unparks after publishing, so a region that comes between the last check
            // and this call leaves a token and park returns at once.
            std::thread::park();
            idle_since = Instant::now();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Team;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Every index of every region runs exactly once, on teams of 1–4 threads, with regions
    /// back to back (workers spinning) and after a pause (workers parked).
    #[test]
    fn every_task_runs_once_per_region() {
        for threads in 1..=4 {
            let team = Team::new(threads).unwrap();
            for n in [1usize, 2, 3, 7, 64, 1000] {
                let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                for round in 0..20 {
                    team.run(n, &|i| {
                        hits[i].fetch_add(1, Ordering::Relaxed);
                    });
                    if round == 10 {
                        std::thread::sleep(std::time::Duration::from_millis(2));
                    }
                }
                assert!(
                    hits.iter().all(|h| h.load(Ordering::Relaxed) == 20),
                    "{threads} {n}"
                );
            }
        }
    }

    /// A panicking task reaches the caller after the other tasks finish; the team still works.
    #[test]
    fn a_task_panic_reaches_the_caller_and_the_team_survives() {
        let team = Team::new(3).unwrap();
        let done = AtomicUsize::new(0);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            team.run(50, &|i| {
                assert!(i != 17, "task 17 fails");
                done.fetch_add(1, Ordering::Relaxed);
            })
        }));
        assert!(r.is_err());
        assert_eq!(done.load(Ordering::Relaxed), 49);
        let again = AtomicUsize::new(0);
        team.run(10, &|_| {
            again.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(again.load(Ordering::Relaxed), 10);
    }

    /// Two callers sharing one team (engine clones) take turns and both get all their tasks.
    #[test]
    fn callers_sharing_a_team_take_turns() {
        let team = Arc::new(Team::new(2).unwrap());
        let callers: Vec<_> = (0..2)
            .map(|_| {
                let team = team.clone();
                std::thread::spawn(move || {
                    let sum = AtomicUsize::new(0);
                    for _ in 0..200 {
                        team.run(16, &|i| {
                            sum.fetch_add(i, Ordering::Relaxed);
                        });
                    }
                    sum.into_inner()
                })
            })
            .collect();
        for c in callers {
            assert_eq!(c.join().unwrap(), 200 * (0..16).sum::<usize>());
        }
    }
}
