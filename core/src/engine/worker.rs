//! The model worker: one thread owns the model and runs two lanes, answers
//! and images, one decode step of each in turn. Waiting requests join a
//! lane between steps (continuous batching: their prompts are prefilled and
//! their rows added to the running ones) and leave it as soon as they end;
//! with [`Batching::Static`] they join only when both lanes are empty.
//!
//! Joining costs the running rows a prefill and a cache copy, so requests
//! join a running lane in groups (see [`WAITING_SERVED_RATIO`]).
//!
//! A lane runs on one model version. After a swap it admits nobody until its
//! rows of the old version have ended, then starts again on the new one; the
//! other lane may already run the new version meanwhile.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::sync::mpsc;
use ulm_model::decode::TextPrompt;
use ulm_model::generate::{
    AnswerBatch, AnswerItem, DecodeEnd, ImageBatch, ImageItem, ImageSample, TextSample,
};
use ulm_model::image_processor::ImageProcessorConfig;
use ulm_model::ops::Pass;
use ulm_model::processor::Processor;
use ulm_model::{Janus, ModelError};
use ulm_rl::reading::answer_logps;

use super::work::{
    AnswerOutput, AnswerWork, GenerateOutput, ImageOutput, ImageWork, ReadWork, StreamedToken,
    TextOutput,
};
use super::{
    fail_all, Batching, EngineConfig, EngineError, Pending, Queued, Running, ServingModel,
};
use crate::record::FinishReason;

/// Waiting requests join a running lane once the rows of theirs that fit
/// in the batch reach this share of the running rows, or once they have
/// waited this many decode steps (as text-generation-inference does):
/// every join costs a prefill and a copy of the running batch's cache, so
/// joining one request per step, as rows end one at a time under load,
/// would slow every running row. A lane with no rows takes requests at once.
const WAITING_SERVED_RATIO: f64 = 0.3;
const MAX_WAITING_STEPS: usize = 20;

pub(super) struct Worker {
    pub(super) processor: Processor,
    pub(super) image_processor: ImageProcessorConfig,
    pub(super) policy: Arc<ArcSwap<ServingModel>>,
    pub(super) rx: mpsc::Receiver<Queued>,
    pub(super) queued: Arc<AtomicUsize>,
    pub(super) running: Arc<Running>,
    pub(super) config: EngineConfig,
}

/// A request inside a lane, waiting for its item to end.
struct Admitted<R, O> {
    job: Pending<R, O>,
    admitted: Instant,
    /// Rows of the lane right after this request joined it.
    batch_rows: usize,
    prompt_tokens: usize,
}

impl<R, O> Admitted<R, O> {
    fn finish(self, output: impl FnOnce(super::RequestTimings) -> O) {
        let compute_ms = self.admitted.elapsed().as_millis() as u64;
        let timings = self.job.timings(self.admitted, compute_ms, self.batch_rows);
        self.job.finish(Ok(output(timings)));
    }
}

/// The running batch of one task, on one model version.
struct Lane<B, R, O> {
    policy: Option<Arc<ServingModel>>,
    batch: B,
    jobs: HashMap<usize, Admitted<R, O>>,
}

type AnswerLane = Lane<AnswerBatch, AnswerWork, AnswerOutput>;
type ImageLane = Lane<ImageBatch, ImageWork, GenerateOutput>;

impl<B, R, O> Lane<B, R, O> {
    fn new(batch: B) -> Self {
        Self {
            policy: None,
            batch,
            jobs: HashMap::new(),
        }
    }

    fn is_empty(&self) -> bool {
        self.jobs.is_empty()
    }

    /// Whether requests may join now: the lane is empty or runs `current`.
    fn accepts(&self, current: &Arc<ServingModel>) -> bool {
        self.is_empty() || self.policy.as_ref().is_none_or(|p| Arc::ptr_eq(p, current))
    }

    /// The version requests joining now run on: the lane's while it has
    /// rows, `current` otherwise.
    fn version_for(&mut self, current: &Arc<ServingModel>) -> Arc<ServingModel> {
        if self.is_empty() {
            self.policy = Some(current.clone());
        }
        self.policy.clone().unwrap_or_else(|| current.clone())
    }

    /// A step failed: the batch is lost, and with it every request in it.
    fn fail(&mut self, fresh: B, task: &str, error: &ModelError) {
        self.batch = fresh;
        let jobs: Vec<Pending<R, O>> = self.jobs.drain().map(|(_, a)| a.job).collect();
        fail_all(jobs, task, error);
    }
}

impl Worker {
    pub(super) fn run(mut self) {
        let special = self.processor.special;
        let mut answers: AnswerLane = Lane::new(AnswerBatch::new(special.eos, special.pad));
        let mut images: ImageLane = Lane::new(ImageBatch::new(special.pad));
        let mut waiting: VecDeque<Queued> = VecDeque::new();
        let mut next_key = 0usize;
        let mut steps_since_admission = 0usize;
        loop {
            let idle = answers.is_empty() && images.is_empty();
            if idle && waiting.is_empty() {
                let Some(first) = self.rx.blocking_recv() else {
                    return;
                };
                waiting.push_back(first);
                self.wait_for_company(&mut waiting);
            } else {
                while let Ok(job) = self.rx.try_recv() {
                    waiting.push_back(job);
                }
            }
            let running = answers.batch.rows() + images.batch.images();
            // Waiting rows that would fit in the batch now.
            let joinable = waiting
                .iter()
                .map(Queued::rows)
                .sum::<usize>()
                .min(self.config.max_batch_rows.saturating_sub(running));
            let continuous = self.config.batching == Batching::Continuous;
            // Static batching admits into an idle worker only; continuous
            // into empty lanes at once and into running ones in groups.
            let all_lanes = idle
                || (continuous
                    && (joinable as f64 >= WAITING_SERVED_RATIO * running as f64
                        || steps_since_admission >= MAX_WAITING_STEPS));
            if (continuous || idle)
                && self.admit(
                    &mut waiting,
                    &mut answers,
                    &mut images,
                    &mut next_key,
                    all_lanes,
                )
            {
                steps_since_admission = 0;
            }
            steps_since_admission += 1;
            self.running
                .report(answers.batch.rows(), images.batch.images());
            self.step_answers(&mut answers);
            self.step_images(&mut images);
            if answers.is_empty() && images.is_empty() {
                self.running.report(0, 0);
            }
        }
    }

    /// Requests arriving within the batch window of the first join it, up to
    /// the row budget, so that simultaneous requests share one prefill.
    fn wait_for_company(&mut self, waiting: &mut VecDeque<Queued>) {
        let until = Instant::now() + self.config.batch_window;
        let mut rows: usize = waiting.iter().map(Queued::rows).sum();
        while rows < self.config.max_batch_rows {
            match self.rx.try_recv() {
                Ok(job) => {
                    rows += job.rows();
                    waiting.push_back(job);
                }
                Err(mpsc::error::TryRecvError::Empty) if Instant::now() < until => {
                    std::thread::sleep(Duration::from_micros(500));
                }
                Err(_) => break,
            }
        }
    }

    /// Moves waiting requests into their lanes, first come first served per
    /// task, while the rows fit the budget (a request larger than the whole
    /// budget runs alone): into every lane when `all_lanes`, else only into
    /// empty ones. Requests nobody waits for any more end here. Returns
    /// whether any request joined a lane.
    fn admit(
        &self,
        waiting: &mut VecDeque<Queued>,
        answers: &mut AnswerLane,
        images: &mut ImageLane,
        next_key: &mut usize,
        all_lanes: bool,
    ) -> bool {
        let current = self.policy.load_full();
        let running = answers.batch.rows() + images.batch.images();
        let mut budget = self.config.max_batch_rows.saturating_sub(running);
        let (mut answer_open, mut image_open) = (
            answers.accepts(&current) && (all_lanes || answers.is_empty()),
            images.accepts(&current) && (all_lanes || images.is_empty()),
        );
        let (mut new_answers, mut new_images) = (Vec::new(), Vec::new());
        let mut left = VecDeque::with_capacity(waiting.len());
        let mut taken = 0;
        for job in waiting.drain(..) {
            // A reading is one forward pass: it runs now and joins no lane.
            let job = match job {
                Queued::Read(p) => {
                    taken += 1;
                    let result = match p.wanted() {
                        true => self.read(&current.model, &p.request),
                        false => Err(EngineError::DeadlineExceeded),
                    };
                    p.finish(result);
                    continue;
                }
                job => job,
            };
            let open = match &job {
                Queued::Answer(_) => &mut answer_open,
                Queued::Generate(_) => &mut image_open,
                Queued::Read(_) => unreachable!("read above"),
            };
            let wanted = match &job {
                Queued::Answer(p) => p.wanted(),
                Queued::Generate(p) => p.wanted(),
                Queued::Read(_) => unreachable!("read above"),
            };
            if !wanted {
                taken += 1;
                match job {
                    Queued::Answer(p) => p.finish(Err(EngineError::DeadlineExceeded)),
                    Queued::Generate(p) => p.finish(Err(EngineError::DeadlineExceeded)),
                    Queued::Read(_) => unreachable!("read above"),
                }
                continue;
            }
            let rows = job.rows();
            let alone = running == 0 && new_answers.is_empty() && new_images.is_empty();
            if !*open || (rows > budget && !alone) {
                // Later requests of this task wait behind it.
                *open = false;
                left.push_back(job);
                continue;
            }
            budget = budget.saturating_sub(rows);
            taken += 1;
            match job {
                Queued::Answer(p) => new_answers.push(p),
                Queued::Generate(p) => new_images.push(p),
                Queued::Read(_) => unreachable!("read above"),
            }
        }
        *waiting = left;
        let joined = !new_answers.is_empty() || !new_images.is_empty();
        if taken > 0 {
            self.queued.fetch_sub(taken, Ordering::SeqCst);
            metrics::gauge!("ulm_queue_depth").set(self.queued.load(Ordering::SeqCst) as f64);
        }
        if !new_answers.is_empty() {
            let policy = answers.version_for(&current);
            let jobs = new_answers
                .into_iter()
                .filter_map(|job| {
                    let key = *next_key;
                    *next_key += 1;
                    match self.answer_item(&policy.model, &job.request) {
                        Ok(item) => Some((key, item, job)),
                        Err(e) => {
                            job.finish(Err(e));
                            None
                        }
                    }
                })
                .collect();
            self.join(answers, &policy, jobs, "answer");
        }
        if !new_images.is_empty() {
            let policy = images.version_for(&current);
            let jobs = new_images
                .into_iter()
                .filter_map(|job| {
                    let key = *next_key;
                    *next_key += 1;
                    match self.image_item(&policy.model, &job.request) {
                        Ok(item) => Some((key, item, job)),
                        Err(e) => {
                            job.finish(Err(e));
                            None
                        }
                    }
                })
                .collect();
            self.join(images, &policy, jobs, "generate");
        }
        joined
    }

    /// Prefills `jobs` into `lane`; when that fails for several, each is
    /// tried alone so that one bad request fails alone.
    fn join<B: JoinBatch, R, O>(
        &self,
        lane: &mut Lane<B, R, O>,
        policy: &ServingModel,
        jobs: Vec<(usize, B::Item, Pending<R, O>)>,
        task: &'static str,
    ) {
        if jobs.is_empty() {
            return;
        }
        let items: Vec<(usize, B::Item)> =
            jobs.iter().map(|(k, item, _)| (*k, item.clone())).collect();
        match lane.batch.admit(&policy.model, items) {
            Ok(()) => {
                let now = Instant::now();
                let batch_rows = lane.batch.rows();
                metrics::histogram!("ulm_batch_rows", "task" => task).record(batch_rows as f64);
                for (key, item, job) in jobs {
                    lane.jobs.insert(
                        key,
                        Admitted {
                            job,
                            admitted: now,
                            batch_rows,
                            prompt_tokens: B::prompt_tokens(&item),
                        },
                    );
                }
            }
            Err(error) if jobs.len() > 1 => {
                tracing::warn!(%error, requests = jobs.len(), task, "prefill failed; admitting its requests one at a time");
                for job in jobs {
                    self.join(lane, policy, vec![job], task);
                }
            }
            Err(error) => {
                let jobs = jobs.into_iter().map(|(_, _, job)| job).collect();
                fail_all(jobs, task, &error);
            }
        }
    }

    fn step_answers(&self, lane: &mut AnswerLane) {
        let Some(policy) = lane.policy.clone().filter(|_| !lane.is_empty()) else {
            return;
        };
        let jobs = &lane.jobs;
        let result = lane.batch.step(&policy.model, &mut |event| {
            let job = &jobs[&event.item].job;
            if let Some(stream) = &job.stream {
                let _ = stream.send(StreamedToken {
                    sample: event.sample,
                    token: event.token,
                    logprob: event.logprob,
                });
            }
            job.wanted()
        });
        let special = self.processor.special;
        match result {
            Ok(ended) => {
                for (key, samples) in ended {
                    let admitted = lane.jobs.remove(&key).expect("an ended item was admitted");
                    self.finish_answer(admitted, samples, &policy.version);
                }
            }
            Err(error) => lane.fail(AnswerBatch::new(special.eos, special.pad), "answer", &error),
        }
    }

    fn finish_answer(
        &self,
        admitted: Admitted<AnswerWork, AnswerOutput>,
        samples: Vec<TextSample>,
        version: &str,
    ) {
        let tokens: usize = samples.iter().map(|s| s.token_ids.len()).sum();
        metrics::counter!("ulm_tokens_generated_total").increment(tokens as u64);
        // The engine cancels only requests nobody waits for any more.
        let samples: Option<Vec<TextOutput>> = samples
            .into_iter()
            .map(|s| {
                let finish_reason = match s.finish_reason {
                    DecodeEnd::Stop => FinishReason::Stop,
                    DecodeEnd::Length => FinishReason::Length,
                    DecodeEnd::Cancelled => return None,
                };
                Some(TextOutput {
                    text: self.processor.decode(&s.token_ids),
                    token_ids: s.token_ids,
                    logprobs: s.logprobs,
                    finish_reason,
                })
            })
            .collect();
        let Some(samples) = samples else {
            admitted.job.finish(Err(EngineError::DeadlineExceeded));
            return;
        };
        let prompt_tokens = admitted.prompt_tokens;
        admitted.finish(|timings| AnswerOutput {
            samples,
            prompt_tokens,
            timings,
            model_version: version.to_string(),
        });
    }

    fn step_images(&self, lane: &mut ImageLane) {
        let Some(policy) = lane.policy.clone().filter(|_| !lane.is_empty()) else {
            return;
        };
        let jobs = &lane.jobs;
        let result = lane
            .batch
            .step(&policy.model, &mut |key| jobs[&key].job.wanted());
        match result {
            Ok(ended) => {
                for (key, images) in ended {
                    let admitted = lane.jobs.remove(&key).expect("an ended item was admitted");
                    finish_images(admitted, images, &policy.version);
                }
            }
            Err(error) => lane.fail(
                ImageBatch::new(self.processor.special.pad),
                "generation",
                &error,
            ),
        }
    }

    /// The answer's log-likelihood about each image: one forward pass.
    fn read(&self, model: &Janus, r: &ReadWork) -> Result<Vec<f32>, EngineError> {
        let turns = vec![vec![(r.question.clone(), r.answer.clone())]; r.images.len()];
        let read = answer_logps(
            model,
            &self.processor,
            &self.image_processor,
            Some(&r.images),
            &turns,
            Pass::Inference,
        )
        .and_then(|read| read.totals())
        .map_err(|e| EngineError::Model(e.to_string()))?;
        Ok(read)
    }

    fn answer_item(&self, model: &Janus, r: &AnswerWork) -> Result<AnswerItem, EngineError> {
        let prompt = match &r.image {
            Some(image) => TextPrompt::question(
                model,
                &self.processor,
                &self.image_processor,
                image,
                &r.question,
                r.seeds.len(),
            )?,
            None => TextPrompt {
                prompt: self.processor.text_prompt(&r.question)?,
                pixels: None,
                samples: r.seeds.len(),
            },
        };
        let context = model.cfg.language.max_position_embeddings;
        let max_new_tokens = r.params.max_new_tokens as usize;
        let prompt_tokens = prompt.prompt.ids.len();
        if prompt_tokens + max_new_tokens > context {
            return Err(EngineError::InvalidInput(format!(
                "prompt ({prompt_tokens} tokens) plus max_new_tokens ({max_new_tokens}) exceeds the model context of {context}"
            )));
        }
        Ok(AnswerItem {
            prompt,
            max_new_tokens,
            sampling: r.sampling(),
            seeds: r.seeds.clone(),
        })
    }

    fn image_item(&self, model: &Janus, r: &ImageWork) -> Result<ImageItem, EngineError> {
        let steps = model.cfg.gen_vision.image_tokens();
        let context = model.cfg.language.max_position_embeddings;
        let prompt = self.processor.generation_prompt(&r.prompt)?;
        if prompt.cond_ids.len() + steps > context {
            return Err(EngineError::InvalidInput(
                "the prompt is too long for the model context".into(),
            ));
        }
        Ok(ImageItem {
            prompt,
            cfg_weight: r.params.cfg_weight,
            sampling: r.sampling(),
            seeds: r.seeds.clone(),
        })
    }
}

fn finish_images(
    admitted: Admitted<ImageWork, GenerateOutput>,
    images: Vec<Option<ImageSample>>,
    version: &str,
) {
    let images: Option<Vec<ImageOutput>> = images
        .into_iter()
        .map(|s| {
            s.map(|s| ImageOutput {
                image: s.image,
                tokens: s.tokens,
                logprobs: s.logprobs,
                guided_logprobs: s.guided_logprobs,
            })
        })
        .collect();
    let Some(images) = images else {
        admitted.job.finish(Err(EngineError::DeadlineExceeded));
        return;
    };
    metrics::counter!("ulm_images_generated_total").increment(images.len() as u64);
    admitted.finish(|timings| GenerateOutput {
        images,
        plan: None,
        timings,
        model_version: version.to_string(),
    });
}

/// What the worker needs of a task's batch to admit requests into it.
trait JoinBatch {
    type Item: Clone;
    fn admit(&mut self, model: &Janus, items: Vec<(usize, Self::Item)>) -> Result<(), ModelError>;
    /// Rows (answers) or images in the batch.
    fn rows(&self) -> usize;
    fn prompt_tokens(item: &Self::Item) -> usize;
}

impl JoinBatch for AnswerBatch {
    type Item = AnswerItem;
    fn admit(&mut self, model: &Janus, items: Vec<(usize, AnswerItem)>) -> Result<(), ModelError> {
        AnswerBatch::admit(self, model, items)
    }
    fn rows(&self) -> usize {
        AnswerBatch::rows(self)
    }
    fn prompt_tokens(item: &AnswerItem) -> usize {
        item.prompt.prompt.ids.len()
    }
}

impl JoinBatch for ImageBatch {
    type Item = ImageItem;
    fn admit(&mut self, model: &Janus, items: Vec<(usize, ImageItem)>) -> Result<(), ModelError> {
        ImageBatch::admit(self, model, items)
    }
    fn rows(&self) -> usize {
        self.images()
    }
    fn prompt_tokens(item: &ImageItem) -> usize {
        item.prompt.cond_ids.len()
    }
}
