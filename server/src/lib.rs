//! ULM-R1 server: serves the Janus-Pro / ULM-R1 unified multimodal model and
//! improves it with CoRL-style GRPO.

pub mod model;
pub mod oneshot;
