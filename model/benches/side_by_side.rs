//! The Rust half of the side-by-side benchmark against transformers' Janus
//! (`model/benches/side_by_side.py` is the other half; run both with
//! `model/benches/side-by-side.sh`). Writes a random checkpoint in the
//! original DeepSeek layout, the inputs both sides run on, and our timings
//! and greedy tokens, into `--dir`:
//!
//! `cargo bench -p ulm-model --bench side_by_side -- --dir DIR [--preset small|1b] [--layers N]
//!  [--repeats 3] [--device cpu|cuda] [--dtype f32|bf16] [--decode-batches 1,16] [--image-batches 1,4]
//!  [--candle-defaults]`
//!
//! Every measurement is the median of `--repeats` after one warm-up:
//! understanding prefill (vision tower, aligner, merge, language model over
//! the prompt), greedy decode tokens/s, CFG image tokens/s (prefill
//! included), VQ decode of a fixed code grid, and seconds per image for a
//! whole generation with its VQ decode.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use image::{Rgb, RgbImage};
use serde_json::{json, Value};
use ulm_model::bundle::{parse_device, parse_dtype};
use ulm_model::decode::{CfgDecoder, TextDecoder, TextPrompt};
use ulm_model::demo::{
    demo_config_json, demo_tokenizer, janus_pro_1b_widths_json, save_random_checkpoint,
};
use ulm_model::image_processor::ImageProcessorConfig;
use ulm_model::processor::{GenerationPrompt, Processor};
use ulm_model::weights::load_model;
use ulm_model::Janus;

/// LLaMA 512 x `layers` (8 heads, vocab 16384), SigLIP 384 x 6 layers at
/// 256 px (256 image tokens), VQ-16's layout at half its channels, 256 px
/// with 16 x 16 codes (the code grid equals the vision grid, which
/// transformers' Janus requires).
fn small_config(layers: usize) -> Value {
    let mut c = demo_config_json();
    let lm = &mut c["language_config"];
    lm["vocab_size"] = 16384.into();
    lm["hidden_size"] = 512.into();
    lm["intermediate_size"] = 1376.into();
    lm["num_hidden_layers"] = layers.into();
    lm["num_attention_heads"] = 8.into();
    lm["num_key_value_heads"] = 8.into();
    lm["head_dim"] = 64.into();
    let v = &mut c["vision_config"]["params"];
    v["image_size"] = 256.into();
    v["width"] = 384.into();
    v["layers"] = 6.into();
    v["heads"] = 6.into();
    v["head_dim"] = 64.into();
    v["mlp_hidden_dim"] = 1536.into();
    c["aligner_config"]["params"]["input_dim"] = 384.into();
    c["aligner_config"]["params"]["n_embed"] = 512.into();
    let q = &mut c["gen_vision_config"]["params"];
    q["image_token_size"] = 4096.into();
    q["codebook_size"] = 4096.into();
    q["ch"] = 64.into();
    q["encoder_ch_mult"] = json!([1, 1, 2, 2, 4]);
    q["decoder_ch_mult"] = json!([1, 1, 2, 2, 4]);
    q["num_res_blocks"] = 2.into();
    q["z_channels"] = 128.into();
    q["downsample_factor"] = 16.into();
    q["image_size"] = 256.into();
    c["gen_aligner_config"]["params"]["n_embed"] = 512.into();
    c["gen_head_config"]["params"] =
        json!({"n_embed": 512, "image_token_embed": 512, "image_token_size": 4096});
    c
}

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn list(name: &str, default: &str) -> Vec<usize> {
    arg(name)
        .unwrap_or_else(|| default.into())
        .split(',')
        .map(|n| n.trim().parse().expect("a comma-separated list of numbers"))
        .collect()
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// Median seconds of `repeats` runs of `f` after one warm-up, and the last result.
fn timed<T>(repeats: usize, mut f: impl FnMut() -> T) -> (f64, T) {
    let mut out = f();
    let mut secs = Vec::with_capacity(repeats);
    for _ in 0..repeats {
        let start = Instant::now();
        out = f();
        secs.push(start.elapsed().as_secs_f64());
    }
    (median(secs), out)
}

fn argmax(row: &[f32]) -> u32 {
    row.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map_or(0, |(i, _)| i as u32)
}

/// A fixed picture: a red disc and a blue bar on grey.
fn test_image(side: u32) -> RgbImage {
    RgbImage::from_fn(side, side, |x, y| {
        let (cx, cy, r) = (side as i64 / 3, side as i64 / 3, side as i64 / 6);
        let (dx, dy) = (x as i64 - cx, y as i64 - cy);
        if dx * dx + dy * dy < r * r {
            Rgb([220, 30, 30])
        } else if y > side * 2 / 3 && x > side / 4 {
            Rgb([30, 60, 220])
        } else {
            Rgb([128, 128, 128])
        }
    })
}

fn ids_tensor(ids: &[u32]) -> Tensor {
    let ids: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
    let n = ids.len();
    Tensor::from_vec(ids, (1, n), &Device::Cpu).unwrap()
}

struct Bench<'a> {
    model: &'a Janus,
    pad: u32,
    repeats: usize,
    cfg_weight: f32,
}

impl Bench<'_> {
    fn understanding(&self, prompt: &TextPrompt, samples: usize) -> TextDecoder {
        let prompt = TextPrompt {
            samples,
            ..prompt.clone()
        };
        TextDecoder::new(self.model, &[prompt], self.pad).unwrap()
    }

    /// Seconds of `steps` greedy decode steps over `batch` rows, and row 0's tokens.
    fn decode(&self, prompt: &TextPrompt, batch: usize, steps: usize) -> (f64, Vec<u32>) {
        let mut runs = Vec::new();
        let mut tokens = Vec::new();
        for _ in 0..=self.repeats {
            let mut decoder = self.understanding(prompt, batch);
            tokens.clear();
            let start = Instant::now();
            for _ in 0..steps {
                let logits: Vec<Vec<f32>> = decoder.logits().to_vec2().unwrap();
                let next: Vec<u32> = logits.iter().map(|row| argmax(row)).collect();
                tokens.push(next[0]);
                decoder.advance(self.model, &next).unwrap();
            }
            runs.push(start.elapsed().as_secs_f64());
        }
        runs.remove(0);
        (median(runs), tokens)
    }

    /// Greedy CFG image tokens `[images][steps]`, prefill included.
    fn generate(&self, prompt: &GenerationPrompt, images: usize, steps: usize) -> Vec<Vec<u32>> {
        let mut decoder = CfgDecoder::new(self.model, &[prompt], &[images], self.pad).unwrap();
        let weights = vec![self.cfg_weight; images];
        let mut tokens = vec![Vec::with_capacity(steps); images];
        for _ in 0..steps {
            let logits: Vec<Vec<f32>> = decoder.cfg_logits(&weights).unwrap().to_vec2().unwrap();
            let next: Vec<u32> = logits.iter().map(|row| argmax(row)).collect();
            for (image, &t) in tokens.iter_mut().zip(&next) {
                image.push(t);
            }
            decoder.advance(self.model, &next).unwrap();
        }
        tokens
    }

    fn vq_decode(&self, codes: &[Vec<u32>]) -> Tensor {
        let flat: Vec<u32> = codes.iter().flatten().copied().collect();
        let codes =
            Tensor::from_vec(flat, (codes.len(), codes[0].len()), self.model.device()).unwrap();
        let pixels = self.model.gen_vision.decode_codes(&codes).unwrap();
        pixels
            .to_dtype(DType::F32)
            .unwrap()
            .to_device(&Device::Cpu)
            .unwrap()
    }
}

fn write_json(path: &Path, value: &Value) {
    std::fs::write(path, serde_json::to_string_pretty(value).unwrap()).unwrap();
}

fn main() {
    // `--candle-defaults` measures with candle's and the allocator's own
    // settings, for comparison with the ones the server uses.
    let candle_defaults = std::env::args().any(|a| a == "--candle-defaults");
    if !candle_defaults {
        ulm_model::runtime::configure();
    }
    let dir = PathBuf::from(arg("--dir").expect("--dir DIR: where the checkpoint and results go"));
    let preset = arg("--preset").unwrap_or_else(|| "small".into());
    let repeats: usize = arg("--repeats").map_or(3, |r| r.parse().unwrap());
    let device = parse_device(&arg("--device").unwrap_or_else(|| "cpu".into())).unwrap();
    let dtype = parse_dtype(&arg("--dtype").unwrap_or_else(|| "f32".into())).unwrap();
    let (config, description) = match preset.as_str() {
        "small" => {
            let layers = arg("--layers").map_or(8, |l| l.parse().unwrap());
            (
                small_config(layers),
                format!("small: LLaMA 512 x {layers}, SigLIP 384 x 6 at 256 px, VQ-16 layout at 64 channels, 16 x 16 image tokens"),
            )
        }
        "1b" => {
            let layers = arg("--layers").map_or(4, |l| l.parse().unwrap());
            let vision = arg("--vision-layers").map_or(24, |l| l.parse().unwrap());
            (
                janus_pro_1b_widths_json(layers, vision),
                format!("Janus-Pro-1B widths with {layers} LLaMA and {vision} SigLIP-L layers, VQ-16, 24 x 24 image tokens"),
            )
        }
        other => panic!("unknown preset {other}: small or 1b"),
    };
    let decode_batches = list("--decode-batches", "1");
    let image_batches = list("--image-batches", "1,4");
    let per_image_batch = *image_batches.last().unwrap();

    // The checkpoint, written in f32 and read back through the loader in
    // the dtype measured.
    save_random_checkpoint(&dir, config, 7).unwrap();
    let model = load_model(&dir, dtype, &device).unwrap();
    let processor = Processor::new(
        demo_tokenizer().unwrap(),
        true,
        model.cfg.vision.num_patches(),
    )
    .unwrap();
    let image_processor = ImageProcessorConfig::janus_default(model.cfg.vision.image_size);
    let und = TextPrompt::question(
        &model,
        &processor,
        &image_processor,
        &test_image(300),
        "What is in this picture? Describe the colours and the shapes.",
        1,
    )
    .unwrap();
    let gen = processor
        .generation_prompt("A red circle above a blue square on a grey background.")
        .unwrap();
    let image_tokens = model.cfg.gen_vision.image_tokens();
    let codebook = model.cfg.gen_vision.codebook_size as u32;
    let vq_codes: Vec<u32> = (0..image_tokens as u32)
        .map(|i| (i * 7919 + 13) % codebook)
        .collect();
    let settings = json!({
        "description": description,
        "runtime_defaults": candle_defaults,
        "threads": candle_core::utils::get_num_threads(),
        "repeats": repeats,
        "decode_steps": 32,
        "decode_batches": decode_batches,
        "image_steps": 64.min(image_tokens),
        "image_batches": image_batches,
        "per_image_batch": per_image_batch,
        "image_tokens": image_tokens,
        "cfg_weight": 5.0,
        "prompt_tokens": und.prompt.ids.len(),
        "image_token_id": processor.special.image,
        "vq_codes": vq_codes,
    });
    write_json(&dir.join("inputs.json"), &settings);
    let pixels = und
        .pixels
        .as_ref()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_device(&Device::Cpu)
        .unwrap();
    let inputs: HashMap<String, Tensor> = [
        ("und_ids", ids_tensor(&und.prompt.ids)),
        ("und_pixels", pixels),
        ("gen_cond_ids", ids_tensor(&gen.cond_ids)),
        ("gen_uncond_ids", ids_tensor(&gen.uncond_ids)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    candle_core::safetensors::save(&inputs, dir.join("inputs.safetensors")).unwrap();

    let bench = Bench {
        model: &model,
        pad: processor.special.pad,
        repeats,
        cfg_weight: 5.0,
    };
    let mut timings = serde_json::Map::new();
    let mut put = |key: String, value: f64| {
        println!("{key}: {value:.4}");
        timings.insert(key, value.into());
    };
    let (prefill, _) = timed(repeats, || bench.understanding(&und, 1));
    put("prefill_s".into(), prefill);
    let decode_steps = 32;
    let mut answer = Vec::new();
    for &batch in &decode_batches {
        let (secs, tokens) = bench.decode(&und, batch, decode_steps);
        put(
            format!("decode_tokens_per_s_b{batch}"),
            (batch * decode_steps) as f64 / secs,
        );
        if batch == 1 {
            answer = tokens;
        }
    }
    let image_steps = 64.min(image_tokens);
    let mut image = Vec::new();
    for &images in &image_batches {
        let (secs, tokens) = timed(repeats, || bench.generate(&gen, images, image_steps));
        put(
            format!("image_tokens_per_s_b{images}"),
            (images * image_steps) as f64 / secs,
        );
        if images == 1 {
            image = tokens[0].clone();
        }
    }
    let mut vq_pixels = None;
    for &images in &image_batches {
        let codes = vec![vq_codes.clone(); images];
        let (secs, pixels) = timed(repeats, || bench.vq_decode(&codes));
        put(format!("vq_decode_s_b{images}"), secs);
        if images == 1 {
            vq_pixels = Some(pixels);
        }
    }
    let start = Instant::now();
    let codes = bench.generate(&gen, per_image_batch, image_tokens);
    bench.vq_decode(&codes);
    put(
        format!("seconds_per_image_b{per_image_batch}"),
        start.elapsed().as_secs_f64() / per_image_batch as f64,
    );

    let vq_pixels = vq_pixels.expect("one image is among the image batches");
    let mean_abs = vq_pixels
        .abs()
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    candle_core::safetensors::save(
        &HashMap::from([("pixels".to_string(), vq_pixels)]),
        dir.join("ours_pixels.safetensors"),
    )
    .unwrap();
    write_json(
        &dir.join("ours.json"),
        &json!({
            "device": format!("{device:?}"),
            "dtype": format!("{dtype:?}"),
            "timings": timings,
            "greedy": {"answer": answer, "image": image},
            "vq_pixels_mean_abs": mean_abs,
        }),
    );
    println!("wrote {}", dir.display());
}
