//! tinybit: a small, local-first RWKV-7 toolkit with ternary (BitNet b1.58) BitLinear weights.
//!
//! Data flow: text --tokenizer--> token ids --model (RWKV-7 x070)--> logits --sampler--> tokens.
//! Training reads token files, evaluates on held-out text and writes checkpoints (one safetensors
//! file holding weights, config and tokenizer). The `tb-*` binaries in `src/bin` only parse flags
//! and call into this library.

pub mod bundled;
pub mod chat;
pub mod chat_cli;
pub mod checkpoint;
pub mod cli;
pub mod config;
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
