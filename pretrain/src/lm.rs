//! Stage two: the multimodal model by next-token prediction on the world's
//! examples in the real chat template: the answer to a question about an
//! image (vision tower, aligner, LLaMA, LM head), and the image tokens of a
//! caption's image (the frozen VQ's codes; gen embedding, gen aligner,
//! LLaMA, gen head). A share of captions is replaced by the unconditional
//! prompt, as Janus trains for classifier-free guidance.

use candle_core::{DType, Result, Tensor, Var};
use ulm_model::image_processor::ImageProcessorConfig;
use ulm_model::ops::Pass;
use ulm_model::processor::Processor;
use ulm_model::Janus;
use ulm_rl::grpo::{
    generation_states, understanding_states, AdamW, GenerationBatch, T2iAlignment,
    UnderstandingBatch,
};
use ulm_world::caption::full_claim;
use ulm_world::Example;

use crate::data::{pixels, train_examples};
use crate::{descend, learning_rate, PretrainError};

/// How stage two trains.
#[derive(Debug, Clone)]
pub struct LmTraining {
    pub steps: usize,
    /// Examples per step; each gives `questions` questions and one caption.
    pub batch: usize,
    /// Questions per example and step, each its own row: an answer is a
    /// token or two, against 36 image tokens for a caption, so one
    /// question per image leaves understanding with little to learn from.
    pub questions: usize,
    pub lr: f64,
    /// Steps of linear warm-up of the learning rate.
    pub warmup: usize,
    pub weight_decay: f64,
    pub max_grad_norm: f64,
    /// Share of generation rows trained on the unconditional prompt.
    pub unconditional: f64,
    /// Weight of the describing turn's loss: every example also answers
    /// [`DESCRIBE_QUESTION`] with every object's size, colour, shape and
    /// cell, a grounded answer where a question names one attribute of one
    /// object; 0 leaves it out. Its own mean, so that its long answers do
    /// not drown the one-token answers of the questions.
    pub describe_weight: f64,
    pub world_seed: u64,
}

/// The describing turn's question.
pub const DESCRIBE_QUESTION: &str = "Describe the image.";

impl Default for LmTraining {
    fn default() -> Self {
        Self {
            steps: 1500,
            batch: 16,
            questions: 3,
            lr: 2e-3,
            warmup: 50,
            weight_decay: 0.01,
            max_grad_norm: 1.0,
            unconditional: 0.1,
            describe_weight: 0.0,
            world_seed: 0,
        }
    }
}

/// What one step of stage two did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LmStep {
    pub step: usize,
    pub lr: f64,
    pub loss: f64,
    /// Mean negative log-likelihood per answer token.
    pub understanding: f64,
    /// Mean negative log-likelihood per image token.
    pub generation: f64,
    /// Mean negative log-likelihood per token of the describing turn's answers.
    pub describe: Option<f64>,
    pub grad_norm: f64,
}

/// The model's side of a step: the model and how it reads text and images.
pub struct LmParts<'a> {
    pub model: &'a Janus,
    pub processor: &'a Processor,
    pub image_processor: &'a ImageProcessorConfig,
}

/// Mean of `-logps` over the positions where `mask` is 1.
fn mean_nll(logps: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let total = (logps * mask)?.sum_all()?.neg()?;
    total
        / mask
            .sum_all()?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?
            .max(1.0)
}

/// The answer-token loss of `turns` (question, answer) per example, each
/// in its own row; the rows of an example share one pass of the vision
/// tower.
fn understanding_loss(
    parts: &LmParts,
    examples: &[Example],
    turns: &[Vec<(&str, &str)>],
) -> Result<Tensor> {
    let (model, processor) = (parts.model, parts.processor);
    let device = model.device();
    let special = processor.special;
    let mut prompts = Vec::new();
    let mut answers = Vec::new();
    let mut images = Vec::new();
    let mut row_image = Vec::new();
    for (i, (example, turns)) in examples.iter().zip(turns).enumerate() {
        for (question, answer) in turns {
            prompts.push(
                processor
                    .understanding_prompt(question)
                    .map_err(model_error)?,
            );
            let mut answer = processor.encode_plain(answer).map_err(model_error)?;
            answer.push(special.eos);
            answers.push(answer);
            row_image.push(i as u32);
        }
        let side = parts.image_processor.image_size as u32;
        images.push(
            parts
                .image_processor
                .preprocess(&example.image(side), device)
                .map_err(model_error)?,
        );
    }
    let t = prompts.iter().map(|p| p.ids.len()).max().unwrap_or(0);
    let l = answers.iter().map(Vec::len).max().unwrap_or(1);
    let (mut ids, mut attention, mut image_mask, mut loss_mask) = (vec![], vec![], vec![], vec![]);
    for (prompt, answer) in prompts.iter().zip(&answers) {
        let pad = t - prompt.ids.len();
        let tail = l - answer.len();
        let mut row = vec![special.pad; pad];
        row.extend(&prompt.ids);
        row.extend(answer);
        row.extend(std::iter::repeat_n(special.pad, tail));
        ids.push(row);
        let mut seen = vec![false; pad];
        seen.extend(std::iter::repeat_n(true, prompt.ids.len() + answer.len()));
        seen.extend(std::iter::repeat_n(false, tail));
        attention.push(seen);
        let mut image = vec![false; pad];
        image.extend(&prompt.images_seq_mask);
        image.extend(std::iter::repeat_n(false, l));
        image_mask.push(image);
        loss_mask.extend(std::iter::repeat_n(1f32, answer.len()));
        loss_mask.extend(std::iter::repeat_n(0f32, tail));
    }
    let ids = Tensor::new(ids, device)?;
    let embeds = model
        .image_embeds(&Tensor::stack(&images, 0)?, Pass::Training)?
        .index_select(&Tensor::new(row_image.as_slice(), device)?, 0)?;
    let batch = UnderstandingBatch {
        ids: &ids,
        attention_mask: &attention,
        images_seq_mask: &image_mask,
        image_embeds: Some(&embeds),
        completion_len: l,
    };
    let logps = understanding_states(model, &batch, 1.0, Pass::Training)?.logps(model)?;
    let mask = Tensor::from_vec(loss_mask, (answers.len(), l), device)?;
    mean_nll(&logps.to_dtype(DType::F32)?, &mask)
}

/// The image-token loss of one caption per example, `unconditional[i]`
/// replacing row i's caption by the unconditional prompt.
fn generation_loss(
    parts: &LmParts,
    examples: &[Example],
    pick: usize,
    unconditional: &[bool],
) -> Result<Tensor> {
    let (model, processor) = (parts.model, parts.processor);
    let device = model.device();
    let side = model.gen_vision.image_size() as u32;
    let images: Vec<_> = examples.iter().map(|e| e.image(side)).collect();
    let codes = model.gen_vision.encode(&pixels(&images, device)?)?.indices;
    let mut prompts = Vec::new();
    for (i, example) in examples.iter().enumerate() {
        let caption = &example.captions[(pick + i) % example.captions.len()].text;
        let prompt = processor.generation_prompt(caption).map_err(model_error)?;
        prompts.push(if unconditional[i] {
            prompt.uncond_ids
        } else {
            prompt.cond_ids
        });
    }
    let p = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let pad = processor.special.pad;
    let rows: Vec<Vec<u32>> = prompts
        .iter()
        .map(|ids| {
            let mut row = vec![pad; p - ids.len()];
            row.extend(ids);
            row
        })
        .collect();
    let mask: Vec<Vec<bool>> = prompts
        .iter()
        .map(|ids| (0..p).map(|j| j >= p - ids.len()).collect())
        .collect();
    let prompt_ids = Tensor::new(rows, device)?;
    let batch = GenerationBatch {
        prompt_ids: &prompt_ids,
        prompt_mask: &mask,
        completion: &codes,
    };
    let states = generation_states(model, &batch, 1.0, T2iAlignment::Predicting, Pass::Training)?;
    let logps = states.logps(model)?.to_dtype(DType::F32)?;
    logps.mean_all()?.neg()
}

/// The losses of one step on `examples`.
pub struct Losses {
    /// Answer tokens of the questions.
    pub understanding: Tensor,
    /// Image tokens of the captions.
    pub generation: Tensor,
    /// Answer tokens of the describing turn; `None` when it is left out.
    pub describe: Option<Tensor>,
}

/// The losses of `examples`: `questions` questions of each from the
/// `pick`-th and its `pick`-th caption (cycling), row `i`'s caption
/// replaced by the unconditional prompt where `unconditional[i]`, and the
/// describing turn when `describe`.
pub fn losses(
    parts: &LmParts,
    examples: &[Example],
    pick: usize,
    questions: usize,
    unconditional: &[bool],
    describe: bool,
) -> Result<Losses> {
    let asked: Vec<Vec<(&str, &str)>> = examples
        .iter()
        .enumerate()
        .map(|(i, example)| {
            let all = &example.questions;
            (0..questions.min(all.len()))
                .map(|k| {
                    let question = &all[(pick + i + k) % all.len()];
                    (question.text.as_str(), question.answer.as_str())
                })
                .collect()
        })
        .collect();
    let describe = if describe {
        let descriptions: Vec<String> = examples
            .iter()
            .map(|e| full_claim(&e.scene).phrase())
            .collect();
        let turns: Vec<Vec<(&str, &str)>> = descriptions
            .iter()
            .map(|d| vec![(DESCRIBE_QUESTION, d.as_str())])
            .collect();
        Some(understanding_loss(parts, examples, &turns)?)
    } else {
        None
    };
    Ok(Losses {
        understanding: understanding_loss(parts, examples, &asked)?,
        generation: generation_loss(parts, examples, pick, unconditional)?,
        describe,
    })
}

fn model_error(e: ulm_model::ModelError) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

/// Trains `params` (everything but the VQ) by next-token prediction on
/// the world's training examples, reporting each step to `report`.
pub fn train_lm(
    parts: &LmParts,
    params: &[(String, Var)],
    cfg: &LmTraining,
    mut report: impl FnMut(&LmStep),
) -> std::result::Result<(), PretrainError> {
    let mut optimizer = AdamW::new(params, cfg.lr, cfg.weight_decay)?;
    for step in 0..cfg.steps {
        let examples = train_examples(
            cfg.world_seed ^ 0x4c4d,
            (step * cfg.batch) as u64,
            cfg.batch,
        );
        // A fixed spread of unconditional rows: every row `i` of step `s`
        // with (s * batch + i) * golden ratio mod 1 below the share.
        let unconditional: Vec<bool> = (0..cfg.batch)
            .map(|i| {
                (((step * cfg.batch + i) as f64) * 0.618_033_988_7).fract() < cfg.unconditional
            })
            .collect();
        let step_losses = losses(
            parts,
            &examples,
            step,
            cfg.questions,
            &unconditional,
            cfg.describe_weight > 0.0,
        )?;
        let (und, gen) = (&step_losses.understanding, &step_losses.generation);
        let mut total = (und + gen)?;
        if let Some(describe) = &step_losses.describe {
            total = (total + (describe * cfg.describe_weight)?)?;
        }
        optimizer.lr = learning_rate(cfg.lr, step, cfg.steps, cfg.warmup);
        let (loss, grad_norm) = descend(&total, params, &mut optimizer, cfg.max_grad_norm, step)?;
        let scalar = |t: &Tensor| t.to_dtype(DType::F64)?.to_scalar::<f64>();
        report(&LmStep {
            step,
            lr: optimizer.lr,
            loss,
            understanding: scalar(und)?,
            generation: scalar(gen)?,
            describe: step_losses.describe.as_ref().map(scalar).transpose()?,
            grad_norm,
        });
    }
    Ok(())
}
