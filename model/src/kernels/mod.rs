//! Fused CPU kernels for the inference pass in f32, where candle's generic
//! ops cost more than the arithmetic on a CPU: attention (scores, mask and
//! softmax in one pass, keys and values read in place from the cache),
//! GELU and SwiGLU with a vectorisable `exp`, and the VQ decoder's
//! convolutions and group norms on channels-last images. Callers use them only when
//! [`serves`] holds: CPU, f32, and no input that records a gradient (the
//! kernels record none). Other devices and dtypes, and every tensor that
//! training differentiates, keep candle's ops.

mod attention;
mod conv;
pub mod math;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};

/// Whether the kernels can compute on `inputs`: all f32 on the CPU, none
/// recording a gradient.
pub fn serves(inputs: &[&Tensor]) -> bool {
    inputs
        .iter()
        .all(|x| x.device().is_cpu() && x.dtype() == DType::F32 && !x.track_op())
}

fn f32_storage<'a>(storage: &'a CpuStorage, op: &str) -> Result<&'a [f32]> {
    match storage {
        CpuStorage::F32(data) => Ok(data),
        _ => candle_core::bail!("{op}: f32 only"),
    }
}

fn contiguous<'a>(storage: &'a CpuStorage, layout: &Layout, op: &str) -> Result<&'a [f32]> {
    let data = f32_storage(storage, op)?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{op}: contiguous input only"),
    }
}

/// `softmax(q k^T * scale + bias) v` for `q` `[B, H, Tq, D]` and `k`, `v`
/// `[B, Hkv, Tk, D]` (any strides), `bias` `[B, 1, Tq, Tk]`; returns
/// `[B, Tq, H * D]`.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    let bias = bias
        .map(|b| b.to_dtype(DType::F32)?.contiguous())
        .transpose()?;
    q.apply_op3_no_bwd(
        k,
        v,
        &attention::Attention {
            scale: scale as f32,
            bias,
        },
    )
}

struct Gelu;

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "cpu-gelu-erf"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous(s, l, self.name())?;
        Ok((
            CpuStorage::F32(math::map(x, math::gelu_erf)),
            l.shape().clone(),
        ))
    }
}

struct SwiGlu;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "cpu-swiglu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (gate, up) = (
            contiguous(s1, l1, self.name())?,
            contiguous(s2, l2, self.name())?,
        );
        if l1.shape() != l2.shape() {
            candle_core::bail!("swiglu: {:?} and {:?}", l1.shape(), l2.shape());
        }
        let out = math::map2(gate, up, |g, u| math::silu(g) * u);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// GELU (erf form) of a CPU f32 tensor.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1_no_bwd(&Gelu)
}

/// `silu(gate) * up` of CPU f32 tensors of one shape.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.contiguous()?
        .apply_op2_no_bwd(&up.contiguous()?, &SwiGlu)
}

/// `[B, C, H, W]` to channels last, `[B, H, W, C]`.
pub fn channels_last(x: &Tensor) -> Result<Tensor> {
    x.permute((0, 2, 3, 1))?.contiguous()
}

/// `[B, H, W, C]` back to `[B, C, H, W]`.
pub fn channels_first(x: &Tensor) -> Result<Tensor> {
    x.permute((0, 3, 1, 2))?.contiguous()
}

/// 3x3 convolution (stride 1, padding 1) of channels-last `x`, read
/// nearest-upsampled by two when `upsample`; `weight` `[C_out, C, 3, 3]`.
/// `residual` (of the output's shape) is added to the result.
pub fn conv3x3(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    upsample: bool,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    let residual = residual.map(Tensor::contiguous).transpose()?;
    x.apply_op3_no_bwd(weight, bias, &conv::Conv3x3 { upsample, residual })
}

/// 1x1 convolution of channels-last `x`; `weight` `[C_out, C, 1, 1]`.
pub fn conv1x1(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let (b, h, w, c) = x.dims4()?;
    let c_out = bias.dim(0)?;
    x.reshape((b * h * w, c))?
        .matmul(&weight.reshape((c_out, c))?.t()?)?
        .broadcast_add(bias)?
        .reshape((b, h, w, c_out))
}

/// Group norm of channels-last `x`, then swish when `swish`.
pub fn group_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f64,
    swish: bool,
) -> Result<Tensor> {
    x.apply_op3_no_bwd(weight, bias, &conv::GroupNorm { groups, eps, swish })
}
