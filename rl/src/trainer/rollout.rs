//! Rollouts: fresh samples of the current policy for each task, scored by
//! the trainer's rewards, or groups the server served with their stored
//! scores and behaviour log-probs.

use ulm_model::generate::{answer_batch, generate_images_batch, AnswerItem, ImageItem};

use super::Trainer;
use crate::reward::{
    score_task, RewardContext, RewardTask, Scored, TaskScores, TrainItem, Weighted,
};
use crate::RlError;

/// Samples of one task in consecutive groups, one group per item.
pub(super) struct Rollouts {
    /// Item index of each group.
    pub(super) items: Vec<usize>,
    /// Rows of each group (G for fresh rollouts; served groups vary).
    pub(super) sizes: Vec<usize>,
    pub(super) rows: Vec<Row>,
}

impl Rollouts {
    pub(super) fn uniform(items: Vec<usize>, group_size: usize, rows: Vec<Row>) -> Self {
        Self {
            sizes: vec![group_size; items.len()],
            items,
            rows,
        }
    }

    /// The group of each row.
    pub(super) fn row_groups(&self) -> Vec<usize> {
        self.sizes
            .iter()
            .enumerate()
            .flat_map(|(g, &n)| std::iter::repeat_n(g, n))
            .collect()
    }

    /// Row ranges of the groups.
    pub(super) fn ranges(&self) -> Vec<std::ops::Range<usize>> {
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

pub(super) struct Row {
    pub(super) tokens: Vec<u32>,
    /// Behaviour log-probs recorded while sampling.
    pub(super) logprobs: Vec<f32>,
    pub(super) text: Option<String>,
    pub(super) image: Option<image::RgbImage>,
    pub(super) human_score: Option<f32>,
}

/// A group of samples the server served for one request, with a score per
/// sample (human feedback, or accuracy against a reference answer) and the
/// behaviour log-probs recorded when they were sampled.
#[derive(Debug, Clone)]
pub struct ServedGroup {
    /// The prompt: `qa` for answers (its solution unused), `caption` for images.
    pub item: TrainItem,
    pub task: RewardTask,
    /// Images: the CFG weight they were drawn with (`None`: unguided).
    pub guidance: Option<f32>,
    pub samples: Vec<ServedSample>,
}

impl ServedGroup {
    /// Whether its samples were drawn from a guided distribution other
    /// than the conditional one (CFG weight 1 is the conditional itself).
    pub fn guided(&self) -> bool {
        self.guidance.is_some_and(|w| w != 1.0)
    }
}

#[derive(Debug, Clone)]
pub struct ServedSample {
    /// Answer tokens (with the final EOS when there is one) or image codes.
    pub tokens: Vec<u32>,
    /// As GRPO scores them: conditional for images.
    pub logprobs: Vec<f32>,
    /// Images drawn with guidance: the log-probs of the guided distribution
    /// they were drawn from (empty otherwise). Evaluation weights need them.
    pub guided_logprobs: Vec<f32>,
    pub score: f32,
}

impl Trainer {
    /// Whether `item`'s prompts build, as a fresh rollout needs them first.
    /// Finds the bad item of a step that failed.
    pub fn probe_item(&self, item: &TrainItem) -> Result<(), RlError> {
        let b = &self.bundle;
        if let Some(qa) = &item.qa {
            RewardContext::of(b).question(&qa.image, &qa.question, 1)?;
        }
        if let Some(caption) = &item.caption {
            b.processor.generation_prompt(caption)?;
        }
        Ok(())
    }

    pub(super) fn rollout_understanding(&self, items: &[TrainItem]) -> Result<Rollouts, RlError> {
        let b = &self.bundle;
        let mut requests = Vec::new();
        let mut owners = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let Some(qa) = &item.qa else { continue };
            requests.push(AnswerItem {
                prompt: RewardContext::of(b).question(
                    &qa.image,
                    &qa.question,
                    self.config.group_size,
                )?,
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

    pub(super) fn rollout_generation(&self, items: &[TrainItem]) -> Result<Rollouts, RlError> {
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
            let sample = sample
                .ok_or_else(|| RlError::InvalidData("a rollout image was not produced".into()))?;
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

    pub(super) fn score(
        &self,
        rewards: &[Weighted],
        items: &[TrainItem],
        task: RewardTask,
        r: &Rollouts,
    ) -> Result<TaskScores, RlError> {
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
}

/// Served groups as rollouts: one item per group, understanding and
/// generation apart. Generation groups must agree on their image length.
pub(super) fn served_rollouts(
    groups: &[ServedGroup],
) -> Result<(Vec<TrainItem>, Rollouts, Rollouts), RlError> {
    let mut items = Vec::with_capacity(groups.len());
    let empty = || Rollouts::uniform(Vec::new(), 0, Vec::new());
    let (mut und, mut gen) = (empty(), empty());
    for (i, group) in groups.iter().enumerate() {
        let wanted = match group.task {
            RewardTask::Understanding => group.item.qa.is_some(),
            RewardTask::Generation => group.item.caption.is_some(),
        };
        if !wanted || group.samples.len() < 2 {
            return Err(RlError::InvalidData(format!(
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
                return Err(RlError::InvalidData(format!(
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
        return Err(RlError::InvalidData(
            "served images differ in their number of image tokens".into(),
        ));
    }
    Ok((items, und, gen))
}
