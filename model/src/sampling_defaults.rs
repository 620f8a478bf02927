//! The sampling settings a checkpoint recommends, read from its
//! `generation_config.json` as transformers' Janus checkpoints carry them
//! (`guidance_scale`, `temperature`): what a request that does not say is
//! sampled with. A model trained here can want other settings than
//! Janus-Pro's (the world model draws 50 % of images right at guidance 1.5,
//! temperature 0.7, and 29 % at Janus's 5 and 1).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::ModelError;

/// File of a checkpoint directory that holds its sampling defaults.
pub const GENERATION_CONFIG_FILE: &str = "generation_config.json";

/// Largest classifier-free guidance weight a request may ask for.
pub const MAX_GUIDANCE_SCALE: f64 = 20.0;
/// The smallest sampling temperature above 0: logits divided by less can
/// overflow f32.
pub const MIN_TEMPERATURE: f64 = 0.01;
/// Largest sampling temperature a request may ask for.
pub const MAX_TEMPERATURE: f64 = 5.0;

/// Whether `temperature` is one the sampler takes: 0 (greedy) or between
/// [`MIN_TEMPERATURE`] and [`MAX_TEMPERATURE`].
pub fn temperature_in_range(temperature: f64) -> bool {
    let greedy = temperature == 0.0 && temperature.is_sign_positive();
    greedy || (MIN_TEMPERATURE..=MAX_TEMPERATURE).contains(&temperature)
}

/// Whether `cfg_weight` is a guidance weight between 0 and
/// [`MAX_GUIDANCE_SCALE`].
pub fn guidance_in_range(cfg_weight: f64) -> bool {
    (0.0..=MAX_GUIDANCE_SCALE).contains(&cfg_weight) && cfg_weight.is_sign_positive()
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SamplingDefaults {
    /// Classifier-free guidance weight of image generation.
    pub guidance_scale: f64,
    /// Temperature of image tokens and of answers.
    pub temperature: f64,
    /// Temperature of the planning turn, for a checkpoint trained to plan
    /// an image in words before drawing it ([`crate::plan`]); `None`: it
    /// draws from the prompt itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan_temperature: Option<f64>,
    /// Candidates drawn from a plan per image, of which the one the model's
    /// describing turn finds the plan likeliest of is kept; `None`: one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub best_of: Option<u32>,
}

/// Most candidates per image a plan may be drawn with.
pub const MAX_BEST_OF: u32 = 16;

impl Default for SamplingDefaults {
    /// Janus-Pro's: guidance 5, temperature 1.
    fn default() -> Self {
        Self {
            guidance_scale: 5.0,
            temperature: 1.0,
            plan_temperature: None,
            best_of: None,
        }
    }
}

/// The fields of `generation_config.json` read here; the others (token
/// ids, lengths) are the checkpoint's own business.
#[derive(Deserialize)]
struct GenerationConfig {
    guidance_scale: Option<f64>,
    temperature: Option<f64>,
    plan_temperature: Option<f64>,
    best_of: Option<u32>,
}

impl SamplingDefaults {
    /// Reads `text`, a `generation_config.json`; a field it lacks keeps
    /// Janus-Pro's default.
    pub fn from_json_str(text: &str, origin: &str) -> Result<Self, ModelError> {
        let invalid = |message: String| ModelError::Config {
            field: format!("{origin}:"),
            message,
        };
        let read: GenerationConfig =
            serde_json::from_str(text).map_err(|e| invalid(e.to_string()))?;
        let defaults = Self::default();
        let out = Self {
            guidance_scale: read.guidance_scale.unwrap_or(defaults.guidance_scale),
            temperature: read.temperature.unwrap_or(defaults.temperature),
            plan_temperature: read.plan_temperature,
            best_of: read.best_of,
        };
        if !guidance_in_range(out.guidance_scale) {
            return Err(invalid(format!(
                "guidance_scale must be between 0 and {MAX_GUIDANCE_SCALE}, got {}",
                out.guidance_scale
            )));
        }
        if !temperature_in_range(out.temperature) {
            return Err(invalid(format!(
                "temperature must be 0 (greedy) or between {MIN_TEMPERATURE} and {MAX_TEMPERATURE}, got {}",
                out.temperature
            )));
        }
        if let Some(plan) = out.plan_temperature.filter(|t| !temperature_in_range(*t)) {
            return Err(invalid(format!(
                "plan_temperature must be 0 (greedy) or between {MIN_TEMPERATURE} and {MAX_TEMPERATURE}, got {plan}"
            )));
        }
        if let Some(k) = out.best_of.filter(|k| !(1..=MAX_BEST_OF).contains(k)) {
            return Err(invalid(format!(
                "best_of must be between 1 and {MAX_BEST_OF}, got {k}"
            )));
        }
        if out.best_of.is_some_and(|k| k > 1) && out.plan_temperature.is_none() {
            return Err(invalid(
                "best_of reads candidates against a plan: it needs plan_temperature".into(),
            ));
        }
        Ok(out)
    }

    /// The defaults of the checkpoint in `dir`: Janus-Pro's when it has no
    /// `generation_config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self, ModelError> {
        let path = dir.join(GENERATION_CONFIG_FILE);
        match std::fs::read_to_string(&path) {
            Ok(text) => Self::from_json_str(&text, &path.display().to_string()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(ModelError::Io {
                path,
                message: e.to_string(),
            }),
        }
    }

    /// `cfg_weight` when a caller names one, else this guidance.
    pub fn guidance_or(&self, cfg_weight: Option<f32>) -> f32 {
        cfg_weight.unwrap_or(self.guidance_scale as f32)
    }

    /// `temperature` when a caller names one, else this temperature.
    pub fn temperature_or(&self, temperature: Option<f32>) -> f32 {
        temperature.unwrap_or(self.temperature as f32)
    }

    /// As `generation_config.json` holds them.
    pub fn to_json_string(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_fields_keep_janus_defaults_and_out_of_range_ones_are_refused() {
        let read = |text: &str| SamplingDefaults::from_json_str(text, "g.json");
        assert_eq!(read("{}").unwrap(), SamplingDefaults::default());
        let world = read(r#"{"guidance_scale": 2, "temperature": 0.7, "max_length": 9}"#).unwrap();
        assert_eq!((world.guidance_scale, world.temperature), (2.0, 0.7));
        assert_eq!(world.plan_temperature, None);
        assert!(!world.to_json_string().contains("plan"));
        assert_eq!(read(&world.to_json_string()).unwrap(), world);
        let planning =
            read(r#"{"guidance_scale": 2, "plan_temperature": 0.5, "best_of": 8}"#).unwrap();
        assert_eq!(
            (planning.plan_temperature, planning.best_of),
            (Some(0.5), Some(8))
        );
        assert_eq!(read(&planning.to_json_string()).unwrap(), planning);
        assert_eq!(
            (world.guidance_or(None), world.guidance_or(Some(4.0))),
            (2.0, 4.0)
        );
        assert_eq!(
            (world.temperature_or(None), world.temperature_or(Some(1.0))),
            (0.7, 1.0)
        );
        for bad in [
            r#"{"guidance_scale": -1}"#,
            r#"{"guidance_scale": 21}"#,
            r#"{"temperature": 6}"#,
            r#"{"temperature": 0.001}"#,
            r#"{"temperature": "hot"}"#,
            r#"{"plan_temperature": 9}"#,
            r#"{"plan_temperature": 1, "best_of": 0}"#,
            r#"{"plan_temperature": 1, "best_of": 17}"#,
            r#"{"best_of": 4}"#,
            "not json",
        ] {
            let e = read(bad).unwrap_err().to_string();
            assert!(e.contains("g.json"), "{bad}: {e}");
        }
    }

    #[test]
    fn a_checkpoint_without_the_file_has_janus_defaults() {
        let dir = std::env::temp_dir().join(format!("ulm-sampling-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(
            SamplingDefaults::from_dir(&dir).unwrap(),
            SamplingDefaults::default()
        );
        std::fs::write(dir.join(GENERATION_CONFIG_FILE), r#"{"temperature": 0.5}"#).unwrap();
        assert_eq!(SamplingDefaults::from_dir(&dir).unwrap().temperature, 0.5);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
