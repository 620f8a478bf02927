//! Weight-loading helpers. The `Init` hints only matter for the demo model,
//! whose weights are drawn from a seeded backend (see `demo.rs`); a real
//! checkpoint ignores them.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use candle_core::{Module, Result, Tensor};
use candle_nn::{Init, VarBuilder};

/// A low-rank adapter on a linear layer: `y += scale * (x A^T) B^T`.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    /// `[rank, in]`.
    pub a: Tensor,
    /// `[out, rank]`, zero at initialisation so the adapted layer starts equal to the base.
    pub b: Tensor,
    /// `alpha / rank`.
    pub scale: f64,
    /// Shared by every adapter of a model: off computes the base model (the GRPO reference policy).
    pub enabled: Arc<AtomicBool>,
}

/// PyTorch `nn.Linear`, optionally with a LoRA adapter.
#[derive(Debug, Clone)]
pub struct Linear {
    base: candle_nn::Linear,
    pub lora: Option<LoraAdapter>,
}

impl Linear {
    pub fn weight(&self) -> &Tensor {
        self.base.weight()
    }

    /// `[out, in]`.
    pub fn dims(&self) -> (usize, usize) {
        let d = self.base.weight().dims();
        (d[0], d[1])
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.base.forward(x)?;
        match &self.lora {
            Some(l) if l.enabled.load(Ordering::Relaxed) => {
                let down = candle_nn::Linear::new(l.a.clone(), None).forward(x)?;
                let up = candle_nn::Linear::new(l.b.clone(), None).forward(&down)?;
                y + (up * l.scale)?
            }
            _ => Ok(y),
        }
    }
}

/// PyTorch `nn.Linear`: weight `[out, in]`, `y = x W^T + b`.
pub fn linear(vb: VarBuilder, in_dim: usize, out_dim: usize, bias: bool) -> Result<Linear> {
    let std = 1.0 / (in_dim as f64).sqrt();
    let weight = vb.get_with_hints(
        (out_dim, in_dim),
        "weight",
        Init::Randn {
            mean: 0.0,
            stdev: std,
        },
    )?;
    let bias = if bias {
        Some(vb.get_with_hints(
            out_dim,
            "bias",
            Init::Randn {
                mean: 0.0,
                stdev: 0.02,
            },
        )?)
    } else {
        None
    };
    Ok(Linear {
        base: candle_nn::Linear::new(weight, bias),
        lora: None,
    })
}

/// A normalisation scale vector (RMSNorm / LayerNorm / GroupNorm weight).
pub fn norm_weight(vb: &VarBuilder, dim: usize, name: &str) -> Result<Tensor> {
    vb.get_with_hints(
        dim,
        name,
        Init::Randn {
            mean: 1.0,
            stdev: 0.05,
        },
    )
}

/// A normalisation shift vector.
pub fn norm_bias(vb: &VarBuilder, dim: usize, name: &str) -> Result<Tensor> {
    vb.get_with_hints(
        dim,
        name,
        Init::Randn {
            mean: 0.0,
            stdev: 0.02,
        },
    )
}

/// An embedding table `[rows, dim]`.
pub fn embedding(vb: &VarBuilder, rows: usize, dim: usize, name: &str) -> Result<Tensor> {
    vb.get_with_hints(
        (rows, dim),
        name,
        Init::Randn {
            mean: 0.0,
            stdev: 1.0,
        },
    )
}

/// LayerNorm with weight and bias.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    pub fn new(vb: VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: norm_weight(&vb, dim, "weight")?,
            bias: norm_bias(&vb, dim, "bias")?,
            eps,
        })
    }
    pub fn forward(&self, x: &Tensor, pass: crate::ops::Pass) -> Result<Tensor> {
        crate::ops::layer_norm(x, &self.weight, &self.bias, self.eps, pass)
    }
}
