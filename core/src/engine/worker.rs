//! The model worker: one thread owns the model, takes batches off the
//! queue, and runs each on the version that was active when it started.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::sync::mpsc;
use ulm_model::decode::TextPrompt;
use ulm_model::generate::{answer_batch, generate_images_batch, AnswerItem, DecodeEnd, ImageItem};
use ulm_model::image_processor::ImageProcessorConfig;
use ulm_model::processor::Processor;
use ulm_model::Janus;

use super::work::{
    AnswerOutput, AnswerWork, GenerateOutput, ImageOutput, ImageWork, StreamedToken, TextOutput,
};
use super::{fail_all, EngineConfig, EngineError, Pending, Queued, ServingModel};
use crate::record::FinishReason;

pub(super) struct Worker {
    pub(super) processor: Processor,
    pub(super) image_processor: ImageProcessorConfig,
    pub(super) policy: Arc<ArcSwap<ServingModel>>,
    pub(super) rx: mpsc::Receiver<Queued>,
    pub(super) queued: Arc<AtomicUsize>,
    pub(super) config: EngineConfig,
}

impl Worker {
    pub(super) fn run(mut self) {
        while let Some(first) = self.rx.blocking_recv() {
            let batch = self.collect_batch(first);
            self.queued.fetch_sub(batch.len(), Ordering::SeqCst);
            metrics::gauge!("ulm_queue_depth").set(self.queued.load(Ordering::SeqCst) as f64);
            let (mut answers, mut generations) = (Vec::new(), Vec::new());
            for job in batch {
                match job {
                    Queued::Answer(p) if p.wanted() => answers.push(p),
                    Queued::Generate(p) if p.wanted() => generations.push(p),
                    Queued::Answer(p) => p.finish(Err(EngineError::DeadlineExceeded)),
                    Queued::Generate(p) => p.finish(Err(EngineError::DeadlineExceeded)),
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
    fn collect_batch(&mut self, first: Queued) -> Vec<Queued> {
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

    fn run_answers(&self, policy: &ServingModel, jobs: Vec<Pending<AnswerWork, AnswerOutput>>) {
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
        let mut streamed = vec![false; valid.len()];
        let result = answer_batch(model, &items, special.eos, special.pad, &mut |event| {
            let job = &valid[event.item];
            streamed[event.item] = true;
            if let Some(stream) = &job.stream {
                let _ = stream.send(StreamedToken {
                    sample: event.sample,
                    token: event.token,
                    logprob: event.logprob,
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
                        job.finish(Err(EngineError::DeadlineExceeded));
                        continue;
                    };
                    let output = AnswerOutput {
                        samples,
                        prompt_tokens: item.prompt.prompt.ids.len(),
                        timings: job.timings(started, compute_ms, rows),
                        model_version: policy.version.clone(),
                    };
                    job.finish(Ok(output));
                }
            }
            Err(error) if valid.len() > 1 => {
                tracing::warn!(%error, requests = valid.len(), "answer batch failed; running its requests one at a time");
                for (job, streamed) in valid.into_iter().zip(streamed) {
                    // A request whose tokens were streamed cannot start over.
                    if streamed && job.stream.is_some() {
                        fail_all(vec![job], "answer", &error);
                    } else {
                        self.run_answers(policy, vec![job]);
                    }
                }
            }
            Err(error) => fail_all(valid, "answer", &error),
        }
    }

    fn answer_item(&self, model: &Janus, r: &AnswerWork) -> Result<AnswerItem, EngineError> {
        let prompt = TextPrompt::question(
            model,
            &self.processor,
            &self.image_processor,
            &r.image,
            &r.question,
            r.seeds.len(),
        )?;
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

    fn run_generations(
        &self,
        policy: &ServingModel,
        jobs: Vec<Pending<ImageWork, GenerateOutput>>,
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
                        cfg_weight: job.request.params.cfg_weight,
                        sampling: job.request.sampling(),
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
            Err(error) if valid.len() > 1 => {
                tracing::warn!(%error, requests = valid.len(), "generation batch failed; running its requests one at a time");
                for job in valid {
                    self.run_generations(policy, vec![job]);
                }
            }
            Err(error) => fail_all(valid, "generation", &error),
        }
    }
}
