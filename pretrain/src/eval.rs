//! Evaluation on the world's fixed test split, in the shape of the CoRL
//! paper's: GenEval-style accuracy per prompt category for generation (the
//! verifier on each generated image, several seeds per prompt) and answer
//! accuracy per question type for understanding.

use std::collections::BTreeMap;
use std::ops::Range;

use serde::{Deserialize, Serialize};
use ulm_model::bundle::ModelBundle;
use ulm_model::decode::TextPrompt;
use ulm_model::generate::{
    answer_batch, generate_images_batch, AnswerItem, ImageItem, ImageSample,
};
use ulm_model::sampling::SamplingParams;
use ulm_rl::reward::verifiable::{qa_accuracy, QaType};
use ulm_world::scene::Category;
use ulm_world::{examples, test_prompts, verify, Split};

use crate::PretrainError;

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
    let processor = &bundle.processor;
    let items = prompts
        .iter()
        .map(|prompt| {
            Ok(ImageItem {
                prompt: processor.generation_prompt(prompt)?,
                cfg_weight,
                sampling: SamplingParams {
                    temperature,
                    top_k: None,
                    top_p: None,
                },
                seeds: seeds.clone().collect(),
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

pub fn evaluate(bundle: &ModelBundle, cfg: &EvalConfig) -> Result<EvalReport, PretrainError> {
    let model = &bundle.model;
    let processor = &bundle.processor;
    let mut generation = BTreeMap::new();
    for category in Category::ALL {
        let prompts = test_prompts(cfg.world_seed, category, cfg.prompts_per_category);
        let captions: Vec<&str> = prompts
            .iter()
            .map(|e| e.captions[0].text.as_str())
            .collect();
        let images = draw(
            bundle,
            &captions,
            cfg.first_seed..cfg.first_seed + cfg.seeds as u64,
            cfg.cfg_weight,
            cfg.temperature,
        )?;
        let mut accuracy = Accuracy::default();
        for (example, samples) in prompts.iter().zip(images) {
            for sample in samples.into_iter().flatten() {
                let seen = verify::read(&sample.image);
                accuracy.add(verify::check(&example.captions[0].claim, &seen));
            }
        }
        generation.insert(category.name().to_string(), accuracy);
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
    })
}
