//! The RWKV-7 ("x070") model: the math in `rwkv7`, the recurrent state in `state`, the WKV scan in `wkv`.

pub mod wkv;
