//! Pretraining the real Janus-Pro architecture from scratch, on candle, on
//! the synthetic world of coloured shapes ([`ulm_world`]): first the VQ image
//! tokenizer ([`vq`]), then the multimodal model by next-token prediction.
//! Everything is deterministic from a seed.

pub mod data;
pub mod lm;
pub mod model;
pub mod recipe;
pub mod vq;

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
