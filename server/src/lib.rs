//! ULM-R1 server: serves the Janus-Pro / ULM-R1 unified multimodal model and
//! improves it with CoRL-style GRPO.
//!
//! Rooms and what they may use: `model` (candle; knows nothing of HTTP or
//! storage), `engine` (owns the model on a worker thread; plain data in and
//! out), `store` (sqlx; samples, feedback, images), `rl` (rewards and GRPO;
//! uses the model, never HTTP), `registry` (model versions: checkpoints,
//! activation), `scheduler` (RL jobs: data, training off the runtime,
//! evaluation gate, promotion), `api` (axum; talks to the engine, store,
//! registry and scheduler, never to tensors), `serve` (wiring).

pub mod api;
pub mod engine;
pub mod model;
pub mod oneshot;
pub mod registry;
pub mod rl;
pub mod scheduler;
pub mod serve;
pub mod store;
pub mod train;
