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
        let [und, gen] = self.inference_logps(model, &served.prepared, None)?;
        served.in_order(und, gen)
    }

    /// Per-token log-probs of prepared served samples under the
    /// distribution `model` draws them from when served as they were:
    /// guided (CFG) for images drawn with guidance, as
    /// [`Self::served_logps`] otherwise. Importance weights compare these.
    pub fn served_sampling_logps(
        &self,
        model: &Janus,
        served: &PreparedServed,
    ) -> Result<Vec<Vec<f32>>, RlError> {
        let [und, gen] = self.inference_logps(model, &served.prepared, Some(&served.guidance))?;
        served.in_order(und, gen)
    }

    /// [`Self::served_logps`] under the reference policy (the base model).
    pub fn served_reference_logps(
        &self,
        served: &PreparedServed,
    ) -> Result<Vec<Vec<f32>>, RlError> {
        self.with_reference(|m| self.served_logps(m, served))
    }

    /// Valid-token log-probs of every prepared row: (understanding,
    /// generation), image rows guided by `guidance` (one CFG weight per
    /// image row) when given. The adapters are read detached meanwhile:
    /// nothing here is differentiated, and the forward then runs as
    /// serving's does.
    fn inference_logps(
        &self,
        model: &Janus,
        p: &Prepared,
        guidance: Option<&[Option<f32>]>,
    ) -> Result<[RowLogps; 2], ModelError> {
        self.without_graph(|| self.row_logps(model, p, guidance))
    }

    fn row_logps(
        &self,
        model: &Janus,
        p: &Prepared,
        guidance: Option<&[Option<f32>]>,
    ) -> Result<[RowLogps; 2], ModelError> {
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
        let mut gen = Vec::new();
        for start in (0..p.gen_prompt.len()).step_by(micro) {
            let n = micro.min(p.gen_prompt.len() - start);
            let states = |tensors: &(Tensor, Tensor)| {
                let batch = p.gen_batch(tensors, start, n);
                let alignment = self.config.alignment;
                generation_states(model, &batch, temperature, alignment, Pass::Inference)
            };
            let cond = states(&p.gen_tensors(start, n, dev)?)?;
            // Weight 1 is the conditional distribution itself.
            let weights: Option<Vec<f32>> = guidance
                .map(|g| {
                    g[start..start + n]
                        .iter()
                        .map(|w| w.unwrap_or(1.0))
                        .collect()
                })
                .filter(|w: &Vec<f32>| w.iter().any(|&w| w != 1.0));
            let logps = match weights {
                Some(weights) => {
                    let uncond = states(&p.gen_uncond_tensors(start, n, dev)?)?;
                    cond.guided_logp_values(model, &uncond, &weights)?
                }
                None => cond.logp_values(model)?,
            };
            gen.extend(logps.to_dtype(DType::F32)?.to_vec2::<f32>()?);
        }
        Ok([und, gen])
    }
}
