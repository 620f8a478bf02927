//! Served samples as they are recorded: one typed [`SampleRecord`] per
//! output, written by [`record_answers`] or [`record_images`] (every image
//! durable before the rows that name it, the rows of a request in one
//! transaction), and read back as the same type by the scheduler. The
//! parameters that shaped the behaviour distribution are fields, so a job
//! can tell which stored log-probs score what its training forward scores.

use serde::{Deserialize, Serialize};
use ulm_model::sampling::SamplingParams;

use crate::engine::{AnswerOutput, GenerateOutput, RequestTimings};
use crate::store::{now_ms, Store, StoreError};
use crate::stored_enum;

stored_enum! {
    /// What a sample was produced for.
    pub enum Task {
        Generate,
        Answer,
    }
}

stored_enum! {
    /// Why a served answer ended.
    pub enum FinishReason {
        /// The model ended its answer.
        Stop,
        /// `max_new_tokens` was reached.
        Length,
    }
}

/// How the images of a text-to-image request were drawn.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GenerateParams {
    /// Images drawn for the prompt.
    pub n: u32,
    /// `uncond + cfg_weight * (cond - uncond)`.
    pub cfg_weight: f32,
    /// 0 picks the most likely token.
    pub temperature: f32,
    pub top_k: Option<u32>,
    /// Set when the model first planned the image in words at this
    /// temperature and drew every image from its plan ([`ulm_model::plan`];
    /// the plan is each image sample's text).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan_temperature: Option<f32>,
    /// Candidates drawn per image, of which the model's own reading of the
    /// plan kept one (the stored tokens and log-probs are the kept one's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub best_of: Option<u32>,
}

/// How the answers of a question were drawn.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AnswerParams {
    /// Answers drawn for the question.
    pub n: u32,
    pub max_new_tokens: u32,
    /// 0 decodes greedily.
    pub temperature: f32,
    pub top_p: Option<f32>,
    pub top_k: Option<u32>,
}

/// The request parameters stored with a sample (the `params` column:
/// untagged, so rows keep the shape they always had).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum RequestParams {
    Generate(GenerateParams),
    Answer(AnswerParams),
}

impl RequestParams {
    pub fn temperature(&self) -> f32 {
        match self {
            RequestParams::Generate(p) => p.temperature,
            RequestParams::Answer(p) => p.temperature,
        }
    }

    /// How the sampler drew the request's tokens.
    pub fn sampling(&self) -> SamplingParams {
        match *self {
            RequestParams::Generate(p) => SamplingParams {
                temperature: p.temperature,
                top_k: p.top_k.map(|k| k as usize),
                top_p: None,
            },
            RequestParams::Answer(p) => SamplingParams {
                temperature: p.temperature,
                top_k: p.top_k.map(|k| k as usize),
                top_p: p.top_p,
            },
        }
    }

    /// The temperature the stored behaviour log-probs were taken at (1 for
    /// greedy decoding).
    pub fn logprob_temperature(&self) -> f32 {
        self.sampling().logprob_temperature()
    }
}

/// One served sample, as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct SampleRecord {
    pub id: String,
    pub request_id: String,
    pub group_index: i64,
    pub task: Task,
    pub model_version: String,
    /// The prompt (generation) or the question (answers).
    pub prompt: String,
    pub input_image_sha256: Option<String>,
    pub params: RequestParams,
    pub seed: i64,
    /// The answer (answers), or the plan the image was drawn from
    /// (generation with a plan).
    pub output_text: Option<String>,
    pub output_image_sha256: Option<String>,
    pub token_ids: Vec<u32>,
    /// Behaviour log-probs of `token_ids`, as the sampler computed them;
    /// empty when they were not all finite. Conditional for images.
    pub logprobs: Vec<f32>,
    /// Images only: log-probs under the guided distribution the tokens were
    /// drawn from (empty as `logprobs` is, and for rows stored before them).
    pub guided_logprobs: Vec<f32>,
    pub finish_reason: Option<FinishReason>,
    pub queue_ms: i64,
    pub compute_ms: i64,
    pub created_at: i64,
}

impl SampleRecord {
    /// The text an image's tokens were drawn from: its plan when the model
    /// planned it, else the prompt. What the image's behaviour log-probs
    /// are conditioned on, and so what the trainer conditions on.
    pub fn drawn_from(&self) -> &str {
        match (&self.params, &self.output_text) {
            (RequestParams::Generate(p), Some(plan)) if p.plan_temperature.is_some() => plan,
            _ => &self.prompt,
        }
    }
}

/// A recorded request: its id and one stored sample per output, in order.
#[derive(Debug, Clone)]
pub struct Recorded<T> {
    pub request_id: String,
    pub samples: Vec<RecordedSample<T>>,
}

#[derive(Debug, Clone)]
pub struct RecordedSample<T> {
    pub sample_id: String,
    pub seed: u64,
    /// What the response shows of the sample.
    pub output: T,
}

/// A recorded answer as the response shows it.
#[derive(Debug, Clone)]
pub struct AnswerText {
    pub text: String,
    pub finish_reason: FinishReason,
    pub completion_tokens: usize,
}

/// Stores the answers to one question: the input image (as sent, so a job
/// can train on the question again), then every sample.
pub async fn record_answers(
    store: &Store,
    question: &str,
    params: AnswerParams,
    seeds: &[u64],
    input_image: Vec<u8>,
    output: &AnswerOutput,
) -> Result<Recorded<AnswerText>, StoreError> {
    let input_sha = store.put_image(input_image).await?;
    let mut pending = Pending::new(Task::Answer, question, RequestParams::Answer(params));
    pending.template.input_image_sha256 = Some(input_sha);
    let mut samples = Vec::with_capacity(output.samples.len());
    for (s, &seed) in output.samples.iter().zip(seeds) {
        let id = pending.push(seed, &output.model_version, output.timings, |r| {
            r.output_text = Some(s.text.clone());
            r.token_ids = s.token_ids.clone();
            r.logprobs = s.logprobs.clone();
            r.finish_reason = Some(s.finish_reason);
        });
        samples.push(RecordedSample {
            sample_id: id,
            seed,
            output: AnswerText {
                text: s.text.clone(),
                finish_reason: s.finish_reason,
                completion_tokens: s.token_ids.len(),
            },
        });
    }
    pending.commit(store, samples).await
}

/// Stores the images drawn for one prompt: each PNG (content-addressed),
/// then every sample. The outputs are the PNG bytes.
pub async fn record_images(
    store: &Store,
    prompt: &str,
    params: GenerateParams,
    seeds: &[u64],
    output: GenerateOutput,
) -> Result<Recorded<Vec<u8>>, StoreError> {
    let (images, plan) = (output.images, output.plan);
    let pngs = tokio::task::spawn_blocking(move || {
        images
            .into_iter()
            .map(|img| encode_png(&img.image).map(|png| (png, img)))
            .collect::<Result<Vec<_>, StoreError>>()
    })
    .await
    .map_err(|e| StoreError::Io(std::io::Error::other(e)))??;
    let mut pending = Pending::new(Task::Generate, prompt, RequestParams::Generate(params));
    let mut samples = Vec::with_capacity(pngs.len());
    for ((png, image), &seed) in pngs.into_iter().zip(seeds) {
        let sha = store.put_image(png.clone()).await?;
        let id = pending.push(seed, &output.model_version, output.timings, |r| {
            r.output_image_sha256 = Some(sha);
            r.output_text = plan.clone();
            r.token_ids = image.tokens;
            r.logprobs = image.logprobs;
            r.guided_logprobs = image.guided_logprobs;
        });
        samples.push(RecordedSample {
            sample_id: id,
            seed,
            output: png,
        });
    }
    pending.commit(store, samples).await
}

/// The behaviour log-probs as stored: all of them when every one is
/// finite, else none (a sample without usable log-probs is served and
/// stored, but never trained on). No non-finite number is stored.
pub fn usable_logprobs(logprobs: &[f32]) -> Vec<f32> {
    if logprobs.iter().all(|l| l.is_finite()) {
        logprobs.to_vec()
    } else {
        tracing::warn!(
            "the sampler produced non-finite log-probs; the sample is stored without them"
        );
        Vec::new()
    }
}

/// PNG bytes of an image.
pub fn encode_png(image: &image::RgbImage) -> Result<Vec<u8>, StoreError> {
    let mut out = std::io::Cursor::new(Vec::new());
    image
        .write_to(&mut out, image::ImageFormat::Png)
        .map_err(|e| StoreError::Io(std::io::Error::other(format!("PNG encoding: {e}"))))?;
    Ok(out.into_inner())
}

/// The rows of one request, built up sample by sample.
struct Pending {
    request_id: String,
    template: SampleRecord,
    records: Vec<SampleRecord>,
}

impl Pending {
    fn new(task: Task, prompt: &str, params: RequestParams) -> Self {
        Self {
            request_id: uuid::Uuid::new_v4().to_string(),
            template: SampleRecord {
                id: String::new(),
                request_id: String::new(),
                group_index: 0,
                task,
                model_version: String::new(),
                prompt: prompt.to_string(),
                input_image_sha256: None,
                params,
                seed: 0,
                output_text: None,
                output_image_sha256: None,
                token_ids: Vec::new(),
                logprobs: Vec::new(),
                guided_logprobs: Vec::new(),
                finish_reason: None,
                queue_ms: 0,
                compute_ms: 0,
                created_at: now_ms(),
            },
            records: Vec::new(),
        }
    }

    /// Adds the next sample of the group and returns its id.
    fn push(
        &mut self,
        seed: u64,
        version: &str,
        timings: RequestTimings,
        fill: impl FnOnce(&mut SampleRecord),
    ) -> String {
        let mut record = SampleRecord {
            id: uuid::Uuid::new_v4().to_string(),
            request_id: self.request_id.clone(),
            group_index: self.records.len() as i64,
            model_version: version.to_string(),
            seed: seed as i64,
            queue_ms: timings.queue_ms as i64,
            compute_ms: timings.compute_ms as i64,
            ..self.template.clone()
        };
        fill(&mut record);
        let id = record.id.clone();
        self.records.push(record);
        id
    }

    async fn commit<T>(
        self,
        store: &Store,
        samples: Vec<RecordedSample<T>>,
    ) -> Result<Recorded<T>, StoreError> {
        store.insert_samples(&self.records).await?;
        Ok(Recorded {
            request_id: self.request_id,
            samples,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_params_keep_their_shape_and_read_back_typed() {
        let answer = RequestParams::Answer(AnswerParams {
            n: 2,
            max_new_tokens: 16,
            temperature: 0.5,
            top_p: None,
            top_k: Some(5),
        });
        let json = serde_json::to_value(answer).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"n": 2, "max_new_tokens": 16, "temperature": 0.5, "top_p": null, "top_k": 5})
        );
        assert_eq!(
            serde_json::from_value::<RequestParams>(json).unwrap(),
            answer
        );
        // A row written before the types existed.
        let old = serde_json::json!({"n": 4, "cfg_weight": 5.0, "temperature": 1.0, "top_k": null});
        let parsed: RequestParams = serde_json::from_value(old).unwrap();
        assert!(matches!(parsed, RequestParams::Generate(g) if g.cfg_weight == 5.0 && g.n == 4));
        assert_eq!(parsed.logprob_temperature(), 1.0);
        let greedy = RequestParams::Answer(AnswerParams {
            n: 1,
            max_new_tokens: 8,
            temperature: 0.0,
            top_p: None,
            top_k: None,
        });
        assert_eq!(greedy.logprob_temperature(), 1.0);
        // A planned request's rows say so; older rows read as unplanned.
        let planned = RequestParams::Generate(GenerateParams {
            n: 1,
            cfg_weight: 1.5,
            temperature: 0.7,
            top_k: None,
            plan_temperature: Some(0.5),
            best_of: None,
        });
        let json = serde_json::to_value(planned).unwrap();
        assert_eq!(json["plan_temperature"], 0.5);
        assert_eq!(
            serde_json::from_value::<RequestParams>(json).unwrap(),
            planned
        );
        assert!(matches!(parsed, RequestParams::Generate(g) if g.plan_temperature.is_none()));
    }

    #[test]
    fn a_planned_image_was_drawn_from_its_plan() {
        let generate = |plan_temperature| {
            RequestParams::Generate(GenerateParams {
                n: 1,
                cfg_weight: 1.5,
                temperature: 0.7,
                top_k: None,
                plan_temperature,
                best_of: None,
            })
        };
        let mut row = SampleRecord {
            id: "s".into(),
            request_id: "r".into(),
            group_index: 0,
            task: Task::Generate,
            model_version: "v".into(),
            prompt: "a red circle above a blue square".into(),
            input_image_sha256: None,
            params: generate(Some(0.5)),
            seed: 0,
            output_text: Some(
                "a small red circle at the top and a small blue square in the center".into(),
            ),
            output_image_sha256: None,
            token_ids: vec![],
            logprobs: vec![],
            guided_logprobs: vec![],
            finish_reason: None,
            queue_ms: 0,
            compute_ms: 0,
            created_at: 0,
        };
        assert!(row
            .drawn_from()
            .starts_with("a small red circle at the top"));
        row.params = generate(None);
        assert_eq!(row.drawn_from(), "a red circle above a blue square");
    }
}
