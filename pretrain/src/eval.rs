//! Evaluation on the world's fixed test split, in the shape of the CoRL
//! paper's: GenEval-style accuracy per prompt category for generation (the
//! verifier on each generated image, several seeds per prompt) and answer
//! accuracy per question type for understanding.

use std::collections::BTreeMap;
use std::ops::Range;

use image::RgbImage;
use serde::{Deserialize, Serialize};
use ulm_model::bundle::ModelBundle;
use ulm_model::decode::TextPrompt;
use ulm_model::generate::{
    answer_batch, generate_images_batch, AnswerItem, ImageItem, ImageSample,
};
use ulm_model::ops::Pass;
use ulm_model::plan::{plan_batch, DESCRIBE_QUESTION};
use ulm_model::sampling::SamplingParams;
use ulm_rl::reward::verifiable::{qa_accuracy, QaType};
use ulm_world::caption::parse;
use ulm_world::scene::Category;
use ulm_world::{examples, test_prompts, verify, Split};

use crate::PretrainError;
use ulm_rl::reading::answer_logps;

#[derive(Debug, Clone)]
pub struct EvalConfig {
    /// Test prompts per generation category.
    pub prompts_per_category: usize,
    /// Images per prompt, each from its own seed.
    pub seeds: usize,
    /// Seed of each prompt's first image (then `first_seed + 1`, ...):
    /// repeated evaluations draw new images from another.
    pub first_seed: u64,
    /// Test scenes whose questions are asked (every question of each).
    pub question_scenes: usize,
    /// Classifier-free guidance weight (Janus: 5).
    pub cfg_weight: f32,
    /// Sampling temperature of image tokens (Janus: 1).
    pub temperature: f32,
    pub max_new_tokens: usize,
    /// The world whose test split is used.
    pub world_seed: u64,
    /// Temperature of the planning turn: when set, each image is drawn from
    /// its own plan of the prompt, sampled at it (a model trained with the
    /// turn); `None` draws from the prompt itself.
    pub plan_temperature: Option<f32>,
    /// Candidates drawn from each plan, of which the model's own reading
    /// keeps one ([`draw_planned`]); 1 keeps the only one.
    pub best_of: usize,
}

impl Default for EvalConfig {
    fn default() -> Self {
        Self {
            prompts_per_category: 20,
            seeds: 4,
            first_seed: 0,
            question_scenes: 100,
            cfg_weight: 5.0,
            temperature: 1.0,
            max_new_tokens: 16,
            world_seed: 0,
            plan_temperature: None,
            best_of: 1,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Accuracy {
    pub correct: usize,
    pub total: usize,
    pub accuracy: f64,
}

impl Accuracy {
    fn add(&mut self, correct: bool) {
        self.correct += correct as usize;
        self.total += 1;
        self.accuracy = self.correct as f64 / self.total as f64;
    }
}

/// Accuracies by category or type, and overall: the mean of the
/// categories' accuracies for generation (as GenEval), of all questions for
/// understanding.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvalReport {
    pub generation: BTreeMap<String, Accuracy>,
    pub generation_overall: f64,
    pub understanding: BTreeMap<String, Accuracy>,
    pub understanding_overall: f64,
    pub prompts_per_category: usize,
    pub seeds: usize,
    pub first_seed: u64,
    pub question_scenes: usize,
    /// When images were drawn from plans: the planning temperature, and by
    /// category the share of plans that lay out a scene the prompt is true
    /// of (the rest of an image's errors are the drawing's).
    #[serde(default)]
    pub plan_temperature: Option<f32>,
    #[serde(default)]
    pub plans: BTreeMap<String, Accuracy>,
    /// Candidates drawn per plan, one kept by the model's reading.
    #[serde(default = "one")]
    pub best_of: usize,
}

fn one() -> usize {
    1
}

impl EvalReport {
    /// The report as a plain-text table.
    pub fn table(&self) -> String {
        let mut out =
            String::from("task           category/type        correct  total  accuracy\n");
        let mut rows = |task: &str, by: &BTreeMap<String, Accuracy>, overall: f64| {
            for (name, a) in by {
                out += &format!(
                    "{task:<14} {name:<20} {:>7} {:>6} {:>8.1} %\n",
                    a.correct,
                    a.total,
                    100.0 * a.accuracy
                );
            }
            out += &format!(
                "{task:<14} {:<20} {:>7} {:>6} {:>8.1} %\n",
                "overall",
                "",
                "",
                100.0 * overall
            );
        };
        rows("generation", &self.generation, self.generation_overall);
        if !self.plans.is_empty() {
            let overall =
                self.plans.values().map(|a| a.accuracy).sum::<f64>() / self.plans.len() as f64;
            rows("plan", &self.plans, overall);
        }
        rows(
            "understanding",
            &self.understanding,
            self.understanding_overall,
        );
        out
    }
}

/// An image per prompt and seed, sampled at `temperature` with
/// classifier-free guidance `cfg_weight`.
pub fn draw(
    bundle: &ModelBundle,
    prompts: &[&str],
    seeds: Range<u64>,
    cfg_weight: f32,
    temperature: f32,
) -> Result<Vec<Vec<Option<ImageSample>>>, PretrainError> {
    let seeds: Vec<u64> = seeds.collect();
    let wanted: Vec<(&str, Vec<u64>)> = prompts.iter().map(|p| (*p, seeds.clone())).collect();
    draw_each(bundle, &wanted, cfg_weight, temperature)
}

/// The images of each (prompt, seeds), all in one batch.
fn draw_each(
    bundle: &ModelBundle,
    wanted: &[(&str, Vec<u64>)],
    cfg_weight: f32,
    temperature: f32,
) -> Result<Vec<Vec<Option<ImageSample>>>, PretrainError> {
    let processor = &bundle.processor;
    let items = wanted
        .iter()
        .map(|(prompt, seeds)| {
            Ok(ImageItem {
                prompt: processor.generation_prompt(prompt)?,
                cfg_weight,
                sampling: SamplingParams {
                    temperature,
                    top_k: None,
                    top_p: None,
                },
                seeds: seeds.clone(),
            })
        })
        .collect::<Result<Vec<_>, ulm_model::ModelError>>()?;
    Ok(generate_images_batch(
        &bundle.model,
        &items,
        processor.special.pad,
        &mut |_| true,
    )?)
}

/// An image drawn from a plan.
pub struct Planned {
    pub plan: String,
    /// `None` when its drawing was cancelled.
    pub image: Option<ImageSample>,
}

/// The log-likelihood of `description` as the model's describing turn's
/// answer about each of `images`: how well each image fits it, in the
/// model's own reading.
pub fn description_scores(
    bundle: &ModelBundle,
    description: &str,
    images: &[RgbImage],
) -> Result<Vec<f32>, PretrainError> {
    let turns: Vec<Vec<(String, String)>> = images
        .iter()
        .map(|_| vec![(DESCRIBE_QUESTION.to_string(), description.to_string())])
        .collect();
    let read = answer_logps(
        &bundle.model,
        &bundle.processor,
        &bundle.image_processor,
        Some(images),
        &turns,
        Pass::Inference,
    )?;
    Ok(read.totals()?)
}

/// An image per prompt and seed as [`draw`], each drawn from its own plan
/// of the prompt: the planning turn sampled at `plan_temperature` from
/// that seed, then the plan drawn from. With `best_of` above 1, that many
/// candidates are drawn from each plan (seeds `seed * best_of + c`) and
/// the one the model's describing turn finds the plan truest of is kept
/// ([`description_scores`]). Returns each plan with its image.
pub fn draw_planned(
    bundle: &ModelBundle,
    prompts: &[&str],
    seeds: Range<u64>,
    drawing: (f32, f32),
    plan_temperature: f32,
    best_of: usize,
) -> Result<Vec<Vec<Planned>>, PretrainError> {
    let (cfg_weight, temperature) = drawing;
    let seeds: Vec<u64> = seeds.collect();
    let best_of = best_of.max(1) as u64;
    let sampling = SamplingParams {
        temperature: plan_temperature,
        top_k: None,
        top_p: None,
    };
    let plans = plan_batch(&bundle.model, &bundle.processor, prompts, &seeds, sampling)?;
    let candidate_seeds = |seed: u64| -> Vec<u64> {
        (0..best_of)
            .map(|c| seed.wrapping_mul(best_of).wrapping_add(c))
            .collect()
    };
    let wanted: Vec<(&str, Vec<u64>)> = plans
        .iter()
        .flat_map(|row| {
            row.iter()
                .zip(&seeds)
                .map(|(plan, &seed)| (plan.as_str(), candidate_seeds(seed)))
        })
        .collect();
    let mut drawn = draw_each(bundle, &wanted, cfg_weight, temperature)?.into_iter();
    let mut out = Vec::with_capacity(plans.len());
    for row in plans {
        let mut planned = Vec::with_capacity(row.len());
        for plan in row {
            let candidates: Vec<ImageSample> =
                drawn.next().into_iter().flatten().flatten().collect();
            let image = if candidates.len() > 1 {
                let images: Vec<RgbImage> = candidates.iter().map(|c| c.image.clone()).collect();
                let scores = description_scores(bundle, &plan, &images)?;
                let best = (0..scores.len())
                    .max_by(|&a, &b| scores[a].total_cmp(&scores[b]))
                    .unwrap_or(0);
                candidates.into_iter().nth(best)
            } else {
                candidates.into_iter().next()
            };
            planned.push(Planned { plan, image });
        }
        out.push(planned);
    }
    Ok(out)
}

pub fn evaluate(bundle: &ModelBundle, cfg: &EvalConfig) -> Result<EvalReport, PretrainError> {
    let model = &bundle.model;
    let processor = &bundle.processor;
    let mut generation = BTreeMap::new();
    let mut plans = BTreeMap::new();
    for category in Category::ALL {
        let prompts = test_prompts(cfg.world_seed, category, cfg.prompts_per_category);
        let captions: Vec<&str> = prompts
            .iter()
            .map(|e| e.captions[0].text.as_str())
            .collect();
        let seeds = cfg.first_seed..cfg.first_seed + cfg.seeds as u64;
        let drawn: Vec<Vec<(Option<String>, Option<ImageSample>)>> = match cfg.plan_temperature {
            Some(plan_temperature) => draw_planned(
                bundle,
                &captions,
                seeds,
                (cfg.cfg_weight, cfg.temperature),
                plan_temperature,
                cfg.best_of,
            )?
            .into_iter()
            .map(|row| row.into_iter().map(|p| (Some(p.plan), p.image)).collect())
            .collect(),
            None => draw(bundle, &captions, seeds, cfg.cfg_weight, cfg.temperature)?
                .into_iter()
                .map(|row| row.into_iter().map(|i| (None, i)).collect())
                .collect(),
        };
        let (mut accuracy, mut planned) = (Accuracy::default(), Accuracy::default());
        for (example, samples) in prompts.iter().zip(drawn) {
            let claim = &example.captions[0].claim;
            for (plan, sample) in samples {
                if let Some(plan) = plan {
                    let layout = parse(&plan).ok().as_ref().and_then(verify::laid_out);
                    planned.add(layout.is_some_and(|seen| verify::check(claim, &seen)));
                }
                if let Some(sample) = sample {
                    accuracy.add(verify::check(claim, &verify::read(&sample.image)));
                }
            }
        }
        generation.insert(category.name().to_string(), accuracy);
        if planned.total > 0 {
            plans.insert(category.name().to_string(), planned);
        }
    }
    let generation_overall =
        generation.values().map(|a| a.accuracy).sum::<f64>() / generation.len() as f64;

    let mut understanding: BTreeMap<String, Accuracy> = BTreeMap::new();
    let mut all = Accuracy::default();
    let side = bundle.image_processor.image_size as u32;
    for example in examples(cfg.world_seed, Split::Test).take(cfg.question_scenes) {
        let image = example.image(side);
        let items = example
            .questions
            .iter()
            .map(|q| {
                Ok(AnswerItem {
                    prompt: TextPrompt::question(
                        model,
                        processor,
                        &bundle.image_processor,
                        &image,
                        &q.text,
                        1,
                    )?,
                    max_new_tokens: cfg.max_new_tokens,
                    sampling: SamplingParams::greedy(),
                    seeds: vec![0],
                })
            })
            .collect::<Result<Vec<_>, ulm_model::ModelError>>()?;
        let answers = answer_batch(
            model,
            &items,
            processor.special.eos,
            processor.special.pad,
            &mut |_| true,
        )?;
        for (question, samples) in example.questions.iter().zip(answers) {
            let text = processor.decode(&samples[0].token_ids);
            let qa_type = QaType::of(question.multiple_choice);
            let right = qa_accuracy(&text, &question.answer, &question.text, qa_type) >= 1.0;
            understanding
                .entry(question.kind.name().to_string())
                .or_default()
                .add(right);
            all.add(right);
        }
    }
    Ok(EvalReport {
        generation,
        generation_overall,
        understanding,
        understanding_overall: all.accuracy,
        prompts_per_category: cfg.prompts_per_category,
        seeds: cfg.seeds,
        first_seed: cfg.first_seed,
        question_scenes: cfg.question_scenes,
        plan_temperature: cfg.plan_temperature,
        plans,
        best_of: cfg.best_of,
    })
}
