//! The RWKV-7 ("x070") model: the math in `rwkv7`, the recurrent state in `state`, the WKV scan in
//! `wkv`, dense/ternary matrices in `linear`, names and shapes in `params`, a fresh model in `init`,
//! the per-token row kernels and constants shared with the engine in `rows`.

pub mod block;
pub mod fused;
pub mod init;
pub mod linear;
pub mod params;
pub mod rows;
pub mod rwkv7;
pub mod state;
pub mod tmix;
pub mod wkv;

pub use rwkv7::Rwkv7;
pub use state::State;
