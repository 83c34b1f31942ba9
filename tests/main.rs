//! The one integration-test binary: each module tests one part of tinybit.

mod assistant;
mod block;
mod chat;
mod common;
mod convert;
mod engine;
mod eval;
mod eval_cli;
mod fetch;
mod fused;
mod golden;
mod gpu;
mod gradients;
mod hostile;
mod kernels;
mod manpages;
mod model;
mod readme;
mod scripts;
mod tokenizer;
mod toolgen;
mod tools;
mod train;
mod wkv;
mod wkv_case;
