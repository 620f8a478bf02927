//! Model behaviour beyond the reference cases: the demo model round trip,
//! cache and batching consistency, checkpoint formats and bad inputs.

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, D};
use common::{full_hidden, max_abs_diff, row_embeds};
use ulm_model::bundle::ModelBundle;
use ulm_model::config::JanusConfig;
use ulm_model::decode::{TextDecoder, TextPrompt};
use ulm_model::demo::{demo_config_json, save_demo_checkpoint, DEFAULT_SEED};
use ulm_model::generate::{
    answer_batch, generate_images_batch, AnswerBatch, AnswerItem, ImageBatch, ImageItem,
};
use ulm_model::image_processor::decode_image;
use ulm_model::ops::Pass;
use ulm_model::plan::{plan_batch, plan_request, MAX_PLAN_TOKENS};
use ulm_model::sampling::SamplingParams;
use ulm_model::ModelError;

fn tiny_a() -> std::path::PathBuf {
    common::janus_fixture_root().join("tiny-a")
}

fn demo() -> ModelBundle {
    ModelBundle::demo(DEFAULT_SEED, DType::F32, &Device::Cpu).unwrap()
}

fn png_bytes(img: &image::DynamicImage, format: image::ImageFormat) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, format).unwrap();
    out.into_inner()
}

fn test_image(w: u32, h: u32) -> image::RgbImage {
    image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([
            (x * 7 % 256) as u8,
            (y * 13 % 256) as u8,
            ((x + y) % 256) as u8,
        ])
    })
}

fn answer_item(
    bundle: &ModelBundle,
    question: &str,
    n: usize,
    sampling: SamplingParams,
    seed: u64,
) -> AnswerItem {
    let pixels = bundle
        .image_processor
        .preprocess(&test_image(90, 40), bundle.model.device())
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    AnswerItem {
        prompt: TextPrompt {
            prompt: bundle.processor.understanding_prompt(question).unwrap(),
            pixels: Some(pixels),
            samples: n,
        },
        max_new_tokens: 10,
        sampling,
        seeds: (0..n as u64).map(|i| seed + i).collect(),
    }
}

fn answers(bundle: &ModelBundle, items: &[AnswerItem]) -> Vec<Vec<Vec<u32>>> {
    let s = bundle.processor.special;
    answer_batch(&bundle.model, items, s.eos, s.pad, &mut |_| true)
        .unwrap()
        .into_iter()
        .map(|samples| samples.into_iter().map(|s| s.token_ids).collect())
        .collect()
}

fn sampled() -> SamplingParams {
    SamplingParams {
        temperature: 1.0,
        top_k: Some(50),
        top_p: Some(0.95),
    }
}

#[test]
fn demo_model_saved_and_reloaded_gives_identical_outputs() {
    let dir = tempfile::tempdir().unwrap();
    save_demo_checkpoint(dir.path(), DEFAULT_SEED).unwrap();
    for file in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "preprocessor_config.json",
        "processor_config.json",
    ] {
        assert!(dir.path().join(file).exists(), "{file} missing");
    }
    let built = demo();
    let loaded = ModelBundle::load(dir.path(), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(built.model.cfg, loaded.model.cfg);
    let item = |b: &ModelBundle| answer_item(b, "What colour is it?", 3, sampled(), 11);
    assert_eq!(
        answers(&built, &[item(&built)]),
        answers(&loaded, &[item(&loaded)])
    );
    let gen = |b: &ModelBundle| {
        let item = ImageItem {
            prompt: b.processor.generation_prompt("a blue square").unwrap(),
            cfg_weight: 5.0,
            sampling: sampled(),
            seeds: vec![1, 2],
        };
        generate_images_batch(&b.model, &[item], b.processor.special.pad, &mut |_| true).unwrap()
    };
    let (a, b) = (gen(&built), gen(&loaded));
    for (x, y) in a[0].iter().zip(&b[0]) {
        let (x, y) = (x.as_ref().unwrap(), y.as_ref().unwrap());
        assert_eq!(x.tokens, y.tokens);
        assert_eq!(x.image.as_raw(), y.image.as_raw());
    }
    // The saved weights hold the unused tensors of the original layout too.
    let tensors =
        candle_core::safetensors::load(dir.path().join("model.safetensors"), &Device::Cpu).unwrap();
    assert!(tensors.contains_key("vision_model.vision_tower.attn_pool.latent"));
    assert!(tensors.contains_key("gen_vision_model.quantize.codebook_used"));
}

#[test]
fn demo_model_is_deterministic_across_builds() {
    let a = demo();
    let b = demo();
    let ids = Tensor::new(&[[1u32, 2, 3]], &Device::Cpu).unwrap();
    let ea = a.model.language_model.embed(&ids).unwrap();
    let eb = b.model.language_model.embed(&ids).unwrap();
    assert_eq!(max_abs_diff(&ea, &eb), 0.0);
}

/// Logits of the cached decoder equal a full recompute (the demo uses GQA).
#[test]
fn cached_decoding_equals_full_recompute() {
    let bundle = demo();
    let model = &bundle.model;
    let item = answer_item(
        &bundle,
        "Describe the picture.",
        1,
        SamplingParams::greedy(),
        0,
    );
    let mut decoder = TextDecoder::new(
        model,
        std::slice::from_ref(&item.prompt),
        bundle.processor.special.pad,
    )
    .unwrap();
    let mut ids = item.prompt.prompt.ids.clone();
    let mut mask = item.prompt.prompt.images_seq_mask.clone();
    let image_embeds = model
        .image_embeds(item.prompt.pixels.as_ref().unwrap(), Pass::Inference)
        .unwrap();
    for step in 0..6u32 {
        let token = 40 + step * 7;
        let cached = decoder.logits().squeeze(0).unwrap();
        let hidden = full_hidden(model, &row_embeds(model, &ids, &mask, &image_embeds));
        let full = model
            .language_model
            .logits(&hidden.get(ids.len() - 1).unwrap())
            .unwrap();
        assert!(max_abs_diff(&cached, &full) < 1e-4, "step {step}");
        decoder.advance(model, &[token]).unwrap();
        ids.push(token);
        mask.push(false);
    }
}

/// The training pass (differentiable ops) computes the same function.
#[test]
fn training_pass_equals_inference_pass() {
    let bundle = demo();
    let model = &bundle.model;
    let item = answer_item(&bundle, "What is this?", 1, SamplingParams::greedy(), 0);
    let pixels = item.prompt.pixels.as_ref().unwrap();
    let run = |pass: Pass| {
        let img = model.image_embeds(pixels, pass).unwrap();
        let p = &item.prompt.prompt;
        let ids = Tensor::new(p.ids.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let embeds = model
            .merge_image_embeds(&ids, std::slice::from_ref(&p.images_seq_mask), Some(&img))
            .unwrap();
        let t = p.ids.len();
        let lm = &model.language_model;
        let ctx = lm
            .context(&[(0..t as u32).collect()], &[vec![true; t]])
            .unwrap();
        lm.logits(&lm.forward_hidden(&embeds, &ctx, None, pass).unwrap())
            .unwrap()
    };
    assert!(max_abs_diff(&run(Pass::Inference), &run(Pass::Training)) < 1e-4);
}

/// Prompts of different lengths share a left-padded batch without changing
/// any result, and samples of one prompt equal the same seeds run alone.
#[test]
fn batching_does_not_change_results() {
    let bundle = demo();
    let short = answer_item(&bundle, "Why?", 2, sampled(), 100);
    let long = answer_item(
        &bundle,
        "What is in the lower right corner of this picture, and why?",
        3,
        sampled(),
        200,
    );
    let together = answers(&bundle, &[short.clone(), long.clone()]);
    assert_eq!(
        together[0],
        answers(&bundle, std::slice::from_ref(&short))[0]
    );
    assert_eq!(
        together[1],
        answers(&bundle, std::slice::from_ref(&long))[0]
    );
    let mut single = long.clone();
    single.prompt.samples = 1;
    single.seeds = vec![201];
    assert_eq!(together[1][1], answers(&bundle, &[single])[0][0]);

    let gen = |prompts: &[&str]| {
        let items: Vec<ImageItem> = prompts
            .iter()
            .map(|p| ImageItem {
                prompt: bundle.processor.generation_prompt(p).unwrap(),
                cfg_weight: 4.0,
                sampling: sampled(),
                seeds: vec![7, 8],
            })
            .collect();
        generate_images_batch(
            &bundle.model,
            &items,
            bundle.processor.special.pad,
            &mut |_| true,
        )
        .unwrap()
        .into_iter()
        .map(|v| v.into_iter().map(|s| s.unwrap().tokens).collect::<Vec<_>>())
        .collect::<Vec<_>>()
    };
    let both = gen(&["a cat", "a large green house by a lake at night"]);
    assert_eq!(both[0], gen(&["a cat"])[0]);
    assert_eq!(both[1], gen(&["a large green house by a lake at night"])[0]);
}

/// Continuous batching: items that join a batch mid-decode, and rows that
/// leave it, change no item's tokens or log-probs.
#[test]
fn joining_a_running_batch_does_not_change_results() {
    let bundle = demo();
    let s = bundle.processor.special;
    let model = &bundle.model;
    let mut long = answer_item(
        &bundle,
        "What is in the lower right corner of this picture, and why?",
        2,
        sampled(),
        300,
    );
    long.max_new_tokens = 24;
    let mut short = answer_item(&bundle, "Why?", 3, sampled(), 400);
    short.max_new_tokens = 4;
    let late = answer_item(&bundle, "What colour is it?", 1, sampled(), 500);
    let alone = |item: &AnswerItem| {
        answer_batch(model, std::slice::from_ref(item), s.eos, s.pad, &mut |_| {
            true
        })
        .unwrap()
    };
    let mut batch = AnswerBatch::new(s.eos, s.pad);
    batch.admit(model, vec![(7, long.clone())]).unwrap();
    let mut ended = HashMap::new();
    for step in 0..20 {
        // `short` joins at step 2 and leaves before `late` joins at step 9.
        if step == 2 {
            batch.admit(model, vec![(8, short.clone())]).unwrap();
            assert!(batch.admit(model, vec![(8, short.clone())]).is_err());
            assert_eq!(batch.rows(), 5, "a refused admission adds no rows");
        }
        if step == 9 {
            batch.admit(model, vec![(9, late.clone())]).unwrap();
        }
        for (key, samples) in batch.step(model, &mut |_| true).unwrap() {
            ended.insert(key, samples);
        }
        if batch.is_empty() {
            break;
        }
    }
    while !batch.is_empty() {
        for (key, samples) in batch.step(model, &mut |_| true).unwrap() {
            ended.insert(key, samples);
        }
    }
    for (key, item) in [(7, &long), (8, &short), (9, &late)] {
        let expected = &alone(item)[0];
        let got = &ended[&key];
        assert_eq!(got.len(), expected.len());
        for (g, e) in got.iter().zip(expected) {
            assert_eq!(g.token_ids, e.token_ids, "item {key}");
            assert_eq!(g.finish_reason, e.finish_reason, "item {key}");
            for (a, b) in g.logprobs.iter().zip(&e.logprobs) {
                assert!((a - b).abs() < 1e-4, "item {key}: {a} vs {b}");
            }
        }
    }

    let image_item = |prompt: &str, seeds: Vec<u64>| ImageItem {
        prompt: bundle.processor.generation_prompt(prompt).unwrap(),
        cfg_weight: 4.0,
        sampling: sampled(),
        seeds,
    };
    let first = image_item("a large green house by a lake at night", vec![3, 4]);
    let second = image_item("a cat", vec![5]);
    let mut batch = ImageBatch::new(s.pad);
    batch.admit(model, vec![(1, first.clone())]).unwrap();
    let mut images = HashMap::new();
    for step in 0.. {
        if step == 5 {
            batch.admit(model, vec![(2, second.clone())]).unwrap();
            assert_eq!(batch.images(), 3);
        }
        for (key, out) in batch.step(model, &mut |_| true).unwrap() {
            images.insert(key, out);
        }
        if batch.is_empty() && step >= 5 {
            break;
        }
    }
    for (key, item) in [(1, &first), (2, &second)] {
        let expected =
            generate_images_batch(model, std::slice::from_ref(item), s.pad, &mut |_| true).unwrap();
        for (g, e) in images[&key].iter().zip(&expected[0]) {
            let (g, e) = (g.as_ref().unwrap(), e.as_ref().unwrap());
            assert_eq!(g.tokens, e.tokens, "image item {key}");
            assert_eq!(g.image.as_raw(), e.image.as_raw(), "image item {key}");
        }
    }
}

/// A cancelled item leaves the batch at once; the others go on.
#[test]
fn a_cancelled_item_leaves_a_running_batch() {
    let bundle = demo();
    let model = &bundle.model;
    let pad = bundle.processor.special.pad;
    let item = |seeds| ImageItem {
        prompt: bundle.processor.generation_prompt("a red circle").unwrap(),
        cfg_weight: 2.0,
        sampling: sampled(),
        seeds,
    };
    let mut batch = ImageBatch::new(pad);
    batch
        .admit(model, vec![(1, item(vec![1, 2])), (2, item(vec![3]))])
        .unwrap();
    let ended = batch.step(model, &mut |key| key != 1).unwrap();
    assert_eq!(ended.len(), 1);
    assert_eq!(ended[0].0, 1);
    assert!(ended[0].1.iter().all(Option::is_none));
    assert_eq!(batch.images(), 1);
    let mut rest = Vec::new();
    while !batch.is_empty() {
        rest.extend(batch.step(model, &mut |_| true).unwrap());
    }
    assert_eq!(rest.len(), 1);
    assert!(rest[0].1[0].is_some());
}

#[test]
fn behaviour_logprobs_are_those_of_the_sampling_distribution() {
    let bundle = demo();
    let item = answer_item(
        &bundle,
        "What?",
        1,
        SamplingParams {
            temperature: 0.7,
            top_k: None,
            top_p: None,
        },
        5,
    );
    let s = bundle.processor.special;
    let out = answer_batch(
        &bundle.model,
        std::slice::from_ref(&item),
        s.eos,
        s.pad,
        &mut |_| true,
    )
    .unwrap();
    let sample = &out[0][0];
    assert_eq!(sample.token_ids.len(), sample.logprobs.len());
    // Recompute with one full forward over prompt + completion.
    let model = &bundle.model;
    let p = &item.prompt.prompt;
    let mut ids = p.ids.clone();
    ids.extend(&sample.token_ids);
    let mut mask = p.images_seq_mask.clone();
    mask.extend(vec![false; sample.token_ids.len()]);
    let img = model
        .image_embeds(item.prompt.pixels.as_ref().unwrap(), Pass::Inference)
        .unwrap();
    let hidden = full_hidden(model, &row_embeds(model, &ids, &mask, &img));
    let logits = model.language_model.logits(&hidden).unwrap();
    let logp = candle_nn::ops::log_softmax(&(logits / 0.7).unwrap(), D::Minus1).unwrap();
    for (i, (&tok, &lp)) in sample.token_ids.iter().zip(&sample.logprobs).enumerate() {
        let expected: f32 = logp
            .get(p.ids.len() - 1 + i)
            .unwrap()
            .get(tok as usize)
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(
            (expected - lp).abs() < 1e-4,
            "token {i}: {lp} vs {expected}"
        );
    }
}

#[test]
fn answers_stop_at_eos_or_length_and_can_be_cancelled() {
    let bundle = demo();
    let item = answer_item(&bundle, "Hi", 2, sampled(), 9);
    let s = bundle.processor.special;
    let mut seen = 0;
    let out = answer_batch(
        &bundle.model,
        std::slice::from_ref(&item),
        s.eos,
        s.pad,
        &mut |_| {
            seen += 1;
            seen < 3
        },
    )
    .unwrap();
    for sample in &out[0] {
        assert!(
            sample.token_ids.len() <= 2,
            "cancelled after the second event"
        );
        assert_eq!(
            sample.finish_reason,
            ulm_model::generate::DecodeEnd::Cancelled
        );
    }
    let out = answer_batch(&bundle.model, &[item], s.eos, s.pad, &mut |_| true).unwrap();
    for sample in &out[0] {
        let stopped = sample.token_ids.last() == Some(&s.eos);
        assert!(stopped || sample.token_ids.len() == 10);
    }
}

fn copy_fixture(to: &Path) {
    for entry in std::fs::read_dir(tiny_a()).unwrap() {
        let p = entry.unwrap().path();
        if p.is_file() {
            std::fs::copy(&p, to.join(p.file_name().unwrap())).unwrap();
        }
    }
}

fn load_err(dir: &Path) -> String {
    match ModelBundle::load(dir, DType::F32, &Device::Cpu) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn rewrite_weights(dir: &Path, edit: impl FnOnce(&mut HashMap<String, Tensor>)) {
    let path = dir.join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    edit(&mut tensors);
    candle_core::safetensors::save(&tensors, &path).unwrap();
}

#[test]
fn bad_checkpoints_give_errors_naming_the_problem() {
    let name = "language_model.model.layers.1.mlp.down_proj.weight";

    let dir = tempfile::tempdir().unwrap();
    copy_fixture(dir.path());
    rewrite_weights(dir.path(), |t| {
        t.remove(name);
    });
    let e = load_err(dir.path());
    assert!(e.contains(name), "{e}");

    let dir = tempfile::tempdir().unwrap();
    copy_fixture(dir.path());
    rewrite_weights(dir.path(), |t| {
        t.insert(
            name.into(),
            Tensor::zeros((3, 3), DType::F32, &Device::Cpu).unwrap(),
        );
    });
    let e = load_err(dir.path());
    assert!(e.contains(name) && e.contains("shape"), "{e}");

    let dir = tempfile::tempdir().unwrap();
    copy_fixture(dir.path());
    std::fs::write(
        dir.path().join("model.safetensors"),
        b"this is not a safetensors file",
    )
    .unwrap();
    let e = load_err(dir.path());
    assert!(e.contains("model.safetensors"), "{e}");

    let dir = tempfile::tempdir().unwrap();
    copy_fixture(dir.path());
    let bytes = std::fs::read(dir.path().join("model.safetensors")).unwrap();
    std::fs::write(
        dir.path().join("model.safetensors"),
        &bytes[..bytes.len() / 2],
    )
    .unwrap();
    load_err(dir.path());

    let dir = tempfile::tempdir().unwrap();
    copy_fixture(dir.path());
    std::fs::write(dir.path().join("config.json"), "{ not json").unwrap();
    assert!(load_err(dir.path()).contains("config"));

    let dir = tempfile::tempdir().unwrap();
    copy_fixture(dir.path());
    std::fs::remove_file(dir.path().join("tokenizer.json")).unwrap();
    assert!(load_err(dir.path()).contains("tokenizer.json"));

    let dir = tempfile::tempdir().unwrap();
    assert!(load_err(dir.path()).contains("config.json"));
}

#[test]
fn config_errors_name_the_field() {
    type Edit = Box<dyn Fn(&mut serde_json::Value)>;
    let cases: Vec<(Edit, &str)> = vec![
        (
            Box::new(|c| c["language_config"]["num_key_value_heads"] = 3.into()),
            "language_config.num_key_value_heads",
        ),
        (
            Box::new(|c| c["vision_config"]["params"]["width"] = "wide".into()),
            "vision_config.params.width",
        ),
        (
            Box::new(|c| c["gen_head_config"]["params"]["image_token_size"] = 7.into()),
            "gen_head_config.params.image_token_size",
        ),
        (
            Box::new(|c| c["aligner_config"]["params"]["input_dim"] = 5.into()),
            "aligner_config.params.input_dim",
        ),
        (
            Box::new(|c| c["gen_vision_config"]["params"]["downsample_factor"] = 4.into()),
            "gen_vision_config.params.downsample_factor",
        ),
        (
            Box::new(|c| c["language_config"]["hidden_act"] = "relu".into()),
            "language_config.hidden_act",
        ),
        (
            Box::new(|c| {
                c["language_config"]["rope_scaling"] = serde_json::json!({"type": "linear"})
            }),
            "language_config.rope_scaling",
        ),
        (
            Box::new(|c| {
                c.as_object_mut().unwrap().remove("gen_head_config");
            }),
            "gen_head_config",
        ),
        // An unknown ViT name gives no preset, so a missing size is an error.
        (
            Box::new(|c| {
                c["vision_config"]["params"]["model_name"] = "siglip_unknown".into();
                c["vision_config"]["params"]
                    .as_object_mut()
                    .unwrap()
                    .remove("width");
            }),
            "vision_config.params.width",
        ),
    ];
    for (edit, field) in cases {
        let mut raw = demo_config_json();
        edit(&mut raw);
        match JanusConfig::from_value(raw) {
            Ok(_) => panic!("config with bad {field} accepted"),
            Err(ModelError::Config { field: f, .. }) => assert_eq!(f, field),
            Err(e) => panic!("unexpected error {e}"),
        }
    }
}

/// A config in the layout of the real Janus-Pro-1B checkpoint: sizes come
/// from the presets named by `model_name` and `cls`, and LlamaConfig defaults.
#[test]
fn real_janus_pro_config_uses_the_presets() {
    let raw = serde_json::json!({
        "aligner_config": {"cls": "MlpProjector", "model_type": "aligner",
            "params": {"depth": 2, "input_dim": 1024, "n_embed": 2048, "projector_type": "mlp_gelu"}},
        "gen_aligner_config": {"cls": "MlpProjector", "model_type": "gen_aligner",
            "params": {"depth": 2, "input_dim": 8, "n_embed": 2048, "projector_type": "mlp_gelu"}},
        "gen_head_config": {"cls": "vision_head", "model_type": "gen_head",
            "params": {"image_token_embed": 2048, "image_token_size": 16384, "n_embed": 2048}},
        "gen_vision_config": {"cls": "VQ-16", "model_type": "gen_vision",
            "params": {"image_token_size": 16384, "n_embed": 8}},
        "language_config": {"hidden_size": 2048, "intermediate_size": 5632, "max_position_embeddings": 16384,
            "model_type": "llama", "num_attention_heads": 16, "num_hidden_layers": 24,
            "num_key_value_heads": 16, "torch_dtype": "bfloat16", "vocab_size": 102400},
        "model_type": "multi_modality",
        "torch_dtype": "bfloat16",
        "vision_config": {"cls": "CLIPVisionTower", "model_type": "vision",
            "params": {"image_size": 384, "model_name": "siglip_large_patch16_384",
                       "select_feature": "same", "select_layer": -1}}
    });
    let cfg = JanusConfig::from_value(raw).unwrap();
    assert_eq!(
        (
            cfg.vision.width,
            cfg.vision.layers,
            cfg.vision.heads,
            cfg.vision.mlp_hidden_dim
        ),
        (1024, 24, 16, 4096)
    );
    assert_eq!(cfg.vision.num_patches(), 576);
    let vq = &cfg.gen_vision;
    assert_eq!(
        (
            vq.codebook_size,
            vq.codebook_embed_dim,
            vq.ch,
            vq.z_channels,
            vq.num_res_blocks
        ),
        (16384, 8, 128, 256, 2)
    );
    assert_eq!(vq.encoder_ch_mult, vec![1, 1, 2, 2, 4]);
    assert_eq!((vq.grid_size(), vq.image_tokens()), (24, 576));
    assert_eq!(
        (
            cfg.language.head_dim,
            cfg.language.rms_norm_eps,
            cfg.language.rope_theta
        ),
        (128, 1e-6, 10000.0)
    );
}

#[test]
fn sharded_and_half_precision_checkpoints_load() {
    let reference = ModelBundle::load(&tiny_a(), DType::F32, &Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    copy_fixture(dir.path());
    let all =
        candle_core::safetensors::load(dir.path().join("model.safetensors"), &Device::Cpu).unwrap();
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    let (mut a, mut b) = (HashMap::new(), HashMap::new());
    let mut map = serde_json::Map::new();
    for (i, (name, t)) in all.into_iter().enumerate() {
        // The second shard is stored in bf16, as real checkpoints are.
        let (shard, file) = if i % 2 == 0 {
            (&mut a, "model-00001-of-00002.safetensors")
        } else {
            (&mut b, "model-00002-of-00002.safetensors")
        };
        let t = if file.contains("00002") {
            t.to_dtype(DType::BF16).unwrap()
        } else {
            t
        };
        shard.insert(name.clone(), t);
        map.insert(name, file.into());
    }
    candle_core::safetensors::save(&a, dir.path().join("model-00001-of-00002.safetensors"))
        .unwrap();
    candle_core::safetensors::save(&b, dir.path().join("model-00002-of-00002.safetensors"))
        .unwrap();
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        serde_json::json!({"metadata": {}, "weight_map": map}).to_string(),
    )
    .unwrap();
    let sharded = ModelBundle::load(dir.path(), DType::F32, &Device::Cpu).unwrap();
    let ids = Tensor::new(&[[400u32, 410, 25, 220, 30]], &Device::Cpu).unwrap();
    let logits = |b: &ModelBundle| {
        let lm = &b.model.language_model;
        let ctx = lm.context(&[(0..5).collect()], &[vec![true; 5]]).unwrap();
        lm.logits(
            &lm.forward_hidden(&lm.embed(&ids).unwrap(), &ctx, None, Pass::Inference)
                .unwrap(),
        )
        .unwrap()
    };
    // bf16 storage of half the weights costs precision, not correctness.
    let diff = max_abs_diff(&logits(&sharded), &logits(&reference));
    assert!(diff < 0.1, "sharded/bf16 logits differ by {diff}");
    let half = ModelBundle::load(&tiny_a(), DType::BF16, &Device::Cpu).unwrap();
    let diff = max_abs_diff(&logits(&half), &logits(&reference));
    assert!(diff < 0.5, "bf16 model logits differ by {diff}");
}

#[test]
fn images_of_every_format_and_shape_are_accepted() {
    let bundle = demo();
    let rgb = image::DynamicImage::ImageRgb8(test_image(300, 7));
    let cases = [
        png_bytes(&rgb, image::ImageFormat::Png),
        png_bytes(&rgb, image::ImageFormat::Jpeg),
        png_bytes(&rgb, image::ImageFormat::WebP),
        png_bytes(
            &image::DynamicImage::ImageRgba8(rgb.to_rgba8()),
            image::ImageFormat::Png,
        ),
        png_bytes(
            &image::DynamicImage::ImageLuma8(rgb.to_luma8()),
            image::ImageFormat::Png,
        ),
        png_bytes(
            &image::DynamicImage::ImageRgb8(test_image(1, 1)),
            image::ImageFormat::Png,
        ),
        png_bytes(
            &image::DynamicImage::ImageRgb8(test_image(5, 900)),
            image::ImageFormat::Png,
        ),
    ];
    let side = bundle.model.cfg.vision.image_size;
    for bytes in cases {
        let img = decode_image(&bytes, 1 << 20).unwrap();
        let pixels = bundle
            .image_processor
            .preprocess(&img, &Device::Cpu)
            .unwrap();
        assert_eq!(pixels.dims(), &[3, side, side]);
    }
    // RGBA drops alpha like PIL's convert("RGB").
    let rgba = image::DynamicImage::ImageRgba8(image::RgbaImage::from_pixel(
        2,
        2,
        image::Rgba([10, 20, 30, 0]),
    ));
    let img = decode_image(&png_bytes(&rgba, image::ImageFormat::Png), 100).unwrap();
    assert_eq!(img.get_pixel(0, 0).0, [10, 20, 30]);
}

#[test]
fn bad_images_are_errors() {
    assert!(matches!(
        decode_image(b"definitely not an image", 1 << 20),
        Err(ModelError::Image(_))
    ));
    assert!(matches!(
        decode_image(&[], 1 << 20),
        Err(ModelError::Image(_))
    ));
    let big = png_bytes(
        &image::DynamicImage::ImageRgb8(test_image(200, 200)),
        image::ImageFormat::Png,
    );
    let e = decode_image(&big, 10_000).unwrap_err();
    assert!(e.to_string().contains("exceeds"), "{e}");
    let mut truncated = big.clone();
    truncated.truncate(big.len() / 2);
    assert!(decode_image(&truncated, 1 << 20).is_err());
    let gif = b"GIF89a\x01\x00\x01\x00\x00\x00\x00;";
    assert!(decode_image(gif, 1 << 20).is_err());
}

#[test]
fn generated_images_have_the_configured_size_and_encode_back_to_a_full_grid() {
    let bundle = demo();
    let item = ImageItem {
        prompt: bundle.processor.generation_prompt("stripes").unwrap(),
        cfg_weight: 5.0,
        sampling: sampled(),
        seeds: vec![3],
    };
    let out = generate_images_batch(
        &bundle.model,
        &[item],
        bundle.processor.special.pad,
        &mut |_| true,
    )
    .unwrap();
    let sample = out[0][0].as_ref().unwrap();
    let side = bundle.model.cfg.gen_vision.image_size as u32;
    assert_eq!(sample.image.dimensions(), (side, side));
    assert_eq!(
        sample.tokens.len(),
        bundle.model.cfg.gen_vision.image_tokens()
    );
    assert!(sample.logprobs.iter().all(|l| l.is_finite() && *l <= 0.0));
    let ip = ulm_model::image_processor::ImageProcessorConfig::janus_default(side as usize);
    let pixels = ip.preprocess(&sample.image, &Device::Cpu).unwrap();
    let codes = ulm_model::generate::encode_image(&bundle.model, &pixels).unwrap();
    assert_eq!(codes.len(), sample.tokens.len());
}

#[test]
fn decoded_text_never_holds_nul() {
    let bundle = demo();
    let p = &bundle.processor;
    // Every byte token of the demo's byte-level tokenizer, NUL included.
    let ids: Vec<u32> = (0..256).collect();
    let text = p.decode(&ids);
    assert!(!text.contains('\0'));
    assert!(text.contains('\u{FFFD}'));
    assert!(text.contains("abc"));
}

#[test]
fn a_plan_is_the_answer_to_a_text_only_planning_turn_one_per_seed() {
    let b = demo();
    let turn = b
        .processor
        .text_prompt(&plan_request("a red circle"))
        .unwrap();
    assert_eq!(turn.image_span(), None);
    assert!(turn.images_seq_mask.iter().all(|m| !m));
    let image_turn = b.processor.understanding_prompt("x").unwrap();
    assert_eq!(turn.ids[..2], image_turn.ids[..2], "the same chat template");

    let prompts = ["a red circle", "two squares"];
    let plans = plan_batch(&b.model, &b.processor, &prompts, &[0, 1, 2], sampled()).unwrap();
    assert_eq!(plans.len(), 2);
    assert!(plans.iter().all(|p| p.len() == 3));
    assert_ne!(plans[0][0], plans[0][1], "each seed plans its own layout");
    let alone = plan_batch(&b.model, &b.processor, &prompts[1..], &[1], sampled()).unwrap();
    assert_eq!(
        alone[0][0], plans[1][1],
        "a plan does not depend on its batch"
    );

    let item = AnswerItem {
        prompt: TextPrompt {
            prompt: turn,
            pixels: None,
            samples: 1,
        },
        max_new_tokens: MAX_PLAN_TOKENS,
        sampling: sampled(),
        seeds: vec![2],
    };
    let direct = b.processor.decode(&answers(&b, &[item])[0][0]);
    assert_eq!(direct.trim(), plans[0][2]);
}
