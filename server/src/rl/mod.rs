//! Reinforcement learning: CoRL's reward functions and the GRPO objective.

pub mod checkpoint;
pub mod dataset;
pub mod difflib;
pub mod evaluate;
pub mod grpo;
pub mod lora;
pub mod policy;
pub mod reward;
pub mod rewards;
pub mod trainer;
