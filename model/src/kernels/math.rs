//! Scalar functions written so that loops over slices vectorise: no
//! branches, no libm calls. Accuracy is that of f32 arithmetic (relative
//! error about 1e-7 for `exp`, absolute 1.5e-7 for `erf`).

use rayon::prelude::*;

/// Runs `f` compiled for the widest vector instructions this CPU has
/// (AVX2 and FMA on most x86-64), chosen at run time: the loops inside
/// are inlined into a copy built for them.
#[inline(always)]
pub fn vectorized<R>(f: impl FnOnce() -> R) -> R {
    pulp::Arch::new().dispatch(f)
}

/// Elements per parallel task of the elementwise kernels.
const CHUNK: usize = 1 << 14;

/// `exp(x)` by Cody-Waite range reduction and Cephes' polynomial.
/// Saturates to 0 below -87 and to about 1.6e38 above 88.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    // n = round(x / ln 2) from the low mantissa bits of a sum with
    // 1.5 * 2^23: no float-to-int conversion, whose saturation stops
    // loops from vectorising.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let shifted = x * std::f32::consts::LOG2_E + ROUND;
    let n = shifted - ROUND;
    let k = shifted.to_bits().wrapping_sub(ROUND.to_bits());
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let p = 1.987_569_1e-4_f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 0.166_666_65;
    let p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    y * f32::from_bits(k.wrapping_add(127) << 23)
}

/// `erf(x)`, Abramowitz and Stegun 7.1.26.
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_74 + t * (1.421_413_8 + t * (-1.453_152_1 + t * 1.061_405_4))));
    let y = 1.0 - poly * exp(-a * a);
    y.copysign(x)
}

/// GELU with the exact (erf) form, as PyTorch's default `nn.GELU`.
#[inline(always)]
pub fn gelu_erf(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// `x * sigmoid(x)`.
#[inline(always)]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}

/// `out[i] = f(x[i])`, in parallel chunks.
pub fn map(x: &[f32], f: impl Fn(f32) -> f32 + Sync) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(o, x)| vectorized(|| o.iter_mut().zip(x).for_each(|(o, &x)| *o = f(x))));
    out
}

/// `out[i] = f(a[i], b[i])`, in parallel chunks.
pub fn map2(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32 + Sync) -> Vec<f32> {
    let mut out = vec![0f32; a.len()];
    out.par_chunks_mut(CHUNK)
        .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
        .for_each(|(o, (a, b))| {
            vectorized(|| {
                o.iter_mut()
                    .zip(a.iter().zip(b))
                    .for_each(|(o, (&a, &b))| *o = f(a, b))
            })
        });
    out
}

/// Lanes of the reductions: independent accumulators, so that the loops
/// vectorise (a single running sum fixes the order of additions).
const LANES: usize = 8;

fn reduce(x: &[f32], init: f32, op: impl Fn(f32, f32) -> f32) -> f32 {
    let mut lanes = [init; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (l, &v) in lanes.iter_mut().zip(chunk) {
            *l = op(*l, v);
        }
    }
    let acc = rest.iter().fold(init, |a, &v| op(a, v));
    lanes.into_iter().fold(acc, op)
}

/// Softmax of `row` in place.
#[inline]
pub fn softmax_in_place(row: &mut [f32]) {
    let max = reduce(row, f32::NEG_INFINITY, f32::max);
    row.iter_mut().for_each(|v| *v = exp(*v - max));
    let inv = 1.0 / reduce(row, 0.0, |a, b| a + b);
    row.iter_mut().for_each(|v| *v *= inv);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The largest relative error of `f` against `reference` over a grid.
    fn worst(f: impl Fn(f32) -> f32, reference: impl Fn(f64) -> f64, lo: f32, hi: f32) -> f64 {
        (0..=20_000)
            .map(|i| lo + (hi - lo) * i as f32 / 20_000.0)
            .map(|x| {
                let want = reference(x as f64);
                (f(x) as f64 - want).abs() / want.abs().max(1e-30)
            })
            .fold(0.0, f64::max)
    }

    #[test]
    fn exp_is_accurate_to_float_precision_and_saturates() {
        assert!(worst(exp, f64::exp, -80.0, 80.0) < 3e-7);
        assert_eq!(exp(-1e9), exp(-87.0));
        assert!(exp(-1e9) < 1e-37);
        assert!(exp(1e9).is_finite());
        assert_eq!(exp(0.0), 1.0);
    }

    #[test]
    fn gelu_and_silu_match_their_definitions() {
        // erf from the series, accurate to f64 on this range.
        let erf64 = |x: f64| {
            let (mut term, mut sum) = (x, x);
            for n in 1..200 {
                term *= -x * x / n as f64;
                sum += term / (2 * n + 1) as f64;
            }
            sum * 2.0 / std::f64::consts::PI.sqrt()
        };
        for i in -4000..=4000 {
            let x = i as f32 / 1000.0;
            let want = 0.5 * x as f64 * (1.0 + erf64(x as f64 / 2f64.sqrt()));
            assert!((gelu_erf(x) as f64 - want).abs() < 1e-6, "gelu({x})");
            let want = x as f64 / (1.0 + (-x as f64).exp());
            assert!((silu(x) as f64 - want).abs() < 1e-6, "silu({x})");
        }
        assert_eq!(gelu_erf(-20.0), 0.0);
        assert_eq!(gelu_erf(20.0), 20.0);
    }

    #[test]
    fn softmax_of_masked_scores_is_finite_and_sums_to_one() {
        let mut row = vec![1.0, -1e9, 3.0, 2.0];
        softmax_in_place(&mut row);
        assert!(row[1] < 1e-30, "a masked score weighs {}", row[1]);
        assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        let e = [1f64.exp(), 0.0, 3f64.exp(), 2f64.exp()];
        let z: f64 = e.iter().sum();
        for (got, want) in row.iter().zip(e) {
            assert!((*got as f64 - want / z).abs() < 1e-7);
        }
    }
}
