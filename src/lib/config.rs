//! Model configuration: a TOML file (unknown keys rejected) plus `--set key=value` overrides.
//!
//! The presets in `configs/` are plain files of this type. A checkpoint stores the resolved config in
//! its metadata, so a user never repeats it.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Which family a model belongs to: what tb-chat says by default and which data the scripts gather.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Family {
    /// `general` or `coding`.
    pub name: String,
    /// The default system prompt tb-chat sends when the user gives none.
    #[serde(default)]
    pub system_prompt: String,
    /// The corpus profile `scripts/prepare_data.sh` gathers (`general` or `coding`).
    #[serde(default = "default_profile")]
    pub data_profile: String,
}

fn default_profile() -> String {
    "general".into()
}

impl Default for Family {
    fn default() -> Self {
        Family {
            name: "general".into(),
            system_prompt: "You are tinybit, a small local assistant. Answer briefly and say when you do not know."
                .into(),
            data_profile: default_profile(),
        }
    }
}

fn default_head_size() -> usize {
    64
}

/// The architecture of one RWKV-7 (x070) model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub n_layer: usize,
    pub d_model: usize,
    #[serde(default = "default_head_size")]
    pub head_size: usize,
    pub d_ffn: usize,
    pub vocab_size: usize,
    /// LoRA ranks of decay, in-context learning rate, value residual and gate. Absent: the formula
    /// the released checkpoints follow ([`ModelConfig::lora`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora_w: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora_a: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora_v: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora_g: Option<usize>,
    /// The head reuses the embedding matrix (no `head.weight`).
    #[serde(default)]
    pub tie_embeddings: bool,
    /// BitLinear (ternary weights, 8-bit activations) for the attention's r/k/v/o matrices.
    #[serde(default)]
    pub ternary_att: bool,
    /// BitLinear for the FFN key/value matrices.
    #[serde(default)]
    pub ternary_ffn: bool,
    #[serde(default)]
    pub family: Family,
}

/// The LoRA ranks actually used, resolved from the config or the formula.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoraRanks {
    pub w: usize,
    pub a: usize,
    pub v: usize,
    pub g: usize,
}

/// `max(32, round(x/32)·32)` with round-half-to-even, as Python's `round` in the official trainer.
fn lora_round(x: f64) -> usize {
    let q = x / 32.0;
    let r = q.round_ties_even();
    ((r as usize) * 32).max(32)
}

impl ModelConfig {
    pub fn n_head(&self) -> usize {
        self.d_model / self.head_size
    }

    /// Ranks from the config, or the released-checkpoint formula (that of the older official x070
    /// trainer): 1.8·√C, 1.8·√C, 1.3·√C, 0.6·C^0.8, each rounded to a multiple of 32 (halves to
    /// even), at least 32. See tinybit-models(7), "Parameter count".
    pub fn lora(&self) -> LoraRanks {
        let c = self.d_model as f64;
        LoraRanks {
            w: self.lora_w.unwrap_or_else(|| lora_round(1.8 * c.sqrt())),
            a: self.lora_a.unwrap_or_else(|| lora_round(1.8 * c.sqrt())),
            v: self.lora_v.unwrap_or_else(|| lora_round(1.3 * c.sqrt())),
            g: self.lora_g.unwrap_or_else(|| lora_round(0.6 * c.powf(0.8))),
        }
    }

    /// The same config with the LoRA ranks written out, so a checkpoint never depends on the formula.
    pub fn resolved(&self) -> ModelConfig {
        let l = self.lora();
        ModelConfig {
            lora_w: Some(l.w),
            lora_a: Some(l.a),
            lora_v: Some(l.v),
            lora_g: Some(l.g),
            ..self.clone()
        }
    }

    /// Checks the values make a buildable model.
    pub fn validate(&self) -> Result<()> {
        let fail = |m: String| Err(Error::Data(format!("invalid model config: {m}")));
        if self.n_layer == 0 || self.d_model == 0 || self.d_ffn == 0 || self.vocab_size == 0 {
            return fail("n_layer, d_model, d_ffn and vocab_size must be positive".into());
        }
        if self.head_size == 0 || self.d_model % self.head_size != 0 {
            return fail(format!(
                "d_model ({}) must be a multiple of head_size ({})",
                self.d_model, self.head_size
            ));
        }
        let l = self.lora();
        if l.w == 0 || l.a == 0 || l.v == 0 || l.g == 0 {
            return fail("LoRA ranks must be positive".into());
        }
        if !["general", "coding"].contains(&self.family.data_profile.as_str()) {
            return fail(format!(
                "family.data_profile must be 'general' or 'coding', not '{}'",
                self.family.data_profile
            ));
        }
        Ok(())
    }

    /// Number of parameters, computed from the config alone (tinybit-models(7); per layer
    /// `19C + 4C² + 2CF + 2C(Dw+Da+Dv+Dg)`, plus embedding, head, ln0 and ln_out).
    /// Counts `blocks.0.att.v0/v1/v2`, which exist in every checkpoint although unused.
    pub fn param_count(&self) -> usize {
        let (c, f, v) = (self.d_model, self.d_ffn, self.vocab_size);
        let l = self.lora();
        let per_layer = 19 * c + 4 * c * c + 2 * c * f + 2 * c * (l.w + l.a + l.v + l.g);
        let head = if self.tie_embeddings { 0 } else { v * c };
        self.n_layer * per_layer + v * c + head + 4 * c
    }

    /// [`param_count`](Self::param_count) in f64, which no config overflows.
    pub fn param_count_f64(&self) -> f64 {
        let (c, f, v) = (
            self.d_model as f64,
            self.d_ffn as f64,
            self.vocab_size as f64,
        );
        let l = self.lora();
        let ranks = l.w as f64 + l.a as f64 + l.v as f64 + l.g as f64;
        let per_layer = 19.0 * c + 4.0 * c * c + 2.0 * c * f + 2.0 * c * ranks;
        let head = if self.tie_embeddings { 0.0 } else { v * c };
        self.n_layer as f64 * per_layer + v * c + head + 4.0 * c
    }

    /// A short stable identity of the architecture (for state files): sha256 of the resolved
    /// architecture fields, family excluded (a state does not depend on the system prompt).
    pub fn arch_hash(&self) -> String {
        use sha2::{Digest, Sha256};
        let r = self.resolved();
        let l = r.lora();
        let s = format!(
            "x070 L{} C{} N{} F{} V{} lora{},{},{},{} tie{} tern{}{}",
            r.n_layer,
            r.d_model,
            r.head_size,
            r.d_ffn,
            r.vocab_size,
            l.w,
            l.a,
            l.v,
            l.g,
            r.tie_embeddings,
            r.ternary_att,
            r.ternary_ffn
        );
        let d = Sha256::digest(s.as_bytes());
        hex::encode(&d[..8])
    }

    pub fn from_toml_str(text: &str, origin: &str) -> Result<ModelConfig> {
        let cfg: ModelConfig =
            toml::from_str(text).map_err(|e| Error::Data(format!("model config {origin}: {e}")))?;
        cfg.validate()
            .map_err(|e| Error::Data(format!("{origin}: {e}")))?;
        Ok(cfg)
    }

    pub fn load(path: &Path) -> Result<ModelConfig> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::io(path, "reading model config", e))?;
        Self::from_toml_str(&text, &path.display().to_string())
    }

    /// Applies `key=value` overrides (`--set`); `family.name=coding` reaches the family table.
    /// An unknown key is an error, as in the file itself.
    pub fn with_overrides(&self, sets: &[(String, String)]) -> Result<ModelConfig> {
        let cfg: ModelConfig = apply_overrides(self, sets, "model config")?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn to_json(&self) -> String {
        // Cannot fail: a struct of strings, integers and bools always serialises.
        serde_json::to_string(self).expect("config serialises")
    }

    pub fn from_json(text: &str) -> Result<ModelConfig> {
        let cfg: ModelConfig = serde_json::from_str(text)
            .map_err(|e| Error::Data(format!("model config in metadata: {e}")))?;
        cfg.validate()?;
        Ok(cfg)
    }
}

/// Applies `--set key=value` overrides to any serde config: the value is read as TOML (number, bool,
/// string, array), falling back to a plain string; dotted keys reach nested tables. Unknown keys are
/// refused by the type's `deny_unknown_fields`.
pub fn apply_overrides<T: Serialize + serde::de::DeserializeOwned>(
    base: &T,
    sets: &[(String, String)],
    what: &str,
) -> Result<T> {
    let mut root = toml::Table::try_from(base).map_err(|e| Error::Data(format!("{what}: {e}")))?;
    for (key, raw) in sets {
        let value = parse_toml_value(raw);
        let mut table = &mut root;
        let parts: Vec<&str> = key.split('.').collect();
        for part in &parts[..parts.len() - 1] {
            table = table
                .entry(part.to_string())
                .or_insert_with(|| toml::Value::Table(Default::default()))
                .as_table_mut()
                .ok_or_else(|| Error::Usage(format!("--set {key}: '{part}' is not a table")))?;
        }
        table.insert(parts[parts.len() - 1].to_string(), value);
    }
    T::deserialize(root).map_err(|e| Error::Usage(format!("--set: {what}: {e}")))
}

fn parse_toml_value(raw: &str) -> toml::Value {
    let doc = format!("v = {raw}");
    match toml::from_str::<toml::Table>(&doc) {
        Ok(mut t) => t.remove("v").unwrap_or(toml::Value::String(raw.into())),
        Err(_) => toml::Value::String(raw.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> ModelConfig {
        ModelConfig::from_toml_str(
            "n_layer = 2\nd_model = 128\nd_ffn = 512\nvocab_size = 256\n",
            "test",
        )
        .unwrap()
    }

    #[test]
    fn lora_formula_matches_released_checkpoints() {
        // The released 0.1B (C=768) and 1.5B (C=2048) checkpoints' shapes, and C=384 by hand.
        for (c, want) in [
            (768, (64, 64, 32, 128)),
            (2048, (96, 96, 64, 256)),
            (384, (32, 32, 32, 64)),
        ] {
            let cfg = ModelConfig {
                d_model: c,
                ..tiny()
            };
            let l = cfg.lora();
            assert_eq!((l.w, l.a, l.v, l.g), want, "C={c}");
        }
    }

    #[test]
    fn param_formula_matches_readme_0_4b() {
        // The BlinkDL/RWKV-LM README's 0.4B: L24-D1024, ranks (64,64,32,128), V=65536, F=4C →
        // 450,834,432.
        let cfg = ModelConfig {
            n_layer: 24,
            d_model: 1024,
            d_ffn: 4096,
            vocab_size: 65536,
            lora_w: Some(64),
            lora_a: Some(64),
            lora_v: Some(32),
            lora_g: Some(128),
            ..tiny()
        };
        assert_eq!(cfg.param_count(), 450_834_432);
    }

    #[test]
    fn unknown_keys_and_overrides() {
        let err = ModelConfig::from_toml_str(
            "n_layer=1\nd_model=64\nd_ffn=64\nvocab_size=9\nbogus=1\n",
            "x",
        );
        assert!(err.unwrap_err().to_string().contains("bogus"));
        let c = tiny()
            .with_overrides(&[
                ("vocab_size".into(), "16384".into()),
                ("family.name".into(), "coding".into()),
            ])
            .unwrap();
        assert_eq!(c.vocab_size, 16384);
        assert_eq!(c.family.name, "coding");
        assert!(
            tiny()
                .with_overrides(&[("nope".into(), "1".into())])
                .is_err()
        );
        assert!(
            tiny()
                .with_overrides(&[("d_model".into(), "100".into())])
                .is_err()
        );
    }
}
