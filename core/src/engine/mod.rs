//! The engine: one worker thread owns the model; requests reach it through a
//! bounded queue and join the running batch between decode steps
//! (continuous batching; see `worker`). Back-pressure is explicit: a full
//! queue is an error the API turns into 429, a dead worker one it turns into
//! 503. A request whose client went away or whose deadline passed stops
//! taking model time.
//!
//! The served policy is a [`ServingModel`] behind an `ArcSwap`: activating a
//! version swaps it for requests that start after it; a request finishes on
//! the version it started with, and every output names that version.
//!
//! Inputs and outputs here are plain data (images, token ids, text): tensors
//! stay inside the worker.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use image::RgbImage;
use tokio::sync::{mpsc, oneshot};
use ulm_model::bundle::ModelBundle;
use ulm_model::image_processor::ImageProcessorConfig;
use ulm_model::plan::{plan_request, DESCRIBE_QUESTION, MAX_PLAN_TOKENS};
use ulm_model::processor::{Processor, TextStream};
/// The sampling ranges and defaults the API validates against: one home,
/// the model's, so a checkpoint's defaults and a request obey one rule.
pub use ulm_model::sampling_defaults::{
    guidance_in_range, temperature_in_range, SamplingDefaults, MAX_BEST_OF, MAX_GUIDANCE_SCALE,
    MAX_TEMPERATURE, MIN_TEMPERATURE,
};
use ulm_model::{Janus, ModelError};

use crate::record::AnswerParams;

mod work;
mod worker;

pub use work::{
    AnswerOutput, AnswerWork, GenerateOutput, ImageOutput, ImageWork, ReadWork, RequestTimings,
    StreamedToken, TextOutput,
};
use worker::Worker;

/// A model version ready to serve. Its weights share storage with the base
/// model wherever they are the same tensors (LoRA versions add adapters only).
pub struct ServingModel {
    pub version: String,
    pub model: Janus,
}

/// Why the engine could not serve a request.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("the request queue is full")]
    QueueFull,
    #[error("the model worker is not running")]
    Unavailable,
    #[error("the request deadline passed")]
    DeadlineExceeded,
    #[error("invalid input: {0}")]
    InvalidInput(String),
    #[error("invalid image: {0}")]
    InvalidImage(String),
    #[error("image too large: {0}")]
    ImageTooLarge(String),
    #[error("model failure: {0}")]
    Model(String),
}

impl From<&ModelError> for EngineError {
    /// The client's fault where the input was wrong, the model's otherwise.
    fn from(e: &ModelError) -> Self {
        match e {
            ModelError::InvalidInput(m) => EngineError::InvalidInput(m.clone()),
            ModelError::Image(m) => EngineError::InvalidImage(m.clone()),
            ModelError::ImageTooLarge(m) => EngineError::ImageTooLarge(m.clone()),
            other => EngineError::Model(other.to_string()),
        }
    }
}

impl From<ModelError> for EngineError {
    fn from(e: ModelError) -> Self {
        EngineError::from(&e)
    }
}

/// When waiting requests may join the model's batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Batching {
    /// Between any two decode steps: a request starts at once when there is
    /// room, and a finished one frees its rows at once.
    #[default]
    Continuous,
    /// Only when nothing runs: a batch forms within the window and runs to
    /// its end (the baseline the serving benchmark compares against).
    Static,
}

#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Requests waiting for the worker, at most.
    pub max_queue: usize,
    /// Rows (samples or images) being decoded together, at most.
    pub max_batch_rows: usize,
    /// How long an idle worker waits for more requests to start with the
    /// first.
    pub batch_window: Duration,
    pub batching: Batching,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_queue: 64,
            max_batch_rows: 32,
            batch_window: Duration::from_millis(5),
            batching: Batching::Continuous,
        }
    }
}

pub(crate) struct Pending<R, O> {
    request: R,
    enqueued: Instant,
    deadline: Instant,
    reply: oneshot::Sender<Result<O, EngineError>>,
    stream: Option<mpsc::UnboundedSender<StreamedToken>>,
}

impl<R, O> Pending<R, O> {
    /// Still worth computing: someone waits for it and there is time left.
    pub(crate) fn wanted(&self) -> bool {
        !self.reply.is_closed()
            && self.stream.as_ref().is_none_or(|s| !s.is_closed())
            && Instant::now() < self.deadline
    }

    /// Where this request's time went, for a batch that started at `started`.
    pub(crate) fn timings(
        &self,
        started: Instant,
        compute_ms: u64,
        batch_rows: usize,
    ) -> RequestTimings {
        RequestTimings {
            queue_ms: started.duration_since(self.enqueued).as_millis() as u64,
            compute_ms,
            batch_rows,
        }
    }

    pub(crate) fn finish(self, result: Result<O, EngineError>) {
        let result = match result {
            Ok(_) if Instant::now() >= self.deadline => Err(EngineError::DeadlineExceeded),
            r => r,
        };
        // The receiver may be gone (client disconnected); nothing to do then.
        let _ = self.reply.send(result);
    }
}

/// Of each run of `k` candidates, the one with the highest score.
fn keep_best(candidates: Vec<ImageOutput>, scores: &[f32], k: usize) -> Vec<ImageOutput> {
    let mut kept = Vec::with_capacity(candidates.len() / k.max(1));
    let mut best: Option<(f32, ImageOutput)> = None;
    for (i, (candidate, &score)) in candidates.into_iter().zip(scores).enumerate() {
        if best.as_ref().is_none_or(|(top, _)| score > *top) {
            best = Some((score, candidate));
        }
        if (i + 1) % k == 0 {
            kept.extend(best.take().map(|(_, c)| c));
        }
    }
    kept
}

/// Fails every request of a failed batch or prefill.
pub(crate) fn fail_all<R, O>(jobs: Vec<Pending<R, O>>, task: &str, error: &ModelError) {
    tracing::error!(%error, task, "batch failed");
    for job in jobs {
        job.finish(Err(error.into()));
    }
}

/// A request waiting in the queue.
pub(crate) enum Queued {
    Answer(Pending<AnswerWork, AnswerOutput>),
    Generate(Pending<ImageWork, GenerateOutput>),
    /// One forward pass, run as it is admitted: it joins no lane.
    Read(Pending<ReadWork, Vec<f32>>),
}

impl Queued {
    pub(crate) fn rows(&self) -> usize {
        match self {
            Queued::Answer(p) => p.request.seeds.len(),
            Queued::Generate(p) => p.request.seeds.len(),
            Queued::Read(_) => 0,
        }
    }
}

/// The text of one streamed answer: each token gives the text it completes.
pub struct AnswerTextStream {
    processor: Arc<Processor>,
    stream: TextStream,
}

impl AnswerTextStream {
    pub fn push(&mut self, token: u32) -> String {
        self.stream.push(&self.processor, token)
    }
}

/// Facts about the served model that the API reports and validates against.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub description: String,
    pub is_demo: bool,
    pub max_positions: usize,
    pub image_tokens_per_image: usize,
    pub generated_image_size: usize,
    pub understanding_image_size: usize,
    /// What requests that do not say are sampled with.
    pub sampling: SamplingDefaults,
}

/// What the worker is decoding, as it last reported.
#[derive(Default)]
pub(crate) struct Running {
    answer_rows: AtomicUsize,
    images: AtomicUsize,
}

impl Running {
    pub(crate) fn report(&self, answer_rows: usize, images: usize) {
        self.answer_rows.store(answer_rows, Ordering::SeqCst);
        self.images.store(images, Ordering::SeqCst);
        metrics::gauge!("ulm_running_rows", "task" => "answer").set(answer_rows as f64);
        metrics::gauge!("ulm_running_rows", "task" => "generate").set(images as f64);
    }
}

/// The handle the API holds. Cheap to clone.
#[derive(Clone)]
pub struct Engine {
    tx: mpsc::Sender<Queued>,
    /// Requests not yet in the running batch: in the channel or held by the
    /// worker until there is room.
    queued: Arc<AtomicUsize>,
    max_queue: usize,
    running: Arc<Running>,
    alive: Arc<AtomicBool>,
    processor: Arc<Processor>,
    image_processor: Arc<ImageProcessorConfig>,
    pub info: Arc<ModelInfo>,
    policy: Arc<ArcSwap<ServingModel>>,
}

impl Engine {
    /// Moves the model onto its own worker thread, serving `bundle`'s model
    /// as `version`.
    pub fn start(bundle: ModelBundle, version: String, config: EngineConfig) -> Self {
        let max_queue = config.max_queue.max(1);
        let (tx, rx) = mpsc::channel(max_queue);
        let queued = Arc::new(AtomicUsize::new(0));
        let running = Arc::new(Running::default());
        let alive = Arc::new(AtomicBool::new(true));
        let cfg = &bundle.model.cfg;
        let info = ModelInfo {
            description: bundle.describe(),
            is_demo: bundle.is_demo(),
            max_positions: cfg.language.max_position_embeddings,
            image_tokens_per_image: cfg.gen_vision.image_tokens(),
            generated_image_size: cfg.gen_vision.image_size,
            understanding_image_size: cfg.vision.image_size,
            sampling: bundle.sampling,
        };
        let processor = Arc::new(bundle.processor.clone());
        let image_processor = Arc::new(bundle.image_processor.clone());
        metrics::gauge!("ulm_model_active", "version" => version.clone()).set(1.0);
        let policy = Arc::new(ArcSwap::from_pointee(ServingModel {
            version,
            model: bundle.model,
        }));
        let worker = Worker {
            processor: bundle.processor,
            image_processor: bundle.image_processor,
            policy: policy.clone(),
            rx,
            queued: queued.clone(),
            running: running.clone(),
            config,
        };
        let alive_flag = alive.clone();
        std::thread::Builder::new()
            .name("model-worker".into())
            .spawn(move || {
                worker.run();
                alive_flag.store(false, Ordering::SeqCst);
            })
            .expect("spawning the model worker thread");
        Self {
            tx,
            queued,
            max_queue,
            running,
            alive,
            processor,
            image_processor,
            info: Arc::new(info),
            policy,
        }
    }

    /// Serves `model` to requests that start from now on; requests already
    /// running finish on the version they started with.
    pub fn activate(&self, model: ServingModel) {
        tracing::info!(version = %model.version, "activating model version");
        let version = model.version.clone();
        let previous = self.policy.swap(Arc::new(model));
        metrics::gauge!("ulm_model_active", "version" => previous.version.clone()).set(0.0);
        metrics::gauge!("ulm_model_active", "version" => version).set(1.0);
        metrics::counter!("ulm_model_activations_total").increment(1);
    }

    /// The version being served, as a model the trainer can start from.
    pub fn serving(&self) -> Arc<ServingModel> {
        self.policy.load_full()
    }

    /// An input image as the model will see it: decoded (PNG, JPEG or WebP,
    /// at most `max_pixels`, checked before any pixel is decoded), then
    /// resized and padded to the vision tower's input. Only this small image
    /// is queued; preprocessing it again is the identity.
    pub fn prepare_image(&self, bytes: &[u8], max_pixels: u64) -> Result<RgbImage, EngineError> {
        let image = ulm_model::image_processor::decode_image(bytes, max_pixels)?;
        Ok(self.image_processor.resize_and_pad(&image))
    }

    /// A decoder of one streamed answer's text, token by token.
    pub fn text_stream(&self) -> AnswerTextStream {
        AnswerTextStream {
            processor: self.processor.clone(),
            stream: TextStream::default(),
        }
    }

    /// The token that ends an answer (it is part of a stopped answer's
    /// tokens, though it adds no text).
    pub fn end_of_answer_token(&self) -> u32 {
        self.processor.special.eos
    }

    pub fn model_version(&self) -> String {
        self.policy.load().version.clone()
    }

    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::SeqCst) && !self.tx.is_closed()
    }

    /// Requests waiting for the worker.
    pub fn queue_depth(&self) -> usize {
        self.queued.load(Ordering::SeqCst)
    }

    /// Answer rows and images in the running batch.
    pub fn running(&self) -> (usize, usize) {
        (
            self.running.answer_rows.load(Ordering::SeqCst),
            self.running.images.load(Ordering::SeqCst),
        )
    }

    fn enqueue(&self, job: Queued) -> Result<(), EngineError> {
        if self.queued.fetch_add(1, Ordering::SeqCst) >= self.max_queue {
            self.queued.fetch_sub(1, Ordering::SeqCst);
            return Err(EngineError::QueueFull);
        }
        metrics::gauge!("ulm_queue_depth").set(self.queue_depth() as f64);
        self.tx.try_send(job).map_err(|e| {
            self.queued.fetch_sub(1, Ordering::SeqCst);
            match e {
                mpsc::error::TrySendError::Full(_) => EngineError::QueueFull,
                mpsc::error::TrySendError::Closed(_) => EngineError::Unavailable,
            }
        })
    }

    /// Answers; tokens are also sent to `stream` as they are produced.
    pub async fn answer(
        &self,
        request: AnswerWork,
        deadline: Instant,
        stream: Option<mpsc::UnboundedSender<StreamedToken>>,
    ) -> Result<AnswerOutput, EngineError> {
        self.submit(request, deadline, stream, Queued::Answer).await
    }

    /// Draws the request's images. With `params.plan_temperature` the
    /// model first writes a plan of the prompt (a text-only turn, one
    /// sample from the first seed, decoded in the answer lane with the
    /// others) and every image is drawn from it; the plan's time counts in
    /// the timings. With `params.best_of` k above 1 (a planned request
    /// only), each image is the one of k candidates (seeds `seed * k + c`)
    /// that the model's describing turn finds the plan likeliest of.
    pub async fn generate(
        &self,
        mut request: ImageWork,
        deadline: Instant,
    ) -> Result<GenerateOutput, EngineError> {
        let plan = match request.params.plan_temperature {
            Some(temperature) => {
                let plan = self.plan(&request, temperature, deadline).await?;
                request.prompt = plan.samples[0].text.trim().to_string();
                Some(plan)
            }
            None => None,
        };
        let best_of = match (&plan, request.params.best_of) {
            (Some(_), Some(k)) if k > 1 => k as u64,
            (None, Some(k)) if k > 1 => {
                return Err(EngineError::InvalidInput(
                    "best_of needs a plan to read the candidates against".into(),
                ))
            }
            _ => 1,
        };
        if best_of > 1 {
            request.seeds = request
                .seeds
                .iter()
                .flat_map(|seed| {
                    (0..best_of).map(move |c| seed.wrapping_mul(best_of).wrapping_add(c))
                })
                .collect();
        }
        let mut output = self
            .submit(request.clone(), deadline, None, Queued::Generate)
            .await?;
        if best_of > 1 {
            let read = ReadWork {
                images: output.images.iter().map(|i| i.image.clone()).collect(),
                question: DESCRIBE_QUESTION.to_string(),
                answer: request.prompt.clone(),
            };
            let started = Instant::now();
            let scores = self.read(read, deadline).await?;
            output.timings.compute_ms += started.elapsed().as_millis() as u64;
            output.images = keep_best(output.images, &scores, best_of as usize);
        }
        if let Some(plan) = plan {
            output.plan = Some(request.prompt);
            output.timings.queue_ms += plan.timings.queue_ms;
            output.timings.compute_ms += plan.timings.compute_ms;
        }
        Ok(output)
    }

    /// The log-likelihood of the work's answer about each of its images.
    pub async fn read(&self, work: ReadWork, deadline: Instant) -> Result<Vec<f32>, EngineError> {
        self.submit(work, deadline, None, Queued::Read).await
    }

    /// The plan of `request`'s prompt: the planning turn answered once,
    /// from the request's first seed.
    async fn plan(
        &self,
        request: &ImageWork,
        temperature: f32,
        deadline: Instant,
    ) -> Result<AnswerOutput, EngineError> {
        let seed = *request
            .seeds
            .first()
            .ok_or_else(|| EngineError::InvalidInput("no image to draw".into()))?;
        let work = AnswerWork {
            image: None,
            question: plan_request(&request.prompt),
            params: AnswerParams {
                n: 1,
                max_new_tokens: MAX_PLAN_TOKENS as u32,
                temperature,
                top_p: None,
                top_k: None,
            },
            seeds: vec![seed],
        };
        self.submit(work, deadline, None, Queued::Answer).await
    }

    /// Queues `request` as `queued` makes it and waits for its output.
    async fn submit<R, O>(
        &self,
        request: R,
        deadline: Instant,
        stream: Option<mpsc::UnboundedSender<StreamedToken>>,
        queued: fn(Pending<R, O>) -> Queued,
    ) -> Result<O, EngineError> {
        let (reply, rx) = oneshot::channel();
        self.enqueue(queued(Pending {
            request,
            enqueued: Instant::now(),
            deadline,
            reply,
            stream,
        }))?;
        rx.await.map_err(|_| EngineError::Unavailable)?
    }
}
