//! ULM-R1 server: the HTTP API and the command line. It is the only crate
//! that knows HTTP; the model, RL and core crates below it know nothing of it.
//!
//! `api` (axum, utoipa: routes, validation, auth, the OpenAPI document; talks
//! to the core, never to tensors), `serve` (configuration and wiring),
//! `listen` (connections and their timeouts), `train`, `pretrain`,
//! `corl`, `gate_check`, `oneshot` and `world` (the offline commands).

pub mod api;
pub mod corl;
pub mod gate_check;
pub mod listen;
pub mod oneshot;
pub mod pretrain;
pub mod s3;
pub mod serve;
pub mod train;
pub mod world;
