//! The checkpoint: one safetensors file that alone is enough to chat or evaluate. Weights under the
//! official RWKV-7 names; in the header metadata the format and version, the resolved model config,
//! the prompt template's name and the tokenizer itself with its sha256 (CONVENTIONS.md, "File formats").
//!
//! Files without tinybit metadata (official RWKV-7 exports, the golden vectors) load too: their
//! config is read from the tensor shapes.

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::fsutil::{sha256_hex, write_atomic};
use crate::model::params::{is_unused, param_specs};
use candle_core::{Device, Tensor};
use safetensors::{Dtype, SafeTensors};
use std::collections::HashMap;
use std::path::Path;

pub const FORMAT_VERSION: &str = "1";

/// The prompt template of natively trained models (CONVENTIONS.md, "Prompt template").
pub const TEMPLATE_TINYBIT: &str = "tinybit";
/// The template of official RWKV-7 models (`User: ...\n\nAssistant:`).
pub const TEMPLATE_RWKV: &str = "rwkv";

/// What a checkpoint holds besides its weights.
#[derive(Clone, Debug, PartialEq)]
pub struct Meta {
    pub config: ModelConfig,
    pub template: String,
    /// `(kind, payload)`: `hf` with the tokenizer.json text, or `world` with the vocabulary's name.
    pub tokenizer: Option<(String, String)>,
}

/// A loaded checkpoint: its metadata and every parameter as an f32 tensor.
pub struct Checkpoint {
    pub meta: Meta,
    pub params: HashMap<String, Tensor>,
}

/// Writes a checkpoint atomically. `params` must hold every parameter of `meta.config`.
pub fn save(path: &Path, meta: &Meta, params: &[(String, Tensor)]) -> Result<()> {
    let mut md: HashMap<String, String> = HashMap::new();
    md.insert("tinybit.format".into(), "checkpoint".into());
    md.insert("tinybit.version".into(), FORMAT_VERSION.into());
    md.insert("tinybit.config".into(), meta.config.resolved().to_json());
    md.insert("tinybit.template".into(), meta.template.clone());
    if let Some((kind, payload)) = &meta.tokenizer {
        md.insert("tinybit.tokenizer.kind".into(), kind.clone());
        md.insert(
            "tinybit.tokenizer.sha256".into(),
            sha256_hex(payload.as_bytes()),
        );
        md.insert("tinybit.tokenizer".into(), payload.clone());
    }
    let contiguous: Vec<(String, Tensor)> = params
        .iter()
        .map(|(n, t)| Ok((n.clone(), t.contiguous()?)))
        .collect::<Result<_>>()?;
    let bytes = safetensors::serialize(contiguous.iter().map(|(n, t)| (n.clone(), t)), Some(md))
        .map_err(|e| Error::Io(format!("serialising checkpoint {}: {e}", path.display())))?;
    write_atomic(path, &bytes)
}

/// Reads the raw bytes of a tensor as f32 values.
fn to_f32(name: &str, file: &str, dtype: Dtype, data: &[u8]) -> Result<Vec<f32>> {
    let chunks = |n: usize| data.chunks_exact(n);
    Ok(match dtype {
        Dtype::F32 => chunks(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F16 => chunks(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::BF16 => chunks(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::F64 => chunks(8)
            .map(|b| f64::from_le_bytes(b.try_into().unwrap()) as f32)
            .collect(),
        other => {
            return Err(Error::Data(format!(
                "checkpoint {file}: tensor {name} has dtype {other:?}; expected F32, F16, BF16 or F64"
            )));
        }
    })
}

/// Infers the architecture of a file without tinybit metadata from its tensor shapes.
fn config_from_shapes(st: &SafeTensors, file: &str) -> Result<ModelConfig> {
    let shape = |name: &str| -> Result<Vec<usize>> {
        st.tensor(name).map(|t| t.shape().to_vec()).map_err(|_| {
            Error::Data(format!(
                "checkpoint {file}: tensor {name} is missing (not an RWKV-7 model?)"
            ))
        })
    };
    let emb = shape("emb.weight")?;
    let mut n_layer = 0;
    while st.tensor(&format!("blocks.{n_layer}.ln1.weight")).is_ok() {
        n_layer += 1;
    }
    let r_k = shape("blocks.0.att.r_k")?;
    let rank =
        |m: &str| -> Result<Option<usize>> { Ok(Some(shape(&format!("blocks.0.att.{m}1"))?[1])) };
    Ok(ModelConfig {
        n_layer,
        d_model: emb[1],
        head_size: r_k[1],
        d_ffn: shape("blocks.0.ffn.key.weight")?[0],
        vocab_size: emb[0],
        lora_w: rank("w")?,
        lora_a: rank("a")?,
        // Layer 0's v1 is unused and may be absent: read the value-residual rank from layer 1.
        lora_v: if n_layer > 1 {
            Some(shape("blocks.1.att.v1")?[1])
        } else {
            rank("v").ok().flatten()
        },
        lora_g: rank("g")?,
        tie_embeddings: st.tensor("head.weight").is_err(),
        ternary_att: false,
        ternary_ffn: false,
        family: Default::default(),
    })
}

/// Loads a checkpoint file, checking every tensor against the config. Errors name the file and tensor.
pub fn load(path: &Path, dev: &Device) -> Result<Checkpoint> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, "opening checkpoint", e))?;
    // SAFETY: the map is read-only and dropped before returning; a concurrent writer replaces
    // checkpoints by rename, never in place.
    let mmap = unsafe { memmap2::Mmap::map(&file) }
        .map_err(|e| Error::io(path, "mapping checkpoint", e))?;
    from_bytes(&mmap, &path.display().to_string(), dev)
}

/// Reads only the metadata of a checkpoint (config, template, tokenizer), not its weights.
pub fn read_meta(path: &Path) -> Result<Meta> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, "opening checkpoint", e))?;
    // SAFETY: as in `load`.
    let mmap = unsafe { memmap2::Mmap::map(&file) }
        .map_err(|e| Error::io(path, "mapping checkpoint", e))?;
    let name = path.display().to_string();
    let st = SafeTensors::deserialize(&mmap).map_err(|e| corrupt(&name, e))?;
    meta_of(&mmap, &st, &name)
}

fn corrupt(file: &str, e: safetensors::SafeTensorError) -> Error {
    Error::Data(format!(
        "checkpoint {file} is truncated or corrupt ({e}); re-download or re-convert it"
    ))
}

/// Parses a checkpoint held in memory; `file` names it in error messages.
pub fn from_bytes(bytes: &[u8], file: &str, dev: &Device) -> Result<Checkpoint> {
    let st = SafeTensors::deserialize(bytes).map_err(|e| corrupt(file, e))?;
    let meta = meta_of(bytes, &st, file)?;
    let params = read_params(&st, &meta.config, file, dev)?;
    Ok(Checkpoint { meta, params })
}

fn meta_of(bytes: &[u8], st: &SafeTensors, file: &str) -> Result<Meta> {
    let (_, header) = SafeTensors::read_metadata(bytes).map_err(|e| corrupt(file, e))?;
    let md = header.metadata().clone().unwrap_or_default();
    Ok(match md.get("tinybit.format").map(String::as_str) {
        Some("checkpoint") => {
            let version = md.get("tinybit.version").map(String::as_str).unwrap_or("?");
            if version != FORMAT_VERSION {
                return Err(Error::Data(format!(
                    "checkpoint {file} has format version {version}; this tinybit reads version {FORMAT_VERSION}"
                )));
            }
            let cfg_text = md.get("tinybit.config").ok_or_else(|| {
                Error::Data(format!("checkpoint {file}: metadata has no tinybit.config"))
            })?;
            let config = ModelConfig::from_json(cfg_text)
                .map_err(|e| Error::Data(format!("checkpoint {file}: {e}")))?;
            let tokenizer = match (
                md.get("tinybit.tokenizer.kind"),
                md.get("tinybit.tokenizer"),
            ) {
                (Some(k), Some(p)) => {
                    if let Some(sum) = md.get("tinybit.tokenizer.sha256")
                        && *sum != sha256_hex(p.as_bytes())
                    {
                        return Err(Error::Data(format!(
                            "checkpoint {file}: the embedded tokenizer does not match its sha256 (corrupt metadata)"
                        )));
                    }
                    Some((k.clone(), p.clone()))
                }
                _ => None,
            };
            let template = md
                .get("tinybit.template")
                .cloned()
                .unwrap_or_else(|| TEMPLATE_TINYBIT.into());
            Meta {
                config,
                template,
                tokenizer,
            }
        }
        Some(other) => {
            return Err(Error::Data(format!(
                "{file} is a tinybit '{other}' file, not a checkpoint"
            )));
        }
        // An official RWKV-7 layout: config from shapes, the official chat template.
        None => Meta {
            config: config_from_shapes(st, file)?,
            template: TEMPLATE_RWKV.into(),
            tokenizer: None,
        },
    })
}

/// Reads every parameter the config names, checking shapes; the unused block-0 tensors may be absent.
fn read_params(
    st: &SafeTensors,
    cfg: &ModelConfig,
    file: &str,
    dev: &Device,
) -> Result<HashMap<String, Tensor>> {
    let mut out = HashMap::new();
    for spec in param_specs(cfg) {
        let view = match st.tensor(&spec.name) {
            Ok(v) => v,
            Err(_) if is_unused(&spec.name) => {
                out.insert(
                    spec.name.clone(),
                    Tensor::zeros(spec.shape.as_slice(), candle_core::DType::F32, dev)?,
                );
                continue;
            }
            Err(_) => {
                return Err(Error::Data(format!(
                    "checkpoint {file}: tensor {} is missing (expected shape {:?})",
                    spec.name, spec.shape
                )));
            }
        };
        if view.shape() != spec.shape.as_slice() {
            return Err(Error::Data(format!(
                "checkpoint {file}: tensor {} has shape {:?}, but the config says {:?}",
                spec.name,
                view.shape(),
                spec.shape
            )));
        }
        let vals = to_f32(&spec.name, file, view.dtype(), view.data())?;
        if let Some(i) = vals.iter().position(|v| !v.is_finite()) {
            return Err(Error::Data(format!(
                "checkpoint {file}: tensor {} holds a non-finite value at index {i}",
                spec.name
            )));
        }
        out.insert(
            spec.name.clone(),
            Tensor::from_vec(vals, spec.shape.as_slice(), dev)?,
        );
    }
    Ok(out)
}

impl Checkpoint {
    /// The parameters in the canonical order, ready for `save`.
    pub fn ordered(&self) -> Vec<(String, Tensor)> {
        param_specs(&self.meta.config)
            .into_iter()
            .filter_map(|s| self.params.get(&s.name).map(|t| (s.name, t.clone())))
            .collect()
    }
}
