//! Helpers shared by the integration tests.

use candle_core::{Device, Tensor};
use std::path::PathBuf;
use std::process::Output;

/// Anything holding a command's stdout: its `Output`, or the bytes.
pub trait Stdout {
    fn stdout_bytes(&self) -> &[u8];
}

impl Stdout for Output {
    fn stdout_bytes(&self) -> &[u8] {
        &self.stdout
    }
}

impl Stdout for [u8] {
    fn stdout_bytes(&self) -> &[u8] {
        self
    }
}

impl Stdout for Vec<u8> {
    fn stdout_bytes(&self) -> &[u8] {
        self
    }
}

/// The JSON Lines records a command printed (panics naming a line that is not a JSON value).
pub fn records(out: &(impl Stdout + ?Sized)) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(out.stdout_bytes())
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("record {l:?}: {e}")))
        .collect()
}

/// The records of type `t`.
pub fn of_type<'a>(recs: &'a [serde_json::Value], t: &str) -> Vec<&'a serde_json::Value> {
    recs.iter().filter(|r| r["type"] == t).collect()
}

/// A command's stderr as text.
pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The project's copy of the golden vectors, or `TINYBIT_GOLDEN_DIR`.
pub fn golden_dir() -> PathBuf {
    std::env::var_os("TINYBIT_GOLDEN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden"))
}

/// Reads one tensor of a safetensors file as f32 (integer tensors converted).
pub fn read_tensor(bytes: &[u8], name: &str) -> Tensor {
    let st = safetensors::SafeTensors::deserialize(bytes).expect("safetensors");
    let v = st
        .tensor(name)
        .unwrap_or_else(|_| panic!("tensor {name} missing"));
    let vals: Vec<f32> = match v.dtype() {
        safetensors::Dtype::F32 => v
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect(),
        safetensors::Dtype::I64 => v
            .data()
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as f32)
            .collect(),
        d => panic!("unexpected dtype {d:?} for {name}"),
    };
    Tensor::from_vec(vals, v.shape(), &Device::Cpu).unwrap()
}

/// max |a − b| over all elements (shapes must agree).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

pub fn tokens_of(t: &Tensor) -> Vec<u32> {
    t.to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(|x| x as u32)
        .collect()
}

/// A model config from `configs/NAME.toml`.
pub fn preset(name: &str) -> tinybit::config::ModelConfig {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("configs")
        .join(format!("{name}.toml"));
    tinybit::config::ModelConfig::load(&p).unwrap()
}

/// Official init plus noise on every tensor, so no path through the model is trivially zero.
pub fn noisy_params(cfg: &tinybit::config::ModelConfig, seed: u64) -> Vec<(String, Tensor)> {
    use rand::{Rng, SeedableRng};
    let dev = Device::Cpu;
    // Seeded, so a failure reproduces (candle's own randn is seeded per process).
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0x9e37_79b9);
    tinybit::model::init::init_params(cfg, seed, &dev)
        .unwrap()
        .into_iter()
        .map(|(n, t)| {
            let noise: Vec<f32> = (0..t.elem_count())
                .map(|_| rng.random_range(-0.08f32..0.08))
                .collect();
            let noise = Tensor::from_vec(noise, t.dims(), &dev).unwrap();
            (n, (t + noise).unwrap())
        })
        .collect()
}

pub fn model_of(
    cfg: &tinybit::config::ModelConfig,
    params: &[(String, Tensor)],
) -> tinybit::model::Rwkv7 {
    let map = params.iter().cloned().collect();
    tinybit::model::Rwkv7::from_params(cfg, &map).unwrap()
}

/// Every golden model file (a `*.safetensors` holding `golden.logits`) in the golden directory.
pub fn golden_model_files() -> Vec<PathBuf> {
    let dir = golden_dir();
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("golden directory {}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .filter(|p| {
            let bytes = std::fs::read(p).unwrap();
            safetensors::SafeTensors::deserialize(&bytes)
                .is_ok_and(|st| st.tensor("golden.logits").is_ok())
        })
        .collect();
    files.sort();
    files
}
