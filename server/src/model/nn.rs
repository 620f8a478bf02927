//! Weight-loading helpers. The `Init` hints only matter for the demo model,
//! whose weights are drawn from a seeded backend (see `demo.rs`); a real
//! checkpoint ignores them.

use candle_core::{Result, Tensor};
use candle_nn::{Init, VarBuilder};

/// PyTorch `nn.Linear`: weight `[out, in]`, `y = x W^T + b`.
pub fn linear(
    vb: VarBuilder,
    in_dim: usize,
    out_dim: usize,
    bias: bool,
) -> Result<candle_nn::Linear> {
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
    Ok(candle_nn::Linear::new(weight, bias))
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
    pub fn forward(&self, x: &Tensor, pass: super::ops::Pass) -> Result<Tensor> {
        super::ops::layer_norm(x, &self.weight, &self.bias, self.eps, pass)
    }
}
