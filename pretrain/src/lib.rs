//! Pretraining the real Janus-Pro architecture from scratch, on candle, on
//! the synthetic world of coloured shapes ([`ulm_world`]): first the VQ image
//! tokenizer ([`vq`]), then the multimodal model by next-token prediction.
//! Everything is deterministic from a seed.

pub mod data;
pub mod eval;
pub mod lm;
pub mod model;
pub mod recipe;
pub mod vq;

use candle_core::{DType, Tensor, Var};
use ulm_rl::grpo::{clip_grad_norm, AdamW};

/// What can go wrong while pretraining.
#[derive(Debug, thiserror::Error)]
pub enum PretrainError {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Model(#[from] ulm_model::ModelError),
    #[error(transparent)]
    Rl(#[from] ulm_rl::RlError),
    #[error("step {step}: the loss is not finite ({loss})")]
    NotFinite { step: usize, loss: f64 },
    #[error("{0}")]
    Invalid(String),
}

/// One optimiser step down `total`: returns its value, once checked
/// finite, and the gradient norm before clipping to `max_grad_norm`.
fn descend(
    total: &Tensor,
    params: &[(String, Var)],
    optimizer: &mut AdamW,
    max_grad_norm: f64,
    step: usize,
) -> Result<(f64, f64), PretrainError> {
    let loss = total.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    if !loss.is_finite() {
        return Err(PretrainError::NotFinite { step, loss });
    }
    let grads = total.backward()?;
    let mut grads: Vec<Option<Tensor>> =
        params.iter().map(|(_, v)| grads.get(v).cloned()).collect();
    let grad_norm = clip_grad_norm(&mut grads, Some(max_grad_norm))?;
    optimizer.apply(params, &grads)?;
    Ok((loss, grad_norm))
}
