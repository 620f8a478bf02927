//! What the engine is asked to compute and what it answers: plain data
//! (images, token ids, text). Tensors stay inside the worker.

use image::RgbImage;
use ulm_model::sampling::SamplingParams;

use crate::record::{AnswerParams, FinishReason, GenerateParams, RequestParams};

/// A question about one image, or a text-only turn without one,
/// `seeds.len()` answers.
#[derive(Debug, Clone)]
pub struct AnswerWork {
    pub image: Option<RgbImage>,
    pub question: String,
    pub params: AnswerParams,
    /// One per answer.
    pub seeds: Vec<u64>,
}

/// A text-to-image prompt, `seeds.len()` images.
#[derive(Debug, Clone)]
pub struct ImageWork {
    pub prompt: String,
    pub params: GenerateParams,
    /// One per image.
    pub seeds: Vec<u64>,
}

/// Teacher-forced: the log-likelihood of `answer` to `question` about each
/// of `images`, in the model's own reading.
#[derive(Debug, Clone)]
pub struct ReadWork {
    pub images: Vec<RgbImage>,
    pub question: String,
    pub answer: String,
}

impl AnswerWork {
    pub(super) fn sampling(&self) -> SamplingParams {
        RequestParams::Answer(self.params).sampling()
    }
}

impl ImageWork {
    pub(super) fn sampling(&self) -> SamplingParams {
        RequestParams::Generate(self.params).sampling()
    }
}

#[derive(Debug, Clone)]
pub struct TextOutput {
    pub text: String,
    pub token_ids: Vec<u32>,
    pub logprobs: Vec<f32>,
    pub finish_reason: FinishReason,
}

#[derive(Debug, Clone)]
pub struct AnswerOutput {
    pub samples: Vec<TextOutput>,
    pub prompt_tokens: usize,
    pub timings: RequestTimings,
    pub model_version: String,
}

#[derive(Debug, Clone)]
pub struct ImageOutput {
    pub image: RgbImage,
    pub tokens: Vec<u32>,
    /// Conditional log-probs (see [`ImageSample`]).
    pub logprobs: Vec<f32>,
    /// Log-probs under the guided distribution the tokens were drawn from.
    pub guided_logprobs: Vec<f32>,
}

#[derive(Debug, Clone)]
pub struct GenerateOutput {
    pub images: Vec<ImageOutput>,
    /// What the images were drawn from when the request planned them.
    pub plan: Option<String>,
    pub timings: RequestTimings,
    pub model_version: String,
}

/// Where a request's time went.
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestTimings {
    pub queue_ms: u64,
    pub compute_ms: u64,
    /// Rows of the batch this request ran in (its own included).
    pub batch_rows: usize,
}

/// A token of a streamed answer.
#[derive(Debug, Clone, Copy)]
pub struct StreamedToken {
    pub sample: usize,
    pub token: u32,
    pub logprob: f32,
}
