//! Choosing the next token from logits: greedy, or temperature with optional
//! top-k / top-p truncation, from a per-sample seeded generator so a sample is
//! reproducible from its seed alone.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::kernels::math;

/// How to pick tokens. `temperature == 0` is greedy.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    pub temperature: f32,
    pub top_k: Option<usize>,
    pub top_p: Option<f32>,
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_k: None,
            top_p: None,
        }
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0 || self.top_k == Some(1)
    }

    /// The temperature the behaviour log-probs are taken at (1 when greedy).
    pub fn logprob_temperature(&self) -> f32 {
        if self.temperature > 0.0 {
            self.temperature
        } else {
            1.0
        }
    }
}

#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// `exp((logit - max) / temperature)` of the current row, reused
    /// across steps.
    weights: Vec<f32>,
}

impl Sampler {
    pub fn new(params: SamplingParams, seed: u64) -> Self {
        Self {
            params,
            rng: StdRng::seed_from_u64(seed),
            weights: Vec::new(),
        }
    }

    /// Picks a token from one row of logits.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.params.is_greedy() {
            return argmax(logits);
        }
        let t = self.params.temperature;
        let max = max_of(logits);
        self.weights.clear();
        self.weights.resize(logits.len(), 0.0);
        math::vectorized(|| {
            for (w, &l) in self.weights.iter_mut().zip(logits) {
                let p = math::exp((l - max) / t);
                // NaN logits take no part.
                *w = if p.is_finite() { p } else { 0.0 };
            }
        });
        let truncate = self.params.top_k.is_some_and(|k| k < logits.len())
            || self.params.top_p.is_some_and(|p| p < 1.0);
        if !truncate {
            let total = math::vectorized(|| sum_f64(&self.weights)) as f32;
            if total.is_nan() || total <= 0.0 {
                return argmax(logits);
            }
            return draw(
                self.weights.iter().enumerate().map(|(i, &p)| (i as u32, p)),
                self.rng.random::<f32>() * total,
            )
            .unwrap_or(logits.len() as u32 - 1);
        }
        let mut candidates: Vec<(u32, f32)> = self
            .weights
            .iter()
            .enumerate()
            .filter(|(_, &p)| p > 0.0)
            .map(|(i, &p)| (i as u32, p))
            .collect();
        candidates.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if let Some(k) = self.params.top_k {
            candidates.truncate(k.max(1));
        }
        if let Some(p) = self.params.top_p {
            let total: f32 = candidates.iter().map(|c| c.1).sum();
            let mut cumulative = 0.0;
            let keep = candidates
                .iter()
                .position(|c| {
                    cumulative += c.1 / total;
                    cumulative >= p
                })
                .map_or(candidates.len(), |i| i + 1);
            candidates.truncate(keep);
        }
        let total: f32 = candidates.iter().map(|c| c.1).sum();
        if candidates.is_empty() || total.is_nan() || total <= 0.0 {
            return argmax(logits);
        }
        let last = candidates[candidates.len() - 1].0;
        draw(candidates.into_iter(), self.rng.random::<f32>() * total).unwrap_or(last)
    }
}

/// The first candidate whose weight covers `r`, walking the cumulative sum.
fn draw(candidates: impl Iterator<Item = (u32, f32)>, mut r: f32) -> Option<u32> {
    for (id, p) in candidates {
        if r < p {
            return Some(id);
        }
        r -= p;
    }
    None
}

pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

fn max_of(x: &[f32]) -> f32 {
    x.iter().copied().fold(f32::NEG_INFINITY, f32::max)
}

/// Sum in f64, over independent lanes so that it vectorises.
fn sum_f64(x: &[f32]) -> f64 {
    let mut lanes = [0f64; 8];
    let chunks = x.chunks_exact(8);
    let rest: f64 = chunks.remainder().iter().map(|&v| v as f64).sum();
    for chunk in chunks {
        for (l, &v) in lanes.iter_mut().zip(chunk) {
            *l += v as f64;
        }
    }
    lanes.iter().sum::<f64>() + rest
}

/// `log softmax(logits / temperature)[token]`, as `logit - logsumexp`
/// (the exponentials in f32, their sum in f64).
pub fn token_logprob(logits: &[f32], token: u32, temperature: f32) -> f32 {
    let max = max_of(logits) / temperature;
    let sum = math::vectorized(|| {
        let mut lanes = [0f64; 8];
        let chunks = logits.chunks_exact(8);
        let rest: f64 = chunks
            .remainder()
            .iter()
            .map(|&l| math::exp(l / temperature - max) as f64)
            .sum();
        for chunk in chunks {
            for (acc, &l) in lanes.iter_mut().zip(chunk) {
                *acc += math::exp(l / temperature - max) as f64;
            }
        }
        lanes.iter().sum::<f64>() + rest
    });
    ((logits[token as usize] / temperature - max) as f64 - sum.ln()) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_picks_the_maximum_and_first_on_ties() {
        let mut s = Sampler::new(SamplingParams::greedy(), 0);
        assert_eq!(s.sample(&[0.1, 2.0, -1.0, 2.0]), 1);
    }

    #[test]
    fn same_seed_same_tokens_and_top_k_restricts() {
        let params = SamplingParams {
            temperature: 1.0,
            top_k: Some(2),
            top_p: None,
        };
        let logits = [1.0, 3.0, 2.9, 0.5, 0.4];
        let a: Vec<u32> = {
            let mut s = Sampler::new(params, 7);
            (0..50).map(|_| s.sample(&logits)).collect()
        };
        let b: Vec<u32> = {
            let mut s = Sampler::new(params, 7);
            (0..50).map(|_| s.sample(&logits)).collect()
        };
        assert_eq!(a, b);
        assert!(a.iter().all(|&t| t == 1 || t == 2));
        assert!(a.contains(&1) && a.contains(&2));
    }

    #[test]
    fn top_p_keeps_the_smallest_set_reaching_p() {
        let params = SamplingParams {
            temperature: 1.0,
            top_k: None,
            top_p: Some(0.5),
        };
        // Token 0 alone holds ~0.84 of the mass.
        let logits = [4.0, 2.0, 1.0, 0.0];
        let mut s = Sampler::new(params, 3);
        assert!((0..100).all(|_| s.sample(&logits) == 0));
    }

    #[test]
    fn untruncated_sampling_follows_the_softmax() {
        let params = SamplingParams {
            temperature: 0.7,
            top_k: None,
            top_p: None,
        };
        let logits = [0.5f32, 1.5, -0.3, 1.0, f32::NAN];
        let z: f64 = logits[..4].iter().map(|&l| (l as f64 / 0.7).exp()).sum();
        let mut s = Sampler::new(params, 11);
        let mut counts = [0usize; 5];
        let n = 40_000;
        for _ in 0..n {
            counts[s.sample(&logits) as usize] += 1;
        }
        assert_eq!(counts[4], 0, "a NaN logit is never drawn");
        for (i, &l) in logits[..4].iter().enumerate() {
            let want = (l as f64 / 0.7).exp() / z;
            let got = counts[i] as f64 / n as f64;
            assert!((got - want).abs() < 0.01, "token {i}: {got} vs {want}");
        }
    }

    #[test]
    fn logprob_is_exact_to_float_precision_over_a_large_vocabulary() {
        let logits: Vec<f32> = (0..102_400u32)
            .map(|i| ((i.wrapping_mul(2_654_435_761) % 20_000) as f32 / 1000.0) - 10.0)
            .collect();
        for (token, t) in [(0u32, 1.0f32), (77_777, 0.7), (102_399, 1.3)] {
            let scaled: Vec<f64> = logits.iter().map(|&l| l as f64 / t as f64).collect();
            let max = scaled.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let lse = max + scaled.iter().map(|v| (v - max).exp()).sum::<f64>().ln();
            let want = scaled[token as usize] - lse;
            assert!((token_logprob(&logits, token, t) as f64 - want).abs() < 1e-5);
        }
    }

    #[test]
    fn logprob_matches_a_direct_softmax() {
        let logits = [1.0f32, 2.0, 3.0];
        let z: f64 = logits.iter().map(|&l| ((l / 0.5) as f64).exp()).sum();
        let expected = ((2.0f64 / 0.5).exp() / z).ln();
        assert!((token_logprob(&logits, 1, 0.5) as f64 - expected).abs() < 1e-6);
    }
}
