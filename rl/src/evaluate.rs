//! Off-policy evaluation of a policy on held-out served groups: no new
//! samples are drawn. Each group's samples were drawn by a behaviour policy
//! whose log-probs are stored, so the expected score under another policy is
//! the self-normalised importance-sampling estimate
//! `sum_i w_i s_i / sum_i w_i`, `w_i = exp(log pi(y_i) - log mu(y_i))`.
//! The KL to the base is the k3 estimator of the GRPO loss, token mean per
//! sample, weighed within each group as the score is, mean over groups.

use serde::{Deserialize, Serialize};

use crate::reward::RewardTask;
use crate::trainer::{ServedGroup, ServedSample, Trainer};
use crate::RlError;
use ulm_model::Janus;

/// How one policy scores on the evaluation set.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PolicyScore {
    /// Estimated mean score of its samples.
    pub reward: f64,
    /// Estimated KL divergence of its conditional policy to the base's,
    /// per token, under its own samples (weighed as the reward is).
    pub kl_to_base: f64,
    /// How many equally weighted samples the estimate is worth: the sum
    /// over groups of `(sum w)^2 / sum w^2`. Equal to the samples when the
    /// policy is the one that drew them; near one per group when each
    /// group's weight sits on one sample.
    pub effective_samples: f64,
    /// The evidence left in the weights, from 1 (equal weights) to 0 (each
    /// group's weight on one sample, which then only says how that one
    /// sample scored): effective samples beyond one per group over samples
    /// beyond one per group, taken per task, the least of the tasks held
    /// out. Images whose weights collapsed are not outvoted by answers.
    pub effective_share: f64,
    /// The estimated mean score per task held out: a candidate better at
    /// answers but worse at images is not better.
    pub by_task: TaskRewards,
}

/// A policy's estimated mean score on each task's held-out groups; `None`
/// for a task with none.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct TaskRewards {
    pub understanding: Option<f64>,
    pub generation: Option<f64>,
}

impl TaskRewards {
    /// Each task's name and estimate, in a fixed order.
    pub fn each(&self) -> [(&'static str, Option<f64>); 2] {
        [
            ("understanding", self.understanding),
            ("generation", self.generation),
        ]
    }
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

/// One group's self-normalised importance-sampling estimate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GroupEstimate {
    pub mean: f64,
    /// `(sum w)^2 / sum w^2`: from 1 (one sample holds the weight) to the
    /// group's size (equal weights); 0 when no weight is defined.
    pub effective_samples: f64,
}

/// Self-normalised importance weights (summing to 1) from
/// `log_ratios[i] = log pi(y_i) - log mu(y_i)`; `None` without one finite
/// ratio, when the weights say nothing.
fn normalized_weights(log_ratios: &[f64]) -> Option<Vec<f64>> {
    let max = log_ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if !max.is_finite() {
        return None;
    }
    let weights: Vec<f64> = log_ratios.iter().map(|l| (l - max).exp()).collect();
    let total: f64 = weights.iter().sum();
    Some(weights.into_iter().map(|w| w / total).collect())
}

/// Self-normalised importance-sampling estimate of one group's mean score.
/// `log_ratios[i] = log pi(y_i) - log mu(y_i)` summed over the sample's
/// tokens. Without one finite ratio the weights say nothing: the plain
/// mean, worth no samples.
pub fn snis(scores: &[f32], log_ratios: &[f64]) -> GroupEstimate {
    let Some(weights) = normalized_weights(log_ratios) else {
        return GroupEstimate {
            mean: scores.iter().map(|&s| s as f64).sum::<f64>() / scores.len().max(1) as f64,
            effective_samples: 0.0,
        };
    };
    GroupEstimate {
        mean: weights.iter().zip(scores).map(|(w, &s)| w * s as f64).sum(),
        effective_samples: 1.0 / weights.iter().map(|w| w * w).sum::<f64>(),
    }
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

/// The behaviour log-probs an importance weight divides by: those of the
/// distribution the sample was drawn from.
fn behaviour_logprobs<'a>(
    group: &ServedGroup,
    sample: &'a ServedSample,
) -> Result<&'a [f32], RlError> {
    if !group.guided() {
        return Ok(&sample.logprobs);
    }
    if sample.guided_logprobs.len() != sample.tokens.len() {
        return Err(RlError::InvalidData(
            "an image drawn with guidance needs its guided log-probs to be evaluated".into(),
        ));
    }
    Ok(&sample.guided_logprobs)
}

/// `sampling[k]`: the policy's log-probs of sample k under the distribution
/// it was drawn from; `conditional[k]` and `reference[k]` score the KL.
fn score_policy(
    groups: &[ServedGroup],
    sampling: &[Vec<f32>],
    conditional: &[Vec<f32>],
    reference: &[Vec<f32>],
) -> Result<PolicyScore, RlError> {
    let mut row = 0;
    let (mut reward, mut kl, mut effective_samples) = (0.0, 0.0, 0.0);
    // Per task: effective samples and samples, each beyond one per group;
    // the sum of group estimates and the groups.
    let mut evidence = [(0.0, 0.0); 2];
    let mut task_reward = [(0.0, 0usize); 2];
    for g in groups {
        let rows = row..row + g.samples.len();
        let ratios = g
            .samples
            .iter()
            .zip(&sampling[rows.clone()])
            .map(|(s, lp)| {
                let behaviour = behaviour_logprobs(g, s)?;
                Ok(lp
                    .iter()
                    .zip(behaviour)
                    .map(|(&p, &b)| (p - b) as f64)
                    .sum())
            })
            .collect::<Result<Vec<f64>, RlError>>()?;
        let scores: Vec<f32> = g.samples.iter().map(|s| s.score).collect();
        let estimate = snis(&scores, &ratios);
        reward += estimate.mean;
        effective_samples += estimate.effective_samples;
        let task_index = match g.task {
            RewardTask::Understanding => 0,
            RewardTask::Generation => 1,
        };
        task_reward[task_index].0 += estimate.mean;
        task_reward[task_index].1 += 1;
        let task = &mut evidence[task_index];
        task.0 += (estimate.effective_samples - 1.0).max(0.0);
        task.1 += g.samples.len().saturating_sub(1) as f64;
        // The KL under the policy's own samples, weighed as the reward is:
        // on the behaviour's samples alone, k3 grows without bound where
        // the policy finds them unlikely.
        let k3: Vec<f64> = rows
            .map(|k| k3_token_mean(&conditional[k], &reference[k]))
            .collect();
        kl += match normalized_weights(&ratios) {
            Some(weights) => weights.iter().zip(&k3).map(|(w, k)| w * k).sum::<f64>(),
            None => k3.iter().sum::<f64>() / k3.len().max(1) as f64,
        };
        row += g.samples.len();
    }
    let effective_share = evidence
        .iter()
        .filter(|(_, beyond_one)| *beyond_one > 0.0)
        .map(|(effective, beyond_one)| effective / beyond_one)
        .fold(None, |least: Option<f64>, share| {
            Some(least.map_or(share, |l| l.min(share)))
        })
        .unwrap_or(0.0);
    let mean_of = |(sum, n): (f64, usize)| (n > 0).then(|| sum / n as f64);
    Ok(PolicyScore {
        reward: reward / groups.len().max(1) as f64,
        kl_to_base: kl / groups.len().max(1) as f64,
        effective_samples,
        effective_share,
        by_task: TaskRewards {
            understanding: mean_of(task_reward[0]),
            generation: mean_of(task_reward[1]),
        },
    })
}

/// Scores the trainer's current policy (the candidate) and `active` on
/// `groups`: importance weights against the distribution each sample was
/// drawn from (guided for images drawn with CFG), the KL on the
/// conditional policy GRPO trains.
pub fn evaluate(
    trainer: &Trainer,
    active: &Janus,
    groups: &[ServedGroup],
) -> Result<Evaluation, RlError> {
    let served = trainer.prepare_served(groups)?;
    let score = |model: &Janus, reference: &[Vec<f32>]| {
        let logps = trainer.served_sampling_logps(model, &served)?;
        score_policy(groups, &logps.sampling, &logps.conditional, reference)
    };
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
        active: score(active, &reference)?,
        candidate: score(&trainer.bundle.model, &reference)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snis_weights_by_likelihood_ratio() {
        // Equal ratios: the plain mean, worth every sample.
        let equal = snis(&[1.0, 0.0], &[0.3, 0.3]);
        assert!((equal.mean - 0.5).abs() < 1e-12);
        assert!((equal.effective_samples - 2.0).abs() < 1e-12);
        // The first sample twice as likely under the policy: weights 2:1,
        // worth (2 + 1)^2 / (4 + 1) samples.
        let est = snis(&[1.0, 0.0], &[2f64.ln(), 0.0]);
        assert!((est.mean - 2.0 / 3.0).abs() < 1e-12);
        assert!((est.effective_samples - 9.0 / 5.0).abs() < 1e-12);
        // Huge log-ratios stay finite, and the estimate is worth one sample.
        let collapsed = snis(&[1.0, 0.0, 0.0, 0.0], &[1e4, 0.0, 0.0, 0.0]);
        assert!((collapsed.mean - 1.0).abs() < 1e-12);
        assert!((collapsed.effective_samples - 1.0).abs() < 1e-12);
        // No finite ratio: the plain mean, worth nothing.
        let undefined = snis(&[1.0, 0.0], &[f64::NEG_INFINITY, f64::NAN]);
        assert_eq!((undefined.mean, undefined.effective_samples), (0.5, 0.0));
    }

    fn group(task: RewardTask, behaviour: [f32; 4]) -> ServedGroup {
        ServedGroup {
            item: crate::reward::TrainItem {
                qa: None,
                caption: Some("a red square".into()),
            },
            task,
            guidance: None,
            samples: behaviour
                .iter()
                .enumerate()
                .map(|(i, &logprob)| ServedSample {
                    tokens: vec![1],
                    logprobs: vec![logprob],
                    guided_logprobs: Vec::new(),
                    score: i as f32,
                })
                .collect(),
        }
    }

    #[test]
    fn the_evidence_is_that_of_the_task_whose_weights_collapsed() {
        // The policy gives every sample log-prob -1: the answers were drawn
        // as likely as that (equal weights), one image far less likely than
        // the others were (its weight is everything).
        let groups = [
            group(RewardTask::Understanding, [-1.0; 4]),
            group(RewardTask::Generation, [-40.0, -1.0, -1.0, -1.0]),
        ];
        let policy = vec![vec![-1f32]; 8];
        let score = score_policy(&groups, &policy, &policy, &policy).unwrap();
        assert!((score.effective_samples - 5.0).abs() < 1e-9, "{score:?}");
        assert!(score.effective_share.abs() < 1e-9, "{score:?}");
        // Each task's estimate on its own: the answers' plain mean, the
        // image group's one weighty sample (score 0).
        let (answers, images) = (score.by_task.understanding, score.by_task.generation);
        assert!((answers.unwrap() - 1.5).abs() < 1e-9, "{score:?}");
        assert!(images.unwrap().abs() < 1e-9, "{score:?}");
        // The answers alone keep all their evidence.
        let answers = score_policy(&groups[..1], &policy, &policy, &policy).unwrap();
        assert!((answers.effective_share - 1.0).abs() < 1e-9);
        assert!((answers.reward - 1.5).abs() < 1e-9);
    }

    #[test]
    fn the_kl_is_weighed_like_the_score() {
        // The policy's weight is all on the first image, where it agrees
        // with the base; the base finds the others far likelier than the
        // policy does, which says nothing of the policy's own samples.
        let groups = [group(RewardTask::Generation, [-40.0, -1.0, -1.0, -1.0])];
        let policy = vec![vec![-1f32]; 4];
        let reference = vec![vec![-1f32], vec![5.0], vec![5.0], vec![5.0]];
        let score = score_policy(&groups, &policy, &policy, &reference).unwrap();
        assert!(score.kl_to_base.abs() < 1e-9, "{score:?}");
        // Equal weights: the plain mean of k3 over the samples.
        let equal = [group(RewardTask::Generation, [-1.0; 4])];
        let score = score_policy(&equal, &policy, &policy, &reference).unwrap();
        let k3 = 6f64.exp() - 6.0 - 1.0;
        assert!((score.kl_to_base - 0.75 * k3).abs() < 1e-3, "{score:?}");
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
