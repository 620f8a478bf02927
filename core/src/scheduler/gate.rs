//! The evaluation gate: promote a candidate only when it is measurably no
//! worse than the active version and stays close to the base, and say so
//! only when the held-out samples carry enough evidence for either policy.

use serde::Serialize;

use ulm_rl::evaluate::Evaluation;

/// What the gate concluded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Promote,
    Reject,
    /// The importance weights sit on too few samples for the estimates to
    /// tell the policies apart: no verdict either way, nothing promoted.
    NotEnoughEvidence,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Decision {
    pub verdict: Verdict,
    /// `verdict == Promote`.
    pub promote: bool,
    /// Why, with the numbers.
    pub reason: String,
}

/// The bounds a candidate is held to (a job's settings).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bounds {
    pub max_reward_drop: f64,
    pub max_kl: f64,
    /// The least evidence each policy's estimate must keep
    /// ([`ulm_rl::evaluate::PolicyScore::effective_share`]).
    pub min_effective_share: f64,
}

fn decision(verdict: Verdict, reason: String) -> Decision {
    Decision {
        verdict,
        promote: verdict == Verdict::Promote,
        reason,
    }
}

pub fn decide(eval: &Evaluation, bounds: Bounds) -> Decision {
    let (cand, active) = (eval.candidate, eval.active);
    if !cand.reward.is_finite() || !cand.kl_to_base.is_finite() {
        return decision(
            Verdict::Reject,
            "the candidate's evaluation is not finite".into(),
        );
    }
    // Reward and KL are both weighed: without the evidence, neither is.
    for (who, score) in [("candidate", cand), ("active version", active)] {
        let share = score.effective_share;
        if share.is_nan() || share < bounds.min_effective_share {
            return decision(
                Verdict::NotEnoughEvidence,
                format!(
                    "the {who}'s importance weights keep {:.1}% of the evidence in {} held-out samples \
                     ({:.1} effective), under the {:.1}% a verdict needs",
                    100.0 * share,
                    eval.samples,
                    score.effective_samples,
                    100.0 * bounds.min_effective_share
                ),
            );
        }
    }
    if cand.kl_to_base > bounds.max_kl {
        return decision(
            Verdict::Reject,
            format!(
                "KL to the base {:.4} exceeds the bound {}",
                cand.kl_to_base, bounds.max_kl
            ),
        );
    }
    // Task by task: a gain on answers does not pay for a loss on images
    // (the mean over both tasks follows from the tasks).
    let tasks = active.by_task.each().into_iter().zip(cand.by_task.each());
    for ((task, active_reward), (_, cand_reward)) in tasks {
        let (Some(active_reward), Some(cand_reward)) = (active_reward, cand_reward) else {
            continue;
        };
        if cand_reward < active_reward - bounds.max_reward_drop {
            return decision(
                Verdict::Reject,
                format!(
                    "{task} reward {cand_reward:.4} is below the active version's {active_reward:.4} \
                     by more than {} (both tasks: {:.4} against {:.4})",
                    bounds.max_reward_drop, cand.reward, active.reward
                ),
            );
        }
    }
    decision(
        Verdict::Promote,
        format!(
            "reward {:.4} against the active version's {:.4} ({:.1}% and {:.1}% of the evidence in {} samples); \
             KL to the base {:.4} within {}",
            cand.reward,
            active.reward,
            100.0 * cand.effective_share,
            100.0 * active.effective_share,
            eval.samples,
            cand.kl_to_base,
            bounds.max_kl
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use ulm_rl::evaluate::{PolicyScore, TaskRewards};

    const SAMPLES: usize = 8;

    /// Answers only.
    fn eval(active: f64, candidate: f64, kl: f64, candidate_share: f64) -> Evaluation {
        let answers = |reward| TaskRewards {
            understanding: Some(reward),
            generation: None,
        };
        Evaluation {
            groups: 2,
            samples: SAMPLES,
            behaviour_reward: active,
            active: PolicyScore {
                reward: active,
                kl_to_base: 0.0,
                effective_samples: SAMPLES as f64,
                effective_share: 1.0,
                by_task: answers(active),
            },
            candidate: PolicyScore {
                reward: candidate,
                kl_to_base: kl,
                effective_samples: 2.0 + candidate_share * (SAMPLES - 2) as f64,
                effective_share: candidate_share,
                by_task: answers(candidate),
            },
        }
    }

    fn bounds(max_reward_drop: f64, max_kl: f64) -> Bounds {
        Bounds {
            max_reward_drop,
            max_kl,
            min_effective_share: 0.25,
        }
    }

    #[test]
    fn promotes_only_what_is_no_worse_and_close_to_the_base() {
        assert!(decide(&eval(0.5, 0.6, 0.1, 1.0), bounds(0.0, 0.5)).promote);
        assert!(decide(&eval(0.5, 0.5, 0.1, 1.0), bounds(0.0, 0.5)).promote);
        assert!(decide(&eval(0.5, 0.48, 0.1, 1.0), bounds(0.05, 0.5)).promote);
        let worse = decide(&eval(0.5, 0.4, 0.1, 1.0), bounds(0.05, 0.5));
        assert_eq!(worse.verdict, Verdict::Reject);
        assert!(worse.reason.contains("0.4000"), "{}", worse.reason);
        let far = decide(&eval(0.5, 0.9, 0.8, 1.0), bounds(0.0, 0.5));
        assert_eq!(far.verdict, Verdict::Reject);
        assert!(far.reason.contains("KL"), "{}", far.reason);
        assert!(!decide(&eval(0.5, f64::NAN, 0.1, 1.0), bounds(0.0, 0.5)).promote);
    }

    #[test]
    fn collapsed_weights_give_no_verdict_either_way() {
        for candidate in [0.9, 0.1] {
            let d = decide(&eval(0.5, candidate, 0.1, 0.24), bounds(0.0, 0.5));
            assert_eq!(d.verdict, Verdict::NotEnoughEvidence, "{}", d.reason);
            assert!(!d.promote);
            assert!(d.reason.contains("24.0% of the evidence"), "{}", d.reason);
        }
        assert!(decide(&eval(0.5, 0.9, 0.1, 0.25), bounds(0.0, 0.5)).promote);
        // The active version's estimate needs the evidence too.
        let mut stale = eval(0.5, 0.9, 0.1, 1.0);
        stale.active.effective_share = 0.1;
        let d = decide(&stale, bounds(0.0, 0.5));
        assert_eq!(d.verdict, Verdict::NotEnoughEvidence);
        assert!(d.reason.contains("active version"), "{}", d.reason);
        // An undefined share is no evidence; a bound of 0 asks for none.
        let undefined = eval(0.5, 0.9, 0.1, f64::NAN);
        assert_eq!(
            decide(&undefined, bounds(0.0, 0.5)).verdict,
            Verdict::NotEnoughEvidence
        );
        let none_needed = Bounds {
            min_effective_share: 0.0,
            ..bounds(0.0, 0.5)
        };
        assert!(decide(&eval(0.5, 0.9, 0.1, 0.0), none_needed).promote);
        // Without the evidence the KL is no more known than the reward.
        let far = decide(&eval(0.5, 0.9, 0.8, 0.0), bounds(0.0, 0.5));
        assert_eq!(far.verdict, Verdict::NotEnoughEvidence);
    }

    #[test]
    fn a_gain_on_one_task_does_not_pay_for_a_loss_on_the_other() {
        let mut traded = eval(0.5, 0.55, 0.1, 1.0);
        traded.active.by_task = TaskRewards {
            understanding: Some(0.6),
            generation: Some(0.4),
        };
        traded.candidate.by_task = TaskRewards {
            understanding: Some(0.8),
            generation: Some(0.3),
        };
        let d = decide(&traded, bounds(0.05, 0.5));
        assert_eq!(d.verdict, Verdict::Reject);
        assert!(
            d.reason.starts_with("generation reward 0.3000"),
            "{}",
            d.reason
        );
        assert!(decide(&traded, bounds(0.15, 0.5)).promote);
    }
}
