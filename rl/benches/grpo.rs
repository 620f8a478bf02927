//! One CoRL GRPO step (rollout, reward, forward/backward, update) on the
//! demo model and a larger config, with the time split by phase. Prints a
//! Markdown table. `cargo bench -p ulm-server --bench grpo [-- --quick]`

use candle_core::{DType, Device};
use ulm_model::bundle::ModelBundle;
use ulm_model::demo::{build_random, demo_config_json, demo_tokenizer};
use ulm_model::image_processor::ImageProcessorConfig;
use ulm_model::processor::Processor;
use ulm_rl::lora::{attach, LoraConfig};
use ulm_rl::reward::verifiable::QaType;
use ulm_rl::reward::{QaItem, T2iMatch, TrainItem, Weighted, FORMAT, QA_ACCURACY};
use ulm_rl::trainer::{Adaptation, StepMetrics, Trainer, TrainerConfig};

/// LLaMA 512 x 8 layers (GQA 8/4), vocab 8192; the demo's vision and VQ sizes.
fn larger_config() -> serde_json::Value {
    let mut c = demo_config_json();
    let lm = &mut c["language_config"];
    lm["vocab_size"] = 8192.into();
    lm["hidden_size"] = 512.into();
    lm["intermediate_size"] = 1408.into();
    lm["num_hidden_layers"] = 8.into();
    lm["num_attention_heads"] = 8.into();
    lm["num_key_value_heads"] = 4.into();
    lm["head_dim"] = 64.into();
    c["aligner_config"]["params"]["n_embed"] = 512.into();
    c["gen_aligner_config"]["params"]["n_embed"] = 512.into();
    c["gen_head_config"]["params"]["n_embed"] = 512.into();
    c["gen_head_config"]["params"]["image_token_embed"] = 512.into();
    c
}

fn items() -> Vec<TrainItem> {
    (0..2u8)
        .map(|i| TrainItem {
            qa: Some(QaItem {
                image: image::RgbImage::from_fn(64, 48, |x, y| {
                    image::Rgb([(x * 3) as u8 ^ i, (y * 5) as u8, 60])
                }),
                question: "What colour is the square?\nA. red\nB. blue".into(),
                solution: "A".into(),
                qa_type: QaType::MultipleChoice,
            }),
            caption: Some("a red square next to a blue circle".into()),
        })
        .collect()
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let steps = if quick { 1 } else { 3 };
    println!("| model | params (LM) | adaptation | rollout s | reward s | forward/backward s | update s | step s | tokens/s |");
    println!("|---|---:|---|---:|---:|---:|---:|---:|---:|");
    for (name, config) in [("demo", demo_config_json()), ("larger", larger_config())] {
        for lora in [true, false] {
            let (model, _) = build_random(config.clone(), 3, DType::F32, &Device::Cpu).unwrap();
            let lm_params: usize = {
                let c = &model.cfg.language;
                c.vocab_size * c.hidden_size * 2
                    + c.num_hidden_layers
                        * (c.hidden_size
                            * c.head_dim
                            * (c.num_attention_heads * 2 + c.num_key_value_heads * 2)
                            + 3 * c.hidden_size * c.intermediate_size)
            };
            let processor = Processor::new(
                demo_tokenizer().unwrap(),
                true,
                model.cfg.vision.num_patches(),
            )
            .unwrap();
            let image_processor = ImageProcessorConfig::janus_default(model.cfg.vision.image_size);
            let mut bundle = ModelBundle {
                model,
                processor,
                image_processor,
                sampling: Default::default(),
                source: ulm_model::bundle::ModelSource::Demo { seed: 3 },
            };
            let adaptation = if lora {
                Adaptation::Lora(attach(&mut bundle.model, &LoraConfig::default(), 1).unwrap())
            } else {
                let (reference, _) =
                    build_random(config.clone(), 3, DType::F32, &Device::Cpu).unwrap();
                let cfg = bundle.model.cfg.clone();
                let vb = candle_nn::VarBuilder::from_backend(
                    Box::new(ulm_model::demo::SeededBackend::new(3)),
                    DType::F32,
                    Device::Cpu,
                );
                let trainable =
                    ulm_rl::policy::build_trainable(&cfg, vb, ulm_rl::policy::is_language_model)
                        .unwrap();
                bundle.model = trainable.model;
                Adaptation::Full {
                    params: trainable.params,
                    reference: Box::new(reference),
                }
            };
            let rewards = vec![
                Weighted {
                    reward: Box::new(FORMAT),
                    weight: 0.5,
                },
                Weighted {
                    reward: Box::new(QA_ACCURACY),
                    weight: 1.0,
                },
                Weighted {
                    reward: Box::new(T2iMatch),
                    weight: 1.0,
                },
            ];
            let config = TrainerConfig {
                group_size: 8,
                max_new_tokens: 16,
                lr: 1e-4,
                ..TrainerConfig::default()
            };
            let mut trainer = Trainer::new(bundle, adaptation, config, rewards).unwrap();
            let items = items();
            trainer.step(&items).unwrap();
            let runs: Vec<StepMetrics> =
                (0..steps).map(|_| trainer.step(&items).unwrap()).collect();
            let avg =
                |f: fn(&StepMetrics) -> f64| runs.iter().map(f).sum::<f64>() / runs.len() as f64;
            let total = avg(|m| m.rollout_s + m.reward_s + m.train_s + m.update_s);
            println!(
                "| {name} | {:.1} M | {} | {:.2} | {:.2} | {:.2} | {:.3} | {:.2} | {:.0} |",
                lm_params as f64 / 1e6,
                if lora { "LoRA r16" } else { "full" },
                avg(|m| m.rollout_s),
                avg(|m| m.reward_s),
                avg(|m| m.train_s),
                avg(|m| m.update_s),
                total,
                avg(|m| m.tokens_per_s),
            );
        }
    }
    println!("\n2 unified items per step (QA + caption), G = 8, 16 answer tokens, 64 image tokens; mean of {steps} steps after one warm-up step.");
}
