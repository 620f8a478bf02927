//! Reading the sub-configs: a JSON view that names missing or mistyped
//! keys by their full path, the presets the original code hard-codes by
//! name, and one parser per section.

use serde_json::Value;

use super::{GenHeadConfig, LlamaConfig, ProjectorConfig, VisionConfig, VqConfig};
use crate::ModelError;

pub(super) fn err(field: impl Into<String>, message: impl Into<String>) -> ModelError {
    ModelError::Config {
        field: field.into(),
        message: message.into(),
    }
}

/// A view on one JSON object that reports missing or mistyped keys by their
/// full path (`vision_config.params.width`).
pub(super) struct Fields<'a> {
    path: String,
    obj: &'a serde_json::Map<String, Value>,
}

impl<'a> Fields<'a> {
    pub(super) fn new(path: &str, value: Option<&'a Value>) -> Result<Self, ModelError> {
        match value {
            Some(Value::Object(obj)) => Ok(Self {
                path: path.to_string(),
                obj,
            }),
            Some(_) => Err(err(path, "must be a JSON object")),
            None => Err(err(path, "is missing")),
        }
    }
    pub(super) fn child(&self, key: &str) -> Result<Fields<'a>, ModelError> {
        Fields::new(&self.name(key), self.obj.get(key))
    }
    pub(super) fn name(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.path)
        }
    }
    pub(super) fn present(&self, key: &str) -> Option<&'a Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }
    pub(super) fn usize_opt(&self, key: &str) -> Result<Option<usize>, ModelError> {
        match self.present(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(|n| Some(n as usize))
                .ok_or_else(|| err(self.name(key), "must be a non-negative integer")),
        }
    }
    pub(super) fn usize_or(&self, key: &str, default: Option<usize>) -> Result<usize, ModelError> {
        self.usize_opt(key)?
            .or(default)
            .ok_or_else(|| err(self.name(key), "is missing and has no known default"))
    }
    pub(super) fn f64_or(&self, key: &str, default: Option<f64>) -> Result<f64, ModelError> {
        match self.present(key) {
            None => default.ok_or_else(|| err(self.name(key), "is missing")),
            Some(v) => v
                .as_f64()
                .ok_or_else(|| err(self.name(key), "must be a number")),
        }
    }
    pub(super) fn bool_or(&self, key: &str, default: bool) -> Result<bool, ModelError> {
        match self.present(key) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| err(self.name(key), "must be true or false")),
        }
    }
    pub(super) fn str_opt(&self, key: &str) -> Result<Option<&'a str>, ModelError> {
        match self.present(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| err(self.name(key), "must be a string")),
        }
    }
    pub(super) fn usize_list_or(
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

pub(super) fn parse_language(f: &Fields) -> Result<LlamaConfig, ModelError> {
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

pub(super) fn parse_vision(f: &Fields) -> Result<VisionConfig, ModelError> {
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

pub(super) fn parse_projector(f: &Fields) -> Result<ProjectorConfig, ModelError> {
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

pub(super) fn parse_gen_head(f: &Fields) -> Result<GenHeadConfig, ModelError> {
    Ok(GenHeadConfig {
        n_embed: f.usize_or("n_embed", None)?,
        image_token_embed: f.usize_or("image_token_embed", None)?,
        image_token_size: f.usize_or("image_token_size", None)?,
    })
}

pub(super) fn parse_vq(
    f: &Fields,
    cls: &str,
    vision_image_size: usize,
) -> Result<VqConfig, ModelError> {
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
