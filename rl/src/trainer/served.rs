//! Served samples under any policy: log-probs of stored groups, prepared
//! once and scored under the candidate, the active version and the base
//! (the evaluation gate's inputs).

use candle_core::{DType, Tensor};
use ulm_model::ops::Pass;
use ulm_model::{Janus, ModelError};

use super::prepared::Prepared;
use super::rollout::{served_rollouts, ServedGroup};
use super::Trainer;
use crate::grpo::{generation_states, understanding_states};
use crate::reward::RewardTask;
use crate::RlError;

/// Served samples ready for [`Trainer::served_logps`].
pub struct PreparedServed {
    prepared: Prepared,
    /// The task of each sample, in the callers' order.
    order: Vec<RewardTask>,
    /// The CFG weight of each image row, in the rows' order.
    guidance: Vec<Option<f32>>,
}

impl PreparedServed {
    /// Rows of each task back to the callers' group order.
    fn in_order(&self, und: RowLogps, gen: RowLogps) -> Result<Vec<Vec<f32>>, RlError> {
        let (mut und_rows, mut gen_rows) = (und.into_iter(), gen.into_iter());
        self.order
            .iter()
            .map(|task| {
                let next = match task {
                    RewardTask::Understanding => und_rows.next(),
                    RewardTask::Generation => gen_rows.next(),
                };
                next.ok_or_else(|| RlError::InvalidData("served log-probs out of step".into()))
            })
            .collect()
    }
}

/// Per-token log-probs of each row.
type RowLogps = Vec<Vec<f32>>;

/// Log-probs of every prepared row under one policy.
struct RowScores {
    und: RowLogps,
    /// Conditional, as GRPO scores images.
    gen: RowLogps,
    /// Under the distribution each image was drawn from (guided where it
    /// was); empty unless asked for.
    gen_drawn: RowLogps,
}

/// Per-token log-probs of served samples under one policy, in the
/// callers' order.
pub struct ServedLogps {
    /// As GRPO scores them: conditional for images.
    pub conditional: Vec<Vec<f32>>,
    /// Under the distribution the policy draws them from when served as
    /// they were: guided for images drawn with guidance. Importance
    /// weights compare these.
    pub sampling: Vec<Vec<f32>>,
}

impl Trainer {
    /// Whether `group` can be trained on: the training forward scores it.
    /// Finds the bad group of a step that failed.
    pub fn probe_served(&self, group: &ServedGroup) -> Result<(), RlError> {
        let prepared = self.prepare_served(std::slice::from_ref(group))?;
        self.served_logps(&self.bundle.model, &prepared).map(|_| ())
    }

    /// Served groups in the shape of the training forward, prepared once
    /// (prompts tokenized, images through the frozen vision tower) to be
    /// scored under several policies.
    pub fn prepare_served(&self, groups: &[ServedGroup]) -> Result<PreparedServed, RlError> {
        let (items, und, gen) = served_rollouts(groups)?;
        Ok(PreparedServed {
            prepared: self.prepare(&items, &und, &gen)?,
            order: groups
                .iter()
                .flat_map(|g| std::iter::repeat_n(g.task, g.samples.len()))
                .collect(),
            guidance: groups
                .iter()
                .filter(|g| g.task == RewardTask::Generation)
                .flat_map(|g| std::iter::repeat_n(g.guidance, g.samples.len()))
                .collect(),
        })
    }

    /// Per-token log-probs of prepared served samples under `model`
    /// (inference pass): one vector per sample, groups in order.
    pub fn served_logps(
        &self,
        model: &Janus,
        served: &PreparedServed,
    ) -> Result<Vec<Vec<f32>>, RlError> {
        let scores = self.inference_logps(model, &served.prepared, None)?;
        served.in_order(scores.und, scores.gen)
    }

    /// [`Self::served_logps`] and the log-probs under the distribution
    /// `model` draws each sample from, from one forward pass.
    pub fn served_sampling_logps(
        &self,
        model: &Janus,
        served: &PreparedServed,
    ) -> Result<ServedLogps, RlError> {
        let scores = self.inference_logps(model, &served.prepared, Some(&served.guidance))?;
        Ok(ServedLogps {
            conditional: served.in_order(scores.und.clone(), scores.gen)?,
            sampling: served.in_order(scores.und, scores.gen_drawn)?,
        })
    }

    /// [`Self::served_logps`] under the reference policy (the base model).
    pub fn served_reference_logps(
        &self,
        served: &PreparedServed,
    ) -> Result<Vec<Vec<f32>>, RlError> {
        self.with_reference(|m| self.served_logps(m, served))
    }

    /// Valid-token log-probs of every prepared row; with `guidance` (one
    /// CFG weight per image row) also those of the distribution each image
    /// was drawn from. The adapters are read detached meanwhile:
    /// nothing here is differentiated, and the forward then runs as
    /// serving's does.
    fn inference_logps(
        &self,
        model: &Janus,
        p: &Prepared,
        guidance: Option<&[Option<f32>]>,
    ) -> Result<RowScores, ModelError> {
        self.without_graph(|| self.row_logps(model, p, guidance))
    }

    fn row_logps(
        &self,
        model: &Janus,
        p: &Prepared,
        guidance: Option<&[Option<f32>]>,
    ) -> Result<RowScores, ModelError> {
        let dev = model.device();
        let temperature = self.logprob_temperature();
        let micro = self.config.micro_batch_rows.max(1);
        let mut und = Vec::new();
        for start in (0..p.und_ids.len()).step_by(micro) {
            let n = micro.min(p.und_ids.len() - start);
            let tensors = p.und_tensors(start, n, dev)?;
            let batch = p.und_batch(&tensors, start, n);
            let logps: Vec<Vec<f32>> =
                understanding_states(model, &batch, temperature, Pass::Inference)?
                    .logp_values(model)?
                    .to_dtype(DType::F32)?
                    .to_vec2()?;
            for (k, row) in logps.into_iter().enumerate() {
                let mask = &p.und_completion_mask[(start + k) * p.und_len..][..p.und_len];
                und.push(
                    row.into_iter()
                        .zip(mask)
                        .filter(|(_, &m)| m > 0.0)
                        .map(|(l, _)| l)
                        .collect(),
                );
            }
        }
        let (mut gen, mut gen_drawn) = (Vec::new(), Vec::new());
        for start in (0..p.gen_prompt.len()).step_by(micro) {
            let n = micro.min(p.gen_prompt.len() - start);
            let states = |tensors: &(Tensor, Tensor)| {
                let batch = p.gen_batch(tensors, start, n);
                let alignment = self.config.alignment;
                generation_states(model, &batch, temperature, alignment, Pass::Inference)
            };
            let rows = |logps: Tensor| logps.to_dtype(DType::F32)?.to_vec2::<f32>();
            let cond = states(&p.gen_tensors(start, n, dev)?)?;
            let conditional = rows(cond.logp_values(model)?)?;
            if let Some(guidance) = guidance {
                // Weight 1 is the conditional distribution itself.
                let weights: Vec<f32> = guidance[start..start + n]
                    .iter()
                    .map(|w| w.unwrap_or(1.0))
                    .collect();
                if weights.iter().any(|&w| w != 1.0) {
                    let uncond = states(&p.gen_uncond_tensors(start, n, dev)?)?;
                    gen_drawn.extend(rows(cond.guided_logp_values(model, &uncond, &weights)?)?);
                } else {
                    gen_drawn.extend(conditional.iter().cloned());
                }
            }
            gen.extend(conditional);
        }
        Ok(RowScores {
            und,
            gen,
            gen_drawn,
        })
    }
}
