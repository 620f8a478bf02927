//! What a trainer is configured with, how its policy differs from the
//! reference, and what one step reports.

use candle_core::Var;
use serde::{Deserialize, Serialize};
use ulm_model::Janus;

use crate::grpo::T2iAlignment;
use crate::lora::Lora;

/// Learning-rate shape over the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    Constant,
    /// Cosine decay to 0 at `total_steps`.
    Cosine,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainerConfig {
    /// Samples per prompt and task (G).
    pub group_size: usize,
    pub temperature: f32,
    /// Temperature of the training log-probs; the sampling temperature when absent.
    pub logprob_temperature: Option<f64>,
    pub top_p: Option<f32>,
    pub max_new_tokens: usize,
    pub cfg_weight: f32,
    /// KL weight (0 to 0.04 in CoRL).
    pub beta: f64,
    pub epsilon_low: f64,
    pub epsilon_high: f64,
    /// Passes over each rollout batch (mu).
    pub num_iterations: usize,
    pub lr: f64,
    pub weight_decay: f64,
    pub warmup_steps: u64,
    pub schedule: Schedule,
    pub total_steps: u64,
    /// Global gradient-norm clipping; none when absent.
    pub max_grad_norm: Option<f64>,
    /// Rows per forward/backward; gradients accumulate over micro-batches.
    pub micro_batch_rows: usize,
    pub alignment: T2iAlignment,
    /// lambda of the unified reward.
    pub unified_lambda: f64,
    pub seed: u64,
}

impl Default for TrainerConfig {
    fn default() -> Self {
        Self {
            group_size: 8,
            temperature: 1.0,
            logprob_temperature: None,
            top_p: None,
            max_new_tokens: 256,
            cfg_weight: 5.0,
            beta: 0.04,
            epsilon_low: 0.2,
            epsilon_high: 0.2,
            num_iterations: 1,
            lr: 4e-6,
            weight_decay: 0.0,
            warmup_steps: 0,
            schedule: Schedule::Constant,
            total_steps: 1000,
            max_grad_norm: Some(1.0),
            micro_batch_rows: 4,
            alignment: T2iAlignment::Predicting,
            unified_lambda: 0.8,
            seed: 0,
        }
    }
}

/// How the policy differs from the reference.
pub enum Adaptation {
    /// Adapters on the base model; the reference is the base (adapters off).
    Lora(Lora),
    /// The whole language model trains; the reference is a frozen copy.
    Full {
        params: Vec<(String, Var)>,
        reference: Box<Janus>,
    },
}

impl Adaptation {
    pub fn params(&self) -> &[(String, Var)] {
        match self {
            Adaptation::Lora(l) => &l.params,
            Adaptation::Full { params, .. } => params,
        }
    }
}

/// Everything measured in one step.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StepMetrics {
    pub step: u64,
    pub lr: f64,
    pub loss: f64,
    pub reward_understanding: Option<f64>,
    pub reward_generation: Option<f64>,
    /// Mean of each reward function.
    pub rewards: Vec<(String, f64)>,
    pub advantage_abs_mean: f64,
    /// Groups whose rewards were all equal: they carry no gradient.
    pub zero_variance_groups: usize,
    pub kl: f64,
    pub clip_fraction: f64,
    pub grad_norm: f64,
    /// False when the step was abandoned (non-finite loss or gradient).
    pub applied: bool,
    pub tokens: usize,
    pub tokens_per_s: f64,
    pub rollout_s: f64,
    pub reward_s: f64,
    pub train_s: f64,
    pub update_s: f64,
}
