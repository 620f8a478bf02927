//! `ulm-server corl`: the CoRL paper's comparison, measured on the
//! synthetic world. From one model, GRPO runs in several arms with the same
//! steps and the same samples per step: unified (both tasks, one advantage
//! from `r_t2i + 0.8 r_mm2t`), generation only, understanding only, and
//! unified with generation rewarded by the world's verifier instead of the
//! model's own judgement; several seeds each. Every arm's adapters are
//! evaluated on the test split every `--eval-every` steps, beside the model
//! itself (no RL) on the same image seeds. Writes `results.json`,
//! `table.md` and `curves.png`; a rerun reuses the runs and evaluations
//! already on disk.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, ValueEnum};
use serde::Serialize;
use serde_json::{Map, Value};

use ulm_plot::{grid, png, Panel, Scale, Series};
use ulm_pretrain::eval::EvalReport;
use ulm_rl::curves::CurvePoint;

use crate::oneshot::ModelArgs;
use crate::pretrain::{eval, EvalArgs};
use crate::train::{train, TrainArgs};
use crate::world::{write_world, WorldArgs};

/// One way of reinforcing the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Arm {
    /// Both tasks on paired items, one advantage from `r_t2i + 0.8 r_mm2t`.
    Unified,
    /// Text-to-image only.
    Generation,
    /// Question answering only.
    Understanding,
    /// As unified, generation rewarded by the world's verifier.
    Verifier,
}

impl Arm {
    pub fn name(self) -> &'static str {
        match self {
            Arm::Unified => "unified",
            Arm::Generation => "generation",
            Arm::Understanding => "understanding",
            Arm::Verifier => "verifier",
        }
    }

    /// Reward functions and weights, as `train --rewards` takes them: the
    /// paper's (generation: its own text-image match and cycle consistency;
    /// understanding: accuracy and format).
    fn rewards(self) -> &'static str {
        match self {
            Arm::Unified => "t2i_match=1,self_cycle=1,qa_accuracy=1,format=0.5",
            Arm::Generation => "t2i_match=1,self_cycle=1",
            Arm::Understanding => "qa_accuracy=1,format=0.5",
            Arm::Verifier => "verifier=1,qa_accuracy=1,format=0.5",
        }
    }

    /// The dataset file the arm trains on (see [`write_arm_data`]).
    fn data_file(self) -> &'static str {
        match self {
            Arm::Unified | Arm::Verifier => "data.jsonl",
            Arm::Generation => "captions.jsonl",
            Arm::Understanding => "questions.jsonl",
        }
    }

    /// Items per step. A unified item is a group of each task, so an arm
    /// of one task takes twice as many items: every arm draws the same
    /// number of samples per step.
    fn items_per_step(self, unified_items: usize) -> usize {
        match self {
            Arm::Unified | Arm::Verifier => unified_items,
            Arm::Generation | Arm::Understanding => 2 * unified_items,
        }
    }
}

/// The arm without training: the model as it is.
const NO_RL: &str = "none";

#[derive(Args, Debug, Clone)]
pub struct CorlArgs {
    /// Output directory: the worlds, a folder per arm and seed (train's
    /// metrics and checkpoints, eval-<step>.json), results.json, table.md,
    /// curves.png.
    #[arg(long)]
    pub out: PathBuf,
    /// The model the arms start from (TRAINING.md uses models/world-early).
    #[command(flatten)]
    pub model: ModelArgs,
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "unified,generation,understanding,verifier"
    )]
    pub arms: Vec<Arm>,
    /// Seeds per arm: each its own training world, adapters, samples and
    /// evaluation images.
    #[arg(long, default_value_t = 3)]
    pub seeds: u64,
    #[arg(long, default_value_t = 100)]
    pub steps: u64,
    /// Evaluate the adapters every this many steps (and at the end).
    #[arg(long, default_value_t = 20)]
    pub eval_every: u64,
    /// Items per step of the unified arms (one-task arms take twice as many).
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    /// Samples per prompt and task (G).
    #[arg(long, default_value_t = 8)]
    pub group_size: usize,
    /// LoRA learning rate.
    #[arg(long, default_value_t = 2e-3)]
    pub lr: f64,
    /// Longest sampled answer, in tokens.
    #[arg(long, default_value_t = 8)]
    pub max_new_tokens: usize,
    /// Scenes of the world's train split per seed (seed s trains on the world of seed s + 1).
    #[arg(long, default_value_t = 300)]
    pub train_scenes: usize,
    /// Side of the training images, in pixels.
    #[arg(long, default_value_t = 48)]
    pub side: u32,
    /// More `train` options for every arm, as on its command line (`--beta 0 --lora-rank 8`).
    #[arg(long, default_value = "", allow_hyphen_values = true)]
    pub train_options: String,
    /// Test prompts per generation category.
    #[arg(long, default_value_t = 20)]
    pub prompts: usize,
    /// Images per test prompt.
    #[arg(long, default_value_t = 4)]
    pub eval_seeds: usize,
    /// Test scenes whose questions are asked.
    #[arg(long, default_value_t = 100)]
    pub question_scenes: usize,
}

/// `train`'s options, parsed as its command line parses them, so that an
/// arm runs exactly the command `results.json` records.
#[derive(Parser)]
struct TrainCommand {
    #[command(flatten)]
    args: TrainArgs,
}

/// Mean and sample standard deviation over seeds.
#[derive(Debug, Clone, Serialize)]
pub struct Spread {
    pub mean: f64,
    pub sd: f64,
    pub values: Vec<f64>,
}

impl Spread {
    fn of(values: Vec<f64>) -> Self {
        let n = values.len() as f64;
        let mean = values.iter().sum::<f64>() / n.max(1.0);
        let sd = if values.len() > 1 {
            (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt()
        } else {
            0.0
        };
        Self { mean, sd, values }
    }
}

/// One arm and seed: its evaluations by step (0 is the model itself).
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    pub arm: String,
    pub seed: u64,
    /// The `train` command the arm ran; none for the model itself.
    pub command: Option<String>,
    pub evals: Vec<(u64, EvalReport)>,
    #[serde(skip)]
    steps: Vec<CurvePoint>,
}

/// An arm's accuracies after its last step, over seeds.
#[derive(Debug, Clone, Serialize)]
pub struct ArmSummary {
    pub arm: String,
    pub generation: Spread,
    pub understanding: Spread,
    /// Mean accuracy per category and per question type.
    pub generation_by_category: BTreeMap<String, f64>,
    pub understanding_by_type: BTreeMap<String, f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CorlReport {
    pub steps: u64,
    pub seeds: u64,
    pub arms: Vec<ArmSummary>,
    pub runs: Vec<Run>,
}

pub fn corl(args: &CorlArgs) -> Result<CorlReport> {
    if args.seeds == 0 || args.steps == 0 || args.eval_every == 0 || args.arms.is_empty() {
        bail!("--seeds, --steps, --eval-every and --arms must each be at least 1");
    }
    std::fs::create_dir_all(&args.out).with_context(|| args.out.display().to_string())?;
    let mut runs = Vec::new();
    for seed in 0..args.seeds {
        let world = args.out.join(format!("world-{seed}"));
        write_arm_data(args, seed, &world)?;
        // Each seed draws its own test images; every arm of a seed the same.
        let first_image_seed = seed * args.eval_seeds as u64;
        let base_dir = args.out.join(NO_RL).join(format!("seed-{seed}"));
        let base = evaluate(args, None, &base_dir.join("eval-0.json"), first_image_seed)?;
        runs.push(Run {
            arm: NO_RL.into(),
            seed,
            command: None,
            // The same evaluation at the last step: its flat line spans the curves.
            evals: vec![(0, base.clone()), (args.steps, base.clone())],
            steps: Vec::new(),
        });
        for &arm in &args.arms {
            let dir = args.out.join(arm.name()).join(format!("seed-{seed}"));
            let argv = train_argv(args, arm, seed, &world, &dir);
            if !checkpoint(&dir, args.steps).exists() {
                // A run cut short leaves metrics that a new one would append to.
                if dir.exists() {
                    std::fs::remove_dir_all(&dir).with_context(|| dir.display().to_string())?;
                }
                eprintln!("corl: {} seed {seed}", arm.name());
                let parsed = TrainCommand::try_parse_from(
                    std::iter::once("train".to_string()).chain(argv.iter().cloned()),
                )?;
                train(parsed.args)?;
            }
            let mut evals = vec![(0, base.clone())];
            for step in eval_steps(args.steps, args.eval_every) {
                let report = evaluate(
                    args,
                    Some(&checkpoint(&dir, step)),
                    &dir.join(format!("eval-{step}.json")),
                    first_image_seed,
                )?;
                evals.push((step, report));
            }
            runs.push(Run {
                arm: arm.name().into(),
                seed,
                command: Some(format!("ulm-server train {}", argv.join(" "))),
                evals,
                steps: read_steps(&dir.join("metrics.jsonl"))?,
            });
        }
    }
    let report = summarize(args, runs);
    let write = |name: &str, bytes: &[u8]| {
        let path = args.out.join(name);
        std::fs::write(&path, bytes).with_context(|| path.display().to_string())
    };
    write(
        "results.json",
        serde_json::to_string_pretty(&report)?.as_bytes(),
    )?;
    write("table.md", markdown(&report).as_bytes())?;
    write("curves.png", &curves_png(&report))?;
    Ok(report)
}

fn checkpoint(dir: &Path, step: u64) -> PathBuf {
    dir.join(format!("checkpoint-{step}"))
}

/// Every `every` steps, and the last.
fn eval_steps(steps: u64, every: u64) -> Vec<u64> {
    let mut out: Vec<u64> = (1..=steps / every).map(|k| k * every).collect();
    if out.last() != Some(&steps) {
        out.push(steps);
    }
    out
}

/// The world of seed `seed + 1`'s train split (the model was pretrained on
/// seed 0's; no split shares a scene with another), written three ways:
/// `data.jsonl` as `world` writes it (caption and question of a scene per
/// item), and `captions.jsonl` and `questions.jsonl` (the same items, one
/// part each).
fn write_arm_data(args: &CorlArgs, seed: u64, world: &Path) -> Result<()> {
    let parts = ["data.jsonl", "captions.jsonl", "questions.jsonl"];
    if parts.iter().all(|p| world.join(p).exists()) {
        return Ok(());
    }
    write_world(&WorldArgs {
        out: world.to_path_buf(),
        split: "train".into(),
        count: args.train_scenes,
        side: args.side,
        seed: seed + 1,
    })?;
    let text = std::fs::read_to_string(world.join("data.jsonl"))?;
    let items = text
        .lines()
        .map(serde_json::from_str::<Map<String, Value>>)
        .collect::<Result<Vec<_>, _>>()?;
    let only = |keep: &[&str]| -> Result<String> {
        let mut out = String::new();
        for item in &items {
            let kept: Map<String, Value> = item
                .iter()
                .filter(|(k, _)| keep.contains(&k.as_str()))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            out += &serde_json::to_string(&kept)?;
            out.push('\n');
        }
        Ok(out)
    };
    let question = ["image", "qa_problem", "qa_solution", "qa_type"];
    std::fs::write(world.join("captions.jsonl"), only(&["caption"])?)?;
    std::fs::write(world.join("questions.jsonl"), only(&question)?)?;
    Ok(())
}

fn train_argv(args: &CorlArgs, arm: Arm, seed: u64, world: &Path, dir: &Path) -> Vec<String> {
    let mut argv: Vec<String> = [
        "--data",
        &world.join(arm.data_file()).display().to_string(),
        "--out",
        &dir.display().to_string(),
        "--rewards",
        arm.rewards(),
        "--steps",
        &args.steps.to_string(),
        "--save-every",
        &args.eval_every.to_string(),
        "--batch-size",
        &arm.items_per_step(args.batch_size).to_string(),
        "--group-size",
        &args.group_size.to_string(),
        "--lr",
        &args.lr.to_string(),
        "--max-new-tokens",
        &args.max_new_tokens.to_string(),
        "--seed",
        &seed.to_string(),
        "--device",
        &args.model.device,
        "--dtype",
        &args.model.dtype,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if let Some(model) = &args.model.model {
        argv.extend(["--model".to_string(), model.display().to_string()]);
    }
    if args.model.demo {
        argv.push("--demo".into());
    }
    argv.extend(args.train_options.split_whitespace().map(String::from));
    argv
}

/// `eval` of the model, with `adapter` on top when given; read back from
/// `cache` when an earlier run wrote it.
fn evaluate(
    args: &CorlArgs,
    adapter: Option<&Path>,
    cache: &Path,
    first_seed: u64,
) -> Result<EvalReport> {
    if let Ok(text) = std::fs::read_to_string(cache) {
        return serde_json::from_str(&text).with_context(|| cache.display().to_string());
    }
    if let Some(parent) = cache.parent() {
        std::fs::create_dir_all(parent)?;
    }
    eval(&EvalArgs {
        model: args.model.clone(),
        prompts: args.prompts,
        seeds: args.eval_seeds,
        first_seed,
        adapter: adapter.map(Path::to_path_buf),
        question_scenes: args.question_scenes,
        world_seed: 0,
        cfg_weight: None,
        temperature: None,
        // The rollouts draw from the captions themselves: so does the score.
        plan_temperature: None,
        no_plan: true,
        best_of: None,
        out: Some(cache.to_path_buf()),
        grid: None,
    })
}

fn read_steps(metrics: &Path) -> Result<Vec<CurvePoint>> {
    let text = std::fs::read_to_string(metrics).with_context(|| metrics.display().to_string())?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).with_context(|| metrics.display().to_string()))
        .collect()
}

fn summarize(args: &CorlArgs, runs: Vec<Run>) -> CorlReport {
    let mut names = vec![NO_RL];
    names.extend(args.arms.iter().map(|a| a.name()));
    let arms = names
        .iter()
        .map(|&name| {
            let last: Vec<&EvalReport> = runs
                .iter()
                .filter(|r| r.arm == name)
                .filter_map(|r| r.evals.last().map(|(_, e)| e))
                .collect();
            let mean_of = |pick: &dyn Fn(&EvalReport) -> BTreeMap<String, f64>| {
                let mut sums: BTreeMap<String, f64> = BTreeMap::new();
                for report in &last {
                    for (k, v) in pick(report) {
                        *sums.entry(k).or_default() += v / last.len() as f64;
                    }
                }
                sums
            };
            ArmSummary {
                arm: name.to_string(),
                generation: Spread::of(last.iter().map(|e| e.generation_overall).collect()),
                understanding: Spread::of(last.iter().map(|e| e.understanding_overall).collect()),
                generation_by_category: mean_of(&|e| {
                    e.generation
                        .iter()
                        .map(|(k, a)| (k.clone(), a.accuracy))
                        .collect()
                }),
                understanding_by_type: mean_of(&|e| {
                    e.understanding
                        .iter()
                        .map(|(k, a)| (k.clone(), a.accuracy))
                        .collect()
                }),
            }
        })
        .collect();
    CorlReport {
        steps: args.steps,
        seeds: args.seeds,
        arms,
        runs,
    }
}

fn percent(s: &Spread) -> String {
    format!("{:.1} ± {:.1}", 100.0 * s.mean, 100.0 * s.sd)
}

/// The overall table (mean ± sd over seeds, and the change from no RL),
/// then every category and question type (means).
pub fn markdown(report: &CorlReport) -> String {
    let base = &report.arms[0];
    let mut out = format!(
        "After {} steps, {} seeds per arm (mean ± sd of test accuracy, %; change from no RL in points):\n\n",
        report.steps, report.seeds
    );
    out += "| arm | generation | change | understanding | change |\n|---|---:|---:|---:|---:|\n";
    for arm in &report.arms {
        let change = |s: &Spread, b: &Spread| format!("{:+.1}", 100.0 * (s.mean - b.mean));
        out += &format!(
            "| {} | {} | {} | {} | {} |\n",
            arm.arm,
            percent(&arm.generation),
            change(&arm.generation, &base.generation),
            percent(&arm.understanding),
            change(&arm.understanding, &base.understanding),
        );
    }
    out += "\n| task | category / type |";
    for arm in &report.arms {
        out += &format!(" {} |", arm.arm);
    }
    out += "\n|---|---|";
    out += &"---:|".repeat(report.arms.len());
    out.push('\n');
    let mut rows = |task: &str, pick: &dyn Fn(&ArmSummary) -> &BTreeMap<String, f64>| {
        for name in pick(base).keys() {
            out += &format!("| {task} | {name} |");
            for arm in &report.arms {
                let value = pick(arm).get(name).copied().unwrap_or(f64::NAN);
                out += &format!(" {:.1} |", 100.0 * value);
            }
            out.push('\n');
        }
    };
    rows("generation", &|a| &a.generation_by_category);
    rows("understanding", &|a| &a.understanding_by_type);
    out
}

/// Per arm, the mean over seeds of `value` at each step it has.
fn mean_curve(report: &CorlReport, arm: &str, value: &dyn Fn(&Run) -> Vec<(f64, f64)>) -> Series {
    let mut by_step: BTreeMap<u64, (f64, usize)> = BTreeMap::new();
    for run in report.runs.iter().filter(|r| r.arm == arm) {
        for (step, v) in value(run) {
            let slot = by_step.entry(step as u64).or_default();
            slot.0 += v;
            slot.1 += 1;
        }
    }
    Series {
        name: arm.to_string(),
        points: by_step
            .into_iter()
            .map(|(step, (sum, n))| (step as f64, sum / n as f64))
            .collect(),
    }
}

/// Steps the training panels average over.
const TRAINING_WINDOW: usize = 5;

/// Test accuracy of both tasks by step, and the training's mean answer
/// accuracy and KL, each arm's mean over seeds.
fn curves_png(report: &CorlReport) -> Vec<u8> {
    let arms: Vec<&str> = report.arms.iter().map(|a| a.arm.as_str()).collect();
    let panel = |title: &str, y: &str, value: &dyn Fn(&Run) -> Vec<(f64, f64)>| Panel {
        title: title.into(),
        x_label: "step".into(),
        y_label: y.into(),
        scale: Scale::Linear,
        series: arms
            .iter()
            // Every arm in every panel, drawn or not, keeps its colour.
            .map(|arm| mean_curve(report, arm, value))
            .collect(),
    };
    let accuracy = |pick: fn(&EvalReport) -> f64| {
        move |run: &Run| -> Vec<(f64, f64)> {
            run.evals
                .iter()
                .map(|(step, e)| (*step as f64, 100.0 * pick(e)))
                .collect()
        }
    };
    // Per-step training values are noisy: each run's are a moving mean of
    // TRAINING_WINDOW steps before the mean over seeds.
    let training = |pick: fn(&CurvePoint) -> Option<f64>| {
        move |run: &Run| -> Vec<(f64, f64)> {
            let (steps, values): (Vec<f64>, Vec<f64>) = run
                .steps
                .iter()
                .filter_map(|p| pick(p).map(|v| (p.step as f64, v)))
                .unzip();
            let smoothed = Series::smoothed("", &values, TRAINING_WINDOW);
            steps
                .into_iter()
                .zip(smoothed.points)
                .map(|(step, (_, v))| (step, v))
                .collect()
        }
    };
    let panels = [
        panel(
            "generation, test split",
            "accuracy %",
            &accuracy(|e| e.generation_overall),
        ),
        panel(
            "understanding, test split",
            "accuracy %",
            &accuracy(|e| e.understanding_overall),
        ),
        panel(
            &format!("training answers (qa_accuracy, mean of {TRAINING_WINDOW} steps)"),
            "mean reward",
            &training(|p| {
                p.rewards
                    .iter()
                    .find(|(name, _)| name == "qa_accuracy")
                    .map(|r| r.1)
            }),
        ),
        panel(
            &format!("KL to the start (mean of {TRAINING_WINDOW} steps)"),
            "per token",
            &training(|p| Some(p.kl)),
        ),
    ];
    png(&grid(&panels, 2, (560, 360)))
}
