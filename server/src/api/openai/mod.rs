//! OpenAI-compatible routes: `POST /v1/chat/completions` and
//! `POST /v1/images/generations`, so that the `openai` SDK (and anything
//! that speaks its protocol) can call the server. They run the same
//! validation, engine and store as `/v1/answer` and `/v1/generate`; every
//! choice and image is a stored sample whose id is returned.

pub mod chat;
pub mod images;
pub mod types;

use std::time::{SystemTime, UNIX_EPOCH};

/// Unix seconds, as OpenAI's `created` fields count.
fn unix_seconds() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}
