//! Request and response bodies of the public API, with their OpenAPI
//! schemas: the wire form of the core's types, each converted with `From`.

use serde::{Deserialize, Serialize};
use ulm_core::engine::RequestTimings;
use ulm_core::record;
use utoipa::ToSchema;

// Sampling floats are read as f64 and checked before they narrow to f32: a
// value just outside a bound (-1e-300, 5.0000001) must not round onto it.

/// Largest seed a client can send or receive exactly (2^53 - 1: JSON numbers
/// beyond it lose precision in many clients).
pub const MAX_SEED: u64 = (1 << 53) - 1;

fn default_images() -> u32 {
    4
}
pub(crate) fn default_one() -> u32 {
    1
}
fn default_max_new_tokens() -> u32 {
    256
}

/// Text-to-image request.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GenerateRequest {
    /// What to draw.
    #[schema(example = "A red circle above a blue square on a white background.")]
    pub prompt: String,
    /// Images to generate for the prompt.
    #[serde(default = "default_images")]
    #[schema(minimum = 1, maximum = 16, default = 4)]
    pub n: u32,
    /// Classifier-free guidance weight: `uncond + w * (cond - uncond)`.
    /// Default: the model's (`sampling` in `GET /v1/models`; 5 for
    /// Janus-Pro, 1.5 for the built-in world model).
    #[schema(minimum = 0.0, maximum = 20.0)]
    pub cfg_weight: Option<f64>,
    /// Sampling temperature: 0 picks the most likely token; otherwise at
    /// least 0.01. Default: the model's (1 for Janus-Pro, 0.7 for the
    /// world model).
    #[schema(minimum = 0.0, maximum = 5.0)]
    pub temperature: Option<f64>,
    /// Sample only among the k most likely image tokens.
    #[schema(minimum = 1, maximum = 1000000)]
    pub top_k: Option<u32>,
    /// Seed of the first image; image i uses seed + i. Random when absent.
    #[schema(minimum = 0, maximum = 9007199254740991_u64)]
    pub seed: Option<u64>,
    /// Let the model plan the image in words before it draws: it rewrites
    /// the prompt as a full caption (every object's size, colour, shape and
    /// place, sampled from the first seed) and draws every image from that
    /// (`plan` in the response). Only for a model trained to
    /// (`sampling.plan_temperature` in `GET /v1/models`, as the built-in
    /// world model); default: whenever the model can. `true` for a model
    /// that cannot is a 422.
    pub plan: Option<bool>,
    /// With a plan: draw this many candidates per image and keep the one
    /// the model's own describing turn finds the plan likeliest of (the
    /// image's seed reproduces it with the same `best_of`). Default: the
    /// model's (`sampling.best_of`) but at most 64 / `n`, and 1 without a
    /// plan; above 1 without a plan, or `n * best_of` above 64, is a 422.
    #[schema(minimum = 1, maximum = 16)]
    pub best_of: Option<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct GeneratedImage {
    pub sample_id: String,
    /// The seed that reproduces this image.
    pub seed: u64,
    /// PNG, base64.
    pub png_base64: String,
    /// Where the PNG can be fetched again.
    pub image_url: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Timings {
    /// Milliseconds waiting for the model worker.
    pub queue_ms: u64,
    /// Milliseconds of the batch that computed this request.
    pub compute_ms: u64,
}

impl From<RequestTimings> for Timings {
    fn from(t: RequestTimings) -> Self {
        Self {
            queue_ms: t.queue_ms,
            compute_ms: t.compute_ms,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct GenerateResponse {
    pub request_id: String,
    /// Model version that produced the images.
    pub model_version: String,
    pub images: Vec<GeneratedImage>,
    /// What the images were drawn from when the model planned them; the
    /// plan's time is part of `timings`.
    pub plan: Option<String>,
    pub timings: Timings,
}

/// Multimodal question answering request.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AnswerRequest {
    /// The image: base64 PNG, JPEG or WebP (a `data:image/...;base64,` prefix is accepted).
    pub image: String,
    /// The question about the image.
    #[schema(example = "What shape is in the top left corner?")]
    pub question: String,
    /// Answers to sample.
    #[serde(default = "default_one")]
    #[schema(minimum = 1, maximum = 16, default = 1)]
    pub n: u32,
    /// Most tokens per answer.
    #[serde(default = "default_max_new_tokens")]
    #[schema(minimum = 1, maximum = 2048, default = 256)]
    pub max_new_tokens: u32,
    /// Sampling temperature: 0 decodes greedily; otherwise at least 0.01.
    /// Default: the model's (`sampling` in `GET /v1/models`).
    #[schema(minimum = 0.0, maximum = 5.0)]
    pub temperature: Option<f64>,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p.
    #[schema(exclusive_minimum = 0.0, maximum = 1.0)]
    pub top_p: Option<f64>,
    #[schema(minimum = 1, maximum = 1000000)]
    pub top_k: Option<u32>,
    /// Seed of the first answer; answer i uses seed + i. Random when absent.
    #[schema(minimum = 0, maximum = 9007199254740991_u64)]
    pub seed: Option<u64>,
    /// Stream tokens as server-sent events (`token` events, then one `done` event with the response).
    #[serde(default)]
    pub stream: bool,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// The model ended its answer.
    Stop,
    /// max_new_tokens was reached.
    Length,
}

impl From<record::FinishReason> for FinishReason {
    fn from(f: record::FinishReason) -> Self {
        match f {
            record::FinishReason::Stop => FinishReason::Stop,
            record::FinishReason::Length => FinishReason::Length,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AnswerSample {
    pub sample_id: String,
    pub seed: u64,
    pub text: String,
    pub finish_reason: FinishReason,
    pub completion_tokens: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AnswerResponse {
    pub request_id: String,
    pub model_version: String,
    pub samples: Vec<AnswerSample>,
    pub usage: Usage,
    pub timings: Timings,
}

/// A streamed token (`event: token`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TokenEvent {
    /// Which answer of the request (0-based).
    pub index: usize,
    pub token_id: u32,
    /// Text this token adds to the answer (may be empty until a character completes).
    pub text: String,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FeedbackSourceType {
    Human,
    Model,
    Api,
}

/// Who gave the feedback.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FeedbackSource {
    #[serde(rename = "type")]
    pub source_type: FeedbackSourceType,
    pub user_id: Option<String>,
}

/// One piece of feedback on a served sample. Send one object or an array of them.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FeedbackItem {
    /// The sample the feedback is about.
    pub sample_id: String,
    /// What is judged, e.g. "quality" or "correct".
    #[schema(example = "quality")]
    pub key: String,
    /// Numeric judgement, e.g. 0..1; finite, between -1000 and 1000.
    #[schema(minimum = -1000.0, maximum = 1000.0)]
    pub score: Option<f64>,
    /// Categorical judgement, e.g. "good".
    pub value: Option<String>,
    pub comment: Option<String>,
    /// The reference answer (for question answering).
    pub correction: Option<String>,
    /// Defaults to `{"type": "api"}`.
    pub source: Option<FeedbackSource>,
    /// Idempotency key: the same id with the same body is stored once; with a
    /// different body it is a 409.
    pub client_id: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct FeedbackView {
    pub id: String,
    pub sample_id: String,
    pub key: String,
    pub score: Option<f64>,
    pub value: Option<String>,
    pub comment: Option<String>,
    pub correction: Option<String>,
    pub source: FeedbackSource,
    pub client_id: Option<String>,
    /// Milliseconds since the Unix epoch.
    pub created_at: i64,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FeedbackStatus {
    /// Stored now.
    Created,
    /// Stored earlier under the same client_id with the same body.
    Replayed,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct FeedbackResult {
    pub status: FeedbackStatus,
    pub feedback: FeedbackView,
}

/// Response to a feedback POST: one result per item, in order.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct FeedbackResponse {
    pub items: Vec<FeedbackResult>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SampleView {
    pub id: String,
    pub request_id: String,
    /// "generate" or "answer".
    pub task: String,
    pub model_version: String,
    /// The prompt (generate) or question (answer).
    pub prompt: String,
    /// Request parameters.
    #[schema(value_type = Object)]
    pub params: serde_json::Value,
    pub seed: u64,
    pub output_text: Option<String>,
    /// For generated images.
    pub image_url: Option<String>,
    /// SHA-256 of the input image (answer samples).
    pub input_image_sha256: Option<String>,
    pub token_ids: Vec<u32>,
    /// Behaviour log-probs of the tokens, as the trainer scores them
    /// (for images: under the conditional distribution).
    pub logprobs: Vec<f32>,
    /// Images: log-probs under the guided (CFG) distribution the tokens
    /// were drawn from. Empty for answers and for images stored before.
    pub guided_logprobs: Vec<f32>,
    pub finish_reason: Option<String>,
    pub timings: Timings,
    pub created_at: i64,
    pub feedback: Vec<FeedbackView>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ModelView {
    /// Version id; every sample names the version that produced it.
    pub id: String,
    /// Always `model` (as OpenAI's model list has it).
    pub object: String,
    /// Unix seconds (OpenAI's field; `created_at` has milliseconds).
    pub created: i64,
    /// Always `ulm-server`.
    pub owned_by: String,
    pub description: String,
    /// True for the built-in random demo model.
    pub demo: bool,
    /// The version served now.
    pub active: bool,
    /// The version this one was trained from; none for the base model.
    pub parent: Option<String>,
    /// The RL job that produced it.
    pub job_id: Option<String>,
    /// Its LoRA adapters in the blob store (`adapters/<hash>`); none for the
    /// base model, and shown to admin keys only.
    pub checkpoint_path: Option<String>,
    /// The evaluation that promoted it.
    #[schema(value_type = Object)]
    pub metrics: serde_json::Value,
    /// Unix milliseconds.
    pub created_at: i64,
    pub max_context_tokens: usize,
    pub image_tokens_per_image: usize,
    pub generated_image_size: usize,
    pub understanding_image_size: usize,
    /// What a request that does not say is sampled with.
    pub sampling: SamplingDefaultsView,
}

/// The model's sampling defaults (its checkpoint's `generation_config.json`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema)]
pub struct SamplingDefaultsView {
    /// `cfg_weight` of image generation.
    pub cfg_weight: f64,
    /// `temperature` of image tokens and answers.
    pub temperature: f64,
    /// Temperature of the plan a generation request writes before it
    /// draws; absent for a model that does not plan.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan_temperature: Option<f64>,
    /// Candidates a planned image is the best of, when above 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub best_of: Option<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ModelList {
    /// Always `list` (as OpenAI's model list has it).
    pub object: String,
    pub data: Vec<ModelView>,
}

/// A refinement job.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct JobView {
    pub id: String,
    /// queued, running, evaluating, promoted, rejected, failed or cancelled.
    pub status: String,
    /// api, timer or feedback.
    pub trigger: String,
    #[schema(value_type = Object)]
    pub config: serde_json::Value,
    /// The version the job trained from.
    pub parent_version: Option<String>,
    /// The version it produced, when promoted.
    pub candidate_version: Option<String>,
    /// Groups and prompts the job used, and what it skipped.
    #[schema(value_type = Option<Object>)]
    pub data_counts: Option<serde_json::Value>,
    /// Per-step training metrics.
    #[schema(value_type = Option<Object>)]
    pub metrics: Option<serde_json::Value>,
    /// Candidate and active version on the held-out set, and the gate's decision.
    #[schema(value_type = Option<Object>)]
    pub evaluation: Option<serde_json::Value>,
    pub error: Option<String>,
    /// The learning curves as PNG (`GET`), once a step is trained.
    pub curves_url: Option<String>,
    pub steps_done: i64,
    /// The process that claimed the job (host, pid and a random tag); none
    /// while queued.
    pub worker: Option<String>,
    /// Unix milliseconds.
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct JobList {
    /// Newest first.
    pub data: Vec<JobView>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Health {
    pub status: String,
    pub model_loaded: bool,
    pub database: bool,
    pub queue_depth: usize,
}

/// PNG image bytes.
#[derive(ToSchema)]
#[schema(value_type = String, format = Binary, content_media_type = "image/png")]
pub struct PngImage(pub Vec<u8>);
