//! Rewards behind one trait, so built-in functions, the model's own
//! judgements and user-defined ones combine the same way.

use image::RgbImage;

use super::rewards::{format_reward, format_tag_reward, max_match_similarity, qa_accuracy, QaType};
use crate::model::image_processor::ImageProcessorConfig;
use crate::model::ops::Pass;
use crate::model::processor::Processor;
use crate::model::{Janus, ModelError};

/// The task a reward judges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RewardTask {
    Understanding,
    Generation,
}

/// A question about an image, with its reference answer.
#[derive(Debug, Clone)]
pub struct QaItem {
    pub image: RgbImage,
    pub question: String,
    pub solution: String,
    pub qa_type: QaType,
}

/// One training prompt: a QA item, a caption to draw, or both (CoRL's
/// unified data, where both tasks share an advantage).
#[derive(Debug, Clone, Default)]
pub struct TrainItem {
    pub qa: Option<QaItem>,
    pub caption: Option<String>,
}

/// What a reward sees of one sample.
pub struct Scored<'a> {
    pub item: &'a TrainItem,
    /// Answer text (understanding) or generated image (generation).
    pub text: Option<&'a str>,
    pub image: Option<&'a RgbImage>,
    /// The sampled token ids (answer tokens or image codes).
    pub tokens: &'a [u32],
}

/// What a reward may use besides the sample: the current model.
pub struct RewardContext<'a> {
    pub model: &'a Janus,
    pub processor: &'a Processor,
    pub image_processor: &'a ImageProcessorConfig,
}

pub trait Reward: Send + Sync {
    fn name(&self) -> &str;
    fn task(&self) -> RewardTask;
    /// One score per sample.
    fn score(&self, ctx: &RewardContext, samples: &[Scored]) -> Result<Vec<f32>, ModelError>;
}

/// `<think>…</think><answer>…</answer>` exactly.
pub struct Format;

impl Reward for Format {
    fn name(&self) -> &str {
        "format"
    }
    fn task(&self) -> RewardTask {
        RewardTask::Understanding
    }
    fn score(&self, _: &RewardContext, samples: &[Scored]) -> Result<Vec<f32>, ModelError> {
        Ok(samples
            .iter()
            .map(|s| format_reward(s.text.unwrap_or_default()) as f32)
            .collect())
    }
}

/// 0.125 per think/answer tag present exactly once.
pub struct FormatTag;

impl Reward for FormatTag {
    fn name(&self) -> &str {
        "format_tag"
    }
    fn task(&self) -> RewardTask {
        RewardTask::Understanding
    }
    fn score(&self, _: &RewardContext, samples: &[Scored]) -> Result<Vec<f32>, ModelError> {
        Ok(samples
            .iter()
            .map(|s| format_tag_reward(s.text.unwrap_or_default()) as f32)
            .collect())
    }
}

/// Answer accuracy against the item's solution (multiple choice or open-ended).
pub struct QaAccuracy;

impl Reward for QaAccuracy {
    fn name(&self) -> &str {
        "qa_accuracy"
    }
    fn task(&self) -> RewardTask {
        RewardTask::Understanding
    }
    fn score(&self, _: &RewardContext, samples: &[Scored]) -> Result<Vec<f32>, ModelError> {
        Ok(samples
            .iter()
            .map(|s| match &s.item.qa {
                Some(qa) => qa_accuracy(
                    s.text.unwrap_or_default(),
                    &qa.solution,
                    &qa.question,
                    qa.qa_type,
                ) as f32,
                None => 0.0,
            })
            .collect())
    }
}

/// Positions after the image span that the reference skips before the
/// caption rows (`<end_of_image>`, the newline and the first three caption
/// tokens in the real layout: 586 - 581 in the original hard-coded slices).
pub const T2I_MATCH_TEXT_OFFSET: usize = 5;

/// CoRL's text-image matching: the model reads its own image with the
/// caption; the reward is the max-match cosine similarity between the
/// hidden states of the image tokens and of the caption tokens.
pub struct T2iMatch;

impl T2iMatch {
    /// The reward of one image/caption pair, and the hidden states it used.
    pub fn one(ctx: &RewardContext, image: &RgbImage, caption: &str) -> Result<f64, ModelError> {
        let prompt = ctx.processor.understanding_prompt(caption)?;
        let (start, n) = prompt
            .image_span()
            .ok_or_else(|| ModelError::InvalidInput("the prompt has no image span".into()))?;
        let text_start = start + n + T2I_MATCH_TEXT_OFFSET;
        let t = prompt.ids.len();
        if text_start >= t {
            return Ok(0.0);
        }
        let model = ctx.model;
        let pixels = ctx
            .image_processor
            .preprocess(image, model.device())?
            .unsqueeze(0)?;
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
    fn score(&self, ctx: &RewardContext, samples: &[Scored]) -> Result<Vec<f32>, ModelError> {
        samples
            .iter()
            .map(|s| match (s.image, s.item.caption.as_deref()) {
                (Some(img), Some(caption)) => Ok(Self::one(ctx, img, caption)? as f32),
                _ => Ok(0.0),
            })
            .collect()
    }
}

/// A reward and its weight in its task's sum.
pub struct Weighted {
    pub reward: Box<dyn Reward>,
    pub weight: f64,
}

/// A task's rewards: the weighted sum per sample and each function's mean.
pub struct TaskScores {
    pub total: Vec<f32>,
    pub means: Vec<(String, f64)>,
}

/// Per-task weighted sums; also reports every function's mean.
pub fn score_task(
    rewards: &[Weighted],
    task: RewardTask,
    ctx: &RewardContext,
    samples: &[Scored],
) -> Result<TaskScores, ModelError> {
    let mut total = vec![0f32; samples.len()];
    let mut means = Vec::new();
    for w in rewards.iter().filter(|w| w.reward.task() == task) {
        let scores = w.reward.score(ctx, samples)?;
        if scores.len() != samples.len() {
            return Err(ModelError::InvalidInput(format!(
                "reward {} returned {} scores for {} samples",
                w.reward.name(),
                scores.len(),
                samples.len()
            )));
        }
        let mean = scores.iter().map(|&s| s as f64).sum::<f64>() / scores.len().max(1) as f64;
        means.push((w.reward.name().to_string(), mean));
        for (t, s) in total.iter_mut().zip(scores) {
            *t += (w.weight as f32) * s;
        }
    }
    Ok(TaskScores { total, means })
}
