//! `config.json` of a Janus-Pro / ULM-R1 checkpoint, in the original DeepSeek
//! layout: a `language_config` (a Hugging Face `LlamaConfig` dict) and five
//! `{cls, model_type, params}` sub-configs.
//!
//! The original code hard-codes the ViT and VQ sizes by name (`model_name`,
//! `cls`). We keep those names as presets and let explicit fields override
//! them, so both real checkpoints (whose configs carry only the names) and the
//! small reference checkpoints (which spell every size out) load from the file
//! alone. Every size the network uses comes from here.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::ModelError;

mod parse;

use parse::{err, parse_gen_head, parse_language, parse_projector, parse_vision, parse_vq, Fields};

/// The LLaMA decoder (`language_model.*`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    pub attention_bias: bool,
    pub mlp_bias: bool,
    pub tie_word_embeddings: bool,
}

/// The SigLIP ViT understanding encoder (`vision_model.vision_tower.*`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VisionConfig {
    pub model_name: String,
    pub image_size: usize,
    pub patch_size: usize,
    pub width: usize,
    /// Blocks built and run (the preset depth cut by `select_layer`).
    pub layers: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub mlp_hidden_dim: usize,
    pub layer_norm_eps: f64,
    pub qkv_bias: bool,
    pub final_norm: bool,
    /// Whether the unused attention-pool head (`attn_pool.*`) is in the weights.
    pub has_attn_pool: bool,
    pub attn_pool_mlp_hidden_dim: usize,
}

impl VisionConfig {
    pub fn grid_size(&self) -> usize {
        self.image_size / self.patch_size
    }
    pub fn num_patches(&self) -> usize {
        self.grid_size() * self.grid_size()
    }
}

/// `MlpProjector` (aligner, gen_aligner).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProjectorConfig {
    pub projector_type: String,
    pub depth: usize,
    pub input_dim: usize,
    pub n_embed: usize,
}

/// `vision_head` (gen_head): LM hidden -> codebook logits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenHeadConfig {
    pub n_embed: usize,
    pub image_token_embed: usize,
    pub image_token_size: usize,
}

/// The VQ image tokenizer (`gen_vision_model.*`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VqConfig {
    pub cls: String,
    pub codebook_size: usize,
    pub codebook_embed_dim: usize,
    pub codebook_l2_norm: bool,
    pub codebook_used_len: Option<usize>,
    pub ch: usize,
    pub encoder_ch_mult: Vec<usize>,
    pub decoder_ch_mult: Vec<usize>,
    pub num_res_blocks: usize,
    pub z_channels: usize,
    pub in_channels: usize,
    pub out_channels: usize,
    pub norm_num_groups: usize,
    pub norm_eps: f64,
    /// Side of the generated image in pixels.
    pub image_size: usize,
}

impl VqConfig {
    pub fn downsample_factor(&self) -> usize {
        1 << (self.encoder_ch_mult.len() - 1)
    }
    /// Code grid side: `image_size / downsample`.
    pub fn grid_size(&self) -> usize {
        self.image_size / self.downsample_factor()
    }
    /// Image tokens per generated image.
    pub fn image_tokens(&self) -> usize {
        self.grid_size() * self.grid_size()
    }
}

/// The whole unified model.
#[derive(Debug, Clone, PartialEq)]
pub struct JanusConfig {
    pub language: LlamaConfig,
    pub vision: VisionConfig,
    pub aligner: ProjectorConfig,
    pub gen_vision: VqConfig,
    pub gen_aligner: ProjectorConfig,
    pub gen_head: GenHeadConfig,
    /// The file as read, so a saved checkpoint keeps unknown keys.
    pub raw: Value,
}

impl JanusConfig {
    pub fn from_json_str(text: &str) -> Result<Self, ModelError> {
        let raw: Value = serde_json::from_str(text)
            .map_err(|e| err("config.json", format!("is not valid JSON: {e}")))?;
        Self::from_value(raw)
    }

    pub fn from_value(raw: Value) -> Result<Self, ModelError> {
        let root = Fields::new("", Some(&raw))?;
        let language = parse_language(&root.child("language_config")?)?;
        let vision = parse_vision(&root.child("vision_config")?.child("params")?)?;
        let aligner = parse_projector(&root.child("aligner_config")?.child("params")?)?;
        let gen_aligner = parse_projector(&root.child("gen_aligner_config")?.child("params")?)?;
        let gen_head = parse_gen_head(&root.child("gen_head_config")?.child("params")?)?;
        let gen_vision_cfg = root.child("gen_vision_config")?;
        let cls = gen_vision_cfg
            .str_opt("cls")?
            .unwrap_or("VQ-16")
            .to_string();
        let gen_vision = parse_vq(&gen_vision_cfg.child("params")?, &cls, vision.image_size)?;
        let cfg = Self {
            language,
            vision,
            aligner,
            gen_vision,
            gen_aligner,
            gen_head,
            raw,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Cross-checks between the parts: a config that parses but whose parts
    /// cannot be wired together is rejected before any weight is read.
    fn validate(&self) -> Result<(), ModelError> {
        let lm = &self.language;
        let check = |ok: bool, field: &str, message: String| {
            if ok {
                Ok(())
            } else {
                Err(err(field, message))
            }
        };
        check(
            lm.num_attention_heads
                .is_multiple_of(lm.num_key_value_heads),
            "language_config.num_key_value_heads",
            format!(
                "{} does not divide num_attention_heads {}",
                lm.num_key_value_heads, lm.num_attention_heads
            ),
        )?;
        check(
            lm.head_dim.is_multiple_of(2),
            "language_config.head_dim",
            format!("{} must be even for rotary embeddings", lm.head_dim),
        )?;
        let v = &self.vision;
        check(
            v.image_size.is_multiple_of(v.patch_size),
            "vision_config.params.image_size",
            format!(
                "{} is not a multiple of patch_size {}",
                v.image_size, v.patch_size
            ),
        )?;
        check(
            v.heads * v.head_dim == v.width,
            "vision_config.params.head_dim",
            format!(
                "heads {} x head_dim {} != width {}",
                v.heads, v.head_dim, v.width
            ),
        )?;
        check(
            self.aligner.input_dim == v.width,
            "aligner_config.params.input_dim",
            format!("{} != vision width {}", self.aligner.input_dim, v.width),
        )?;
        check(
            self.aligner.n_embed == lm.hidden_size,
            "aligner_config.params.n_embed",
            format!(
                "{} != language hidden_size {}",
                self.aligner.n_embed, lm.hidden_size
            ),
        )?;
        let vq = &self.gen_vision;
        check(
            self.gen_aligner.input_dim == vq.codebook_embed_dim,
            "gen_aligner_config.params.input_dim",
            format!(
                "{} != codebook_embed_dim {}",
                self.gen_aligner.input_dim, vq.codebook_embed_dim
            ),
        )?;
        check(
            self.gen_aligner.n_embed == lm.hidden_size,
            "gen_aligner_config.params.n_embed",
            format!(
                "{} != language hidden_size {}",
                self.gen_aligner.n_embed, lm.hidden_size
            ),
        )?;
        check(
            self.gen_head.n_embed == lm.hidden_size,
            "gen_head_config.params.n_embed",
            format!(
                "{} != language hidden_size {}",
                self.gen_head.n_embed, lm.hidden_size
            ),
        )?;
        check(
            self.gen_head.image_token_size == vq.codebook_size,
            "gen_head_config.params.image_token_size",
            format!(
                "{} != codebook_size {}",
                self.gen_head.image_token_size, vq.codebook_size
            ),
        )?;
        check(
            vq.image_size.is_multiple_of(vq.downsample_factor()),
            "gen_vision_config.params.image_size",
            format!(
                "{} is not a multiple of the downsample factor {}",
                vq.image_size,
                vq.downsample_factor()
            ),
        )?;
        let channels = vq
            .encoder_ch_mult
            .iter()
            .chain(&vq.decoder_ch_mult)
            .map(|m| m * vq.ch)
            .chain([vq.ch]);
        for c in channels {
            check(
                c.is_multiple_of(vq.norm_num_groups),
                "gen_vision_config.params.ch",
                format!(
                    "{c} channels are not divisible into {} groups",
                    vq.norm_num_groups
                ),
            )?;
        }
        Ok(())
    }
}
