//! The CPU inference engine: the Foundation 1 RWKV-7 model (the same math as `model::rwkv7`) for
//! one sequence, without candle.
//!
//! - Weights are memory-mapped from the checkpoint and used in place (f32, f16 or bf16; products
//!   always accumulate in f32); `EngineOptions::dtype` converts them once at load instead.
//!   BitLinear matrices are trits plus a scale (from a packed checkpoint, or ternarised at load),
//!   packed 2 bits each; their inputs are quantised to 8 bits once per token and the products run
//!   in integer arithmetic (`ternary`).
//! - No allocation per token: every intermediate lives in scratch buffers sized at load (the
//!   8-bit inputs of ternary products grow once, on the first chunk).
//! - Products run on SIMD kernels (`gemv`), split by output rows over a
//!   team of persistent worker threads that spin between the regions of a token (`team`).
//!   Each output row is always computed by one thread in one order, so the logits are bit-identical
//!   for every thread count.
//! - The state (`EngineState`) is plain f32 vectors, each head's WKV matrix transposed as the
//!   scan keeps it; the scan is training's (`wkv::wkv7_step_head`), in f32.
//! - Prefill runs the prompt in chunks of `PREFILL_CHUNK` tokens, so each weight row is read once
//!   per chunk and reused for every token in it (tile kernels); decoding is the chunk of one token.
//! - The per-token math between the products (norms, shift-mix, TimeMix steps 3–8 and 10–12) is
//!   `model::rows`, the same code the training ops run.

pub mod gemv;
mod kernel;
mod team;
pub mod ternary;
mod weights;

pub use gemv::{Input, Kernel, Matrix, WeightDtype};
pub use ternary::QuantActs;

use crate::checkpoint::Meta;
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::model::State;
use crate::model::rows::{self, TmixParams, TmixRow, tmix_out_head, tmix_prep};
use crate::model::state::LayerState;
use crate::model::wkv::wkv7_step_head;
use candle_core::{Device, Tensor};
use std::path::Path;
use std::sync::Arc;
use team::Team;
use weights::{Block, Weights};

/// Tokens processed together during prefill (weight reuse factor; bounded by cache size): 64
/// prefilled micro's f32 10–20% faster than 32 on one thread (the inputs of a chunk, 64 × 1344
/// floats at most there, still fit in L2).
pub const PREFILL_CHUNK: usize = 64;

/// How to load and run the engine.
#[derive(Clone, Debug, Default)]
pub struct EngineOptions {
    /// Worker threads (`-t/--threads`); 0 = one per available CPU; at most `threads::max_threads`.
    pub threads: usize,
    /// Store the big dense matrices in this dtype (converted once at load; f32, f16 or bf16);
    /// `None` = as in the file. Ternary matrices stay ternary.
    pub dtype: Option<WeightDtype>,
    /// Force a kernel family (tests, benchmarks); `None` = the fastest this CPU supports.
    pub kernel: Option<Kernel>,
    /// Hold the head (and a tied embedding) as 8-bit rows with a scale each: half the bytes of
    /// f16 per token. `None`: on for packed (ternary) checkpoints, where the head would otherwise
    /// be most of the bytes read per token, and off for float ones. On the bundled assistant it
    /// moves perplexity 0.02% (`engine_q8_head_costs_under_one_percent_perplexity_…`).
    pub head_q8: Option<bool>,
}

/// The recurrent state of one sequence (as `model::state`), layer after layer.
#[derive(Clone, Debug, PartialEq)]
pub struct EngineState {
    n_layer: usize,
    c: usize,
    hnn: usize,
    /// `[L, C]`: ln1 output of the last token, per layer.
    att_shift: Vec<f32>,
    /// `[L, H, N, N]`: WKV matrices, each transposed (`[head, key j, value i]`) as the scan
    /// (`wkv::wkv7_step_head`) keeps it; the model's layout at the edges (`from_model_state`,
    /// `to_model_state`).
    wkv: Vec<f32>,
    /// `[L, C]`: ln2 output of the last token, per layer.
    ffn_shift: Vec<f32>,
}

impl EngineState {
    /// Layers, channels, and WKV floats per layer of a model's state.
    fn dims(cfg: &ModelConfig) -> (usize, usize, usize) {
        let n = cfg.head_size;
        (cfg.n_layer, cfg.d_model, cfg.n_head() * n * n)
    }

    /// The state before any token.
    pub fn zeros(cfg: &ModelConfig) -> EngineState {
        let (l, c, hnn) = EngineState::dims(cfg);
        EngineState {
            n_layer: l,
            c,
            hnn,
            att_shift: vec![0.0; l * c],
            wkv: vec![0.0; l * hnn],
            ffn_shift: vec![0.0; l * c],
        }
    }

    /// Checked on every call, so it must not allocate (building a zero state to compare with
    /// cost 3% of a ternary decode).
    fn fits(&self, cfg: &ModelConfig) -> bool {
        EngineState::dims(cfg) == (self.n_layer, self.c, self.hnn)
    }

    /// From a candle state of batch 1 (e.g. read with `State::load` from `--state-in`).
    pub fn from_model_state(cfg: &ModelConfig, st: &State) -> Result<EngineState> {
        let mut out = EngineState::zeros(cfg);
        if st.layers.len() != cfg.n_layer || st.batch() != 1 {
            return Err(Error::Data(format!(
                "state has {} layers and batch {}; the engine needs {} layers and batch 1",
                st.layers.len(),
                st.batch(),
                cfg.n_layer
            )));
        }
        let (c, hnn) = (out.c, out.hnn);
        for (i, l) in st.layers.iter().enumerate() {
            for (name, t, dst) in [
                (
                    "att_shift",
                    &l.att_shift,
                    &mut out.att_shift[i * c..(i + 1) * c],
                ),
                ("wkv", &l.wkv, &mut out.wkv[i * hnn..(i + 1) * hnn]),
                (
                    "ffn_shift",
                    &l.ffn_shift,
                    &mut out.ffn_shift[i * c..(i + 1) * c],
                ),
            ] {
                let v = t
                    .to_dtype(candle_core::DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                if v.len() != dst.len() {
                    return Err(Error::Data(format!(
                        "state layer {i} {name} has {} values, this model needs {}",
                        v.len(),
                        dst.len()
                    )));
                }
                dst.copy_from_slice(&v);
            }
        }
        out.wkv = transpose_heads(&out.wkv, cfg.head_size);
        Ok(out)
    }

    /// To a candle state of batch 1 (e.g. for `State::save` and `--state-out`).
    pub fn to_model_state(&self, cfg: &ModelConfig, dev: &Device) -> Result<State> {
        let (c, h, n) = (cfg.d_model, cfg.n_head(), cfg.head_size);
        let wkv = transpose_heads(&self.wkv, n);
        let layers = (0..self.n_layer)
            .map(|i| {
                Ok(LayerState {
                    att_shift: Tensor::from_slice(
                        &self.att_shift[i * c..(i + 1) * c],
                        (1, c),
                        dev,
                    )?,
                    wkv: Tensor::from_slice(
                        &wkv[i * self.hnn..(i + 1) * self.hnn],
                        (1, h, n, n),
                        dev,
                    )?,
                    ffn_shift: Tensor::from_slice(
                        &self.ffn_shift[i * c..(i + 1) * c],
                        (1, c),
                        dev,
                    )?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(State { layers })
    }

    /// Saves in the state-file format (`model::State::save`), with the model's identity.
    pub fn save(&self, path: &Path, cfg: &ModelConfig) -> Result<()> {
        self.to_model_state(cfg, &Device::Cpu)?.save(path, cfg)
    }

    /// Loads a state file written for the same model architecture.
    pub fn load(path: &Path, cfg: &ModelConfig) -> Result<EngineState> {
        let st = State::load(path, cfg, &Device::Cpu)?;
        EngineState::from_model_state(cfg, &st)
            .map_err(|e| Error::Data(format!("state file {}: {e}", path.display())))
    }
}

/// Intermediates for up to `PREFILL_CHUNK` tokens, `[T, dim]` row-major.
struct Scratch {
    x: Vec<f32>,
    xn: Vec<f32>,
    /// Token-shifted inputs of r, w, k, v, a, g.
    mix: [Vec<f32>; 6],
    /// The 8-bit inputs of ternary r, k, v projections, and of the later ones (o, FFN).
    q_r: QuantActs,
    q_k: QuantActs,
    q_v: QuantActs,
    q: QuantActs,
    r: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    w: Vec<f32>,
    a: Vec<f32>,
    g: Vec<f32>,
    nu: Vec<f32>,
    v_first: Vec<f32>,
    lw: Vec<f32>,
    la: Vec<f32>,
    lv: Vec<f32>,
    lg: Vec<f32>,
    /// WKV output, head-major `[H, T, N]` so each head's task owns one contiguous block.
    yh: Vec<f32>,
    out: Vec<f32>,
    ffn_h: Vec<f32>,
    logits: Vec<f32>,
    /// `[T, V]`, only for `forward_all`.
    logits_all: Vec<f32>,
}

impl Scratch {
    fn new(cfg: &ModelConfig) -> Scratch {
        let (c, t) = (cfg.d_model, PREFILL_CHUNK);
        let l = cfg.lora();
        let z = |n: usize| vec![0f32; n * t];
        Scratch {
            x: z(c),
            xn: z(c),
            mix: std::array::from_fn(|_| z(c)),
            q_r: QuantActs::default(),
            q_k: QuantActs::default(),
            q_v: QuantActs::default(),
            q: QuantActs::default(),
            r: z(c),
            k: z(c),
            v: z(c),
            w: z(c),
            a: z(c),
            g: z(c),
            nu: z(c),
            v_first: z(c),
            lw: z(l.w),
            la: z(l.a),
            lv: z(l.v),
            lg: z(l.g),
            yh: z(c),
            out: z(c),
            ffn_h: z(cfg.d_ffn),
            logits: vec![0f32; cfg.vocab_size],
            logits_all: Vec::new(),
        }
    }
}

/// Which logits a forward pass computes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Head {
    None,
    Last,
    All,
}

/// How products are run: the kernel (and the scan's kernels of its family, chosen once), and
/// the team of `threads` workers (none for one thread).
#[derive(Clone, Copy)]
struct Ctx<'a> {
    kernel: Kernel,
    wkv: crate::model::wkv::Isa,
    threads: usize,
    team: Option<&'a Team>,
}

/// The smallest share of rows worth a task of its own: smaller shares cost more in scheduling
/// than they save.
const MIN_ROWS: usize = 64;

/// A raw output pointer that tasks writing disjoint rows may share.
#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: every task writes a disjoint set of rows (`run_jobs`) or head blocks (the scan).
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    /// The pointer, taken through `self` so a closure captures the whole (Sync) wrapper.
    fn at(self, i: usize) -> *mut f32 {
        self.0.wrapping_add(i)
    }
}

/// One product of a batch: `y [T, m.rows] = x [T, m.cols] · mᵀ`.
struct Job<'a> {
    m: &'a Matrix,
    x: Input<'a>,
    y: Out,
}

impl<'a> Job<'a> {
    fn new(m: &'a Matrix, x: &'a [f32], y: &'a mut [f32]) -> Job<'a> {
        assert!(y.len() * m.cols() == x.len() * m.rows(), "job shapes");
        Job {
            m,
            x: Input::F32(x),
            y: Out(y.as_mut_ptr()),
        }
    }

    /// A projection: its input as f32, or quantised into `q` first when `m` is ternary.
    fn proj(m: &'a Matrix, x: &'a [f32], q: &'a mut QuantActs, y: &'a mut [f32]) -> Job<'a> {
        if m.dtype() != WeightDtype::Ternary {
            return Job::new(m, x, y);
        }
        q.quantize(x, m.cols());
        assert!(y.len() == q.tokens() * m.rows(), "job shapes");
        Job {
            m,
            x: Input::Q8(q),
            y: Out(y.as_mut_ptr()),
        }
    }
}

/// Runs independent products as one parallel region: their rows are cut into tasks and spread
/// over the team, so a layer pays for few synchronisations. `None` entries are skipped (a fixed
/// array on the stack instead of a list allocated per token).
fn run_jobs(ctx: Ctx, t: usize, jobs: &[Option<Job>]) {
    let jobs = || jobs.iter().flatten();
    let total: usize = jobs().map(|j| j.m.rows()).sum();
    let min_rows = (MIN_ROWS / t).max(8);
    let team = match ctx.team {
        Some(team) if total >= 2 * min_rows => team,
        _ => {
            for j in jobs() {
                // SAFETY: `Job::new` took `y` exclusively with room for [t, rows].
                unsafe {
                    j.m.rows_into(ctx.kernel, 0, j.m.rows(), j.x, t, j.y.0, j.m.rows())
                };
            }
            return;
        }
    };
    let chunk = total.div_ceil(ctx.threads * 4).max(min_rows);
    let ntasks: usize = jobs().map(|j| j.m.rows().div_ceil(chunk)).sum();
    team.run(ntasks, &|mut i| {
        for j in jobs() {
            let rows = j.m.rows();
            let n = rows.div_ceil(chunk);
            if i < n {
                let r0 = i * chunk;
                // SAFETY: tasks own disjoint row ranges of disjoint outputs.
                unsafe {
                    j.m.rows_into(ctx.kernel, r0, (r0 + chunk).min(rows), j.x, t, j.y.0, rows)
                };
                return;
            }
            i -= n;
        }
    });
}

/// TimeMix's per-channel parameters of a block, as the row kernels take them (`v0` is empty in
/// layer 0, which has no value residual).
fn tmix_params(b: &Block) -> TmixParams<'_> {
    TmixParams {
        w0: &b.w0,
        a0: &b.a0,
        v0: b.vres.as_ref().map_or(&[][..], |r| &r.v0),
        k_k: &b.k_k,
        k_a: &b.k_a,
        r_k: &b.r_k,
        ln_w: &b.ln_x.w,
        ln_b: &b.ln_x.b,
    }
}

/// Every N×N block of `x` transposed (an involution: model layout ⇄ the scan's).
fn transpose_heads(x: &[f32], n: usize) -> Vec<f32> {
    x.chunks_exact(n * n)
        .flat_map(|m| (0..n * n).map(move |e| m[(e % n) * n + e / n]))
        .collect()
}

/// One chunk of tokens through the whole model; advances `st`.
fn forward_chunk(
    wt: &Weights,
    s: &mut Scratch,
    ctx: Ctx,
    toks: &[u32],
    st: &mut EngineState,
    head: Head,
) {
    let cfg = wt.cfg();
    let (t, c, nh, n, f) = (
        toks.len(),
        cfg.d_model,
        cfg.n_head(),
        cfg.head_size,
        cfg.d_ffn,
    );
    let tc = t * c;
    let l = cfg.lora();
    let Scratch {
        x,
        xn,
        mix,
        q_r,
        q_k,
        q_v,
        q,
        r,
        k,
        v,
        w,
        a,
        g,
        nu,
        v_first,
        lw,
        la,
        lv,
        lg,
        yh,
        out,
        ffn_h,
        logits,
        logits_all,
    } = s;

    // Embedding and ln0 (applied here rather than folded into the table: a tied head reads the
    // table un-normalised).
    for (i, &tok) in toks.iter().enumerate() {
        wt.emb.row_into(tok as usize, &mut xn[i * c..(i + 1) * c]);
    }
    wt.ln0.rows(&xn[..tc], &mut x[..tc]);

    let hnn = nh * n * n;
    for (li, b) in wt.blocks.iter().enumerate() {
        let att_shift = &mut st.att_shift[li * c..(li + 1) * c];
        time_mix_inputs(b, x, xn, mix, att_shift, t, c);
        let [xr, xw, xk, xv, xa, xg] = &mut *mix;
        let (xr, xw, xk, xv, xa, xg) = (
            &xr[..tc],
            &xw[..tc],
            &xk[..tc],
            &xv[..tc],
            &xa[..tc],
            &xg[..tc],
        );
        // Projections and LoRA first halves: all read the mixed inputs, so one parallel region.
        run_jobs(
            ctx,
            t,
            &[
                Some(Job::proj(&b.r, xr, q_r, &mut r[..tc])),
                Some(Job::proj(&b.k, xk, q_k, &mut k[..tc])),
                Some(Job::proj(&b.v, xv, q_v, &mut v[..tc])),
                Some(Job::new(&b.w1, xw, &mut lw[..t * l.w])),
                Some(Job::new(&b.a1, xa, &mut la[..t * l.a])),
                Some(Job::new(&b.g1, xg, &mut lg[..t * l.g])),
                b.vres
                    .as_ref()
                    .map(|vr| Job::new(&vr.v1, xv, &mut lv[..t * l.v])),
            ],
        );

        lw[..t * l.w].iter_mut().for_each(|z| *z = z.tanh());
        lg[..t * l.g]
            .iter_mut()
            .for_each(|z| *z = rows::sigmoid(*z));
        run_jobs(
            ctx,
            t,
            &[
                Some(Job::new(&b.w2, &lw[..t * l.w], &mut w[..tc])),
                Some(Job::new(&b.a2, &la[..t * l.a], &mut a[..tc])),
                Some(Job::new(&b.g2, &lg[..t * l.g], &mut g[..tc])),
                b.vres
                    .as_ref()
                    .map(|vr| Job::new(&vr.v2, &lv[..t * l.v], &mut nu[..tc])),
            ],
        );

        // TimeMix steps 3–8 per token (`rows::tmix_prep`, as in training): the scan's inputs
        // [r, ŵ, k', v', −κ̂, κ̂⊙a] into the six mix buffers (free after the products).
        let prm = tmix_params(b);
        let [sr, sw, sk, sv, sa, sb] = &mut *mix;
        for ti in 0..t {
            let row = ti * c..(ti + 1) * c;
            let x = TmixRow {
                r: &r[row.clone()],
                wl: &w[row.clone()],
                k: &k[row.clone()],
                v: &v[row.clone()],
                al: &a[row.clone()],
                residual: b
                    .vres
                    .as_ref()
                    .map(|_| (&nu[row.clone()], &v_first[row.clone()])),
            };
            let o = [&mut *sr, &mut *sw, &mut *sk, &mut *sv, &mut *sa, &mut *sb]
                .map(|q| &mut q[row.clone()]);
            tmix_prep(prm, n, &x, o);
            if b.vres.is_none() {
                v_first[row.clone()].copy_from_slice(&sv[row]);
            }
        }
        let ins = [&*sr, &*sw, &*sk, &*sv, &*sa, &*sb].map(|q| &q[..tc]);
        let wkv = &mut st.wkv[li * hnn..(li + 1) * hnn];
        let yh = &mut yh[..tc];
        // Step 9, the scan, one task per head (`wkv::wkv7_step_head`, training's kernel).
        match ctx.team {
            Some(team) => {
                let (sp, yp) = (Out(wkv.as_mut_ptr()), Out(yh.as_mut_ptr()));
                team.run(nh, &|h| {
                    // SAFETY: head h owns state block h and output block h, disjoint from the
                    // other heads'; both lie inside `wkv` and `yh`, borrowed for the region.
                    let (sh, yt) = unsafe {
                        (
                            std::slice::from_raw_parts_mut(sp.at(h * n * n), n * n),
                            std::slice::from_raw_parts_mut(yp.at(h * t * n), t * n),
                        )
                    };
                    wkv7_step_head(ctx.wkv, c, h * n, ins, sh, yt);
                });
            }
            None => {
                for (h, (sh, yt)) in wkv.chunks_mut(n * n).zip(yh.chunks_mut(t * n)).enumerate() {
                    wkv7_step_head(ctx.wkv, c, h * n, ins, sh, yt);
                }
            }
        }

        // Steps 10–12 per head (`rows::tmix_out_head`): GroupNorm, bonus, gate; the result goes
        // through the output matrix.
        let att_in = &mut xn[..tc];
        for ti in 0..t {
            for h in 0..nh {
                let o = ti * c + h * n..ti * c + (h + 1) * n;
                tmix_out_head(
                    prm,
                    h * n,
                    &yh[(h * t + ti) * n..(h * t + ti + 1) * n],
                    &ins[0][o.clone()],
                    &ins[2][o.clone()],
                    &ins[3][o.clone()],
                    &g[o.clone()],
                    &mut att_in[o],
                );
            }
        }
        project(ctx, t, &b.o, att_in, q, &mut out[..tc]);
        add_into(&mut x[..tc], &out[..tc]);

        // ChannelMix.
        let ffn_shift = &mut st.ffn_shift[li * c..(li + 1) * c];
        let xf = &mut mix[0][..tc];
        b.ln2.rows(&x[..tc], &mut xn[..tc]);
        rows::shift_mix_rows(&xn[..tc], ffn_shift, &b.ffn_mu, t, 0, xf);
        ffn_shift.copy_from_slice(&xn[tc - c..tc]);
        let h = &mut ffn_h[..t * f];
        project(ctx, t, &b.ffn_key, xf, q, h);
        h.iter_mut().for_each(|z| *z = rows::relu_sq(*z));
        project(ctx, t, &b.ffn_value, h, q, &mut out[..tc]);
        add_into(&mut x[..tc], &out[..tc]);
    }

    let rows = match head {
        Head::None => return,
        Head::Last => t - 1..t,
        Head::All => 0..t,
    };
    let span = rows.start * c..rows.end * c;
    wt.ln_out.rows(&x[span.clone()], &mut xn[span]);
    let xs = &xn[rows.start * c..rows.end * c];
    let vsz = cfg.vocab_size;
    let y: &mut [f32] = if head == Head::Last {
        &mut logits[..]
    } else {
        logits_all.resize(PREFILL_CHUNK * vsz, 0.0);
        &mut logits_all[..t * vsz]
    };
    run_jobs(ctx, rows.len(), &[Some(Job::new(wt.head(), xs, y))]);
}

/// `y = W x` for a (possibly ternary) projection.
fn project(ctx: Ctx, t: usize, m: &Matrix, x: &[f32], q: &mut QuantActs, y: &mut [f32]) {
    run_jobs(ctx, t, &[Some(Job::proj(m, x, q, y))]);
}

fn add_into(x: &mut [f32], d: &[f32]) {
    x.iter_mut().zip(d).for_each(|(a, b)| *a += b);
}

/// ln1 and the six token-shift mixes of TimeMix (step 1).
fn time_mix_inputs(
    b: &Block,
    x: &[f32],
    xn: &mut [f32],
    mix: &mut [Vec<f32>; 6],
    shift: &mut [f32],
    t: usize,
    c: usize,
) {
    b.ln1.rows(&x[..t * c], &mut xn[..t * c]);
    for (m, mu) in mix.iter_mut().zip(&b.mu) {
        rows::shift_mix_rows(&xn[..t * c], shift, mu, t, 0, &mut m[..t * c]);
    }
    shift.copy_from_slice(&xn[(t - 1) * c..t * c]);
}

/// The engine: shared weights, a team of worker threads, and scratch buffers for one sequence
/// at a time. Cloning is cheap (the weights and team are shared; clones take turns on the team)
/// and gives independent scratch.
pub struct Engine {
    w: Arc<Weights>,
    team: Option<Arc<Team>>,
    kernel: Kernel,
    /// The scan's kernels of `kernel`'s family, chosen once.
    wkv: crate::model::wkv::Isa,
    threads: usize,
    s: Scratch,
}

impl Clone for Engine {
    fn clone(&self) -> Engine {
        Engine {
            w: self.w.clone(),
            team: self.team.clone(),
            kernel: self.kernel,
            wkv: self.wkv,
            threads: self.threads,
            s: Scratch::new(self.w.cfg()),
        }
    }
}

impl Engine {
    /// Maps the checkpoint at `path` (any layout `checkpoint::load` reads).
    pub fn load(path: &Path, opts: &EngineOptions) -> Result<Engine> {
        if matches!(opts.dtype, Some(WeightDtype::Ternary | WeightDtype::Q8)) {
            return Err(Error::usage(
                "ternary and q8 are not dtypes to convert a model to: ternary matrices come from \
                 the model's config or a packed checkpoint, q8 is for the head only; use f32, \
                 f16 or bf16",
            ));
        }
        let w = weights::load(path, opts.dtype, opts.head_q8)?;
        let threads = match crate::threads::clamp_threads(
            opts.threads,
            &format!("an engine thread count of {}", opts.threads),
        ) {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let team = if threads > 1 {
            let t = Team::new(threads).map_err(|e| {
                Error::Unavailable(format!(
                    "starting {threads} engine threads: {e}; try fewer with -t"
                ))
            })?;
            Some(Arc::new(t))
        } else {
            None
        };
        let kernel = opts.kernel.map_or_else(Kernel::detect, Kernel::or_portable);
        Ok(Engine {
            s: Scratch::new(w.cfg()),
            w: Arc::new(w),
            team,
            kernel,
            wkv: kernel.wkv_isa(),
            threads,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        self.w.cfg()
    }

    /// The checkpoint's metadata: config, prompt template, tokenizer.
    pub fn meta(&self) -> &Meta {
        &self.w.meta
    }

    /// The tokenizer stored in the checkpoint; an error when it has none (official exports).
    pub fn tokenizer(&self) -> Result<crate::tokenizer::Tokenizer> {
        match &self.w.meta.tokenizer {
            Some((kind, payload)) => crate::tokenizer::Tokenizer::from_metadata(kind, payload),
            None => Err(Error::usage(
                "this checkpoint carries no tokenizer; give one with --tokenizer FILE",
            )),
        }
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    pub fn kernel(&self) -> Kernel {
        self.kernel
    }

    /// The dtype of the big matrices (the head's).
    pub fn weight_dtype(&self) -> WeightDtype {
        self.w.head().dtype()
    }

    /// Bytes of weights read per decoded token (for bandwidth figures).
    pub fn bytes_per_token(&self) -> usize {
        self.w.bytes_per_token()
    }

    /// A fresh (zero) state for this model.
    pub fn new_state(&self) -> EngineState {
        EngineState::zeros(self.config())
    }

    /// Feeds one token; returns the logits for the next one.
    pub fn step(&mut self, token: u32, st: &mut EngineState) -> Result<&[f32]> {
        self.run(&[token], st, Head::Last)?;
        Ok(&self.s.logits)
    }

    /// Feeds a prompt (chunked; see `PREFILL_CHUNK`); returns the logits after its last token.
    pub fn prefill(&mut self, tokens: &[u32], st: &mut EngineState) -> Result<&[f32]> {
        if tokens.is_empty() {
            return Err(Error::usage("prefill needs at least one token"));
        }
        let last = (tokens.len() - 1) / PREFILL_CHUNK;
        for (i, chunk) in tokens.chunks(PREFILL_CHUNK).enumerate() {
            let head = if i == last { Head::Last } else { Head::None };
            self.run(chunk, st, head)?;
        }
        Ok(&self.s.logits)
    }

    /// Feeds tokens and hands the logits after each one to `f(position, logits)` (evaluation).
    pub fn forward_all(
        &mut self,
        tokens: &[u32],
        st: &mut EngineState,
        mut f: impl FnMut(usize, &[f32]),
    ) -> Result<()> {
        let v = self.config().vocab_size;
        for (ci, chunk) in tokens.chunks(PREFILL_CHUNK).enumerate() {
            self.run(chunk, st, Head::All)?;
            for (i, row) in self.s.logits_all[..chunk.len() * v]
                .chunks_exact(v)
                .enumerate()
            {
                f(ci * PREFILL_CHUNK + i, row);
            }
        }
        Ok(())
    }

    /// The logits computed by the last `step`/`prefill`.
    pub fn logits(&self) -> &[f32] {
        &self.s.logits
    }

    fn run(&mut self, toks: &[u32], st: &mut EngineState, head: Head) -> Result<()> {
        let cfg = self.w.cfg();
        if let Some(bad) = toks.iter().find(|&&t| t as usize >= cfg.vocab_size) {
            return Err(Error::Data(format!(
                "token id {bad} is out of range for this model (vocabulary of {})",
                cfg.vocab_size
            )));
        }
        if !st.fits(cfg) {
            return Err(Error::Data(
                "the state belongs to a model of another shape".into(),
            ));
        }
        let ctx = Ctx {
            kernel: self.kernel,
            wkv: self.wkv,
            threads: self.threads,
            team: self.team.as_deref(),
        };
        forward_chunk(&self.w, &mut self.s, ctx, toks, st, head);
        Ok(())
    }
}
