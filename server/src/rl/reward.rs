//! Rewards behind one trait, so built-in functions, the model's own
//! judgements and user-defined ones combine the same way.

use image::RgbImage;

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use super::rewards::{
    format_reward, format_tag_reward, max_match_similarity, qa_accuracy, soft_jaccard, QaType,
};
use crate::model::bundle::ModelBundle;
use crate::model::generate::{answer_batch, AnswerItem, TextPrompt};
use crate::model::image_processor::ImageProcessorConfig;
use crate::model::ops::Pass;
use crate::model::processor::Processor;
use crate::model::sampling::SamplingParams;
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
    /// The score a person (or a reference answer) gave this served sample.
    pub human_score: Option<f32>,
}

/// What a reward may use besides the sample: the current model.
pub struct RewardContext<'a> {
    pub model: &'a Janus,
    pub processor: &'a Processor,
    pub image_processor: &'a ImageProcessorConfig,
}

impl<'a> RewardContext<'a> {
    /// The context of a loaded model.
    pub fn of(bundle: &'a ModelBundle) -> Self {
        Self {
            model: &bundle.model,
            processor: &bundle.processor,
            image_processor: &bundle.image_processor,
        }
    }
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
    /// The reward of one image/caption pair.
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
    fn score(&self, ctx: &RewardContext, samples: &[Scored]) -> Result<Vec<f32>, ModelError> {
        let model = ctx.model;
        let prompt = ctx.processor.understanding_prompt(&self.question)?;
        let mut items = Vec::new();
        for s in samples {
            let image = s
                .image
                .ok_or_else(|| ModelError::InvalidInput("self_cycle needs images".into()))?;
            items.push(AnswerItem {
                prompt: TextPrompt {
                    prompt: prompt.clone(),
                    pixels: Some(
                        ctx.image_processor
                            .preprocess(image, model.device())?
                            .unsqueeze(0)?,
                    ),
                    samples: 1,
                },
                max_new_tokens: self.max_new_tokens,
                sampling: SamplingParams::greedy(),
                seeds: vec![0],
            });
        }
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let special = ctx.processor.special;
        let captions = answer_batch(model, &items, special.eos, special.pad, &mut |_| true)?;
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

/// One sample as posted to an external reward service.
#[derive(Debug, Serialize)]
pub struct ExternalSample<'a> {
    /// The caption (generation) or question (understanding).
    pub prompt: &'a str,
    /// The answer (understanding).
    pub text: Option<&'a str>,
    /// The generated image, PNG, base64 (generation).
    pub image_png_base64: Option<String>,
    /// The reference answer, when the item has one.
    pub solution: Option<&'a str>,
}

#[derive(Debug, Serialize)]
struct ExternalRequest<'a> {
    task: &'a str,
    samples: Vec<ExternalSample<'a>>,
}

#[derive(Debug, Deserialize)]
struct ExternalResponse {
    scores: Vec<f32>,
}

/// A user's own reward model behind HTTP: `POST url` with
/// `{"task", "samples": [...]}`, answered by `{"scores": [...]}`, one per sample.
pub struct HttpReward {
    pub name: String,
    pub url: String,
    pub task: RewardTask,
    pub timeout: std::time::Duration,
}

impl Reward for HttpReward {
    fn name(&self) -> &str {
        &self.name
    }
    fn task(&self) -> RewardTask {
        self.task
    }
    fn score(&self, _: &RewardContext, samples: &[Scored]) -> Result<Vec<f32>, ModelError> {
        let fail = |m: String| {
            ModelError::InvalidInput(format!("reward {} ({}): {m}", self.name, self.url))
        };
        let mut body = Vec::with_capacity(samples.len());
        for s in samples {
            let image_png_base64 = match s.image {
                Some(img) => {
                    let mut png = std::io::Cursor::new(Vec::new());
                    img.write_to(&mut png, image::ImageFormat::Png)
                        .map_err(|e| fail(e.to_string()))?;
                    Some(base64::engine::general_purpose::STANDARD.encode(png.into_inner()))
                }
                None => None,
            };
            let qa = s.item.qa.as_ref();
            body.push(ExternalSample {
                prompt: match self.task {
                    RewardTask::Generation => s.item.caption.as_deref().unwrap_or_default(),
                    RewardTask::Understanding => qa.map_or("", |q| q.question.as_str()),
                },
                text: s.text,
                image_png_base64,
                solution: qa.map(|q| q.solution.as_str()),
            });
        }
        let task = match self.task {
            RewardTask::Generation => "generation",
            RewardTask::Understanding => "understanding",
        };
        let response = reqwest::blocking::Client::builder()
            .timeout(self.timeout)
            .build()
            .map_err(|e| fail(e.to_string()))?
            .post(&self.url)
            .json(&ExternalRequest {
                task,
                samples: body,
            })
            .send()
            .map_err(|e| fail(e.to_string()))?;
        if !response.status().is_success() {
            return Err(fail(format!("status {}", response.status())));
        }
        let scores = response
            .json::<ExternalResponse>()
            .map_err(|e| fail(e.to_string()))?
            .scores;
        if scores.len() != samples.len() || scores.iter().any(|s| !s.is_finite()) {
            return Err(fail(format!(
                "expected {} finite scores, got {:?}",
                samples.len(),
                scores
            )));
        }
        Ok(scores)
    }
}

/// The score stored with a served sample: human feedback, or accuracy
/// against a reference answer given as a correction, for samples of one
/// task. Samples without one score 0.
pub struct HumanFeedback(pub RewardTask);

impl Reward for HumanFeedback {
    fn name(&self) -> &str {
        "human_feedback"
    }
    fn task(&self) -> RewardTask {
        self.0
    }
    fn score(&self, _: &RewardContext, samples: &[Scored]) -> Result<Vec<f32>, ModelError> {
        Ok(samples
            .iter()
            .map(|s| s.human_score.unwrap_or(0.0))
            .collect())
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
