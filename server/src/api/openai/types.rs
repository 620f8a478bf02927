//! Request and response bodies of the OpenAI-compatible routes, in the
//! shapes the `openai` SDK sends and parses, with our additions (the
//! sample ids feedback refers to) as extra fields it passes through.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::api::types::{default_one, FinishReason, Usage};

/// `POST /v1/chat/completions`. The model answers one question about one
/// image: send one `user` message whose content holds one `image_url` part
/// (a `data:` URL; the server fetches nothing, so `http(s)` URLs are
/// refused) and the question as text. System, developer and assistant
/// messages are refused: the model was not trained on them, and every
/// sample is stored as image + question for training.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChatCompletionRequest {
    /// Accepted for compatibility; the active version answers, and the
    /// response's `model` names it.
    pub model: Option<String>,
    #[schema(min_items = 1)]
    pub messages: Vec<ChatMessage>,
    /// Answers to sample.
    #[serde(default = "default_one")]
    #[schema(minimum = 1, maximum = 16, default = 1)]
    pub n: u32,
    /// Most tokens per answer (default 256). Deprecated by OpenAI in favour
    /// of `max_completion_tokens`; give one of them.
    #[schema(minimum = 1, maximum = 2048)]
    pub max_tokens: Option<u32>,
    #[schema(minimum = 1, maximum = 2048)]
    pub max_completion_tokens: Option<u32>,
    /// 0 decodes greedily; otherwise at least 0.01 (default: the model's,
    /// `sampling` in `GET /v1/models`).
    #[schema(minimum = 0.0, maximum = 5.0)]
    pub temperature: Option<f64>,
    #[schema(exclusive_minimum = 0.0, maximum = 1.0)]
    pub top_p: Option<f64>,
    /// Seed of the first answer; answer i uses seed + i.
    #[schema(minimum = 0, maximum = 9007199254740991_u64)]
    pub seed: Option<u64>,
    /// Server-sent events: `chat.completion.chunk` objects, then `[DONE]`.
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    /// Return the log-prob of each sampled token (under the distribution it
    /// was sampled from, as stored for training).
    #[serde(default)]
    pub logprobs: bool,
    /// Only 0: alternatives to the sampled tokens are not computed.
    #[schema(minimum = 0, maximum = 0)]
    pub top_logprobs: Option<u32>,
    /// Accepted and ignored.
    pub user: Option<String>,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    /// Send a last chunk with the request's token counts.
    #[serde(default)]
    pub include_usage: bool,
}

/// A message of the conversation.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct ChatMessage {
    pub role: Role,
    pub content: Option<MessageContent>,
    /// Accepted and ignored.
    pub name: Option<String>,
}

/// Only `user` messages are answered; the others are refused with the
/// reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    System,
    Developer,
    User,
    Assistant,
    Tool,
}

/// Plain text, or a list of parts.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ContentPart {
    Text { text: String },
    ImageUrl { image_url: ImageUrl },
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ImageUrl {
    /// `data:image/png;base64,...` (PNG, JPEG or WebP).
    pub url: String,
    /// Accepted and ignored: the model sees every image at its input size.
    pub detail: Option<String>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatCompletion {
    /// `chatcmpl-` and the request id.
    pub id: String,
    /// Always `chat.completion`.
    pub object: &'static str,
    /// Unix seconds.
    pub created: i64,
    /// The model version that answered.
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub usage: Usage,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatChoice {
    pub index: usize,
    pub message: AssistantMessage,
    pub finish_reason: FinishReason,
    pub logprobs: Option<ChoiceLogprobs>,
    /// The stored sample: `POST /v1/feedback` refers to it.
    pub sample_id: String,
    /// The seed that reproduces this answer.
    pub seed: u64,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct AssistantMessage {
    /// Always `assistant`.
    pub role: &'static str,
    pub content: String,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChoiceLogprobs {
    pub content: Vec<TokenLogprob>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct TokenLogprob {
    /// The text the token completes (empty inside a multi-byte character,
    /// whose text comes with the token that completes it).
    pub token: String,
    pub logprob: f32,
    /// UTF-8 bytes of `token`.
    pub bytes: Vec<u8>,
    /// Always empty (`top_logprobs` is not supported).
    pub top_logprobs: Vec<TopLogprob>,
}

/// An alternative to a sampled token (OpenAI's shape; never filled here).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

/// One event of a streamed chat completion (`data: {...}`).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatCompletionChunk {
    pub id: String,
    /// Always `chat.completion.chunk`.
    pub object: &'static str,
    pub created: i64,
    pub model: String,
    /// Empty in the usage chunk.
    pub choices: Vec<ChunkChoice>,
    /// Only in the last chunk, when `stream_options.include_usage` is set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChunkChoice {
    pub index: usize,
    pub delta: ChunkDelta,
    pub logprobs: Option<ChoiceLogprobs>,
    /// Set in the choice's last chunk, which also carries its `sample_id`.
    pub finish_reason: Option<FinishReason>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sample_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
}

#[derive(Debug, Clone, Default, Serialize, ToSchema)]
pub struct ChunkDelta {
    /// `assistant` in the choice's first chunk.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ImageResponseFormat {
    /// The PNG in the response, base64.
    #[default]
    B64Json,
    /// A link to `GET /v1/images/{sample_id}` (which needs the same API key).
    Url,
}

/// `POST /v1/images/generations`. `cfg_weight`, `temperature`, `top_k`,
/// `seed` and `plan` are our additions (pass them with the SDK's
/// `extra_body`).
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ImageGenerationRequest {
    #[schema(example = "a photo of a green triangle")]
    pub prompt: String,
    /// Accepted for compatibility; the active version draws.
    pub model: Option<String>,
    #[serde(default = "default_one")]
    #[schema(minimum = 1, maximum = 16, default = 1)]
    pub n: u32,
    /// `WxH`: the one size the model makes (`GET /v1/models` gives it as
    /// `generated_image_size`), or `auto`.
    #[schema(example = "auto")]
    pub size: Option<String>,
    /// `b64_json` (default) or `url`.
    #[serde(default)]
    pub response_format: ImageResponseFormat,
    /// Accepted and ignored.
    pub user: Option<String>,
    /// Default: the model's (`sampling` in `GET /v1/models`).
    #[schema(minimum = 0.0, maximum = 20.0)]
    pub cfg_weight: Option<f64>,
    /// Default: the model's.
    #[schema(minimum = 0.0, maximum = 5.0)]
    pub temperature: Option<f64>,
    #[schema(minimum = 1, maximum = 1000000)]
    pub top_k: Option<u32>,
    #[schema(minimum = 0, maximum = 9007199254740991_u64)]
    pub seed: Option<u64>,
    /// Plan the image in words first (as `plan` of `POST /v1/generate`);
    /// the plan comes back as each image's `revised_prompt`.
    pub plan: Option<bool>,
    /// As `best_of` of `POST /v1/generate`.
    #[schema(minimum = 1, maximum = 16)]
    pub best_of: Option<u32>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ImagesResponse {
    /// Unix seconds.
    pub created: i64,
    pub data: Vec<ImageData>,
    /// The model version that drew the images.
    pub model: String,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ImageData {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub b64_json: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// The stored sample: `POST /v1/feedback` refers to it.
    pub sample_id: String,
    pub seed: u64,
    /// The plan the image was drawn from, when the model planned it (as
    /// OpenAI's images carry the prompt they were drawn from).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revised_prompt: Option<String>,
}
