//! Choosing the next token from logits: greedy, or temperature with optional
//! top-k / top-p truncation, from a per-sample seeded generator so a sample is
//! reproducible from its seed alone.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

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
}

impl Sampler {
    pub fn new(params: SamplingParams, seed: u64) -> Self {
        Self {
            params,
            rng: StdRng::seed_from_u64(seed),
        }
    }

    /// Picks a token from one row of logits.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.params.is_greedy() {
            return argmax(logits);
        }
        let t = self.params.temperature;
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut candidates: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, ((l - max) / t).exp()))
            .filter(|(_, p)| p.is_finite())
            .collect();
        let truncate = self.params.top_k.is_some_and(|k| k < candidates.len())
            || self.params.top_p.is_some_and(|p| p < 1.0);
        if truncate {
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
        }
        let total: f32 = candidates.iter().map(|c| c.1).sum();
        if candidates.is_empty() || total.is_nan() || total <= 0.0 {
            return argmax(logits);
        }
        let mut r = self.rng.random::<f32>() * total;
        for &(id, p) in &candidates {
            if r < p {
                return id;
            }
            r -= p;
        }
        candidates[candidates.len() - 1].0
    }
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

/// `log softmax(logits / temperature)[token]`, as `logit - logsumexp`.
pub fn token_logprob(logits: &[f32], token: u32, temperature: f32) -> f32 {
    let scaled = |l: f32| (l / temperature) as f64;
    let max = logits
        .iter()
        .map(|&l| scaled(l))
        .fold(f64::NEG_INFINITY, f64::max);
    let sum: f64 = logits.iter().map(|&l| (scaled(l) - max).exp()).sum();
    (scaled(logits[token as usize]) - max - sum.ln()) as f32
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
    fn logprob_matches_a_direct_softmax() {
        let logits = [1.0f32, 2.0, 3.0];
        let z: f64 = logits.iter().map(|&l| ((l / 0.5) as f64).exp()).sum();
        let expected = ((2.0f64 / 0.5).exp() / z).ln();
        assert!((token_logprob(&logits, 1, 0.5) as f64 - expected).abs() < 1e-6);
    }
}
