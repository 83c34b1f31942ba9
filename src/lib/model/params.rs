//! The parameter list of an RWKV-7 model: official checkpoint names and shapes, and which
//! matrices may be ternary. Everything that enumerates parameters (init, loading, counting,
//! optimiser groups) starts here, so the list is written once.

use crate::config::ModelConfig;

/// One parameter: its official name and shape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<usize>,
}

/// How a parameter is treated by the optimiser and by BitLinear.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamKind {
    /// Embedding, head, and the big r/k/v/o and FFN matrices: weight decay applies.
    Matrix,
    /// The LoRA matrices `w1..g2`: no weight decay ("or the performance will be much worse").
    Lora,
    /// Vectors, mixing coefficients, norms: no weight decay.
    Vector,
}

/// The matrices BitLinear may make ternary: attention r/k/v/o and the FFN key/value. Never the
/// embedding, the head, the LoRA matrices, vectors or norms.
pub fn ternary_eligible(name: &str) -> bool {
    const SUFFIXES: [&str; 6] = [
        "att.receptance.weight",
        "att.key.weight",
        "att.value.weight",
        "att.output.weight",
        "ffn.key.weight",
        "ffn.value.weight",
    ];
    SUFFIXES.iter().any(|s| name.ends_with(s))
}

/// Whether the config makes this parameter ternary.
pub fn is_ternary(cfg: &ModelConfig, name: &str) -> bool {
    ternary_eligible(name)
        && if name.contains(".att.") {
            cfg.ternary_att
        } else {
            cfg.ternary_ffn
        }
}

pub fn kind_of(name: &str) -> ParamKind {
    let last = name.rsplit('.').next().unwrap_or(name);
    if name.ends_with(".weight") && !name.contains("ln") {
        ParamKind::Matrix
    } else if ["w1", "w2", "a1", "a2", "v1", "v2", "g1", "g2"].contains(&last) {
        ParamKind::Lora
    } else {
        ParamKind::Vector
    }
}

/// One layer's parameters, written once: `layer::NAMES[i]` is the name (after `blocks.{l}.`) of
/// the parameter whose index constant is listed beside it, in checkpoint order. The model, the
/// block op, the TimeMix core and the engine's loader all index this list.
macro_rules! layer_params {
    ($($idx:ident = $name:literal,)*) => {
        pub mod layer {
            layer_params!(@idx 0usize; $($idx)*);
            /// The names, after `blocks.{l}.`, in checkpoint order.
            pub const NAMES: [&str; [$($name),*].len()] = [$($name),*];
            /// How many parameters a layer has.
            pub const COUNT: usize = NAMES.len();
        }
    };
    (@idx $n:expr; $idx:ident $($rest:ident)*) => {
        pub const $idx: usize = $n;
        layer_params!(@idx $n + 1; $($rest)*);
    };
    (@idx $n:expr;) => {};
}

layer_params! {
    LN1_W = "ln1.weight",
    LN1_B = "ln1.bias",
    LN2_W = "ln2.weight",
    LN2_B = "ln2.bias",
    X_R = "att.x_r",
    X_W = "att.x_w",
    X_K = "att.x_k",
    X_V = "att.x_v",
    X_A = "att.x_a",
    X_G = "att.x_g",
    W0 = "att.w0",
    A0 = "att.a0",
    V0 = "att.v0",
    K_K = "att.k_k",
    K_A = "att.k_a",
    W1 = "att.w1",
    W2 = "att.w2",
    A1 = "att.a1",
    A2 = "att.a2",
    V1 = "att.v1",
    V2 = "att.v2",
    G1 = "att.g1",
    G2 = "att.g2",
    R_K = "att.r_k",
    WR = "att.receptance.weight",
    WK = "att.key.weight",
    WV = "att.value.weight",
    WO = "att.output.weight",
    LNX_W = "att.ln_x.weight",
    LNX_B = "att.ln_x.bias",
    FFN_X_K = "ffn.x_k",
    FK = "ffn.key.weight",
    FV = "ffn.value.weight",
}

/// The full name of layer `l`'s parameter `i` (an index of [`layer`]).
pub fn layer_name(l: usize, i: usize) -> String {
    format!("blocks.{l}.{}", layer::NAMES[i])
}

/// The shape of a layer's parameter `i`: C = H·N channels, F = d_ffn, `lora` the ranks of the
/// w, a, v, g LoRAs. The token-mix coefficients and TimeMix vectors are `[1,1,C]` as in the
/// official files.
pub fn layer_shape(i: usize, h: usize, n: usize, f: usize, lora: [usize; 4]) -> Vec<usize> {
    use layer::*;
    let c = h * n;
    match i {
        LN1_W | LN1_B | LN2_W | LN2_B | LNX_W | LNX_B => vec![c],
        X_R..=K_A | FFN_X_K => vec![1, 1, c],
        // LoRA pairs `[C, rank]`, `[rank, C]`, in the order w, a, v, g.
        W1..=G2 => {
            let rank = lora[(i - W1) / 2];
            if (i - W1) % 2 == 0 {
                vec![c, rank]
            } else {
                vec![rank, c]
            }
        }
        R_K => vec![h, n],
        WR | WK | WV | WO => vec![c, c],
        FK => vec![f, c],
        FV => vec![c, f],
        _ => unreachable!("layer parameter {i} has no shape"),
    }
}

/// Every parameter of the model, in a fixed order.
pub fn param_specs(cfg: &ModelConfig) -> Vec<ParamSpec> {
    let (c, v) = (cfg.d_model, cfg.vocab_size);
    let l = cfg.lora();
    let lora = [l.w, l.a, l.v, l.g];
    let spec = |name: String, shape: Vec<usize>| ParamSpec { name, shape };
    let mut out = vec![
        spec("emb.weight".into(), vec![v, c]),
        spec("blocks.0.ln0.weight".into(), vec![c]),
        spec("blocks.0.ln0.bias".into(), vec![c]),
    ];
    for b in 0..cfg.n_layer {
        out.extend((0..layer::COUNT).map(|i| {
            let shape = layer_shape(i, cfg.n_head(), cfg.head_size, cfg.d_ffn, lora);
            spec(layer_name(b, i), shape)
        }));
    }
    out.push(spec("ln_out.weight".into(), vec![c]));
    out.push(spec("ln_out.bias".into(), vec![c]));
    if !cfg.tie_embeddings {
        out.push(spec("head.weight".into(), vec![v, c]));
    }
    out
}

/// Parameters present in every checkpoint that the math never reads (layer 0 has no value
/// residual; official files carry them anyway). They are kept so official files round-trip;
/// their gradient is zero.
pub fn is_unused(name: &str) -> bool {
    matches!(
        name,
        "blocks.0.att.v0" | "blocks.0.att.v1" | "blocks.0.att.v2"
    )
}
