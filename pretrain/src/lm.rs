//! Stage two: the multimodal model by next-token prediction on the world's
//! examples in the real chat template: the answer to a question about an
//! image (vision tower, aligner, LLaMA, LM head), and the image tokens of a
//! caption's image (the frozen VQ's codes; gen embedding, gen aligner,
//! LLaMA, gen head). A share of captions is replaced by the unconditional
//! prompt, as Janus trains for classifier-free guidance.

use candle_core::{DType, Result, Tensor, Var};
use image::RgbImage;
use ulm_model::image_processor::ImageProcessorConfig;
use ulm_model::ops::Pass;
use ulm_model::plan::{plan_request, DESCRIBE_QUESTION};
use ulm_model::processor::Processor;
use ulm_model::Janus;
use ulm_rl::grpo::{generation_states, AdamW, GenerationBatch, T2iAlignment};
use ulm_rl::reading::answer_logps;
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
    /// Weight of the planning turn's loss: a text-only turn that answers
    /// [`ulm_model::plan::PLAN_INSTRUCTION`] and a caption with a full caption of a scene
    /// the caption is true of (every object's size, colour, shape and
    /// cell), which generation then draws from; 0 leaves it out. Its own
    /// mean, like the describing turn's.
    pub plan_weight: f64,
    pub world_seed: u64,
}

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
            plan_weight: 0.0,
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
    /// Mean negative log-likelihood per token of the planning turn's answers.
    pub plan: Option<f64>,
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
/// in its own row: about the example's image, the rows of an example
/// sharing one pass of the vision tower, or as text-only turns without
/// `with_image`.
fn understanding_loss(
    parts: &LmParts,
    examples: &[Example],
    turns: &[Vec<(String, String)>],
    with_image: bool,
) -> Result<Tensor> {
    let side = parts.image_processor.image_size as u32;
    let images: Option<Vec<RgbImage>> =
        with_image.then(|| examples.iter().map(|e| e.image(side)).collect());
    let answers = answer_logps(
        parts.model,
        parts.processor,
        parts.image_processor,
        images.as_deref(),
        turns,
        Pass::Training,
    )?;
    mean_nll(&answers.logps, &answers.mask)
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
    /// Answer tokens of the planning turn; `None` when it is left out.
    pub plan: Option<Tensor>,
}

/// Which turns beside the questions and captions a step trains.
#[derive(Debug, Clone, Copy, Default)]
pub struct ExtraTurns {
    pub describe: bool,
    pub plan: bool,
}

/// The losses of `examples`: `questions` questions of each from the
/// `pick`-th and its `pick`-th caption (cycling), row `i`'s caption
/// replaced by the unconditional prompt where `unconditional[i]`, and the
/// turns `extra` asks for. The planning turn plans the caption the
/// generation row does not draw from: its category caption when the row
/// draws the full one, and the reverse (a full caption plans as itself).
pub fn losses(
    parts: &LmParts,
    examples: &[Example],
    pick: usize,
    questions: usize,
    unconditional: &[bool],
    extra: ExtraTurns,
) -> Result<Losses> {
    let asked: Vec<Vec<(String, String)>> = examples
        .iter()
        .enumerate()
        .map(|(i, example)| {
            let all = &example.questions;
            (0..questions.min(all.len()))
                .map(|k| {
                    let question = &all[(pick + i + k) % all.len()];
                    (question.text.clone(), question.answer.clone())
                })
                .collect()
        })
        .collect();
    let full = |e: &Example| full_claim(&e.scene).phrase();
    let describe = if extra.describe {
        let turns: Vec<Vec<(String, String)>> = examples
            .iter()
            .map(|e| vec![(DESCRIBE_QUESTION.to_string(), full(e))])
            .collect();
        Some(understanding_loss(parts, examples, &turns, true)?)
    } else {
        None
    };
    let plan = if extra.plan {
        let turns: Vec<Vec<(String, String)>> = examples
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let caption = &e.captions[(pick + i + 1) % e.captions.len()].text;
                vec![(plan_request(caption), full(e))]
            })
            .collect();
        Some(understanding_loss(parts, examples, &turns, false)?)
    } else {
        None
    };
    Ok(Losses {
        understanding: understanding_loss(parts, examples, &asked, true)?,
        generation: generation_loss(parts, examples, pick, unconditional)?,
        describe,
        plan,
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
            ExtraTurns {
                describe: cfg.describe_weight > 0.0,
                plan: cfg.plan_weight > 0.0,
            },
        )?;
        let (und, gen) = (&step_losses.understanding, &step_losses.generation);
        let mut total = (und + gen)?;
        if let Some(describe) = &step_losses.describe {
            total = (total + (describe * cfg.describe_weight)?)?;
        }
        if let Some(plan) = &step_losses.plan {
            total = (total + (plan * cfg.plan_weight)?)?;
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
            plan: step_losses.plan.as_ref().map(scalar).transpose()?,
            grad_norm,
        });
    }
    Ok(())
}
