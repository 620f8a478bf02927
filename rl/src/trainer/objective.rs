//! The optimisation half of a step: group advantages (unified where an
//! item has both tasks), the clipped objective over micro-batches with
//! gradient accumulation, and the clipped AdamW update.

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use ulm_model::ops::{compute_dtype, Pass};
use ulm_model::Janus;

use super::prepared::Prepared;
use super::rollout::{Rollouts, Row};
use super::Trainer;
use crate::grpo::{
    clip_grad_norm, generation_states, group_advantages, objective, understanding_states,
    ObjectiveConfig, ScoringStates, T2iAlignment,
};
use crate::RlError;

/// Detached log-probs of both tasks' rows: the "old" policy of later
/// passes, or the reference policy's (computed once per step).
pub(super) struct TaskLogps {
    pub(super) understanding: Option<Tensor>,
    pub(super) generation: Option<Tensor>,
}

/// The scoring states of rows `start..start + n` under a model, in a pass.
type StatesOf<'a> = dyn Fn(&Janus, usize, usize, Pass) -> Result<ScoringStates, RlError> + 'a;

/// The completion mask of rows `start..start + n`, shaped as their log-probs.
type MaskOf<'a> = dyn Fn(usize, usize, &Tensor) -> candle_core::Result<Tensor> + 'a;

/// One task's rows of a pass.
struct TaskRows<'a> {
    rows: usize,
    /// The old policy's log-probs of these rows; none on a first pass.
    old: Option<&'a Tensor>,
    /// The reference policy's log-probs of these rows; none on a first pass.
    reference: Option<&'a Tensor>,
    advantages: &'a [f32],
}

/// One pass's measurements, each task's weighted by its rows' shares.
#[derive(Default)]
struct PassTotals {
    loss: f64,
    kl: f64,
    clip_fraction: f64,
}

/// What one pass of the objective produced.
pub(super) struct PassOutcome {
    pub(super) loss: f64,
    pub(super) kl: f64,
    pub(super) clip_fraction: f64,
    /// Accumulated over micro-batches, one per parameter.
    pub(super) grads: Vec<Option<Tensor>>,
    pub(super) logps: TaskLogps,
    /// The reference policy's log-probs (none where beta is 0).
    pub(super) reference: TaskLogps,
}

impl Trainer {
    /// Per-row advantages of each task; unified where an item has both.
    pub(super) fn advantages(
        &self,
        und: &Rollouts,
        r_und: &[f32],
        gen: &Rollouts,
        r_gen: &[f32],
    ) -> (Vec<f32>, Vec<f32>, usize) {
        let lambda = self.config.unified_lambda as f32;
        let per_group = |r: &Rollouts, rewards: &[f32]| -> Vec<f32> {
            r.ranges()
                .into_iter()
                .flat_map(|range| group_advantages(&rewards[range.clone()], range.len()))
                .collect()
        };
        let mut adv_und = per_group(und, r_und);
        let mut adv_gen = per_group(gen, r_gen);
        let (und_ranges, gen_ranges) = (und.ranges(), gen.ranges());
        for (gi, &item) in gen.items.iter().enumerate() {
            let Some(ui) = und.items.iter().position(|&i| i == item) else {
                continue;
            };
            let (gr, ur) = (gen_ranges[gi].clone(), und_ranges[ui].clone());
            if gr.len() != ur.len() {
                continue;
            }
            let unified: Vec<f32> = gr
                .clone()
                .zip(ur.clone())
                .map(|(a, b)| r_gen[a] + lambda * r_und[b])
                .collect();
            let a = group_advantages(&unified, unified.len());
            adv_gen[gr].copy_from_slice(&a);
            adv_und[ur].copy_from_slice(&a);
        }
        let zero = und_ranges
            .iter()
            .map(|r| &adv_und[r.clone()])
            .chain(gen_ranges.iter().map(|r| &adv_gen[r.clone()]))
            .filter(|c| c.iter().all(|&a| a == 0.0))
            .count();
        (adv_und, adv_gen, zero)
    }

    /// The sampler's log-probs as the "old" policy of the importance ratio,
    /// when they score the same quantity as the training forward (same
    /// temperature; image tokens scored at the predicting position).
    /// Otherwise the first pass's detached log-probs serve.
    pub(super) fn behaviour_logps(
        &self,
        und: &Rollouts,
        gen: &Rollouts,
        l: usize,
    ) -> Result<Option<TaskLogps>, RlError> {
        let same_temperature =
            (self.logprob_temperature() - self.config.temperature as f64).abs() < 1e-9;
        if !same_temperature || self.config.alignment != T2iAlignment::Predicting {
            return Ok(None);
        }
        let dev = self.bundle.model.device();
        let dtype = compute_dtype(self.bundle.model.dtype());
        let padded = |rows: &[Row], width: usize| -> candle_core::Result<Option<Tensor>> {
            if rows.is_empty() {
                return Ok(None);
            }
            let data: Vec<f32> = rows
                .iter()
                .flat_map(|r| {
                    r.logprobs
                        .iter()
                        .copied()
                        .chain(std::iter::repeat(0.0))
                        .take(width)
                })
                .collect();
            Tensor::from_vec(data, (rows.len(), width), dev)?
                .to_dtype(dtype)
                .map(Some)
        };
        let m = gen.rows.first().map_or(0, |r| r.tokens.len());
        Ok(Some(TaskLogps {
            understanding: padded(&und.rows, l)?,
            generation: padded(&gen.rows, m)?,
        }))
    }

    /// One pass of the objective over the prepared rollouts, with gradients.
    /// Each task's loss is a mean over its rows; micro-batches weigh by
    /// their share, and the tasks' losses add.
    pub(super) fn loss_and_grads(
        &self,
        p: &Prepared,
        adv_und: &[f32],
        adv_gen: &[f32],
        old: Option<&TaskLogps>,
        reference: Option<&TaskLogps>,
    ) -> Result<PassOutcome, RlError> {
        let dev = self.bundle.model.device();
        let mut grads: Vec<Option<Tensor>> = vec![None; self.adaptation.params().len()];
        let temperature = self.logprob_temperature();
        let align = self.config.alignment;
        let mut totals = PassTotals::default();
        let understanding = TaskRows {
            rows: p.und_ids.len(),
            old: old.and_then(|o| o.understanding.as_ref()),
            reference: reference.and_then(|r| r.understanding.as_ref()),
            advantages: adv_und,
        };
        let und_states = |m: &Janus, start, n, pass| -> Result<ScoringStates, RlError> {
            let tensors = p.und_tensors(start, n, dev)?;
            let batch = p.und_batch(&tensors, start, n);
            Ok(understanding_states(m, &batch, temperature, pass)?)
        };
        let und_mask = |start: usize, n: usize, _: &Tensor| {
            let mask = &p.und_completion_mask[start * p.und_len..(start + n) * p.und_len];
            Tensor::from_vec(mask.to_vec(), (n, p.und_len), dev)
        };
        let (old_und, ref_und) = self.task_pass(
            understanding,
            &und_states,
            &und_mask,
            &mut grads,
            &mut totals,
        )?;
        let generation = TaskRows {
            rows: p.gen_prompt.len(),
            old: old.and_then(|o| o.generation.as_ref()),
            reference: reference.and_then(|r| r.generation.as_ref()),
            advantages: adv_gen,
        };
        let gen_states = |m: &Janus, start, n, pass| -> Result<ScoringStates, RlError> {
            let tensors = p.gen_tensors(start, n, dev)?;
            let batch = p.gen_batch(&tensors, start, n);
            Ok(generation_states(m, &batch, temperature, align, pass)?)
        };
        // Every image token counts.
        let gen_mask = |_: usize, _: usize, logps: &Tensor| Tensor::ones_like(logps);
        let (old_gen, ref_gen) =
            self.task_pass(generation, &gen_states, &gen_mask, &mut grads, &mut totals)?;
        let tasks = (old_und.is_some() as usize + old_gen.is_some() as usize).max(1) as f64;
        Ok(PassOutcome {
            loss: totals.loss,
            kl: totals.kl / tasks,
            clip_fraction: totals.clip_fraction / tasks,
            grads,
            logps: TaskLogps {
                understanding: old_und,
                generation: old_gen,
            },
            reference: TaskLogps {
                understanding: ref_und,
                generation: ref_gen,
            },
        })
    }

    /// The objective over one task's rows, micro-batch by micro-batch:
    /// gradients accumulate into `grads`, measurements into `totals`.
    /// Returns the pass's old and reference log-probs (the given ones, or
    /// those computed on a first pass); none without rows.
    ///
    /// The backward pass runs in two stages so that no `[rows, length,
    /// vocab]` tensor is kept: the objective's gradient with respect to the
    /// log-probs first (they are a leaf here), then that through the head
    /// chunk by chunk and the network once ([`ScoringStates::backward`]).
    fn task_pass(
        &self,
        task: TaskRows,
        states_of: &StatesOf,
        mask_of: &MaskOf,
        grads: &mut [Option<Tensor>],
        totals: &mut PassTotals,
    ) -> Result<(Option<Tensor>, Option<Tensor>), RlError> {
        let model = &self.bundle.model;
        let cfg = ObjectiveConfig {
            beta: self.config.beta,
            epsilon_low: self.config.epsilon_low,
            epsilon_high: self.config.epsilon_high,
        };
        let micro = self.config.micro_batch_rows.max(1);
        let (mut olds, mut references) = (Vec::new(), Vec::new());
        for start in (0..task.rows).step_by(micro) {
            let n = micro.min(task.rows - start);
            let states = states_of(model, start, n, Pass::Training)?;
            let logps = Var::from_tensor(&states.logp_values(model)?)?;
            let reference = match task.reference {
                Some(r) => Some(r.narrow(0, start, n)?),
                None if self.config.beta != 0.0 => Some(self.with_reference(|m| {
                    Ok::<_, RlError>(states_of(m, start, n, Pass::Inference)?.logp_values(m)?)
                })?),
                None => None,
            };
            let old_logps = match task.old {
                Some(o) => o.narrow(0, start, n)?,
                None => logps.as_tensor().copy()?,
            };
            let mask = mask_of(start, n, logps.as_tensor())?;
            let adv = Tensor::new(&task.advantages[start..start + n], model.device())?;
            let o = objective(
                logps.as_tensor(),
                &old_logps,
                reference.as_ref(),
                &adv,
                &mask,
                cfg,
            )?;
            let share = n as f64 / task.rows as f64;
            let upstream = match (o.loss.clone() * share)?.backward()?.get(&logps) {
                Some(g) => g.detach(),
                None => logps.zeros_like()?,
            };
            let scale = self.loss_scale.factor;
            for store in states.backward(model, &upstream, scale)? {
                self.add_grads(&store, grads)?;
            }
            totals.loss += scalar(&o.loss)? * share;
            totals.kl += o.kl * share;
            totals.clip_fraction += o.clip_fraction * share;
            olds.push(old_logps);
            references.extend(reference);
        }
        let cat = |parts: &[Tensor]| -> Result<Option<Tensor>, RlError> {
            Ok(if parts.is_empty() {
                None
            } else {
                Some(Tensor::cat(parts, 0)?)
            })
        };
        Ok((cat(&olds)?, cat(&references)?))
    }

    /// Adds the parameters' gradients of `store` into `grads`: in f32 for
    /// half-precision parameters, divided by [`Trainer::loss_scale`] (the
    /// backward pass ran on the scaled loss).
    fn add_grads(&self, store: &GradStore, grads: &mut [Option<Tensor>]) -> Result<(), RlError> {
        let scale = self.loss_scale.factor;
        for ((_, var), acc) in self.adaptation.params().iter().zip(grads.iter_mut()) {
            if let Some(g) = store.get(var) {
                // Detached: a gradient records the ops that made it, and
                // would keep this micro-batch's whole graph alive.
                let g = g.detach().to_dtype(compute_dtype(g.dtype()))?;
                // Unscaled without a copy when there is nothing to unscale.
                let g = if scale == 1.0 { g } else { (g / scale)? };
                *acc = Some(match acc.take() {
                    Some(a) => (a + g)?,
                    None => g,
                });
            }
        }
        Ok(())
    }

    /// Clips the global gradient norm, applies AdamW, returns the pre-clip norm.
    pub(super) fn clip_and_apply(&mut self, grads: &mut [Option<Tensor>]) -> Result<f64, RlError> {
        let norm = clip_grad_norm(grads, self.config.max_grad_norm)?;
        self.optimizer.lr = self.lr_at(self.step);
        self.optimizer.apply(self.adaptation.params(), grads)?;
        Ok(norm)
    }
}

pub(super) fn scalar(t: &Tensor) -> candle_core::Result<f64> {
    t.to_dtype(DType::F64)?.to_scalar::<f64>()
}

pub(super) fn all_finite(t: &Tensor) -> bool {
    t.to_dtype(DType::F64)
        .and_then(|t| t.sum_all())
        .and_then(|s| s.to_scalar::<f64>())
        .is_ok_and(f64::is_finite)
}
