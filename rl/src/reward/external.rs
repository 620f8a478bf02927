//! A user's own reward model behind HTTP.

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use super::{Reward, RewardContext, RewardTask, Scored};
use crate::RlError;

/// One sample as posted to an external reward service.
#[derive(Debug, Serialize)]
pub struct ExternalSample<'a> {
    /// The caption (generation) or question (understanding).
    pub prompt: &'a str,
    /// The answer (understanding).
    pub text: Option<&'a str>,
    /// The generated image, PNG, base64 (generation).
    pub image_png_base64: Option<String>,
    /// The reference answer, when the item has one.
    pub solution: Option<&'a str>,
}

#[derive(Debug, Serialize)]
struct ExternalRequest<'a> {
    task: &'a str,
    samples: Vec<ExternalSample<'a>>,
}

#[derive(Debug, Deserialize)]
struct ExternalResponse {
    scores: Vec<f32>,
}

/// A user's own reward model behind HTTP: `POST url` with
/// `{"task", "samples": [...]}`, answered by `{"scores": [...]}`, one per sample.
pub struct HttpReward {
    pub name: String,
    pub url: String,
    pub task: RewardTask,
    pub timeout: std::time::Duration,
}

impl Reward for HttpReward {
    fn name(&self) -> &str {
        &self.name
    }
    fn task(&self) -> RewardTask {
        self.task
    }
    fn score(&self, _: &RewardContext, samples: &[Scored]) -> Result<Vec<f32>, RlError> {
        let fail = |m: String| RlError::Reward {
            name: self.name.clone(),
            message: format!("{}: {m}", self.url),
        };
        let mut body = Vec::with_capacity(samples.len());
        for s in samples {
            let image_png_base64 = match s.image {
                Some(img) => {
                    let mut png = std::io::Cursor::new(Vec::new());
                    img.write_to(&mut png, image::ImageFormat::Png)
                        .map_err(|e| fail(e.to_string()))?;
                    Some(base64::engine::general_purpose::STANDARD.encode(png.into_inner()))
                }
                None => None,
            };
            let qa = s.item.qa.as_ref();
            body.push(ExternalSample {
                prompt: match self.task {
                    RewardTask::Generation => s.item.caption.as_deref().unwrap_or_default(),
                    RewardTask::Understanding => qa.map_or("", |q| q.question.as_str()),
                },
                text: s.text,
                image_png_base64,
                solution: qa.map(|q| q.solution.as_str()),
            });
        }
        let task = match self.task {
            RewardTask::Generation => "generation",
            RewardTask::Understanding => "understanding",
        };
        // A plain synchronous client: rewards are scored on the training thread.
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(self.timeout))
            .http_status_as_error(false)
            .build()
            .into();
        let mut response = agent
            .post(&self.url)
            .send_json(&ExternalRequest {
                task,
                samples: body,
            })
            .map_err(|e| fail(e.to_string()))?;
        if !response.status().is_success() {
            return Err(fail(format!("status {}", response.status())));
        }
        let scores = response
            .body_mut()
            .read_json::<ExternalResponse>()
            .map_err(|e| fail(e.to_string()))?
            .scores;
        if scores.len() != samples.len() || scores.iter().any(|s| !s.is_finite()) {
            return Err(fail(format!(
                "expected {} finite scores, got {:?}",
                samples.len(),
                scores
            )));
        }
        Ok(scores)
    }
}
