//! Numerical building blocks shared by the model parts.
//!
//! candle's fused kernels (`rms_norm`, `layer_norm`, `softmax_last_dim`, `rope`)
//! are fast but record no gradient. Every part therefore takes a [`Pass`]: the
//! inference pass uses the fused kernels, the training pass the composed,
//! differentiable versions. Both compute the same function.

use candle_core::{DType, Result, Tensor, D};

/// Which implementation of the ops a forward pass uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// Fused kernels, no gradient links.
    Inference,
    /// Composed ops that autograd can differentiate.
    Training,
}

pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64, pass: Pass) -> Result<Tensor> {
    match pass {
        Pass::Inference if x.is_contiguous() => candle_nn::ops::rms_norm(x, weight, eps as f32),
        _ => candle_nn::ops::rms_norm_slow(x, weight, eps as f32),
    }
}

pub fn layer_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    pass: Pass,
) -> Result<Tensor> {
    match pass {
        Pass::Inference if x.is_contiguous() => {
            candle_nn::ops::layer_norm(x, weight, bias, eps as f32)
        }
        _ => candle_nn::ops::layer_norm_slow(x, weight, bias, eps as f32),
    }
}

/// The dtype numerically sensitive steps run in: f32 for half precision,
/// the input's own otherwise.
pub fn compute_dtype(dtype: DType) -> DType {
    match dtype {
        DType::BF16 | DType::F16 => DType::F32,
        other => other,
    }
}

/// Softmax over the last dimension, computed in f32 for half-precision inputs
/// (as the reference does for attention weights).
pub fn softmax_last(x: &Tensor, pass: Pass) -> Result<Tensor> {
    let dtype = x.dtype();
    let x32 = x.to_dtype(compute_dtype(dtype))?;
    let y = match pass {
        Pass::Inference => candle_nn::ops::softmax_last_dim(&x32.contiguous()?)?,
        Pass::Training => candle_nn::ops::softmax(&x32, D::Minus1)?,
    };
    y.to_dtype(dtype)
}

/// Rotary embedding, "rotate half" layout. `x` is `[B, H, T, D]`; `cos`/`sin`
/// are `[B, T, D/2]` (per-row positions, so left-padded batches work).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, pass: Pass) -> Result<Tensor> {
    match pass {
        Pass::Inference => candle_nn::rotary_emb::rope(&x.contiguous()?, cos, sin),
        Pass::Training => {
            let cos = Tensor::cat(&[cos, cos], D::Minus1)?.unsqueeze(1)?;
            let sin = Tensor::cat(&[sin, sin], D::Minus1)?.unsqueeze(1)?;
            let half = x.dim(D::Minus1)? / 2;
            let x1 = x.narrow(D::Minus1, 0, half)?;
            let x2 = x.narrow(D::Minus1, half, half)?;
            let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
            x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?
        }
    }
}

/// GELU, erf form.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if crate::kernels::serves(&[x]) {
        return crate::kernels::gelu_erf(x);
    }
    x.gelu_erf()
}

/// `silu(gate) * up`, the LLaMA MLP's gate.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if crate::kernels::serves(&[gate, up]) {
        return crate::kernels::swiglu(gate, up);
    }
    gate.silu()? * up
}

/// swish(x) = x * sigmoid(x).
pub fn swish(x: &Tensor) -> Result<Tensor> {
    x.silu()
}

/// Row-wise L2 normalisation (`F.normalize(p=2, dim=-1)`, eps 1e-12).
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let norm = x
        .sqr()?
        .sum_keepdim(D::Minus1)?
        .sqrt()?
        .clamp(1e-12, f64::MAX)?;
    x.broadcast_div(&norm)
}
