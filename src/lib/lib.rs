//! tinybit: a small, local-first RWKV-7 toolkit with ternary (BitNet b1.58) BitLinear weights.
//!
//! # Architecture
//!
//! Three layers; each imports only from the ones below it (`cargo doc --open` shows the modules).
//!
//! ```text
//! commands   src/bin/tb-*.rs       flags (argh) → library calls → exit code (`cli::run_main`)
//! front      cli, tb-chat/front.rs flag helpers, exit codes; tb-chat's REPL, pipe, --json modes
//! library    chat generate sample constrain template tools | train data tokfile eval toolgen
//!            engine (decode, CPU) | model (the spec, training ops) | checkpoint config
//!            tokenizer fetch convert bundled models dirs fsutil output threads device error
//! ```
//!
//! **A token through `tb-chat`**: `tb-chat/front.rs` reads a prompt (REPL, pipe line or `-p`) →
//! `chat::Session` renders it with `template` (the same bytes SFT trained on) and `tokenizer` →
//! `generate::Generation` feeds the ids to `engine::Engine` (`prefill`, then `step`:
//! memory-mapped weights, `engine::gemv` float and `engine::ternary` integer kernels, a plain-f32
//! `EngineState`) →
//! `sample::Sampler` picks the next id (inside a tool call, among those `constrain` allows) →
//! text streams out; a `<|tool_call|>` is parsed, run by `tools::Registry` (SQLite, the
//! calculator, the clock), and its result injected into the state before generation goes on.
//!
//! **A batch through `tb-train`**: `train::run` reads the train config → `data` draws windows
//! from a memory-mapped `tokfile` (or masked conversations for SFT) → `model::Rwkv7::forward`
//! runs on candle tensors (CPU: each block as one fused op, `model::block`; GPU: candle's CUDA
//! ops + `kernels/wkv7.cu`) → cross-entropy (`model::fused`) → candle's backward →
//! `train::optim` (AdamW, in place) → every N steps validation, `train::plot`'s `loss.svg` and
//! an atomic `checkpoint` (weights + config + tokenizer in one safetensors file).
//!
//! **Who owns the math**: `model::rwkv7` is the spec, the RWKV-7 block in numbered steps
//! (official parameter names and shapes from `model::params`, whose one per-layer list
//! `params::layer` the spec, the block op, TimeMix's core and the engine's loader all index),
//! written with composed candle ops.
//! Everything fast is a second executor of those steps: `model::fused` and `model::tmix`
//! (fused ops with hand-written backwards), `model::block` (one op per block), `model::wkv`
//! (the scan, SIMD and CUDA), `engine` (decode without candle). The per-token math between the
//! products (norms, shift-mix, TimeMix steps 3–8 and 10–12) and its constants and sizes are
//! written once, in `model::rows`, and run by both the training ops and the engine; so is the scan
//! (TimeMix step 9): the engine runs the fused forward's step, `wkv::wkv7_step_head`. `cuda` (the
//! launchers of `kernels/*.cu`) imports only `rows` from the model, so no module imports in a
//! circle.
//!
//! **The rule**: a fast path lives beside its slow twin (`*_reference`, `Kernel::Portable`,
//! `Kernels::Reference`, the composed candle model) and a test ties them — `tests/golden.rs`
//! (official vectors), `tests/gradients.rs`, `tests/engine.rs`, `tests/kernels.rs`, `tests/block.rs`,
//! `tests/wkv.rs`, `tests/fused.rs`.
//! Timings live in `tests/benches` (`cargo bench`), never in tests.

pub mod bundled;
pub mod chat;
pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod constrain;
pub mod convert;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod data;
pub mod device;
pub mod dirs;
pub mod engine;
pub mod error;
pub mod eval;
pub mod fetch;
pub mod fsutil;
pub mod generate;
pub mod model;
pub mod models;
pub mod output;
pub mod sample;
pub mod template;
pub mod threads;
pub mod tokenizer;
pub mod tokfile;
pub mod toolgen;
pub mod tools;
pub mod train;

pub use error::{Error, Result};
