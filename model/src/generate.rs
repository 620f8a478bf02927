//! Sampling for both tasks: [`answer_batch`] decodes answers,
//! [`generate_images_batch`] draws images with classifier-free guidance and
//! decodes them to pixels. Both record the behaviour log-probs the trainer
//! scores against.

use candle_core::{DType, Tensor, D};
use image::RgbImage;
use serde::{Deserialize, Serialize};

use crate::decode::{CfgDecoder, TextDecoder, TextPrompt};
use crate::janus::Janus;
use crate::processor::GenerationPrompt;
use crate::sampling::{token_logprob, Sampler, SamplingParams};
use crate::ModelError;

type Result<T> = std::result::Result<T, ModelError>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
/// How the decoding of one answer ended.
pub enum DecodeEnd {
    /// The model emitted end-of-sentence.
    Stop,
    /// `max_new_tokens` reached.
    Length,
    /// The caller stopped it (client gone, deadline).
    Cancelled,
}

/// One question to answer `n` times.
#[derive(Debug, Clone)]
pub struct AnswerItem {
    pub prompt: TextPrompt,
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// One seed per sample.
    pub seeds: Vec<u64>,
}

impl AnswerItem {
    fn samples_empty(&self) -> bool {
        self.prompt.samples == 0 || self.max_new_tokens == 0
    }
}

/// One decoded answer. `token_ids` include the final EOS when there is one;
/// `logprobs[i]` is the behaviour log-prob of `token_ids[i]` under
/// `softmax(logits / temperature)` (temperature 1 when greedy).
#[derive(Debug, Clone, PartialEq)]
pub struct TextSample {
    pub token_ids: Vec<u32>,
    pub logprobs: Vec<f32>,
    pub finish_reason: DecodeEnd,
}

/// A token as it is produced, for streaming. Returning `false` from the
/// observer cancels every sample of that item.
#[derive(Debug, Clone, Copy)]
pub struct TokenEvent {
    pub item: usize,
    pub sample: usize,
    pub token: u32,
    /// The token's behaviour log-prob (as stored with the sample).
    pub logprob: f32,
}

/// Decodes every sample of every item in one batch.
pub fn answer_batch(
    model: &Janus,
    items: &[AnswerItem],
    eos: u32,
    pad: u32,
    observer: &mut dyn FnMut(TokenEvent) -> bool,
) -> Result<Vec<Vec<TextSample>>> {
    for item in items {
        if item.seeds.len() != item.prompt.samples || item.samples_empty() {
            return Err(ModelError::InvalidInput(
                "every item needs at least one sample, one seed per sample and max_new_tokens > 0"
                    .into(),
            ));
        }
    }
    if items.is_empty() {
        return Ok(Vec::new());
    }
    let prompts: Vec<TextPrompt> = items.iter().map(|i| i.prompt.clone()).collect();
    let mut results: Vec<Vec<TextSample>> = items
        .iter()
        .map(|i| {
            vec![
                TextSample {
                    token_ids: Vec::new(),
                    logprobs: Vec::new(),
                    finish_reason: DecodeEnd::Length,
                };
                i.prompt.samples
            ]
        })
        .collect();
    // Active rows: (item, sample, sampler).
    let mut active: Vec<(usize, usize, Sampler)> = items
        .iter()
        .enumerate()
        .flat_map(|(i, item)| {
            item.seeds
                .iter()
                .enumerate()
                .map(move |(s, &seed)| (i, s, Sampler::new(item.sampling, seed)))
        })
        .collect();
    let mut decoder = TextDecoder::new(model, &prompts, pad)?;
    let mut cancelled_items = vec![false; items.len()];
    loop {
        let logits: Vec<Vec<f32>> = decoder.logits().to_vec2()?;
        let mut tokens = Vec::with_capacity(active.len());
        let mut keep = Vec::with_capacity(active.len());
        for (row, (i, s, sampler)) in active.iter_mut().enumerate() {
            let token = sampler.sample(&logits[row]);
            let out = &mut results[*i][*s];
            let logprob = token_logprob(
                &logits[row],
                token,
                items[*i].sampling.logprob_temperature(),
            );
            out.token_ids.push(token);
            out.logprobs.push(logprob);
            if !cancelled_items[*i]
                && !observer(TokenEvent {
                    item: *i,
                    sample: *s,
                    token,
                    logprob,
                })
            {
                cancelled_items[*i] = true;
            }
            if token == eos {
                out.finish_reason = DecodeEnd::Stop;
            } else if out.token_ids.len() < items[*i].max_new_tokens {
                keep.push(row);
            }
            tokens.push(token);
        }
        for (i, cancelled) in cancelled_items.iter().enumerate() {
            if *cancelled {
                for out in &mut results[i] {
                    if out.finish_reason == DecodeEnd::Length
                        && out.token_ids.len() < items[i].max_new_tokens
                    {
                        out.finish_reason = DecodeEnd::Cancelled;
                    }
                }
            }
        }
        keep.retain(|&row| !cancelled_items[active[row].0]);
        if keep.is_empty() {
            return Ok(results);
        }
        if keep.len() != active.len() {
            let rows: Vec<u32> = keep.iter().map(|&r| r as u32).collect();
            decoder.retain(&rows)?;
            (active, tokens) = keep_rows(active, &tokens, &keep);
        }
        decoder.advance(&tokens)?;
    }
}

/// The rows at `keep` (ascending indices) of a batch mid-decode: their
/// state and the tokens they just chose.
fn keep_rows<T>(active: Vec<T>, tokens: &[u32], keep: &[usize]) -> (Vec<T>, Vec<u32>) {
    let tokens = keep.iter().map(|&r| tokens[r]).collect();
    let active = active
        .into_iter()
        .enumerate()
        .filter(|(r, _)| keep.binary_search(r).is_ok())
        .map(|(_, row)| row)
        .collect();
    (active, tokens)
}

/// One text-to-image prompt to render `seeds.len()` times.
#[derive(Debug, Clone)]
pub struct ImageItem {
    pub prompt: GenerationPrompt,
    pub cfg_weight: f32,
    pub sampling: SamplingParams,
    pub seeds: Vec<u64>,
}

/// One generated image. `logprobs[i]` is the behaviour log-prob of
/// `tokens[i]` as the trainer scores it: conditional logits (no CFG) at the
/// position that predicted the token, divided by the temperature.
#[derive(Debug, Clone)]
pub struct ImageSample {
    pub tokens: Vec<u32>,
    pub logprobs: Vec<f32>,
    pub image: RgbImage,
}

/// An image being generated: (item, sample, sampler, tokens, logprobs).
type ActiveImage = (usize, usize, Sampler, Vec<u32>, Vec<f32>);

/// Generates every image of every item in one batch. `keep_going(item)` is
/// asked after every step; `false` drops that item's images, which then
/// come back as `None`.
pub fn generate_images_batch(
    model: &Janus,
    items: &[ImageItem],
    pad: u32,
    keep_going: &mut dyn FnMut(usize) -> bool,
) -> Result<Vec<Vec<Option<ImageSample>>>> {
    let steps = model.cfg.gen_vision.image_tokens();
    let prompts: Vec<&GenerationPrompt> = items.iter().map(|i| &i.prompt).collect();
    let counts: Vec<usize> = items.iter().map(|i| i.seeds.len()).collect();
    let mut active: Vec<ActiveImage> = items
        .iter()
        .enumerate()
        .flat_map(|(i, item)| {
            item.seeds.iter().enumerate().map(move |(s, &seed)| {
                (
                    i,
                    s,
                    Sampler::new(item.sampling, seed),
                    Vec::new(),
                    Vec::new(),
                )
            })
        })
        .collect();
    let mut results: Vec<Vec<Option<ImageSample>>> =
        counts.iter().map(|&c| vec![None; c]).collect();
    if active.is_empty() {
        return Ok(results);
    }
    let mut decoder = CfgDecoder::new(model, &prompts, &counts, pad)?;
    for step in 0..steps {
        let weights: Vec<f32> = active.iter().map(|a| items[a.0].cfg_weight).collect();
        let cfg: Vec<Vec<f32>> = decoder.cfg_logits(&weights)?.to_vec2()?;
        let cond: Vec<Vec<f32>> = decoder.cond_logits()?.to_vec2()?;
        let mut tokens = Vec::with_capacity(active.len());
        for (row, (i, _, sampler, toks, lps)) in active.iter_mut().enumerate() {
            let token = sampler.sample(&cfg[row]);
            toks.push(token);
            lps.push(token_logprob(
                &cond[row],
                token,
                items[*i].sampling.logprob_temperature(),
            ));
            tokens.push(token);
        }
        let keep_items: Vec<bool> = (0..items.len()).map(&mut *keep_going).collect();
        let keep: Vec<usize> = (0..active.len())
            .filter(|&r| keep_items[active[r].0])
            .collect();
        if keep.is_empty() {
            return Ok(results);
        }
        if keep.len() != active.len() {
            let rows: Vec<u32> = keep.iter().map(|&r| r as u32).collect();
            decoder.retain(&rows)?;
            (active, tokens) = keep_rows(active, &tokens, &keep);
        }
        if step + 1 < steps {
            decoder.advance(&tokens)?;
        }
    }
    drop(decoder);
    for (i, s, _, tokens, logprobs) in active {
        let codes = Tensor::new(tokens.as_slice(), model.device())?.unsqueeze(0)?;
        let pixels = model.gen_vision.decode_codes(&codes)?;
        let image = to_rgb8(&pixels.squeeze(0)?)?;
        results[i][s] = Some(ImageSample {
            tokens,
            logprobs,
            image,
        });
    }
    Ok(results)
}

/// Raw decoder output `[3, S, S]` to RGB8 by the reference rule:
/// `clip((x + 1) / 2 * 255, 0, 255)` then truncation.
pub fn to_rgb8(pixels: &Tensor) -> Result<RgbImage> {
    let (c, h, w) = pixels.dims3()?;
    if c != 3 {
        return Err(ModelError::InvalidInput(format!(
            "expected 3 channels, got {c}"
        )));
    }
    let x = ((pixels.to_dtype(DType::F32)? + 1.0)? / 2.0)?;
    let x = (x * 255.0)?.clamp(0f32, 255f32)?;
    let hwc: Vec<f32> = x.permute((1, 2, 0))?.flatten_all()?.to_vec1()?;
    let bytes: Vec<u8> = hwc.into_iter().map(|v| v as u8).collect();
    RgbImage::from_raw(w as u32, h as u32, bytes)
        .ok_or_else(|| ModelError::InvalidInput("pixel buffer does not match its size".into()))
}

/// Codebook indices `[g*g]` of an image already normalised to [-1, 1]
/// (`[3, S, S]`).
pub fn encode_image(model: &Janus, pixels: &Tensor) -> Result<Vec<u32>> {
    let enc = model
        .gen_vision
        .encode(&pixels.unsqueeze(0)?.to_dtype(model.dtype())?)?;
    Ok(enc.indices.flatten_all()?.to_dtype(DType::U32)?.to_vec1()?)
}

/// Row-wise argmax of `[N, V]` logits.
pub fn argmax_rows(logits: &Tensor) -> Result<Vec<u32>> {
    Ok(logits.argmax(D::Minus1)?.to_vec1()?)
}
