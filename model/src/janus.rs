//! The unified Janus-Pro model (`MultiModalityCausalLM`): the LLaMA decoder
//! shared by both tasks, the understanding path (SigLIP + aligner) and the
//! generation path (gen_embed + gen_aligner in, gen_head out, VQ to pixels).

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;

use crate::config::JanusConfig;
use crate::llama::Llama;
use crate::nn::embedding;
use crate::ops::Pass;
use crate::projector::{GenHead, MlpProjector};
use crate::siglip::VisionTower;
use crate::vq::VqModel;

#[derive(Debug, Clone)]
pub struct Janus {
    pub cfg: JanusConfig,
    pub language_model: Llama,
    pub vision_tower: VisionTower,
    pub aligner: MlpProjector,
    pub gen_vision: VqModel,
    pub gen_aligner: MlpProjector,
    pub gen_head: GenHead,
    gen_embed: Tensor,
}

impl Janus {
    /// `vb` points at the checkpoint root (original DeepSeek tensor names).
    pub fn new(cfg: &JanusConfig, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            language_model: Llama::new(&cfg.language, vb.pp("language_model"))?,
            vision_tower: VisionTower::new(&cfg.vision, vb.pp("vision_model.vision_tower"))?,
            aligner: MlpProjector::new(&cfg.aligner, vb.pp("aligner"))?,
            gen_vision: VqModel::new(&cfg.gen_vision, vb.pp("gen_vision_model"))?,
            gen_aligner: MlpProjector::new(&cfg.gen_aligner, vb.pp("gen_aligner"))?,
            gen_head: GenHead::new(&cfg.gen_head, vb.pp("gen_head"))?,
            gen_embed: embedding(
                &vb,
                cfg.gen_vision.codebook_size,
                cfg.gen_vision.codebook_embed_dim,
                "gen_embed.weight",
            )?,
            cfg: cfg.clone(),
        })
    }

    pub fn device(&self) -> &Device {
        self.gen_embed.device()
    }

    pub fn dtype(&self) -> DType {
        self.gen_embed.dtype()
    }

    /// Aligned image features `[n, N, H]` of normalised pixels `[n, 3, S, S]`.
    pub fn image_embeds(&self, pixels: &Tensor, pass: Pass) -> Result<Tensor> {
        let pixels = pixels.to_dtype(self.dtype())?;
        self.aligner
            .forward(&self.vision_tower.forward(&pixels, pass)?)
    }

    /// Token embeddings of `ids` (`[B, T]`) with the rows where
    /// `images_seq_mask` is set replaced, in order, by the rows of
    /// `image_embeds` (`[n, N, H]`, N rows per image). The replaced token
    /// embeddings are dropped, so they receive no gradient.
    pub fn merge_image_embeds(
        &self,
        ids: &Tensor,
        images_seq_mask: &[Vec<bool>],
        image_embeds: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let text = self.language_model.embed(ids)?;
        let slots: usize = images_seq_mask.iter().flatten().filter(|&&m| m).count();
        let Some(image_embeds) = image_embeds.filter(|_| slots > 0) else {
            if slots > 0 {
                candle_core::bail!("{slots} image positions but no image embeddings");
            }
            return Ok(text);
        };
        let h = self.cfg.language.hidden_size;
        let image_rows = image_embeds.reshape(((), h))?;
        let available = image_rows.dim(0)?;
        if slots != available {
            candle_core::bail!("{slots} image positions but {available} image embedding rows");
        }
        // Gather from [text rows | image rows] so both paths stay differentiable.
        let mut index = Vec::with_capacity(b * t);
        let mut next_image = 0u32;
        for (r, row) in images_seq_mask.iter().enumerate() {
            for (p, &is_image) in row.iter().enumerate() {
                if is_image {
                    index.push((b * t) as u32 + next_image);
                    next_image += 1;
                } else {
                    index.push((r * t + p) as u32);
                }
            }
        }
        let all = Tensor::cat(
            &[
                &text.reshape((b * t, h))?,
                &image_rows.to_dtype(text.dtype())?,
            ],
            0,
        )?;
        all.index_select(&Tensor::new(index.as_slice(), ids.device())?, 0)?
            .reshape((b, t, h))
    }

    /// Input embeddings `[B, T, H]` of image tokens `[B, T]`:
    /// `gen_aligner(gen_embed[tokens])`.
    pub fn gen_token_embeds(&self, tokens: &Tensor) -> Result<Tensor> {
        let (b, t) = tokens.dims2()?;
        let rows = self.gen_embed.index_select(&tokens.flatten_all()?, 0)?;
        self.gen_aligner
            .forward(&rows)?
            .reshape((b, t, self.cfg.language.hidden_size))
    }

    /// One tiny forward through the parts that serve and train (a token
    /// through the decoder and both heads, an image token through the
    /// generation embedding, one code through the VQ decoder), so that a
    /// dtype the device cannot compute fails at start-up, not request by
    /// request. Returns the first op that fails.
    pub fn check_runs(&self) -> Result<()> {
        let device = self.device();
        let ids = Tensor::zeros((1, 1), DType::U32, device)?;
        let lm = &self.language_model;
        let ctx = lm.context(&[vec![0]], &[vec![true]])?;
        let hidden = lm.forward_hidden(&lm.embed(&ids)?, &ctx, None, Pass::Inference)?;
        lm.logits(&hidden)?.to_dtype(DType::F32)?;
        self.gen_head.forward(&hidden)?.to_dtype(DType::F32)?;
        self.gen_token_embeds(&ids)?.to_dtype(DType::F32)?;
        self.gen_vision.decode_codes(&ids)?.to_dtype(DType::F32)?;
        Ok(())
    }
}
