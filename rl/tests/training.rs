//! The training forward is differentiable where it must be: gradients reach
//! every trainable parameter (full fine-tuning and LoRA) and agree with
//! finite differences; LoRA starts as the identity and switches off cleanly.

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;
use ulm_model::demo::{demo_config_json, SeededBackend};
use ulm_model::ops::Pass;
use ulm_model::{Janus, JanusConfig};
use ulm_rl::grpo::{
    generation_logps, generation_states, objective, understanding_logps, understanding_states,
    GenerationBatch, ObjectiveConfig, ScoringStates, T2iAlignment, UnderstandingBatch,
};
use ulm_rl::lora::{attach, LoraConfig};
use ulm_rl::policy::{build_trainable, is_language_model, TrainableModel};

/// The demo architecture, shrunk.
fn tiny_config() -> JanusConfig {
    let mut raw = demo_config_json();
    raw["language_config"]["num_hidden_layers"] = 2.into();
    raw["language_config"]["hidden_size"] = 64.into();
    raw["language_config"]["head_dim"] = 16.into();
    raw["language_config"]["intermediate_size"] = 96.into();
    raw["aligner_config"]["params"]["n_embed"] = 64.into();
    raw["gen_aligner_config"]["params"]["n_embed"] = 64.into();
    raw["gen_head_config"]["params"]["n_embed"] = 64.into();
    raw["gen_head_config"]["params"]["image_token_embed"] = 64.into();
    JanusConfig::from_value(raw).unwrap()
}

/// The shrunk demo in the given dtype, with the LM trainable.
fn tiny(dtype: DType) -> TrainableModel {
    let vb = VarBuilder::from_backend(Box::new(SeededBackend::new(5)), dtype, Device::Cpu);
    build_trainable(&tiny_config(), vb, is_language_model).unwrap()
}

/// The same weights as plain tensors: nothing in it is trainable.
fn plain(dtype: DType) -> Janus {
    let vb = VarBuilder::from_backend(Box::new(SeededBackend::new(5)), dtype, Device::Cpu);
    Janus::new(&tiny_config(), vb).unwrap()
}

fn frozen(dtype: DType) -> Janus {
    let t = tiny(dtype);
    t.model
}

struct Batch {
    und_ids: Tensor,
    und_mask: Vec<Vec<bool>>,
    images_seq: Vec<Vec<bool>>,
    pixels: Tensor,
    completion_mask: Tensor,
    gen_prompt: Tensor,
    gen_prompt_mask: Vec<Vec<bool>>,
    gen_completion: Tensor,
    gen_mask: Tensor,
    advantages: Tensor,
}

/// Two understanding rows (one left-padded, one ended early) and two image rows.
fn batch(model: &Janus, dtype: DType) -> Batch {
    let n = model.cfg.vision.num_patches();
    let dev = Device::Cpu;
    let l = 5;
    // Row 0: full prompt. Row 1: two pad positions and a shorter prompt.
    let image = std::iter::repeat_n(259u32, n);
    let prompts: [Vec<u32>; 2] = [
        [
            vec![256, 266, 58, 32, 268],
            image.clone().collect(),
            vec![269, 72, 105, 63, 267, 58],
        ]
        .concat(),
        [
            vec![258, 258, 256, 266, 58, 32, 268],
            image.collect(),
            vec![269, 72, 267, 58],
        ]
        .concat(),
    ];
    let mut ids = Vec::new();
    let mut mask = Vec::new();
    let mut seq = Vec::new();
    for (row, prompt) in prompts.iter().enumerate() {
        let pad = if row == 0 { 0 } else { 2 };
        ids.extend(prompt);
        ids.extend((0..l as u32).map(|i| 65 + (i * 7 + row as u32 * 3) % 26));
        // Row 1 ends after 3 completion tokens: later keys are masked.
        let mut m: Vec<bool> = (0..prompt.len()).map(|i| i >= pad).collect();
        m.extend((0..l).map(|i| row == 0 || i < 3));
        mask.push(m);
        let mut sm: Vec<bool> = prompt.iter().map(|&id| id == 259).collect();
        sm.extend([false; 5]);
        seq.push(sm);
    }
    let t = mask[0].len();
    let side = model.cfg.vision.image_size;
    let pixels: Vec<f32> = (0..2 * 3 * side * side)
        .map(|i| ((i % 17) as f32 / 8.0) - 1.0)
        .collect();
    let m = model.cfg.gen_vision.image_tokens();
    let gen: Vec<u32> = (0..2 * m as u32).map(|i| (i * 13 + 5) % 512).collect();
    Batch {
        und_ids: Tensor::from_vec(ids, (2, t), &dev).unwrap(),
        und_mask: mask,
        images_seq: seq,
        pixels: Tensor::from_vec(pixels, (2, 3, side, side), &dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap(),
        completion_mask: Tensor::new(&[[1f32, 1., 1., 1., 1.], [1., 1., 1., 0., 0.]], &dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap(),
        gen_prompt: Tensor::new(
            &[
                [256u32, 266, 58, 32, 65, 267, 58, 268],
                [258, 258, 256, 266, 66, 267, 58, 268],
            ],
            &dev,
        )
        .unwrap(),
        gen_prompt_mask: vec![vec![true; 8], [vec![false; 2], vec![true; 6]].concat()],
        gen_completion: Tensor::from_vec(gen, (2, m), &dev).unwrap(),
        gen_mask: Tensor::ones((2, m), dtype, &dev).unwrap(),
        advantages: Tensor::new(&[0.7f32, -0.7], &dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap(),
    }
}

impl Batch {
    /// The understanding and generation views of the batch for `model`.
    fn views<'a>(
        &'a self,
        image_embeds: &'a Tensor,
    ) -> (UnderstandingBatch<'a>, GenerationBatch<'a>) {
        let und = UnderstandingBatch {
            ids: &self.und_ids,
            attention_mask: &self.und_mask,
            images_seq_mask: &self.images_seq,
            image_embeds: Some(image_embeds),
            completion_len: 5,
        };
        let gen = GenerationBatch {
            prompt_ids: &self.gen_prompt,
            prompt_mask: &self.gen_prompt_mask,
            completion: &self.gen_completion,
        };
        (und, gen)
    }
}

/// The CoRL loss (understanding + generation) of `model` on the batch, with
/// fixed old log-probs and a reference for the KL term.
fn loss(model: &Janus, reference: &Janus, b: &Batch, old: &(Tensor, Tensor)) -> Tensor {
    let img = model.image_embeds(&b.pixels, Pass::Training).unwrap();
    let (und, gen) = b.views(&img);
    let mm2t = understanding_logps(model, &und, 0.9, Pass::Training).unwrap();
    let t2i = generation_logps(model, &gen, 0.9, T2iAlignment::Predicting, Pass::Training).unwrap();
    let ref_img = reference.image_embeds(&b.pixels, Pass::Training).unwrap();
    let ref_und = UnderstandingBatch {
        image_embeds: Some(&ref_img),
        ..und
    };
    let r_mm2t = understanding_logps(reference, &ref_und, 0.9, Pass::Training).unwrap();
    let r_t2i = generation_logps(
        reference,
        &gen,
        0.9,
        T2iAlignment::Predicting,
        Pass::Training,
    )
    .unwrap();
    let cfg = ObjectiveConfig {
        beta: 0.04,
        epsilon_low: 0.2,
        epsilon_high: 0.28,
    };
    let a = objective(
        &mm2t,
        &old.0,
        Some(&r_mm2t),
        &b.advantages,
        &b.completion_mask,
        cfg,
    )
    .unwrap();
    let g = objective(&t2i, &old.1, Some(&r_t2i), &b.advantages, &b.gen_mask, cfg).unwrap();
    (a.loss + g.loss).unwrap()
}

fn old_logps(model: &Janus, b: &Batch) -> (Tensor, Tensor) {
    let img = model.image_embeds(&b.pixels, Pass::Training).unwrap();
    let (und, gen) = b.views(&img);
    // Slightly off-policy, so the ratio is not exactly 1.
    let mm2t = (understanding_logps(model, &und, 0.9, Pass::Training).unwrap() + 0.05).unwrap();
    let t2i = (generation_logps(model, &gen, 0.9, T2iAlignment::Predicting, Pass::Training)
        .unwrap()
        - 0.03)
        .unwrap();
    (mm2t, t2i)
}

fn nonzero_everywhere(params: &[(String, Var)], grads: &candle_core::backprop::GradStore) {
    for (name, var) in params {
        let g = grads
            .get(var)
            .unwrap_or_else(|| panic!("no gradient reached {name}"));
        let norm = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(
            norm > 0.0 && norm.is_finite(),
            "{name}: gradient norm {norm}"
        );
    }
}

#[test]
fn full_fine_tuning_gradients_reach_every_language_model_parameter() {
    let policy = tiny(DType::F32);
    let reference = frozen(DType::F32);
    let b = batch(&policy.model, DType::F32);
    let old = old_logps(&policy.model, &b);
    let grads = loss(&policy.model, &reference, &b, &old)
        .backward()
        .unwrap();
    assert!(policy.params.len() > 10);
    nonzero_everywhere(&policy.params, &grads);
}

#[test]
fn lora_starts_as_the_identity_switches_off_and_gets_gradients() {
    let base = frozen(DType::F32);
    let mut adapted = frozen(DType::F32);
    let lora = attach(
        &mut adapted,
        &LoraConfig {
            rank: 4,
            alpha: 8.0,
            ..LoraConfig::default()
        },
        1,
    )
    .unwrap();
    let b = batch(&base, DType::F32);
    let old = old_logps(&base, &b);
    let l_base = loss(&base, &base, &b, &old).to_scalar::<f32>().unwrap();
    let l_adapted = loss(&adapted, &base, &b, &old).to_scalar::<f32>().unwrap();
    assert!(
        (l_base - l_adapted).abs() < 1e-6,
        "B = 0 must leave the model unchanged"
    );
    // Give B values so both A and B receive gradients, then check the switch.
    for (name, var) in &lora.params {
        if name.ends_with("lora_B.weight") {
            var.set(&(var.randn_like(0.0, 0.05).unwrap())).unwrap();
        }
    }
    let l_on = loss(&adapted, &base, &b, &old).to_scalar::<f32>().unwrap();
    assert!(
        (l_on - l_base).abs() > 1e-6,
        "trained adapters change the model"
    );
    lora.set_enabled(false);
    let l_off = loss(&adapted, &base, &b, &old).to_scalar::<f32>().unwrap();
    assert!(
        (l_off - l_base).abs() < 1e-6,
        "adapters off is the base model"
    );
    lora.set_enabled(true);
    // Reference = the same model with adapters off: no second copy of the weights.
    let grads = loss(&adapted, &adapted, &b, &old).backward().unwrap();
    assert_eq!(lora.params.len(), 2 * 7 * 2);
    nonzero_everywhere(&lora.params, &grads);
}

#[test]
fn gradients_agree_with_finite_differences() {
    let policy = tiny(DType::F64);
    let reference = frozen(DType::F64);
    let b = batch(&policy.model, DType::F64);
    let old = old_logps(&policy.model, &b);
    let grads = loss(&policy.model, &reference, &b, &old)
        .backward()
        .unwrap();
    let h = 1e-6;
    let mut checked = 0;
    let mut failures = Vec::new();
    for (name, var) in &policy.params {
        let grad = grads
            .get(var)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let values = var
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        // The entry with the largest gradient and one ordinary entry.
        let big = (0..grad.len())
            .max_by(|&a, &c| grad[a].abs().total_cmp(&grad[c].abs()))
            .unwrap();
        for idx in [big, grad.len() / 3] {
            let eval = |delta: f64| {
                let mut v = values.clone();
                v[idx] += delta;
                var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap())
                    .unwrap();
                loss(&policy.model, &reference, &b, &old)
                    .to_scalar::<f64>()
                    .unwrap()
            };
            let numeric = (eval(h) - eval(-h)) / (2.0 * h);
            eval(0.0);
            let analytic = grad[idx];
            let err = (numeric - analytic).abs() / analytic.abs().max(1e-6);
            if !(err < 1e-4 || (numeric - analytic).abs() < 1e-9) {
                failures.push(format!(
                    "{name}[{idx}]: analytic {analytic:e}, numeric {numeric:e}"
                ));
            }
            checked += 1;
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {checked} entries differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(checked >= 20);
}

/// The trainer's backward (log-prob values as a leaf, then the head chunk by
/// chunk, then the network) gives the gradient of the direct backward
/// through `[rows, length, vocab]` log-softmaxes.
#[test]
fn the_chunked_two_stage_backward_equals_the_direct_gradient() {
    let policy = tiny(DType::F64);
    let reference = frozen(DType::F64);
    let b = batch(&policy.model, DType::F64);
    let old = old_logps(&policy.model, &b);
    let direct = loss(&policy.model, &reference, &b, &old)
        .backward()
        .unwrap();

    let model = &policy.model;
    let img = model.image_embeds(&b.pixels, Pass::Training).unwrap();
    let (und, gen) = b.views(&img);
    let ref_img = reference.image_embeds(&b.pixels, Pass::Training).unwrap();
    let ref_und = UnderstandingBatch {
        image_embeds: Some(&ref_img),
        ..und
    };
    let align = T2iAlignment::Predicting;
    let cfg = ObjectiveConfig {
        beta: 0.04,
        epsilon_low: 0.2,
        epsilon_high: 0.28,
    };
    // Three positions per chunk: every row is cut across chunks.
    let chunked = |states: ScoringStates| ScoringStates {
        chunk_logits: 3 * model
            .cfg
            .language
            .vocab_size
            .max(model.cfg.gen_vision.codebook_size),
        ..states
    };
    let tasks = [
        (
            chunked(understanding_states(model, &und, 0.9, Pass::Training).unwrap()),
            understanding_logps(&reference, &ref_und, 0.9, Pass::Training).unwrap(),
            &old.0,
            &b.completion_mask,
        ),
        (
            chunked(generation_states(model, &gen, 0.9, align, Pass::Training).unwrap()),
            generation_logps(&reference, &gen, 0.9, align, Pass::Training).unwrap(),
            &old.1,
            &b.gen_mask,
        ),
    ];
    let mut total: Vec<Option<Tensor>> = vec![None; policy.params.len()];
    for (states, ref_logps, old, mask) in tasks {
        let logps = Var::from_tensor(&states.logp_values(model).unwrap()).unwrap();
        let o = objective(
            logps.as_tensor(),
            old,
            Some(&ref_logps),
            &b.advantages,
            mask,
            cfg,
        )
        .unwrap();
        let upstream = o.loss.backward().unwrap().get(&logps).unwrap().clone();
        for store in states.backward(model, &upstream, 1.0).unwrap() {
            for ((_, var), acc) in policy.params.iter().zip(total.iter_mut()) {
                if let Some(g) = store.get(var) {
                    *acc = Some(match acc.take() {
                        Some(a) => (a + g).unwrap(),
                        None => g.clone(),
                    });
                }
            }
        }
    }
    for ((name, var), ours) in policy.params.iter().zip(&total) {
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let want = flat(direct.get(var).unwrap());
        let got = flat(
            ours.as_ref()
                .unwrap_or_else(|| panic!("no gradient reached {name}")),
        );
        let scale = want.iter().map(|x| x.abs()).fold(0.0, f64::max).max(1e-30);
        for (w, g) in want.iter().zip(&got) {
            assert!((w - g).abs() <= 1e-9 * scale, "{name}: {g} vs {w}");
        }
    }
}

/// The adapters' gradients through frozen weights (whose matmul backward
/// skips the weight) are those of the plain matmul.
#[test]
fn adapter_gradients_through_frozen_weights_are_unchanged() {
    let adapt = |mut model: Janus| {
        let lora = attach(
            &mut model,
            &LoraConfig {
                rank: 4,
                alpha: 8.0,
                ..LoraConfig::default()
            },
            1,
        )
        .unwrap();
        for (name, var) in &lora.params {
            if name.ends_with("lora_B.weight") {
                let values = Tensor::rand(-0.05f64, 0.05, var.shape(), &Device::Cpu).unwrap();
                var.set(&(var.as_tensor().zeros_like().unwrap() + values.sin().unwrap()).unwrap())
                    .unwrap();
            }
        }
        (model, lora)
    };
    // Frozen-path model: plain weights. Plain-matmul model: the same weights as Vars.
    let (frozen, frozen_lora) = adapt(plain(DType::F64));
    let (tracked, tracked_lora) = adapt(tiny(DType::F64).model);
    for ((_, f), (_, t)) in frozen_lora.params.iter().zip(&tracked_lora.params) {
        f.set(t.as_tensor()).unwrap();
    }
    let b = batch(&frozen, DType::F64);
    let old = old_logps(&frozen, &b);
    let g_frozen = loss(&frozen, &frozen, &b, &old).backward().unwrap();
    let g_tracked = loss(&tracked, &tracked, &b, &old).backward().unwrap();
    for ((name, f), (_, t)) in frozen_lora.params.iter().zip(&tracked_lora.params) {
        let flat = |g: &Tensor| g.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let (a, want) = (
            flat(g_frozen.get(f).unwrap()),
            flat(g_tracked.get(t).unwrap()),
        );
        let scale = want.iter().map(|x| x.abs()).fold(0.0, f64::max);
        assert!(scale > 0.0, "{name}");
        for (x, y) in a.iter().zip(&want) {
            assert!((x - y).abs() <= 1e-9 * scale, "{name}: {x} vs {y}");
        }
    }
}

/// Sampling from the policy (rollouts) with recording off builds no graph:
/// nothing downstream of the adapters is tracked.
#[test]
fn adapters_with_recording_off_build_no_graph() {
    let mut model = plain(DType::F32);
    let lora = attach(&mut model, &LoraConfig::default(), 1).unwrap();
    let b = batch(&model, DType::F32);
    let img = model.image_embeds(&b.pixels, Pass::Inference).unwrap();
    let (und, _) = b.views(&img);
    let tracked = |model: &Janus| {
        // The training pass: the inference pass's fused norms cut the graph
        // between layers (not within them, where the KV cache keeps it).
        understanding_logps(model, &und, 1.0, Pass::Training)
            .unwrap()
            .track_op()
    };
    assert!(tracked(&model));
    lora.set_recording(false);
    assert!(!tracked(&model));
    lora.set_recording(true);
    assert!(tracked(&model));
}
