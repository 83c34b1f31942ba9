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

/// The names of one layer's parameters that are `[1,1,C]` vectors.
pub const ATT_VECTORS: [&str; 11] = [
    "x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "a0", "v0", "k_k", "k_a",
];

/// Every parameter of the model, in a fixed order.
pub fn param_specs(cfg: &ModelConfig) -> Vec<ParamSpec> {
    let (c, f, v, h, n) = (
        cfg.d_model,
        cfg.d_ffn,
        cfg.vocab_size,
        cfg.n_head(),
        cfg.head_size,
    );
    let l = cfg.lora();
    let mut out = Vec::new();
    let mut p = |name: String, shape: &[usize]| {
        out.push(ParamSpec {
            name,
            shape: shape.to_vec(),
        })
    };
    p("emb.weight".into(), &[v, c]);
    p("blocks.0.ln0.weight".into(), &[c]);
    p("blocks.0.ln0.bias".into(), &[c]);
    for i in 0..cfg.n_layer {
        let b = format!("blocks.{i}");
        for ln in ["ln1", "ln2"] {
            p(format!("{b}.{ln}.weight"), &[c]);
            p(format!("{b}.{ln}.bias"), &[c]);
        }
        for name in ATT_VECTORS {
            p(format!("{b}.att.{name}"), &[1, 1, c]);
        }
        for (m, r) in [("w", l.w), ("a", l.a), ("v", l.v), ("g", l.g)] {
            p(format!("{b}.att.{m}1"), &[c, r]);
            p(format!("{b}.att.{m}2"), &[r, c]);
        }
        p(format!("{b}.att.r_k"), &[h, n]);
        for m in ["receptance", "key", "value", "output"] {
            p(format!("{b}.att.{m}.weight"), &[c, c]);
        }
        p(format!("{b}.att.ln_x.weight"), &[c]);
        p(format!("{b}.att.ln_x.bias"), &[c]);
        p(format!("{b}.ffn.x_k"), &[1, 1, c]);
        p(format!("{b}.ffn.key.weight"), &[f, c]);
        p(format!("{b}.ffn.value.weight"), &[c, f]);
    }
    p("ln_out.weight".into(), &[c]);
    p("ln_out.bias".into(), &[c]);
    if !cfg.tie_embeddings {
        p("head.weight".into(), &[v, c]);
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
