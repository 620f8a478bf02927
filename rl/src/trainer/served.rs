//! Served samples under any policy: log-probs of stored groups, prepared
//! once and scored under the candidate, the active version and the base
//! (the evaluation gate's inputs).

use candle_core::DType;
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
        })
    }

    /// Per-token log-probs of prepared served samples under `model`
    /// (inference pass): one vector per sample, groups in order.
    pub fn served_logps(
        &self,
        model: &Janus,
        served: &PreparedServed,
    ) -> Result<Vec<Vec<f32>>, RlError> {
        let [und_logps, gen_logps] = self.inference_logps(model, &served.prepared)?;
        // Back to the callers' group order.
        let (mut und_rows, mut gen_rows) = (und_logps.into_iter(), gen_logps.into_iter());
        served
            .order
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

    /// [`Self::served_logps`] under the reference policy (the base model).
    pub fn served_reference_logps(
        &self,
        served: &PreparedServed,
    ) -> Result<Vec<Vec<f32>>, RlError> {
        self.with_reference(|m| self.served_logps(m, served))
    }

    /// Valid-token log-probs of every prepared row: (understanding,
    /// generation). The adapters are read detached meanwhile: nothing here
    /// is differentiated, and the forward then runs as serving's does.
    pub(super) fn inference_logps(
        &self,
        model: &Janus,
        p: &Prepared,
    ) -> Result<[RowLogps; 2], ModelError> {
        self.without_graph(|| self.row_logps(model, p))
    }

    fn row_logps(&self, model: &Janus, p: &Prepared) -> Result<[RowLogps; 2], ModelError> {
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
            let tensors = p.gen_tensors(start, n, dev)?;
            let batch = p.gen_batch(&tensors, start, n);
            let logps = generation_states(
                model,
                &batch,
                temperature,
                self.config.alignment,
                Pass::Inference,
            )?
            .logp_values(model)?;
            gen.extend(logps.to_dtype(DType::F32)?.to_vec2::<f32>()?);
        }
        Ok([und, gen])
    }
}
