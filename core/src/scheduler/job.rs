//! The training half of a job, run on a blocking thread: GRPO steps over the
//! job's data mix with LoRA adapters on a copy of the base model that
//! shares its weights, then the evaluation of the candidate against the
//! active version. Cancellation is checked before every step.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde::Serialize;
use tokio::sync::mpsc;

use ulm_model::bundle::ModelBundle;
use ulm_rl::checkpoint;
use ulm_rl::evaluate::{evaluate, Evaluation};
use ulm_rl::lora::{self, LoraConfig};
use ulm_rl::reward::{SelfCycle, T2iMatch, TrainItem, Weighted, FORMAT, QA_ACCURACY};
use ulm_rl::trainer::{Adaptation, ServedGroup, StepMetrics, Trainer, TrainerConfig};

use super::config::JobConfig;
use super::data::JobData;
use super::JobError;
use crate::engine::ServingModel;

/// What a step reports to the job record.
#[derive(Debug, Clone, Serialize)]
pub struct StepSummary {
    pub step: u64,
    /// feedback, reference_answers or prompts.
    pub source: &'static str,
    pub reward: Option<f64>,
    /// Mean of each reward function.
    pub rewards: Vec<(String, f64)>,
    pub loss: f64,
    pub kl: f64,
    pub grad_norm: f64,
    pub clip_fraction: f64,
    pub zero_variance_groups: usize,
    pub applied: bool,
    pub seconds: f64,
    /// Groups dropped before this step because they failed on their own.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub dropped: Vec<String>,
}

pub enum Progress {
    Step(StepSummary),
    Evaluating,
}

pub struct Trained {
    pub trainer: Trainer,
    pub evaluation: Evaluation,
}

pub enum RunEnd {
    Trained(Box<Trained>),
    Cancelled,
}

/// Everything the blocking run needs, owned.
pub struct JobInputs {
    pub base: ModelBundle,
    /// Adapters of the version the job starts from; none for the base.
    pub parent_checkpoint: Option<PathBuf>,
    pub active: Arc<ServingModel>,
    pub config: JobConfig,
    pub data: JobData,
}

/// One data source of the mix, drawn in turn by weight.
struct Source {
    name: &'static str,
    weight: f64,
    credit: f64,
    cursor: usize,
    len: usize,
}

/// Smooth weighted round robin over the non-empty sources: over any window
/// each source gets steps in proportion to its weight.
fn next_source(sources: &mut [Source]) -> usize {
    let total: f64 = sources.iter().map(|s| s.weight).sum();
    for s in sources.iter_mut() {
        s.credit += s.weight;
    }
    let best = (0..sources.len())
        .max_by(|&a, &b| {
            sources[a]
                .credit
                .total_cmp(&sources[b].credit)
                .then(b.cmp(&a))
        })
        .unwrap_or(0);
    sources[best].credit -= total;
    best
}

/// The next `n` entries of a source, wrapping around.
fn take_cyclic<T: Clone>(all: &[T], cursor: &mut usize, n: usize) -> Vec<T> {
    let n = n.min(all.len());
    let out = (0..n)
        .map(|k| all[(*cursor + k) % all.len()].clone())
        .collect();
    *cursor = (*cursor + n) % all.len().max(1);
    out
}

fn summary(m: &StepMetrics, source: &'static str) -> StepSummary {
    StepSummary {
        step: m.step,
        source,
        reward: match (m.reward_understanding, m.reward_generation) {
            (Some(u), Some(g)) => Some((u + g) / 2.0),
            (u, g) => u.or(g),
        },
        rewards: m.rewards.clone(),
        loss: m.loss,
        kl: m.kl,
        grad_norm: m.grad_norm,
        clip_fraction: m.clip_fraction,
        zero_variance_groups: m.zero_variance_groups,
        applied: m.applied,
        seconds: m.rollout_s + m.reward_s + m.train_s + m.update_s,
        dropped: Vec::new(),
    }
}

fn rewards(config: &JobConfig) -> Vec<Weighted> {
    let mut rewards = vec![
        Weighted {
            reward: Box::new(QA_ACCURACY),
            weight: 1.0,
        },
        Weighted {
            reward: Box::new(FORMAT),
            weight: 1.0,
        },
    ];
    if config.t2i_match_weight > 0.0 {
        rewards.push(Weighted {
            reward: Box::new(T2iMatch),
            weight: config.t2i_match_weight,
        });
    }
    if config.self_cycle_weight > 0.0 {
        rewards.push(Weighted {
            reward: Box::new(SelfCycle::default()),
            weight: config.self_cycle_weight,
        });
    }
    rewards
}

/// What a job's data held, as stored on the job and quoted in its errors.
pub fn data_counts(data: &JobData) -> serde_json::Value {
    serde_json::to_value(&data.counts).unwrap_or_default()
}

pub fn run(
    inputs: JobInputs,
    cancel: &AtomicBool,
    progress: &mpsc::UnboundedSender<Progress>,
) -> Result<RunEnd, JobError> {
    let JobInputs {
        mut base,
        parent_checkpoint,
        active,
        config,
        data,
    } = inputs;
    let device = base.model.device().clone();
    let adapters = match &parent_checkpoint {
        Some(dir) => lora::load(&mut base.model, dir, &device)?,
        None => lora::attach(
            &mut base.model,
            &LoraConfig {
                rank: config.lora_rank as usize,
                alpha: config.lora_alpha,
                ..LoraConfig::default()
            },
            config.seed,
        )?,
    };
    let trainer_config = TrainerConfig {
        group_size: config.group_size as usize,
        temperature: config.temperature_or(base.sampling.temperature) as f32,
        max_new_tokens: config.max_new_tokens as usize,
        beta: config.beta,
        epsilon_low: config.epsilon_low,
        epsilon_high: config.epsilon_high,
        num_iterations: config.num_iterations as usize,
        micro_batch_rows: config.micro_batch_rows as usize,
        lr: config.lr,
        total_steps: config.steps as u64,
        seed: config.seed,
        ..TrainerConfig::default()
    };
    let mut trainer = Trainer::new(
        base,
        Adaptation::Lora(adapters),
        trainer_config,
        rewards(&config),
    )?;
    if let Some(dir) = &parent_checkpoint {
        // The adapters continue from the parent's values as it trained them,
        // not as rounded into the model's dtype.
        checkpoint::restore_values(&mut trainer, dir, &device)?;
    }
    let mix = &config.mix;
    let mut sources: Vec<Source> = [
        ("feedback", mix.feedback, data.train.len()),
        (
            "reference_answers",
            mix.reference_answers,
            data.reference_answers.len(),
        ),
        ("prompts", mix.prompts, data.prompts.len()),
    ]
    .into_iter()
    .filter(|&(_, weight, len)| weight > 0.0 && len > 0)
    .map(|(name, weight, len)| Source {
        name,
        weight,
        credit: 0.0,
        cursor: 0,
        len,
    })
    .collect();
    if sources.is_empty() {
        return Err(JobError::NoTrainingData(data_counts(&data)));
    }
    let per_step = config.groups_per_step as usize;
    let mut data = data;
    let mut applied = 0;
    let mut done = 0;
    // Groups dropped since the last step, with why.
    let mut dropped = Vec::new();
    while done < config.steps {
        if cancel.load(Ordering::SeqCst) {
            return Ok(RunEnd::Cancelled);
        }
        let k = next_source(&mut sources);
        let source = &mut sources[k];
        debug_assert!(source.len > 0);
        let first = source.cursor;
        let outcome = match source.name {
            "feedback" => {
                let batch: Vec<ServedGroup> =
                    take_cyclic(&data.train, &mut source.cursor, per_step);
                trainer.step_served(&batch)
            }
            name => {
                let batch: Vec<TrainItem> =
                    take_cyclic(data.items(name), &mut source.cursor, per_step);
                trainer.step(&batch)
            }
        };
        let metrics = match outcome {
            Ok(metrics) => metrics,
            Err(error) => {
                // One bad group must not fail the job: drop the groups of
                // this batch that fail on their own, then go on.
                let reasons = data.drop_failing(&trainer, source.name, first, per_step);
                if reasons.is_empty() {
                    return Err(error.into());
                }
                tracing::warn!(%error, dropped = reasons.len(), "a step failed; its bad groups are dropped");
                source.len -= reasons.len();
                source.cursor = first % source.len.max(1);
                dropped.extend(reasons);
                if source.len == 0 {
                    sources.remove(k);
                }
                if sources.is_empty() {
                    return Err(JobError::NoTrainingData(data_counts(&data)));
                }
                continue;
            }
        };
        done += 1;
        applied += metrics.applied as usize;
        let mut summary = summary(&metrics, source.name);
        summary.dropped = std::mem::take(&mut dropped);
        let _ = progress.send(Progress::Step(summary));
    }
    if applied == 0 {
        return Err(JobError::NoStepApplied);
    }
    if cancel.load(Ordering::SeqCst) {
        return Ok(RunEnd::Cancelled);
    }
    let _ = progress.send(Progress::Evaluating);
    let evaluation = evaluate(&trainer, &active.model, &data.eval)?;
    Ok(RunEnd::Trained(Box::new(Trained {
        trainer,
        evaluation,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_get_steps_in_proportion_to_their_weights() {
        let source = |name, weight| Source {
            name,
            weight,
            credit: 0.0,
            cursor: 0,
            len: 1,
        };
        let mut sources = vec![source("a", 2.0), source("b", 1.0)];
        let picks: Vec<usize> = (0..6).map(|_| next_source(&mut sources)).collect();
        assert_eq!(picks.iter().filter(|&&p| p == 0).count(), 4);
        assert_eq!(picks.iter().filter(|&&p| p == 1).count(), 2);
    }

    #[test]
    fn batches_wrap_around_the_data() {
        let data = [1, 2, 3];
        let mut cursor = 0;
        assert_eq!(take_cyclic(&data, &mut cursor, 2), vec![1, 2]);
        assert_eq!(take_cyclic(&data, &mut cursor, 2), vec![3, 1]);
        assert_eq!(take_cyclic(&data, &mut cursor, 5), vec![2, 3, 1]);
    }
}
