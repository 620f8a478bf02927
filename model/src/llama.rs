//! The LLaMA decoder of Janus-Pro (`language_model.*`): RMSNorm, rotary
//! embeddings ("rotate half"), grouped-query attention, SiLU MLP.
//!
//! The forward takes embeddings rather than ids because both tasks feed it
//! non-text rows (image features for understanding, image-token embeddings
//! for generation). Positions are per row and an additive bias carries the
//! causal and padding mask, so left-padded batches of different prompts share
//! one pass.

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;

use crate::config::LlamaConfig;
use crate::kernels;
use crate::nn::{embedding, linear, norm_weight, Linear};
use crate::ops::{compute_dtype, rms_norm, rope, softmax_last, swiglu, Pass};

/// A large negative score for masked keys. Finite on purpose: a padded query
/// row that sees no key then stays finite instead of turning into NaN, which
/// would leak into real rows through `0 * NaN` in the value product.
const MASKED: f32 = -1e9;

/// Keys and values of one layer: buffers `[B, Hkv, capacity, D]` of which the
/// first `len` positions are filled.
#[derive(Debug)]
struct LayerKv {
    k: Tensor,
    v: Tensor,
    len: usize,
}

/// Keys and values of past positions, one entry per layer. Buffers grow
/// geometrically and are written in place, so a decode step copies only the
/// new position instead of the whole cache. Not `Clone`: clones would share
/// the buffers that `append` writes to.
#[derive(Debug, Default)]
pub struct KvCache {
    layers: Vec<Option<LayerKv>>,
}

/// Initial capacity beyond the prefill, in positions.
const KV_HEADROOM: usize = 64;

fn grow(buf: &Tensor, len: usize, capacity: usize) -> Result<Tensor> {
    let (b, h, _, d) = buf.dims4()?;
    let bigger = Tensor::zeros((b, h, capacity, d), buf.dtype(), buf.device())?;
    bigger.slice_set(&buf.narrow(2, 0, len)?.contiguous()?, 2, 0)?;
    Ok(bigger)
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: (0..num_layers).map(|_| None).collect(),
        }
    }

    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map_or(0, |l| l.len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn append(&mut self, layer: usize, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
        let t = k.dim(2)?;
        let entry = match self.layers[layer].take() {
            None => {
                let (b, h, _, d) = k.dims4()?;
                let capacity = t + KV_HEADROOM;
                LayerKv {
                    k: Tensor::zeros((b, h, capacity, d), k.dtype(), k.device())?,
                    v: Tensor::zeros((b, h, capacity, d), v.dtype(), v.device())?,
                    len: 0,
                }
            }
            Some(mut e) => {
                let capacity = e.k.dim(2)?;
                if e.len + t > capacity {
                    let capacity = (2 * capacity).max(e.len + t);
                    e.k = grow(&e.k, e.len, capacity)?;
                    e.v = grow(&e.v, e.len, capacity)?;
                }
                e
            }
        };
        entry.k.slice_set(&k.contiguous()?, 2, entry.len)?;
        entry.v.slice_set(&v.contiguous()?, 2, entry.len)?;
        let len = entry.len + t;
        let out = (entry.k.narrow(2, 0, len)?, entry.v.narrow(2, 0, len)?);
        self.layers[layer] = Some(LayerKv { len, ..entry });
        Ok(out)
    }

    /// A cache whose row `i` is row `rows[i]` of this one, without its first
    /// `drop_front` positions: used to share one prompt prefill among several
    /// samples, to drop finished rows, and to drop the left padding that no
    /// remaining row needs.
    pub fn select_rows(&self, rows: &[u32], drop_front: usize) -> Result<Self> {
        let mut layers = Vec::with_capacity(self.layers.len());
        for entry in &self.layers {
            layers.push(match entry {
                None => None,
                Some(e) => {
                    if drop_front > e.len {
                        candle_core::bail!(
                            "cannot drop {drop_front} of {} cached positions",
                            e.len
                        );
                    }
                    let idx = Tensor::new(rows, e.k.device())?;
                    let select = |buf: &Tensor| -> Result<Tensor> {
                        let rows = buf.index_select(&idx, 0)?;
                        if drop_front == 0 {
                            return Ok(rows);
                        }
                        let capacity = rows.dim(2)?;
                        rows.narrow(2, drop_front, capacity - drop_front)?
                            .contiguous()
                    };
                    Some(LayerKv {
                        k: select(&e.k)?,
                        v: select(&e.v)?,
                        len: e.len - drop_front,
                    })
                }
            });
        }
        Ok(Self { layers })
    }

    /// The rows of every cache in `parts`, in order, in one cache as long as
    /// the longest: shorter caches are left-padded with zeros (the caller
    /// masks those positions).
    pub fn concat(parts: &[&KvCache]) -> Result<Self> {
        let Some(first) = parts.first() else {
            candle_core::bail!("concatenating no caches");
        };
        let len = parts.iter().map(|c| c.len()).max().unwrap_or(0);
        let mut layers = Vec::with_capacity(first.layers.len());
        for layer in 0..first.layers.len() {
            let mut ks = Vec::with_capacity(parts.len());
            let mut vs = Vec::with_capacity(parts.len());
            for part in parts {
                let Some(Some(e)) = part.layers.get(layer) else {
                    candle_core::bail!("concatenating caches of different depths");
                };
                ks.push(left_pad_positions(&e.k, e.len, len)?);
                vs.push(left_pad_positions(&e.v, e.len, len)?);
            }
            let (k, v) = (Tensor::cat(&ks, 0)?, Tensor::cat(&vs, 0)?);
            layers.push(Some(LayerKv {
                k: grow(&k, len, len + KV_HEADROOM)?,
                v: grow(&v, len, len + KV_HEADROOM)?,
                len,
            }));
        }
        Ok(Self { layers })
    }
}

/// The first `len` positions of `buf` (`[B, H, capacity, D]`) after
/// `target - len` zero positions.
fn left_pad_positions(buf: &Tensor, len: usize, target: usize) -> Result<Tensor> {
    let filled = buf.narrow(2, 0, len)?;
    if len == target {
        return Ok(filled);
    }
    let (b, h, _, d) = buf.dims4()?;
    let zeros = Tensor::zeros((b, h, target - len, d), buf.dtype(), buf.device())?;
    Tensor::cat(&[&zeros, &filled], 2)
}

/// Everything about the positions of one forward call: rotary tables for each
/// query row and the additive attention bias (absent when every key is visible).
#[derive(Debug, Clone)]
pub struct AttentionContext {
    cos: Tensor,
    sin: Tensor,
    bias: Option<Tensor>,
}

/// Rotary cos/sin tables `[max_positions, head_dim / 2]`, computed in f32 as
/// the reference does (inv_freq and angles in f32), then cast to the model dtype.
#[derive(Debug, Clone)]
struct RotaryTables {
    cos: Tensor,
    sin: Tensor,
}

impl RotaryTables {
    fn new(cfg: &LlamaConfig, dtype: DType, device: &Device) -> Result<Self> {
        let half = cfg.head_dim / 2;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| 1.0f32 / (cfg.rope_theta as f32).powf((2 * i) as f32 / cfg.head_dim as f32))
            .collect();
        let n = cfg.max_position_embeddings;
        let mut cos = Vec::with_capacity(n * half);
        let mut sin = Vec::with_capacity(n * half);
        for p in 0..n {
            for f in &inv_freq {
                let angle = p as f32 * f;
                cos.push((angle as f64).cos() as f32);
                sin.push((angle as f64).sin() as f32);
            }
        }
        Ok(Self {
            cos: Tensor::from_vec(cos, (n, half), device)?.to_dtype(dtype)?,
            sin: Tensor::from_vec(sin, (n, half), device)?.to_dtype(dtype)?,
        })
    }
}

#[derive(Debug, Clone)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn new(cfg: &LlamaConfig, vb: VarBuilder) -> Result<Self> {
        let (h, d) = (cfg.hidden_size, cfg.head_dim);
        let b = cfg.attention_bias;
        Ok(Self {
            q_proj: linear(vb.pp("q_proj"), h, cfg.num_attention_heads * d, b)?,
            k_proj: linear(vb.pp("k_proj"), h, cfg.num_key_value_heads * d, b)?,
            v_proj: linear(vb.pp("v_proj"), h, cfg.num_key_value_heads * d, b)?,
            o_proj: linear(vb.pp("o_proj"), cfg.num_attention_heads * d, h, b)?,
            num_heads: cfg.num_attention_heads,
            num_kv_heads: cfg.num_key_value_heads,
            head_dim: d,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        ctx: &AttentionContext,
        cache: Option<(&mut KvCache, usize)>,
        pass: Pass,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let heads = |proj: &Linear, n: usize| -> Result<Tensor> {
            proj.forward(x)?
                .reshape((b, t, n, self.head_dim))?
                .transpose(1, 2)
        };
        let q = rope(
            &heads(&self.q_proj, self.num_heads)?,
            &ctx.cos,
            &ctx.sin,
            pass,
        )?;
        let k = rope(
            &heads(&self.k_proj, self.num_kv_heads)?,
            &ctx.cos,
            &ctx.sin,
            pass,
        )?;
        let v = heads(&self.v_proj, self.num_kv_heads)?.contiguous()?;
        let (k, v) = match cache {
            Some((cache, layer)) => cache.append(layer, k, v)?,
            None => (k, v),
        };
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        if kernels::serves(&[&q, &k, &v]) {
            let out = kernels::attention(&q, &k, &v, ctx.bias.as_ref(), scale)?;
            return self.o_proj.forward(&out);
        }
        let k = repeat_kv(&k, self.num_heads / self.num_kv_heads)?;
        let v = repeat_kv(&v, self.num_heads / self.num_kv_heads)?;
        let scores = (q.contiguous()?.matmul(&k.t()?)? * scale)?;
        let scores = scores.to_dtype(compute_dtype(scores.dtype()))?;
        let scores = match &ctx.bias {
            Some(bias) => scores.broadcast_add(&bias.to_dtype(scores.dtype())?)?,
            None => scores,
        };
        let weights = softmax_last(&scores, pass)?.to_dtype(v.dtype())?;
        let out =
            weights
                .matmul(&v)?
                .transpose(1, 2)?
                .reshape((b, t, self.num_heads * self.head_dim))?;
        self.o_proj.forward(&out)
    }
}

/// `[B, Hkv, T, D]` -> `[B, Hkv * r, T, D]`: KV head j serves query heads j*r .. j*r + r - 1.
fn repeat_kv(x: &Tensor, r: usize) -> Result<Tensor> {
    if r == 1 {
        return Ok(x.clone());
    }
    let (b, h, t, d) = x.dims4()?;
    x.unsqueeze(2)?
        .broadcast_as((b, h, r, t, d))?
        .reshape((b, h * r, t, d))
}

#[derive(Debug, Clone)]
struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Mlp {
    fn new(cfg: &LlamaConfig, vb: VarBuilder) -> Result<Self> {
        let (h, i, b) = (cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias);
        Ok(Self {
            gate_proj: linear(vb.pp("gate_proj"), h, i, b)?,
            up_proj: linear(vb.pp("up_proj"), h, i, b)?,
            down_proj: linear(vb.pp("down_proj"), i, h, b)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gate = self.gate_proj.forward(x)?;
        let up = self.up_proj.forward(x)?;
        self.down_proj.forward(&swiglu(&gate, &up)?)
    }
}

#[derive(Debug, Clone)]
struct DecoderLayer {
    input_layernorm: Tensor,
    self_attn: Attention,
    post_attention_layernorm: Tensor,
    mlp: Mlp,
}

/// The decoder plus its embedding table and LM head.
#[derive(Debug, Clone)]
pub struct Llama {
    embed_tokens: Tensor,
    layers: Vec<DecoderLayer>,
    norm: Tensor,
    lm_head: Tensor,
    rotary: RotaryTables,
    cfg: LlamaConfig,
}

impl Llama {
    /// `vb` points at `language_model`.
    pub fn new(cfg: &LlamaConfig, vb: VarBuilder) -> Result<Self> {
        let model = vb.pp("model");
        let embed_tokens = embedding(
            &model,
            cfg.vocab_size,
            cfg.hidden_size,
            "embed_tokens.weight",
        )?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let lvb = model.pp(format!("layers.{i}"));
            layers.push(DecoderLayer {
                input_layernorm: norm_weight(&lvb, cfg.hidden_size, "input_layernorm.weight")?,
                self_attn: Attention::new(cfg, lvb.pp("self_attn"))?,
                post_attention_layernorm: norm_weight(
                    &lvb,
                    cfg.hidden_size,
                    "post_attention_layernorm.weight",
                )?,
                mlp: Mlp::new(cfg, lvb.pp("mlp"))?,
            });
        }
        let norm = norm_weight(&model, cfg.hidden_size, "norm.weight")?;
        let lm_head = if cfg.tie_word_embeddings {
            embed_tokens.clone()
        } else {
            linear(vb.pp("lm_head"), cfg.hidden_size, cfg.vocab_size, false)?
                .weight()
                .clone()
        };
        Ok(Self {
            rotary: RotaryTables::new(cfg, vb.dtype(), vb.device())?,
            embed_tokens,
            layers,
            norm,
            lm_head,
            cfg: cfg.clone(),
        })
    }

    /// Token embeddings `[B, T, H]` of ids `[B, T]`.
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        self.embed_tokens
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, t, self.cfg.hidden_size))
    }

    /// Builds the attention context for queries at `positions` (`[B, Tq]`,
    /// absolute indices used for rotary) over `key_valid` (`[B][Tk]`, the
    /// padding mask of every key including the new ones). Query `i` of a row
    /// sees key `j` when `j <= Tk - Tq + i` and the key is valid.
    pub fn context(
        &self,
        positions: &[Vec<u32>],
        key_valid: &[Vec<bool>],
    ) -> Result<AttentionContext> {
        let device = self.embed_tokens.device();
        let b = positions.len();
        let tq = positions.first().map_or(0, Vec::len);
        let tk = key_valid.first().map_or(0, Vec::len);
        let max = self.cfg.max_position_embeddings as u32;
        let flat: Vec<u32> = positions.iter().flatten().copied().collect();
        if let Some(p) = flat.iter().find(|&&p| p >= max) {
            candle_core::bail!("position {p} exceeds max_position_embeddings {max}");
        }
        let idx = Tensor::from_vec(flat, b * tq, device)?;
        let half = self.cfg.head_dim / 2;
        let cos = self
            .rotary
            .cos
            .index_select(&idx, 0)?
            .reshape((b, tq, half))?;
        let sin = self
            .rotary
            .sin
            .index_select(&idx, 0)?
            .reshape((b, tq, half))?;
        let past = tk - tq;
        let all_visible = tq == 1 && key_valid.iter().all(|row| row.iter().all(|&v| v));
        let bias = if all_visible {
            None
        } else {
            let mut data = Vec::with_capacity(b * tq * tk);
            for row in key_valid {
                for i in 0..tq {
                    data.extend(row.iter().enumerate().map(|(j, &valid)| {
                        if valid && j <= past + i {
                            0.0
                        } else {
                            MASKED
                        }
                    }));
                }
            }
            Some(Tensor::from_vec(data, (b, 1, tq, tk), device)?)
        };
        Ok(AttentionContext { cos, sin, bias })
    }

    /// Runs the decoder over `embeds` (`[B, T, H]`) and returns the hidden
    /// states after the final RMSNorm.
    pub fn forward_hidden(
        &self,
        embeds: &Tensor,
        ctx: &AttentionContext,
        mut cache: Option<&mut KvCache>,
        pass: Pass,
    ) -> Result<Tensor> {
        let eps = self.cfg.rms_norm_eps;
        let mut x = embeds.clone();
        for (i, layer) in self.layers.iter().enumerate() {
            let h = rms_norm(&x, &layer.input_layernorm, eps, pass)?;
            let attn =
                layer
                    .self_attn
                    .forward(&h, ctx, cache.as_deref_mut().map(|c| (c, i)), pass)?;
            x = (x + attn)?;
            let h = rms_norm(&x, &layer.post_attention_layernorm, eps, pass)?;
            x = (&x + layer.mlp.forward(&h)?)?;
        }
        rms_norm(&x, &self.norm, eps, pass)
    }

    /// LM logits `[..., V]` of hidden states `[..., H]`.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        if hidden.rank() == 1 {
            return hidden.unsqueeze(0)?.matmul(&self.lm_head.t()?)?.squeeze(0);
        }
        crate::nn::linear_forward(hidden, &self.lm_head, None)
    }

    /// The projection layers of every decoder layer with their checkpoint
    /// names (`language_model.model.layers.{i}.self_attn.q_proj`, ...), for
    /// attaching adapters.
    pub fn projections_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let mut out = Vec::new();
        for (i, layer) in self.layers.iter_mut().enumerate() {
            let prefix = format!("language_model.model.layers.{i}");
            let a = &mut layer.self_attn;
            let m = &mut layer.mlp;
            for (name, lin) in [
                ("self_attn.q_proj", &mut a.q_proj),
                ("self_attn.k_proj", &mut a.k_proj),
                ("self_attn.v_proj", &mut a.v_proj),
                ("self_attn.o_proj", &mut a.o_proj),
                ("mlp.gate_proj", &mut m.gate_proj),
                ("mlp.up_proj", &mut m.up_proj),
                ("mlp.down_proj", &mut m.down_proj),
            ] {
                out.push((format!("{prefix}.{name}"), lin));
            }
        }
        out
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Positions for `t` new tokens of rows that already hold `past` keys, of
    /// which `pads[b]` were left padding (padding takes no position).
    pub fn next_positions(past: usize, t: usize, pads: &[usize]) -> Vec<Vec<u32>> {
        pads.iter()
            .map(|&pad| {
                (0..t)
                    .map(|i| (past + i).saturating_sub(pad) as u32)
                    .collect()
            })
            .collect()
    }
}
