//! The one error type of the RL crate. Model failures pass through as they
//! are; what is RL's own (data it cannot train on, a reward that failed, a
//! checkpoint that does not fit) is said as such.

use std::path::PathBuf;

use ulm_model::ModelError;

#[derive(Debug, thiserror::Error)]
pub enum RlError {
    /// Loading the model or a forward pass failed.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// Training data that cannot be used: a dataset row, a served group.
    #[error("invalid data: {0}")]
    InvalidData(String),
    /// A reward function could not score its samples.
    #[error("reward {name}: {message}")]
    Reward { name: String, message: String },
    /// A file of a dataset, checkpoint or adapter set.
    #[error("{path}: {message}")]
    Io { path: PathBuf, message: String },
    /// A checkpoint or adapter set whose contents do not fit the model.
    #[error("invalid checkpoint: {0}")]
    Checkpoint(String),
}

impl From<candle_core::Error> for RlError {
    fn from(e: candle_core::Error) -> Self {
        RlError::Model(ModelError::Compute(e))
    }
}
