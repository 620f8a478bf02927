use std::convert::Infallible;
use std::time::Instant;

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use futures::stream::Stream;
use tokio::sync::mpsc;

use ulm_core::engine::{AnswerOutput, AnswerTextStream, AnswerWork, StreamedToken, TextOutput};
use ulm_core::record::{record_answers, AnswerParams};

use super::error::{ApiError, ApiJson, ErrorBody};
use super::types::{AnswerRequest, AnswerResponse, AnswerSample, TokenEvent, Usage};
use super::AppState;

/// Answer a question about an image.
///
/// With `"stream": true` the response is `text/event-stream`: `token` events
/// (`TokenEvent`) as tokens are produced, then one `done` event carrying the
/// `AnswerResponse` once the samples are stored, or an `error` event
/// carrying an `ErrorBody`.
#[utoipa::path(
    post,
    path = "/v1/answer",
    tag = "inference",
    request_body = AnswerRequest,
    responses(
        (status = 200, description = "Sampled answers (or an event stream when stream is true)",
         content((AnswerResponse = "application/json"), (TokenEvent = "text/event-stream"))),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 408, description = "The body stalled (body timeout)", body = ErrorBody),
        (status = 413, description = "Body or image too large", body = ErrorBody),
        (status = 415, description = "Not JSON", body = ErrorBody),
        (status = 422, description = "Invalid field or undecodable image", body = ErrorBody),
        (status = 429, description = "Queue full; retry after Retry-After seconds", body = ErrorBody),
        (status = 503, description = "Model unavailable", body = ErrorBody),
        (status = 504, description = "Deadline exceeded", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn answer(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<AnswerRequest>,
) -> Result<Response, ApiError> {
    let question = AnswerQuestion {
        image: &body.image,
        question: body.question,
        n: body.n,
        max_new_tokens: body.max_new_tokens,
        max_new_tokens_field: "max_new_tokens",
        temperature: body.temperature,
        top_p: body.top_p,
        top_k: body.top_k,
        seed: body.seed,
    };
    let job = AnswerJob::prepare(&state, question).await?;
    if !body.stream {
        return Ok(Json(job.run().await?.response).into_response());
    }
    let (rx, work) = job.start_streaming();
    Ok(Sse::new(event_stream(state, rx, work))
        .keep_alive(KeepAlive::default())
        .into_response())
}

/// A question as a route reads it, before validation.
pub(super) struct AnswerQuestion<'a> {
    /// Base64, or a `data:` URL.
    pub image: &'a str,
    pub question: String,
    pub n: u32,
    pub max_new_tokens: u32,
    /// The name the route gives `max_new_tokens`, for its error message.
    pub max_new_tokens_field: &'static str,
    /// The sampling floats as sent: checked before they narrow to f32. No
    /// temperature: the model's default.
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<u32>,
    pub seed: Option<u64>,
}

/// A validated question with its image decoded, ready for the engine.
pub(super) struct AnswerJob {
    work: AnswerWork,
    deadline: Instant,
    ctx: AnswerContext,
}

/// The stored answers of a request: the response, and what the engine
/// produced for each (its tokens and their log-probs).
pub(super) struct StoredAnswers {
    pub response: AnswerResponse,
    pub outputs: Vec<TextOutput>,
}

impl AnswerJob {
    /// Validates every field, then decodes the image (few at once); nothing
    /// is queued before all of it passed.
    pub(super) async fn prepare(state: &AppState, q: AnswerQuestion<'_>) -> Result<Self, ApiError> {
        let limits = &state.limits;
        limits.text("question", &q.question)?;
        limits.count("n", q.n, limits.max_answers_per_request)?;
        limits.count(
            q.max_new_tokens_field,
            q.max_new_tokens,
            limits.max_new_tokens,
        )?;
        let temperature = q
            .temperature
            .unwrap_or(state.engine.info.sampling.temperature);
        limits.sampling(temperature, q.top_k, q.top_p)?;
        let params = AnswerParams {
            n: q.n,
            max_new_tokens: q.max_new_tokens,
            temperature: temperature as f32,
            top_p: q.top_p.map(|p| p as f32),
            top_k: q.top_k,
        };
        let seeds = limits.seeds(q.seed, q.n)?;
        let image_bytes = decode_base64_image(q.image, limits.max_image_bytes)?;
        let max_pixels = limits.max_image_pixels;
        // Few images decode at once; what is queued is the small image the
        // model sees, never the decoded original.
        let slot = state
            .decode_slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        let engine = state.engine.clone();
        let (image, image_bytes) = tokio::task::spawn_blocking(move || {
            let _slot = slot;
            engine
                .prepare_image(&image_bytes, max_pixels)
                .map(|image| (image, image_bytes))
        })
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))??;
        Ok(Self {
            work: AnswerWork {
                image: Some(image),
                question: q.question.clone(),
                params,
                seeds: seeds.clone(),
            },
            deadline: Instant::now() + limits.request_timeout,
            ctx: AnswerContext {
                state: state.clone(),
                question: q.question,
                params,
                seeds,
                image_bytes,
            },
        })
    }

    /// Answers and stores every sample.
    pub(super) async fn run(self) -> Result<StoredAnswers, ApiError> {
        let output = self
            .ctx
            .state
            .engine
            .answer(self.work, self.deadline, None)
            .await?;
        self.ctx.store(output).await
    }

    /// Answers in a task of its own, so that tokens flow while it works: the
    /// tokens arrive on the receiver, the stored answers from the task. If
    /// the client goes away the receiver is dropped, the channel closes and
    /// the engine stops this request.
    pub(super) fn start_streaming(
        self,
    ) -> (
        mpsc::UnboundedReceiver<StreamedToken>,
        tokio::task::JoinHandle<Result<StoredAnswers, ApiError>>,
    ) {
        let (tx, rx) = mpsc::unbounded_channel();
        let engine = self.ctx.state.engine.clone();
        let work = tokio::spawn(async move {
            let output = engine.answer(self.work, self.deadline, Some(tx)).await?;
            self.ctx.store(output).await
        });
        (rx, work)
    }
}

struct AnswerContext {
    state: AppState,
    question: String,
    params: AnswerParams,
    seeds: Vec<u64>,
    /// The input image as sent; recorded so a job can train on the question again.
    image_bytes: Vec<u8>,
}

impl AnswerContext {
    /// Records every sample, then builds the response.
    async fn store(self, output: AnswerOutput) -> Result<StoredAnswers, ApiError> {
        let recorded = record_answers(
            &self.state.store,
            &self.question,
            self.params,
            &self.seeds,
            self.image_bytes,
            &output,
        )
        .await?;
        let samples: Vec<AnswerSample> = recorded
            .samples
            .into_iter()
            .map(|s| AnswerSample {
                sample_id: s.sample_id,
                seed: s.seed,
                text: s.output.text,
                finish_reason: s.output.finish_reason.into(),
                completion_tokens: s.output.completion_tokens,
            })
            .collect();
        let completion_tokens = samples.iter().map(|s| s.completion_tokens).sum();
        let response = AnswerResponse {
            request_id: recorded.request_id,
            model_version: output.model_version,
            samples,
            usage: Usage {
                prompt_tokens: output.prompt_tokens,
                completion_tokens,
                total_tokens: output.prompt_tokens + completion_tokens,
            },
            timings: output.timings.into(),
        };
        Ok(StoredAnswers {
            response,
            outputs: output.samples,
        })
    }
}

fn event_stream(
    state: AppState,
    mut rx: mpsc::UnboundedReceiver<StreamedToken>,
    work: tokio::task::JoinHandle<Result<StoredAnswers, ApiError>>,
) -> impl Stream<Item = Result<Event, Infallible>> {
    async_stream(move |yield_tx| async move {
        let mut texts: Vec<AnswerTextStream> = Vec::new();
        while let Some(t) = rx.recv().await {
            while texts.len() <= t.sample {
                texts.push(state.engine.text_stream());
            }
            // Only complete characters leave: a token that ends mid-character
            // adds its text with the next one.
            let delta = texts[t.sample].push(t.token);
            let event = TokenEvent {
                index: t.sample,
                token_id: t.token,
                text: delta,
            };
            if yield_tx.send(json_event("token", &event)).is_err() {
                return;
            }
        }
        let last = match work.await {
            Ok(Ok(stored)) => json_event("done", &stored.response),
            Ok(Err(e)) => error_event(e),
            Err(e) => error_event(ApiError::Internal(e.to_string())),
        };
        let _ = yield_tx.send(last);
    })
}

fn json_event<T: serde::Serialize>(name: &str, value: &T) -> Event {
    Event::default()
        .event(name)
        .json_data(value)
        .unwrap_or_else(|_| Event::default().event(name))
}

fn error_event(e: ApiError) -> Event {
    json_event("error", &e.streamed_body())
}

/// A stream fed by a task: the task sends items, the stream yields them.
pub(super) fn async_stream<F, Fut>(f: F) -> impl Stream<Item = Result<Event, Infallible>>
where
    F: FnOnce(mpsc::UnboundedSender<Event>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(f(tx));
    let guard = AbortOnDrop(task);
    futures::stream::unfold((rx, guard), |(mut rx, guard)| async move {
        rx.recv().await.map(|e| (Ok(e), (rx, guard)))
    })
}

/// Stops the feeding task when the client drops the stream.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Base64 (standard, optionally behind a data URL prefix) to bytes, bounded.
pub(super) fn decode_base64_image(text: &str, max_bytes: usize) -> Result<Vec<u8>, ApiError> {
    let data = match text.strip_prefix("data:") {
        Some(rest) => rest.split_once(";base64,").map(|(_, d)| d).ok_or_else(|| {
            ApiError::InvalidImage("a data URL image must be base64 encoded".into())
        })?,
        None => text,
    };
    let data = data.trim();
    if data.len() / 4 * 3 > max_bytes + 3 {
        return Err(ApiError::ImageTooLarge(format!(
            "the image is larger than {max_bytes} bytes"
        )));
    }
    if data.is_empty() {
        return Err(ApiError::InvalidImage("image is empty".into()));
    }
    base64::engine::general_purpose::STANDARD
        .decode(data)
        .map_err(|e| ApiError::InvalidImage(format!("image is not valid base64: {e}")))
}
