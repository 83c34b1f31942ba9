//! What every `tb-*` binary shares: turning a `Result` into an exit status and a one-line message.

use crate::error::{Error, Result};
use std::process::ExitCode;

// What library modules use too lives in `output` and `threads`; the commands find it here as well.
pub use crate::output::{program_name, progress_bar, stdout_err, style_of, warn};
pub use crate::threads::{clamp_threads, max_threads};

/// Runs a command body; prints `NAME: error: ...` on stderr and exits with the error's status.
/// A closed stdout pipe (`tb-chat ... | head -1`) ends quietly with 0.
pub fn run_main(name: &str, body: impl FnOnce() -> Result<()>) -> ExitCode {
    match body() {
        Ok(()) => ExitCode::SUCCESS,
        Err(Error::ClosedPipe) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// Parses `key=value` overrides given with `--set`.
pub fn parse_set(items: &[String]) -> Result<Vec<(String, String)>> {
    items
        .iter()
        .map(|s| match s.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => {
                Ok((k.trim().to_string(), v.trim().to_string()))
            }
            _ => Err(Error::usage(format!("--set expects key=value, got '{s}'"))),
        })
        .collect()
}

/// An `on`/`off` flag value (argh's `from_str_fn`), for choices whose absence means "auto".
pub fn on_off(s: &str) -> std::result::Result<bool, String> {
    match s {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(format!("expected on or off, not '{s}'")),
    }
}

/// The tokenizer to use: `--tokenizer FILE` when given, else the one a checkpoint carries.
pub fn load_tokenizer(
    model: Option<&std::path::Path>,
    tokenizer: Option<&std::path::Path>,
) -> Result<crate::tokenizer::Tokenizer> {
    use crate::tokenizer::Tokenizer;
    if let Some(t) = tokenizer {
        return Tokenizer::from_file(t);
    }
    let Some(m) = model else {
        return Err(Error::usage(
            "give a tokenizer with --tokenizer FILE or a model with -m FILE",
        ));
    };
    match crate::checkpoint::read_meta(m)?.tokenizer {
        Some((kind, payload)) => Tokenizer::from_metadata(&kind, &payload),
        None => Err(Error::Data(format!(
            "{} carries no tokenizer; give one with --tokenizer FILE",
            m.display()
        ))),
    }
}

/// Parses the command line with argh; `--help` (or `-h`, which argh alone rejects) prints and
/// exits 0, a usage error exits 2 (argh's own `from_env` would exit 1, against the convention).
/// `--completions bash|zsh|fish` prints the command's shell completion script, generated from
/// the same argh definitions, and exits 0.
pub fn parse_args<T: argh::FromArgs + argh::ArgsInfo>(name: &str) -> Result<T, ExitCode> {
    let argv: Vec<String> = match std::env::args_os().map(|a| a.into_string()).collect() {
        Ok(argv) => argv,
        Err(bad) => {
            eprintln!("{name}: error: argument {bad:?} is not valid UTF-8");
            return Err(ExitCode::from(2));
        }
    };
    let rest: Vec<&str> = argv
        .iter()
        .skip(1)
        .map(|a| if a == "-h" { "--help" } else { a.as_str() })
        .collect();
    if let ["--completions", shell] = rest.as_slice() {
        return Err(match completions::<T>(name, shell) {
            Some(script) => {
                print!("{script}");
                ExitCode::SUCCESS
            }
            None => {
                eprintln!("{name}: error: --completions {shell}: use bash, zsh or fish");
                ExitCode::from(2)
            }
        });
    }
    T::from_args(&[name], &rest).map_err(|early| {
        if early.status.is_ok() {
            print!("{}", early.output);
            ExitCode::SUCCESS
        } else {
            eprintln!("{}", early.output.trim_end());
            eprintln!("Run {name} --help for the options.");
            ExitCode::from(2)
        }
    })
}

/// The completion script of command `T` (invoked as `name`) for `shell`; `None` for a shell
/// without a generator.
pub fn completions<T: argh::ArgsInfo>(name: &str, shell: &str) -> Option<String> {
    use argh_complete::Generator;
    let info = T::get_args_info();
    Some(match shell {
        "bash" => argh_complete::bash::Bash::generate(name, &info),
        "zsh" => argh_complete::zsh::Zsh::generate(name, &info),
        "fish" => argh_complete::fish::Fish::generate(name, &info),
        _ => return None,
    })
}

/// Sets the CPU thread count for candle's GEMMs and rayon. Must run first thing in `main`, before
/// any tensor work: both read it once (candle caches `RAYON_NUM_THREADS` at its first tensor op). 0 keeps the default (all cores).
/// `n` (from `-t`) is capped by `clamp_threads`; returns the count to use from here on.
///
/// candle's own elementwise ops get one thread unless `CANDLE_NUM_THREADS` says otherwise: its
/// pool for them spin-waits at the end of every op, which on a busy 2-core machine halved
/// training throughput and doubled its CPU time (tinybit's fused ops use rayon instead).
pub fn set_threads(n: usize) -> usize {
    let n = clamp_threads(n, &format!("-t {n}"));
    // SAFETY: called at the top of main, before any other thread exists.
    unsafe {
        if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
            std::env::set_var("CANDLE_NUM_THREADS", "1");
        }
        if n > 0 {
            std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        }
    }
    if n > 0 {
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global();
    }
    n
}

/// Sizes the global pool from a config file's `threads` when neither `-t` nor
/// `RAYON_NUM_THREADS` did (they win); a no-op for 0 or once the pool is running. The config's
/// count is capped like `-t` (`clamp_threads`).
pub fn config_threads(flag: usize, config: usize) {
    if flag == 0 && config > 0 && std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = clamp_threads(config, &format!("the train config's threads = {config}"));
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global();
    }
}

/// Runs `f` on a thread with a large stack: candle's backward walks the graph recursively.
pub fn with_big_stack<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::Builder::new()
        // Fails only when the OS refuses a thread (no address space for the stack), before any
        // input is read; the panic message says so.
        .stack_size(1 << 30)
        .spawn(f)
        .expect("spawning the worker thread")
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
}

/// The system allocator, with an allocation failure turned into a one-line error and exit status
/// 74 (a resource the machine lacks, like a full disk) instead of Rust's abort (SIGABRT, status
/// 134, a backtrace and maybe a core dump). A binary installs it with
/// `#[global_allocator] static ALLOC: ExitOnOom = ExitOnOom { name: "tb-train", hint: "..." };`.
///
/// `Vec::try_reserve` and other fallible allocations exit too instead of returning their error:
/// the binaries that install it never recover from a failed allocation anyway.
pub struct ExitOnOom {
    /// The binary's name, for the message.
    pub name: &'static str,
    /// What to do about it, e.g. "lower batch_size or ctx_len".
    pub hint: &'static str,
}

impl ExitOnOom {
    #[cold]
    fn out_of_memory(&self, size: usize) -> ! {
        use std::io::Write;
        // Nothing here allocates: the message is formatted on the stack and written with write(2).
        let mut buf = [0u8; 512];
        let mut w: &mut [u8] = &mut buf;
        let _ = writeln!(
            w,
            "{}: error: out of memory: allocating {size} bytes failed; {}",
            self.name, self.hint
        );
        let n = 512 - w.len();
        #[cfg(unix)]
        // SAFETY: write(2) of an initialised buffer, then _exit(2), which runs no destructors
        // or handlers that could allocate.
        unsafe {
            libc::write(2, buf.as_ptr().cast(), n);
            libc::_exit(74)
        }
        #[cfg(not(unix))]
        {
            let _ = std::io::stderr().write_all(&buf[..n]);
            std::process::exit(74)
        }
    }
}

// SAFETY: every call is forwarded to the system allocator unchanged; only a null result (a
// failure) is acted on, by exiting.
unsafe impl std::alloc::GlobalAlloc for ExitOnOom {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        let p = unsafe { std::alloc::System.alloc(layout) };
        if p.is_null() {
            self.out_of_memory(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        let p = unsafe { std::alloc::System.alloc_zeroed(layout) };
        if p.is_null() {
            self.out_of_memory(layout.size());
        }
        p
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { std::alloc::System.realloc(ptr, layout, new_size) };
        if p.is_null() {
            self.out_of_memory(new_size);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }
}
