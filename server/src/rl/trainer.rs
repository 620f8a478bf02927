//! One GRPO step over a batch of CoRL items: roll out G samples per task
//! with the current policy, score them, compute group advantages (unified
//! `r_t2i + lambda * r_mm2t` where an item has both tasks), then
//! `num_iterations` passes of the clipped objective with gradient
//! accumulation, clipping and AdamW. A step whose loss or gradients are not
//! finite is abandoned and leaves the policy untouched.

use std::time::Instant;

use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};

use super::grpo::{
    generation_logps, group_advantages, objective, understanding_logps, AdamW, GenerationBatch,
    ObjectiveConfig, T2iAlignment, UnderstandingBatch,
};
use super::lora::Lora;
use super::reward::{
    score_task, HumanFeedback, RewardContext, RewardTask, Scored, TaskScores, TrainItem, Weighted,
};
use crate::model::bundle::ModelBundle;
use crate::model::generate::{
    answer_batch, generate_images_batch, AnswerItem, ImageItem, TextPrompt,
};
use crate::model::ops::{compute_dtype, Pass};
use crate::model::sampling::SamplingParams;
use crate::model::{Janus, ModelError};

/// Learning-rate shape over the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    Constant,
    /// Cosine decay to 0 at `total_steps`.
    Cosine,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainerConfig {
    /// Samples per prompt and task (G).
    pub group_size: usize,
    pub temperature: f32,
    /// Temperature of the training log-probs; the sampling temperature when absent.
    pub logprob_temperature: Option<f64>,
    pub top_p: Option<f32>,
    pub max_new_tokens: usize,
    pub cfg_weight: f32,
    /// KL weight (0 to 0.04 in CoRL).
    pub beta: f64,
    pub epsilon_low: f64,
    pub epsilon_high: f64,
    /// Passes over each rollout batch (mu).
    pub num_iterations: usize,
    pub lr: f64,
    pub weight_decay: f64,
    pub warmup_steps: u64,
    pub schedule: Schedule,
    pub total_steps: u64,
    /// Global gradient-norm clipping; none when absent.
    pub max_grad_norm: Option<f64>,
    /// Rows per forward/backward; gradients accumulate over micro-batches.
    pub micro_batch_rows: usize,
    pub alignment: T2iAlignment,
    /// lambda of the unified reward.
    pub unified_lambda: f64,
    pub seed: u64,
}

impl Default for TrainerConfig {
    fn default() -> Self {
        Self {
            group_size: 8,
            temperature: 1.0,
            logprob_temperature: None,
            top_p: None,
            max_new_tokens: 256,
            cfg_weight: 5.0,
            beta: 0.04,
            epsilon_low: 0.2,
            epsilon_high: 0.2,
            num_iterations: 1,
            lr: 4e-6,
            weight_decay: 0.0,
            warmup_steps: 0,
            schedule: Schedule::Constant,
            total_steps: 1000,
            max_grad_norm: Some(1.0),
            micro_batch_rows: 16,
            alignment: T2iAlignment::Predicting,
            unified_lambda: 0.8,
            seed: 0,
        }
    }
}

/// How the policy differs from the reference.
pub enum Adaptation {
    /// Adapters on the base model; the reference is the base (adapters off).
    Lora(Lora),
    /// The whole language model trains; the reference is a frozen copy.
    Full {
        params: Vec<(String, Var)>,
        reference: Box<Janus>,
    },
}

impl Adaptation {
    pub fn params(&self) -> &[(String, Var)] {
        match self {
            Adaptation::Lora(l) => &l.params,
            Adaptation::Full { params, .. } => params,
        }
    }
}

/// Everything measured in one step.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StepMetrics {
    pub step: u64,
    pub lr: f64,
    pub loss: f64,
    pub reward_understanding: Option<f64>,
    pub reward_generation: Option<f64>,
    /// Mean of each reward function.
    pub rewards: Vec<(String, f64)>,
    pub advantage_abs_mean: f64,
    /// Groups whose rewards were all equal: they carry no gradient.
    pub zero_variance_groups: usize,
    pub kl: f64,
    pub clip_fraction: f64,
    pub grad_norm: f64,
    /// False when the step was abandoned (non-finite loss or gradient).
    pub applied: bool,
    pub tokens: usize,
    pub tokens_per_s: f64,
    pub rollout_s: f64,
    pub reward_s: f64,
    pub train_s: f64,
    pub update_s: f64,
}

/// Samples of one task in consecutive groups, one group per item.
struct Rollouts {
    /// Item index of each group.
    items: Vec<usize>,
    /// Rows of each group (G for fresh rollouts; served groups vary).
    sizes: Vec<usize>,
    rows: Vec<Row>,
}

impl Rollouts {
    fn uniform(items: Vec<usize>, group_size: usize, rows: Vec<Row>) -> Self {
        Self {
            sizes: vec![group_size; items.len()],
            items,
            rows,
        }
    }

    /// The group of each row.
    fn row_groups(&self) -> Vec<usize> {
        self.sizes
            .iter()
            .enumerate()
            .flat_map(|(g, &n)| std::iter::repeat_n(g, n))
            .collect()
    }

    /// Row ranges of the groups.
    fn ranges(&self) -> Vec<std::ops::Range<usize>> {
        let mut start = 0;
        self.sizes
            .iter()
            .map(|&n| {
                start += n;
                start - n..start
            })
            .collect()
    }
}

struct Row {
    tokens: Vec<u32>,
    /// Behaviour log-probs recorded while sampling.
    logprobs: Vec<f32>,
    text: Option<String>,
    image: Option<image::RgbImage>,
    human_score: Option<f32>,
}

/// A group of samples the server served for one request, with a score per
/// sample (human feedback, or accuracy against a reference answer) and the
/// behaviour log-probs recorded when they were sampled.
#[derive(Debug, Clone)]
pub struct ServedGroup {
    /// The prompt: `qa` for answers (its solution unused), `caption` for images.
    pub item: TrainItem,
    pub task: RewardTask,
    pub samples: Vec<ServedSample>,
}

#[derive(Debug, Clone)]
pub struct ServedSample {
    /// Answer tokens (with the final EOS when there is one) or image codes.
    pub tokens: Vec<u32>,
    pub logprobs: Vec<f32>,
    pub score: f32,
}

pub struct Trainer {
    pub bundle: ModelBundle,
    pub adaptation: Adaptation,
    pub optimizer: AdamW,
    pub config: TrainerConfig,
    pub rewards: Vec<Weighted>,
    pub step: u64,
}

impl Trainer {
    pub fn new(
        bundle: ModelBundle,
        adaptation: Adaptation,
        config: TrainerConfig,
        rewards: Vec<Weighted>,
    ) -> Result<Self, ModelError> {
        let optimizer = AdamW::new(adaptation.params(), config.lr, config.weight_decay)?;
        Ok(Self {
            bundle,
            adaptation,
            optimizer,
            config,
            rewards,
            step: 0,
        })
    }

    fn lr_at(&self, step: u64) -> f64 {
        let c = &self.config;
        if step < c.warmup_steps {
            return c.lr * (step + 1) as f64 / c.warmup_steps as f64;
        }
        match c.schedule {
            Schedule::Constant => c.lr,
            Schedule::Cosine => {
                let span = c.total_steps.saturating_sub(c.warmup_steps).max(1) as f64;
                let progress = ((step - c.warmup_steps) as f64 / span).min(1.0);
                c.lr * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
            }
        }
    }

    fn sampling(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.config.temperature,
            top_k: None,
            top_p: self.config.top_p,
        }
    }

    fn seeds(&self, salt: usize) -> Vec<u64> {
        let base = self
            .config
            .seed
            .wrapping_mul(1_000_003)
            .wrapping_add(self.step * 10_007 + salt as u64 * 101);
        (0..self.config.group_size as u64)
            .map(|g| base.wrapping_add(g))
            .collect()
    }

    fn rollout_understanding(&self, items: &[TrainItem]) -> Result<Rollouts, ModelError> {
        let b = &self.bundle;
        let mut requests = Vec::new();
        let mut owners = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let Some(qa) = &item.qa else { continue };
            let pixels = b
                .image_processor
                .preprocess(&qa.image, b.model.device())?
                .unsqueeze(0)?;
            requests.push(AnswerItem {
                prompt: TextPrompt {
                    prompt: b.processor.understanding_prompt(&qa.question)?,
                    pixels: Some(pixels),
                    samples: self.config.group_size,
                },
                max_new_tokens: self.config.max_new_tokens,
                sampling: self.sampling(),
                seeds: self.seeds(i),
            });
            owners.push(i);
        }
        let s = b.processor.special;
        let out = if requests.is_empty() {
            Vec::new()
        } else {
            answer_batch(&b.model, &requests, s.eos, s.pad, &mut |_| true)?
        };
        let rows = out
            .into_iter()
            .flatten()
            .map(|sample| Row {
                text: Some(b.processor.decode(&sample.token_ids)),
                tokens: sample.token_ids,
                logprobs: sample.logprobs,
                image: None,
                human_score: None,
            })
            .collect();
        Ok(Rollouts::uniform(owners, self.config.group_size, rows))
    }

    fn rollout_generation(&self, items: &[TrainItem]) -> Result<Rollouts, ModelError> {
        let b = &self.bundle;
        let mut requests = Vec::new();
        let mut owners = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let Some(caption) = &item.caption else {
                continue;
            };
            requests.push(ImageItem {
                prompt: b.processor.generation_prompt(caption)?,
                cfg_weight: self.config.cfg_weight,
                sampling: self.sampling(),
                seeds: self.seeds(items.len() + i),
            });
            owners.push(i);
        }
        let out = if requests.is_empty() {
            Vec::new()
        } else {
            generate_images_batch(&b.model, &requests, b.processor.special.pad, &mut |_| true)?
        };
        let mut rows = Vec::new();
        for sample in out.into_iter().flatten() {
            let sample = sample.ok_or_else(|| {
                ModelError::InvalidInput("a rollout image was not produced".into())
            })?;
            rows.push(Row {
                tokens: sample.tokens,
                logprobs: sample.logprobs,
                text: None,
                image: Some(sample.image),
                human_score: None,
            });
        }
        Ok(Rollouts::uniform(owners, self.config.group_size, rows))
    }

    fn score(
        &self,
        rewards: &[Weighted],
        items: &[TrainItem],
        task: RewardTask,
        r: &Rollouts,
    ) -> Result<TaskScores, ModelError> {
        let groups = r.row_groups();
        let samples: Vec<Scored> = r
            .rows
            .iter()
            .zip(&groups)
            .map(|(row, &g)| Scored {
                item: &items[r.items[g]],
                text: row.text.as_deref(),
                image: row.image.as_ref(),
                tokens: &row.tokens,
                human_score: row.human_score,
            })
            .collect();
        let ctx = RewardContext::of(&self.bundle);
        score_task(rewards, task, &ctx, &samples)
    }

    /// One GRPO step on `items`: fresh rollouts scored by the trainer's rewards.
    pub fn step(&mut self, items: &[TrainItem]) -> Result<StepMetrics, ModelError> {
        let started = Instant::now();
        let und = self.rollout_understanding(items)?;
        let gen = self.rollout_generation(items)?;
        let rollout_s = started.elapsed().as_secs_f64();
        let rewards = std::mem::take(&mut self.rewards);
        let result = self.score_and_optimize(&rewards, items, und, gen, started, rollout_s);
        self.rewards = rewards;
        result
    }

    /// One GRPO step on groups the server served, scored by their stored
    /// scores (the [`HumanFeedback`] reward), with their behaviour log-probs
    /// as the old policy: the importance ratio and clipping make these
    /// off-policy samples usable.
    pub fn step_served(&mut self, groups: &[ServedGroup]) -> Result<StepMetrics, ModelError> {
        let started = Instant::now();
        let (items, und, gen) = served_rollouts(groups)?;
        let rewards = [RewardTask::Understanding, RewardTask::Generation].map(|task| Weighted {
            reward: Box::new(HumanFeedback(task)),
            weight: 1.0,
        });
        self.score_and_optimize(&rewards, &items, und, gen, started, 0.0)
    }

    /// Served groups in the shape of the training forward, prepared once
    /// (prompts tokenized, images through the frozen vision tower) to be
    /// scored under several policies.
    pub fn prepare_served(&self, groups: &[ServedGroup]) -> Result<PreparedServed, ModelError> {
        let (items, und, gen) = served_rollouts(groups)?;
        Ok(PreparedServed {
            prepared: self.prepare(&items, &und, &gen)?,
            order: groups
                .iter()
                .flat_map(|g| std::iter::repeat_n(g.task, g.samples.len()))
                .collect(),
        })
    }

    /// Per-token log-probs of prepared served samples under `model`
    /// (inference pass): one vector per sample, groups in order.
    pub fn served_logps(
        &self,
        model: &Janus,
        served: &PreparedServed,
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        let [und_logps, gen_logps] = self.inference_logps(model, &served.prepared)?;
        // Back to the callers' group order.
        let (mut und_rows, mut gen_rows) = (und_logps.into_iter(), gen_logps.into_iter());
        served
            .order
            .iter()
            .map(|task| {
                let next = match task {
                    RewardTask::Understanding => und_rows.next(),
                    RewardTask::Generation => gen_rows.next(),
                };
                next.ok_or_else(|| ModelError::InvalidInput("served log-probs out of step".into()))
            })
            .collect()
    }

    /// [`Self::served_logps`] under the reference policy (the base model).
    pub fn served_reference_logps(
        &self,
        served: &PreparedServed,
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        self.with_reference(|m| self.served_logps(m, served))
    }

    /// Valid-token log-probs of every prepared row: (understanding, generation).
    fn inference_logps(&self, model: &Janus, p: &Prepared) -> Result<[RowLogps; 2], ModelError> {
        let dev = model.device();
        let temperature = self.logprob_temperature();
        let micro = self.config.micro_batch_rows.max(1);
        let mut und = Vec::new();
        for start in (0..p.und_ids.len()).step_by(micro) {
            let n = micro.min(p.und_ids.len() - start);
            let tensors = p.und_tensors(start, n, dev)?;
            let batch = p.und_batch(&tensors, start, n);
            let logps: Vec<Vec<f32>> =
                understanding_logps(model, &batch, temperature, Pass::Inference)?
                    .to_dtype(DType::F32)?
                    .to_vec2()?;
            for (k, row) in logps.into_iter().enumerate() {
                let mask = &p.und_completion_mask[(start + k) * p.und_len..][..p.und_len];
                und.push(
                    row.into_iter()
                        .zip(mask)
                        .filter(|(_, &m)| m > 0.0)
                        .map(|(l, _)| l)
                        .collect(),
                );
            }
        }
        let mut gen = Vec::new();
        for start in (0..p.gen_prompt.len()).step_by(micro) {
            let n = micro.min(p.gen_prompt.len() - start);
            let tensors = p.gen_tensors(start, n, dev)?;
            let batch = p.gen_batch(&tensors, start, n);
            let logps = generation_logps(
                model,
                &batch,
                temperature,
                self.config.alignment,
                Pass::Inference,
            )?;
            gen.extend(logps.to_dtype(DType::F32)?.to_vec2::<f32>()?);
        }
        Ok([und, gen])
    }

    fn score_and_optimize(
        &mut self,
        rewards: &[Weighted],
        items: &[TrainItem],
        und: Rollouts,
        gen: Rollouts,
        started: Instant,
        rollout_s: f64,
    ) -> Result<StepMetrics, ModelError> {
        let reward_started = Instant::now();
        let TaskScores {
            total: r_und,
            mut means,
        } = self.score(rewards, items, RewardTask::Understanding, &und)?;
        let TaskScores {
            total: r_gen,
            means: gen_means,
        } = self.score(rewards, items, RewardTask::Generation, &gen)?;
        means.extend(gen_means);
        let reward_s = reward_started.elapsed().as_secs_f64();

        let (adv_und, adv_gen, zero_variance) = self.advantages(&und, &r_und, &gen, &r_gen);
        let mean = |v: &[f32]| {
            (!v.is_empty()).then(|| v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64)
        };
        let mut metrics = StepMetrics {
            step: self.step,
            lr: self.lr_at(self.step),
            reward_understanding: mean(&r_und),
            reward_generation: mean(&r_gen),
            rewards: means,
            advantage_abs_mean: mean(
                &adv_und
                    .iter()
                    .chain(&adv_gen)
                    .map(|a| a.abs())
                    .collect::<Vec<_>>(),
            )
            .unwrap_or(0.0),
            zero_variance_groups: zero_variance,
            tokens: und
                .rows
                .iter()
                .chain(&gen.rows)
                .map(|r| r.tokens.len())
                .sum(),
            rollout_s,
            reward_s,
            ..Default::default()
        };

        let train_started = Instant::now();
        let prepared = self.prepare(items, &und, &gen)?;
        let mut old = self.behaviour_logps(&und, &gen, prepared.und_len)?;
        let mut grads_total: Vec<Option<Tensor>> = Vec::new();
        let mut applied = true;
        for iteration in 0..self.config.num_iterations.max(1) {
            let pass = self.loss_and_grads(&prepared, &adv_und, &adv_gen, old.as_ref())?;
            metrics.loss = pass.loss;
            metrics.kl = pass.kl;
            metrics.clip_fraction = pass.clip_fraction;
            if !pass.loss.is_finite() || pass.grads.iter().flatten().any(|g| !all_finite(g)) {
                tracing::warn!(
                    step = self.step,
                    iteration,
                    "non-finite loss or gradient: step abandoned"
                );
                applied = false;
                break;
            }
            if old.is_none() {
                old = Some(pass.logps);
            }
            grads_total = pass.grads;
            let update_started = Instant::now();
            metrics.grad_norm = self.clip_and_apply(&mut grads_total)?;
            metrics.update_s += update_started.elapsed().as_secs_f64();
        }
        metrics.train_s = train_started.elapsed().as_secs_f64() - metrics.update_s;
        metrics.applied = applied && !grads_total.is_empty();
        metrics.tokens_per_s = metrics.tokens as f64 / started.elapsed().as_secs_f64();
        self.step += 1;
        Ok(metrics)
    }

    /// Per-row advantages of each task; unified where an item has both.
    fn advantages(
        &self,
        und: &Rollouts,
        r_und: &[f32],
        gen: &Rollouts,
        r_gen: &[f32],
    ) -> (Vec<f32>, Vec<f32>, usize) {
        let lambda = self.config.unified_lambda as f32;
        let per_group = |r: &Rollouts, rewards: &[f32]| -> Vec<f32> {
            r.ranges()
                .into_iter()
                .flat_map(|range| group_advantages(&rewards[range.clone()], range.len()))
                .collect()
        };
        let mut adv_und = per_group(und, r_und);
        let mut adv_gen = per_group(gen, r_gen);
        let (und_ranges, gen_ranges) = (und.ranges(), gen.ranges());
        for (gi, &item) in gen.items.iter().enumerate() {
            let Some(ui) = und.items.iter().position(|&i| i == item) else {
                continue;
            };
            let (gr, ur) = (gen_ranges[gi].clone(), und_ranges[ui].clone());
            if gr.len() != ur.len() {
                continue;
            }
            let unified: Vec<f32> = gr
                .clone()
                .zip(ur.clone())
                .map(|(a, b)| r_gen[a] + lambda * r_und[b])
                .collect();
            let a = group_advantages(&unified, unified.len());
            adv_gen[gr].copy_from_slice(&a);
            adv_und[ur].copy_from_slice(&a);
        }
        let zero = und_ranges
            .iter()
            .map(|r| &adv_und[r.clone()])
            .chain(gen_ranges.iter().map(|r| &adv_gen[r.clone()]))
            .filter(|c| c.iter().all(|&a| a == 0.0))
            .count();
        (adv_und, adv_gen, zero)
    }

    /// The sampler's log-probs as the "old" policy of the importance ratio,
    /// when they score the same quantity as the training forward (same
    /// temperature; image tokens scored at the predicting position).
    /// Otherwise the first pass's detached log-probs serve.
    fn behaviour_logps(
        &self,
        und: &Rollouts,
        gen: &Rollouts,
        l: usize,
    ) -> Result<Option<OldLogps>, ModelError> {
        let same_temperature =
            (self.logprob_temperature() - self.config.temperature as f64).abs() < 1e-9;
        if !same_temperature || self.config.alignment != T2iAlignment::Predicting {
            return Ok(None);
        }
        let dev = self.bundle.model.device();
        let dtype = compute_dtype(self.bundle.model.dtype());
        let padded = |rows: &[Row], width: usize| -> candle_core::Result<Option<Tensor>> {
            if rows.is_empty() {
                return Ok(None);
            }
            let data: Vec<f32> = rows
                .iter()
                .flat_map(|r| {
                    r.logprobs
                        .iter()
                        .copied()
                        .chain(std::iter::repeat(0.0))
                        .take(width)
                })
                .collect();
            Tensor::from_vec(data, (rows.len(), width), dev)?
                .to_dtype(dtype)
                .map(Some)
        };
        let m = gen.rows.first().map_or(0, |r| r.tokens.len());
        Ok(Some(OldLogps {
            understanding: padded(&und.rows, l)?,
            generation: padded(&gen.rows, m)?,
        }))
    }

    fn logprob_temperature(&self) -> f64 {
        self.config
            .logprob_temperature
            .unwrap_or(self.config.temperature.max(1e-3) as f64)
    }

    fn prepare(
        &self,
        items: &[TrainItem],
        und: &Rollouts,
        gen: &Rollouts,
    ) -> Result<Prepared, ModelError> {
        let b = &self.bundle;
        let s = b.processor.special;
        let mut prepared = Prepared::default();
        if !und.rows.is_empty() {
            let prompts: Vec<_> = und
                .items
                .iter()
                .map(|&i| {
                    b.processor
                        .understanding_prompt(&items[i].qa.as_ref().expect("qa item").question)
                })
                .collect::<Result<_, _>>()?;
            let t = prompts.iter().map(|p| p.ids.len()).max().unwrap_or(0);
            let l = und
                .rows
                .iter()
                .map(|r| r.tokens.len())
                .max()
                .unwrap_or(0)
                .max(1);
            let mut ids = Vec::new();
            let groups = und.row_groups();
            for (row, &group) in und.rows.iter().zip(&groups) {
                let p = &prompts[group];
                let pad = t - p.ids.len();
                let mut r_ids = vec![s.pad; pad];
                r_ids.extend(&p.ids);
                r_ids.extend(&row.tokens);
                r_ids.extend(std::iter::repeat_n(s.eos, l - row.tokens.len()));
                let mut mask = vec![false; pad];
                mask.extend(std::iter::repeat_n(true, p.ids.len()));
                let valid = row
                    .tokens
                    .iter()
                    .position(|&x| x == s.eos)
                    .map_or(row.tokens.len(), |e| e + 1);
                mask.extend((0..l).map(|i| i < valid));
                let mut seq = vec![false; pad];
                seq.extend(&p.images_seq_mask);
                seq.extend(std::iter::repeat_n(false, l));
                prepared
                    .und_completion_mask
                    .extend((0..l).map(|i| if i < valid { 1f32 } else { 0.0 }));
                ids.push(r_ids);
                prepared.und_attention.push(mask);
                prepared.und_images_seq.push(seq);
            }
            prepared.und_len = l;
            prepared.und_ids = ids;
            let pixels: Vec<Tensor> = und
                .items
                .iter()
                .map(|&i| {
                    b.image_processor.preprocess(
                        &items[i].qa.as_ref().expect("qa item").image,
                        b.model.device(),
                    )
                })
                .collect::<Result<_, _>>()?;
            let embeds = b
                .model
                .image_embeds(&Tensor::stack(&pixels, 0)?, Pass::Inference)?;
            let per_row: Vec<u32> = groups.iter().map(|&g| g as u32).collect();
            prepared.und_image_embeds =
                Some(embeds.index_select(&Tensor::new(per_row.as_slice(), b.model.device())?, 0)?);
        }
        if !gen.rows.is_empty() {
            let prompts: Vec<_> = gen
                .items
                .iter()
                .map(|&i| {
                    b.processor
                        .generation_prompt(items[i].caption.as_deref().unwrap_or_default())
                })
                .collect::<Result<_, _>>()?;
            let p = prompts.iter().map(|x| x.cond_ids.len()).max().unwrap_or(0);
            for (row, group) in gen.rows.iter().zip(gen.row_groups()) {
                let prompt = &prompts[group].cond_ids;
                let pad = p - prompt.len();
                let mut ids = vec![s.pad; pad];
                ids.extend(prompt);
                prepared.gen_prompt.push(ids);
                prepared
                    .gen_prompt_mask
                    .push((0..p).map(|i| i >= pad).collect());
                prepared.gen_completion.push(row.tokens.clone());
            }
        }
        Ok(prepared)
    }

    /// One pass of the objective over the prepared rollouts, with gradients.
    fn loss_and_grads(
        &self,
        p: &Prepared,
        adv_und: &[f32],
        adv_gen: &[f32],
        old: Option<&OldLogps>,
    ) -> Result<PassOutcome, ModelError> {
        let model = &self.bundle.model;
        let dev = model.device();
        let params = self.adaptation.params();
        let mut grads: Vec<Option<Tensor>> = vec![None; params.len()];
        let temperature = self.logprob_temperature();
        let cfg = ObjectiveConfig {
            beta: self.config.beta,
            epsilon_low: self.config.epsilon_low,
            epsilon_high: self.config.epsilon_high,
        };
        let micro = self.config.micro_batch_rows.max(1);
        let (mut loss_total, mut kl_total, mut clip_total) = (0.0, 0.0, 0.0);
        let mut old_und = Vec::new();
        let mut old_gen = Vec::new();
        let und_rows = p.und_ids.len();
        let gen_rows = p.gen_prompt.len();
        // Each task's loss is a mean over its rows; micro-batches weigh by their share.
        for start in (0..und_rows).step_by(micro) {
            let n = micro.min(und_rows - start);
            let tensors = p.und_tensors(start, n, dev)?;
            let batch = p.und_batch(&tensors, start, n);
            let logps = understanding_logps(model, &batch, temperature, Pass::Training)?;
            let reference = if self.config.beta != 0.0 {
                Some(self.with_reference(|m| {
                    understanding_logps(m, &batch, temperature, Pass::Inference)
                })?)
            } else {
                None
            };
            let old_logps = match old.and_then(|o| o.understanding.as_ref()) {
                Some(o) => o.narrow(0, start, n)?,
                None => logps.detach(),
            };
            old_und.push(old_logps.clone());
            let mask = Tensor::from_vec(
                p.und_completion_mask[start * p.und_len..(start + n) * p.und_len].to_vec(),
                (n, p.und_len),
                dev,
            )?;
            let adv = Tensor::new(&adv_und[start..start + n], dev)?;
            let o = objective(&logps, &old_logps, reference.as_ref(), &adv, &mask, cfg)?;
            let share = n as f64 / und_rows as f64;
            self.accumulate(&(o.loss.clone() * share)?, &mut grads)?;
            loss_total += scalar(&o.loss)? * share;
            kl_total += o.kl * share;
            clip_total += o.clip_fraction * share;
        }
        for start in (0..gen_rows).step_by(micro) {
            let n = micro.min(gen_rows - start);
            let tensors = p.gen_tensors(start, n, dev)?;
            let batch = p.gen_batch(&tensors, start, n);
            let align = self.config.alignment;
            let logps = generation_logps(model, &batch, temperature, align, Pass::Training)?;
            let reference = if self.config.beta != 0.0 {
                Some(self.with_reference(|m| {
                    generation_logps(m, &batch, temperature, align, Pass::Inference)
                })?)
            } else {
                None
            };
            let old_logps = match old.and_then(|o| o.generation.as_ref()) {
                Some(o) => o.narrow(0, start, n)?,
                None => logps.detach(),
            };
            old_gen.push(old_logps.clone());
            let mask = Tensor::ones(logps.shape(), logps.dtype(), dev)?;
            let adv = Tensor::new(&adv_gen[start..start + n], dev)?;
            let o = objective(&logps, &old_logps, reference.as_ref(), &adv, &mask, cfg)?;
            let share = n as f64 / gen_rows as f64;
            self.accumulate(&(o.loss.clone() * share)?, &mut grads)?;
            loss_total += scalar(&o.loss)? * share;
            kl_total += o.kl * share;
            clip_total += o.clip_fraction * share;
        }
        let tasks = (und_rows > 0) as usize + (gen_rows > 0) as usize;
        let cat = |v: Vec<Tensor>| {
            if v.is_empty() {
                Ok(None)
            } else {
                Tensor::cat(&v, 0).map(Some)
            }
        };
        Ok(PassOutcome {
            loss: loss_total,
            kl: kl_total / tasks.max(1) as f64,
            clip_fraction: clip_total / tasks.max(1) as f64,
            grads,
            logps: OldLogps {
                understanding: cat(old_und)?,
                generation: cat(old_gen)?,
            },
        })
    }

    /// Runs `f` on the reference policy.
    fn with_reference<T, E>(&self, f: impl FnOnce(&Janus) -> Result<T, E>) -> Result<T, E> {
        match &self.adaptation {
            Adaptation::Lora(lora) => {
                lora.set_enabled(false);
                let out = f(&self.bundle.model);
                lora.set_enabled(true);
                out
            }
            Adaptation::Full { reference, .. } => f(reference),
        }
    }

    fn accumulate(&self, loss: &Tensor, grads: &mut [Option<Tensor>]) -> Result<(), ModelError> {
        let store = loss.backward()?;
        for ((_, var), acc) in self.adaptation.params().iter().zip(grads.iter_mut()) {
            if let Some(g) = store.get(var) {
                *acc = Some(match acc.take() {
                    Some(a) => (a + g)?,
                    None => g.clone(),
                });
            }
        }
        Ok(())
    }

    /// Clips the global gradient norm, applies AdamW, returns the pre-clip norm.
    fn clip_and_apply(&mut self, grads: &mut [Option<Tensor>]) -> Result<f64, ModelError> {
        let mut sq = 0.0;
        for g in grads.iter().flatten() {
            sq += scalar(&g.to_dtype(DType::F64)?.sqr()?.sum_all()?)?;
        }
        let norm = sq.sqrt();
        if let Some(max) = self.config.max_grad_norm {
            if norm > max {
                let factor = max / (norm + 1e-6);
                for g in grads.iter_mut().flatten() {
                    *g = (&*g * factor)?;
                }
            }
        }
        self.optimizer.lr = self.lr_at(self.step);
        self.optimizer.apply(self.adaptation.params(), grads)?;
        Ok(norm)
    }
}

/// Served groups as rollouts: one item per group, understanding and
/// generation apart. Generation groups must agree on their image length.
fn served_rollouts(
    groups: &[ServedGroup],
) -> Result<(Vec<TrainItem>, Rollouts, Rollouts), ModelError> {
    let mut items = Vec::with_capacity(groups.len());
    let empty = || Rollouts::uniform(Vec::new(), 0, Vec::new());
    let (mut und, mut gen) = (empty(), empty());
    for (i, group) in groups.iter().enumerate() {
        let wanted = match group.task {
            RewardTask::Understanding => group.item.qa.is_some(),
            RewardTask::Generation => group.item.caption.is_some(),
        };
        if !wanted || group.samples.len() < 2 {
            return Err(ModelError::InvalidInput(format!(
                "served group {i} needs its prompt and at least 2 samples"
            )));
        }
        let target = match group.task {
            RewardTask::Understanding => &mut und,
            RewardTask::Generation => &mut gen,
        };
        target.items.push(i);
        target.sizes.push(group.samples.len());
        for sample in &group.samples {
            if sample.tokens.len() != sample.logprobs.len() || sample.tokens.is_empty() {
                return Err(ModelError::InvalidInput(format!(
                    "served group {i}: every sample needs one log-prob per token"
                )));
            }
            target.rows.push(Row {
                tokens: sample.tokens.clone(),
                logprobs: sample.logprobs.clone(),
                text: None,
                image: None,
                human_score: Some(sample.score),
            });
        }
        items.push(group.item.clone());
    }
    if gen
        .rows
        .windows(2)
        .any(|w| w[0].tokens.len() != w[1].tokens.len())
    {
        return Err(ModelError::InvalidInput(
            "served images differ in their number of image tokens".into(),
        ));
    }
    Ok((items, und, gen))
}

fn scalar(t: &Tensor) -> candle_core::Result<f64> {
    t.to_dtype(DType::F64)?.to_scalar::<f64>()
}

fn all_finite(t: &Tensor) -> bool {
    t.to_dtype(DType::F64)
        .and_then(|t| t.sum_all())
        .and_then(|s| s.to_scalar::<f64>())
        .is_ok_and(f64::is_finite)
}

/// Served samples ready for [`Trainer::served_logps`].
pub struct PreparedServed {
    prepared: Prepared,
    /// The task of each sample, in the callers' order.
    order: Vec<RewardTask>,
}

/// Per-token log-probs of each row.
type RowLogps = Vec<Vec<f32>>;

/// Detached log-probs of the first pass: the "old" policy of later passes.
struct OldLogps {
    understanding: Option<Tensor>,
    generation: Option<Tensor>,
}

/// What one pass of the objective produced.
struct PassOutcome {
    loss: f64,
    kl: f64,
    clip_fraction: f64,
    /// Accumulated over micro-batches, one per parameter.
    grads: Vec<Option<Tensor>>,
    logps: OldLogps,
}

/// Rollouts in the shape of the training forward.
#[derive(Default)]
struct Prepared {
    und_ids: Vec<Vec<u32>>,
    und_attention: Vec<Vec<bool>>,
    und_images_seq: Vec<Vec<bool>>,
    und_completion_mask: Vec<f32>,
    und_len: usize,
    und_image_embeds: Option<Tensor>,
    gen_prompt: Vec<Vec<u32>>,
    gen_prompt_mask: Vec<Vec<bool>>,
    gen_completion: Vec<Vec<u32>>,
}

impl Prepared {
    /// Token ids and image embeddings of understanding rows `start..start + n`.
    fn und_tensors(
        &self,
        start: usize,
        n: usize,
        dev: &candle_core::Device,
    ) -> candle_core::Result<(Tensor, Option<Tensor>)> {
        let ids = Tensor::new(self.und_ids[start..start + n].to_vec(), dev)?;
        let embeds = self
            .und_image_embeds
            .as_ref()
            .map(|e| e.narrow(0, start, n))
            .transpose()?;
        Ok((ids, embeds))
    }

    fn und_batch<'a>(
        &'a self,
        (ids, embeds): &'a (Tensor, Option<Tensor>),
        start: usize,
        n: usize,
    ) -> UnderstandingBatch<'a> {
        UnderstandingBatch {
            ids,
            attention_mask: &self.und_attention[start..start + n],
            images_seq_mask: &self.und_images_seq[start..start + n],
            image_embeds: embeds.as_ref(),
            completion_len: self.und_len,
        }
    }

    /// Prompt and image-token ids of generation rows `start..start + n`.
    fn gen_tensors(
        &self,
        start: usize,
        n: usize,
        dev: &candle_core::Device,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        Ok((
            Tensor::new(self.gen_prompt[start..start + n].to_vec(), dev)?,
            Tensor::new(self.gen_completion[start..start + n].to_vec(), dev)?,
        ))
    }

    fn gen_batch<'a>(
        &'a self,
        (prompt, completion): &'a (Tensor, Tensor),
        start: usize,
        n: usize,
    ) -> GenerationBatch<'a> {
        GenerationBatch {
            prompt_ids: prompt,
            prompt_mask: &self.gen_prompt_mask[start..start + n],
            completion,
        }
    }
}
