//! Sampling for both tasks: [`AnswerBatch`] decodes answers,
//! [`ImageBatch`] draws images with classifier-free guidance and decodes
//! them to pixels; requests join and leave both between steps (the engine's
//! continuous batching). [`answer_batch`] and [`generate_images_batch`] run
//! a fixed set of items to the end. All record the behaviour log-probs the
//! trainer scores against.

use std::collections::HashMap;

use candle_core::{DType, Tensor, D};
use image::RgbImage;
use rayon::prelude::*;
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
    let mut batch = AnswerBatch::new(eos, pad);
    batch.admit(model, items.iter().cloned().enumerate().collect())?;
    let mut results = vec![Vec::new(); items.len()];
    while !batch.is_empty() {
        for (item, samples) in batch.step(model, observer)? {
            results[item] = samples;
        }
    }
    Ok(results)
}

/// One answer row of an [`AnswerBatch`].
struct AnswerRow {
    item: usize,
    sample: usize,
    sampler: Sampler,
    max_new_tokens: usize,
    logprob_temperature: f32,
}

/// The samples of one item so far.
struct AnswerProgress {
    samples: Vec<TextSample>,
    unfinished: usize,
    cancelled: bool,
}

/// Answers being decoded, one row per sample, that items join and leave
/// between steps (continuous batching): [`admit`](Self::admit) prefills new
/// items and adds their rows to the running ones, [`step`](Self::step)
/// samples one token for every row, hands back the items whose samples have
/// all ended, and runs the next position for the rest. Items are named by
/// the caller's keys (unique among the items in the batch).
pub struct AnswerBatch {
    eos: u32,
    pad: u32,
    decoder: Option<TextDecoder>,
    rows: Vec<AnswerRow>,
    items: HashMap<usize, AnswerProgress>,
}

impl AnswerBatch {
    pub fn new(eos: u32, pad: u32) -> Self {
        Self {
            eos,
            pad,
            decoder: None,
            rows: Vec::new(),
            items: HashMap::new(),
        }
    }

    /// Rows decoding.
    pub fn rows(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Prefills `items` (key, item) and adds their samples to the batch.
    /// On an error the running rows are untouched and no item was added.
    pub fn admit(&mut self, model: &Janus, items: Vec<(usize, AnswerItem)>) -> Result<()> {
        for (key, item) in &items {
            if item.seeds.len() != item.prompt.samples || item.samples_empty() {
                return Err(ModelError::InvalidInput(
                    "every item needs at least one sample, one seed per sample and max_new_tokens > 0"
                        .into(),
                ));
            }
            if self.items.contains_key(key) {
                return Err(ModelError::InvalidInput(format!(
                    "item {key} is already in the batch"
                )));
            }
        }
        if items.is_empty() {
            return Ok(());
        }
        let prompts: Vec<TextPrompt> = items.iter().map(|(_, i)| i.prompt.clone()).collect();
        let fresh = TextDecoder::new(model, &prompts, self.pad)?;
        let decoder = match &self.decoder {
            Some(running) => running.join(&fresh)?,
            None => fresh,
        };
        self.decoder = Some(decoder);
        for (key, item) in items {
            for (sample, &seed) in item.seeds.iter().enumerate() {
                self.rows.push(AnswerRow {
                    item: key,
                    sample,
                    sampler: Sampler::new(item.sampling, seed),
                    max_new_tokens: item.max_new_tokens,
                    logprob_temperature: item.sampling.logprob_temperature(),
                });
            }
            let empty = TextSample {
                token_ids: Vec::new(),
                logprobs: Vec::new(),
                finish_reason: DecodeEnd::Cancelled,
            };
            self.items.insert(
                key,
                AnswerProgress {
                    samples: vec![empty; item.seeds.len()],
                    unfinished: item.seeds.len(),
                    cancelled: false,
                },
            );
        }
        Ok(())
    }

    /// Samples one token for every row and returns the items that ended:
    /// all their samples stopped or reached their length, or the observer
    /// returned `false` for one of their tokens (its unfinished samples then
    /// end as [`DecodeEnd::Cancelled`]). On an error the batch is lost; the
    /// caller fails its items.
    pub fn step(
        &mut self,
        model: &Janus,
        observer: &mut dyn FnMut(TokenEvent) -> bool,
    ) -> Result<Vec<(usize, Vec<TextSample>)>> {
        let Some(decoder) = &mut self.decoder else {
            return Ok(Vec::new());
        };
        let logits = decoder.logits();
        let vocab = logits.dim(1)?;
        let logits: Vec<f32> = logits.flatten_all()?.to_vec1()?;
        // Rows sample independently (each from its own seed), in parallel.
        let picks: Vec<(u32, f32)> = self
            .rows
            .par_iter_mut()
            .zip(logits.par_chunks(vocab))
            .map(|(r, logits)| {
                let token = r.sampler.sample(logits);
                (token, token_logprob(logits, token, r.logprob_temperature))
            })
            .collect();
        let mut tokens = Vec::with_capacity(self.rows.len());
        let mut keep = Vec::with_capacity(self.rows.len());
        for (row, (r, &(token, logprob))) in self.rows.iter_mut().zip(&picks).enumerate() {
            let progress = self.items.get_mut(&r.item).expect("every row has its item");
            let out = &mut progress.samples[r.sample];
            out.token_ids.push(token);
            out.logprobs.push(logprob);
            if !progress.cancelled
                && !observer(TokenEvent {
                    item: r.item,
                    sample: r.sample,
                    token,
                    logprob,
                })
            {
                progress.cancelled = true;
            }
            if token == self.eos {
                out.finish_reason = DecodeEnd::Stop;
                progress.unfinished -= 1;
            } else if out.token_ids.len() >= r.max_new_tokens {
                out.finish_reason = DecodeEnd::Length;
                progress.unfinished -= 1;
            } else {
                keep.push(row);
            }
            tokens.push(token);
        }
        keep.retain(|&row| !self.items[&self.rows[row].item].cancelled);
        let ended: Vec<usize> = self
            .items
            .iter()
            .filter(|(_, p)| p.unfinished == 0 || p.cancelled)
            .map(|(&key, _)| key)
            .collect();
        let ended = ended
            .into_iter()
            .map(|key| (key, self.items.remove(&key).expect("listed").samples))
            .collect();
        if keep.is_empty() {
            self.decoder = None;
            self.rows.clear();
            return Ok(ended);
        }
        if keep.len() != self.rows.len() {
            let rows: Vec<u32> = keep.iter().map(|&r| r as u32).collect();
            decoder.retain(&rows)?;
            (self.rows, tokens) = keep_rows(std::mem::take(&mut self.rows), &tokens, &keep);
        }
        decoder.advance(model, &tokens)?;
        Ok(ended)
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
    /// Per token, under the conditional distribution: what GRPO trains.
    pub logprobs: Vec<f32>,
    /// Per token, under the guided distribution the token was drawn from:
    /// what an importance weight of the sample divides by.
    pub guided_logprobs: Vec<f32>,
    pub image: RgbImage,
}

/// Generates every image of every item in one batch. `keep_going(item)` is
/// asked after every step; `false` drops that item's images, which then
/// come back as `None`.
pub fn generate_images_batch(
    model: &Janus,
    items: &[ImageItem],
    pad: u32,
    keep_going: &mut dyn FnMut(usize) -> bool,
) -> Result<Vec<Vec<Option<ImageSample>>>> {
    let mut batch = ImageBatch::new(pad);
    batch.admit(model, items.iter().cloned().enumerate().collect())?;
    let mut results: Vec<Vec<Option<ImageSample>>> =
        items.iter().map(|i| vec![None; i.seeds.len()]).collect();
    while !batch.is_empty() {
        for (item, images) in batch.step(model, keep_going)? {
            results[item] = images;
        }
    }
    Ok(results)
}

/// One image of an [`ImageBatch`]: its two rows (conditional and
/// unconditional) share this state.
struct ImageRow {
    item: usize,
    sample: usize,
    sampler: Sampler,
    cfg_weight: f32,
    logprob_temperature: f32,
    tokens: Vec<u32>,
    logprobs: Vec<f32>,
    guided_logprobs: Vec<f32>,
}

/// Images being drawn with classifier-free guidance, that items join and
/// leave between steps, as [`AnswerBatch`] does for answers. An image's two
/// rows always enter and leave together.
pub struct ImageBatch {
    pad: u32,
    decoder: Option<CfgDecoder>,
    rows: Vec<ImageRow>,
    /// Per item: its images so far (finished ones decoded to pixels) and
    /// how many are still drawing.
    items: HashMap<usize, (Vec<Option<ImageSample>>, usize)>,
}

impl ImageBatch {
    pub fn new(pad: u32) -> Self {
        Self {
            pad,
            decoder: None,
            rows: Vec::new(),
            items: HashMap::new(),
        }
    }

    /// Images drawing (each is two rows of the model's batch).
    pub fn images(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Prefills `items` (key, item) and adds their images to the batch. On
    /// an error the running images are untouched and no item was added.
    pub fn admit(&mut self, model: &Janus, items: Vec<(usize, ImageItem)>) -> Result<()> {
        for (key, _) in &items {
            if self.items.contains_key(key) {
                return Err(ModelError::InvalidInput(format!(
                    "item {key} is already in the batch"
                )));
            }
        }
        let items: Vec<(usize, ImageItem)> = items
            .into_iter()
            .filter(|(_, i)| !i.seeds.is_empty())
            .collect();
        if items.is_empty() {
            return Ok(());
        }
        let prompts: Vec<&GenerationPrompt> = items.iter().map(|(_, i)| &i.prompt).collect();
        let counts: Vec<usize> = items.iter().map(|(_, i)| i.seeds.len()).collect();
        let fresh = CfgDecoder::new(model, &prompts, &counts, self.pad)?;
        let decoder = match &self.decoder {
            Some(running) => running.join(&fresh)?,
            None => fresh,
        };
        self.decoder = Some(decoder);
        for (key, item) in items {
            for (sample, &seed) in item.seeds.iter().enumerate() {
                self.rows.push(ImageRow {
                    item: key,
                    sample,
                    sampler: Sampler::new(item.sampling, seed),
                    cfg_weight: item.cfg_weight,
                    logprob_temperature: item.sampling.logprob_temperature(),
                    tokens: Vec::new(),
                    logprobs: Vec::new(),
                    guided_logprobs: Vec::new(),
                });
            }
            self.items
                .insert(key, (vec![None; item.seeds.len()], item.seeds.len()));
        }
        Ok(())
    }

    /// Samples one image token for every image, decodes the images that
    /// are complete to pixels, and returns the items that ended: every image
    /// drawn, or `keep_going(item)` false (their images then come back as
    /// `None`). On an error the batch is lost; the caller fails its items.
    pub fn step(
        &mut self,
        model: &Janus,
        keep_going: &mut dyn FnMut(usize) -> bool,
    ) -> Result<Vec<(usize, Vec<Option<ImageSample>>)>> {
        let Some(decoder) = &mut self.decoder else {
            return Ok(Vec::new());
        };
        let steps = model.cfg.gen_vision.image_tokens();
        let weights: Vec<f32> = self.rows.iter().map(|r| r.cfg_weight).collect();
        let cfg = decoder.cfg_logits(&weights)?;
        let codes = cfg.dim(1)?;
        let cfg: Vec<f32> = cfg.flatten_all()?.to_vec1()?;
        let cond: Vec<f32> = decoder.cond_logits()?.flatten_all()?.to_vec1()?;
        let mut tokens: Vec<u32> = self
            .rows
            .par_iter_mut()
            .zip(cfg.par_chunks(codes).zip(cond.par_chunks(codes)))
            .map(|(r, (cfg, cond))| {
                let token = r.sampler.sample(cfg);
                r.tokens.push(token);
                r.logprobs
                    .push(token_logprob(cond, token, r.logprob_temperature));
                r.guided_logprobs
                    .push(token_logprob(cfg, token, r.logprob_temperature));
                token
            })
            .collect();
        let mut cancelled: Vec<usize> = self
            .items
            .keys()
            .copied()
            .filter(|&key| !keep_going(key))
            .collect();
        cancelled.sort_unstable();
        let mut keep = Vec::with_capacity(self.rows.len());
        let mut complete = Vec::new();
        for (row, r) in self.rows.iter().enumerate() {
            if cancelled.binary_search(&r.item).is_ok() {
                continue;
            }
            if r.tokens.len() >= steps {
                complete.push(row);
            } else {
                keep.push(row);
            }
        }
        for &row in &complete {
            let r = &self.rows[row];
            let codes = Tensor::new(r.tokens.as_slice(), model.device())?.unsqueeze(0)?;
            let pixels = model.gen_vision.decode_codes(&codes)?;
            let image = to_rgb8(&pixels.squeeze(0)?)?;
            let (images, drawing) = self.items.get_mut(&r.item).expect("every row has its item");
            images[r.sample] = Some(ImageSample {
                tokens: r.tokens.clone(),
                logprobs: r.logprobs.clone(),
                guided_logprobs: r.guided_logprobs.clone(),
                image,
            });
            *drawing -= 1;
        }
        let mut ended = Vec::new();
        for key in cancelled {
            let (images, _) = self.items.remove(&key).expect("listed");
            ended.push((key, images.into_iter().map(|_| None).collect()));
        }
        let done: Vec<usize> = self
            .items
            .iter()
            .filter(|(_, (_, drawing))| *drawing == 0)
            .map(|(&key, _)| key)
            .collect();
        for key in done {
            ended.push((key, self.items.remove(&key).expect("listed").0));
        }
        if keep.is_empty() {
            self.decoder = None;
            self.rows.clear();
            return Ok(ended);
        }
        if keep.len() != self.rows.len() {
            let rows: Vec<u32> = keep.iter().map(|&r| r as u32).collect();
            decoder.retain(&rows)?;
            (self.rows, tokens) = keep_rows(std::mem::take(&mut self.rows), &tokens, &keep);
        }
        decoder.advance(model, &tokens)?;
        Ok(ended)
    }
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
