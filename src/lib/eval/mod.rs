//! tb-eval: one task per run over a model — perplexity (`ppl`), sanity prompts (`gen`), tool-call
//! cases (`tools`) — with thresholds for makefiles, a table or JSON Lines records on stdout, and
//! a results file.

pub mod generating;
pub mod ppl;

pub use ppl::{
    EvalData, Nll, PPL_PROGRESS, PplResult, batch_memory, check_batch_memory, nll, nll_batched,
    summarize,
};

use crate::error::{Error, Result};
use crate::model::Rwkv7;
use crate::tokenizer::Tokenizer;
use std::path::Path;

/// Checks `--fail-above M=V` / `--fail-below M=V` against the metrics; returns the misses.
pub fn check_thresholds(
    metrics: &serde_json::Map<String, serde_json::Value>,
    above: &[(String, f64)],
    below: &[(String, f64)],
) -> Result<Vec<String>> {
    let mut misses = Vec::new();
    let get = |m: &str| -> Result<f64> {
        match metrics.get(m) {
            Some(v) if v.is_null() => Err(Error::Usage(format!(
                "metric '{m}' is null for this task and input (nothing to compute it from, such \
                 as a ratio with nothing to count, or a value that is not a finite number), so a \
                 threshold on it cannot be checked"
            ))),
            Some(v) => v.as_f64().ok_or_else(|| {
                Error::Usage(format!(
                    "metric '{m}' is {v}, not a number; a threshold on it cannot be checked"
                ))
            }),
            None => Err(Error::Usage(format!(
                "no metric '{m}' (have: {})",
                metrics.keys().cloned().collect::<Vec<_>>().join(", ")
            ))),
        }
    };
    for (m, v) in above {
        let x = get(m)?;
        if x > *v {
            misses.push(format!("{m} = {x:.4} is above {v}"));
        }
    }
    for (m, v) in below {
        let x = get(m)?;
        if x < *v {
            misses.push(format!("{m} = {x:.4} is below {v}"));
        }
    }
    Ok(misses)
}

/// Parses `METRIC=VALUE`.
pub fn parse_threshold(s: &str) -> Result<(String, f64)> {
    let (m, v) = s
        .split_once('=')
        .ok_or_else(|| Error::Usage(format!("expected METRIC=VALUE, got '{s}'")))?;
    let v: f64 = v
        .trim()
        .parse()
        .ok()
        // NaN compares false with everything, so a NaN threshold could never be missed.
        .filter(|v: &f64| !v.is_nan())
        .ok_or_else(|| Error::Usage(format!("'{v}' in '{s}' is not a number")))?;
    Ok((m.trim().to_string(), v))
}

/// What `tb-eval` measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Task {
    Ppl,
    Gen,
    Tools,
}

impl Task {
    pub fn parse(s: &str) -> Result<Task> {
        match s {
            "ppl" => Ok(Task::Ppl),
            "gen" => Ok(Task::Gen),
            "tools" => Ok(Task::Tools),
            _ => Err(Error::Usage(format!(
                "unknown task '{s}' (ppl, gen, tools)"
            ))),
        }
    }
    fn name(self) -> &'static str {
        match self {
            Task::Ppl => "ppl",
            Task::Gen => "gen",
            Task::Tools => "tools",
        }
    }
}

/// Everything one `tb-eval` invocation was asked.
pub struct EvalOptions {
    pub model: std::path::PathBuf,
    pub task: Task,
    pub files: Vec<std::path::PathBuf>,
    pub tokenizer: Option<std::path::PathBuf>,
    pub chunk: usize,
    /// ppl: segments evaluated side by side (1: one pass, the state carried through the file).
    pub batch: usize,
    /// Threads of the generation engine (0: one per core; the sequence forward uses the global
    /// pool that `cli::set_threads` sizes).
    pub threads: usize,
    pub max_tokens: usize,
    pub json: bool,
    pub quiet: bool,
    pub output: Option<std::path::PathBuf>,
    pub fail_above: Vec<(String, f64)>,
    pub fail_below: Vec<(String, f64)>,
    /// `auto`, `cpu`, `cuda[:N]`: where perplexity is computed (gen and tools decode on the CPU).
    pub device: String,
    /// tools: `--unconstrained`, tool calls without `constrain`'s mask, as `tb-chat`'s flag.
    pub unconstrained: bool,
    /// tools: `--copy-bias`, as `tb-chat`'s (`GenOptions::copy_bias`).
    pub copy_bias: f32,
}

fn file_sha256(path: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, "reading", e))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).map_err(|e| Error::io(path, "reading", e))?;
    Ok(hex::encode(h.finalize()))
}

/// A metric as the table shows it: whole numbers as they are, others to 4 decimals.
fn num(v: &serde_json::Value) -> String {
    match v.as_f64() {
        Some(x) if x.fract() == 0.0 && x.abs() < 1e15 => format!("{x}"),
        Some(x) => format!("{x:.4}"),
        None => v.to_string(),
    }
}

/// Rows of metrics under a header: `label` heads the names' column, `cols` the others, each
/// `width` wide; a metric a row lacks shows as `-`.
fn grid(
    t: &mut String,
    label: &str,
    rows: &[(&str, &serde_json::Value)],
    cols: &[&str],
    width: usize,
) {
    use std::fmt::Write as _;
    let w = rows
        .iter()
        .map(|r| r.0.len())
        .max()
        .unwrap_or(0)
        .max(label.len());
    let _ = write!(t, "{label:<w$}");
    for c in cols {
        let _ = write!(t, " {c:>width$}");
    }
    t.push('\n');
    for (name, r) in rows {
        let _ = write!(t, "{name:<w$}");
        for c in cols {
            let cell = r.get(c).map_or("-".to_string(), num);
            let _ = write!(t, " {cell:>width$}");
        }
        t.push('\n');
    }
}

/// The result as a table on stdout (without `--json`): for ppl one row per file (and `all`, their
/// sum, when there are several), then every other metric as `name value`, then for tools one row
/// per kind of request (`by_request`).
fn print_table(
    per_file: &[serde_json::Value],
    metrics: &serde_json::Map<String, serde_json::Value>,
) -> Result<()> {
    use std::fmt::Write as _;
    use std::io::Write as _;
    const COLS: [&str; 5] = ["tokens", "bytes", "loss", "ppl", "bpb"];
    const KIND_COLS: [&str; 5] = [
        "cases",
        "tool_selection",
        "exact_match",
        "irrelevance",
        "answer_has_result",
    ];
    let mut t = String::new();
    let mut in_rows: &[&str] = &[];
    if !per_file.is_empty() {
        let all = serde_json::Value::Object(metrics.clone());
        let mut rows: Vec<(&str, &serde_json::Value)> = per_file
            .iter()
            .map(|r| (r["file"].as_str().unwrap_or("?"), r))
            .collect();
        if per_file.len() > 1 {
            rows.push(("all", &all));
        }
        grid(&mut t, "file", &rows, &COLS, 10);
        in_rows = &COLS;
    }
    let rest: Vec<_> = metrics
        .iter()
        .filter(|(k, v)| !in_rows.contains(&k.as_str()) && !v.is_object())
        .collect();
    let w = rest.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    for (k, v) in rest {
        let _ = writeln!(t, "{k:<w$}  {}", num(v));
    }
    if let Some(kinds) = metrics.get("by_request").and_then(|k| k.as_object()) {
        let rows: Vec<_> = kinds.iter().map(|(k, m)| (k.as_str(), m)).collect();
        t.push('\n');
        grid(&mut t, "request", &rows, &KIND_COLS, 17);
    }
    let mut out = std::io::stdout().lock();
    out.write_all(t.as_bytes())
        .and_then(|_| out.flush())
        .map_err(crate::output::stdout_err)
}

fn emit(json: bool, rec: serde_json::Value) -> Result<()> {
    if json {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        writeln!(out, "{rec}").map_err(crate::output::stdout_err)?;
    }
    Ok(())
}

/// Runs an evaluation; writes records, the summary and the results file; returns missed thresholds.
pub fn run(o: &EvalOptions) -> Result<Vec<String>> {
    use serde_json::json;
    if o.batch == 0 {
        return Err(Error::usage(
            "--batch 0 is out of range: use at least 1 (default 1)",
        ));
    }
    if o.chunk == 0 {
        return Err(Error::usage(
            "--chunk 0 is out of range: use at least 1 token per chunk (default 1024)",
        ));
    }
    let dev = candle_core::Device::Cpu;
    let ck = crate::checkpoint::load(&o.model, &dev)?;
    let tok = match (&o.tokenizer, &ck.meta.tokenizer) {
        (Some(p), _) => Some(Tokenizer::from_file(p)?),
        (None, Some((k, p))) => Some(Tokenizer::from_metadata(k, p)?),
        (None, None) => None,
    };
    let started = std::time::Instant::now();
    let mut data_ids = Vec::new();
    let mut per_file = Vec::new();
    let metrics = match o.task {
        Task::Ppl => {
            if o.files.is_empty() {
                return Err(Error::usage(
                    "no input files: give text or token files to evaluate",
                ));
            }
            // Perplexity runs on the device (`--device`); checkpoints load on the CPU.
            let dev = crate::device::open(&o.device)?;
            let params = ck
                .params
                .iter()
                .map(|(n, t)| Ok((n.clone(), t.to_device(&dev)?)))
                .collect::<Result<_>>()?;
            let model = Rwkv7::from_params(&ck.meta.config, &params)?;
            let (mut total, mut bytes) = (Nll::default(), 0u64);
            for (i, f) in o.files.iter().enumerate() {
                let d = EvalData::load(f, tok.as_ref())?;
                // With nothing predicted the mean loss is 0/0, which would read as a perfect score.
                if d.tokens.len() < 2 {
                    return Err(Error::Data(format!(
                        "{}: {} token(s), too few to score: perplexity needs at least 2 (one to \
                         predict from, one to predict); give a longer file",
                        f.display(),
                        d.tokens.len()
                    )));
                }
                let bar =
                    crate::output::progress_bar(d.tokens.len() as u64 - 1, PPL_PROGRESS, o.quiet);
                bar.set_prefix(format!("[{}/{}] {}", i + 1, o.files.len(), f.display()));
                let n = nll_batched(&model, &d.tokens, o.chunk, o.batch, &bar)?;
                bar.finish_and_clear();
                let r = summarize(&n, d.bytes);
                let rec = json!({"type": "metric", "file": f, "ppl": r.ppl, "bpb": r.bpb, "loss": r.loss, "tokens": r.tokens, "bytes": r.bytes});
                emit(o.json, rec.clone())?;
                per_file.push(rec);
                data_ids.push(json!({"path": f, "sha256": file_sha256(f)?, "tokens": r.tokens, "bytes": r.bytes}));
                total.sum += n.sum;
                total.tokens += n.tokens;
                bytes += d.bytes;
            }
            let r = summarize(&total, bytes);
            let secs = started.elapsed().as_secs_f64();
            // Cannot fail: a struct of numbers serialises (non-finite ones as null) to an object.
            let mut m = serde_json::to_value(&r)
                .unwrap()
                .as_object()
                .unwrap()
                .clone();
            m.insert("tok_per_s".into(), json!(r.tokens as f64 / secs));
            m
        }
        Task::Gen | Task::Tools => generating::run(o, &ck, &tok, &mut data_ids)?,
    };
    let misses = check_thresholds(&metrics, &o.fail_above, &o.fail_below)?;
    let result = json!({
        "type": "result", "task": o.task.name(), "metrics": metrics,
        "model": {"path": o.model, "sha256": file_sha256(&o.model)?, "config": ck.meta.config.resolved()},
        "data": data_ids,
        "settings": {"device": o.device, "chunk": o.chunk, "batch": o.batch, "max_tokens": o.max_tokens, "unconstrained": o.unconstrained, "copy_bias": o.copy_bias, "fail_above": o.fail_above, "fail_below": o.fail_below},
        "passed": misses.is_empty(),
    });
    emit(o.json, result.clone())?;
    if let Some(p) = &o.output {
        // Cannot fail: a `json!` value with string keys always serialises.
        crate::fsutil::write_atomic(p, serde_json::to_string_pretty(&result).unwrap().as_bytes())?;
    }
    if !o.json {
        print_table(&per_file, &metrics)?;
    }
    Ok(misses)
}
