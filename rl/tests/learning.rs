//! Learning, measured: GRPO on the demo model raises a verifiable reward.
//! Understanding: answers made of ASCII letters. Generation: bright images.
//! Both rewards are defined here through the public `Reward` trait.

use candle_core::{DType, Device};
use ulm_model::bundle::ModelBundle;
use ulm_model::demo::DEFAULT_SEED;
use ulm_rl::lora::{attach, LoraConfig};
use ulm_rl::reward::verifiable::QaType;
use ulm_rl::reward::{QaItem, Reward, RewardContext, RewardTask, Scored, TrainItem, Weighted};
use ulm_rl::trainer::{Adaptation, Trainer, TrainerConfig};
use ulm_rl::RlError;

/// Share of answer characters that are ASCII letters.
struct AsciiLetters;

impl Reward for AsciiLetters {
    fn name(&self) -> &str {
        "ascii_letters"
    }
    fn task(&self) -> RewardTask {
        RewardTask::Understanding
    }
    fn score(&self, _: &RewardContext, samples: &[Scored]) -> Result<Vec<f32>, RlError> {
        Ok(samples
            .iter()
            .map(|s| {
                let text = s.text.unwrap_or_default();
                let total = text.chars().count().max(1);
                text.chars().filter(|c| c.is_ascii_alphabetic()).count() as f32 / total as f32
            })
            .collect())
    }
}

/// Share of the image's codes in the first quarter of the codebook. (The
/// demo's random VQ decoder maps every code grid to nearly the same mean
/// brightness, so pixel statistics make no usable reward for it.)
struct LowCodes;

impl Reward for LowCodes {
    fn name(&self) -> &str {
        "low_codes"
    }
    fn task(&self) -> RewardTask {
        RewardTask::Generation
    }
    fn score(&self, ctx: &RewardContext, samples: &[Scored]) -> Result<Vec<f32>, RlError> {
        let quarter = ctx.model.cfg.gen_vision.codebook_size as u32 / 4;
        Ok(samples
            .iter()
            .map(|s| {
                s.tokens.iter().filter(|&&t| t < quarter).count() as f32
                    / s.tokens.len().max(1) as f32
            })
            .collect())
    }
}

fn trainer(rewards: Vec<Weighted>, config: TrainerConfig) -> Trainer {
    let mut bundle = ModelBundle::demo(DEFAULT_SEED, DType::F32, &Device::Cpu).unwrap();
    let lora = attach(
        &mut bundle.model,
        &LoraConfig {
            rank: 8,
            alpha: 16.0,
            ..LoraConfig::default()
        },
        7,
    )
    .unwrap();
    Trainer::new(bundle, Adaptation::Lora(lora), config, rewards).unwrap()
}

fn qa_item(i: u8) -> TrainItem {
    TrainItem {
        qa: Some(QaItem {
            image: image::RgbImage::from_fn(48, 32, |x, y| {
                image::Rgb([(x * 5) as u8 ^ i, (y * 7) as u8, 90])
            }),
            question: format!("What is shown in picture {i}?"),
            solution: "A".into(),
            qa_type: QaType::OpenEnded,
        }),
        caption: None,
    }
}

fn run(
    trainer: &mut Trainer,
    items: &[TrainItem],
    steps: usize,
    pick: fn(&ulm_rl::trainer::StepMetrics) -> f64,
) -> Vec<f64> {
    (0..steps)
        .map(|_| {
            let m = trainer.step(items).unwrap();
            assert!(m.applied, "step {} was abandoned", m.step);
            println!(
                "step {:>2}  reward {:.3}  loss {:+.4}  kl {:.4}  grad_norm {:.3}  clip {:.3}  zero-var groups {}",
                m.step, pick(&m), m.loss, m.kl, m.grad_norm, m.clip_fraction, m.zero_variance_groups
            );
            pick(&m)
        })
        .collect()
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

#[test]
fn grpo_raises_an_understanding_reward() {
    let config = TrainerConfig {
        group_size: 8,
        max_new_tokens: 6,
        lr: 1e-2,
        beta: 0.0,
        micro_batch_rows: 16,
        seed: 1,
        ..TrainerConfig::default()
    };
    let mut t = trainer(
        vec![Weighted {
            reward: Box::new(AsciiLetters),
            weight: 1.0,
        }],
        config,
    );
    let items = [qa_item(1), qa_item(2)];
    let curve = run(&mut t, &items, 16, |m| m.reward_understanding.unwrap());
    let (first, last) = (mean(&curve[..3]), mean(&curve[curve.len() - 3..]));
    println!("ascii_letters: first 3 steps {first:.3}, last 3 steps {last:.3}");
    assert!(
        last > first + 0.3,
        "reward went from {first:.3} to {last:.3}"
    );
}

#[test]
fn grpo_raises_a_generation_reward() {
    let config = TrainerConfig {
        group_size: 8,
        lr: 3e-3,
        beta: 0.04,
        micro_batch_rows: 16,
        seed: 2,
        ..TrainerConfig::default()
    };
    let mut t = trainer(
        vec![Weighted {
            reward: Box::new(LowCodes),
            weight: 1.0,
        }],
        config,
    );
    let items = [TrainItem {
        qa: None,
        caption: Some("a picture".into()),
    }];
    let curve = run(&mut t, &items, 12, |m| m.reward_generation.unwrap());
    let (first, last) = (mean(&curve[..3]), mean(&curve[curve.len() - 3..]));
    println!("low_codes: first 3 steps {first:.3}, last 3 steps {last:.3}");
    assert!(
        last > first + 0.3,
        "reward went from {first:.3} to {last:.3}"
    );
}
