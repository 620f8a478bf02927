//! A job's data, from what the store holds:
//!
//! - served groups (n > 1) whose samples received scores: GRPO groups as
//!   they were served, with their behaviour log-probs. A group of answers
//!   with a reference answer (a correction) but no scores is scored by
//!   accuracy against it;
//! - questions with a reference answer: prompts for fresh rollouts scored by
//!   accuracy and format;
//! - generation prompts that received no feedback: prompts for fresh
//!   rollouts scored by the model-self rewards.
//!
//! A stable share of the rated requests (by a hash of the request id) is
//! held out: never trained on, it is the evaluation set.

use serde::Serialize;
use sha2::{Digest, Sha256};

use ulm_model::image_processor::{decode_image, ImageProcessorConfig};
use ulm_rl::reward::verifiable::{qa_accuracy, QaType};
use ulm_rl::reward::{QaItem, RewardTask, TrainItem};
use ulm_rl::trainer::{ServedGroup, ServedSample, Trainer};

use super::config::JobConfig;
use crate::record::{RequestParams, Task};
use crate::store::training_data::RatedSample;
use crate::store::{Store, StoreError, MAX_FEEDBACK_SCORE};

/// What the model needs to know to accept a served group.
#[derive(Debug, Clone)]
pub struct Shape {
    pub image_tokens: usize,
    /// How input images reach the vision tower: a job keeps them at that size.
    pub input_images: ImageProcessorConfig,
    /// The model's default sampling temperature, for a job that names none.
    pub sampling_temperature: f64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct DataCounts {
    pub rated_requests: usize,
    pub train_groups: usize,
    pub eval_groups: usize,
    pub reference_answers: usize,
    pub prompts: usize,
    /// Rated requests left out, by reason.
    pub skipped_single_sample: usize,
    pub skipped_other_temperature: usize,
    pub skipped_unscored: usize,
    pub skipped_unreadable: usize,
    /// Held-out groups the evaluation cannot weigh, by reason: drawn with
    /// top-k or top-p (the stored log-probs are of the untruncated
    /// distribution), drawn greedily (no distribution to weigh against),
    /// or images drawn with guidance but stored without guided log-probs.
    pub unweighable_truncated: usize,
    pub unweighable_greedy: usize,
    pub unweighable_no_guided_logprobs: usize,
}

/// Why a held-out group cannot be weighed by the evaluation.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Unweighable {
    Truncated,
    Greedy,
    NoGuidedLogprobs,
}

impl Unweighable {
    fn of(params: &RequestParams, group: &ServedGroup) -> Option<Self> {
        let sampling = params.sampling();
        if sampling.is_greedy() {
            Some(Self::Greedy)
        } else if sampling.top_k.is_some() || sampling.top_p.is_some_and(|p| p < 1.0) {
            Some(Self::Truncated)
        } else if group.guided()
            && group
                .samples
                .iter()
                .any(|s| s.guided_logprobs.len() != s.tokens.len())
        {
            Some(Self::NoGuidedLogprobs)
        } else {
            None
        }
    }

    fn count(self, counts: &mut DataCounts) {
        *match self {
            Self::Truncated => &mut counts.unweighable_truncated,
            Self::Greedy => &mut counts.unweighable_greedy,
            Self::NoGuidedLogprobs => &mut counts.unweighable_no_guided_logprobs,
        } += 1;
    }
}

#[derive(Default)]
pub struct JobData {
    pub train: Vec<ServedGroup>,
    pub eval: Vec<ServedGroup>,
    pub reference_answers: Vec<TrainItem>,
    pub prompts: Vec<TrainItem>,
    pub counts: DataCounts,
}

impl JobData {
    /// The fresh-rollout items of source `name` (reference answers or prompts).
    pub fn items(&self, name: &str) -> &[TrainItem] {
        if name == "prompts" {
            &self.prompts
        } else {
            &self.reference_answers
        }
    }

    /// Drops the entries of source `name` at `first..first + n` (wrapping)
    /// that fail on their own, and says why each went.
    pub fn drop_failing(
        &mut self,
        trainer: &Trainer,
        name: &str,
        first: usize,
        n: usize,
    ) -> Vec<String> {
        fn drop_where<T>(
            all: &mut Vec<T>,
            first: usize,
            n: usize,
            fails: impl Fn(&T) -> Option<String>,
        ) -> Vec<String> {
            let len = all.len();
            let mut bad: Vec<(usize, String)> = (0..n.min(len))
                .map(|k| (first + k) % len)
                .filter_map(|i| fails(&all[i]).map(|why| (i, why)))
                .collect();
            bad.sort_by_key(|(i, _)| std::cmp::Reverse(*i));
            bad.dedup_by_key(|(i, _)| *i);
            bad.into_iter()
                .map(|(i, why)| {
                    all.remove(i);
                    why
                })
                .collect()
        }
        match name {
            "feedback" => drop_where(&mut self.train, first, n, |g| {
                trainer.probe_served(g).err().map(|e| e.to_string())
            }),
            "prompts" => drop_where(&mut self.prompts, first, n, |item| {
                trainer.probe_item(item).err().map(|e| e.to_string())
            }),
            _ => drop_where(&mut self.reference_answers, first, n, |item| {
                trainer.probe_item(item).err().map(|e| e.to_string())
            }),
        }
    }
}

/// Where a request falls: held out for evaluation when its hash is below
/// `fraction`. Stable, so a held-out group is never trained on by any job.
pub fn hash_unit(request_id: &str) -> f64 {
    let digest = Sha256::digest(request_id.as_bytes());
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(bytes) as f64 / u64::MAX as f64
}

fn qa_type_of(reference: &str) -> QaType {
    let r = reference.trim();
    if r.len() == 1 && r.chars().all(|c| c.is_ascii_uppercase()) {
        QaType::MultipleChoice
    } else {
        QaType::OpenEnded
    }
}

/// A sample's score: the mean of its human scores under the chosen keys.
fn human_score(sample: &RatedSample, keys: Option<&[String]>) -> Option<f32> {
    let scores: Vec<f64> = sample
        .scores
        .iter()
        .filter(|(k, _)| keys.is_none_or(|keys| keys.iter().any(|x| x == k)))
        .map(|(_, s)| *s)
        // Rows stored before scores were bounded may hold any number.
        .filter(|s| s.is_finite() && s.abs() <= MAX_FEEDBACK_SCORE)
        .collect();
    (!scores.is_empty()).then(|| (scores.iter().sum::<f64>() / scores.len() as f64) as f32)
}

/// A rated group as training data and as held-out data, where its scores
/// under the respective keys make one (at least two scored samples).
struct Scored {
    hash: f64,
    /// Why the held-out group cannot be weighed, if it cannot.
    unweighable: Option<Unweighable>,
    train: Option<ServedGroup>,
    /// The group scored by the gate's own keys; `None` when the gate judges
    /// by the training keys, and `train` is the held-out group too.
    gate: Option<Option<ServedGroup>>,
}

impl Scored {
    fn held_out(&self) -> Option<&ServedGroup> {
        match &self.gate {
            Some(own) => own.as_ref(),
            None => self.train.as_ref(),
        }
    }
}

pub async fn gather(
    store: &Store,
    config: &JobConfig,
    holdout_fraction: f64,
    until_ms: i64,
    shape: Shape,
) -> Result<JobData, StoreError> {
    let mut data = JobData::default();
    let requests = store
        .rated_request_ids(until_ms, config.max_groups as i64)
        .await?;
    data.counts.rated_requests = requests.len();
    let mut groups: Vec<Scored> = Vec::new();
    for request_id in &requests {
        let rated = store.rated_group(request_id, until_ms).await?;
        let Some(first) = rated.first() else { continue };
        let first = first.sample.clone();
        let reference = rated
            .iter()
            .flat_map(|r| r.corrections.iter())
            .next_back()
            .cloned();
        let image = match (&first.task, &first.input_image_sha256) {
            (Task::Answer, Some(sha)) => {
                let decoded = store
                    .get_image(sha)
                    .await
                    .ok()
                    .and_then(|bytes| decode_image(&bytes, u64::MAX).ok())
                    .map(|image| shape.input_images.resize_and_pad(&image));
                match decoded {
                    Some(image) => Some(image),
                    None => {
                        data.counts.skipped_unreadable += 1;
                        continue;
                    }
                }
            }
            _ => None,
        };
        let item = match (first.task, image) {
            (Task::Answer, Some(image)) => TrainItem {
                qa: Some(QaItem {
                    image,
                    question: first.prompt.clone(),
                    solution: reference.clone().unwrap_or_default(),
                    qa_type: qa_type_of(reference.as_deref().unwrap_or_default()),
                }),
                caption: None,
            },
            (Task::Generate, _) => TrainItem {
                qa: None,
                caption: Some(first.drawn_from().to_string()),
            },
            (Task::Answer, None) => {
                data.counts.skipped_unreadable += 1;
                continue;
            }
        };
        let hash = hash_unit(request_id);
        let held_out = hash < holdout_fraction;
        if reference.is_some() && !held_out {
            data.reference_answers.push(item.clone());
        }
        if rated.len() < 2 {
            data.counts.skipped_single_sample += 1;
            continue;
        }
        let temperature = config.temperature_or(shape.sampling_temperature);
        if (first.params.logprob_temperature() as f64 - temperature).abs() > 1e-6 {
            data.counts.skipped_other_temperature += 1;
            continue;
        }
        // Scored as training data by the job's keys, as held-out data by
        // the gate's: which of the two a group is settles below.
        let scored = |keys: Option<&[String]>| -> Vec<ServedSample> {
            rated
                .iter()
                .filter_map(|r| {
                    let s = &r.sample;
                    let score = human_score(r, keys).or_else(|| {
                        let qa = item.qa.as_ref().filter(|_| reference.is_some())?;
                        Some(qa_accuracy(
                            s.output_text.as_deref().unwrap_or_default(),
                            &qa.solution,
                            &qa.question,
                            qa.qa_type,
                        ) as f32)
                    })?;
                    let well_formed = s.token_ids.len() == s.logprobs.len()
                        && !s.token_ids.is_empty()
                        && (s.task == Task::Answer || s.token_ids.len() == shape.image_tokens);
                    well_formed.then(|| ServedSample {
                        tokens: s.token_ids.clone(),
                        logprobs: s.logprobs.clone(),
                        guided_logprobs: s.guided_logprobs.clone(),
                        score,
                    })
                })
                .collect()
        };
        let train_samples = scored(config.feedback_keys.as_deref());
        let gate_samples = config
            .gate_feedback_keys
            .as_deref()
            .map(|keys| scored(Some(keys)));
        let scored_enough = |samples: &[ServedSample]| samples.len() >= 2;
        if !scored_enough(&train_samples) && !gate_samples.as_deref().is_some_and(scored_enough) {
            data.counts.skipped_unscored += 1;
            continue;
        }
        let task = match first.task {
            Task::Answer => RewardTask::Understanding,
            Task::Generate => RewardTask::Generation,
        };
        let guidance = match first.params {
            RequestParams::Generate(p) => Some(p.cfg_weight),
            RequestParams::Answer(_) => None,
        };
        let group = |samples: Vec<ServedSample>| {
            scored_enough(&samples).then(|| ServedGroup {
                item: item.clone(),
                task,
                guidance,
                samples,
            })
        };
        let mut scored = Scored {
            hash,
            unweighable: None,
            train: group(train_samples),
            gate: gate_samples.map(group),
        };
        scored.unweighable = scored
            .held_out()
            .and_then(|g| Unweighable::of(&first.params, g));
        groups.push(scored);
    }
    // Too little data for the hash to hold any group out: the weighable
    // group with the smallest hash is held out for this job.
    let min_hash = groups
        .iter()
        .filter(|g| g.held_out().is_some() && g.unweighable.is_none())
        .map(|g| g.hash)
        .fold(f64::INFINITY, f64::min);
    let force = groups.len() >= 2
        && min_hash.is_finite()
        && min_hash >= holdout_fraction
        && holdout_fraction > 0.0;
    for g in groups {
        let held_out = g.hash < holdout_fraction || (force && g.hash == min_hash);
        let group = match (held_out, g.gate) {
            (true, Some(own)) => own,
            _ => g.train,
        };
        match (group, held_out, g.unweighable) {
            (Some(train), false, _) => data.train.push(train),
            (Some(_), true, Some(why)) => why.count(&mut data.counts),
            (Some(eval), true, None) => data.eval.push(eval),
            // Scored only under the keys of the other role.
            (None, _, _) => data.counts.skipped_unscored += 1,
        }
    }
    data.prompts = store
        .unrated_generation_prompts(config.max_groups as i64)
        .await?
        .into_iter()
        .map(|caption| TrainItem {
            qa: None,
            caption: Some(caption),
        })
        .collect();
    data.counts.train_groups = data.train.len();
    data.counts.eval_groups = data.eval.len();
    data.counts.reference_answers = data.reference_answers.len();
    data.counts.prompts = data.prompts.len();
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holdout_hash_is_stable_and_uniform() {
        assert_eq!(hash_unit("abc"), hash_unit("abc"));
        let held = (0..10_000)
            .filter(|i| hash_unit(&format!("request-{i}")) < 0.2)
            .count();
        assert!((1_800..2_200).contains(&held), "{held}");
    }

    #[test]
    fn reference_answers_pick_their_branch() {
        assert_eq!(qa_type_of(" B "), QaType::MultipleChoice);
        assert_eq!(qa_type_of("a red cube"), QaType::OpenEnded);
    }
}
