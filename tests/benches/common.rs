//! What the benchmarks share.

use rand::{Rng, SeedableRng};
use tinybit::config::ModelConfig;
use tinybit::data::Batch;
use tinybit::model::params::param_specs;

/// Elements of the matrices the forward multiplies by (the head counted once, even when tied;
/// not the embedding lookup): 2 FLOP per element and token forward, twice that backward.
pub fn matmul_params(cfg: &ModelConfig) -> f64 {
    param_specs(cfg)
        .iter()
        .filter(|s| s.shape.len() == 2 && !s.name.ends_with("r_k"))
        .filter(|s| s.name != "emb.weight" || cfg.tie_embeddings)
        .map(|s| s.shape.iter().product::<usize>() as f64)
        .sum()
}

/// `batch` rows of `ctx` + 1 uniformly random tokens (seeded), every target counted.
pub fn random_batch(cfg: &ModelConfig, batch: usize, ctx: usize) -> Batch {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    let rows: Vec<(Vec<u32>, Vec<bool>)> = (0..batch)
        .map(|_| {
            let ids = (0..=ctx)
                .map(|_| rng.random_range(0..cfg.vocab_size as u32))
                .collect();
            (ids, vec![true; ctx + 1])
        })
        .collect();
    tinybit::data::pack(&rows, ctx)
}
