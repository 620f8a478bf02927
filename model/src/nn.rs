//! Weight-loading helpers. The `Init` hints only matter for the demo model,
//! whose weights are drawn from a seeded backend (see `demo.rs`); a real
//! checkpoint ignores them.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, Layout, Module, Result, Shape, Tensor};
use candle_nn::{Init, VarBuilder};

/// `x W^T` (`[m, k]` by `[k, n]`) whose backward gives `x` its gradient and
/// the frozen `W` none. candle's matmul backward computes both operands'
/// gradients, tracked or not: in a LoRA step that is a full gradient of
/// every frozen weight (as large as the weights, and a third of the
/// backward's work), computed and kept until the step ends.
struct FrozenMatmul;

impl FrozenMatmul {
    fn dims(l1: &Layout, l2: &Layout) -> (usize, usize, usize) {
        let (m, k) = (l1.dims()[0], l1.dims()[1]);
        (m, k, l2.dims()[1])
    }
}

impl CustomOp2 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-weight-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (m, k, n) = Self::dims(l1, l2);
        Ok((s1.matmul(s2, (1, m, n, k), l1, l2)?, Shape::from((m, n))))
    }

    // Without the `cuda` feature this is candle's stand-in storage, so the
    // CUDA path type-checks in every build.
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (m, k, n) = Self::dims(l1, l2);
        Ok((s1.matmul(s2, (1, m, n, k), l1, l2)?, Shape::from((m, n))))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        weight_t: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(grad.matmul(&weight_t.t()?)?), None))
    }
}

/// `x W^T + b` over the last dimension of `x`. When `x` carries a gradient
/// graph and `W` is not trained, the backward skips `W`'s gradient.
pub fn linear_forward(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let y = if x.track_op() && !weight.is_variable() {
        let dims = x.dims();
        let k = *dims.last().unwrap_or(&0);
        let (out, _) = weight.dims2()?;
        let rows = x.elem_count() / k.max(1);
        let mut shape = dims.to_vec();
        if let Some(last) = shape.last_mut() {
            *last = out;
        }
        x.reshape((rows, k))?
            .apply_op2(&weight.t()?, FrozenMatmul)?
            .reshape(shape)?
    } else {
        x.broadcast_matmul(&weight.t()?)?
    };
    match bias {
        Some(bias) => y.broadcast_add(bias),
        None => Ok(y),
    }
}

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
    /// Shared by every adapter of a model: off reads the adapters detached,
    /// so that sampling from the policy records no gradient graph.
    pub recording: Arc<AtomicBool>,
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
        let y = if x.track_op() && !self.weight().is_variable() {
            linear_forward(x, self.weight(), self.base.bias())?
        } else {
            self.base.forward(x)?
        };
        match &self.lora {
            Some(l) if l.enabled.load(Ordering::Relaxed) => {
                let (a, b) = if l.recording.load(Ordering::Relaxed) {
                    (l.a.clone(), l.b.clone())
                } else {
                    (l.a.detach(), l.b.detach())
                };
                let down = candle_nn::Linear::new(a, None).forward(x)?;
                let up = candle_nn::Linear::new(b, None).forward(&down)?;
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

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;

    #[test]
    fn a_frozen_weight_gets_no_gradient_and_the_input_the_same() {
        let dev = &Device::Cpu;
        let x = Var::from_tensor(
            &Tensor::arange(0f32, 30., dev)
                .unwrap()
                .reshape((2, 5, 3))
                .unwrap(),
        )
        .unwrap();
        let w = (Tensor::arange(0f32, 12., dev)
            .unwrap()
            .reshape((4, 3))
            .unwrap()
            * 0.1)
            .unwrap();
        let b = Tensor::new(&[1f32, 2., 3., 4.], dev).unwrap();
        let frozen = linear_forward(x.as_tensor(), &w, Some(&b)).unwrap();
        let plain = candle_nn::Linear::new(w.clone(), Some(b))
            .forward(x.as_tensor())
            .unwrap();
        assert_eq!(frozen.dims(), &[2, 5, 4]);
        let diff = (&frozen - &plain)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
        let weight_shaped = |store: &candle_core::backprop::GradStore| {
            store
                .get_ids()
                .filter_map(|id| store.get_id(*id))
                .filter(|g| g.dims().ends_with(&[3, 4]))
                .count()
        };
        let g_frozen = frozen.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let g_plain = plain.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        // The plain matmul computes W's gradient (filed under W^T) anyway.
        assert!(weight_shaped(&g_plain) > 0);
        assert_eq!(weight_shaped(&g_frozen), 0);
        let dx = (g_frozen.get(&x).unwrap() - g_plain.get(&x).unwrap()).unwrap();
        assert_eq!(
            dx.abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            0.0
        );
    }
}
