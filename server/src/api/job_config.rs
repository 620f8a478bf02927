//! The wire form of a refinement job's configuration (`POST /v1/rl/jobs`),
//! with its OpenAPI schema. Every field is optional; the defaults are the
//! core's. Fields are in the schema's (alphabetical) order.

use serde::{Deserialize, Serialize};
use ulm_core::scheduler::config as core;
use utoipa::ToSchema;

use super::error::ApiError;

/// Share of each data source in the job's steps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct DataMix {
    /// Served groups with human scores (GRPO on the stored samples).
    pub feedback: f64,
    /// Generation prompts without feedback (fresh rollouts scored by the model-self rewards).
    pub prompts: f64,
    /// Questions with a reference answer (fresh rollouts scored by accuracy and format).
    pub reference_answers: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct JobConfig {
    /// KL weight.
    pub beta: f64,
    pub epsilon_high: f64,
    pub epsilon_low: f64,
    /// Feedback keys whose scores count; all keys when absent.
    pub feedback_keys: Option<Vec<String>>,
    /// Feedback keys whose scores the gate judges held-out groups by: a
    /// trusted rating (an audit, a verifier) that a candidate trained on
    /// the other keys must not fall behind on. Default: `feedback_keys`.
    pub gate_feedback_keys: Option<Vec<String>>,
    /// Samples per prompt for fresh rollouts (G).
    #[schema(minimum = 2, maximum = 32)]
    pub group_size: u32,
    /// Groups (served or fresh) per step.
    #[schema(minimum = 1, maximum = 64)]
    pub groups_per_step: u32,
    pub lora_alpha: f64,
    /// LoRA rank and alpha for a job that starts from the base model (a job
    /// from a trained version continues its adapters).
    #[schema(minimum = 1, maximum = 256)]
    pub lora_rank: u32,
    pub lr: f64,
    /// Newest rated requests considered.
    #[schema(minimum = 1, maximum = 100000)]
    pub max_groups: u32,
    /// Promote only if the candidate's KL to the base stays under this.
    pub max_kl: f64,
    /// New tokens per fresh answer rollout.
    #[schema(minimum = 1, maximum = 4096)]
    pub max_new_tokens: u32,
    /// Promote only if the candidate's estimated reward is at least the
    /// active version's minus this.
    pub max_reward_drop: f64,
    /// Rows per forward/backward pass; gradients accumulate over them.
    /// Bounds the job's activation memory next to the serving model: about
    /// 10 GiB per row at the Janus-Pro-1B sizes in bf16.
    #[schema(minimum = 1, maximum = 256)]
    pub micro_batch_rows: u32,
    /// Decide only if both policies' importance weights keep at least this
    /// share of the held-out samples' evidence (effective samples beyond
    /// one per group over samples beyond one per group, the least of the
    /// tasks); below it the job ends rejected, its verdict
    /// `not_enough_evidence`.
    #[schema(minimum = 0.0, maximum = 1.0)]
    pub min_effective_share: f64,
    pub mix: DataMix,
    /// Passes over each step's samples (mu).
    #[schema(minimum = 1, maximum = 8)]
    pub num_iterations: u32,
    pub seed: u64,
    pub self_cycle_weight: f64,
    /// GRPO steps.
    #[schema(minimum = 1, maximum = 1000)]
    pub steps: u32,
    /// Weights of the model-self rewards for prompts without feedback.
    pub t2i_match_weight: f64,
    /// Sampling temperature of fresh rollouts; served groups are used only
    /// when they were sampled at this temperature (their log-probs are).
    /// Default: the model's (`sampling` in `GET /v1/models`), which requests
    /// that name no temperature are sampled with.
    #[schema(minimum = 0.05, maximum = 5.0)]
    pub temperature: Option<f64>,
}

impl Default for DataMix {
    fn default() -> Self {
        let core = core::DataMix::default();
        Self {
            feedback: core.feedback,
            prompts: core.prompts,
            reference_answers: core.reference_answers,
        }
    }
}

impl Default for JobConfig {
    /// The core's defaults, so the schema shows what a job really gets. The
    /// exhaustive pattern keeps the two types' fields the same at compile time.
    fn default() -> Self {
        let core::JobConfig {
            steps,
            groups_per_step,
            group_size,
            temperature,
            max_new_tokens,
            lr,
            beta,
            epsilon_low,
            epsilon_high,
            micro_batch_rows,
            num_iterations,
            lora_rank,
            lora_alpha,
            mix: _,
            feedback_keys,
            gate_feedback_keys,
            t2i_match_weight,
            self_cycle_weight,
            max_reward_drop,
            max_kl,
            min_effective_share,
            max_groups,
            seed,
        } = core::JobConfig::default();
        Self {
            beta,
            epsilon_high,
            epsilon_low,
            feedback_keys,
            gate_feedback_keys,
            group_size,
            groups_per_step,
            lora_alpha,
            lora_rank,
            lr,
            max_groups,
            max_kl,
            max_new_tokens,
            max_reward_drop,
            micro_batch_rows,
            min_effective_share,
            mix: DataMix::default(),
            num_iterations,
            seed,
            self_cycle_weight,
            steps,
            t2i_match_weight,
            temperature,
        }
    }
}

impl TryFrom<JobConfig> for core::JobConfig {
    type Error = ApiError;

    /// Through serde: the two types have the same fields (see `Default`).
    /// A number too large for its field (an f32 read as infinity) has no
    /// JSON form and is refused here.
    fn try_from(c: JobConfig) -> Result<Self, ApiError> {
        serde_json::to_value(c)
            .and_then(serde_json::from_value)
            .map_err(|e| ApiError::InvalidParameter(format!("every number must be finite: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wire_defaults_are_the_cores() {
        assert_eq!(
            core::JobConfig::try_from(JobConfig::default()).unwrap(),
            core::JobConfig::default()
        );
        // Read as f64, a huge value stays itself and is refused by range.
        let huge: JobConfig = serde_json::from_str(r#"{"temperature": 1.2e76}"#).unwrap();
        let error = core::JobConfig::try_from(huge)
            .unwrap()
            .validate()
            .unwrap_err();
        assert_eq!(error.field, "temperature");
        let every_field: JobConfig = serde_json::from_value(
            serde_json::to_value(core::JobConfig {
                steps: 3,
                feedback_keys: Some(vec!["quality".into()]),
                ..core::JobConfig::default()
            })
            .unwrap(),
        )
        .unwrap();
        assert_eq!(core::JobConfig::try_from(every_field).unwrap().steps, 3);
    }
}
