//! RWKV-7 "x070", the math of the official reference (BlinkDL/RWKV-LM, `RWKV-v7/rwkv_v7_demo.py`).
//! Shapes: B batch, T time, C = d_model, H heads of N = head_size channels, F = d_ffn, V = vocab.
//!
//! ```text
//! x = LN(emb[token]; ln0)                                  (ln0: block 0 only; LN eps 1e-5)
//! each layer: x += TimeMix(LN(x; ln1));  x += ChannelMix(LN(x; ln2))
//! logits = head · LN(x; ln_out)
//! ```
//!
//! TimeMix, for the ln1 output `x` of a token and `p` that of the previous token (zero at the
//! start; the `att_shift` state). Other modules cite these steps by number.
//! 1. Token shift: `x_m = x + (p − x) ⊙ μ_m` for m ∈ {r, w, k, v, a, g}.
//! 2. Projections: `r = W_r x_r`, `k = W_k x_k`, `v = W_v x_v`.
//! 3. Decay: logit `ŵ = w0 + tanh(x_w w1) w2`, multiplier `w = exp(−e^{−1/2} σ(ŵ))` ∈ (0.545, 1).
//! 4. Value residual: layer 0 keeps `v_first = v`; the later layers lerp toward it,
//!    `v += (v_first − v) ⊙ σ(v0 + x_v v1 v2)`.
//! 5. In-context learning rate: `a = σ(a0 + x_a a1 a2)`.
//! 6. Gate: `g = σ(x_g g1) g2` (not squashed).
//! 7. Key normalisation, per head: `κ̂ = κ / max(‖κ‖, 1e-12)` with `κ = k ⊙ k_k`.
//! 8. Key modulation: `k' = k ⊙ (1 + (a − 1) ⊙ k_a)`.
//! 9. The WKV-7 scan per head ([`super::wkv`]) with `a = −κ̂`, `b = κ̂ ⊙ a`, writing `v k'ᵀ`;
//!    `y` is read from the state after the update.
//! 10. GroupNorm of `y`, a group per head (`ln_x`, eps 64e-5).
//! 11. Bonus, per head: `o += (Σ_j r_j k'_j r_k[j]) v`.
//! 12. Output: `W_o (o ⊙ g)`.
//!
//! ChannelMix: the token shift with `ffn.x_k` (previous token: `ffn_shift`), then
//! `W_value relu(W_key x_k)²`. Linear weights are stored `[out, in]`, LoRA pairs `[in, out]`.
//!
//! One definition of the math serves both entry points: `forward` takes `[B,T]` tokens with an
//! optional state and returns the logits and the final state; `step` is `forward` with T = 1.

use super::block::{self, BlockDims};
use super::fused::Kernels;
use super::linear::{Linear, LinearKind};
use super::params::{is_ternary, layer_name};
use super::rows::LN_EPS;
use super::state::{LayerState, State};
use super::tmix;
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::ops::sigmoid;
use std::collections::HashMap;

/// Tokens (B·T) from which an inference call without gradients runs the fused block op.
const BLOCK_MIN_TOKENS: usize = 64;

#[derive(Clone, Debug)]
struct Norm {
    w: Tensor,
    b: Tensor,
}

impl Norm {
    /// LayerNorm over the channels of `x [R, C]`.
    fn forward(&self, x: &Tensor, k: Kernels) -> Result<Tensor> {
        k.norm(x, &self.w, &self.b, self.w.elem_count(), LN_EPS as f64)
    }
}

/// The last token's row of each sequence of `x [B·T, C]`: `[B, C]`.
fn last_token(x: &Tensor, b: usize, t: usize) -> Result<Tensor> {
    let c = x.dim(1)?;
    Ok(x.reshape((b, t, c))?
        .narrow(1, t - 1, 1)?
        .squeeze(1)?
        .contiguous()?)
}

#[derive(Clone, Debug)]
struct TimeMix {
    layer: usize,
    x_r: Tensor,
    x_w: Tensor,
    x_k: Tensor,
    x_v: Tensor,
    x_a: Tensor,
    x_g: Tensor,
    w0: Tensor,
    w1: Tensor,
    w2: Tensor,
    a0: Tensor,
    a1: Tensor,
    a2: Tensor,
    v0: Tensor,
    v1: Tensor,
    v2: Tensor,
    g1: Tensor,
    g2: Tensor,
    k_k: Tensor,
    k_a: Tensor,
    r_k: Tensor,
    receptance: Linear,
    key: Linear,
    value: Linear,
    output: Linear,
    ln_x: Norm,
}

/// `x · m1 · m2` for a LoRA pair stored `[in, out]` (the official layout: no transpose).
fn lora(x: &Tensor, m1: &Tensor, m2: &Tensor) -> Result<Tensor> {
    Ok(x.matmul(m1)?.matmul(m2)?)
}

impl TimeMix {
    /// `x`: ln1 output `[B·T, C]` of `b` sequences. Returns the mix output and updates
    /// `st.att_shift`, `st.wkv`; `v_first` is set by layer 0 and read by the others (value
    /// residual).
    fn forward(
        &self,
        x: &Tensor,
        b: usize,
        st: &mut LayerState,
        v_first: &mut Option<Tensor>,
        kn: Kernels,
    ) -> Result<Tensor> {
        let t = x.dim(0)? / b;
        // 1. Token shift.
        let mix = |mu: &Tensor| kn.token_mix(x, &st.att_shift, mu, t);
        let (xr, xw, xk) = (mix(&self.x_r)?, mix(&self.x_w)?, mix(&self.x_k)?);
        let (xv, xa, xg) = (mix(&self.x_v)?, mix(&self.x_a)?, mix(&self.x_g)?);
        // 2. Projections.
        let r = self.receptance.forward_with(&xr, kn)?;
        let k = self.key.forward_with(&xk, kn)?;
        let v = self.value.forward_with(&xv, kn)?;
        // The LoRA halves of 3. the decay logit, 4. the value residual, 5. the in-context
        // learning rate and 6. the gate; layer 0 records its v for the value residual.
        let wl = xw.matmul(&self.w1)?.tanh()?.matmul(&self.w2)?;
        let al = lora(&xa, &self.a1, &self.a2)?;
        let g = sigmoid(&xg.matmul(&self.g1)?)?.matmul(&self.g2)?;
        let vl = match v_first {
            None => {
                *v_first = Some(v.clone());
                None
            }
            Some(_) => Some(lora(&xv, &self.v1, &self.v2)?),
        };
        // The rest of 3.–12. up to the output matrix, the WKV scan included.
        let acts = tmix::Acts {
            r: &r,
            wl: &wl,
            k: &k,
            v: &v,
            al: &al,
            g: &g,
            residual: vl.as_ref().zip(v_first.as_ref()),
        };
        let params = tmix::Params {
            w0: &self.w0,
            a0: &self.a0,
            v0: &self.v0,
            k_k: &self.k_k,
            k_a: &self.k_a,
            r_k: &self.r_k,
            ln_w: &self.ln_x.w,
            ln_b: &self.ln_x.b,
        };
        let (z, s) = kn.time_mix_core(&acts, &params, &st.wkv, b)?;
        // 12. Output.
        st.att_shift = last_token(x, b, t)?;
        st.wkv = s;
        self.output.forward_with(&z, kn)
    }
}

#[derive(Clone, Debug)]
struct ChannelMix {
    x_k: Tensor,
    key: Linear,
    value: Linear,
}

impl ChannelMix {
    /// `x`: ln2 output `[B·T, C]` of `b` sequences: `W_value · relu(W_key · x_k)²`.
    fn forward(&self, x: &Tensor, b: usize, st: &mut LayerState, kn: Kernels) -> Result<Tensor> {
        let t = x.dim(0)? / b;
        let xk = kn.token_mix(x, &st.ffn_shift, &self.x_k, t)?;
        let h = kn.relu_sq(&self.key.forward_with(&xk, kn)?)?;
        st.ffn_shift = last_token(x, b, t)?;
        self.value.forward_with(&h, kn)
    }
}

#[derive(Clone, Debug)]
struct Block {
    ln1: Norm,
    ln2: Norm,
    att: TimeMix,
    ffn: ChannelMix,
    /// The block's tensors in the order of `params::layer`, for the fused block op.
    packed: Vec<Tensor>,
    /// Whether every linear of the block is dense (the block op has no BitLinear).
    dense: bool,
}

/// An RWKV-7 model whose parameters are candle tensors (plain, or the tensors of training `Var`s).
#[derive(Clone, Debug)]
pub struct Rwkv7 {
    pub cfg: ModelConfig,
    emb: Tensor,
    ln0: Norm,
    blocks: Vec<Block>,
    ln_out: Norm,
    /// `None` when the head is tied to the embedding.
    head: Option<Tensor>,
    device: Device,
    kernels: Kernels,
}

impl Rwkv7 {
    /// Builds the model from named parameters (official names; see `params::param_specs`).
    /// Shapes must already have been checked (the checkpoint loader does, naming file and tensor).
    pub fn from_params(cfg: &ModelConfig, p: &HashMap<String, Tensor>) -> Result<Rwkv7> {
        let get = |name: &str| -> Result<Tensor> {
            p.get(name)
                .cloned()
                .ok_or_else(|| Error::Data(format!("parameter {name} is missing")))
        };
        let norm = |prefix: &str| -> Result<Norm> {
            Ok(Norm {
                w: get(&format!("{prefix}.weight"))?,
                b: get(&format!("{prefix}.bias"))?,
            })
        };
        let linear = |name: &str| -> Result<Linear> {
            let kind = if is_ternary(cfg, name) {
                LinearKind::Ternary
            } else {
                LinearKind::Dense
            };
            Ok(Linear::new(get(name)?, kind))
        };
        // The `[1,1,C]` vectors as `[C]`, which broadcast against the `[B·T, C]` activations.
        let vector = |name: &str| -> Result<Tensor> { Ok(get(name)?.flatten_all()?) };
        use super::params::layer::{self, *};
        let mut blocks = Vec::with_capacity(cfg.n_layer);
        for i in 0..cfg.n_layer {
            let p = |j: usize| get(&layer_name(i, j));
            let v = |j: usize| vector(&layer_name(i, j));
            let lin = |j: usize| linear(&layer_name(i, j));
            let norm = |w: usize, b: usize| -> Result<Norm> { Ok(Norm { w: p(w)?, b: p(b)? }) };
            let att = TimeMix {
                layer: i,
                x_r: v(X_R)?,
                x_w: v(X_W)?,
                x_k: v(X_K)?,
                x_v: v(X_V)?,
                x_a: v(X_A)?,
                x_g: v(X_G)?,
                w0: v(W0)?,
                w1: p(W1)?,
                w2: p(W2)?,
                a0: v(A0)?,
                a1: p(A1)?,
                a2: p(A2)?,
                v0: v(V0)?,
                v1: p(V1)?,
                v2: p(V2)?,
                g1: p(G1)?,
                g2: p(G2)?,
                k_k: v(K_K)?,
                k_a: v(K_A)?,
                r_k: p(R_K)?,
                receptance: lin(WR)?,
                key: lin(WK)?,
                value: lin(WV)?,
                output: lin(WO)?,
                ln_x: norm(LNX_W, LNX_B)?,
            };
            let ffn = ChannelMix {
                x_k: v(FFN_X_K)?,
                key: lin(FK)?,
                value: lin(FV)?,
            };
            let dense = [
                &att.receptance,
                &att.key,
                &att.value,
                &att.output,
                &ffn.key,
                &ffn.value,
            ]
            .iter()
            .all(|l| l.kind == LinearKind::Dense);
            blocks.push(Block {
                ln1: norm(LN1_W, LN1_B)?,
                ln2: norm(LN2_W, LN2_B)?,
                att,
                ffn,
                packed: (0..layer::COUNT).map(p).collect::<Result<_>>()?,
                dense,
            });
        }
        let emb = get("emb.weight")?;
        let device = emb.device().clone();
        Ok(Rwkv7 {
            cfg: cfg.clone(),
            ln0: norm("blocks.0.ln0")?,
            ln_out: norm("ln_out")?,
            head: if cfg.tie_embeddings {
                None
            } else {
                Some(get("head.weight")?)
            },
            emb,
            blocks,
            device,
            kernels: Kernels::Fused,
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// A zero state for `batch` sequences.
    pub fn zero_state(&self, batch: usize) -> Result<State> {
        State::zeros(&self.cfg, batch, &self.device)
    }

    /// Whole-sequence forward: `tokens [B,T]` (u32) → logits `[B,T,V]` and the state after the
    /// last token. `state` (or zeros) is the state before the first token; it is not modified.
    pub fn forward(&self, tokens: &Tensor, state: Option<&State>) -> Result<(Tensor, State)> {
        let (b, t) = tokens.dims2()?;
        let (x, st) = self.hidden(tokens, state)?;
        let logits = self.kernels.linear(&x, self.head_weight())?;
        Ok((logits.reshape((b, t, self.cfg.vocab_size))?, st))
    }

    /// The forward up to the head: the `ln_out` output `[B·T, C]` (rows in batch-major order)
    /// and the state after the last token. Training feeds it to a head fused with the loss.
    pub fn hidden(&self, tokens: &Tensor, state: Option<&State>) -> Result<(Tensor, State)> {
        let b = tokens.dims2()?.0;
        let mut st = match state {
            Some(s) => s.clone(),
            None => self.zero_state(b)?,
        };
        let kn = self.kernels;
        let ids = tokens.flatten_all()?.to_dtype(DType::U32)?;
        let mut x = self.ln0.forward(&self.emb.index_select(&ids, 0)?, kn)?;
        // `Kernels::Fused` runs each block as one op (`block`), when the tensors are f32 on the
        // CPU and every linear is dense: BitLinear (ternary) configs keep the per-op path. The
        // op packs the block's weights into one tensor per call (a copy of every weight), which
        // pays off in training and over many tokens, not in a few-token inference step.
        let t = tokens.dims2()?.1;
        let training = self
            .blocks
            .iter()
            .any(|blk| blk.packed.iter().any(Tensor::track_op));
        let whole_blocks = kn == Kernels::Fused
            && (training || b * t >= BLOCK_MIN_TOKENS)
            && !self.blocks.is_empty()
            && self
                .blocks
                .iter()
                .zip(&st.layers)
                .all(|(blk, ls)| blk.dense && block::supported(&x, &blk.packed, ls));
        if whole_blocks {
            let l = self.cfg.lora();
            let d = BlockDims {
                b,
                t,
                h: self.cfg.n_head(),
                n: self.cfg.head_size,
                f: self.cfg.d_ffn,
                lora: [l.w, l.a, l.v, l.g],
            };
            for (i, (blk, ls)) in self.blocks.iter().zip(st.layers.iter_mut()).enumerate() {
                x = block::block(&x, &blk.packed, ls, d, i == 0)?;
                let s = block::state_of(&x, d)?;
                // Outside training the state outlives the call (eval carries it across chunks):
                // views of the block's output would keep all of it alive, so copy the rows.
                *ls = if training {
                    s
                } else {
                    LayerState {
                        att_shift: s.att_shift.copy()?,
                        ffn_shift: s.ffn_shift.copy()?,
                        wkv: s.wkv.copy()?,
                    }
                };
            }
            let x = block::hidden_of(&x, d)?;
            return Ok((self.ln_out.forward(&x, kn)?, st));
        }
        let mut v_first = None;
        for (blk, ls) in self.blocks.iter().zip(st.layers.iter_mut()) {
            debug_assert_eq!(blk.att.layer == 0, v_first.is_none());
            let att = blk
                .att
                .forward(&blk.ln1.forward(&x, kn)?, b, ls, &mut v_first, kn)?;
            x = (&x + att)?;
            x = (&x + blk.ffn.forward(&blk.ln2.forward(&x, kn)?, b, ls, kn)?)?;
        }
        Ok((self.ln_out.forward(&x, kn)?, st))
    }

    /// The output matrix `[V, C]` (the embedding when tied).
    pub fn head_weight(&self) -> &Tensor {
        self.head.as_ref().unwrap_or(&self.emb)
    }

    /// Which operator implementations the forward runs (see [`Kernels`]).
    pub fn kernels(&self) -> Kernels {
        self.kernels
    }

    /// Switches between the fused block op, the fused operators and their composed twins
    /// (tests, benchmarks).
    pub fn set_kernels(&mut self, kernels: Kernels) {
        self.kernels = kernels;
    }

    /// One token for each of the `B` sequences of `state`: logits `[B,V]`; the state advances.
    pub fn step(&self, tokens: &[u32], state: &mut State) -> Result<Tensor> {
        let t = Tensor::from_slice(tokens, (tokens.len(), 1), &self.device)?;
        let (logits, st) = self.forward(&t, Some(state))?;
        *state = st;
        Ok(logits.squeeze(1)?)
    }
}
