//! Model throughput on this machine: understanding decode tokens/s and
//! generation image-tokens/s at several batch sizes, for the demo model and a
//! larger config (~860 MB of f32 weights). Prints a Markdown table.
//!
//! `cargo bench -p ulm-server --bench model [-- --device cuda --dtype bf16 --quick]`

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use serde_json::Value;
use ulm_model::bundle::{parse_device, parse_dtype};
use ulm_model::decode::{CfgDecoder, TextDecoder, TextPrompt};
use ulm_model::demo::{build_random, demo_config_json, demo_tokenizer};
use ulm_model::processor::Processor;
use ulm_model::Janus;

/// A mid-sized model: LLaMA 1024 x 12 layers, vocab 32k; ViT 768 x 12 at 224
/// px (196 tokens); VQ with 5 levels at 128 px (8 x 8 image tokens).
fn medium_config() -> Value {
    let mut c = demo_config_json();
    let lm = &mut c["language_config"];
    lm["vocab_size"] = 32000.into();
    lm["hidden_size"] = 1024.into();
    lm["intermediate_size"] = 2816.into();
    lm["num_hidden_layers"] = 12.into();
    lm["num_attention_heads"] = 16.into();
    lm["num_key_value_heads"] = 16.into();
    lm["head_dim"] = 64.into();
    let v = &mut c["vision_config"]["params"];
    v["image_size"] = 224.into();
    v["width"] = 768.into();
    v["layers"] = 12.into();
    v["heads"] = 12.into();
    v["head_dim"] = 64.into();
    v["mlp_hidden_dim"] = 3072.into();
    c["aligner_config"]["params"]["input_dim"] = 768.into();
    c["aligner_config"]["params"]["n_embed"] = 1024.into();
    let g = &mut c["gen_vision_config"]["params"];
    g["image_token_size"] = 16384.into();
    g["codebook_size"] = 16384.into();
    g["encoder_ch_mult"] = serde_json::json!([1, 1, 2, 2, 4]);
    g["decoder_ch_mult"] = serde_json::json!([1, 1, 2, 2, 4]);
    g["downsample_factor"] = 16.into();
    g["image_size"] = 128.into();
    c["gen_aligner_config"]["params"]["n_embed"] = 1024.into();
    c["gen_head_config"]["params"] =
        serde_json::json!({"n_embed": 1024, "image_token_embed": 1024, "image_token_size": 16384});
    c
}

struct Row {
    model: &'static str,
    task: &'static str,
    batch: usize,
    tokens_per_s: f64,
    ms_per_step: f64,
}

fn bench_understanding(
    model: &Janus,
    processor: &Processor,
    batch: usize,
    steps: usize,
) -> (f64, f64) {
    let side = model.cfg.vision.image_size;
    let pixels = Tensor::zeros((1, 3, side, side), DType::F32, model.device()).unwrap();
    let prompt = TextPrompt {
        prompt: processor
            .understanding_prompt("What is shown in this image? Answer briefly.")
            .unwrap(),
        pixels: Some(pixels),
        samples: batch,
    };
    let mut decoder = TextDecoder::new(model, &[prompt], processor.special.pad).unwrap();
    let tokens = vec![65u32; batch];
    decoder.advance(model, &tokens).unwrap();
    let start = Instant::now();
    for _ in 0..steps {
        decoder.advance(model, &tokens).unwrap();
        decoder.logits().to_vec2::<f32>().unwrap();
    }
    let secs = start.elapsed().as_secs_f64();
    ((batch * steps) as f64 / secs, secs * 1000.0 / steps as f64)
}

fn bench_generation(
    model: &Janus,
    processor: &Processor,
    batch: usize,
    steps: usize,
) -> (f64, f64) {
    let prompt = processor
        .generation_prompt("A red circle above a blue square on a white background.")
        .unwrap();
    let mut decoder = CfgDecoder::new(model, &[&prompt], &[batch], processor.special.pad).unwrap();
    let tokens = vec![3u32; batch];
    let weights = vec![5.0f32; batch];
    decoder.advance(model, &tokens).unwrap();
    let start = Instant::now();
    for _ in 0..steps {
        decoder
            .cfg_logits(&weights)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        decoder.advance(model, &tokens).unwrap();
    }
    let secs = start.elapsed().as_secs_f64();
    ((batch * steps) as f64 / secs, secs * 1000.0 / steps as f64)
}

fn bench_vq_decode(model: &Janus) -> f64 {
    let n = model.cfg.gen_vision.image_tokens();
    let codes = Tensor::new((0..n as u32).collect::<Vec<_>>(), model.device())
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    model.gen_vision.decode_codes(&codes).unwrap();
    let start = Instant::now();
    let pixels = model.gen_vision.decode_codes(&codes).unwrap();
    pixels
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    start.elapsed().as_secs_f64() * 1000.0
}

fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| default.to_string())
}

fn main() {
    ulm_model::runtime::configure();
    let quick = std::env::args().any(|a| a == "--quick");
    let device: Device = parse_device(&arg("--device", "cpu")).unwrap();
    let dtype = parse_dtype(&arg("--dtype", "f32")).unwrap();
    let processor_for = |model: &Janus| {
        Processor::new(
            demo_tokenizer().unwrap(),
            true,
            model.cfg.vision.num_patches(),
        )
        .unwrap()
    };
    let mut rows = Vec::new();
    let configs: Vec<(&'static str, Value, Vec<usize>, usize)> = vec![
        (
            "demo",
            demo_config_json(),
            vec![1, 4, 16, 64],
            if quick { 8 } else { 32 },
        ),
        (
            "medium",
            medium_config(),
            if quick { vec![1, 4] } else { vec![1, 4, 16] },
            if quick { 4 } else { 16 },
        ),
    ];
    for (name, config, batches, steps) in configs {
        let (model, backend) = build_random(config, 1, dtype, &device).unwrap();
        drop(backend);
        let processor = processor_for(&model);
        for &batch in &batches {
            let (tps, ms) = bench_understanding(&model, &processor, batch, steps);
            rows.push(Row {
                model: name,
                task: "understanding decode",
                batch,
                tokens_per_s: tps,
                ms_per_step: ms,
            });
            let (tps, ms) = bench_generation(&model, &processor, batch, steps);
            rows.push(Row {
                model: name,
                task: "generation (CFG, 2 rows/image)",
                batch,
                tokens_per_s: tps,
                ms_per_step: ms,
            });
        }
        let ms = bench_vq_decode(&model);
        println!(
            "{name}: VQ decode of one {0}x{0} image: {ms:.1} ms",
            model.cfg.gen_vision.image_size
        );
    }
    println!("\ndevice {device:?}, dtype {dtype:?}\n");
    println!("| model | task | batch | tokens/s | ms/step | vs batch 1 |");
    println!("|---|---|---:|---:|---:|---:|");
    for r in &rows {
        let base = rows
            .iter()
            .find(|b| b.model == r.model && b.task == r.task && b.batch == 1)
            .map_or(1.0, |b| b.tokens_per_s);
        println!(
            "| {} | {} | {} | {:.1} | {:.1} | {:.2}x |",
            r.model,
            r.task,
            r.batch,
            r.tokens_per_s,
            r.ms_per_step,
            r.tokens_per_s / base
        );
    }
}
