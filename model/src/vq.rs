//! VQ image tokenizer (`gen_vision_model.*`, LlamaGen "VQ-16" layout): a
//! convolutional encoder, an L2-normalised codebook, and a decoder. Channel
//! counts, depths and group counts all come from the config.

use candle_core::{DType, Result, Tensor, D};
use candle_nn::{Init, VarBuilder};

use crate::config::VqConfig;
use crate::conv::conv2d;
use crate::kernels;
use crate::nn::{embedding, norm_bias, norm_weight};
use crate::ops::{l2_normalize, softmax_last, swish, Pass};

#[derive(Debug, Clone)]
struct Conv {
    weight: Tensor,
    bias: Tensor,
    padding: usize,
    stride: usize,
}

impl Conv {
    fn new(
        vb: VarBuilder,
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        let std = 1.0 / ((cin * k * k) as f64).sqrt();
        Ok(Self {
            weight: vb.get_with_hints(
                (cout, cin, k, k),
                "weight",
                Init::Randn {
                    mean: 0.0,
                    stdev: std,
                },
            )?,
            bias: vb.get_with_hints(
                cout,
                "bias",
                Init::Randn {
                    mean: 0.0,
                    stdev: 0.02,
                },
            )?,
            padding,
            stride,
        })
    }

    fn forward(&self, x: &Tensor, pass: Pass) -> Result<Tensor> {
        let c = self.bias.dim(0)?;
        conv2d(x, &self.weight, self.padding, self.stride, pass)?
            .broadcast_add(&self.bias.reshape((1, c, 1, 1))?)
    }

    /// On channels-last `x`: the decoder's 3x3 (padding 1, reading `x`
    /// upsampled by two when `upsample`) and 1x1 convolutions.
    fn forward_channels_last(&self, x: &Tensor, upsample: bool) -> Result<Tensor> {
        match self.weight.dim(3)? {
            1 if !upsample => kernels::conv1x1(x, &self.weight, &self.bias),
            _ => self.forward_channels_last_onto(x, upsample, None),
        }
    }

    /// A 3x3 convolution (padding 1) of channels-last `x` plus `residual`.
    fn forward_channels_last_onto(
        &self,
        x: &Tensor,
        upsample: bool,
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        match self.weight.dim(3)? {
            3 if self.padding == 1 && self.stride == 1 => {
                kernels::conv3x3(x, &self.weight, &self.bias, upsample, residual)
            }
            k => candle_core::bail!(
                "no channels-last {k}x{k} convolution with stride {}",
                self.stride
            ),
        }
    }
}

#[derive(Debug, Clone)]
struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    fn new(vb: VarBuilder, channels: usize, cfg: &VqConfig) -> Result<Self> {
        Ok(Self {
            weight: norm_weight(&vb, channels, "weight")?,
            bias: norm_bias(&vb, channels, "bias")?,
            groups: cfg.norm_num_groups,
            eps: cfg.norm_eps,
        })
    }

    /// Statistics in f32 for half-precision inputs.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let dtype = x.dtype();
        let g = x
            .to_dtype(DType::F32)?
            .reshape((b, self.groups, (c / self.groups) * h * w))?;
        let mean = g.mean_keepdim(D::Minus1)?;
        let centered = g.broadcast_sub(&mean)?;
        let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centered.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        normed
            .reshape((b, c, h, w))?
            .to_dtype(dtype)?
            .broadcast_mul(&self.weight.reshape((1, c, 1, 1))?)?
            .broadcast_add(&self.bias.reshape((1, c, 1, 1))?)
    }

    /// On channels-last `x`, followed by swish when `swish`.
    fn forward_channels_last(&self, x: &Tensor, swish: bool) -> Result<Tensor> {
        kernels::group_norm(x, &self.weight, &self.bias, self.groups, self.eps, swish)
    }
}

#[derive(Debug, Clone)]
struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv,
    norm2: GroupNorm,
    conv2: Conv,
    nin_shortcut: Option<Conv>,
}

impl ResnetBlock {
    fn new(vb: VarBuilder, cin: usize, cout: usize, cfg: &VqConfig) -> Result<Self> {
        Ok(Self {
            norm1: GroupNorm::new(vb.pp("norm1"), cin, cfg)?,
            conv1: Conv::new(vb.pp("conv1"), cin, cout, 3, 1, 1)?,
            norm2: GroupNorm::new(vb.pp("norm2"), cout, cfg)?,
            conv2: Conv::new(vb.pp("conv2"), cout, cout, 3, 1, 1)?,
            nin_shortcut: if cin != cout {
                Some(Conv::new(vb.pp("nin_shortcut"), cin, cout, 1, 1, 0)?)
            } else {
                None
            },
        })
    }

    fn forward(&self, x: &Tensor, pass: Pass) -> Result<Tensor> {
        let h = self.conv1.forward(&swish(&self.norm1.forward(x)?)?, pass)?;
        let h = self
            .conv2
            .forward(&swish(&self.norm2.forward(&h)?)?, pass)?;
        let shortcut = match &self.nin_shortcut {
            Some(conv) => conv.forward(x, pass)?,
            None => x.clone(),
        };
        shortcut + h
    }

    fn forward_channels_last(&self, x: &Tensor) -> Result<Tensor> {
        let h = self
            .conv1
            .forward_channels_last(&self.norm1.forward_channels_last(x, true)?, false)?;
        let shortcut = match &self.nin_shortcut {
            Some(conv) => conv.forward_channels_last(x, false)?,
            None => x.clone(),
        };
        self.conv2.forward_channels_last_onto(
            &self.norm2.forward_channels_last(&h, true)?,
            false,
            Some(&shortcut),
        )
    }
}

/// Single-head self-attention over the h*w positions.
#[derive(Debug, Clone)]
struct AttnBlock {
    norm: GroupNorm,
    q: Conv,
    k: Conv,
    v: Conv,
    proj_out: Conv,
}

impl AttnBlock {
    fn new(vb: VarBuilder, c: usize, cfg: &VqConfig) -> Result<Self> {
        Ok(Self {
            norm: GroupNorm::new(vb.pp("norm"), c, cfg)?,
            q: Conv::new(vb.pp("q"), c, c, 1, 1, 0)?,
            k: Conv::new(vb.pp("k"), c, c, 1, 1, 0)?,
            v: Conv::new(vb.pp("v"), c, c, 1, 1, 0)?,
            proj_out: Conv::new(vb.pp("proj_out"), c, c, 1, 1, 0)?,
        })
    }

    fn forward(&self, x: &Tensor, pass: Pass) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let n = self.norm.forward(x)?;
        let q = self
            .q
            .forward(&n, pass)?
            .reshape((b, c, h * w))?
            .transpose(1, 2)?
            .contiguous()?;
        let k = self.k.forward(&n, pass)?.reshape((b, c, h * w))?;
        let v = self.v.forward(&n, pass)?.reshape((b, c, h * w))?;
        let weights = softmax_last(&(q.matmul(&k)? * (c as f64).powf(-0.5))?, pass)?;
        let out = v.matmul(&weights.t()?)?.reshape((b, c, h, w))?;
        x + self.proj_out.forward(&out, pass)?
    }

    fn forward_channels_last(&self, x: &Tensor) -> Result<Tensor> {
        let (b, h, w, c) = x.dims4()?;
        let n = self.norm.forward_channels_last(x, false)?;
        // One head over the h*w positions: [B, 1, h*w, C].
        let heads = |conv: &Conv| {
            conv.forward_channels_last(&n, false)?
                .reshape((b, 1, h * w, c))
        };
        let out = kernels::attention(
            &heads(&self.q)?,
            &heads(&self.k)?,
            &heads(&self.v)?,
            None,
            (c as f64).powf(-0.5),
        )?
        .reshape((b, h, w, c))?;
        x + self.proj_out.forward_channels_last(&out, false)?
    }
}

/// One resolution level: res blocks, each optionally followed by attention.
#[derive(Debug, Clone)]
struct Level {
    res: Vec<ResnetBlock>,
    attn: Vec<AttnBlock>,
    resample: Option<Conv>,
}

/// How a level changes the resolution after its blocks: a 3x3 conv named
/// `name` with this stride and padding.
#[derive(Clone, Copy)]
struct Resample {
    name: &'static str,
    stride: usize,
    padding: usize,
}

impl Level {
    /// `blocks` resnet blocks from `block_in` to `block_out` channels, each
    /// followed by attention when `attention`, then the resampling conv.
    /// Returns the level and its output channels.
    fn new(
        vb: VarBuilder,
        (block_in, block_out): (usize, usize),
        blocks: usize,
        attention: bool,
        resample: Option<Resample>,
        cfg: &VqConfig,
    ) -> Result<(Self, usize)> {
        let mut ch = block_in;
        let mut res = Vec::with_capacity(blocks);
        let mut attn = Vec::new();
        for r in 0..blocks {
            res.push(ResnetBlock::new(
                vb.pp(format!("res.{r}")),
                ch,
                block_out,
                cfg,
            )?);
            ch = block_out;
            if attention {
                attn.push(AttnBlock::new(vb.pp(format!("attn.{r}")), ch, cfg)?);
            }
        }
        let resample = resample
            .map(|r| Conv::new(vb.pp(r.name), ch, ch, 3, r.stride, r.padding))
            .transpose()?;
        Ok((
            Self {
                res,
                attn,
                resample,
            },
            ch,
        ))
    }

    fn forward(&self, x: &Tensor, pass: Pass) -> Result<Tensor> {
        let mut h = x.clone();
        for (i, res) in self.res.iter().enumerate() {
            h = res.forward(&h, pass)?;
            if let Some(attn) = self.attn.get(i) {
                h = attn.forward(&h, pass)?;
            }
        }
        Ok(h)
    }

    fn forward_channels_last(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        for (i, res) in self.res.iter().enumerate() {
            h = res.forward_channels_last(&h)?;
            if let Some(attn) = self.attn.get(i) {
                h = attn.forward_channels_last(&h)?;
            }
        }
        Ok(h)
    }
}

/// The levels of the encoder or the decoder, `conv_blocks.{i}` with
/// `mults[i]` times the base channels: each resamples but the last, and the
/// one at `attention_level` has attention. `block_in` carries the channels
/// through.
fn build_levels(
    vb: &VarBuilder,
    cfg: &VqConfig,
    mults: &[usize],
    blocks: usize,
    attention_level: usize,
    resample: Resample,
    block_in: &mut usize,
) -> Result<Vec<Level>> {
    let n = mults.len();
    (0..n)
        .map(|i| {
            let (level, out) = Level::new(
                vb.pp(format!("conv_blocks.{i}")),
                (*block_in, cfg.ch * mults[i]),
                blocks,
                i == attention_level,
                (i != n - 1).then_some(resample),
                cfg,
            )?;
            *block_in = out;
            Ok(level)
        })
        .collect()
}

/// Nearest-neighbour upsampling by two. The training pass repeats each
/// pixel by broadcasting: candle's `upsample_nearest2d` backward is a
/// grouped convolution, the slowest op of a VQ training step on the CPU.
fn upsample_nearest_2x(x: &Tensor, pass: Pass) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    match pass {
        Pass::Inference => x.upsample_nearest2d(2 * h, 2 * w),
        Pass::Training => x
            .reshape((b, c, h, 1, w, 1))?
            .broadcast_as((b, c, h, 2, w, 2))?
            .reshape((b, c, 2 * h, 2 * w)),
    }
}

#[derive(Debug, Clone)]
struct Mid {
    res0: ResnetBlock,
    attn: AttnBlock,
    res1: ResnetBlock,
}

impl Mid {
    fn new(vb: VarBuilder, c: usize, cfg: &VqConfig) -> Result<Self> {
        Ok(Self {
            res0: ResnetBlock::new(vb.pp("0"), c, c, cfg)?,
            attn: AttnBlock::new(vb.pp("1"), c, cfg)?,
            res1: ResnetBlock::new(vb.pp("2"), c, c, cfg)?,
        })
    }

    fn forward(&self, x: &Tensor, pass: Pass) -> Result<Tensor> {
        let h = self.res0.forward(x, pass)?;
        self.res1.forward(&self.attn.forward(&h, pass)?, pass)
    }

    fn forward_channels_last(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.res0.forward_channels_last(x)?;
        self.res1
            .forward_channels_last(&self.attn.forward_channels_last(&h)?)
    }
}

#[derive(Debug, Clone)]
struct Encoder {
    conv_in: Conv,
    levels: Vec<Level>,
    mid: Mid,
    norm_out: GroupNorm,
    conv_out: Conv,
}

impl Encoder {
    fn new(vb: VarBuilder, cfg: &VqConfig) -> Result<Self> {
        let n = cfg.encoder_ch_mult.len();
        let conv_in = Conv::new(vb.pp("conv_in"), cfg.in_channels, cfg.ch, 3, 1, 1)?;
        let mut block_in = cfg.ch;
        // Padding is asymmetric (right/bottom), applied in forward.
        let down = Resample {
            name: "downsample.conv",
            stride: 2,
            padding: 0,
        };
        let mults = &cfg.encoder_ch_mult;
        let levels = build_levels(
            &vb,
            cfg,
            mults,
            cfg.num_res_blocks,
            n - 1,
            down,
            &mut block_in,
        )?;
        Ok(Self {
            conv_in,
            mid: Mid::new(vb.pp("mid"), block_in, cfg)?,
            norm_out: GroupNorm::new(vb.pp("norm_out"), block_in, cfg)?,
            conv_out: Conv::new(vb.pp("conv_out"), block_in, cfg.z_channels, 3, 1, 1)?,
            levels,
        })
    }

    fn forward(&self, x: &Tensor, pass: Pass) -> Result<Tensor> {
        let mut h = self.conv_in.forward(x, pass)?;
        for level in &self.levels {
            h = level.forward(&h, pass)?;
            if let Some(down) = &level.resample {
                let padded = h.pad_with_zeros(2, 0, 1)?.pad_with_zeros(3, 0, 1)?;
                h = down.forward(&padded, pass)?;
            }
        }
        let h = self.mid.forward(&h, pass)?;
        self.conv_out
            .forward(&swish(&self.norm_out.forward(&h)?)?, pass)
    }
}

#[derive(Debug, Clone)]
struct Decoder {
    conv_in: Conv,
    mid: Mid,
    levels: Vec<Level>,
    norm_out: GroupNorm,
    conv_out: Conv,
}

impl Decoder {
    fn new(vb: VarBuilder, cfg: &VqConfig) -> Result<Self> {
        let n = cfg.decoder_ch_mult.len();
        let mut block_in = cfg.ch * cfg.decoder_ch_mult[n - 1];
        let conv_in = Conv::new(vb.pp("conv_in"), cfg.z_channels, block_in, 3, 1, 1)?;
        let mid = Mid::new(vb.pp("mid"), block_in, cfg)?;
        let up = Resample {
            name: "upsample.conv",
            stride: 1,
            padding: 1,
        };
        // conv_blocks.j processes levels from the deepest to the shallowest.
        let mults: Vec<usize> = cfg.decoder_ch_mult.iter().rev().copied().collect();
        let levels = build_levels(
            &vb,
            cfg,
            &mults,
            cfg.num_res_blocks + 1,
            0,
            up,
            &mut block_in,
        )?;
        Ok(Self {
            conv_in,
            mid,
            levels,
            norm_out: GroupNorm::new(vb.pp("norm_out"), block_in, cfg)?,
            conv_out: Conv::new(vb.pp("conv_out"), block_in, cfg.out_channels, 3, 1, 1)?,
        })
    }

    fn forward(&self, z: &Tensor, pass: Pass) -> Result<Tensor> {
        let h = self.conv_in.forward(z, pass)?;
        let mut h = self.mid.forward(&h, pass)?;
        for level in &self.levels {
            h = level.forward(&h, pass)?;
            if let Some(up) = &level.resample {
                h = up.forward(&upsample_nearest_2x(&h, pass)?, pass)?;
            }
        }
        self.conv_out
            .forward(&swish(&self.norm_out.forward(&h)?)?, pass)
    }

    /// The same on channels-last `z`, with the fused CPU kernels: the
    /// upsampling is read by the convolution after it.
    fn forward_channels_last(&self, z: &Tensor) -> Result<Tensor> {
        let h = self.conv_in.forward_channels_last(z, false)?;
        let mut h = self.mid.forward_channels_last(&h)?;
        for level in &self.levels {
            h = level.forward_channels_last(&h)?;
            if let Some(up) = &level.resample {
                h = up.forward_channels_last(&h, true)?;
            }
        }
        self.conv_out
            .forward_channels_last(&self.norm_out.forward_channels_last(&h, true)?, false)
    }
}

/// Result of encoding images to codes.
#[derive(Debug, Clone)]
pub struct VqEncoding {
    /// `[B, D, g, g]` after quant_conv, before normalisation.
    pub latent: Tensor,
    /// `[B, g*g]` codebook indices, row-major over (h, w).
    pub indices: Tensor,
    /// `[B*g*g, K]` squared distances between normalised vectors.
    pub distances: Tensor,
}

#[derive(Debug, Clone)]
pub struct VqModel {
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Conv,
    post_quant_conv: Conv,
    /// `quantize.embedding.weight` as stored; normalised on use, so that a
    /// trained codebook stays on the sphere after every update.
    raw_codebook: Tensor,
    cfg: VqConfig,
}

impl VqModel {
    /// `vb` points at `gen_vision_model`.
    pub fn new(cfg: &VqConfig, vb: VarBuilder) -> Result<Self> {
        let (d, z) = (cfg.codebook_embed_dim, cfg.z_channels);
        let raw_codebook = embedding(&vb, cfg.codebook_size, d, "quantize.embedding.weight")?;
        Ok(Self {
            encoder: Encoder::new(vb.pp("encoder"), cfg)?,
            decoder: Decoder::new(vb.pp("decoder"), cfg)?,
            quant_conv: Conv::new(vb.pp("quant_conv"), z, d, 1, 1, 0)?,
            post_quant_conv: Conv::new(vb.pp("post_quant_conv"), d, z, 1, 1, 0)?,
            raw_codebook,
            cfg: cfg.clone(),
        })
    }

    /// Whether codes and latents are compared as unit vectors.
    pub fn l2_normalised(&self) -> bool {
        self.cfg.codebook_l2_norm
    }

    /// Side in pixels of the images the tokenizer reads and writes.
    pub fn image_size(&self) -> usize {
        self.cfg.image_size
    }

    /// The codebook `[K, D]` that codes index, L2-normalised when the
    /// config says so.
    pub fn codebook(&self) -> Result<Tensor> {
        if self.cfg.codebook_l2_norm {
            l2_normalize(&self.raw_codebook)
        } else {
            Ok(self.raw_codebook.clone())
        }
    }

    /// Images in [-1, 1] `[B, 3, S, S]` to the latent `[B, D, g, g]` that is
    /// quantised (after quant_conv, before normalisation).
    pub fn latent(&self, pixels: &Tensor, pass: Pass) -> Result<Tensor> {
        self.quant_conv
            .forward(&self.encoder.forward(pixels, pass)?, pass)
    }

    /// Images in [-1, 1] `[B, 3, S, S]` to codes.
    pub fn encode(&self, pixels: &Tensor) -> Result<VqEncoding> {
        let latent = self.latent(pixels, Pass::Inference)?;
        let (b, d, h, w) = latent.dims4()?;
        let flat = latent
            .permute((0, 2, 3, 1))?
            .reshape((b * h * w, d))?
            .to_dtype(DType::F32)?;
        let codebook = self.codebook()?.to_dtype(DType::F32)?;
        let flat = if self.cfg.codebook_l2_norm {
            l2_normalize(&flat)?
        } else {
            flat
        };
        let distances = flat
            .sqr()?
            .sum_keepdim(1)?
            .broadcast_add(&codebook.sqr()?.sum(1)?.unsqueeze(0)?)?
            .broadcast_sub(&(flat.matmul(&codebook.t()?)? * 2.0)?)?;
        let indices = distances.argmin(1)?.reshape((b, h * w))?;
        Ok(VqEncoding {
            latent,
            indices,
            distances,
        })
    }

    /// Normalised codebook rows of a code grid: `[B, g*g]` -> `[B, D, g, g]`.
    pub fn codebook_entries(&self, indices: &Tensor) -> Result<Tensor> {
        let (b, n) = indices.dims2()?;
        let g = (n as f64).sqrt() as usize;
        if g * g != n {
            candle_core::bail!("{n} codes do not form a square grid");
        }
        self.codebook()?
            .index_select(&indices.flatten_all()?, 0)?
            .reshape((b, g, g, self.cfg.codebook_embed_dim))?
            .permute((0, 3, 1, 2))?
            .contiguous()
    }

    /// Decodes normalised codebook entries `[B, D, g, g]` to raw RGB floats
    /// `[B, 3, g*f, g*f]` (roughly [-1, 1]; not clipped).
    pub fn decode_entries(&self, entries: &Tensor) -> Result<Tensor> {
        self.decode(entries, Pass::Inference)
    }

    /// [`Self::decode_entries`] with the ops of `pass`. Inference on the
    /// CPU in f32 runs channels last on the fused kernels.
    pub fn decode(&self, entries: &Tensor, pass: Pass) -> Result<Tensor> {
        let weights = &self.post_quant_conv.weight;
        if pass == Pass::Inference && kernels::serves(&[entries, weights]) {
            let z = self
                .post_quant_conv
                .forward_channels_last(&kernels::channels_last(entries)?, false)?;
            return kernels::channels_first(&self.decoder.forward_channels_last(&z)?);
        }
        self.decoder
            .forward(&self.post_quant_conv.forward(entries, pass)?, pass)
    }

    /// Codes `[B, g*g]` to raw RGB floats.
    pub fn decode_codes(&self, indices: &Tensor) -> Result<Tensor> {
        self.decode_entries(&self.codebook_entries(indices)?)
    }
}
