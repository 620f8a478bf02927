//! Planning before drawing: a model trained with the planning turn (the
//! world recipe's) first rewrites a prompt, as text, into a full caption of
//! an image the prompt is true of (every object's size, colour, shape and
//! cell), and then draws from that caption. A small model binds colours
//! and places to objects when the caption pins each object to a cell and
//! not when it leaves the layout open (TRAINING.md), so the layout is
//! decided in words, where the model gets it right, before the image.

use crate::decode::TextPrompt;
use crate::generate::{answer_batch, AnswerItem};
use crate::janus::Janus;
use crate::processor::Processor;
use crate::sampling::SamplingParams;
use crate::ModelError;

/// The describing turn's question: a model trained with it answers with
/// every object's size, colour, shape and cell, in a plan's words, so that
/// the likelihood of a plan as its answer about an image says how well the
/// image fits the plan.
pub const DESCRIBE_QUESTION: &str = "Describe the image.";

/// What the planning turn's user text starts with, before the prompt.
pub const PLAN_INSTRUCTION: &str = "Plan the image:";

/// Longest plan in tokens: four objects of the world's words take about 30.
pub const MAX_PLAN_TOKENS: usize = 64;

/// The planning turn's user text for `prompt`.
pub fn plan_request(prompt: &str) -> String {
    format!("{PLAN_INSTRUCTION} {}", prompt.trim())
}

/// One plan per seed of each prompt, sampled with `sampling`: plan `j` of
/// prompt `i` comes from `seeds[j]`, so that each image of a prompt can be
/// drawn from its own layout. A plan cut off at [`MAX_PLAN_TOKENS`] is
/// returned as far as it got.
pub fn plan_batch(
    model: &Janus,
    processor: &Processor,
    prompts: &[&str],
    seeds: &[u64],
    sampling: SamplingParams,
) -> Result<Vec<Vec<String>>, ModelError> {
    let items = prompts
        .iter()
        .map(|prompt| {
            Ok(AnswerItem {
                prompt: TextPrompt {
                    prompt: processor.text_prompt(&plan_request(prompt))?,
                    pixels: None,
                    samples: seeds.len(),
                },
                max_new_tokens: MAX_PLAN_TOKENS,
                sampling,
                seeds: seeds.to_vec(),
            })
        })
        .collect::<Result<Vec<_>, ModelError>>()?;
    let special = processor.special;
    let answers = answer_batch(model, &items, special.eos, special.pad, &mut |_| true)?;
    Ok(answers
        .into_iter()
        .map(|samples| {
            samples
                .iter()
                .map(|s| processor.decode(&s.token_ids).trim().to_string())
                .collect()
        })
        .collect())
}
