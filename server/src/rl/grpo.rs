//! GRPO for CoRL: advantages, the per-token objective, the training step.
