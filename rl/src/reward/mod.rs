//! Rewards behind one trait, so built-in functions, the model's own
//! judgements and user-defined ones combine the same way.

use image::RgbImage;

pub mod external;
pub mod model_judged;
pub mod verifiable;

use crate::RlError;
pub use external::HttpReward;
pub use model_judged::{SelfCycle, T2iMatch, T2I_MATCH_TEXT_OFFSET};
use ulm_model::bundle::ModelBundle;
use ulm_model::decode::TextPrompt;
use ulm_model::image_processor::ImageProcessorConfig;
use ulm_model::processor::Processor;
use ulm_model::Janus;
use verifiable::{format_reward, format_tag_reward, qa_accuracy, QaType};

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
    /// A question about `image` for this model, to decode `samples` times.
    pub fn question(
        &self,
        image: &RgbImage,
        question: &str,
        samples: usize,
    ) -> Result<TextPrompt, RlError> {
        TextPrompt::question(
            self.model,
            self.processor,
            self.image_processor,
            image,
            question,
            samples,
        )
        .map_err(RlError::from)
    }

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
    fn score(&self, ctx: &RewardContext, samples: &[Scored]) -> Result<Vec<f32>, RlError>;
}

/// A reward computed from each answer on its own by one of CoRL's pure
/// functions (see `verifiable`).
#[derive(Clone, Copy)]
pub struct AnswerReward {
    name: &'static str,
    judge: fn(&Scored) -> f64,
}

/// `<think>…</think><answer>…</answer>` exactly.
pub const FORMAT: AnswerReward = AnswerReward {
    name: "format",
    judge: |s| format_reward(s.text.unwrap_or_default()),
};

/// 0.125 per think/answer tag present exactly once.
pub const FORMAT_TAG: AnswerReward = AnswerReward {
    name: "format_tag",
    judge: |s| format_tag_reward(s.text.unwrap_or_default()),
};

/// Answer accuracy against the item's solution (multiple choice or open-ended).
pub const QA_ACCURACY: AnswerReward = AnswerReward {
    name: "qa_accuracy",
    judge: |s| match &s.item.qa {
        Some(qa) => qa_accuracy(
            s.text.unwrap_or_default(),
            &qa.solution,
            &qa.question,
            qa.qa_type,
        ),
        None => 0.0,
    },
};

impl Reward for AnswerReward {
    fn name(&self) -> &str {
        self.name
    }
    fn task(&self) -> RewardTask {
        RewardTask::Understanding
    }
    fn score(&self, _: &RewardContext, samples: &[Scored]) -> Result<Vec<f32>, RlError> {
        Ok(samples.iter().map(|s| (self.judge)(s) as f32).collect())
    }
}

/// The synthetic world's verifier on a generated image: partial credit for
/// what the caption claims (`ulm_world::verify::score`, 1 when it holds).
/// A caption outside the world's language scores 0.
pub struct WorldVerifier;

impl Reward for WorldVerifier {
    fn name(&self) -> &str {
        "verifier"
    }
    fn task(&self) -> RewardTask {
        RewardTask::Generation
    }
    fn score(&self, _: &RewardContext, samples: &[Scored]) -> Result<Vec<f32>, RlError> {
        Ok(samples
            .iter()
            .map(|s| {
                let claim = s.item.caption.as_deref().map(ulm_world::caption::parse);
                match (claim, s.image) {
                    (Some(Ok(claim)), Some(image)) => {
                        ulm_world::verify::score(&claim, &ulm_world::verify::read(image)) as f32
                    }
                    _ => 0.0,
                }
            })
            .collect())
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
    fn score(&self, _: &RewardContext, samples: &[Scored]) -> Result<Vec<f32>, RlError> {
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
) -> Result<TaskScores, RlError> {
    let mut total = vec![0f32; samples.len()];
    let mut means = Vec::new();
    for w in rewards.iter().filter(|w| w.reward.task() == task) {
        let scores = w.reward.score(ctx, samples)?;
        if scores.len() != samples.len() {
            return Err(RlError::Reward {
                name: w.reward.name().to_string(),
                message: format!("{} scores for {} samples", scores.len(), samples.len()),
            });
        }
        let mean = scores.iter().map(|&s| s as f64).sum::<f64>() / scores.len().max(1) as f64;
        means.push((w.reward.name().to_string(), mean));
        for (t, s) in total.iter_mut().zip(scores) {
            *t += (w.weight as f32) * s;
        }
    }
    Ok(TaskScores { total, means })
}
