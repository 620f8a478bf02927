//! SigLIP ViT understanding encoder (`vision_model.vision_tower.*`, timm
//! naming): patch embedding conv, learned position embedding (no class
//! token), pre-norm blocks, final LayerNorm. The attention-pool head is in
//! real checkpoints but is never run, so it is not loaded.

use candle_core::{Result, Tensor};
use candle_nn::{Init, VarBuilder};

use crate::config::VisionConfig;
use crate::kernels;
use crate::nn::{linear, LayerNorm, Linear};
use crate::ops::{gelu_erf, softmax_last, Pass};

#[derive(Debug, Clone)]
struct Block {
    norm1: LayerNorm,
    qkv: Linear,
    proj: Linear,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

#[derive(Debug, Clone)]
pub struct VisionTower {
    patch_weight: Tensor,
    patch_bias: Tensor,
    pos_embed: Tensor,
    blocks: Vec<Block>,
    norm: Option<LayerNorm>,
    cfg: VisionConfig,
}

impl VisionTower {
    /// `vb` points at `vision_model.vision_tower`.
    pub fn new(cfg: &VisionConfig, vb: VarBuilder) -> Result<Self> {
        let (w, p, eps) = (cfg.width, cfg.patch_size, cfg.layer_norm_eps);
        let fan_in = 3 * p * p;
        let pe = vb.pp("patch_embed.proj");
        let patch_weight = pe.get_with_hints(
            (w, 3, p, p),
            "weight",
            Init::Randn {
                mean: 0.0,
                stdev: 1.0 / (fan_in as f64).sqrt(),
            },
        )?;
        let patch_bias = pe.get_with_hints(
            w,
            "bias",
            Init::Randn {
                mean: 0.0,
                stdev: 0.02,
            },
        )?;
        let pos_embed = vb.get_with_hints(
            (1, cfg.num_patches(), w),
            "pos_embed",
            Init::Randn {
                mean: 0.0,
                stdev: 0.5,
            },
        )?;
        let blocks = (0..cfg.layers)
            .map(|i| {
                let b = vb.pp(format!("blocks.{i}"));
                Ok(Block {
                    norm1: LayerNorm::new(b.pp("norm1"), w, eps)?,
                    qkv: linear(b.pp("attn.qkv"), w, 3 * w, cfg.qkv_bias)?,
                    proj: linear(b.pp("attn.proj"), w, w, true)?,
                    norm2: LayerNorm::new(b.pp("norm2"), w, eps)?,
                    fc1: linear(b.pp("mlp.fc1"), w, cfg.mlp_hidden_dim, true)?,
                    fc2: linear(b.pp("mlp.fc2"), cfg.mlp_hidden_dim, w, true)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let norm = if cfg.final_norm {
            Some(LayerNorm::new(vb.pp("norm"), w, eps)?)
        } else {
            None
        };
        Ok(Self {
            patch_weight,
            patch_bias,
            pos_embed,
            blocks,
            norm,
            cfg: cfg.clone(),
        })
    }

    /// Image features `[B, N, W]` of normalised pixels `[B, 3, S, S]`.
    pub fn forward(&self, pixels: &Tensor, pass: Pass) -> Result<Tensor> {
        let p = self.cfg.patch_size;
        let x = pixels
            .conv2d(&self.patch_weight, 0, p, 1, 1)?
            .broadcast_add(&self.patch_bias.reshape((1, self.cfg.width, 1, 1))?)?;
        let (b, w, gh, gw) = x.dims4()?;
        let mut x = x
            .reshape((b, w, gh * gw))?
            .transpose(1, 2)?
            .broadcast_add(&self.pos_embed)?;
        for block in &self.blocks {
            let h = block.norm1.forward(&x, pass)?;
            x = (&x + self.attention(block, &h, pass)?)?;
            let h = block.norm2.forward(&x, pass)?;
            let h = block.fc2.forward(&gelu_erf(&block.fc1.forward(&h)?)?)?;
            x = (x + h)?;
        }
        match &self.norm {
            Some(norm) => norm.forward(&x, pass),
            None => Ok(x),
        }
    }

    fn attention(&self, block: &Block, x: &Tensor, pass: Pass) -> Result<Tensor> {
        let (b, n, w) = x.dims3()?;
        let (heads, d) = (self.cfg.heads, self.cfg.head_dim);
        // qkv columns are [q | k | v], each head-major.
        let qkv = block
            .qkv
            .forward(x)?
            .reshape((b, n, 3, heads, d))?
            .permute((2, 0, 3, 1, 4))?;
        let (q, k, v) = (qkv.get(0)?, qkv.get(1)?, qkv.get(2)?);
        let scale = 1.0 / (d as f64).sqrt();
        if kernels::serves(&[&q, &k, &v]) {
            return block
                .proj
                .forward(&kernels::attention(&q, &k, &v, None, scale)?);
        }
        let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
        let scores = (q.matmul(&k.t()?)? * scale)?;
        let out = softmax_last(&scores, pass)?.matmul(&v)?;
        block
            .proj
            .forward(&out.transpose(1, 2)?.reshape((b, n, w))?)
    }
}
