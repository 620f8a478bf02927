//! GRPO on groups the server served: the training forward scores stored
//! samples exactly as the sampler did (so the importance ratio starts at 1),
//! a step on them moves the adapters, and the off-policy evaluation agrees
//! with the plain mean for the policy that sampled them (images weighed
//! under the guided distribution they were drawn from).

use candle_core::{DType, Device};
use ulm_model::bundle::ModelBundle;
use ulm_model::decode::TextPrompt;
use ulm_model::demo::DEFAULT_SEED;
use ulm_model::generate::{answer_batch, generate_images_batch, AnswerItem, ImageItem};
use ulm_model::sampling::SamplingParams;
use ulm_model::weights::WEIGHTS_FILE;
use ulm_rl::checkpoint;
use ulm_rl::evaluate::evaluate;
use ulm_rl::lora::{attach, load_for_inference, LoraConfig, ADAPTER_FILE};
use ulm_rl::policy::load_trainable;
use ulm_rl::reward::verifiable::QaType;
use ulm_rl::reward::{QaItem, RewardTask, TrainItem};
use ulm_rl::trainer::{Adaptation, ServedGroup, ServedSample, Trainer, TrainerConfig};

const SAMPLING: SamplingParams = SamplingParams {
    temperature: 1.0,
    top_k: None,
    top_p: None,
};

const CFG_WEIGHT: f32 = 5.0;

fn picture(k: u8) -> image::RgbImage {
    image::RgbImage::from_fn(40, 28, |x, y| {
        image::Rgb([(x * 7) as u8 ^ k, (y * 3) as u8, 60])
    })
}

/// Served groups as the engine produces them: answers and images of the
/// demo model with their behaviour log-probs, scored by `score`.
fn served_groups(bundle: &ModelBundle, score: fn(usize, &[u32]) -> f32) -> Vec<ServedGroup> {
    let b = bundle;
    let s = b.processor.special;
    let mut groups = Vec::new();
    for k in 0..2u8 {
        let question = format!("What is in picture {k}?");
        let pixels = b
            .image_processor
            .preprocess(&picture(k), b.model.device())
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let item = AnswerItem {
            prompt: TextPrompt {
                prompt: b.processor.understanding_prompt(&question).unwrap(),
                pixels: Some(pixels),
                samples: 4,
            },
            max_new_tokens: 5,
            sampling: SAMPLING,
            seeds: (0..4).map(|i| 10 * k as u64 + i).collect(),
        };
        let out = answer_batch(&b.model, &[item], s.eos, s.pad, &mut |_| true).unwrap();
        groups.push(ServedGroup {
            item: TrainItem {
                qa: Some(QaItem {
                    image: picture(k),
                    question,
                    solution: String::new(),
                    qa_type: QaType::OpenEnded,
                }),
                caption: None,
            },
            task: RewardTask::Understanding,
            guidance: None,
            samples: out[0]
                .iter()
                .enumerate()
                .map(|(i, t)| ServedSample {
                    score: score(i, &t.token_ids),
                    tokens: t.token_ids.clone(),
                    logprobs: t.logprobs.clone(),
                    guided_logprobs: Vec::new(),
                })
                .collect(),
        });
    }
    let caption = "a small red square";
    let item = ImageItem {
        prompt: b.processor.generation_prompt(caption).unwrap(),
        cfg_weight: CFG_WEIGHT,
        sampling: SAMPLING,
        seeds: vec![1, 2, 3],
    };
    let out = generate_images_batch(&b.model, &[item], s.pad, &mut |_| true).unwrap();
    groups.push(ServedGroup {
        item: TrainItem {
            qa: None,
            caption: Some(caption.into()),
        },
        task: RewardTask::Generation,
        guidance: Some(CFG_WEIGHT),
        samples: out[0]
            .iter()
            .enumerate()
            .map(|(i, img)| {
                let img = img.as_ref().unwrap();
                ServedSample {
                    score: score(i, &img.tokens),
                    tokens: img.tokens.clone(),
                    logprobs: img.logprobs.clone(),
                    guided_logprobs: img.guided_logprobs.clone(),
                }
            })
            .collect(),
    });
    groups
}

fn trainer(bundle: ModelBundle) -> Trainer {
    let mut bundle = bundle;
    let lora = attach(
        &mut bundle.model,
        &LoraConfig {
            rank: 4,
            alpha: 8.0,
            ..LoraConfig::default()
        },
        3,
    )
    .unwrap();
    let config = TrainerConfig {
        lr: 1e-2,
        beta: 0.04,
        micro_batch_rows: 3,
        ..TrainerConfig::default()
    };
    Trainer::new(bundle, Adaptation::Lora(lora), config, Vec::new()).unwrap()
}

#[test]
fn served_samples_are_scored_as_sampled_and_train() {
    let bundle = ModelBundle::demo(DEFAULT_SEED, DType::F32, &Device::Cpu).unwrap();
    let base = bundle.model.clone();
    let groups = served_groups(&bundle, |i, _| i as f32 / 4.0);
    let mut t = trainer(bundle);

    // The training forward reproduces the behaviour log-probs of every
    // sample (answers through their EOS; image tokens at the predicting
    // position, conditional rows, no CFG).
    let served = t.prepare_served(&groups).unwrap();
    let logps = t.served_logps(&t.bundle.model, &served).unwrap();
    let stored: Vec<&Vec<f32>> = groups
        .iter()
        .flat_map(|g| g.samples.iter().map(|s| &s.logprobs))
        .collect();
    assert_eq!(logps.len(), stored.len());
    for (ours, theirs) in logps.iter().zip(&stored) {
        assert_eq!(ours.len(), theirs.len());
        for (a, b) in ours.iter().zip(theirs.iter()) {
            assert!((a - b).abs() < 1e-4, "{a} vs {b}");
        }
    }

    // Under the distributions the samples were drawn from, the images'
    // guided ones, the forward reproduces what the sampler recorded; the
    // guided log-probs of the images are not their conditional ones.
    let sampling = t.served_sampling_logps(&t.bundle.model, &served).unwrap();
    assert_eq!(sampling.conditional, logps);
    let sampling = sampling.sampling;
    let drawn = drawn_logprobs(&groups);
    assert_eq!(sampling.len(), drawn.len());
    for (ours, theirs) in sampling.iter().zip(&drawn) {
        assert_eq!(ours.len(), theirs.len());
        for (a, b) in ours.iter().zip(theirs.iter()) {
            assert!((a - b).abs() < 1e-4, "{a} vs {b}");
        }
    }
    let image = &groups[2].samples[0];
    let apart = image
        .logprobs
        .iter()
        .zip(&image.guided_logprobs)
        .map(|(c, g)| (c - g).abs())
        .fold(0f32, f32::max);
    assert!(apart > 0.01, "guidance changed no log-prob ({apart})");

    // Before training, candidate = active = base: same estimate, zero KL,
    // and the importance weights are 1, so the estimate is the plain mean
    // and worth every sample.
    let before = evaluate(&t, &base, &groups).unwrap();
    assert_eq!(before.samples, 11);
    for score in [before.candidate, before.active] {
        assert!((score.effective_samples - 11.0).abs() < 1e-3, "{before:?}");
        assert!((score.effective_share - 1.0).abs() < 1e-3, "{before:?}");
    }
    let group_means = groups
        .iter()
        .map(|g| g.samples.iter().map(|s| s.score as f64).sum::<f64>() / g.samples.len() as f64)
        .sum::<f64>()
        / groups.len() as f64;
    assert!(
        (before.candidate.reward - group_means).abs() < 1e-3,
        "{before:?} vs {group_means}"
    );
    assert!((before.active.reward - before.candidate.reward).abs() < 1e-9);
    assert!(before.candidate.kl_to_base.abs() < 1e-6);

    let m = t.step_served(&groups).unwrap();
    assert!(m.applied, "{m:?}");
    assert_eq!(m.zero_variance_groups, 0);
    assert!(m.grad_norm > 0.0);
    let after = evaluate(&t, &base, &groups).unwrap();
    assert!(after.candidate.kl_to_base > 0.0);
    // The candidate's weights are no longer equal; the active version's are.
    assert!(
        after.candidate.effective_samples < 11.0 - 1e-3 && after.candidate.effective_samples >= 3.0,
        "{after:?}"
    );
    assert!((after.active.effective_samples - 11.0).abs() < 1e-3);
    assert!(after.candidate.effective_share < 1.0 - 1e-3, "{after:?}");
    // Trained on these very groups, the candidate favours their high scores.
    assert!(
        after.candidate.reward > before.candidate.reward,
        "{after:?}"
    );
}

/// The log-probs of the distribution each sample was drawn from, as the
/// sampler recorded them: conditional for answers, guided for images.
fn drawn_logprobs(groups: &[ServedGroup]) -> Vec<&Vec<f32>> {
    groups
        .iter()
        .flat_map(|g| {
            g.samples.iter().map(move |s| match g.guidance {
                Some(_) => &s.guided_logprobs,
                None => &s.logprobs,
            })
        })
        .collect()
}

/// A trained candidate, served as the server serves a version (adapters
/// loaded for inference), draws samples whose log-probs the trainer's
/// forward reproduces: the gate's weights are right for any candidate, not
/// only for the base. On its own samples every weight is equal.
#[test]
fn a_trained_candidate_scores_its_own_samples_as_it_drew_them() {
    let bundle = ModelBundle::demo(DEFAULT_SEED, DType::F32, &Device::Cpu).unwrap();
    let base = bundle.clone();
    let groups = served_groups(&bundle, |i, _| i as f32 / 4.0);
    let mut t = trainer(bundle);
    for _ in 0..2 {
        assert!(t.step_served(&groups).unwrap().applied);
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("candidate");
    checkpoint::save(&t, &path, None, &[]).unwrap();
    let mut served = base.clone();
    load_for_inference(&mut served.model, &path, &Device::Cpu).unwrap();
    let own = served_groups(&served, |i, _| i as f32 / 4.0);

    let prepared = t.prepare_served(&own).unwrap();
    let sampling = t
        .served_sampling_logps(&t.bundle.model, &prepared)
        .unwrap()
        .sampling;
    let drawn = drawn_logprobs(&own);
    assert_eq!(sampling.len(), drawn.len());
    for (ours, theirs) in sampling.iter().zip(&drawn) {
        assert_eq!(ours.len(), theirs.len());
        for (a, b) in ours.iter().zip(theirs.iter()) {
            assert!((a - b).abs() < 1e-4, "{a} vs {b}");
        }
    }
    let evaluation = evaluate(&t, &base.model, &own).unwrap();
    assert!(
        (evaluation.candidate.effective_samples - 11.0).abs() < 1e-3,
        "{evaluation:?}"
    );
    assert!(
        evaluation.active.effective_samples < 11.0 - 1e-3,
        "{evaluation:?}"
    );
}

#[test]
fn served_groups_with_equal_scores_carry_no_gradient() {
    let bundle = ModelBundle::demo(DEFAULT_SEED, DType::F32, &Device::Cpu).unwrap();
    let groups = served_groups(&bundle, |_, _| 0.5);
    let mut t = trainer(bundle);
    let m = t.step_served(&groups).unwrap();
    assert_eq!(m.zero_variance_groups, 3);
    assert_eq!(m.advantage_abs_mean, 0.0);
}

#[test]
fn malformed_served_groups_are_errors_not_panics() {
    let bundle = ModelBundle::demo(DEFAULT_SEED, DType::F32, &Device::Cpu).unwrap();
    let mut groups = served_groups(&bundle, |i, _| i as f32);
    let mut t = trainer(bundle);
    let mut single = groups[0].clone();
    single.samples.truncate(1);
    assert!(t.step_served(&[single]).is_err());
    let mut ragged = groups[0].clone();
    ragged.samples[0].logprobs.pop();
    assert!(t.step_served(&[ragged]).is_err());
    // An image drawn with guidance cannot be weighed without its guided
    // log-probs.
    let mut unweighable = groups[2].clone();
    unweighable.samples[1].guided_logprobs.clear();
    let base = t.bundle.model.clone();
    assert!(evaluate(&t, &base, &[unweighable]).is_err());
    groups[2].item.caption = None;
    assert!(t.step_served(&groups[2..]).is_err());
}

#[test]
fn an_abandoned_later_iteration_takes_the_earlier_updates_back() {
    let bundle = ModelBundle::demo(DEFAULT_SEED, DType::F32, &Device::Cpu).unwrap();
    let groups = served_groups(&bundle, |i, _| i as f32 / 4.0);
    let mut t = trainer(bundle);
    // The first update is finite; at this rate it throws the adapters so far
    // that the second iteration's forward overflows.
    t.config.num_iterations = 2;
    t.config.max_grad_norm = None;
    t.config.lr = 1e35;
    t.optimizer.lr = t.config.lr;
    let values = |t: &Trainer| -> Vec<Vec<f32>> {
        t.adaptation
            .params()
            .iter()
            .map(|(_, v)| v.as_tensor().flatten_all().unwrap().to_vec1().unwrap())
            .collect()
    };
    let before = values(&t);
    let m = t.step_served(&groups).unwrap();
    assert!(!m.applied, "{m:?}");
    assert_eq!(values(&t), before, "the step left no update behind");
    assert_eq!(t.optimizer.step, 0);
}

/// Every trained tensor of the checkpoint `t` writes, flattened in f32, by name.
fn trained_values(
    t: &Trainer,
    frozen: &[(String, candle_core::Tensor)],
) -> Vec<(String, Vec<f32>)> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("checkpoint");
    checkpoint::save(t, &path, None, frozen).unwrap();
    let file = match t.adaptation {
        Adaptation::Lora(_) => path.join(ADAPTER_FILE),
        Adaptation::Full { .. } => path.join(WEIGHTS_FILE),
    };
    let saved = candle_core::safetensors::load(file, &Device::Cpu).unwrap();
    t.adaptation
        .params()
        .iter()
        .map(|(name, _)| {
            let values = saved[name]
                .to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            (name.clone(), values)
        })
        .collect()
}

/// Trained values by name, before and after a run.
type Values = Vec<(String, Vec<f32>)>;

/// How far the half-precision run's updates are from the f32 run's, relative
/// to the f32 updates' size: `|d16 - d32| / |d32|` over all trained values.
fn update_error(f32_run: &(Values, Values), f16_run: &(Values, Values)) -> f64 {
    let (mut diff, mut norm) = (0f64, 0f64);
    let pairs = |(init, after): &(Values, Values)| {
        init.iter()
            .zip(after)
            .map(|((name, i), (_, a))| (name.clone(), i.clone(), a.clone()))
            .collect::<Vec<_>>()
    };
    for ((name, i32_, a32), (_, i16_, a16)) in pairs(f32_run).into_iter().zip(pairs(f16_run)) {
        assert_eq!(a32.len(), a16.len(), "{name}");
        for k in 0..a32.len() {
            let d32 = (a32[k] - i32_[k]) as f64;
            let d16 = (a16[k] - i16_[k]) as f64;
            diff += (d16 - d32).powi(2);
            norm += d32 * d32;
        }
    }
    assert!(norm > 0.0, "the f32 run moved nothing");
    (diff / norm).sqrt()
}

const STEPS: usize = 3;

/// LoRA at the default learning rate in f16 (which candle computes on the
/// CPU) moves the adapters as in f32. Before the optimizer kept f32 master
/// copies, the f16 run's adapters came out NaN (eps = 1e-8 is 0 in f16).
#[test]
fn half_precision_lora_updates_match_f32() {
    let reference = ModelBundle::demo(DEFAULT_SEED, DType::F32, &Device::Cpu).unwrap();
    let groups = served_groups(&reference, |i, _| i as f32 / 4.0);
    let run = |dtype: DType| {
        let mut t = trainer(ModelBundle::demo(DEFAULT_SEED, dtype, &Device::Cpu).unwrap());
        t.config.lr = TrainerConfig::default().lr;
        let init = trained_values(&t, &[]);
        for _ in 0..STEPS {
            assert!(t.step_served(&groups).unwrap().applied);
        }
        (init, trained_values(&t, &[]))
    };
    let error = update_error(&run(DType::F32), &run(DType::F16));
    eprintln!("f16 LoRA updates differ from f32 by {error:.4} of their size");
    assert!(
        error < 0.1,
        "f16 updates differ from f32 by {error:.3} of their size"
    );
}

/// Full fine-tuning at the default learning rate: a 4e-6 step is below half
/// the f16 spacing of most weights, so without master copies the weights
/// never moved.
#[test]
fn half_precision_full_fine_tuning_updates_match_f32() {
    let groups = served_groups(
        &ModelBundle::demo(DEFAULT_SEED, DType::F32, &Device::Cpu).unwrap(),
        |i, _| i as f32 / 4.0,
    );
    let run = |dtype: DType| {
        let mut bundle = ModelBundle::demo(DEFAULT_SEED, dtype, &Device::Cpu).unwrap();
        let trainable =
            load_trainable(&bundle.source, &bundle.model.cfg, dtype, &Device::Cpu).unwrap();
        let reference = std::mem::replace(&mut bundle.model, trainable.model);
        let adaptation = Adaptation::Full {
            params: trainable.params,
            reference: Box::new(reference),
        };
        let config = TrainerConfig {
            beta: 0.04,
            micro_batch_rows: 3,
            ..TrainerConfig::default()
        };
        let mut t = Trainer::new(bundle, adaptation, config, Vec::new()).unwrap();
        let init = trained_values(&t, &trainable.frozen);
        for _ in 0..STEPS {
            assert!(t.step_served(&groups).unwrap().applied);
        }
        (init, trained_values(&t, &trainable.frozen))
    };
    let error = update_error(&run(DType::F32), &run(DType::F16));
    eprintln!("f16 full fine-tuning updates differ from f32 by {error:.4} of their size");
    assert!(
        error < 0.1,
        "f16 updates differ from f32 by {error:.3} of their size"
    );
}
