//! The sampler: logits → the next token id.
//!
//! Order of operations (as in Hugging Face `generate`):
//! 1. penalties on the tokens in the recent window (`penalty_last_n` most recent accepted tokens):
//!    repetition (`--repeat-penalty`, llama.cpp's rule: a positive logit is divided by it, a negative
//!    one multiplied), then presence (`− presence` once per token that occurs) and frequency
//!    (`− frequency × count`);
//!    (`sample_masked` then drops the ids its mask rules out: constrained decoding);
//! 2. `temperature == 0`: greedy, the largest logit (ties → the smaller id), and nothing else applies;
//!    so is a temperature so small that the largest logit divided by it overflows f32 (e.g. 1e-38);
//! 3. logits divided by the temperature;
//! 4. top-k: keep the k largest (0 = off);
//! 5. top-p: keep the smallest set of most likely tokens whose probability (renormalised over what
//!    top-k kept) reaches p (1 = off);
//! 6. min-p: keep tokens whose probability is at least `min_p ×` the largest (0 = off);
//! 7. draw from what is left, renormalised, with a ChaCha8 generator seeded by `seed`.
//!
//! Candidates are visited in a fixed order (id order, or logit descending then id once truncation
//! sorted them), so the same seed and the same logits give the same token on every machine.

use crate::error::{Error, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::cmp::Ordering;
use std::collections::{HashMap, VecDeque};

#[derive(Clone, Debug, PartialEq)]
pub struct SamplerConfig {
    /// `--temp`; 0 means greedy.
    pub temperature: f32,
    /// `--top-k`; 0 = off.
    pub top_k: usize,
    /// `--top-p`, in (0, 1]; 1 = off.
    pub top_p: f32,
    /// `--min-p`, in [0, 1]; 0 = off.
    pub min_p: f32,
    /// `--repeat-penalty`, > 0; 1 = off.
    pub repeat_penalty: f32,
    /// `--presence-penalty`; 0 = off.
    pub presence_penalty: f32,
    /// `--frequency-penalty`; 0 = off.
    pub frequency_penalty: f32,
    /// How many recent tokens the penalties look at.
    pub penalty_last_n: usize,
    /// `-s/--seed`.
    pub seed: u64,
}

impl Default for SamplerConfig {
    /// llama.cpp's defaults.
    fn default() -> Self {
        SamplerConfig {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            penalty_last_n: 64,
            seed: 0,
        }
    }
}

impl SamplerConfig {
    /// Greedy decoding, no penalties.
    pub fn greedy() -> Self {
        SamplerConfig {
            temperature: 0.0,
            ..Default::default()
        }
    }

    /// Checks each value is in its range; the message names the flag.
    pub fn validate(&self) -> Result<()> {
        let bad = |flag: &str, v: f32, want: &str| {
            Err(Error::usage(format!("{flag} {v} is out of range: {want}")))
        };
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return bad("--temp", self.temperature, "use a value ≥ 0 (0 = greedy)");
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("--top-p", self.top_p, "use a value in (0, 1] (1 = off)");
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad("--min-p", self.min_p, "use a value in [0, 1] (0 = off)");
        }
        if !(self.repeat_penalty > 0.0 && self.repeat_penalty.is_finite()) {
            return bad(
                "--repeat-penalty",
                self.repeat_penalty,
                "use a value > 0 (1 = off)",
            );
        }
        for (flag, v) in [
            ("--presence-penalty", self.presence_penalty),
            ("--frequency-penalty", self.frequency_penalty),
        ] {
            if !v.is_finite() {
                return bad(flag, v, "use a finite number (0 = off)");
            }
        }
        Ok(())
    }

    fn penalties_on(&self) -> bool {
        self.penalty_last_n > 0
            && (self.repeat_penalty != 1.0
                || self.presence_penalty != 0.0
                || self.frequency_penalty != 0.0)
    }
}

/// Candidate order: larger logit first, then smaller id (a total order, so sorts are stable).
fn by_logit_desc(a: &(f32, u32), b: &(f32, u32)) -> Ordering {
    b.0.total_cmp(&a.0).then(a.1.cmp(&b.1))
}

pub struct Sampler {
    cfg: SamplerConfig,
    rng: ChaCha8Rng,
    recent: VecDeque<u32>,
    counts: HashMap<u32, u32>,
    /// Scratch: (logit, id) candidates, reused every call.
    cand: Vec<(f32, u32)>,
}

impl Sampler {
    pub fn new(cfg: SamplerConfig) -> Result<Sampler> {
        cfg.validate()?;
        Ok(Sampler {
            rng: ChaCha8Rng::seed_from_u64(cfg.seed),
            cfg,
            recent: VecDeque::new(),
            counts: HashMap::new(),
            cand: Vec::new(),
        })
    }

    pub fn config(&self) -> &SamplerConfig {
        &self.cfg
    }

    /// Records a token that entered the model (prompt, generated or injected) for the penalties.
    pub fn accept(&mut self, id: u32) {
        if self.cfg.penalty_last_n == 0 {
            return;
        }
        self.recent.push_back(id);
        *self.counts.entry(id).or_insert(0) += 1;
        if self.recent.len() > self.cfg.penalty_last_n {
            // Cannot fail: the window is longer than penalty_last_n >= 1.
            let old = self.recent.pop_front().expect("non-empty");
            if let Some(c) = self.counts.get_mut(&old) {
                *c -= 1;
                if *c == 0 {
                    self.counts.remove(&old);
                }
            }
        }
    }

    /// Forgets the penalty window (a new conversation); the random stream continues.
    pub fn clear_history(&mut self) {
        self.recent.clear();
        self.counts.clear();
    }

    /// Picks the next token from `logits` (one per vocabulary id). A NaN or infinite logit is an
    /// error (`Data`): the model overflowed (broken weights or state), and no token is meaningful.
    pub fn sample(&mut self, logits: &[f32]) -> Result<u32> {
        self.pick(logits, None)
    }

    /// `sample` among the ids whose `mask` entry is true (constrained decoding, `constrain`): the
    /// others are dropped after the penalties, before everything else. A mask that keeps no id
    /// (or is shorter than the vocabulary) is ignored.
    pub fn sample_masked(&mut self, logits: &[f32], mask: &[bool]) -> Result<u32> {
        let usable = mask.len() >= logits.len() && mask[..logits.len()].iter().any(|&m| m);
        self.pick(logits, usable.then_some(mask))
    }

    fn pick(&mut self, logits: &[f32], mask: Option<&[bool]>) -> Result<u32> {
        assert!(!logits.is_empty(), "sampling from an empty vocabulary");
        if let Some((id, l)) = logits.iter().enumerate().find(|(_, l)| !l.is_finite()) {
            return Err(Error::data(format!(
                "the model produced a non-finite logit ({l} for token id {id}): its weights or \
                 its state (--state-in) hold values that overflow; check the checkpoint and the state file"
            )));
        }
        let cfg = &self.cfg;
        let cand = &mut self.cand;
        cand.clear();
        cand.extend(logits.iter().enumerate().map(|(i, &l)| (l, i as u32)));
        if cfg.penalties_on() {
            // Each id's logit depends only on its own count, so the map's order does not matter.
            for (&id, &count) in &self.counts {
                let Some(c) = cand.get_mut(id as usize) else {
                    continue;
                };
                let rp = cfg.repeat_penalty;
                c.0 = if c.0 > 0.0 { c.0 / rp } else { c.0 * rp };
                c.0 -= cfg.presence_penalty + cfg.frequency_penalty * count as f32;
            }
        }
        if let Some(mask) = mask {
            cand.retain(|c| mask[c.1 as usize]);
        }
        let inv_t = 1.0 / cfg.temperature;
        // A temperature so small that the largest logit divided by it overflows (e.g. 1e-38,
        // whose inverse is infinite) is the limit of sampling as temperature → 0: greedy.
        let top = cand.iter().fold(f32::NEG_INFINITY, |m, c| m.max(c.0));
        if cfg.temperature == 0.0 || !(top * inv_t).is_finite() {
            // Cannot fail (here and below): the candidates are the whole vocabulary (non-empty, asserted
            // above), and the filters always keep the most likely token.
            return Ok(cand
                .iter()
                .min_by(|a, b| by_logit_desc(a, b))
                .expect("non-empty")
                .1);
        }
        cand.iter_mut().for_each(|c| c.0 *= inv_t);

        // Truncation works on a prefix of `cand` sorted by `by_logit_desc`; `n` is its length.
        let mut n = cand.len();
        let mut sorted = false;
        if cfg.top_k > 0 && cfg.top_k < n {
            n = cfg.top_k;
            cand.select_nth_unstable_by(n - 1, by_logit_desc);
            cand.truncate(n);
            cand.sort_unstable_by(by_logit_desc);
            sorted = true;
        }
        let max = if sorted {
            cand[0].0
        } else {
            cand.iter().fold(f32::NEG_INFINITY, |m, c| m.max(c.0))
        };
        // Probabilities, unnormalised, replace the logits.
        let mut total = 0f64;
        for c in cand.iter_mut() {
            c.0 = (c.0 - max).exp();
            total += c.0 as f64;
        }
        if cfg.top_p < 1.0 {
            if !sorted {
                sort_prefix_until(cand, total, cfg.top_p as f64);
            }
            let mut acc = 0f64;
            let mut keep = cand.len();
            for (i, c) in cand.iter().enumerate() {
                acc += c.0 as f64;
                if acc >= cfg.top_p as f64 * total {
                    keep = i + 1;
                    break;
                }
            }
            cand.truncate(keep);
        }
        if cfg.min_p > 0.0 {
            // The largest probability is exp(0) = 1 before normalisation.
            let floor = cfg.min_p;
            cand.retain(|c| c.0 >= floor);
        }
        let kept: f64 = cand.iter().map(|c| c.0 as f64).sum();
        let u = self.rng.random::<f64>() * kept;
        let mut acc = 0f64;
        for c in cand.iter() {
            acc += c.0 as f64;
            if u < acc {
                return Ok(c.1);
            }
        }
        // Cannot fail: the most likely token survives every filter (min_p <= 1 is validated).
        Ok(cand.last().expect("the most likely token is always kept").1)
    }
}

/// Sorts the largest entries of `cand` (by probability in `.0`, then id) to the front, far enough
/// that they hold at least `p` of `total`; the rest is dropped. Selection of a growing prefix
/// instead of a full sort: the nucleus is usually a handful of tokens out of tens of thousands.
fn sort_prefix_until(cand: &mut Vec<(f32, u32)>, total: f64, p: f64) {
    let mut m = 64.min(cand.len());
    loop {
        if m < cand.len() {
            cand.select_nth_unstable_by(m - 1, by_logit_desc);
        }
        cand[..m].sort_unstable_by(by_logit_desc);
        let mass: f64 = cand[..m].iter().map(|c| c.0 as f64).sum();
        if mass >= p * total || m == cand.len() {
            cand.truncate(m);
            return;
        }
        m = (m * 4).min(cand.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sort_prefix_keeps_the_order_of_a_full_sort() {
        let mut v: Vec<(f32, u32)> = (0..1000u32)
            .map(|i| (((i * 7919) % 1000) as f32 / 1000.0, i))
            .collect();
        let mut full = v.clone();
        full.sort_unstable_by(by_logit_desc);
        let total: f64 = v.iter().map(|c| c.0 as f64).sum();
        sort_prefix_until(&mut v, total, 0.3);
        assert!(v.len() >= 64 && v.len() < 1000);
        assert_eq!(v[..], full[..v.len()]);
    }
}
