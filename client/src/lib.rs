//! Rust client for the ULM-R1 server, generated at build time by progenitor
//! from the committed `openapi/openapi.json`. Authenticate by giving
//! [`Client::new_with_client`] a `reqwest::Client` whose default headers carry
//! `Authorization: Bearer <key>`.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let client = ulm_client::Client::new("http://127.0.0.1:8080");
//! let body = ulm_client::types::GenerateRequest {
//!     prompt: "a red circle".into(),
//!     n: std::num::NonZeroU32::new(1).unwrap(),
//!     cfg_weight: None,
//!     temperature: None,
//!     top_k: None,
//!     seed: Some(7),
//!     plan: None,
//!     best_of: None,
//! };
//! let response = client.generate(&body).await?;
//! println!("{}", response.images[0].sample_id);
//! # Ok(()) }
//! ```

#![allow(clippy::all, missing_docs, unused_imports, unused_qualifications)]

include!(concat!(env!("OUT_DIR"), "/codegen.rs"));
