//! `ulm-server gate-check`: whether the evaluation gate can be trusted on a
//! trained model. The model plays the active version: it answers test-split
//! questions and draws test-split captions, `--group-size` samples each,
//! scored by the world's answers and verifier: the held-out groups a job
//! would see, with their behaviour log-probs. Every candidate (the LoRA
//! checkpoints found under `--candidates`) is then scored twice: by the
//! gate's off-policy estimate on those groups, and by fresh samples on the
//! same prompts (`--fresh-samples` each, for it and for the model), which
//! is what the estimate stands for. Writes `gate-check.json`,
//! `gate-check.md` and `gate-check.png` under `--out`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use serde::Serialize;

use ulm_core::scheduler::config::JobConfig;
use ulm_core::scheduler::gate::{decide, Bounds, Verdict};
use ulm_model::bundle::ModelBundle;
use ulm_model::decode::TextPrompt;
use ulm_model::generate::{answer_batch, AnswerItem};
use ulm_model::sampling::SamplingParams;
use ulm_plot::{grid, png, Panel, Scale, Series};
use ulm_pretrain::eval::draw;
use ulm_rl::evaluate::evaluate;
use ulm_rl::lora::{self, ADAPTER_FILE};
use ulm_rl::reward::verifiable::{qa_accuracy, QaType};
use ulm_rl::reward::{QaItem, RewardTask, TrainItem};
use ulm_rl::trainer::{Adaptation, ServedGroup, ServedSample, Trainer, TrainerConfig};
use ulm_world::{examples, verify, Example, Split};

use crate::oneshot::ModelArgs;

#[derive(Args, Debug, Clone)]
pub struct GateCheckArgs {
    /// The active version: the model that draws the held-out groups.
    #[command(flatten)]
    pub model: ModelArgs,
    /// Directories searched for candidates: every `checkpoint-*` directory
    /// with LoRA adapters (as `train` and `corl` write them).
    #[arg(long, required = true, num_args = 1..)]
    pub candidates: Vec<PathBuf>,
    #[arg(long)]
    pub out: PathBuf,
    /// Test scenes; each gives one question and one caption.
    #[arg(long, default_value_t = 32)]
    pub scenes: usize,
    /// Samples per held-out group, as served with `n` > 1.
    #[arg(long, default_value_t = 4)]
    pub group_size: usize,
    /// Fresh samples per prompt for every candidate and for the model.
    #[arg(long, default_value_t = 8)]
    pub fresh_samples: usize,
    #[arg(long, default_value_t = 8)]
    pub max_new_tokens: usize,
    /// The world whose test split gives the prompts.
    #[arg(long, default_value_t = 0)]
    pub world_seed: u64,
    /// The gate's evidence bound (a job's `min_effective_share`).
    #[arg(long, default_value_t = JobConfig::default().min_effective_share)]
    pub min_effective_share: f64,
}

/// The prompts of the check: one question and one caption per scene.
struct Prompts {
    scenes: Vec<Example>,
    side: u32,
}

impl Prompts {
    fn question(&self, k: usize) -> &ulm_world::question::Question {
        let questions = &self.scenes[k].questions;
        &questions[k % questions.len()]
    }

    fn caption(&self, k: usize) -> &ulm_world::caption::Caption {
        let captions = &self.scenes[k].captions;
        &captions[k % captions.len()]
    }
}

/// How the model draws, as a request that names nothing is served.
#[derive(Debug, Clone, Copy)]
struct Drawing {
    temperature: f32,
    cfg_weight: f32,
    max_new_tokens: usize,
}

/// Answers and images of `bundle` for every prompt with `seeds`, scored:
/// the groups a job would gather from what was served.
fn draw_groups(
    bundle: &ModelBundle,
    prompts: &Prompts,
    seeds: std::ops::Range<u64>,
    drawing: Drawing,
) -> Result<Vec<ServedGroup>> {
    let (model, processor) = (&bundle.model, &bundle.processor);
    let sampling = SamplingParams {
        temperature: drawing.temperature,
        top_k: None,
        top_p: None,
    };
    let mut groups = Vec::new();
    let n = prompts.scenes.len();
    let images: Vec<_> = prompts
        .scenes
        .iter()
        .map(|e| e.image(prompts.side))
        .collect();
    let items = (0..n)
        .map(|k| {
            let prompt = TextPrompt::question(
                model,
                processor,
                &bundle.image_processor,
                &images[k],
                &prompts.question(k).text,
                seeds.clone().count(),
            )?;
            Ok(AnswerItem {
                prompt,
                max_new_tokens: drawing.max_new_tokens,
                sampling,
                seeds: seeds.clone().collect(),
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
    for (k, samples) in answers.into_iter().enumerate() {
        let question = prompts.question(k);
        let qa_type = QaType::of(question.multiple_choice);
        groups.push(ServedGroup {
            item: TrainItem {
                qa: Some(QaItem {
                    image: images[k].clone(),
                    question: question.text.clone(),
                    solution: question.answer.clone(),
                    qa_type,
                }),
                caption: None,
            },
            task: RewardTask::Understanding,
            guidance: None,
            samples: samples
                .into_iter()
                .map(|s| ServedSample {
                    score: qa_accuracy(
                        &processor.decode(&s.token_ids),
                        &question.answer,
                        &question.text,
                        qa_type,
                    ) as f32,
                    tokens: s.token_ids,
                    logprobs: s.logprobs,
                    guided_logprobs: Vec::new(),
                })
                .collect(),
        });
    }
    // A few captions at a time: every image is two rows of the batch.
    for first in (0..n).step_by(8) {
        let ks: Vec<usize> = (first..n.min(first + 8)).collect();
        let captions: Vec<&str> = ks
            .iter()
            .map(|&k| prompts.caption(k).text.as_str())
            .collect();
        let drawn = draw(
            bundle,
            &captions,
            seeds.clone(),
            drawing.cfg_weight,
            drawing.temperature,
        )?;
        for (&k, images) in ks.iter().zip(drawn) {
            let caption = prompts.caption(k);
            groups.push(ServedGroup {
                item: TrainItem {
                    qa: None,
                    caption: Some(caption.text.clone()),
                },
                task: RewardTask::Generation,
                guidance: Some(drawing.cfg_weight),
                samples: images
                    .into_iter()
                    .flatten()
                    .map(|image| ServedSample {
                        score: f32::from(u8::from(verify::check(
                            &caption.claim,
                            &verify::read(&image.image),
                        ))),
                        tokens: image.tokens,
                        logprobs: image.logprobs,
                        guided_logprobs: image.guided_logprobs,
                    })
                    .collect(),
            });
        }
    }
    Ok(groups)
}

/// Each group's mean score, in order.
fn group_means(groups: &[ServedGroup]) -> Vec<f64> {
    groups
        .iter()
        .map(|g| {
            g.samples.iter().map(|s| s.score as f64).sum::<f64>() / g.samples.len().max(1) as f64
        })
        .collect()
}

/// The group means of `task` (all: `None`) averaged, as the gate averages
/// its estimates.
fn mean_score(groups: &[ServedGroup], task: Option<RewardTask>) -> f64 {
    let means: Vec<f64> = groups
        .iter()
        .zip(group_means(groups))
        .filter(|(g, _)| task.is_none_or(|t| g.task == t))
        .map(|(_, m)| m)
        .collect();
    means.iter().sum::<f64>() / means.len().max(1) as f64
}

/// Fresh mean scores: overall, understanding, generation.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct FreshScores {
    pub overall: f64,
    pub understanding: f64,
    pub generation: f64,
}

impl FreshScores {
    fn of(groups: &[ServedGroup]) -> Self {
        Self {
            overall: mean_score(groups, None),
            understanding: mean_score(groups, Some(RewardTask::Understanding)),
            generation: mean_score(groups, Some(RewardTask::Generation)),
        }
    }
}

/// The standard error of the mean of the per-group differences: the fresh
/// samples of both share prompts and seeds, so the pairs' noise partly
/// cancels.
fn paired_standard_error(candidate: &[f64], active: &[f64]) -> f64 {
    let d: Vec<f64> = candidate.iter().zip(active).map(|(c, a)| c - a).collect();
    let n = d.len() as f64;
    if n < 2.0 {
        return f64::NAN;
    }
    let mean = d.iter().sum::<f64>() / n;
    let var = d.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (var / n).sqrt()
}

/// One candidate on one task's held-out groups.
#[derive(Debug, Clone, Serialize)]
pub struct CandidateCheck {
    /// The checkpoint, relative to the directory it was found under.
    pub checkpoint: String,
    /// "understanding" or "generation".
    pub task: String,
    /// The gate's estimate of the candidate's reward minus the active
    /// version's, from the held-out groups.
    pub estimated_change: f64,
    /// The same change measured on fresh samples of both.
    pub fresh_change: f64,
    /// Its standard error over the prompts.
    pub fresh_change_se: f64,
    /// The evidence the candidate's weights keep (see `PolicyScore`).
    pub effective_share: f64,
    pub kl_to_base: f64,
    /// The gate's verdict with no reward drop allowed and no KL bound.
    pub verdict: Verdict,
    /// Whether the verdict matches the fresh samples (promote exactly when
    /// the candidate is no worse); none without a verdict.
    pub verdict_agrees: Option<bool>,
    /// Whether the estimate's sign matches the fresh change's, evidence or
    /// not (what the gate would have said without its evidence rule).
    pub sign_agrees: bool,
}

/// How often the gate matches the fresh samples on a set of candidates.
#[derive(Debug, Clone, Serialize)]
pub struct Agreement {
    pub candidates: usize,
    /// Those the gate gave a verdict, and the share of verdicts right.
    pub decided: usize,
    pub verdict_agreement: f64,
    /// The share where the estimate's sign is right, verdict or not.
    pub sign_agreement: f64,
}

impl Agreement {
    fn of<'a>(candidates: impl Iterator<Item = &'a CandidateCheck>) -> Self {
        let candidates: Vec<&CandidateCheck> = candidates.collect();
        let decided: Vec<bool> = candidates.iter().filter_map(|c| c.verdict_agrees).collect();
        Self {
            candidates: candidates.len(),
            decided: decided.len(),
            verdict_agreement: share(decided.into_iter()),
            sign_agreement: share(candidates.iter().map(|c| c.sign_agrees)),
        }
    }
}

/// Agreement on one task's candidates: over all of them, over those whose
/// fresh change is beyond two standard errors (where the truth is known),
/// and over those the evidence rule left without a verdict.
#[derive(Debug, Clone, Serialize)]
pub struct TaskAgreement {
    pub task: String,
    pub all: Agreement,
    pub clear: Agreement,
    pub undecided: Agreement,
}

#[derive(Debug, Clone, Serialize)]
pub struct GateCheck {
    pub groups: usize,
    pub held_out_samples: usize,
    pub fresh_samples_per_prompt: usize,
    pub min_effective_share: f64,
    /// The model's held-out mean score and its fresh scores.
    pub behaviour_reward: f64,
    pub active_fresh: FreshScores,
    pub candidates: Vec<CandidateCheck>,
    pub agreement: Vec<TaskAgreement>,
}

/// Every `checkpoint-*` directory with adapters under `root`, in order.
fn find_checkpoints(root: &Path) -> Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).with_context(|| dir.display().to_string())? {
            let path = entry?.path();
            if !path.is_dir() {
                continue;
            }
            let is_checkpoint = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("checkpoint-"));
            if is_checkpoint && path.join(ADAPTER_FILE).is_file() {
                found.push(path);
            } else {
                pending.push(path);
            }
        }
    }
    // Steps in numeric order within a run.
    found.sort_by_key(|p| {
        let step = p
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("checkpoint-"))
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(0);
        (p.parent().map(Path::to_path_buf), step)
    });
    Ok(found)
}

/// A trainer holding the adapters in `dir` on `active`'s weights: the
/// gate's view of the candidate.
fn candidate_trainer(active: &ModelBundle, dir: &Path, temperature: f32) -> Result<Trainer> {
    let mut candidate = active.clone();
    let device = candidate.model.device().clone();
    let adapters = lora::load(&mut candidate.model, dir, &device)?;
    let config = TrainerConfig {
        temperature,
        micro_batch_rows: 16,
        ..TrainerConfig::default()
    };
    Ok(Trainer::new(
        candidate,
        Adaptation::Lora(adapters),
        config,
        Vec::new(),
    )?)
}

const TASKS: [(RewardTask, &str); 2] = [
    (RewardTask::Understanding, "understanding"),
    (RewardTask::Generation, "generation"),
];

/// The groups of `task`, with their indices.
fn of_task(groups: &[ServedGroup], task: RewardTask) -> (Vec<usize>, Vec<ServedGroup>) {
    groups
        .iter()
        .enumerate()
        .filter(|(_, g)| g.task == task)
        .map(|(i, g)| (i, g.clone()))
        .unzip()
}

fn share(hits: impl Iterator<Item = bool>) -> f64 {
    let (mut yes, mut all) = (0usize, 0usize);
    for hit in hits {
        yes += usize::from(hit);
        all += 1;
    }
    if all == 0 {
        f64::NAN
    } else {
        yes as f64 / all as f64
    }
}

pub fn gate_check(args: &GateCheckArgs) -> Result<GateCheck> {
    let bundle = args.model.open()?;
    let device = bundle.model.device().clone();
    let drawing = Drawing {
        temperature: bundle.sampling.temperature as f32,
        cfg_weight: bundle.sampling.guidance_scale as f32,
        max_new_tokens: args.max_new_tokens,
    };
    let prompts = Prompts {
        scenes: examples(args.world_seed, Split::Test)
            .take(args.scenes)
            .collect(),
        side: bundle.image_processor.image_size as u32,
    };
    let held_out = draw_groups(&bundle, &prompts, 0..args.group_size as u64, drawing)?;
    // Fresh seeds never used for the held-out groups.
    let fresh_seeds = 1 << 20..(1 << 20) + args.fresh_samples as u64;
    let active_groups = draw_groups(&bundle, &prompts, fresh_seeds.clone(), drawing)?;
    let active_fresh = FreshScores::of(&active_groups);
    let active_means = group_means(&active_groups);
    let bounds = Bounds {
        max_reward_drop: 0.0,
        max_kl: f64::INFINITY,
        min_effective_share: args.min_effective_share,
    };
    let mut candidates = Vec::new();
    for root in &args.candidates {
        for dir in find_checkpoints(root)? {
            let checkpoint = dir.strip_prefix(root).unwrap_or(&dir).display().to_string();
            let trainer = candidate_trainer(&bundle, &dir, drawing.temperature)?;
            let mut fresh_model = bundle.clone();
            lora::load_for_inference(&mut fresh_model.model, &dir, &device)?;
            let fresh_means = group_means(&draw_groups(
                &fresh_model,
                &prompts,
                fresh_seeds.clone(),
                drawing,
            )?);
            for (task, name) in TASKS {
                let (indices, groups) = of_task(&held_out, task);
                if groups.is_empty() {
                    continue;
                }
                let evaluation = evaluate(&trainer, &bundle.model, &groups)
                    .with_context(|| format!("the gate on {}", dir.display()))?;
                let (candidate_means, active_means): (Vec<f64>, Vec<f64>) = indices
                    .iter()
                    .map(|&i| (fresh_means[i], active_means[i]))
                    .unzip();
                let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
                let fresh_change = mean(&candidate_means) - mean(&active_means);
                let decision = decide(&evaluation, bounds);
                let estimated_change = evaluation.candidate.reward - evaluation.active.reward;
                let no_worse = fresh_change >= 0.0;
                let check = CandidateCheck {
                    checkpoint: checkpoint.clone(),
                    task: name.into(),
                    estimated_change,
                    fresh_change,
                    fresh_change_se: paired_standard_error(&candidate_means, &active_means),
                    effective_share: evaluation.candidate.effective_share,
                    kl_to_base: evaluation.candidate.kl_to_base,
                    verdict: decision.verdict,
                    verdict_agrees: (decision.verdict != Verdict::NotEnoughEvidence)
                        .then_some(decision.promote == no_worse),
                    sign_agrees: (estimated_change >= 0.0) == no_worse,
                };
                eprintln!(
                    "{} {name}: estimated {:+.3}, fresh {:+.3} ({:.3}), evidence {:.0}%, {:?}",
                    check.checkpoint,
                    check.estimated_change,
                    check.fresh_change,
                    check.fresh_change_se,
                    100.0 * check.effective_share,
                    check.verdict
                );
                candidates.push(check);
            }
        }
    }
    let agreement = TASKS
        .iter()
        .map(|&(_, name)| {
            let of_task = || candidates.iter().filter(move |c| c.task == name);
            TaskAgreement {
                task: name.into(),
                all: Agreement::of(of_task()),
                clear: Agreement::of(
                    of_task().filter(|c| c.fresh_change.abs() > 2.0 * c.fresh_change_se),
                ),
                undecided: Agreement::of(of_task().filter(|c| c.verdict_agrees.is_none())),
            }
        })
        .collect();
    let check = GateCheck {
        groups: held_out.len(),
        held_out_samples: held_out.iter().map(|g| g.samples.len()).sum(),
        fresh_samples_per_prompt: args.fresh_samples,
        min_effective_share: args.min_effective_share,
        behaviour_reward: mean_score(&held_out, None),
        active_fresh,
        candidates,
        agreement,
    };
    write_outputs(&check, &args.out)?;
    Ok(check)
}

fn write_outputs(check: &GateCheck, out: &Path) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| out.display().to_string())?;
    std::fs::write(
        out.join("gate-check.json"),
        serde_json::to_string_pretty(check)?,
    )?;
    std::fs::write(out.join("gate-check.md"), markdown(check))?;
    if !check.candidates.is_empty() {
        std::fs::write(out.join("gate-check.png"), png(&figure(check)))?;
    }
    Ok(())
}

fn percent(share: f64) -> String {
    if share.is_nan() {
        "-".into()
    } else {
        format!("{:.0} %", 100.0 * share)
    }
}

/// The summary and one row per candidate, in Markdown.
pub fn markdown(check: &GateCheck) -> String {
    let mut text = format!(
        "{} held-out groups ({} samples) drawn by the model, mean score {:.3}; fresh: {:.3} \
         ({} samples per prompt). A verdict needs an effective share of at least {:.0} %.\n\n\
         | candidates | n | with a verdict | verdict right | estimate's sign right |\n\
         |---|---:|---:|---:|---:|\n",
        check.groups,
        check.held_out_samples,
        check.behaviour_reward,
        check.active_fresh.overall,
        check.fresh_samples_per_prompt,
        100.0 * check.min_effective_share,
    );
    for task in &check.agreement {
        for (which, a) in [
            ("all", &task.all),
            ("fresh change beyond 2 s.e.", &task.clear),
            ("without a verdict", &task.undecided),
        ] {
            text.push_str(&format!(
                "| {}: {which} | {} | {} | {} | {} |\n",
                task.task,
                a.candidates,
                a.decided,
                percent(a.verdict_agreement),
                percent(a.sign_agreement)
            ));
        }
    }
    text.push_str(
        "\n| checkpoint | task | estimated change | fresh change (s.e.) | evidence | KL | verdict |\n\
         |---|---|---:|---:|---:|---:|---|\n",
    );
    for c in &check.candidates {
        let verdict = match (c.verdict, c.verdict_agrees) {
            (Verdict::NotEnoughEvidence, _) => "not enough evidence".to_string(),
            (v, Some(agrees)) => format!(
                "{} ({})",
                if v == Verdict::Promote {
                    "promote"
                } else {
                    "reject"
                },
                if agrees { "right" } else { "wrong" }
            ),
            (v, None) => format!("{v:?}"),
        };
        text.push_str(&format!(
            "| {} | {} | {:+.3} | {:+.3} ({:.3}) | {} | {:.3} | {} |\n",
            c.checkpoint,
            c.task,
            c.estimated_change,
            c.fresh_change,
            c.fresh_change_se,
            percent(c.effective_share),
            c.kl_to_base,
            verdict
        ));
    }
    text
}

/// Per task, candidates in the order of their fresh change: the gate's
/// estimate beside it, and the evidence beside the bound.
fn figure(check: &GateCheck) -> image::RgbImage {
    let mut panels = Vec::new();
    for (_, task) in TASKS {
        let mut order: Vec<&CandidateCheck> =
            check.candidates.iter().filter(|c| c.task == task).collect();
        order.sort_by(|a, b| a.fresh_change.total_cmp(&b.fresh_change));
        let series = |name: &str, value: &dyn Fn(&CandidateCheck) -> f64| Series {
            name: name.into(),
            points: order
                .iter()
                .enumerate()
                .map(|(i, c)| ((i + 1) as f64, value(c)))
                .collect(),
        };
        panels.push(Panel {
            title: format!("{task}: change over the active version, by fresh change"),
            x_label: "candidate, ordered by fresh change".into(),
            y_label: "change in mean score".into(),
            scale: Scale::Linear,
            series: vec![
                series("fresh samples", &|c| c.fresh_change),
                series("gate's estimate", &|c| c.estimated_change),
                series("zero", &|_| 0.0),
            ],
        });
        panels.push(Panel {
            title: format!("{task}: evidence kept by the candidate's weights"),
            x_label: "candidate, ordered by fresh change".into(),
            y_label: "effective share".into(),
            scale: Scale::Linear,
            series: vec![
                series("candidate", &|c| c.effective_share),
                series("bound", &|_| check.min_effective_share),
            ],
        });
    }
    grid(&panels, 2, (720, 480))
}
