//! What a refinement job does, as stored with the job. Its wire form, with
//! the OpenAPI schema, is the API's `JobConfig`.

use serde::{Deserialize, Serialize};

/// Share of each data source in the job's steps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataMix {
    /// Served groups with human scores (GRPO on the stored samples).
    pub feedback: f64,
    /// Questions with a reference answer (fresh rollouts scored by accuracy and format).
    pub reference_answers: f64,
    /// Generation prompts without feedback (fresh rollouts scored by the model-self rewards).
    pub prompts: f64,
}

impl Default for DataMix {
    fn default() -> Self {
        Self {
            feedback: 1.0,
            reference_answers: 1.0,
            prompts: 0.5,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JobConfig {
    /// GRPO steps.
    pub steps: u32,
    /// Groups (served or fresh) per step.
    pub groups_per_step: u32,
    /// Samples per prompt for fresh rollouts (G).
    pub group_size: u32,
    /// Sampling temperature of fresh rollouts; served groups are used only
    /// when they were sampled at this temperature (their log-probs are).
    /// None: the served model's default, which requests that name no
    /// temperature are sampled with.
    pub temperature: Option<f64>,
    /// New tokens per fresh answer rollout.
    pub max_new_tokens: u32,
    pub lr: f64,
    /// KL weight.
    pub beta: f64,
    pub epsilon_low: f64,
    pub epsilon_high: f64,
    /// Rows per forward/backward pass; gradients accumulate over them.
    /// Bounds the job's activation memory next to the serving model: about
    /// 10 GiB per row at the Janus-Pro-1B sizes in bf16.
    pub micro_batch_rows: u32,
    /// Passes over each step's samples (mu).
    pub num_iterations: u32,
    /// LoRA rank and alpha for a job that starts from the base model (a job
    /// from a trained version continues its adapters).
    pub lora_rank: u32,
    pub lora_alpha: f64,
    pub mix: DataMix,
    /// Feedback keys whose scores count; all keys when absent.
    pub feedback_keys: Option<Vec<String>>,
    /// Feedback keys whose scores the gate judges held-out groups by: a
    /// trusted rating (an audit, a verifier) that a candidate trained on
    /// the other keys must not fall behind on. Absent: `feedback_keys`.
    pub gate_feedback_keys: Option<Vec<String>>,
    /// Weights of the model-self rewards for prompts without feedback.
    pub t2i_match_weight: f64,
    pub self_cycle_weight: f64,
    /// Promote only if the candidate's estimated reward is at least the
    /// active version's minus this.
    pub max_reward_drop: f64,
    /// Promote only if the candidate's KL to the base stays under this.
    pub max_kl: f64,
    /// Decide only if both policies' importance weights keep at least this
    /// share of the held-out samples' evidence (effective samples beyond
    /// one per group over samples beyond one per group, the least of the
    /// tasks); below it the job ends rejected as not enough evidence.
    pub min_effective_share: f64,
    /// Newest rated requests considered.
    pub max_groups: u32,
    pub seed: u64,
}

impl Default for JobConfig {
    fn default() -> Self {
        Self {
            steps: 20,
            groups_per_step: 4,
            group_size: 8,
            temperature: None,
            max_new_tokens: 256,
            lr: 5e-5,
            beta: 0.04,
            epsilon_low: 0.2,
            epsilon_high: 0.2,
            micro_batch_rows: 4,
            num_iterations: 1,
            lora_rank: 16,
            lora_alpha: 32.0,
            mix: DataMix::default(),
            feedback_keys: None,
            gate_feedback_keys: None,
            t2i_match_weight: 1.0,
            self_cycle_weight: 0.0,
            max_reward_drop: 0.0,
            max_kl: 0.5,
            min_effective_share: 0.2,
            max_groups: 2048,
            seed: 0,
        }
    }
}

/// A job configuration field out of its range.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field} {message}")]
pub struct ConfigError {
    /// The field, as named in the request (`mix.prompts` for nested ones).
    pub field: &'static str,
    pub message: String,
}

impl JobConfig {
    /// The rollout temperature: the configured one, else `model_default`
    /// (the served model's sampling default).
    pub fn temperature_or(&self, model_default: f64) -> f64 {
        self.temperature.unwrap_or(model_default)
    }

    /// Every field in its range; the error names the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let range = |field: &'static str, v: f64, lo: f64, hi: f64| {
            if v.is_finite() && (lo..=hi).contains(&v) {
                Ok(())
            } else {
                Err(ConfigError {
                    field,
                    message: format!("must be between {lo} and {hi}"),
                })
            }
        };
        range("steps", self.steps as f64, 1.0, 1000.0)?;
        range("groups_per_step", self.groups_per_step as f64, 1.0, 64.0)?;
        range("group_size", self.group_size as f64, 2.0, 32.0)?;
        if let Some(temperature) = self.temperature {
            range("temperature", temperature, 0.05, 5.0)?;
        }
        range("max_new_tokens", self.max_new_tokens as f64, 1.0, 4096.0)?;
        range("lr", self.lr, 0.0, 1.0)?;
        range("beta", self.beta, 0.0, 10.0)?;
        range("epsilon_low", self.epsilon_low, 0.0, 1.0)?;
        range("epsilon_high", self.epsilon_high, 0.0, 10.0)?;
        range("micro_batch_rows", self.micro_batch_rows as f64, 1.0, 256.0)?;
        range("num_iterations", self.num_iterations as f64, 1.0, 8.0)?;
        range("lora_rank", self.lora_rank as f64, 1.0, 256.0)?;
        range("lora_alpha", self.lora_alpha, 0.0, 1e4)?;
        range("mix.feedback", self.mix.feedback, 0.0, 1e6)?;
        range(
            "mix.reference_answers",
            self.mix.reference_answers,
            0.0,
            1e6,
        )?;
        range("mix.prompts", self.mix.prompts, 0.0, 1e6)?;
        range("t2i_match_weight", self.t2i_match_weight, 0.0, 1e6)?;
        range("self_cycle_weight", self.self_cycle_weight, 0.0, 1e6)?;
        range("max_reward_drop", self.max_reward_drop, -1e6, 1e6)?;
        range("max_kl", self.max_kl, 0.0, 1e6)?;
        range("min_effective_share", self.min_effective_share, 0.0, 1.0)?;
        range("max_groups", self.max_groups as f64, 1.0, 100000.0)?;
        if self.mix.feedback + self.mix.reference_answers + self.mix.prompts <= 0.0 {
            return Err(ConfigError {
                field: "mix",
                message: "needs at least one positive weight".into(),
            });
        }
        if self.seed > (1 << 53) - 1 {
            return Err(ConfigError {
                field: "seed",
                message: "must be at most 2^53 - 1".into(),
            });
        }
        Ok(())
    }
}
