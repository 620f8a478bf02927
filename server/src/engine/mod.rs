//! The engine: one worker thread owns the model; requests reach it through a
//! bounded queue and are batched (requests arriving within a short window
//! share forward passes). Back-pressure is explicit: a full queue is an error
//! the API turns into 429, a dead worker one it turns into 503. A request whose
//! client went away or whose deadline passed stops taking model time.
//!
//! The served policy is a [`ServingModel`] behind an `ArcSwap`: activating a
//! version swaps it between batches; a batch finishes on the version it
//! started with, and every output names that version.
//!
//! Inputs and outputs here are plain data (images, token ids, text): tensors
//! stay inside the worker.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use image::RgbImage;
use tokio::sync::{mpsc, oneshot};

use crate::model::bundle::ModelBundle;
use crate::model::generate::{
    answer_batch, generate_images_batch, AnswerItem, FinishReason, ImageItem, TextPrompt,
};
use crate::model::image_processor::ImageProcessorConfig;
use crate::model::processor::Processor;
use crate::model::sampling::SamplingParams;
use crate::model::{Janus, ModelError};

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
    #[error("model failure: {0}")]
    Model(String),
}

impl From<ModelError> for EngineError {
    fn from(e: ModelError) -> Self {
        match e {
            ModelError::InvalidInput(m) | ModelError::Image(m) | ModelError::ImageTooLarge(m) => {
                EngineError::InvalidInput(m)
            }
            other => EngineError::Model(other.to_string()),
        }
    }
}

#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Requests waiting for the worker, at most.
    pub max_queue: usize,
    /// Rows (samples or images) in one batch, at most.
    pub max_batch_rows: usize,
    /// How long the worker waits for more requests to batch with the first.
    pub batch_window: Duration,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_queue: 64,
            max_batch_rows: 32,
            batch_window: Duration::from_millis(5),
        }
    }
}

/// A question about one image, `seeds.len()` samples.
#[derive(Debug, Clone)]
pub struct AnswerRequest {
    pub image: RgbImage,
    pub question: String,
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    pub seeds: Vec<u64>,
}

/// A text-to-image prompt, `seeds.len()` images.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompt: String,
    pub cfg_weight: f32,
    pub sampling: SamplingParams,
    pub seeds: Vec<u64>,
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
    pub timings: Timings,
    pub model_version: String,
}

#[derive(Debug, Clone)]
pub struct ImageOutput {
    pub image: RgbImage,
    pub tokens: Vec<u32>,
    pub logprobs: Vec<f32>,
}

#[derive(Debug, Clone)]
pub struct GenerateOutput {
    pub images: Vec<ImageOutput>,
    pub timings: Timings,
    pub model_version: String,
}

/// Where a request's time went.
#[derive(Debug, Clone, Copy, Default)]
pub struct Timings {
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
}

struct Pending<R, O> {
    request: R,
    enqueued: Instant,
    deadline: Instant,
    reply: oneshot::Sender<Result<O, EngineError>>,
    stream: Option<mpsc::UnboundedSender<StreamedToken>>,
}

impl<R, O> Pending<R, O> {
    /// Still worth computing: someone waits for it and there is time left.
    fn wanted(&self) -> bool {
        !self.reply.is_closed()
            && self.stream.as_ref().is_none_or(|s| !s.is_closed())
            && Instant::now() < self.deadline
    }

    /// Where this request's time went, for a batch that started at `started`.
    fn timings(&self, started: Instant, compute_ms: u64, batch_rows: usize) -> Timings {
        Timings {
            queue_ms: started.duration_since(self.enqueued).as_millis() as u64,
            compute_ms,
            batch_rows,
        }
    }

    fn finish(self, result: Result<O, EngineError>) {
        let result = match result {
            Ok(_) if Instant::now() >= self.deadline => Err(EngineError::DeadlineExceeded),
            r => r,
        };
        // The receiver may be gone (client disconnected); nothing to do then.
        let _ = self.reply.send(result);
    }
}

/// A failed batch fails every request in it.
fn fail_all<R, O>(jobs: Vec<Pending<R, O>>, task: &str, error: &ModelError) {
    tracing::error!(%error, task, "batch failed");
    for job in jobs {
        job.finish(Err(EngineError::Model(error.to_string())));
    }
}

enum Job {
    Answer(Pending<AnswerRequest, AnswerOutput>),
    Generate(Pending<GenerateRequest, GenerateOutput>),
}

impl Job {
    fn rows(&self) -> usize {
        match self {
            Job::Answer(p) => p.request.seeds.len(),
            Job::Generate(p) => p.request.seeds.len(),
        }
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
}

/// The handle the API holds. Cheap to clone.
#[derive(Clone)]
pub struct Engine {
    tx: mpsc::Sender<Job>,
    queued: Arc<AtomicUsize>,
    alive: Arc<AtomicBool>,
    processor: Arc<Processor>,
    pub info: Arc<ModelInfo>,
    policy: Arc<ArcSwap<ServingModel>>,
}

impl Engine {
    /// Moves the model onto its own worker thread, serving `bundle`'s model
    /// as `version`.
    pub fn start(bundle: ModelBundle, version: String, config: EngineConfig) -> Self {
        let (tx, rx) = mpsc::channel(config.max_queue.max(1));
        let queued = Arc::new(AtomicUsize::new(0));
        let alive = Arc::new(AtomicBool::new(true));
        let cfg = &bundle.model.cfg;
        let info = ModelInfo {
            description: bundle.describe(),
            is_demo: bundle.is_demo(),
            max_positions: cfg.language.max_position_embeddings,
            image_tokens_per_image: cfg.gen_vision.image_tokens(),
            generated_image_size: cfg.gen_vision.image_size,
            understanding_image_size: cfg.vision.image_size,
        };
        let processor = Arc::new(bundle.processor.clone());
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
            alive,
            processor,
            info: Arc::new(info),
            policy,
        }
    }

    /// Serves `model` from the next batch on; batches already running finish
    /// on the version they started with.
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

    /// The prompt processor, for validation before queueing (no tensors).
    pub fn processor(&self) -> &Processor {
        &self.processor
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

    fn enqueue(&self, job: Job) -> Result<(), EngineError> {
        self.queued.fetch_add(1, Ordering::SeqCst);
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
        request: AnswerRequest,
        deadline: Instant,
        stream: Option<mpsc::UnboundedSender<StreamedToken>>,
    ) -> Result<AnswerOutput, EngineError> {
        let (reply, rx) = oneshot::channel();
        self.enqueue(Job::Answer(Pending {
            request,
            enqueued: Instant::now(),
            deadline,
            reply,
            stream,
        }))?;
        rx.await.map_err(|_| EngineError::Unavailable)?
    }

    pub async fn generate(
        &self,
        request: GenerateRequest,
        deadline: Instant,
    ) -> Result<GenerateOutput, EngineError> {
        let (reply, rx) = oneshot::channel();
        self.enqueue(Job::Generate(Pending {
            request,
            enqueued: Instant::now(),
            deadline,
            reply,
            stream: None,
        }))?;
        rx.await.map_err(|_| EngineError::Unavailable)?
    }
}

struct Worker {
    processor: Processor,
    image_processor: ImageProcessorConfig,
    policy: Arc<ArcSwap<ServingModel>>,
    rx: mpsc::Receiver<Job>,
    queued: Arc<AtomicUsize>,
    config: EngineConfig,
}

impl Worker {
    fn run(mut self) {
        while let Some(first) = self.rx.blocking_recv() {
            let batch = self.collect_batch(first);
            self.queued.fetch_sub(batch.len(), Ordering::SeqCst);
            metrics::gauge!("ulm_queue_depth").set(self.queued.load(Ordering::SeqCst) as f64);
            let (mut answers, mut generations) = (Vec::new(), Vec::new());
            for job in batch {
                match job {
                    Job::Answer(p) if p.wanted() => answers.push(p),
                    Job::Generate(p) if p.wanted() => generations.push(p),
                    Job::Answer(p) => p.finish(Err(EngineError::DeadlineExceeded)),
                    Job::Generate(p) => p.finish(Err(EngineError::DeadlineExceeded)),
                }
            }
            // One version for the whole batch, however long it runs.
            let policy = self.policy.load_full();
            if !answers.is_empty() {
                self.run_answers(&policy, answers);
            }
            if !generations.is_empty() {
                self.run_generations(&policy, generations);
            }
        }
    }

    /// The first job plus whatever arrives within the batch window, up to the
    /// row budget.
    fn collect_batch(&mut self, first: Job) -> Vec<Job> {
        let mut rows = first.rows();
        let mut batch = vec![first];
        let until = Instant::now() + self.config.batch_window;
        while rows < self.config.max_batch_rows {
            match self.rx.try_recv() {
                Ok(job) => {
                    rows += job.rows();
                    batch.push(job);
                }
                Err(mpsc::error::TryRecvError::Empty) if Instant::now() < until => {
                    std::thread::sleep(Duration::from_micros(500));
                }
                Err(_) => break,
            }
        }
        batch
    }

    fn run_answers(&self, policy: &ServingModel, jobs: Vec<Pending<AnswerRequest, AnswerOutput>>) {
        let started = Instant::now();
        let model = &policy.model;
        let mut items = Vec::with_capacity(jobs.len());
        let mut valid = Vec::with_capacity(jobs.len());
        for job in jobs {
            match self.answer_item(model, &job.request) {
                Ok(item) => {
                    items.push(item);
                    valid.push(job);
                }
                Err(e) => job.finish(Err(e)),
            }
        }
        let rows: usize = items.iter().map(|i: &AnswerItem| i.prompt.samples).sum();
        metrics::histogram!("ulm_batch_rows", "task" => "answer").record(rows as f64);
        let special = self.processor.special;
        let result = answer_batch(model, &items, special.eos, special.pad, &mut |event| {
            let job = &valid[event.item];
            if let Some(stream) = &job.stream {
                let _ = stream.send(StreamedToken {
                    sample: event.sample,
                    token: event.token,
                });
            }
            job.wanted()
        });
        let compute_ms = started.elapsed().as_millis() as u64;
        match result {
            Ok(all) => {
                for ((job, item), samples) in valid.into_iter().zip(&items).zip(all) {
                    let tokens: usize = samples.iter().map(|s| s.token_ids.len()).sum();
                    metrics::counter!("ulm_tokens_generated_total").increment(tokens as u64);
                    let output = AnswerOutput {
                        samples: samples
                            .into_iter()
                            .map(|s| TextOutput {
                                text: self.processor.decode(&s.token_ids),
                                token_ids: s.token_ids,
                                logprobs: s.logprobs,
                                finish_reason: s.finish_reason,
                            })
                            .collect(),
                        prompt_tokens: item.prompt.prompt.ids.len(),
                        timings: job.timings(started, compute_ms, rows),
                        model_version: policy.version.clone(),
                    };
                    job.finish(Ok(output));
                }
            }
            Err(e) => fail_all(valid, "answer", &e),
        }
    }

    fn answer_item(&self, model: &Janus, r: &AnswerRequest) -> Result<AnswerItem, EngineError> {
        let pixels = self.image_processor.preprocess(&r.image, model.device())?;
        let prompt = self.processor.understanding_prompt(&r.question)?;
        let context = model.cfg.language.max_position_embeddings;
        if prompt.ids.len() + r.max_new_tokens > context {
            return Err(EngineError::InvalidInput(format!(
                "prompt ({} tokens) plus max_new_tokens ({}) exceeds the model context of {}",
                prompt.ids.len(),
                r.max_new_tokens,
                context
            )));
        }
        Ok(AnswerItem {
            prompt: TextPrompt {
                prompt,
                pixels: Some(pixels.unsqueeze(0).map_err(ModelError::from)?),
                samples: r.seeds.len(),
            },
            max_new_tokens: r.max_new_tokens,
            sampling: r.sampling,
            seeds: r.seeds.clone(),
        })
    }

    fn run_generations(
        &self,
        policy: &ServingModel,
        jobs: Vec<Pending<GenerateRequest, GenerateOutput>>,
    ) {
        let started = Instant::now();
        let model = &policy.model;
        let steps = model.cfg.gen_vision.image_tokens();
        let context = model.cfg.language.max_position_embeddings;
        let mut items = Vec::with_capacity(jobs.len());
        let mut valid = Vec::with_capacity(jobs.len());
        for job in jobs {
            match self.processor.generation_prompt(&job.request.prompt) {
                Ok(prompt) if prompt.cond_ids.len() + steps <= context => {
                    items.push(ImageItem {
                        prompt,
                        cfg_weight: job.request.cfg_weight,
                        sampling: job.request.sampling,
                        seeds: job.request.seeds.clone(),
                    });
                    valid.push(job);
                }
                Ok(_) => job.finish(Err(EngineError::InvalidInput(
                    "the prompt is too long for the model context".into(),
                ))),
                Err(e) => job.finish(Err(e.into())),
            }
        }
        let rows: usize = items.iter().map(|i| i.seeds.len()).sum();
        metrics::histogram!("ulm_batch_rows", "task" => "generate").record(rows as f64);
        let result =
            generate_images_batch(model, &items, self.processor.special.pad, &mut |item| {
                valid[item].wanted()
            });
        let compute_ms = started.elapsed().as_millis() as u64;
        match result {
            Ok(all) => {
                for (job, images) in valid.into_iter().zip(all) {
                    let images: Option<Vec<ImageOutput>> = images
                        .into_iter()
                        .map(|s| {
                            s.map(|s| ImageOutput {
                                image: s.image,
                                tokens: s.tokens,
                                logprobs: s.logprobs,
                            })
                        })
                        .collect();
                    let Some(images) = images else {
                        job.finish(Err(EngineError::DeadlineExceeded));
                        continue;
                    };
                    metrics::counter!("ulm_images_generated_total").increment(images.len() as u64);
                    let output = GenerateOutput {
                        images,
                        timings: job.timings(started, compute_ms, rows),
                        model_version: policy.version.clone(),
                    };
                    job.finish(Ok(output));
                }
            }
            Err(e) => fail_all(valid, "generation", &e),
        }
    }
}
