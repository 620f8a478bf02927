//! The Janus-Pro / ULM-R1 unified multimodal model on candle: configuration,
//! weights, the network parts, prompt and image processing, and decoding for
//! both tasks. Nothing here knows about HTTP or storage.

pub mod builtin;
pub mod bundle;
pub mod config;
pub mod conv;
pub mod decode;
pub mod demo;
pub mod generate;
pub mod image_processor;
pub mod janus;
pub mod kernels;
pub mod llama;
pub mod nn;
pub mod ops;
pub mod plan;
pub mod processor;
pub mod projector;
pub mod runtime;
pub mod sampling;
pub mod sampling_defaults;
pub mod siglip;
pub mod vq;
pub mod weights;

use std::path::PathBuf;

pub use config::JanusConfig;
pub use janus::Janus;

/// Everything that can go wrong building or running the model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("invalid config: {field} {message}")]
    Config { field: String, message: String },
    #[error("{path}: {message}")]
    Io { path: PathBuf, message: String },
    #[error("invalid weights: {message}")]
    Weights { message: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("invalid image: {0}")]
    Image(String),
    #[error("image too large: {0}")]
    ImageTooLarge(String),
    #[error("invalid input: {0}")]
    InvalidInput(String),
    #[error("{0}")]
    Unsupported(String),
    #[error("model computation failed: {0}")]
    Compute(#[from] candle_core::Error),
}
