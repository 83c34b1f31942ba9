//! The engine's product kernels (`engine::gemv`, `engine::ternary`): every SIMD kernel this CPU
//! runs against the portable twin, and both against a sum in f64.

use candle_core::{Device, Tensor};
use std::sync::Arc;
use tinybit::engine::ternary::{self, GROUP, QuantActs};
use tinybit::engine::{Input, Kernel, Matrix, WeightDtype};
use tinybit::model::linear::quantize_act_8bit;

fn lcg(seed: &mut u64) -> f32 {
    *seed = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    ((*seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
}

fn trits(n: usize, seed: &mut u64) -> Vec<i8> {
    (0..n)
        .map(|_| (lcg(seed) * 3.0).round().clamp(-1.0, 1.0) as i8)
        .collect()
}

/// `y = [t, rows]` of a matrix times `t` token rows.
fn product(m: &Matrix, kernel: Kernel, x: Input, t: usize) -> Vec<f32> {
    let mut y = vec![f32::NAN; t * m.rows()];
    // SAFETY: y holds t·rows outputs and is ours alone.
    unsafe { m.rows_into(kernel, 0, m.rows(), x, t, y.as_mut_ptr(), m.rows()) };
    y
}

#[test]
fn borrowed_bytes_must_be_aligned_and_sized() {
    let words: Vec<u32> = (0..17).map(|i| (i as f32).to_bits()).collect();
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    let keep = Arc::new(());
    // The Vec<u8> may sit anywhere; find an aligned and a misaligned start inside it.
    let off = (4 - bytes.as_ptr() as usize % 4) % 4;
    let aligned = &bytes[off..off + 12];
    let m = unsafe { Matrix::borrowed(3, 1, WeightDtype::F32, aligned, keep.clone()) };
    assert!(m.is_some() || cfg!(target_endian = "big"));
    let odd = &bytes[off + 1..off + 13];
    assert!(unsafe { Matrix::borrowed(3, 1, WeightDtype::F32, odd, keep.clone()) }.is_none());
    assert!(unsafe { Matrix::borrowed(2, 1, WeightDtype::F32, aligned, keep) }.is_none());
}

/// Every float dtype (and the 8-bit rows of the head), odd shapes (tails of 1..7 columns, token
/// tiles of 8, 4 and 1, two-row tiles of 6 with remainders 1..5): each kernel this CPU runs, the
/// portable twin included, against an f64 sum of the stored values.
#[test]
fn float_kernels_agree_with_the_portable_twin() {
    let mut seed = 1u64;
    for dtype in [
        WeightDtype::F32,
        WeightDtype::F16,
        WeightDtype::BF16,
        WeightDtype::Q8,
    ] {
        for (rows, cols, t) in [
            (5, 3, 1),
            (37, 69, 1),
            (64, 384, 1),
            (17, 101, 13),
            (9, 40, 8),
            (6, 33, 9),
            (7, 50, 10),
            (4, 16, 11),
        ] {
            let w: Vec<f32> = (0..rows * cols).map(|_| lcg(&mut seed)).collect();
            let m = Matrix::from_f32_as(rows, cols, w, dtype);
            let wq = m.to_f32_vec();
            let x: Vec<f32> = (0..t * cols).map(|_| lcg(&mut seed)).collect();
            for kernel in Kernel::available() {
                let y = product(&m, kernel, Input::F32(&x), t);
                for i in 0..t {
                    for r in 0..rows {
                        let want: f64 = (0..cols)
                            .map(|c| wq[r * cols + c] as f64 * x[i * cols + c] as f64)
                            .sum();
                        let d = (y[i * rows + r] as f64 - want).abs();
                        assert!(d < 1e-5, "{kernel:?} {dtype:?} {rows}x{cols} t={t}: {d}");
                    }
                }
            }
        }
    }
}

/// The 2-bit layout holds every trit, for widths below, at and across the 128-column groups.
#[test]
fn ternary_packing_round_trips() {
    let mut seed = 7u64;
    for cols in [1, 5, 31, 127, 128, 129, 384, 1344] {
        let rows = 3;
        let t = trits(rows * cols, &mut seed);
        let packed = ternary::pack(&t, rows, cols);
        let kp = ternary::padded(cols);
        assert_eq!(kp % GROUP, 0);
        assert_eq!(packed.len(), rows * kp / 4);
        for r in 0..rows {
            let row = &packed[r * kp / 4..(r + 1) * kp / 4];
            for c in 0..kp {
                let want = if c < cols { t[r * cols + c] } else { 0 };
                assert_eq!(ternary::trit(row, c), want, "cols {cols} row {r} col {c}");
            }
        }
        let m = Matrix::from_trits(rows, cols, &t, 0.25);
        assert_eq!(m.dtype(), WeightDtype::Ternary);
        let back = m.to_f32_vec();
        assert!(back.iter().zip(&t).all(|(b, &t)| *b == t as f32 * 0.25));
    }
}

/// The 8-bit codes are BitLinear's own: `s·q` equals candle's `quantize_act_8bit`, bit for bit.
#[test]
fn activation_codes_are_the_models_quantiser() {
    let mut seed = 3u64;
    let (t, cols) = (5, 200);
    let mut x: Vec<f32> = (0..t * cols).map(|_| 4.0 * lcg(&mut seed)).collect();
    x[cols..2 * cols].fill(0.0); // an all-zero token: the 1e-5 floor on absmax
    let mut q = QuantActs::default();
    q.quantize(&x, cols);
    let want = quantize_act_8bit(&Tensor::from_slice(&x, (t, cols), &Device::Cpu).unwrap())
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    for (i, w) in want.iter().enumerate() {
        assert_eq!(&q.dequantized(i), w, "token {i}");
    }
    // A diverged input stays visible: NaN out, not zeros.
    x[3] = f32::NAN;
    q.quantize(&x, cols);
    let m = Matrix::from_trits(2, cols, &vec![1; 2 * cols], 0.5);
    let y = product(&m, Kernel::detect(), Input::Q8(&q), t);
    assert!(y[0].is_nan() && y[1].is_nan() && y[2].is_finite(), "{y:?}");
}

/// Ternary products: every kernel gives the portable twin's result bit for bit (they compute the
/// same integer), at token counts that use the 4-token tiles and the tails; and the result is the
/// f32 product of the dequantised operands within f32 rounding, and the product with the
/// unquantised input within the stated quantisation bound `γ·(s/2)·Σ|t|`.
#[test]
fn ternary_kernels_are_exact_and_within_the_bound() {
    let mut seed = 11u64;
    for (rows, cols, t) in [
        (7, 1, 1),
        (33, 127, 3),
        (64, 384, 1),
        (19, 384, 9),
        (5, 1344, 4),
    ] {
        let tr = trits(rows * cols, &mut seed);
        let gamma = 0.037;
        let m = Matrix::from_trits(rows, cols, &tr, gamma);
        let x: Vec<f32> = (0..t * cols).map(|_| lcg(&mut seed)).collect();
        let mut q = QuantActs::default();
        q.quantize(&x, cols);
        let reference = product(&m, Kernel::Portable, Input::Q8(&q), t);
        for kernel in Kernel::available() {
            let y = product(&m, kernel, Input::Q8(&q), t);
            assert!(
                y.iter()
                    .zip(&reference)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{kernel:?} differs from the portable kernel ({rows}x{cols}, t={t})"
            );
        }
        for i in 0..t {
            let xd = q.dequantized(i);
            let xi = &x[i * cols..(i + 1) * cols];
            let amax = xi.iter().fold(0f32, |a, v| a.max(v.abs())) as f64;
            for r in 0..rows {
                let w = &tr[r * cols..(r + 1) * cols];
                let deq: f64 = w.iter().zip(&xd).map(|(&t, &v)| t as f64 * v as f64).sum();
                let abs: f64 = w
                    .iter()
                    .zip(&xd)
                    .map(|(&t, &v)| (t as f64 * v as f64).abs())
                    .sum();
                let got = reference[i * rows + r] as f64;
                let d = (got - gamma as f64 * deq).abs();
                assert!(d <= 1e-6 * gamma as f64 * abs + 1e-9, "dequantised: {d}");
                let exact: f64 = w.iter().zip(xi).map(|(&t, &v)| t as f64 * v as f64).sum();
                let nonzero = w.iter().filter(|&&t| t != 0).count() as f64;
                let bound = gamma as f64 * (amax / 127.0 / 2.0) * nonzero * (1.0 + 1e-5);
                let d = (got - gamma as f64 * exact).abs();
                assert!(d <= bound + 1e-7, "unquantised: {d} > {bound}");
            }
        }
    }
}

/// Matrices moved onto huge pages (as the engine's loader does on Linux) keep every element and
/// their products: each dtype, odd sizes, one region for all.
#[cfg(target_os = "linux")]
#[test]
fn matrices_moved_to_huge_pages_keep_their_values() {
    let mut seed = 5u64;
    let mut ms: Vec<Matrix> = [
        WeightDtype::F32,
        WeightDtype::F16,
        WeightDtype::BF16,
        WeightDtype::Q8,
    ]
    .into_iter()
    .map(|d| Matrix::from_f32_as(9, 37, (0..9 * 37).map(|_| lcg(&mut seed)).collect(), d))
    .collect();
    ms.push(Matrix::from_trits(7, 130, &trits(7 * 130, &mut seed), 0.5));
    let before: Vec<Vec<f32>> = ms.iter().map(Matrix::to_f32_vec).collect();
    let len = Matrix::move_to_huge_pages(&mut ms.iter_mut().collect::<Vec<_>>()).unwrap();
    // Where the kernel refuses huge pages nothing moves; either way nothing changes.
    assert!(len == 0 || len >= ms.iter().map(Matrix::bytes).sum::<usize>() - 4 * 9);
    for (m, want) in ms.iter().zip(&before) {
        assert_eq!(&m.to_f32_vec(), want, "{:?}", m.dtype());
    }
}

/// A kernel this CPU lacks falls back to the portable one; the detected one is supported.
#[test]
fn kernel_detection_is_consistent() {
    let best = Kernel::detect();
    assert!(best.supported());
    assert!(Kernel::available().contains(&best));
    assert!(Kernel::available().contains(&Kernel::Portable));
    for k in Kernel::ALL {
        assert_eq!(k.or_portable() == k, k.supported());
    }
}
