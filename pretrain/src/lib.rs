//! Pretraining the real Janus-Pro architecture from scratch, on candle, on
//! the synthetic world of coloured shapes ([`ulm_world`]): first the VQ image
//! tokenizer ([`vq`]), then the multimodal model by next-token prediction.
//! Everything is deterministic from a seed.

pub mod data;
pub mod eval;
pub mod lm;
pub mod model;
pub mod recipe;
pub mod showcase;
pub mod tokenizer;
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

/// Linear warm-up to `peak` over `warmup` steps, then cosine decay to a
/// tenth of it at the last of `steps`.
fn learning_rate(peak: f64, step: usize, steps: usize, warmup: usize) -> f64 {
    let warm = ((step + 1) as f64 / warmup.max(1) as f64).min(1.0);
    let progress = step.saturating_sub(warmup) as f64 / steps.saturating_sub(warmup).max(1) as f64;
    peak * warm * (0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_learning_rate_warms_up_then_decays_to_a_tenth() {
        let lr = |step| super::learning_rate(1.0, step, 100, 10);
        assert!((lr(0) - 0.1).abs() < 1e-12);
        assert!((lr(9) - 1.0).abs() < 1e-12 && (lr(10) - 1.0).abs() < 1e-12);
        assert!(lr(50) < lr(20) && lr(50) > lr(80));
        assert!((lr(100) - 0.1).abs() < 1e-12);
    }
}
