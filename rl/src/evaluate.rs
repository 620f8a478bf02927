//! Off-policy evaluation of a policy on held-out served groups: no new
//! samples are drawn. Each group's samples were drawn by a behaviour policy
//! whose log-probs are stored, so the expected score under another policy is
//! the self-normalised importance-sampling estimate
//! `sum_i w_i s_i / sum_i w_i`, `w_i = exp(log pi(y_i) - log mu(y_i))`.
//! The KL to the base is the k3 estimator of the GRPO loss, token mean per
//! sample, mean over samples.

use serde::{Deserialize, Serialize};

use crate::trainer::{ServedGroup, Trainer};
use crate::RlError;
use ulm_model::Janus;

/// How one policy scores on the evaluation set.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PolicyScore {
    /// Estimated mean score of its samples.
    pub reward: f64,
    /// Estimated KL divergence to the base model per token.
    pub kl_to_base: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    pub groups: usize,
    pub samples: usize,
    /// Plain mean of the stored scores (what the behaviour policies got).
    pub behaviour_reward: f64,
    pub active: PolicyScore,
    pub candidate: PolicyScore,
}

/// Self-normalised importance-sampling estimate of one group's mean score.
/// `log_ratios[i] = log pi(y_i) - log mu(y_i)` summed over the sample's tokens.
pub fn snis_mean(scores: &[f32], log_ratios: &[f64]) -> f64 {
    let max = log_ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if !max.is_finite() {
        return scores.iter().map(|&s| s as f64).sum::<f64>() / scores.len().max(1) as f64;
    }
    let weights: Vec<f64> = log_ratios.iter().map(|l| (l - max).exp()).collect();
    let total: f64 = weights.iter().sum();
    weights
        .iter()
        .zip(scores)
        .map(|(w, &s)| w * s as f64)
        .sum::<f64>()
        / total
}

/// Token mean of the k3 estimator `exp(r - p) - (r - p) - 1` for one sample.
pub fn k3_token_mean(policy: &[f32], reference: &[f32]) -> f64 {
    let n = policy.len().min(reference.len());
    if n == 0 {
        return 0.0;
    }
    policy
        .iter()
        .zip(reference)
        .map(|(&p, &r)| {
            let d = (r - p) as f64;
            d.exp() - d - 1.0
        })
        .sum::<f64>()
        / n as f64
}

fn score_policy(groups: &[ServedGroup], logps: &[Vec<f32>], reference: &[Vec<f32>]) -> PolicyScore {
    let mut row = 0;
    let mut reward = 0.0;
    let mut kl = 0.0;
    for g in groups {
        let ratios: Vec<f64> = g
            .samples
            .iter()
            .zip(&logps[row..row + g.samples.len()])
            .map(|(s, lp)| {
                lp.iter()
                    .zip(&s.logprobs)
                    .map(|(&p, &b)| (p - b) as f64)
                    .sum()
            })
            .collect();
        let scores: Vec<f32> = g.samples.iter().map(|s| s.score).collect();
        reward += snis_mean(&scores, &ratios);
        for k in row..row + g.samples.len() {
            kl += k3_token_mean(&logps[k], &reference[k]);
        }
        row += g.samples.len();
    }
    PolicyScore {
        reward: reward / groups.len().max(1) as f64,
        kl_to_base: kl / row.max(1) as f64,
    }
}

/// Scores the trainer's current policy (the candidate) and `active` on `groups`.
pub fn evaluate(
    trainer: &Trainer,
    active: &Janus,
    groups: &[ServedGroup],
) -> Result<Evaluation, RlError> {
    let served = trainer.prepare_served(groups)?;
    let candidate = trainer.served_logps(&trainer.bundle.model, &served)?;
    let current = trainer.served_logps(active, &served)?;
    let reference = trainer.served_reference_logps(&served)?;
    let samples: usize = groups.iter().map(|g| g.samples.len()).sum();
    let behaviour_reward = groups
        .iter()
        .flat_map(|g| g.samples.iter().map(|s| s.score as f64))
        .sum::<f64>()
        / samples.max(1) as f64;
    Ok(Evaluation {
        groups: groups.len(),
        samples,
        behaviour_reward,
        active: score_policy(groups, &current, &reference),
        candidate: score_policy(groups, &candidate, &reference),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snis_weights_by_likelihood_ratio() {
        // Equal ratios: the plain mean.
        assert!((snis_mean(&[1.0, 0.0], &[0.3, 0.3]) - 0.5).abs() < 1e-12);
        // The first sample twice as likely under the policy: weights 2:1.
        let est = snis_mean(&[1.0, 0.0], &[2f64.ln(), 0.0]);
        assert!((est - 2.0 / 3.0).abs() < 1e-12);
        // Huge log-ratios stay finite.
        assert!((snis_mean(&[1.0, 0.0], &[1e4, 0.0]) - 1.0).abs() < 1e-12);
    }

    #[test]
    fn k3_is_zero_at_equality_and_positive_otherwise() {
        assert_eq!(k3_token_mean(&[-1.0, -2.0], &[-1.0, -2.0]), 0.0);
        let d: f64 = 0.5;
        let expected = d.exp() - d - 1.0;
        assert!((k3_token_mean(&[-1.5], &[-1.0]) - expected).abs() < 1e-6);
        assert!(k3_token_mean(&[-1.0], &[-1.5]) > 0.0);
    }
}
