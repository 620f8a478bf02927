use std::convert::Infallible;

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::stream::Stream;
use tokio::sync::mpsc;

use ulm_core::engine::{StreamedToken, TextOutput};

use super::types::{
    AssistantMessage, ChatChoice, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest,
    ChatMessage, ChoiceLogprobs, ChunkChoice, ChunkDelta, ContentPart, MessageContent, Role,
    TokenLogprob,
};
use super::unix_seconds;
use crate::api::answer::{async_stream, AnswerJob, AnswerQuestion, StoredAnswers};
use crate::api::error::{ApiError, ApiJson, ErrorBody};
use crate::api::AppState;

const DEFAULT_MAX_TOKENS: u32 = 256;

/// Chat completion (OpenAI-compatible): answers about one image.
///
/// Send one `user` message with one `image_url` part (a `data:` URL) and
/// the question as text. With `"stream": true` the response is
/// `text/event-stream`: `data: <chat.completion.chunk>` events, each
/// choice's last one carrying its `finish_reason` and `sample_id`, then
/// `data: [DONE]`; an error after the stream began is sent as
/// `data: {"error": ...}` and ends it.
#[utoipa::path(
    post,
    path = "/v1/chat/completions",
    tag = "openai",
    request_body = ChatCompletionRequest,
    responses(
        (status = 200, description = "The completion (or an event stream when stream is true)",
         content((ChatCompletion = "application/json"), (ChatCompletionChunk = "text/event-stream"))),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 408, description = "The body stalled (body timeout)", body = ErrorBody),
        (status = 413, description = "Body or image too large", body = ErrorBody),
        (status = 415, description = "Not JSON", body = ErrorBody),
        (status = 422, description = "Invalid field or message, unsupported role, image missing or not a data URL", body = ErrorBody),
        (status = 429, description = "Queue full; retry after Retry-After seconds", body = ErrorBody),
        (status = 503, description = "Model unavailable", body = ErrorBody),
        (status = 504, description = "Deadline exceeded", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn chat_completions(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<ChatCompletionRequest>,
) -> Result<Response, ApiError> {
    let (image_url, question) = image_and_question(body.messages)?;
    let (max_new_tokens_field, max_new_tokens) = match (body.max_tokens, body.max_completion_tokens)
    {
        (Some(a), Some(b)) if a != b => {
            return Err(ApiError::InvalidParameter(format!(
                "max_tokens ({a}) and max_completion_tokens ({b}) disagree; give one of them"
            )))
        }
        (_, Some(b)) => ("max_completion_tokens", b),
        (a, None) => ("max_tokens", a.unwrap_or(DEFAULT_MAX_TOKENS)),
    };
    if body.top_logprobs.is_some_and(|k| k > 0) {
        return Err(ApiError::InvalidParameter(
            "top_logprobs is not supported: with logprobs true each token's own log-prob is returned"
                .into(),
        ));
    }
    let job = AnswerJob::prepare(
        &state,
        AnswerQuestion {
            image: &image_url,
            question,
            n: body.n,
            max_new_tokens,
            max_new_tokens_field,
            temperature: body.temperature,
            top_p: body.top_p,
            top_k: None,
            seed: body.seed,
        },
    )
    .await?;
    let options = ReplyOptions {
        logprobs: body.logprobs,
        include_usage: body.stream_options.is_some_and(|o| o.include_usage),
    };
    if !body.stream {
        let stored = job.run().await?;
        return Ok(Json(completion(&state, stored, options)).into_response());
    }
    let model = state.engine.model_version();
    let (rx, work) = job.start_streaming();
    Ok(Sse::new(chunk_stream(state, model, options, rx, work))
        .keep_alive(KeepAlive::default())
        .into_response())
}

#[derive(Debug, Clone, Copy)]
struct ReplyOptions {
    logprobs: bool,
    include_usage: bool,
}

fn unsupported(message: impl Into<String>) -> ApiError {
    ApiError::InvalidParameter(message.into())
}

/// The image (a data URL) and the question of the one user message.
fn image_and_question(messages: Vec<ChatMessage>) -> Result<(String, String), ApiError> {
    let mut user = None;
    for message in messages {
        let role = match message.role {
            Role::User if user.is_none() => {
                user = Some(message);
                continue;
            }
            Role::User => {
                return Err(unsupported(
                    "messages holds more than one user message; the model answers one question about one image",
                ))
            }
            Role::System => "system",
            Role::Developer => "developer",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        };
        return Err(unsupported(format!(
            "{role} messages are not supported; send one user message with an image and a question"
        )));
    }
    let user = user.ok_or_else(|| unsupported("messages must hold one user message"))?;
    let parts = match user.content {
        Some(MessageContent::Parts(parts)) => parts,
        Some(MessageContent::Text(_)) | None => {
            return Err(unsupported(
                "the question needs an image: give the user message's content as parts, one of them an image_url",
            ))
        }
    };
    let mut texts = Vec::new();
    let mut images = Vec::new();
    for part in parts {
        match part {
            ContentPart::Text { text } => texts.push(text),
            ContentPart::ImageUrl { image_url } => images.push(image_url.url),
        }
    }
    let url = match <[String; 1]>::try_from(images) {
        Ok([url]) => url,
        Err(images) if images.is_empty() => {
            return Err(unsupported(
                "the question needs an image: add an image_url part with a data: URL",
            ))
        }
        Err(images) => {
            return Err(unsupported(format!(
                "the user message holds {} images; the model answers about one",
                images.len()
            )))
        }
    };
    if url.starts_with("http://") || url.starts_with("https://") {
        return Err(ApiError::InvalidImage(
            "the server fetches nothing: send the image inline as a data URL (data:image/png;base64,...)".into(),
        ));
    }
    if !url.starts_with("data:") {
        return Err(ApiError::InvalidImage(
            "image_url.url must be a data URL (data:image/png;base64,...)".into(),
        ));
    }
    Ok((url, texts.join("\n")))
}

/// Each token's log-prob with the text it completes; a stopped answer's
/// end-of-answer token, which adds no text, is left out.
fn token_logprobs(state: &AppState, output: &TextOutput) -> ChoiceLogprobs {
    let end = state.engine.end_of_answer_token();
    let mut text = state.engine.text_stream();
    let mut spelled = String::new();
    let mut content: Vec<TokenLogprob> = output
        .token_ids
        .iter()
        .zip(&output.logprobs)
        .filter(|(&token, _)| token != end)
        .map(|(&token, &logprob)| {
            let delta = text.push(token);
            spelled.push_str(&delta);
            token_logprob(delta, logprob)
        })
        .collect();
    // An answer cut inside a character ends in text no token completed.
    if let (Some(rest), Some(last)) = (unspelled(&output.text, &spelled), content.last_mut()) {
        *last = token_logprob(format!("{}{rest}", last.token), last.logprob);
    }
    ChoiceLogprobs { content }
}

/// What of `text` follows the `sent` part, when anything does.
fn unspelled<'a>(text: &'a str, sent: &str) -> Option<&'a str> {
    text.strip_prefix(sent).filter(|rest| !rest.is_empty())
}

fn token_logprob(token: String, logprob: f32) -> TokenLogprob {
    TokenLogprob {
        bytes: token.as_bytes().to_vec(),
        token,
        logprob,
        top_logprobs: Vec::new(),
    }
}

fn completion(state: &AppState, stored: StoredAnswers, options: ReplyOptions) -> ChatCompletion {
    let StoredAnswers { response, outputs } = stored;
    let choices = response
        .samples
        .into_iter()
        .zip(&outputs)
        .enumerate()
        .map(|(index, (sample, output))| ChatChoice {
            index,
            message: AssistantMessage {
                role: "assistant",
                content: sample.text,
            },
            finish_reason: sample.finish_reason,
            logprobs: options.logprobs.then(|| token_logprobs(state, output)),
            sample_id: sample.sample_id,
            seed: sample.seed,
        })
        .collect();
    ChatCompletion {
        id: format!("chatcmpl-{}", response.request_id),
        object: "chat.completion",
        created: unix_seconds(),
        model: response.model_version,
        choices,
        usage: response.usage,
    }
}

/// Builds the chunks of one streamed completion.
struct Chunks {
    id: String,
    created: i64,
    model: String,
}

impl Chunks {
    fn event(&self, choices: Vec<ChunkChoice>, usage: Option<crate::api::types::Usage>) -> Event {
        let chunk = ChatCompletionChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk",
            created: self.created,
            model: self.model.clone(),
            choices,
            usage,
        };
        data_event(&chunk)
    }
}

fn data_event<T: serde::Serialize>(value: &T) -> Event {
    Event::default()
        .json_data(value)
        .unwrap_or_else(|_| Event::default().data("{}"))
}

fn chunk_stream(
    state: AppState,
    model: String,
    options: ReplyOptions,
    mut rx: mpsc::UnboundedReceiver<StreamedToken>,
    work: tokio::task::JoinHandle<Result<StoredAnswers, ApiError>>,
) -> impl Stream<Item = Result<Event, Infallible>> {
    async_stream(move |tx| async move {
        let chunks = Chunks {
            id: format!("chatcmpl-{}", uuid::Uuid::new_v4()),
            created: unix_seconds(),
            model,
        };
        let end = state.engine.end_of_answer_token();
        let mut texts = Vec::new();
        let mut started = Vec::new();
        let mut sent: Vec<String> = Vec::new();
        while let Some(t) = rx.recv().await {
            while texts.len() <= t.sample {
                texts.push(state.engine.text_stream());
                started.push(false);
                sent.push(String::new());
            }
            if t.token == end {
                continue;
            }
            let delta = texts[t.sample].push(t.token);
            sent[t.sample].push_str(&delta);
            if delta.is_empty() && !options.logprobs {
                continue;
            }
            let first = !std::mem::replace(&mut started[t.sample], true);
            let choice = ChunkChoice {
                index: t.sample,
                delta: ChunkDelta {
                    role: first.then_some("assistant"),
                    content: Some(delta.clone()),
                },
                logprobs: options.logprobs.then(|| ChoiceLogprobs {
                    content: vec![token_logprob(delta, t.logprob)],
                }),
                finish_reason: None,
                sample_id: None,
                seed: None,
            };
            if tx.send(chunks.event(vec![choice], None)).is_err() {
                return;
            }
        }
        let stored = match work.await {
            Ok(Ok(stored)) => stored,
            Ok(Err(e)) => {
                let _ = tx.send(data_event(&e.streamed_body()));
                return;
            }
            Err(e) => {
                let e = ApiError::Internal(e.to_string());
                let _ = tx.send(data_event(&e.streamed_body()));
                return;
            }
        };
        let response = stored.response;
        for (index, sample) in response.samples.into_iter().enumerate() {
            let first = !started.get(index).copied().unwrap_or(false);
            let sent = sent.get(index).map_or("", String::as_str);
            // An answer cut inside a character ends in text no token completed.
            let rest = unspelled(&sample.text, sent).map(str::to_string);
            let choice = ChunkChoice {
                index,
                delta: ChunkDelta {
                    role: first.then_some("assistant"),
                    content: rest,
                },
                logprobs: None,
                finish_reason: Some(sample.finish_reason),
                sample_id: Some(sample.sample_id),
                seed: Some(sample.seed),
            };
            let _ = tx.send(chunks.event(vec![choice], None));
        }
        if options.include_usage {
            let _ = tx.send(chunks.event(Vec::new(), Some(response.usage)));
        }
        let _ = tx.send(Event::default().data("[DONE]"));
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn messages(value: serde_json::Value) -> Vec<ChatMessage> {
        serde_json::from_value(value).unwrap()
    }

    fn refused(value: serde_json::Value) -> String {
        image_and_question(messages(value)).unwrap_err().to_string()
    }

    #[test]
    fn one_user_message_gives_its_image_and_question() {
        let (url, question) = image_and_question(messages(serde_json::json!([
            {"role": "user", "content": [
                {"type": "text", "text": "How many circles?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA", "detail": "low"}},
                {"type": "text", "text": "Answer with a number."},
            ]}
        ])))
        .unwrap();
        assert_eq!(url, "data:image/png;base64,AAAA");
        assert_eq!(question, "How many circles?\nAnswer with a number.");
    }

    #[test]
    fn what_the_model_cannot_take_is_refused_with_the_reason() {
        let image = serde_json::json!({"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}});
        let cases = [
            (serde_json::json!([]), "one user message"),
            (
                serde_json::json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": [image]}]),
                "system messages are not supported",
            ),
            (
                serde_json::json!([{"role": "user", "content": [image]}, {"role": "assistant", "content": "2"}]),
                "assistant messages are not supported",
            ),
            (
                serde_json::json!([{"role": "user", "content": [image]}, {"role": "user", "content": [image]}]),
                "more than one user message",
            ),
            (
                serde_json::json!([{"role": "user", "content": "What is this?"}]),
                "needs an image",
            ),
            (
                serde_json::json!([{"role": "user", "content": [image, image]}]),
                "holds 2 images",
            ),
            (
                serde_json::json!([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]),
                "fetches nothing",
            ),
        ];
        for (value, expected) in cases {
            let message = refused(value.clone());
            assert!(message.contains(expected), "{value}: {message}");
        }
    }
}
