//! tb-convert: import official RWKV-7 checkpoints (PyTorch `.pth`, safetensors), re-save a
//! checkpoint as f32/f16/bf16 or with packed ternary matrices, and describe one (`--info`).
//!
//! Every input goes through the same path: the file is read as safetensors bytes (a `.pth` is
//! re-serialised in memory, leading `model.`/`_orig_mod.` prefixes are stripped) and handed to
//! `checkpoint::from_bytes`, so an import is checked exactly as any checkpoint load is.

use crate::checkpoint::{self, Checkpoint, Header, Meta};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::model::params::{ParamKind, kind_of, param_specs};
use crate::tokenizer::{Tokenizer, WORLD_VOCAB_NAME};
use candle_core::{DType, Device, Tensor};
use safetensors::Dtype;
use serde::Serialize;
use std::collections::BTreeMap;
use std::io::Read;
use std::ops::Deref;
use std::path::{Path, PathBuf};

/// An official model whose vocabulary has at least this many entries gets the World tokenizer
/// (the World vocabulary file's 65,529 tokens; the models pad it to 65,536).
pub const WORLD_MIN_VOCAB: usize = 65_529;

/// Name prefixes that training wrappers put before the official names (`torch.compile`, HF-style).
const NAME_PREFIXES: [&str; 2] = ["_orig_mod.", "model."];

/// The kind of file an input is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceFormat {
    /// A safetensors file with tinybit metadata.
    Tinybit,
    /// A safetensors file with the official RWKV-7 names and no tinybit metadata.
    OfficialSafetensors,
    /// A PyTorch `torch.save` state_dict (zip archive with a pickle).
    Pth,
}

impl SourceFormat {
    fn describe(self) -> &'static str {
        match self {
            SourceFormat::Tinybit => "tinybit checkpoint",
            SourceFormat::OfficialSafetensors => "official RWKV-7 layout (safetensors)",
            SourceFormat::Pth => "official RWKV-7 layout (PyTorch .pth)",
        }
    }
}

/// An input file, as safetensors bytes (mapped, or built in memory for `.pth` and renamed inputs).
pub struct Source {
    pub format: SourceFormat,
    /// The input's size on disk.
    pub file_bytes: u64,
    /// The path as shown in messages.
    pub name: String,
    data: Data,
}

enum Data {
    Mapped(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Deref for Source {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match &self.data {
            Data::Mapped(m) => m,
            Data::Owned(v) => v,
        }
    }
}

/// Opens an input of any supported kind, told apart by content, not by extension.
pub fn open_source(path: &Path) -> Result<Source> {
    let name = path.display().to_string();
    // Read-only map; checkpoints are replaced by rename, never rewritten in place.
    let mmap = crate::fsutil::map_input(path, "checkpoint")?;
    let file_bytes = mmap.len() as u64;
    let source = |format, data| Source {
        format,
        file_bytes,
        name: name.clone(),
        data,
    };
    if mmap.starts_with(b"PK\x03\x04") {
        let bytes = read_pth(path, &name)?;
        return Ok(source(SourceFormat::Pth, Data::Owned(bytes)));
    }
    // safetensors: metadata tells tinybit files from official ones; only the latter get renamed.
    let header = safetensors::SafeTensors::read_metadata(&mmap).map_err(|e| {
        // torch.save before PyTorch 1.6 wrote a bare pickle: protocol 2, then a magic long.
        if mmap.starts_with(b"\x80\x02\x8a\x0a") {
            Error::Data(format!(
                "{name} is a PyTorch file in the legacy (pre-1.6, non-zip) format, which tinybit \
                 cannot read; re-save it in Python with torch.save(torch.load(IN), OUT)"
            ))
        } else {
            Error::Data(format!(
                "{name} is neither a readable safetensors file nor a PyTorch .pth ({e}); it may be \
                 truncated or corrupt: re-download or re-convert it"
            ))
        }
    })?;
    let native = header
        .1
        .metadata()
        .as_ref()
        .is_some_and(|m| m.contains_key("tinybit.format"));
    if native {
        return Ok(source(SourceFormat::Tinybit, Data::Mapped(mmap)));
    }
    let st = safetensors::SafeTensors::deserialize(&mmap)
        .map_err(|e| Error::Data(format!("{name} is truncated or corrupt ({e})")))?;
    if st.tensor("emb.weight").is_ok() || !st.names().iter().any(|n| strip_prefix(n) != *n) {
        return Ok(source(
            SourceFormat::OfficialSafetensors,
            Data::Mapped(mmap),
        ));
    }
    let renamed: Vec<(String, safetensors::tensor::TensorView)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (strip_prefix(&n).to_string(), v))
        .collect();
    let bytes = serialize(renamed, &name)?;
    Ok(source(
        SourceFormat::OfficialSafetensors,
        Data::Owned(bytes),
    ))
}

/// The official name of a tensor: leading wrapper prefixes removed.
fn strip_prefix(name: &str) -> &str {
    let mut n = name;
    while let Some(rest) = NAME_PREFIXES.iter().find_map(|p| n.strip_prefix(p)) {
        n = rest;
    }
    n
}

fn serialize<V: safetensors::View>(tensors: Vec<(String, V)>, name: &str) -> Result<Vec<u8>> {
    safetensors::serialize(tensors, None)
        .map_err(|e| Error::Data(format!("{name}: re-serialising its tensors failed: {e}")))
}

/// Reads a PyTorch state_dict (f32, f16, bf16, ...) into safetensors bytes with official names.
fn read_pth(path: &Path, name: &str) -> Result<Vec<u8>> {
    verify_zip(path, name)?;
    // The archive's checksums hold, so the pickle is what torch wrote; candle's reader still
    // indexes tuples directly, so a malformed pickle is caught here rather than aborting.
    let read = std::panic::catch_unwind(|| candle_core::pickle::read_all(path));
    let tensors = match read {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            return Err(Error::Data(format!(
                "{name}: reading the PyTorch checkpoint failed ({e}); it must be a state_dict saved \
                 with torch.save"
            )));
        }
        Err(_) => {
            return Err(Error::Data(format!(
                "{name}: the PyTorch pickle is malformed; it must be a state_dict saved with torch.save"
            )));
        }
    };
    if tensors.is_empty() {
        return Err(Error::Data(format!(
            "{name} holds no tensors; expected a model state_dict saved with torch.save"
        )));
    }
    let tensors = tensors
        .into_iter()
        .map(|(n, t)| Ok((strip_prefix(&n).to_string(), t.contiguous()?)))
        .collect::<Result<Vec<(String, Tensor)>>>()?;
    serialize(tensors, name)
}

/// Reads every member of the zip archive once, so its CRC-32 checksums are verified before the
/// pickle is parsed: a truncated or bit-flipped file is refused with a clear message.
fn verify_zip(path: &Path, name: &str) -> Result<()> {
    let bad = |e: String| {
        Error::Data(format!(
            "{name} is a truncated or corrupt PyTorch archive ({e}); re-download it"
        ))
    };
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, "opening input", e))?;
    let mut zip =
        zip::ZipArchive::new(std::io::BufReader::new(file)).map_err(|e| bad(e.to_string()))?;
    let mut buf = vec![0u8; 1 << 16];
    for i in 0..zip.len() {
        let mut member = zip.by_index(i).map_err(|e| bad(e.to_string()))?;
        let member_name = member.name().map(|n| n.into_owned()).unwrap_or_default();
        loop {
            match member.read(&mut buf) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => return Err(bad(format!("{member_name}: {e}"))),
            }
        }
    }
    Ok(())
}

/// Reads an input as a checkpoint, attaching a tokenizer: the one in `tokenizer` when given, else
/// the World tokenizer for an official model with a World-sized vocabulary.
pub fn import(path: &Path, tokenizer: Option<&Path>) -> Result<(Checkpoint, Header, Source)> {
    let source = open_source(path)?;
    let header = checkpoint::inspect(&source, &source.name)?;
    let mut ck = checkpoint::from_bytes(&source, &source.name, &Device::Cpu)?;
    let tok = match tokenizer {
        Some(p) => Some(Tokenizer::from_file(p)?),
        None if !header.native && ck.meta.config.vocab_size >= WORLD_MIN_VOCAB => {
            Some(Tokenizer::world())
        }
        None => None,
    };
    if let Some(tok) = tok {
        if tok.vocab_size() > ck.meta.config.vocab_size {
            return Err(Error::Data(format!(
                "the tokenizer has {} ids but {} has a vocabulary of {}: they do not belong together; \
                 pick the tokenizer the model was trained with",
                tok.vocab_size(),
                source.name,
                ck.meta.config.vocab_size
            )));
        }
        ck.meta.tokenizer = Some(tok.metadata());
    }
    Ok((ck, header, source))
}

/// What `convert` should write.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Pack every ternary-eligible matrix (`ternary-b3`).
    pub quantize: bool,
    /// Storage type of the (other) tensors; `None`: the input's, or f32 when it has several —
    /// except that packing an f32 input keeps the rest in bf16 (see `default_dtype`).
    pub dtype: Option<DType>,
    /// A tokenizer file to attach instead of the input's.
    pub tokenizer: Option<PathBuf>,
    /// Checkpoints of the same model to average with the input, parameter by parameter
    /// ([`average`]).
    pub average: Vec<PathBuf>,
}

/// What `convert` did.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub input: String,
    pub output: String,
    pub input_format: SourceFormat,
    pub input_bytes: u64,
    pub output_bytes: u64,
    /// `input_bytes / output_bytes`.
    pub ratio: f64,
    pub dtype: String,
    /// Matrices written packed (0 without `--quantize`).
    pub packed_matrices: usize,
    /// Checkpoints whose mean was written: 1, or 1 + the number of `--average` files.
    pub averaged: usize,
    pub params: u64,
    pub template: String,
    pub tokenizer: Option<TokenizerInfo>,
}

/// Reads `input` (any supported kind) and writes it as a tinybit checkpoint at `output`.
pub fn convert(input: &Path, output: &Path, opts: &Options) -> Result<Report> {
    let (mut ck, header, source) = import(input, opts.tokenizer.as_deref())?;
    if !opts.average.is_empty() {
        average(&mut ck, &header, &source.name, &opts.average)?;
    }
    let dtype = opts
        .dtype
        .unwrap_or_else(|| default_dtype(source_dtype(&header), opts.quantize));
    let params = ck.ordered();
    let packed_matrices = if opts.quantize {
        checkpoint::save_ternary(output, &ck.meta, &params, dtype)?
    } else {
        checkpoint::save_with_dtype(output, &ck.meta, &params, dtype)?;
        0
    };
    let output_bytes = std::fs::metadata(output)
        .map_err(|e| Error::io(output, "reading written checkpoint", e))?
        .len();
    Ok(Report {
        input: source.name.clone(),
        output: output.display().to_string(),
        input_format: source.format,
        input_bytes: source.file_bytes,
        output_bytes,
        ratio: source.file_bytes as f64 / output_bytes.max(1) as f64,
        dtype: dtype_name(dtype).into(),
        packed_matrices,
        averaged: 1 + opts.average.len(),
        params: ck.meta.config.param_count() as u64,
        template: ck.meta.template.clone(),
        tokenizer: ck.meta.tokenizer.as_ref().map(tokenizer_info),
    })
}

/// Replaces every parameter of `ck` (read from `name`, described by `header`) by its mean over
/// `ck` and the checkpoints at `others`, with equal weights (a file given twice counts twice).
/// Averaging the last checkpoints of a run, or a fine-tuned model with the model it started from,
/// often gives weights that generalise better than either end point (Izmailov et al. 2018,
/// "Averaging Weights Leads to Wider Optima"; Wortsman et al. 2022, "Model soups"); the bundled
/// assistant is made this way. Every file must be the same model: the same configuration and
/// tokenizer, and no packed ternary matrices (the mean of ternary matrices is not ternary). On an
/// error `ck` is left part-summed: drop it.
pub fn average(ck: &mut Checkpoint, header: &Header, name: &str, others: &[PathBuf]) -> Result<()> {
    let refuse_packed = |h: &Header, n: &str| match &h.quant {
        Some((kind, _)) => Err(Error::Data(format!(
            "{n} holds packed {kind} matrices: averaging needs unpacked weights (average the \
             f32/f16 checkpoints, then pack the mean with --quantize)"
        ))),
        None => Ok(()),
    };
    refuse_packed(header, name)?;
    // `ck.params` holds the running sum.
    for path in others {
        let source = open_source(path)?;
        let other_header = checkpoint::inspect(&source, &source.name)?;
        refuse_packed(&other_header, &source.name)?;
        if other_header.meta.config != header.meta.config {
            return Err(Error::Data(format!(
                "{} is not the same model as {name}: their configurations differ, so their \
                 parameters cannot be averaged",
                source.name
            )));
        }
        if other_header.meta.tokenizer != header.meta.tokenizer {
            return Err(Error::Data(format!(
                "{} has another tokenizer than {name}: averaging models with different token \
                 ids gives nonsense",
                source.name
            )));
        }
        let other = checkpoint::from_bytes(&source, &source.name, &Device::Cpu)?;
        for (n, t) in ck.params.iter_mut() {
            let o = other.params.get(n).ok_or_else(|| {
                Error::Data(format!(
                    "{} has no tensor {n}, which {name} has",
                    source.name
                ))
            })?;
            *t = (&*t + o)?;
        }
    }
    let scale = 1.0 / (1 + others.len()) as f64;
    for t in ck.params.values_mut() {
        *t = t.affine(scale, 0.0)?;
    }
    Ok(())
}

/// The storage type of unpacked tensors when `--dtype` is not given: the input's, but bf16 for an
/// f32 input that is being packed. Packing is done for size, and an f32 embedding would be a third
/// of a packed `bit` model (2.35× smaller instead of 4.4×); bf16 keeps f32's range, so nothing is
/// refused, and it is what BitNet b1.58's releases keep beside their ternary weights.
fn default_dtype(source: DType, quantize: bool) -> DType {
    match (source, quantize) {
        (DType::F32, true) => DType::BF16,
        (d, _) => d,
    }
}

/// The dtype the input's parameters are stored in, when it is one of f32/f16/bf16 for all of them
/// (packed matrices aside); f32 otherwise.
fn source_dtype(header: &Header) -> DType {
    let names: std::collections::HashSet<String> = param_specs(&header.meta.config)
        .into_iter()
        .map(|s| s.name)
        .collect();
    let mut kinds = header
        .tensors
        .iter()
        .filter(|(n, _, _)| names.contains(n))
        .map(|(_, d, _)| *d);
    let first = kinds.next();
    match first {
        Some(d) if kinds.all(|k| k == d) => match d {
            Dtype::F16 => DType::F16,
            Dtype::BF16 => DType::BF16,
            _ => DType::F32,
        },
        _ => DType::F32,
    }
}

/// `f32`, `f16` or `bf16` (any case) as a candle dtype.
pub fn parse_dtype(s: &str) -> Result<DType> {
    match s.to_ascii_lowercase().as_str() {
        "f32" | "float32" => Ok(DType::F32),
        "f16" | "float16" => Ok(DType::F16),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        _ => Err(Error::usage(format!(
            "--dtype {s}: expected f32, f16 or bf16"
        ))),
    }
}

fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        _ => "f32",
    }
}

/// A tokenizer's identity: its kind, the World vocabulary's name when it is the built-in one, and
/// the sha256 of its payload (what checkpoints and token files record).
#[derive(Clone, Debug, Serialize)]
pub struct TokenizerInfo {
    pub kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub sha256: String,
}

fn tokenizer_info((kind, payload): &(String, String)) -> TokenizerInfo {
    TokenizerInfo {
        kind: kind.clone(),
        name: (kind == "world" && payload == WORLD_VOCAB_NAME).then(|| payload.clone()),
        sha256: crate::fsutil::sha256_hex(payload.as_bytes()),
    }
}

/// Parameter counts by part of the model.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PartCounts {
    /// `emb.weight`.
    pub embedding: u64,
    /// `head.weight` (0 when tied to the embedding).
    pub head: u64,
    /// TimeMix: r/k/v/o matrices, `r_k`, mixing and bias vectors, `ln_x`.
    pub attention: u64,
    /// ChannelMix: key/value matrices and `x_k`.
    pub ffn: u64,
    /// The decay, in-context learning rate, value-residual and gate LoRA pairs.
    pub lora: u64,
    /// The LayerNorms `ln0`, `ln1`, `ln2`, `ln_out`.
    pub other: u64,
    pub total: u64,
}

/// Counts the parameters of a config by part (`blocks.0.att.v0/v1/v2` included, as in `param_count`).
pub fn part_counts(cfg: &ModelConfig) -> PartCounts {
    let mut c = PartCounts::default();
    for spec in param_specs(cfg) {
        let n = spec.shape.iter().product::<usize>() as u64;
        let part = match spec.name.as_str() {
            "emb.weight" => &mut c.embedding,
            "head.weight" => &mut c.head,
            name if kind_of(name) == ParamKind::Lora => &mut c.lora,
            name if name.contains(".att.") => &mut c.attention,
            name if name.contains(".ffn.") => &mut c.ffn,
            _ => &mut c.other,
        };
        *part += n;
        c.total += n;
    }
    c
}

/// Packed matrices of a quantized checkpoint.
#[derive(Clone, Debug, Serialize)]
pub struct QuantInfo {
    pub kind: String,
    pub version: String,
    pub matrices: usize,
    /// Ternary weights in those matrices.
    pub weights: u64,
    /// Stored bits per packed weight (the scale included).
    pub bits_per_weight: f64,
}

/// What `--info` reports about a checkpoint.
#[derive(Clone, Debug, Serialize)]
pub struct Info {
    pub file: String,
    pub format: SourceFormat,
    pub bytes: u64,
    /// Always `rwkv7-x070`.
    pub architecture: String,
    /// The resolved model config.
    pub config: ModelConfig,
    pub params: PartCounts,
    /// Stored dtype → number of tensors, over every tensor in the file.
    pub dtypes: BTreeMap<String, usize>,
    pub quantization: Option<QuantInfo>,
    pub template: String,
    pub tokenizer: Option<TokenizerInfo>,
}

/// Describes a checkpoint from its header (tensor data is not read, except for a `.pth`, which has
/// to be unpacked to be inspected).
pub fn info(path: &Path) -> Result<Info> {
    let source = open_source(path)?;
    let header = checkpoint::inspect(&source, &source.name)?;
    let mut dtypes = BTreeMap::new();
    for (_, d, _) in &header.tensors {
        *dtypes.entry(format!("{d:?}")).or_insert(0) += 1;
    }
    let quantization = header.quant.as_ref().map(|(kind, version)| {
        let shapes: BTreeMap<String, Vec<usize>> = param_specs(&header.meta.config)
            .into_iter()
            .map(|s| (s.name, s.shape))
            .collect();
        // (stored bytes, weights) of each packed matrix.
        let packed: Vec<(u64, u64)> = header
            .tensors
            .iter()
            .filter_map(|(n, _, stored)| {
                let shape = shapes.get(n.strip_suffix(".packed")?)?;
                let count = |s: &[usize]| s.iter().product::<usize>() as u64;
                Some((count(stored), count(shape)))
            })
            .collect();
        let weights: u64 = packed.iter().map(|p| p.1).sum();
        // Each matrix also stores its 4-byte scale.
        let stored_bits = packed.iter().map(|p| p.0 + 4).sum::<u64>() * 8;
        QuantInfo {
            kind: kind.clone(),
            version: version.clone(),
            matrices: packed.len(),
            weights,
            bits_per_weight: stored_bits as f64 / weights.max(1) as f64,
        }
    });
    let Meta {
        config,
        template,
        tokenizer,
    } = header.meta;
    Ok(Info {
        file: source.name.clone(),
        format: source.format,
        bytes: source.file_bytes,
        architecture: "rwkv7-x070".into(),
        params: part_counts(&config),
        config: config.resolved(),
        dtypes,
        quantization,
        template,
        tokenizer: tokenizer.as_ref().map(tokenizer_info),
    })
}

impl Info {
    /// The human-readable report `--info` prints.
    pub fn to_text(&self) -> String {
        let c = &self.config;
        let l = c.lora();
        let yes = |b: bool| if b { "ternary (BitLinear)" } else { "dense" };
        let mut s = String::new();
        let mut line = |k: &str, v: String| s.push_str(&format!("{k:<14}{v}\n"));
        line(
            "file",
            format!("{} ({})", self.file, human_bytes(self.bytes)),
        );
        line("format", self.format.describe().into());
        line(
            "architecture",
            format!(
                "RWKV-7 x070: {} layers, d_model {}, {} heads of {}, d_ffn {}, vocab {}",
                c.n_layer,
                c.d_model,
                c.n_head(),
                c.head_size,
                c.d_ffn,
                c.vocab_size
            ),
        );
        line(
            "",
            format!(
                "LoRA ranks w/a/v/g {}/{}/{}/{}, {} embedding and head",
                l.w,
                l.a,
                l.v,
                l.g,
                if c.tie_embeddings { "tied" } else { "separate" }
            ),
        );
        line(
            "",
            format!(
                "attention {}, ffn {}",
                yes(c.ternary_att),
                yes(c.ternary_ffn)
            ),
        );
        let p = &self.params;
        line(
            "parameters",
            format!("{} ({})", group(p.total), human_count(p.total)),
        );
        for (k, v) in [
            ("embedding", p.embedding),
            ("head", p.head),
            ("attention", p.attention),
            ("ffn", p.ffn),
            ("lora", p.lora),
            ("other", p.other),
        ] {
            line(&format!("  {k}"), group(v));
        }
        let dtypes: Vec<String> = self
            .dtypes
            .iter()
            .map(|(d, n)| format!("{d} ({n} tensors)"))
            .collect();
        line("dtypes", dtypes.join(", "));
        line(
            "quantization",
            match &self.quantization {
                None => "none".into(),
                Some(q) => format!(
                    "{} version {}: {} matrices, {} weights at {:.2} bits/weight",
                    q.kind,
                    q.version,
                    q.matrices,
                    group(q.weights),
                    q.bits_per_weight
                ),
            },
        );
        line("template", self.template.clone());
        line(
            "tokenizer",
            match &self.tokenizer {
                None => "none (evaluate on token files, or attach one with --tokenizer)".into(),
                Some(t) => format!(
                    "{}{} sha256 {}",
                    t.kind,
                    t.name.as_ref().map(|n| format!(" {n}")).unwrap_or_default(),
                    t.sha256
                ),
            },
        );
        s
    }
}

impl Report {
    /// The one-line summary printed on stderr.
    pub fn summary(&self) -> String {
        let packed = if self.packed_matrices > 0 {
            format!(", {} ternary matrices packed", self.packed_matrices)
        } else {
            String::new()
        };
        let mean = if self.averaged > 1 {
            format!(", the mean of {} checkpoints", self.averaged)
        } else {
            String::new()
        };
        format!(
            "wrote {} ({}, {} parameters{packed}{mean}): {} → {}, input/output size ratio {:.2}",
            self.output,
            self.dtype,
            human_count(self.params),
            human_bytes(self.input_bytes),
            human_bytes(self.output_bytes),
            self.ratio
        )
    }
}

/// 1234567 → "1,234,567".
fn group(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

fn human_count(n: u64) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2}B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.1}M", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.1}k", n as f64 / 1e3),
        n => n.to_string(),
    }
}

fn human_bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.2} GiB", n as f64 / (1u64 << 30) as f64),
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_and_grouping() {
        assert_eq!(strip_prefix("model.emb.weight"), "emb.weight");
        assert_eq!(strip_prefix("_orig_mod.model.head.weight"), "head.weight");
        assert_eq!(strip_prefix("blocks.0.ln1.weight"), "blocks.0.ln1.weight");
        assert_eq!(group(1_234_567), "1,234,567");
        assert_eq!(group(999), "999");
        assert_eq!(group(1000), "1,000");
    }

    #[test]
    fn part_counts_add_up_to_the_formula() {
        let cfg = ModelConfig::from_toml_str(
            "n_layer = 3\nd_model = 128\nd_ffn = 256\nvocab_size = 300\n",
            "test",
        )
        .unwrap();
        let p = part_counts(&cfg);
        assert_eq!(p.total as usize, cfg.param_count());
        assert_eq!(
            p.embedding + p.head + p.attention + p.ffn + p.lora + p.other,
            p.total
        );
        assert_eq!(p.embedding, 300 * 128);
        assert_eq!(p.head, 300 * 128);
        assert_eq!(p.ffn, 3 * (2 * 128 * 256 + 128));
        // ln0 (2C) + ln_out (2C) + per layer ln1, ln2 (4C).
        assert_eq!(p.other, 4 * 128 + 3 * 4 * 128);
    }
}
