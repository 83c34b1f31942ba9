//! The checkpoint: one safetensors file that alone is enough to chat or evaluate. Weights under the
//! official RWKV-7 names; in the header metadata the format and version, the resolved model config,
//! the prompt template's name and the tokenizer itself with its sha256 (tinybit(7), FILE FORMATS).
//!
//! Files without tinybit metadata (official RWKV-7 exports, the golden vectors) load too: their
//! config is read from the tensor shapes.
//!
//! Tensors may be stored as f32, f16 or bf16 (`save_with_dtype`), and the ternary-eligible matrices
//! may be packed (`save_ternary`, metadata `tinybit.quant = ternary-b3`, `tinybit.quant.version = 1`):
//! matrix `NAME` becomes `NAME.packed` (U8, five trits per byte, see `pack_trits`) and `NAME.scale`
//! (F32 `[1]`, the absmean γ). Loading always yields f32 tensors, so a packed file is accepted
//! everywhere a checkpoint is; a ternary compute path will read the packed layout itself.

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::fsutil::{sha256_hex, write_atomic};
use crate::model::linear::absmean_ternary;
use crate::model::params::{ParamSpec, is_ternary, is_unused, param_specs, ternary_eligible};
use candle_core::{DType, Device, Tensor};
use safetensors::{Dtype, SafeTensors};
use std::collections::HashMap;
use std::path::Path;

pub const FORMAT_VERSION: &str = "1";

/// The packed ternary format (`tinybit.quant`) and the one version of it this tinybit reads.
pub const QUANT_TERNARY_B3: &str = "ternary-b3";
pub const QUANT_VERSION: &str = "1";

/// The prompt template of natively trained models (tinybit(7), PROMPT TEMPLATE).
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

/// Writes a checkpoint atomically, every tensor as f32. `params` must hold every parameter of
/// `meta.config`.
pub fn save(path: &Path, meta: &Meta, params: &[(String, Tensor)]) -> Result<()> {
    save_with_dtype(path, meta, params, DType::F32)
}

/// `save` with every tensor stored as `dtype` (F32, F16 or BF16).
pub fn save_with_dtype(
    path: &Path,
    meta: &Meta,
    params: &[(String, Tensor)],
    dtype: DType,
) -> Result<()> {
    let tensors = params
        .iter()
        .map(|(n, t)| Ok((n.clone(), stored_as(n, t, dtype)?)))
        .collect::<Result<Vec<_>>>()?;
    write(path, header_metadata(meta), tensors)
}

/// `save_with_dtype`, with every ternary-eligible matrix packed (format `ternary-b3`, version 1);
/// the other tensors are stored as `dtype`. Returns how many matrices were packed.
///
/// The trits and γ are BitLinear's (`absmean_ternary`), so a model trained ternary-aware is stored
/// without loss. A dense matrix that already holds only {0, ±c} keeps its scale c, so packing a
/// dequantised file again gives the same file.
pub fn save_ternary(
    path: &Path,
    meta: &Meta,
    params: &[(String, Tensor)],
    dtype: DType,
) -> Result<usize> {
    let mut tensors = Vec::with_capacity(params.len() + 16);
    let mut packed = 0;
    for (name, t) in params {
        if !ternary_eligible(name) {
            tensors.push((name.clone(), stored_as(name, t, dtype)?));
            continue;
        }
        let (trits, mut gamma) = absmean_ternary(&t.to_dtype(DType::F32)?)?;
        if !is_ternary(&meta.config, name)
            && let Some(c) = ternary_valued_scale(&t.flatten_all()?.to_vec1::<f32>()?)
        {
            gamma = c;
        }
        let trits: Vec<i8> = trits
            .flatten_all()?
            .to_vec1::<f32>()?
            .into_iter()
            .map(|v| v as i8)
            .collect();
        let bytes = pack_trits(&trits);
        let n_bytes = bytes.len();
        let dev = t.device();
        tensors.push((
            format!("{name}.packed"),
            Tensor::from_vec(bytes, n_bytes, dev)?,
        ));
        tensors.push((
            format!("{name}.scale"),
            Tensor::from_vec(vec![gamma], 1, dev)?,
        ));
        packed += 1;
    }
    let mut md = header_metadata(meta);
    md.insert("tinybit.quant".into(), QUANT_TERNARY_B3.into());
    md.insert("tinybit.quant.version".into(), QUANT_VERSION.into());
    write(path, md, tensors)?;
    Ok(packed)
}

/// The header metadata every checkpoint carries (tinybit(7), FILE FORMATS).
fn header_metadata(meta: &Meta) -> HashMap<String, String> {
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
    md
}

fn write(path: &Path, md: HashMap<String, String>, tensors: Vec<(String, Tensor)>) -> Result<()> {
    let contiguous: Vec<(String, Tensor)> = tensors
        .into_iter()
        .map(|(n, t)| Ok((n, t.contiguous()?)))
        .collect::<Result<_>>()?;
    let bytes = safetensors::serialize(contiguous.iter().map(|(n, t)| (n.clone(), t)), Some(md))
        .map_err(|e| Error::Io(format!("serialising checkpoint {}: {e}", path.display())))?;
    write_atomic(path, &bytes)
}

/// `t` converted to `dtype`, refusing values the narrower type cannot hold (f16 tops out at 65504).
fn stored_as(name: &str, t: &Tensor, dtype: DType) -> Result<Tensor> {
    if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
        return Err(Error::usage(format!(
            "checkpoints are stored as f32, f16 or bf16, not {dtype:?}"
        )));
    }
    let out = t.to_dtype(dtype)?;
    if dtype != t.dtype() {
        let back = out.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        if let Some(i) = back.iter().position(|v| !v.is_finite()) {
            return Err(Error::Data(format!(
                "tensor {name}: the value at index {i} does not fit in {dtype:?}; store the \
                 checkpoint as bf16 or f32 instead"
            )));
        }
    }
    Ok(out)
}

/// `Some(c)` when every value is 0 or ±c (c > 0): the matrix is already ternary with scale c.
fn ternary_valued_scale(vals: &[f32]) -> Option<f32> {
    let c = vals.iter().fold(0f32, |m, v| m.max(v.abs()));
    (c > 0.0 && vals.iter().all(|v| *v == 0.0 || v.abs() == c)).then_some(c)
}

/// Packs trits (−1, 0, +1) five per byte in base 3, the first trit in the lowest digit:
/// `byte = Σᵢ (tᵢ + 1)·3ⁱ`, i = 0..4, so a byte is at most 242. The last byte is padded with
/// zero weights (digit 1).
pub fn pack_trits(trits: &[i8]) -> Vec<u8> {
    trits
        .chunks(5)
        .map(|chunk| {
            (0..5).rev().fold(0u8, |acc, i| {
                let digit = chunk.get(i).map_or(1, |&t| (t.clamp(-1, 1) + 1) as u8);
                acc * 3 + digit
            })
        })
        .collect()
}

/// The inverse of `pack_trits` for `n` trits; `None` when the length is wrong or a byte exceeds 242.
pub fn unpack_trits(bytes: &[u8], n: usize) -> Option<Vec<i8>> {
    if bytes.len() != n.div_ceil(5) {
        return None;
    }
    let mut out = Vec::with_capacity(bytes.len() * 5);
    for &b in bytes {
        if b > 242 {
            return None;
        }
        let mut rest = b;
        for _ in 0..5 {
            out.push((rest % 3) as i8 - 1);
            rest /= 3;
        }
    }
    out.truncate(n);
    Some(out)
}

/// Reads the raw (little-endian) bytes of a tensor as f32 values; `name` and `file` for errors.
pub fn to_f32(name: &str, file: &str, dtype: Dtype, data: &[u8]) -> Result<Vec<f32>> {
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
            // Cannot fail: chunks(8) is chunks_exact, giving 8-byte slices.
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
        // An official model was not trained on tinybit's system prompt: send none by default.
        family: crate::config::Family {
            system_prompt: String::new(),
            ..Default::default()
        },
    })
}

/// Loads a checkpoint file, checking every tensor against the config. Errors name the file and tensor.
pub fn load(path: &Path, dev: &Device) -> Result<Checkpoint> {
    // The map is read-only and dropped before returning; a concurrent writer replaces
    // checkpoints by rename, never in place.
    let mmap = crate::fsutil::map_input(path, "checkpoint")?;
    from_bytes(&mmap, &path.display().to_string(), dev)
}

/// Reads only the metadata of a checkpoint (config, template, tokenizer), not its weights; the
/// header checks of `inspect` apply.
pub fn read_meta(path: &Path) -> Result<Meta> {
    let mmap = crate::fsutil::map_input(path, "checkpoint")?;
    Ok(inspect(&mmap, &path.display().to_string())?.meta)
}

/// What a checkpoint file says about itself, read from its header alone (no tensor data).
#[derive(Clone, Debug)]
pub struct Header {
    pub meta: Meta,
    /// The file carries tinybit metadata; `false` for an official RWKV-7 layout.
    pub native: bool,
    /// `(kind, version)` of packed matrices, e.g. `("ternary-b3", "1")`.
    pub quant: Option<(String, String)>,
    /// Every tensor in the file: name, stored dtype, shape.
    pub tensors: Vec<(String, Dtype, Vec<usize>)>,
}

/// Parses a checkpoint held in memory; `file` names it in error messages.
pub fn from_bytes(bytes: &[u8], file: &str, dev: &Device) -> Result<Checkpoint> {
    let st = SafeTensors::deserialize(bytes).map_err(|e| corrupt(file, e))?;
    let header = inspect(bytes, file)?;
    let params = read_params(&st, &header, file, dev)?;
    Ok(Checkpoint {
        meta: header.meta,
        params,
    })
}

fn corrupt(file: &str, e: safetensors::SafeTensorError) -> Error {
    Error::Data(format!(
        "checkpoint {file} is truncated or corrupt ({e}); re-download or re-convert it"
    ))
}

/// Reads a checkpoint's header: its metadata, quantization and tensor list, checking the format
/// and quantization versions and that every parameter is there with the config's shape.
pub fn inspect(bytes: &[u8], file: &str) -> Result<Header> {
    let (_, header) = SafeTensors::read_metadata(bytes).map_err(|e| corrupt(file, e))?;
    let st = SafeTensors::deserialize(bytes).map_err(|e| corrupt(file, e))?;
    let md = header.metadata().clone().unwrap_or_default();
    let mut tensors: Vec<(String, Dtype, Vec<usize>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.dtype(), v.shape().to_vec()))
        .collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let native = md.contains_key("tinybit.format");
    let (meta, quant) = if native {
        (native_meta(&md, file)?, quant_of(&md, file)?)
    } else {
        // An official RWKV-7 layout: config from shapes, the official chat template.
        let meta = Meta {
            config: config_from_shapes(&st, file)?,
            template: TEMPLATE_RWKV.into(),
            tokenizer: None,
        };
        (meta, None)
    };
    for spec in param_specs(&meta.config) {
        locate(&st, &spec, quant.is_some(), file)?;
    }
    Ok(Header {
        meta,
        native,
        quant,
        tensors,
    })
}

/// The `Meta` of a file with tinybit metadata.
fn native_meta(md: &HashMap<String, String>, file: &str) -> Result<Meta> {
    match md.get("tinybit.format").map(String::as_str) {
        Some("checkpoint") => {}
        other => {
            return Err(Error::Data(format!(
                "{file} is a tinybit '{}' file, not a checkpoint",
                other.unwrap_or("?")
            )));
        }
    }
    let version = md.get("tinybit.version").map(String::as_str).unwrap_or("?");
    if version != FORMAT_VERSION {
        return Err(Error::Data(format!(
            "checkpoint {file} has format version {version}; this tinybit reads version {FORMAT_VERSION}"
        )));
    }
    let cfg_text = md
        .get("tinybit.config")
        .ok_or_else(|| Error::Data(format!("checkpoint {file}: metadata has no tinybit.config")))?;
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
    Ok(Meta {
        config,
        template,
        tokenizer,
    })
}

/// The packed format named in the metadata, refused unless this tinybit reads it.
fn quant_of(md: &HashMap<String, String>, file: &str) -> Result<Option<(String, String)>> {
    let Some(kind) = md.get("tinybit.quant") else {
        return Ok(None);
    };
    let version = md
        .get("tinybit.quant.version")
        .map(String::as_str)
        .unwrap_or("?");
    if kind != QUANT_TERNARY_B3 || version != QUANT_VERSION {
        return Err(Error::Data(format!(
            "checkpoint {file} packs its weights as '{kind}' version {version}; this tinybit reads \
             '{QUANT_TERNARY_B3}' version {QUANT_VERSION}: use a newer tinybit, or re-convert the \
             original model with this one"
        )));
    }
    Ok(Some((kind.clone(), version.to_string())))
}

/// Where a parameter's values are in a file.
enum Stored {
    Plain,
    Packed,
    /// One of the unused block-0 tensors, absent: zeros.
    Absent,
}

/// Finds a parameter in the file and checks its shape (for a packed matrix, its byte count) against
/// the config, from the header alone. Errors name the file and the tensor.
fn locate(st: &SafeTensors, spec: &ParamSpec, quantized: bool, file: &str) -> Result<Stored> {
    let name = &spec.name;
    let n: usize = spec.shape.iter().product();
    if quantized
        && ternary_eligible(name)
        && let Ok(packed) = st.tensor(&format!("{name}.packed"))
    {
        if packed.dtype() != Dtype::U8 || packed.shape() != [n.div_ceil(5)] {
            return Err(Error::Data(format!(
                "checkpoint {file}: tensor {name}.packed is {:?} {:?}, but the config's shape {:?} \
                 packs into U8 [{}]",
                packed.dtype(),
                packed.shape(),
                spec.shape,
                n.div_ceil(5)
            )));
        }
        return Ok(Stored::Packed);
    }
    match st.tensor(name) {
        Ok(v) if v.shape() == spec.shape.as_slice() => Ok(Stored::Plain),
        Ok(v) => Err(Error::Data(format!(
            "checkpoint {file}: tensor {name} has shape {:?}, but the config says {:?}",
            v.shape(),
            spec.shape
        ))),
        Err(_) if is_unused(name) => Ok(Stored::Absent),
        Err(_) => Err(Error::Data(format!(
            "checkpoint {file}: tensor {name} is missing (expected shape {:?})",
            spec.shape
        ))),
    }
}

/// Reads every parameter the config names as f32; the unused block-0 tensors may be absent.
fn read_params(
    st: &SafeTensors,
    header: &Header,
    file: &str,
    dev: &Device,
) -> Result<HashMap<String, Tensor>> {
    let cfg = &header.meta.config;
    let mut out = HashMap::new();
    for spec in param_specs(cfg) {
        let shape = spec.shape.as_slice();
        let t = match locate(st, &spec, header.quant.is_some(), file)? {
            Stored::Packed => unpack_matrix(st, cfg, &spec.name, shape, file, dev)?,
            Stored::Absent => Tensor::zeros(shape, DType::F32, dev)?,
            Stored::Plain => {
                let view = st.tensor(&spec.name).map_err(|e| corrupt(file, e))?;
                let vals = to_f32(&spec.name, file, view.dtype(), view.data())?;
                if let Some(i) = vals.iter().position(|v| !v.is_finite()) {
                    return Err(Error::Data(format!(
                        "checkpoint {file}: tensor {} holds a non-finite value at index {i}",
                        spec.name
                    )));
                }
                Tensor::from_vec(vals, shape, dev)?
            }
        };
        out.insert(spec.name, t);
    }
    Ok(out)
}

/// Dequantises `NAME.packed` and `NAME.scale` to an f32 tensor of `shape`.
///
/// A dense matrix becomes γ·T. A BitLinear matrix is ternarized again by the model on every
/// forward, with γ' = mean|W|; it becomes (γ/p)·T, p the fraction of non-zero trits, which makes
/// that γ' equal γ, so the model computes with the packed γ·T.
fn unpack_matrix(
    st: &SafeTensors,
    cfg: &ModelConfig,
    name: &str,
    shape: &[usize],
    file: &str,
    dev: &Device,
) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let (trits, gamma) = read_packed(st, name, shape, file)?;
    let nonzero = trits.iter().filter(|t| **t != 0).count();
    let trits = Tensor::from_vec(
        trits.into_iter().map(f32::from).collect::<Vec<f32>>(),
        shape,
        dev,
    )?;
    if !is_ternary(cfg, name) || nonzero == 0 {
        return Ok((trits * gamma as f64)?);
    }
    // Equal to γ up to the rounding of the model's f32 mean (~1e-5 relative), the same rounding
    // that γ itself carries.
    let c = gamma as f64 * n as f64 / nonzero as f64;
    Ok((trits * c)?)
}

/// The trits (row-major, −1/0/+1) and the scale γ of a packed matrix `NAME` of `shape`, checked:
/// for readers that compute with the packed form itself (the inference engine).
pub fn read_packed(
    st: &SafeTensors,
    name: &str,
    shape: &[usize],
    file: &str,
) -> Result<(Vec<i8>, f32)> {
    let bad = |what: String| Error::Data(format!("checkpoint {file}: tensor {name}: {what}"));
    let n: usize = shape.iter().product();
    let packed = st
        .tensor(&format!("{name}.packed"))
        .map_err(|e| bad(e.to_string()))?;
    if packed.dtype() != Dtype::U8 {
        return Err(bad(format!(
            "{name}.packed has dtype {:?}, expected U8",
            packed.dtype()
        )));
    }
    let trits = unpack_trits(packed.data(), n).ok_or_else(|| {
        bad(format!(
            "{name}.packed holds {} bytes, expected {} bytes of base-3 digits (each ≤ 242) for shape {shape:?}",
            packed.data().len(),
            n.div_ceil(5)
        ))
    })?;
    let scale = st
        .tensor(&format!("{name}.scale"))
        .map_err(|_| bad(format!("{name}.scale is missing")))?;
    let gamma = match (scale.dtype(), scale.data()) {
        (Dtype::F32, [a, b, c, d]) => f32::from_le_bytes([*a, *b, *c, *d]),
        _ => return Err(bad(format!("{name}.scale must be one F32 value"))),
    };
    if !gamma.is_finite() || gamma < 0.0 {
        return Err(bad(format!(
            "{name}.scale is {gamma}, not a finite scale ≥ 0"
        )));
    }
    Ok((trits, gamma))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trit_packing_layout_and_round_trip() {
        // First trit in the lowest base-3 digit: 0·1 + 1·3 + 2·9 + 2·27 + 0·81 = 75.
        assert_eq!(pack_trits(&[-1, 0, 1, 1, -1]), vec![75]);
        // Padding digits are zero weights (digit 1): [1] → 2 + 1·3 + 1·9 + 1·27 + 1·81 = 122.
        assert_eq!(pack_trits(&[1]), vec![122]);
        for n in [0usize, 1, 4, 5, 6, 11, 37] {
            let trits: Vec<i8> = (0..n).map(|i| ((i * 7 + 3) % 3) as i8 - 1).collect();
            let packed = pack_trits(&trits);
            assert_eq!(packed.len(), n.div_ceil(5));
            assert_eq!(unpack_trits(&packed, n).unwrap(), trits, "n={n}");
        }
        assert!(
            unpack_trits(&[243], 5).is_none(),
            "a byte above 242 is corrupt"
        );
        assert!(unpack_trits(&[0, 0], 5).is_none(), "wrong length");
    }
}
