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

use super::ModelError;

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

fn err(field: impl Into<String>, message: impl Into<String>) -> ModelError {
    ModelError::Config {
        field: field.into(),
        message: message.into(),
    }
}

/// A view on one JSON object that reports missing or mistyped keys by their
/// full path (`vision_config.params.width`).
struct Fields<'a> {
    path: String,
    obj: &'a serde_json::Map<String, Value>,
}

impl<'a> Fields<'a> {
    fn new(path: &str, value: Option<&'a Value>) -> Result<Self, ModelError> {
        match value {
            Some(Value::Object(obj)) => Ok(Self {
                path: path.to_string(),
                obj,
            }),
            Some(_) => Err(err(path, "must be a JSON object")),
            None => Err(err(path, "is missing")),
        }
    }
    fn child(&self, key: &str) -> Result<Fields<'a>, ModelError> {
        Fields::new(&self.name(key), self.obj.get(key))
    }
    fn name(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.path)
        }
    }
    fn present(&self, key: &str) -> Option<&'a Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }
    fn usize_opt(&self, key: &str) -> Result<Option<usize>, ModelError> {
        match self.present(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(|n| Some(n as usize))
                .ok_or_else(|| err(self.name(key), "must be a non-negative integer")),
        }
    }
    fn usize_or(&self, key: &str, default: Option<usize>) -> Result<usize, ModelError> {
        self.usize_opt(key)?
            .or(default)
            .ok_or_else(|| err(self.name(key), "is missing and has no known default"))
    }
    fn f64_or(&self, key: &str, default: Option<f64>) -> Result<f64, ModelError> {
        match self.present(key) {
            None => default.ok_or_else(|| err(self.name(key), "is missing")),
            Some(v) => v
                .as_f64()
                .ok_or_else(|| err(self.name(key), "must be a number")),
        }
    }
    fn bool_or(&self, key: &str, default: bool) -> Result<bool, ModelError> {
        match self.present(key) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| err(self.name(key), "must be true or false")),
        }
    }
    fn str_opt(&self, key: &str) -> Result<Option<&'a str>, ModelError> {
        match self.present(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| err(self.name(key), "must be a string")),
        }
    }
    fn usize_list_or(
        &self,
        key: &str,
        default: Option<&[usize]>,
    ) -> Result<Vec<usize>, ModelError> {
        match self.present(key) {
            None => default
                .map(<[usize]>::to_vec)
                .ok_or_else(|| err(self.name(key), "is missing and has no known default")),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| v.as_u64().map(|n| n as usize))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| err(self.name(key), "must be a list of non-negative integers")),
            Some(_) => Err(err(self.name(key), "must be a list")),
        }
    }
}

/// Sizes of a SigLIP tower known by its `model_name`.
struct VitPreset {
    width: usize,
    layers: usize,
    heads: usize,
    patch_size: usize,
    image_size: usize,
    mlp_ratio: f64,
}

fn vit_preset(name: &str) -> Option<VitPreset> {
    match name {
        "siglip_large_patch16_384" => Some(VitPreset {
            width: 1024,
            layers: 24,
            heads: 16,
            patch_size: 16,
            image_size: 384,
            mlp_ratio: 4.0,
        }),
        "siglip_so400m_patch14_384" => Some(VitPreset {
            width: 1152,
            layers: 27,
            heads: 16,
            patch_size: 14,
            image_size: 384,
            mlp_ratio: 3.7362,
        }),
        _ => None,
    }
}

/// Sizes of a VQ tokenizer known by its `cls` (LlamaGen `ModelArgs` defaults and
/// the hard-coded Encoder/Decoder defaults of the original code).
struct VqPreset {
    ch_mult: &'static [usize],
}

fn vq_preset(cls: &str) -> Option<VqPreset> {
    match cls {
        "VQ-16" => Some(VqPreset {
            ch_mult: &[1, 1, 2, 2, 4],
        }),
        _ => None,
    }
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

fn parse_language(f: &Fields) -> Result<LlamaConfig, ModelError> {
    // Defaults are those of transformers' LlamaConfig: the real Janus-Pro-7B
    // config leaves hidden_size, heads, etc. to them.
    if let Some(act) = f.str_opt("hidden_act")? {
        if act != "silu" {
            return Err(err(
                f.name("hidden_act"),
                format!("'{act}' is not supported (only silu)"),
            ));
        }
    }
    if f.present("rope_scaling").is_some() {
        return Err(err(f.name("rope_scaling"), "rope scaling is not supported"));
    }
    let hidden_size = f.usize_or("hidden_size", Some(4096))?;
    let num_attention_heads = f.usize_or("num_attention_heads", Some(32))?;
    if num_attention_heads == 0 || hidden_size == 0 {
        return Err(err(f.name("num_attention_heads"), "sizes must be positive"));
    }
    let num_key_value_heads = f.usize_or("num_key_value_heads", Some(num_attention_heads))?;
    if num_key_value_heads == 0 {
        return Err(err(f.name("num_key_value_heads"), "must be positive"));
    }
    let head_dim = f.usize_or("head_dim", Some(hidden_size / num_attention_heads))?;
    Ok(LlamaConfig {
        vocab_size: f.usize_or("vocab_size", Some(32000))?,
        hidden_size,
        intermediate_size: f.usize_or("intermediate_size", Some(11008))?,
        num_hidden_layers: f.usize_or("num_hidden_layers", Some(32))?,
        num_attention_heads,
        num_key_value_heads,
        head_dim,
        rms_norm_eps: f.f64_or("rms_norm_eps", Some(1e-6))?,
        rope_theta: f.f64_or("rope_theta", Some(10000.0))?,
        max_position_embeddings: f.usize_or("max_position_embeddings", Some(2048))?,
        attention_bias: f.bool_or("attention_bias", false)?,
        mlp_bias: f.bool_or("mlp_bias", false)?,
        tie_word_embeddings: f.bool_or("tie_word_embeddings", false)?,
    })
}

fn parse_vision(f: &Fields) -> Result<VisionConfig, ModelError> {
    let model_name = f
        .str_opt("model_name")?
        .unwrap_or("siglip_large_patch16_384")
        .to_string();
    let preset = vit_preset(&model_name);
    let p = |get: fn(&VitPreset) -> usize| preset.as_ref().map(get);
    let width = f.usize_or("width", p(|p| p.width))?;
    let depth = f.usize_or("layers", p(|p| p.layers))?;
    let heads = f.usize_or("heads", p(|p| p.heads))?;
    if heads == 0 || width == 0 || depth == 0 {
        return Err(err(
            f.name("heads"),
            "width, layers and heads must be positive",
        ));
    }
    let patch_size = f.usize_or("patch_size", p(|p| p.patch_size))?;
    let image_size = f.usize_or("image_size", p(|p| p.image_size))?;
    if patch_size == 0 || image_size < patch_size {
        return Err(err(
            f.name("patch_size"),
            "must be positive and at most image_size",
        ));
    }
    let mlp_ratio = f.f64_or("mlp_ratio", preset.as_ref().map(|p| p.mlp_ratio))?;
    let mlp_hidden_dim = f.usize_or("mlp_hidden_dim", Some((width as f64 * mlp_ratio) as usize))?;
    let pool_ratio = f.f64_or("attn_pool_mlp_ratio", Some(mlp_ratio))?;
    // select_layer as in the original create_siglip_vit: <= 0 counts from the end.
    let select_layer = match f.present("select_layer") {
        None => -1,
        Some(v) => v
            .as_i64()
            .ok_or_else(|| err(f.name("select_layer"), "must be an integer"))?,
    };
    let layers = if select_layer <= 0 {
        (depth as i64 + select_layer + 1).clamp(0, depth as i64) as usize
    } else {
        (select_layer as usize).min(depth)
    };
    if layers == 0 {
        return Err(err(f.name("select_layer"), "selects no block"));
    }
    if f.bool_or("class_token", false)? {
        return Err(err(
            f.name("class_token"),
            "a class token is not supported (SigLIP has none)",
        ));
    }
    if f.usize_or("reg_tokens", Some(0))? != 0 {
        return Err(err(
            f.name("reg_tokens"),
            "register tokens are not supported",
        ));
    }
    if let Some(act) = f.str_opt("act_layer")? {
        if act != "gelu_erf" && act != "gelu" {
            return Err(err(
                f.name("act_layer"),
                format!("'{act}' is not supported"),
            ));
        }
    }
    if let Some(sel) = f.str_opt("select_feature")? {
        if sel != "same" && sel != "patch" {
            return Err(err(
                f.name("select_feature"),
                format!("'{sel}' is not supported"),
            ));
        }
    }
    let head_dim = f.usize_or("head_dim", Some(width / heads))?;
    Ok(VisionConfig {
        model_name,
        image_size,
        patch_size,
        width,
        layers,
        heads,
        head_dim,
        mlp_hidden_dim,
        layer_norm_eps: f.f64_or("layer_norm_eps", Some(1e-6))?,
        qkv_bias: f.bool_or("qkv_bias", true)?,
        final_norm: f.bool_or("final_norm", true)?,
        has_attn_pool: f.str_opt("global_pool")?.unwrap_or("map") == "map",
        attn_pool_mlp_hidden_dim: (width as f64 * pool_ratio) as usize,
    })
}

fn parse_projector(f: &Fields) -> Result<ProjectorConfig, ModelError> {
    let projector_type = f
        .str_opt("projector_type")?
        .unwrap_or("mlp_gelu")
        .to_string();
    if !matches!(projector_type.as_str(), "identity" | "linear" | "mlp_gelu") {
        return Err(err(
            f.name("projector_type"),
            format!("'{projector_type}' is not supported"),
        ));
    }
    let depth = f.usize_or("depth", Some(1))?;
    if projector_type == "mlp_gelu" && depth == 0 {
        return Err(err(f.name("depth"), "must be at least 1"));
    }
    let input_dim = f.usize_or("input_dim", None)?;
    let n_embed = f.usize_or("n_embed", None)?;
    if projector_type == "identity" && input_dim != n_embed {
        return Err(err(
            f.name("n_embed"),
            "an identity projector needs input_dim == n_embed",
        ));
    }
    Ok(ProjectorConfig {
        projector_type,
        depth,
        input_dim,
        n_embed,
    })
}

fn parse_gen_head(f: &Fields) -> Result<GenHeadConfig, ModelError> {
    Ok(GenHeadConfig {
        n_embed: f.usize_or("n_embed", None)?,
        image_token_embed: f.usize_or("image_token_embed", None)?,
        image_token_size: f.usize_or("image_token_size", None)?,
    })
}

fn parse_vq(f: &Fields, cls: &str, vision_image_size: usize) -> Result<VqConfig, ModelError> {
    let preset = vq_preset(cls);
    let known = preset.is_some();
    let ch_mult_default = preset.as_ref().map(|p| p.ch_mult);
    let encoder_ch_mult = f.usize_list_or("encoder_ch_mult", ch_mult_default)?;
    let decoder_ch_mult = f.usize_list_or("decoder_ch_mult", ch_mult_default)?;
    if encoder_ch_mult.is_empty() || encoder_ch_mult.len() != decoder_ch_mult.len() {
        return Err(err(
            f.name("decoder_ch_mult"),
            "encoder_ch_mult and decoder_ch_mult must be non-empty and of the same length",
        ));
    }
    if encoder_ch_mult
        .iter()
        .chain(&decoder_ch_mult)
        .any(|&m| m == 0)
    {
        return Err(err(
            f.name("encoder_ch_mult"),
            "multipliers must be positive",
        ));
    }
    let if_known = |v: usize| known.then_some(v);
    // `image_token_size` / `n_embed` are the original keys; the explicit
    // `codebook_*` keys must agree with them when both are given.
    let codebook_size = f.usize_or(
        "codebook_size",
        f.usize_opt("image_token_size")?.or(if_known(16384)),
    )?;
    let codebook_embed_dim = f.usize_or(
        "codebook_embed_dim",
        f.usize_opt("n_embed")?.or(if_known(8)),
    )?;
    if let Some(k) = f.usize_opt("image_token_size")? {
        if k != codebook_size {
            return Err(err(
                f.name("image_token_size"),
                format!("{k} != codebook_size {codebook_size}"),
            ));
        }
    }
    if let Some(d) = f.usize_opt("n_embed")? {
        if d != codebook_embed_dim {
            return Err(err(
                f.name("n_embed"),
                format!("{d} != codebook_embed_dim {codebook_embed_dim}"),
            ));
        }
    }
    if codebook_size == 0 || codebook_embed_dim == 0 {
        return Err(err(
            f.name("codebook_size"),
            "codebook sizes must be positive",
        ));
    }
    let cfg = VqConfig {
        cls: cls.to_string(),
        codebook_size,
        codebook_embed_dim,
        codebook_l2_norm: f.bool_or("codebook_l2_norm", true)?,
        codebook_used_len: if f.bool_or("codebook_show_usage", true)? {
            Some(f.usize_or("codebook_used_len", Some(65536))?)
        } else {
            None
        },
        ch: f.usize_or("ch", if_known(128))?,
        encoder_ch_mult,
        decoder_ch_mult,
        num_res_blocks: f.usize_or("num_res_blocks", if_known(2))?,
        z_channels: f.usize_or("z_channels", if_known(256))?,
        in_channels: f.usize_or("in_channels", Some(3))?,
        out_channels: f.usize_or("out_channels", Some(3))?,
        norm_num_groups: f.usize_or("norm_num_groups", Some(32))?,
        norm_eps: f.f64_or("norm_eps", Some(1e-6))?,
        image_size: f.usize_or("image_size", Some(vision_image_size))?,
    };
    if cfg.ch == 0 || cfg.z_channels == 0 || cfg.num_res_blocks == 0 || cfg.norm_num_groups == 0 {
        return Err(err(
            f.name("ch"),
            "ch, z_channels, num_res_blocks and norm_num_groups must be positive",
        ));
    }
    if cfg.in_channels != 3 || cfg.out_channels != 3 {
        return Err(err(
            f.name("in_channels"),
            "only RGB (3 channels) is supported",
        ));
    }
    if let Some(factor) = f.usize_opt("downsample_factor")? {
        if factor != cfg.downsample_factor() {
            return Err(err(
                f.name("downsample_factor"),
                format!(
                    "{factor} != 2^(len(ch_mult) - 1) = {}",
                    cfg.downsample_factor()
                ),
            ));
        }
    }
    if let Some(norm_type) = f.str_opt("norm_type")? {
        if norm_type != "group" {
            return Err(err(
                f.name("norm_type"),
                format!("'{norm_type}' is not supported (only group)"),
            ));
        }
    }
    if !f.bool_or("resamp_with_conv", true)? {
        return Err(err(
            f.name("resamp_with_conv"),
            "only convolutional resampling is supported",
        ));
    }
    Ok(cfg)
}
