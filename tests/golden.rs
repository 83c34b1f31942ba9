//! The model against the golden vectors (tests/golden/README.md): whole-sequence and
//! token-by-token logits, final states, and the continuation from the state, max-abs ≤ 1e-4.

use crate::common::*;
use candle_core::{Device, Tensor};
use tinybit::checkpoint;
use tinybit::model::{Rwkv7, State};

const TOL: f32 = 1e-4;

fn check_state(file: &str, got: &State, bytes: &[u8]) {
    for (i, l) in got.layers.iter().enumerate() {
        for (field, t) in [
            ("att_shift", &l.att_shift),
            ("wkv", &l.wkv),
            ("ffn_shift", &l.ffn_shift),
        ] {
            let want = read_tensor(bytes, &format!("golden.state.{i}.{field}"));
            let d = max_abs_diff(&t.squeeze(0).unwrap(), &want);
            assert!(d <= TOL, "{file}: state.{i}.{field} differs by {d}");
        }
    }
}

#[test]
fn golden_parity() {
    let files = golden_model_files();
    assert!(
        !files.is_empty(),
        "no golden file with golden.logits in {}",
        golden_dir().display()
    );
    for path in files {
        let file = path.display().to_string();
        let bytes = std::fs::read(&path).unwrap();
        let ck = checkpoint::load(&path, &Device::Cpu).unwrap();
        let model = Rwkv7::from_params(&ck.meta.config, &ck.params).unwrap();
        let tokens = tokens_of(&read_tensor(&bytes, "golden.tokens"));
        let want = read_tensor(&bytes, "golden.logits");

        // Whole sequence from a zero state.
        let input = Tensor::from_slice(&tokens, (1, tokens.len()), &Device::Cpu).unwrap();
        let (logits, state) = model.forward(&input, None).unwrap();
        let d = max_abs_diff(&logits.squeeze(0).unwrap(), &want);
        assert!(d <= TOL, "{file}: whole-sequence logits differ by {d}");
        check_state(&file, &state, &bytes);

        // Token by token.
        let want_rnn = read_tensor(&bytes, "golden.logits_rnn");
        let mut st = model.zero_state(1).unwrap();
        let steps: Vec<Tensor> = tokens
            .iter()
            .map(|&t| model.step(&[t], &mut st).unwrap())
            .collect();
        let d = max_abs_diff(&Tensor::cat(&steps, 0).unwrap(), &want_rnn);
        assert!(d <= TOL, "{file}: token-by-token logits differ by {d}");
        check_state(&file, &st, &bytes);

        // Continuation from the state, as one chunk.
        let tokens2 = tokens_of(&read_tensor(&bytes, "golden.tokens2"));
        let input2 = Tensor::from_slice(&tokens2, (1, tokens2.len()), &Device::Cpu).unwrap();
        let (logits2, _) = model.forward(&input2, Some(&state)).unwrap();
        let d = max_abs_diff(
            &logits2.squeeze(0).unwrap(),
            &read_tensor(&bytes, "golden.logits2"),
        );
        assert!(d <= TOL, "{file}: continuation logits differ by {d}");
        eprintln!("golden_parity: {file} ok");
    }
}
