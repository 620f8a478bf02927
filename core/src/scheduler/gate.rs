//! The evaluation gate: promote a candidate only when it is measurably no
//! worse than the active version and stays close to the base.

use serde::Serialize;

use ulm_rl::evaluate::Evaluation;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Decision {
    pub promote: bool,
    /// Why, with the numbers.
    pub reason: String,
}

pub fn decide(eval: &Evaluation, max_reward_drop: f64, max_kl: f64) -> Decision {
    let (cand, active) = (eval.candidate, eval.active);
    if !cand.reward.is_finite() || !cand.kl_to_base.is_finite() {
        return Decision {
            promote: false,
            reason: "the candidate's evaluation is not finite".into(),
        };
    }
    if cand.reward < active.reward - max_reward_drop {
        return Decision {
            promote: false,
            reason: format!(
                "reward {:.4} is below the active version's {:.4} by more than {max_reward_drop}",
                cand.reward, active.reward
            ),
        };
    }
    if cand.kl_to_base > max_kl {
        return Decision {
            promote: false,
            reason: format!(
                "KL to the base {:.4} exceeds the bound {max_kl}",
                cand.kl_to_base
            ),
        };
    }
    Decision {
        promote: true,
        reason: format!(
            "reward {:.4} against the active version's {:.4}; KL to the base {:.4} within {max_kl}",
            cand.reward, active.reward, cand.kl_to_base
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ulm_rl::evaluate::PolicyScore;

    fn eval(active: f64, candidate: f64, kl: f64) -> Evaluation {
        Evaluation {
            groups: 2,
            samples: 8,
            behaviour_reward: active,
            active: PolicyScore {
                reward: active,
                kl_to_base: 0.0,
            },
            candidate: PolicyScore {
                reward: candidate,
                kl_to_base: kl,
            },
        }
    }

    #[test]
    fn promotes_only_what_is_no_worse_and_close_to_the_base() {
        assert!(decide(&eval(0.5, 0.6, 0.1), 0.0, 0.5).promote);
        assert!(decide(&eval(0.5, 0.5, 0.1), 0.0, 0.5).promote);
        assert!(decide(&eval(0.5, 0.48, 0.1), 0.05, 0.5).promote);
        let worse = decide(&eval(0.5, 0.4, 0.1), 0.05, 0.5);
        assert!(!worse.promote);
        assert!(worse.reason.contains("0.4000"), "{}", worse.reason);
        let far = decide(&eval(0.5, 0.9, 0.8), 0.0, 0.5);
        assert!(!far.promote);
        assert!(far.reason.contains("KL"), "{}", far.reason);
        assert!(!decide(&eval(0.5, f64::NAN, 0.1), 0.0, 0.5).promote);
    }
}
