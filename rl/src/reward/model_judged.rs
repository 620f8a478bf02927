//! Rewards the policy judges itself, as CoRL does for generation:
//! text-image matching on its own hidden states, and cycle consistency
//! through its own captioning.

use image::RgbImage;
use ulm_model::decode::TextPrompt;
use ulm_model::generate::{answer_batch, AnswerItem};
use ulm_model::ops::Pass;
use ulm_model::sampling::SamplingParams;

use super::verifiable::{max_match_similarity, soft_jaccard};
use super::{Reward, RewardContext, RewardTask, Scored};
use crate::RlError;

/// Positions after the image span that the reference skips before the
/// caption rows (`<end_of_image>`, the newline and the first three caption
/// tokens in the real layout: 586 - 581 in the original hard-coded slices).
pub const T2I_MATCH_TEXT_OFFSET: usize = 5;

/// CoRL's text-image matching: the model reads its own image with the
/// caption; the reward is the max-match cosine similarity between the
/// hidden states of the image tokens and of the caption tokens.
pub struct T2iMatch;

impl T2iMatch {
    /// The reward of one image/caption pair.
    pub fn one(ctx: &RewardContext, image: &RgbImage, caption: &str) -> Result<f64, RlError> {
        let model = ctx.model;
        let TextPrompt { prompt, pixels, .. } = ctx.question(image, caption, 1)?;
        let (start, n) = prompt
            .image_span()
            .ok_or_else(|| RlError::InvalidData("the prompt has no image span".into()))?;
        let text_start = start + n + T2I_MATCH_TEXT_OFFSET;
        let t = prompt.ids.len();
        let Some(pixels) = pixels.filter(|_| text_start < t) else {
            return Ok(0.0);
        };
        let image_embeds = model.image_embeds(&pixels, Pass::Inference)?;
        let ids = candle_core::Tensor::new(prompt.ids.as_slice(), model.device())?.unsqueeze(0)?;
        let embeds = model.merge_image_embeds(
            &ids,
            std::slice::from_ref(&prompt.images_seq_mask),
            Some(&image_embeds),
        )?;
        let lm = &model.language_model;
        let ctx_attn = lm.context(&[(0..t as u32).collect()], &[vec![true; t]])?;
        let hidden = lm
            .forward_hidden(&embeds, &ctx_attn, None, Pass::Inference)?
            .squeeze(0)?;
        let hidden = hidden.to_dtype(candle_core::DType::F32)?;
        Ok(max_match_similarity(
            &hidden.narrow(0, start, n)?,
            &hidden.narrow(0, text_start, t - text_start)?,
        )?)
    }
}

impl Reward for T2iMatch {
    fn name(&self) -> &str {
        "t2i_match"
    }
    fn task(&self) -> RewardTask {
        RewardTask::Generation
    }
    fn score(&self, ctx: &RewardContext, samples: &[Scored]) -> Result<Vec<f32>, RlError> {
        samples
            .iter()
            .map(|s| match (s.image, s.item.caption.as_deref()) {
                (Some(img), Some(caption)) => Ok(Self::one(ctx, img, caption)? as f32),
                _ => Ok(0.0),
            })
            .collect()
    }
}

/// Bidirectional cycle consistency with the model itself: it captions its
/// own image, and the caption is compared with the prompt by soft Jaccard.
/// (CoRL uses an external captioner and BERTScore; with none available the
/// policy's own understanding closes the cycle.)
pub struct SelfCycle {
    pub question: String,
    pub max_new_tokens: usize,
}

impl Default for SelfCycle {
    fn default() -> Self {
        Self {
            question: "Describe this image in one sentence.".into(),
            max_new_tokens: 48,
        }
    }
}

impl Reward for SelfCycle {
    fn name(&self) -> &str {
        "self_cycle"
    }
    fn task(&self) -> RewardTask {
        RewardTask::Generation
    }
    fn score(&self, ctx: &RewardContext, samples: &[Scored]) -> Result<Vec<f32>, RlError> {
        let mut items = Vec::new();
        for s in samples {
            let image = s
                .image
                .ok_or_else(|| RlError::InvalidData("self_cycle needs images".into()))?;
            items.push(AnswerItem {
                prompt: ctx.question(image, &self.question, 1)?,
                max_new_tokens: self.max_new_tokens,
                sampling: SamplingParams::greedy(),
                seeds: vec![0],
            });
        }
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let special = ctx.processor.special;
        let captions = answer_batch(ctx.model, &items, special.eos, special.pad, &mut |_| true)?;
        Ok(samples
            .iter()
            .zip(captions)
            .map(|(s, out)| {
                let caption = ctx.processor.decode(&out[0].token_ids);
                soft_jaccard(&caption, s.item.caption.as_deref().unwrap_or_default()) as f32
            })
            .collect())
    }
}
