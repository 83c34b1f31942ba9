//! How many CPU threads a command may start.

use crate::output::warn;

/// The most CPU threads any command starts: twice the CPUs this process may use. More threads
/// only spin and wait on each other (`tb-chat -t 1000` produced nothing in a minute).
pub fn max_threads() -> usize {
    2 * std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// A requested thread count capped at `max_threads`; a larger one is lowered with a one-line
/// warning on stderr (once per process) naming `source`, where the number came from (`-t 1000`).
/// 0 (all cores) passes through.
pub fn clamp_threads(n: usize, source: &str) -> usize {
    let max = max_threads();
    if n <= max {
        return n;
    }
    static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
        warn(format!(
            "{source} is more than twice the {} CPUs; using {max} threads",
            max / 2
        ));
    }
    max
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oversized_thread_count_is_clamped_to_twice_the_cpus() {
        let max = max_threads();
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(max, 2 * cpus);
        assert_eq!(clamp_threads(0, "-t 0"), 0, "0 means all cores");
        assert_eq!(clamp_threads(1, "-t 1"), 1);
        assert_eq!(clamp_threads(max, "-t max"), max);
        assert_eq!(clamp_threads(max + 1, "-t max+1"), max);
        assert_eq!(clamp_threads(100_000, "-t 100000"), max);
        assert_eq!(clamp_threads(usize::MAX, "threads = huge"), max);
    }
}
