//! CoRL's unified reward: where an item has both tasks, both groups share
//! the advantage of `r_t2i + 0.8 * r_mm2t`.

use candle_core::{DType, Device};
use ulm_model::bundle::ModelBundle;
use ulm_model::demo::DEFAULT_SEED;
use ulm_rl::lora::{attach, LoraConfig};
use ulm_rl::reward::verifiable::QaType;
use ulm_rl::reward::{QaItem, Reward, RewardContext, RewardTask, Scored, TrainItem, Weighted};
use ulm_rl::trainer::{Adaptation, StepMetrics, Trainer, TrainerConfig};
use ulm_rl::RlError;

/// Scores the samples of a call in turn: `scores[i]` for the i-th.
struct InTurn {
    task: RewardTask,
    scores: [f32; 2],
}

impl Reward for InTurn {
    fn name(&self) -> &str {
        "in_turn"
    }
    fn task(&self) -> RewardTask {
        self.task
    }
    fn score(&self, _: &RewardContext, samples: &[Scored]) -> Result<Vec<f32>, RlError> {
        Ok((0..samples.len()).map(|i| self.scores[i % 2]).collect())
    }
}

/// One GRPO step over one item with both tasks, G = 2: understanding
/// rewards [0, 1], generation rewards [1, 0].
fn step(lambda: Option<f64>) -> StepMetrics {
    let mut bundle = ModelBundle::demo(DEFAULT_SEED, DType::F32, &Device::Cpu).unwrap();
    let lora = attach(&mut bundle.model, &LoraConfig::default(), 1).unwrap();
    let defaults = TrainerConfig::default();
    let config = TrainerConfig {
        group_size: 2,
        max_new_tokens: 2,
        unified_lambda: lambda.unwrap_or(defaults.unified_lambda),
        ..defaults
    };
    let rewards = vec![
        Weighted {
            reward: Box::new(InTurn {
                task: RewardTask::Understanding,
                scores: [0.0, 1.0],
            }),
            weight: 1.0,
        },
        Weighted {
            reward: Box::new(InTurn {
                task: RewardTask::Generation,
                scores: [1.0, 0.0],
            }),
            weight: 1.0,
        },
    ];
    let mut trainer = Trainer::new(bundle, Adaptation::Lora(lora), config, rewards).unwrap();
    let item = TrainItem {
        qa: Some(QaItem {
            image: image::RgbImage::from_pixel(32, 32, image::Rgb([200, 20, 20])),
            question: "What colour is it?".into(),
            solution: "red".into(),
            qa_type: QaType::OpenEnded,
        }),
        caption: Some("a red square".into()),
    };
    trainer.step(&[item]).unwrap()
}

#[test]
fn both_tasks_share_the_advantage_of_the_weighted_sum() {
    assert_eq!(TrainerConfig::default().unified_lambda, 0.8);
    // 0.8: unified rewards [1, 0.8], advantages ±0.1 / (0.1414 + 1e-4).
    let weighted = step(None);
    let expected = 0.1 / (0.02f64.sqrt() + 1e-4);
    assert!(
        (weighted.advantage_abs_mean - expected).abs() < 1e-4,
        "{weighted:?}"
    );
    assert_eq!(weighted.zero_variance_groups, 0);
    // With weight 1 the two tasks cancel: [1, 1], no advantage in either group.
    let even = step(Some(1.0));
    assert_eq!(even.advantage_abs_mean, 0.0, "{even:?}");
    assert_eq!(even.zero_variance_groups, 2);
}
