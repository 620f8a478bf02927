//! Stage one: the VQ tokenizer's losses reach every parameter, training
//! lowers them, deterministically, and dead codes are restarted.

mod common;

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use common::assert_every_gradient;
use ulm_model::demo::{demo_config_json, SeededBackend};
use ulm_model::JanusConfig;
use ulm_pretrain::data::{pixel_weights, pixels, train_examples};
use ulm_pretrain::vq::{train_vq, vq_losses, VqStep, VqTraining};
use ulm_rl::policy::{build_trainable, TrainableModel};

fn trainable_vq(seed: u64) -> TrainableModel {
    let cfg = JanusConfig::from_value(demo_config_json()).unwrap();
    let vb = VarBuilder::from_backend(Box::new(SeededBackend::new(seed)), DType::F32, Device::Cpu);
    build_trainable(&cfg, vb, |n| n.starts_with("gen_vision_model.")).unwrap()
}

#[test]
fn every_vq_parameter_gets_a_gradient() {
    let m = trainable_vq(1);
    let images: Vec<_> = train_examples(0, 0, 2)
        .iter()
        .map(|e| e.image(64))
        .collect();
    let dev = &Device::Cpu;
    let weights = pixel_weights(&images, 10.0, 30.0, dev).unwrap();
    let losses = vq_losses(
        &m.model.gen_vision,
        &pixels(&images, dev).unwrap(),
        &weights,
        0.25,
        true,
    )
    .unwrap();
    let grads = losses.total.backward().unwrap();
    assert!(m.params.len() > 50, "{} parameters", m.params.len());
    assert_every_gradient(&grads, &m.params);
    // The straight-through estimator: the decoder reads the codes' values,
    // the encoder gets the reconstruction's gradient as if it had not been
    // quantised, and the codebook its own loss's.
    assert!(losses.reconstruction > 0.0 && losses.codebook > 0.0);
    assert!((losses.codebook - losses.commitment).abs() < 1e-9);
    assert_eq!(losses.codes.len(), 2 * 64);
}

fn run(steps: usize, restart_every: usize) -> Vec<VqStep> {
    run_with(VqTraining {
        steps,
        batch: 4,
        warmup: 1,
        restart_every,
        ..VqTraining::default()
    })
}

fn run_with(cfg: VqTraining) -> Vec<VqStep> {
    let m = trainable_vq(2);
    let mut log = Vec::new();
    train_vq(&m.model.gen_vision, &m.params, &cfg, |s| {
        log.push(s.clone())
    })
    .unwrap();
    log
}

#[test]
fn training_lowers_the_reconstruction_loss_deterministically() {
    let log = run(8, 0);
    let first = log[0].reconstruction;
    let last = log.last().unwrap().reconstruction;
    assert!(last < 0.5 * first, "{first} -> {last}");
    assert!(log.iter().all(|s| s.codes_restarted == 0));
    let again = run(3, 0);
    for (a, b) in log.iter().zip(&again) {
        assert_eq!(a.loss, b.loss, "step {}", a.step);
    }
}

#[test]
fn dead_codes_move_onto_latents() {
    let log = run(3, 2);
    // 512 codes, 4 x 64 latents: most codes are unused by step 2, and one
    // moves onto each latent.
    assert_eq!(log[1].codes_restarted, 256, "{:?}", log[1]);
    assert_eq!(log[2].codes_restarted, 0);
    assert!(log.iter().all(|s| s.loss.is_finite()));
}

#[test]
fn a_continuous_start_trains_the_autoencoder_then_seeds_every_code() {
    let log = run_with(VqTraining {
        steps: 4,
        batch: 4,
        warmup: 1,
        restart_every: 0,
        continuous_steps: 2,
        ..VqTraining::default()
    });
    // Unquantised, the loss is the reconstruction alone.
    assert_eq!(log[0].loss, log[0].reconstruction);
    assert_eq!(log[1].codes_restarted, 256, "{:?}", log[1]);
    assert!(log[2].loss > log[2].reconstruction);
    assert!(log.iter().all(|s| s.codes_restarted == 0 || s.step == 1));
}
