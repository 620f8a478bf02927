//! The built-in demo model: the real Janus-Pro architecture at a small size,
//! with deterministic random weights and a byte-level tokenizer, so every
//! feature works on a machine without downloaded weights. Its images are
//! noise and its answers nonsense.
//!
//! Weights come from a [`SeededBackend`]: each tensor is drawn from a
//! generator seeded by the model seed and the tensor's name, so the weights
//! do not depend on the order parts are built in. The same backend records
//! every tensor, which lets the demo be saved as an ordinary checkpoint.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tokenizers::Tokenizer;

use crate::config::JanusConfig;
use crate::image_processor::{ImageProcessorConfig, PREPROCESSOR_FILE};
use crate::janus::Janus;
use crate::processor::{TOKENIZER_CONFIG_FILE, TOKENIZER_FILE};
use crate::weights::{CONFIG_FILE, WEIGHTS_FILE};
use crate::ModelError;

pub const DEFAULT_SEED: u64 = 0x554c_4d52_3121;

/// Special tokens of the Janus tokenizer, in their original order.
pub const SPECIAL_TOKENS: [&str; 14] = [
    "<｜begin▁of▁sentence｜>",
    "<｜end▁of▁sentence｜>",
    "<｜▁pad▁｜>",
    "<image_placeholder>",
    "<patch_placeholder>",
    "<|ref|>",
    "<|/ref|>",
    "<|det|>",
    "<|/det|>",
    "<|grounding|>",
    "<|User|>",
    "<|Assistant|>",
    "<begin_of_image>",
    "<end_of_image>",
];

/// The demo's `config.json`, in the original layout with every size explicit.
pub fn demo_config_json() -> Value {
    json!({
        "architectures": ["MultiModalityCausalLM"],
        "model_type": "multi_modality",
        "torch_dtype": "float32",
        "language_config": {
            "model_type": "llama",
            "vocab_size": 320,
            "hidden_size": 128,
            "intermediate_size": 384,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 32,
            "hidden_act": "silu",
            "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0,
            "rope_scaling": null,
            "attention_bias": false,
            "mlp_bias": false,
            "tie_word_embeddings": false,
            "bos_token_id": 256,
            "eos_token_id": 257,
            "pad_token_id": 258,
            "torch_dtype": "float32"
        },
        "vision_config": {
            "cls": "CLIPVisionTower",
            "model_type": "vision",
            "params": {
                "model_name": "siglip_demo_patch16_64",
                "image_size": 64,
                "patch_size": 16,
                "width": 64,
                "layers": 2,
                "heads": 4,
                "head_dim": 16,
                "mlp_ratio": 4.0,
                "mlp_hidden_dim": 256,
                "select_feature": "same",
                "select_layer": -1,
                "class_token": false,
                "global_pool": "map",
                "layer_norm_eps": 1e-6,
                "qkv_bias": true,
                "final_norm": true,
                "act_layer": "gelu_erf"
            }
        },
        "aligner_config": {
            "cls": "MlpProjector",
            "model_type": "aligner",
            "params": {"projector_type": "mlp_gelu", "depth": 2, "input_dim": 64, "n_embed": 128}
        },
        "gen_vision_config": {
            "cls": "VQ-16",
            "model_type": "gen_vision",
            "params": {
                "image_token_size": 512,
                "n_embed": 8,
                "codebook_size": 512,
                "codebook_embed_dim": 8,
                "codebook_l2_norm": true,
                "codebook_show_usage": true,
                "codebook_used_len": 65536,
                "ch": 32,
                "encoder_ch_mult": [1, 1, 2, 2],
                "decoder_ch_mult": [1, 1, 2, 2],
                "num_res_blocks": 1,
                "z_channels": 32,
                "norm_num_groups": 32,
                "norm_eps": 1e-6,
                "downsample_factor": 8,
                "image_size": 64
            }
        },
        "gen_aligner_config": {
            "cls": "MlpProjector",
            "model_type": "gen_aligner",
            "params": {"projector_type": "mlp_gelu", "depth": 2, "input_dim": 8, "n_embed": 128}
        },
        "gen_head_config": {
            "cls": "vision_head",
            "model_type": "gen_head",
            "params": {"n_embed": 128, "image_token_embed": 128, "image_token_size": 512}
        }
    })
}

/// A config at the Janus-Pro-1B widths (hidden 2048, 16 heads,
/// intermediate 5504, vocab 102400, SigLIP-L at 384 px, VQ-16 with 16384
/// codes, 576 image tokens) with `lm_layers` LLaMA and `vision_layers`
/// SigLIP-L layers: the real sizes where time or memory allow fewer layers
/// (benchmarks on random weights). The tokenizer stays the demo's.
pub fn janus_pro_1b_widths_json(lm_layers: usize, vision_layers: usize) -> Value {
    let mut c = demo_config_json();
    let lm = &mut c["language_config"];
    lm["vocab_size"] = 102400.into();
    lm["hidden_size"] = 2048.into();
    lm["intermediate_size"] = 5504.into();
    lm["num_hidden_layers"] = lm_layers.into();
    lm["num_attention_heads"] = 16.into();
    lm["num_key_value_heads"] = 16.into();
    lm["head_dim"] = 128.into();
    lm["max_position_embeddings"] = 4096.into();
    let v = &mut c["vision_config"]["params"];
    v["image_size"] = 384.into();
    v["width"] = 1024.into();
    v["layers"] = vision_layers.into();
    v["heads"] = 16.into();
    v["head_dim"] = 64.into();
    v["mlp_hidden_dim"] = 4096.into();
    c["aligner_config"]["params"]["input_dim"] = 1024.into();
    c["aligner_config"]["params"]["n_embed"] = 2048.into();
    let q = &mut c["gen_vision_config"]["params"];
    q["image_token_size"] = 16384.into();
    q["codebook_size"] = 16384.into();
    q["ch"] = 128.into();
    q["encoder_ch_mult"] = json!([1, 1, 2, 2, 4]);
    q["decoder_ch_mult"] = json!([1, 1, 2, 2, 4]);
    q["num_res_blocks"] = 2.into();
    q["z_channels"] = 256.into();
    q["downsample_factor"] = 16.into();
    q["image_size"] = 384.into();
    c["gen_aligner_config"]["params"]["n_embed"] = 2048.into();
    c["gen_head_config"]["params"] =
        json!({"n_embed": 2048, "image_token_embed": 2048, "image_token_size": 16384});
    c
}

/// GPT-2's byte-to-character map used by byte-level BPE.
fn byte_chars() -> Vec<char> {
    let printable =
        |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut next = 256;
    (0..256u32)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).expect("printable byte")
            } else {
                let c = char::from_u32(next).expect("valid char");
                next += 1;
                c
            }
        })
        .collect()
}

/// A byte-level BPE tokenizer with no merges (ids 0..255 are the bytes) and
/// the Janus special tokens from id 256.
pub fn demo_tokenizer_json() -> Value {
    let vocab: serde_json::Map<String, Value> = byte_chars()
        .into_iter()
        .enumerate()
        .map(|(i, c)| (c.to_string(), json!(i)))
        .collect();
    let added: Vec<Value> = SPECIAL_TOKENS
        .iter()
        .enumerate()
        .map(|(i, t)| {
            json!({"id": 256 + i, "content": t, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": false, "vocab": vocab, "merges": []}
    })
}

pub fn demo_tokenizer() -> Result<Tokenizer, ModelError> {
    Tokenizer::from_bytes(demo_tokenizer_json().to_string().as_bytes())
        .map_err(|e| ModelError::Tokenizer(e.to_string()))
}

/// FNV-1a, stable across platforms and releases (unlike `DefaultHasher`).
fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

fn normal(rng: &mut StdRng) -> f32 {
    let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
    let u2: f64 = rng.random();
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}

/// Draws tensors deterministically from (seed, name, init hint) and records
/// them. Clones share the record, so a caller can box one for a
/// `VarBuilder` and read what it drew through another.
#[derive(Clone)]
pub struct SeededBackend {
    seed: u64,
    drawn: Arc<Mutex<BTreeMap<String, Tensor>>>,
}

impl SeededBackend {
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            drawn: Arc::new(Mutex::new(BTreeMap::new())),
        }
    }

    fn draw(&self, shape: &Shape, name: &str, init: Init) -> Vec<f32> {
        let mut rng = StdRng::seed_from_u64(self.seed ^ fnv1a(name));
        let n = shape.elem_count();
        match init {
            Init::Const(v) => vec![v as f32; n],
            Init::Randn { mean, stdev } => (0..n)
                .map(|_| mean as f32 + stdev as f32 * normal(&mut rng))
                .collect(),
            Init::Uniform { lo, up } => (0..n)
                .map(|_| rng.random_range(lo as f32..up as f32))
                .collect(),
            Init::Kaiming { .. } => {
                let fan_in = shape.dims().iter().skip(1).product::<usize>().max(1);
                let std = 1.0 / (fan_in as f32).sqrt();
                (0..n).map(|_| std * normal(&mut rng)).collect()
            }
        }
    }

    /// Every tensor drawn so far, by name.
    pub fn tensors(&self) -> BTreeMap<String, Tensor> {
        self.drawn.lock().map(|m| m.clone()).unwrap_or_default()
    }
}

impl SimpleBackend for SeededBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let data = self.draw(&s, name, h);
        let t = Tensor::from_vec(data, s, &Device::Cpu)?;
        if let Ok(mut drawn) = self.drawn.lock() {
            drawn.insert(name.to_string(), t.clone());
        }
        t.to_dtype(dtype)?.to_device(dev)
    }

    fn get_unchecked(
        &self,
        name: &str,
        _dtype: DType,
        _dev: &Device,
    ) -> candle_core::Result<Tensor> {
        candle_core::bail!("the demo backend needs a shape for {name}")
    }

    fn contains_tensor(&self, _name: &str) -> bool {
        true
    }
}

/// Tensors of real checkpoints that the forward never reads: the ViT
/// attention-pool head and the VQ codebook usage buffer.
fn unused_tensor_shapes(cfg: &JanusConfig) -> Vec<(String, Vec<usize>, Init)> {
    let v = &cfg.vision;
    let w = v.width;
    let p = "vision_model.vision_tower.attn_pool";
    let lin = |fan_in: usize| Init::Randn {
        mean: 0.0,
        stdev: 1.0 / (fan_in as f64).sqrt(),
    };
    let bias = Init::Randn {
        mean: 0.0,
        stdev: 0.02,
    };
    let mut out = Vec::new();
    if v.has_attn_pool {
        let h = v.attn_pool_mlp_hidden_dim;
        out.extend([
            (
                format!("{p}.latent"),
                vec![1, 1, w],
                Init::Randn {
                    mean: 0.0,
                    stdev: 1.0,
                },
            ),
            (format!("{p}.q.weight"), vec![w, w], lin(w)),
            (format!("{p}.q.bias"), vec![w], bias),
            (format!("{p}.kv.weight"), vec![2 * w, w], lin(w)),
            (format!("{p}.kv.bias"), vec![2 * w], bias),
            (format!("{p}.proj.weight"), vec![w, w], lin(w)),
            (format!("{p}.proj.bias"), vec![w], bias),
            (format!("{p}.norm.weight"), vec![w], Init::Const(1.0)),
            (format!("{p}.norm.bias"), vec![w], Init::Const(0.0)),
            (format!("{p}.mlp.fc1.weight"), vec![h, w], lin(w)),
            (format!("{p}.mlp.fc1.bias"), vec![h], bias),
            (format!("{p}.mlp.fc2.weight"), vec![w, h], lin(h)),
            (format!("{p}.mlp.fc2.bias"), vec![w], bias),
        ]);
    }
    if let Some(len) = cfg.gen_vision.codebook_used_len {
        out.push((
            "gen_vision_model.quantize.codebook_used".into(),
            vec![len],
            Init::Const(0.0),
        ));
    }
    out
}

/// The demo model with its config, and the backend that holds its weights.
pub fn build_demo(
    seed: u64,
    dtype: DType,
    device: &Device,
) -> Result<(Janus, SeededBackend), ModelError> {
    build_random(demo_config_json(), seed, dtype, device)
}

/// A model of any config with seeded random weights (demo, benchmarks, tests).
pub fn build_random(
    config: Value,
    seed: u64,
    dtype: DType,
    device: &Device,
) -> Result<(Janus, SeededBackend), ModelError> {
    let cfg = JanusConfig::from_value(config)?;
    let backend = SeededBackend::new(seed);
    let vb = VarBuilder::from_backend(Box::new(backend.clone()), dtype, device.clone());
    let model = Janus::new(&cfg, vb)?;
    for (name, shape, init) in unused_tensor_shapes(&cfg) {
        SimpleBackend::get(
            &backend,
            shape.into(),
            &name,
            init,
            DType::F32,
            &Device::Cpu,
        )?;
    }
    Ok((model, backend))
}

fn write(path: &Path, text: &str) -> Result<(), ModelError> {
    std::fs::write(path, text).map_err(|e| ModelError::Io {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// Writes the demo model as a checkpoint directory in the original layout:
/// config, safetensors, tokenizer and processor settings.
pub fn save_demo_checkpoint(dir: &Path, seed: u64) -> Result<(), ModelError> {
    save_random_checkpoint(dir, demo_config_json(), seed)
}

/// Writes a model of `config` with seeded random weights, f32, as a
/// checkpoint directory with the demo's tokenizer and processor settings
/// (benchmarks at other sizes).
pub fn save_random_checkpoint(dir: &Path, config: Value, seed: u64) -> Result<(), ModelError> {
    std::fs::create_dir_all(dir).map_err(|e| ModelError::Io {
        path: dir.to_path_buf(),
        message: e.to_string(),
    })?;
    let (model, backend) = build_random(config, seed, DType::F32, &Device::Cpu)?;
    let tensors: std::collections::HashMap<String, Tensor> =
        backend.tensors().into_iter().collect();
    candle_core::safetensors::save(&tensors, dir.join(WEIGHTS_FILE))?;
    write_demo_side_files(dir, &model.cfg)
}

/// The demo's config, tokenizer and processor files (everything but weights).
pub fn write_demo_side_files(dir: &Path, cfg: &JanusConfig) -> Result<(), ModelError> {
    let pretty = |v: &Value| serde_json::to_string_pretty(v).unwrap_or_default();
    write(&dir.join(CONFIG_FILE), &pretty(&cfg.raw))?;
    write(&dir.join(TOKENIZER_FILE), &pretty(&demo_tokenizer_json()))?;
    let tokenizer_config = json!({
        "add_bos_token": true,
        "add_eos_token": false,
        "bos_token": SPECIAL_TOKENS[0],
        "eos_token": SPECIAL_TOKENS[1],
        "pad_token": SPECIAL_TOKENS[2],
        "model_max_length": cfg.language.max_position_embeddings,
        "tokenizer_class": "LlamaTokenizerFast"
    });
    write(&dir.join(TOKENIZER_CONFIG_FILE), &pretty(&tokenizer_config))?;
    let image_cfg = ImageProcessorConfig::janus_default(cfg.vision.image_size);
    let mut pre = serde_json::to_value(&image_cfg).unwrap_or_default();
    pre["image_processor_type"] = json!("VLMImageProcessor");
    pre["processor_class"] = json!("VLChatProcessor");
    write(&dir.join(PREPROCESSOR_FILE), &pretty(&pre))?;
    let processor = json!({
        "add_special_token": false,
        "ignore_id": -100,
        "image_tag": SPECIAL_TOKENS[3],
        "image_start_tag": SPECIAL_TOKENS[12],
        "image_end_tag": SPECIAL_TOKENS[13],
        "pad_tag": SPECIAL_TOKENS[2],
        "mask_prompt": true,
        "num_image_tokens": cfg.vision.num_patches(),
        "processor_class": "VLChatProcessor",
        "sft_format": "deepseek"
    });
    write(&dir.join("processor_config.json"), &pretty(&processor))?;
    Ok(())
}
