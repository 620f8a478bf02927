//! Request limits and the validation of request fields against them. All of it
//! runs before anything is queued.

use std::time::Duration;

use super::error::ApiError;
use super::types::MAX_SEED;

use ulm_core::engine::{
    guidance_in_range, temperature_in_range, MAX_GUIDANCE_SCALE, MAX_TEMPERATURE, MIN_TEMPERATURE,
};
/// Beyond any vocabulary: a larger k truncates nothing.
pub const MAX_TOP_K: u32 = 1_000_000;
pub use ulm_core::store::MAX_FEEDBACK_SCORE as MAX_SCORE;

#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest request body.
    pub max_body_bytes: usize,
    /// Largest encoded image inside a request.
    pub max_image_bytes: usize,
    /// Largest decoded image, in pixels (decompression bombs stop here). The
    /// model sees the image at its vision tower's size whatever it is sent.
    pub max_image_pixels: u64,
    /// Images decoded at once; the others wait (each decode can take
    /// `3 * max_image_pixels` bytes for a moment).
    pub max_concurrent_decodes: usize,
    /// Longest prompt or question, in characters.
    pub max_prompt_chars: usize,
    pub max_images_per_request: u32,
    pub max_answers_per_request: u32,
    pub max_new_tokens: u32,
    /// Feedback items per request.
    pub max_feedback_items: usize,
    /// Time a request may take, queueing included.
    pub request_timeout: Duration,
    /// Time a request body may send nothing.
    pub body_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: 16 << 20,
            max_image_bytes: 10 << 20,
            max_image_pixels: 4096 * 4096,
            max_concurrent_decodes: 2,
            max_prompt_chars: 4000,
            max_images_per_request: 16,
            max_answers_per_request: 16,
            max_new_tokens: 2048,
            max_feedback_items: 1000,
            request_timeout: Duration::from_secs(300),
            body_timeout: Duration::from_secs(30),
        }
    }
}

fn bad(message: String) -> ApiError {
    ApiError::InvalidParameter(message)
}

impl Limits {
    pub fn text(&self, field: &str, value: &str) -> Result<(), ApiError> {
        if value.trim().is_empty() {
            return Err(bad(format!("{field} must not be empty")));
        }
        if value.contains('\0') {
            return Err(bad(format!("{field} must not contain NUL characters")));
        }
        let chars = value.chars().count();
        if chars > self.max_prompt_chars {
            return Err(bad(format!(
                "{field} has {chars} characters; the limit is {}",
                self.max_prompt_chars
            )));
        }
        Ok(())
    }

    pub fn count(&self, field: &str, value: u32, max: u32) -> Result<(), ApiError> {
        if value == 0 || value > max {
            return Err(bad(format!(
                "{field} must be between 1 and {max}, got {value}"
            )));
        }
        Ok(())
    }

    /// A classifier-free guidance weight in range.
    pub fn cfg_weight(&self, cfg_weight: f64) -> Result<(), ApiError> {
        if !guidance_in_range(cfg_weight) {
            return Err(bad(format!(
                "cfg_weight must be between 0 and {MAX_GUIDANCE_SCALE}, got {cfg_weight}"
            )));
        }
        Ok(())
    }

    /// Sampling parameters in the ranges the sampler accepts.
    pub fn sampling(
        &self,
        temperature: f64,
        top_k: Option<u32>,
        top_p: Option<f64>,
    ) -> Result<(), ApiError> {
        if !temperature_in_range(temperature) {
            return Err(bad(format!(
                "temperature must be 0 (greedy) or between {MIN_TEMPERATURE} and {MAX_TEMPERATURE}, got {temperature}"
            )));
        }
        if let Some(k) = top_k.filter(|k| !(1..=MAX_TOP_K).contains(k)) {
            return Err(bad(format!(
                "top_k must be between 1 and {MAX_TOP_K}, got {k}"
            )));
        }
        if let Some(p) = top_p {
            if !p.is_finite() || p <= 0.0 || p > 1.0 {
                return Err(bad(format!("top_p must be in (0, 1], got {p}")));
            }
        }
        Ok(())
    }

    /// The request's seeds: `seed + i`, or random ones.
    pub fn seeds(&self, seed: Option<u64>, n: u32) -> Result<Vec<u64>, ApiError> {
        let first = match seed {
            Some(s) if s > MAX_SEED - n as u64 => {
                return Err(bad(format!("seed must be at most {}", MAX_SEED - n as u64)));
            }
            Some(s) => s,
            None => rand::random::<u64>() % (MAX_SEED - n as u64),
        };
        Ok((0..n as u64).map(|i| first + i).collect())
    }
}

/// Whether any string in a JSON value (keys included) holds a NUL character,
/// which PostgreSQL text cannot store.
pub fn contains_nul(value: &serde_json::Value) -> bool {
    use serde_json::Value;
    match value {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().any(contains_nul),
        Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || contains_nul(v)),
        _ => false,
    }
}
