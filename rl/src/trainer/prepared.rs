//! Rollouts in the shape of the training forward: prompts and completions
//! as padded id rows with their masks, and the image embeddings of the
//! questions, cut into micro-batches on demand.

use candle_core::Tensor;
use ulm_model::ops::Pass;

use super::rollout::Rollouts;
use super::Trainer;
use crate::grpo::{GenerationBatch, UnderstandingBatch};
use crate::reward::TrainItem;
use crate::RlError;

/// Rollouts in the shape of the training forward.
#[derive(Default)]
pub(super) struct Prepared {
    pub(super) und_ids: Vec<Vec<u32>>,
    pub(super) und_attention: Vec<Vec<bool>>,
    pub(super) und_images_seq: Vec<Vec<bool>>,
    pub(super) und_completion_mask: Vec<f32>,
    pub(super) und_len: usize,
    pub(super) und_image_embeds: Option<Tensor>,
    pub(super) gen_prompt: Vec<Vec<u32>>,
    /// The unconditional twins of `gen_prompt`, padded alike (for CFG).
    pub(super) gen_uncond_prompt: Vec<Vec<u32>>,
    pub(super) gen_prompt_mask: Vec<Vec<bool>>,
    pub(super) gen_completion: Vec<Vec<u32>>,
}

impl Prepared {
    /// Token ids and image embeddings of understanding rows `start..start + n`.
    pub(super) fn und_tensors(
        &self,
        start: usize,
        n: usize,
        dev: &candle_core::Device,
    ) -> candle_core::Result<(Tensor, Option<Tensor>)> {
        let ids = Tensor::new(self.und_ids[start..start + n].to_vec(), dev)?;
        let embeds = self
            .und_image_embeds
            .as_ref()
            .map(|e| e.narrow(0, start, n))
            .transpose()?;
        Ok((ids, embeds))
    }

    pub(super) fn und_batch<'a>(
        &'a self,
        (ids, embeds): &'a (Tensor, Option<Tensor>),
        start: usize,
        n: usize,
    ) -> UnderstandingBatch<'a> {
        UnderstandingBatch {
            ids,
            attention_mask: &self.und_attention[start..start + n],
            images_seq_mask: &self.und_images_seq[start..start + n],
            image_embeds: embeds.as_ref(),
            completion_len: self.und_len,
        }
    }

    /// Prompt and image-token ids of generation rows `start..start + n`.
    pub(super) fn gen_tensors(
        &self,
        start: usize,
        n: usize,
        dev: &candle_core::Device,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        self.gen_rows(&self.gen_prompt, start, n, dev)
    }

    /// [`Self::gen_tensors`] with the unconditional prompts.
    pub(super) fn gen_uncond_tensors(
        &self,
        start: usize,
        n: usize,
        dev: &candle_core::Device,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        self.gen_rows(&self.gen_uncond_prompt, start, n, dev)
    }

    fn gen_rows(
        &self,
        prompts: &[Vec<u32>],
        start: usize,
        n: usize,
        dev: &candle_core::Device,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        Ok((
            Tensor::new(prompts[start..start + n].to_vec(), dev)?,
            Tensor::new(self.gen_completion[start..start + n].to_vec(), dev)?,
        ))
    }

    pub(super) fn gen_batch<'a>(
        &'a self,
        (prompt, completion): &'a (Tensor, Tensor),
        start: usize,
        n: usize,
    ) -> GenerationBatch<'a> {
        GenerationBatch {
            prompt_ids: prompt,
            prompt_mask: &self.gen_prompt_mask[start..start + n],
            completion,
        }
    }
}

impl Trainer {
    pub(super) fn prepare(
        &self,
        items: &[TrainItem],
        und: &Rollouts,
        gen: &Rollouts,
    ) -> Result<Prepared, RlError> {
        let b = &self.bundle;
        let s = b.processor.special;
        let mut prepared = Prepared::default();
        if !und.rows.is_empty() {
            let prompts: Vec<_> = und
                .items
                .iter()
                .map(|&i| {
                    b.processor
                        .understanding_prompt(&items[i].qa.as_ref().expect("qa item").question)
                })
                .collect::<Result<_, _>>()?;
            let t = prompts.iter().map(|p| p.ids.len()).max().unwrap_or(0);
            let l = und
                .rows
                .iter()
                .map(|r| r.tokens.len())
                .max()
                .unwrap_or(0)
                .max(1);
            let mut ids = Vec::new();
            let groups = und.row_groups();
            for (row, &group) in und.rows.iter().zip(&groups) {
                let p = &prompts[group];
                let pad = t - p.ids.len();
                let mut r_ids = vec![s.pad; pad];
                r_ids.extend(&p.ids);
                r_ids.extend(&row.tokens);
                r_ids.extend(std::iter::repeat_n(s.eos, l - row.tokens.len()));
                let mut mask = vec![false; pad];
                mask.extend(std::iter::repeat_n(true, p.ids.len()));
                let valid = row
                    .tokens
                    .iter()
                    .position(|&x| x == s.eos)
                    .map_or(row.tokens.len(), |e| e + 1);
                mask.extend((0..l).map(|i| i < valid));
                let mut seq = vec![false; pad];
                seq.extend(&p.images_seq_mask);
                seq.extend(std::iter::repeat_n(false, l));
                prepared
                    .und_completion_mask
                    .extend((0..l).map(|i| if i < valid { 1f32 } else { 0.0 }));
                ids.push(r_ids);
                prepared.und_attention.push(mask);
                prepared.und_images_seq.push(seq);
            }
            prepared.und_len = l;
            prepared.und_ids = ids;
            let pixels: Vec<Tensor> = und
                .items
                .iter()
                .map(|&i| {
                    b.image_processor.preprocess(
                        &items[i].qa.as_ref().expect("qa item").image,
                        b.model.device(),
                    )
                })
                .collect::<Result<_, _>>()?;
            let embeds = b
                .model
                .image_embeds(&Tensor::stack(&pixels, 0)?, Pass::Inference)?;
            let per_row: Vec<u32> = groups.iter().map(|&g| g as u32).collect();
            prepared.und_image_embeds =
                Some(embeds.index_select(&Tensor::new(per_row.as_slice(), b.model.device())?, 0)?);
        }
        if !gen.rows.is_empty() {
            let prompts: Vec<_> = gen
                .items
                .iter()
                .map(|&i| {
                    b.processor
                        .generation_prompt(items[i].caption.as_deref().unwrap_or_default())
                })
                .collect::<Result<_, _>>()?;
            let p = prompts.iter().map(|x| x.cond_ids.len()).max().unwrap_or(0);
            for (row, group) in gen.rows.iter().zip(gen.row_groups()) {
                let prompt = &prompts[group];
                let pad = p - prompt.cond_ids.len();
                let padded = |ids: &[u32]| {
                    let mut row = vec![s.pad; pad];
                    row.extend(ids);
                    row
                };
                prepared.gen_prompt.push(padded(&prompt.cond_ids));
                prepared.gen_uncond_prompt.push(padded(&prompt.uncond_ids));
                prepared
                    .gen_prompt_mask
                    .push((0..p).map(|i| i >= pad).collect());
                prepared.gen_completion.push(row.tokens.clone());
            }
        }
        Ok(prepared)
    }
}
