//! Reinforcement learning for ULM-R1, as in CoRL: verifiable and model-judged
//! rewards, the GRPO objective, LoRA, rollouts and the trainer, checkpoints,
//! datasets and the off-policy evaluation of candidates. It builds on the
//! model crate and runs synchronously; it knows nothing of HTTP or storage.

pub mod checkpoint;
pub mod curves;
pub mod dataset;
pub mod difflib;
pub mod error;
pub mod evaluate;
pub mod grpo;
pub mod lora;
pub mod policy;
pub mod reading;
pub mod reward;
pub mod trainer;
pub use error::RlError;
