//! One GRPO step over a batch of CoRL items: roll out G samples per task
//! with the current policy, score them, compute group advantages (unified
//! `r_t2i + lambda * r_mm2t` where an item has both tasks), then
//! `num_iterations` passes of the clipped objective with gradient
//! accumulation, clipping and AdamW. A step whose loss or gradients are not
//! finite is abandoned and leaves the policy untouched.

use std::time::Instant;

use candle_core::Tensor;
use ulm_model::bundle::ModelBundle;
use ulm_model::sampling::SamplingParams;
use ulm_model::Janus;

mod config;
mod objective;
mod prepared;
mod rollout;
mod served;

pub use config::{Adaptation, Schedule, StepMetrics, TrainerConfig};
pub use rollout::{ServedGroup, ServedSample};
pub use served::{PreparedServed, ServedLogps};

use crate::grpo::AdamW;
use crate::reward::{HumanFeedback, RewardTask, TaskScores, TrainItem, Weighted};
use crate::RlError;
use objective::all_finite;
use rollout::{served_rollouts, Rollouts};

/// What [`Trainer::snapshot`] keeps.
struct Snapshot {
    /// The parameters' values in the update dtype (their master copies).
    params: Vec<Tensor>,
    /// Copies: the optimizer writes its moments in place.
    moments: Vec<(Tensor, Tensor)>,
    optimizer_step: u64,
}

pub struct Trainer {
    pub bundle: ModelBundle,
    pub adaptation: Adaptation,
    pub optimizer: AdamW,
    pub config: TrainerConfig,
    pub rewards: Vec<Weighted>,
    pub step: u64,
    pub loss_scale: LossScale,
}

/// Dynamic loss scaling for f16 (as `torch.cuda.amp.GradScaler`): small
/// gradients underflow f16's range (a LoRA A gradient is its B, about 1e-6
/// early on, times the output gradient), so the backward pass runs on the
/// loss times `factor` and the gradients are divided by it in f32. A pass
/// whose gradients overflow halves the factor and runs again; a run of
/// good steps doubles it. bf16 has f32's range: its factor stays 1.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossScale {
    pub factor: f64,
    /// The factor it starts at and grows back to.
    ceiling: f64,
    good_steps: u32,
}

impl LossScale {
    const GROWTH_INTERVAL: u32 = 200;

    pub fn for_dtype(dtype: candle_core::DType) -> Self {
        let ceiling = if dtype == candle_core::DType::F16 {
            65536.0
        } else {
            1.0
        };
        Self {
            factor: ceiling,
            ceiling,
            good_steps: 0,
        }
    }

    /// After gradients that overflowed: true when a smaller factor is left to try.
    fn back_off(&mut self) -> bool {
        self.good_steps = 0;
        if self.factor <= 1.0 {
            return false;
        }
        self.factor = (self.factor / 2.0).max(1.0);
        true
    }

    fn applied(&mut self) {
        if self.factor >= self.ceiling {
            return;
        }
        self.good_steps += 1;
        if self.good_steps >= Self::GROWTH_INTERVAL {
            self.good_steps = 0;
            self.factor = (self.factor * 2.0).min(self.ceiling);
        }
    }
}

impl Trainer {
    pub fn new(
        bundle: ModelBundle,
        adaptation: Adaptation,
        config: TrainerConfig,
        rewards: Vec<Weighted>,
    ) -> Result<Self, RlError> {
        let optimizer = AdamW::new(adaptation.params(), config.lr, config.weight_decay)?;
        let loss_scale = LossScale::for_dtype(bundle.model.dtype());
        Ok(Self {
            loss_scale,
            bundle,
            adaptation,
            optimizer,
            config,
            rewards,
            step: 0,
        })
    }

    fn lr_at(&self, step: u64) -> f64 {
        let c = &self.config;
        if step < c.warmup_steps {
            return c.lr * (step + 1) as f64 / c.warmup_steps as f64;
        }
        match c.schedule {
            Schedule::Constant => c.lr,
            Schedule::Cosine => {
                let span = c.total_steps.saturating_sub(c.warmup_steps).max(1) as f64;
                let progress = ((step - c.warmup_steps) as f64 / span).min(1.0);
                c.lr * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
            }
        }
    }

    fn sampling(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.config.temperature,
            top_k: None,
            top_p: self.config.top_p,
        }
    }

    fn seeds(&self, salt: usize) -> Vec<u64> {
        let base = self
            .config
            .seed
            .wrapping_mul(1_000_003)
            .wrapping_add(self.step * 10_007 + salt as u64 * 101);
        (0..self.config.group_size as u64)
            .map(|g| base.wrapping_add(g))
            .collect()
    }

    /// One GRPO step on `items`: fresh rollouts scored by the trainer's rewards.
    pub fn step(&mut self, items: &[TrainItem]) -> Result<StepMetrics, RlError> {
        let started = Instant::now();
        let (und, gen) = self.without_graph(|| {
            Ok::<_, RlError>((
                self.rollout_understanding(items)?,
                self.rollout_generation(items)?,
            ))
        })?;
        let rollout_s = started.elapsed().as_secs_f64();
        let rewards = std::mem::take(&mut self.rewards);
        let result = self.score_and_optimize(&rewards, items, und, gen, started, rollout_s);
        self.rewards = rewards;
        result
    }

    /// One GRPO step on groups the server served, scored by their stored
    /// scores (the [`HumanFeedback`] reward), with their behaviour log-probs
    /// as the old policy: the importance ratio and clipping make these
    /// off-policy samples usable.
    pub fn step_served(&mut self, groups: &[ServedGroup]) -> Result<StepMetrics, RlError> {
        let started = Instant::now();
        let (items, und, gen) = served_rollouts(groups)?;
        let rewards = [RewardTask::Understanding, RewardTask::Generation].map(|task| Weighted {
            reward: Box::new(HumanFeedback(task)),
            weight: 1.0,
        });
        self.score_and_optimize(&rewards, &items, und, gen, started, 0.0)
    }

    fn score_and_optimize(
        &mut self,
        rewards: &[Weighted],
        items: &[TrainItem],
        und: Rollouts,
        gen: Rollouts,
        started: Instant,
        rollout_s: f64,
    ) -> Result<StepMetrics, RlError> {
        let reward_started = Instant::now();
        let TaskScores {
            total: r_und,
            mut means,
        } = self.without_graph(|| self.score(rewards, items, RewardTask::Understanding, &und))?;
        let TaskScores {
            total: r_gen,
            means: gen_means,
        } = self.without_graph(|| self.score(rewards, items, RewardTask::Generation, &gen))?;
        means.extend(gen_means);
        let reward_s = reward_started.elapsed().as_secs_f64();

        let (adv_und, adv_gen, zero_variance) = self.advantages(&und, &r_und, &gen, &r_gen);
        let mean = |v: &[f32]| {
            (!v.is_empty()).then(|| v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64)
        };
        let mut metrics = StepMetrics {
            step: self.step,
            lr: self.lr_at(self.step),
            reward_understanding: mean(&r_und),
            reward_generation: mean(&r_gen),
            rewards: means,
            advantage_abs_mean: mean(
                &adv_und
                    .iter()
                    .chain(&adv_gen)
                    .map(|a| a.abs())
                    .collect::<Vec<_>>(),
            )
            .unwrap_or(0.0),
            zero_variance_groups: zero_variance,
            tokens: und
                .rows
                .iter()
                .chain(&gen.rows)
                .map(|r| r.tokens.len())
                .sum(),
            rollout_s,
            reward_s,
            ..Default::default()
        };

        let train_started = Instant::now();
        let prepared = self.prepare(items, &und, &gen)?;
        let mut old = self.behaviour_logps(&und, &gen, prepared.und_len)?;
        // The reference policy does not change within a step.
        let mut reference = None;
        let mut grads_total: Vec<Option<Tensor>> = Vec::new();
        let mut applied = true;
        let iterations = self.config.num_iterations.max(1);
        // Later iterations run on updated weights: an abandoned one must
        // take the earlier updates back.
        let before = if iterations > 1 {
            Some(self.snapshot()?)
        } else {
            None
        };
        for iteration in 0..iterations {
            let pass = loop {
                let pass = self.loss_and_grads(
                    &prepared,
                    &adv_und,
                    &adv_gen,
                    old.as_ref(),
                    reference.as_ref(),
                )?;
                let overflowed =
                    pass.loss.is_finite() && pass.grads.iter().flatten().any(|g| !all_finite(g));
                if !overflowed || !self.loss_scale.back_off() {
                    break pass;
                }
                tracing::debug!(
                    factor = self.loss_scale.factor,
                    "gradients overflowed: loss scale lowered"
                );
            };
            metrics.loss = pass.loss;
            metrics.kl = pass.kl;
            metrics.clip_fraction = pass.clip_fraction;
            if !pass.loss.is_finite() || pass.grads.iter().flatten().any(|g| !all_finite(g)) {
                tracing::warn!(
                    step = self.step,
                    iteration,
                    "non-finite loss or gradient: step abandoned"
                );
                if let (Some(before), true) = (before, iteration > 0) {
                    self.restore(before)?;
                }
                applied = false;
                break;
            }
            if old.is_none() {
                old = Some(pass.logps);
            }
            if reference.is_none() {
                reference = Some(pass.reference);
            }
            grads_total = pass.grads;
            let update_started = Instant::now();
            metrics.grad_norm = self.clip_and_apply(&mut grads_total)?;
            self.loss_scale.applied();
            metrics.update_s += update_started.elapsed().as_secs_f64();
        }
        metrics.train_s = train_started.elapsed().as_secs_f64() - metrics.update_s;
        metrics.applied = applied && !grads_total.is_empty();
        metrics.tokens_per_s = metrics.tokens as f64 / started.elapsed().as_secs_f64();
        self.step += 1;
        Ok(metrics)
    }

    /// The trainable state a step changes: parameter values (copied) and
    /// the optimizer's moments and step.
    fn snapshot(&self) -> Result<Snapshot, RlError> {
        Ok(Snapshot {
            params: self.optimizer.values(self.adaptation.params())?,
            moments: self.optimizer.moments_copy()?,
            optimizer_step: self.optimizer.step,
        })
    }

    fn restore(&mut self, snapshot: Snapshot) -> Result<(), RlError> {
        self.optimizer
            .set_values(self.adaptation.params(), &snapshot.params)?;
        self.optimizer.moments = snapshot.moments;
        self.optimizer.step = snapshot.optimizer_step;
        Ok(())
    }

    fn logprob_temperature(&self) -> f64 {
        self.config
            .logprob_temperature
            .unwrap_or(self.config.temperature.max(1e-3) as f64)
    }

    /// Runs `f` (sampling from the policy: rollouts, model-judged rewards)
    /// with the adapters recording no gradient graph. Full fine-tuning
    /// samples through its trainable weights and still records one.
    fn without_graph<T>(&self, f: impl FnOnce() -> T) -> T {
        match &self.adaptation {
            Adaptation::Lora(lora) => {
                // Restores what it found, so that calls nest.
                let was = lora.set_recording(false);
                let out = f();
                lora.set_recording(was);
                out
            }
            Adaptation::Full { .. } => f(),
        }
    }

    /// Runs `f` on the reference policy.
    fn with_reference<T, E>(&self, f: impl FnOnce(&Janus) -> Result<T, E>) -> Result<T, E> {
        match &self.adaptation {
            Adaptation::Lora(lora) => {
                lora.set_enabled(false);
                let out = f(&self.bundle.model);
                lora.set_enabled(true);
                out
            }
            Adaptation::Full { reference, .. } => f(reference),
        }
    }
}
