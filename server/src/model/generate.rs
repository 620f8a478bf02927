//! Decoding for both tasks with a KV cache.
//!
//! [`TextDecoder`] and [`CfgDecoder`] hold a batch of rows mid-decode: they
//! prefill the prompts once (left-padded to a common length), copy cache rows
//! for every sample of a prompt, and drop rows that finished. The sampling
//! loops [`answer_batch`] and [`generate_images_batch`] drive them; the parity
//! tests drive them with forced tokens.

use candle_core::{DType, Tensor, D};
use image::RgbImage;
use serde::{Deserialize, Serialize};

use super::janus::Janus;
use super::llama::{KvCache, Llama};
use super::ops::Pass;
use super::processor::{GenerationPrompt, UnderstandingPrompt};
use super::sampling::{token_logprob, Sampler, SamplingParams};
use super::ModelError;

type Result<T> = std::result::Result<T, ModelError>;

/// Rows of a batch mid-decode: cache, key padding mask and left padding.
struct Rows {
    cache: KvCache,
    key_valid: Vec<Vec<bool>>,
    pads: Vec<usize>,
}

impl Rows {
    /// Prefills left-padded `embeds` rows (`[B, T, H]`, row `b` with `pads[b]`
    /// leading pad positions) and returns the last hidden state of each row.
    fn prefill(lm: &Llama, embeds: &Tensor, pads: Vec<usize>) -> Result<(Self, Tensor)> {
        let (_, t, _) = embeds.dims3()?;
        let key_valid: Vec<Vec<bool>> = pads
            .iter()
            .map(|&p| (0..t).map(|i| i >= p).collect())
            .collect();
        let ctx = lm.context(&Llama::next_positions(0, t, &pads), &key_valid)?;
        let mut cache = KvCache::new(lm.num_layers());
        let hidden = lm.forward_hidden(embeds, &ctx, Some(&mut cache), Pass::Inference)?;
        let last = hidden.narrow(1, t - 1, 1)?.squeeze(1)?;
        Ok((
            Self {
                cache,
                key_valid,
                pads,
            },
            last,
        ))
    }

    /// Runs one new position per row and returns the last hidden states.
    fn step(&mut self, lm: &Llama, embeds: &Tensor) -> Result<Tensor> {
        let past = self.cache.len();
        for row in &mut self.key_valid {
            row.push(true);
        }
        let ctx = lm.context(&Llama::next_positions(past, 1, &self.pads), &self.key_valid)?;
        let hidden = lm.forward_hidden(embeds, &ctx, Some(&mut self.cache), Pass::Inference)?;
        Ok(hidden.squeeze(1)?)
    }

    fn select(&mut self, rows: &[u32]) -> Result<()> {
        self.cache = self.cache.select_rows(rows)?;
        self.key_valid = rows
            .iter()
            .map(|&r| self.key_valid[r as usize].clone())
            .collect();
        self.pads = rows.iter().map(|&r| self.pads[r as usize]).collect();
        Ok(())
    }
}

fn select_tensor_rows(t: &Tensor, rows: &[u32]) -> Result<Tensor> {
    Ok(t.index_select(&Tensor::new(rows, t.device())?, 0)?)
}

/// Left-pads id rows to a common length; returns ids `[B, T]` and pads.
fn left_pad(rows: &[&[u32]], pad_id: u32) -> (Vec<u32>, usize, Vec<usize>) {
    let t = rows.iter().map(|r| r.len()).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(rows.len() * t);
    let mut pads = Vec::with_capacity(rows.len());
    for r in rows {
        let pad = t - r.len();
        ids.extend(std::iter::repeat_n(pad_id, pad));
        ids.extend_from_slice(r);
        pads.push(pad);
    }
    (ids, t, pads)
}

/// One understanding prompt and how many samples to decode from it.
#[derive(Debug, Clone)]
pub struct TextPrompt {
    pub prompt: UnderstandingPrompt,
    /// Normalised pixels `[images, 3, S, S]` for the prompt's image spans.
    pub pixels: Option<Tensor>,
    pub samples: usize,
}

/// Text rows mid-decode; `logits()` are those predicting each row's next token.
pub struct TextDecoder<'m> {
    model: &'m Janus,
    rows: Rows,
    logits: Tensor,
}

impl<'m> TextDecoder<'m> {
    pub fn new(model: &'m Janus, prompts: &[TextPrompt], pad_id: u32) -> Result<Self> {
        let device = model.device();
        let id_rows: Vec<&[u32]> = prompts.iter().map(|p| p.prompt.ids.as_slice()).collect();
        let (ids, t, pads) = left_pad(&id_rows, pad_id);
        let masks: Vec<Vec<bool>> = prompts
            .iter()
            .zip(&pads)
            .map(|(p, &pad)| {
                let mut m = vec![false; pad];
                m.extend_from_slice(&p.prompt.images_seq_mask);
                m
            })
            .collect();
        let pixels: Vec<&Tensor> = prompts.iter().filter_map(|p| p.pixels.as_ref()).collect();
        let image_embeds = if pixels.is_empty() {
            None
        } else {
            Some(model.image_embeds(&Tensor::cat(&pixels, 0)?, Pass::Inference)?)
        };
        let ids = Tensor::from_vec(ids, (prompts.len(), t), device)?;
        let embeds = model.merge_image_embeds(&ids, &masks, image_embeds.as_ref())?;
        let lm = &model.language_model;
        let (mut rows, last) = Rows::prefill(lm, &embeds, pads)?;
        let expand: Vec<u32> = prompts
            .iter()
            .enumerate()
            .flat_map(|(i, p)| std::iter::repeat_n(i as u32, p.samples))
            .collect();
        rows.select(&expand)?;
        let logits = select_tensor_rows(&lm.logits(&last)?.to_dtype(DType::F32)?, &expand)?;
        Ok(Self {
            model,
            rows,
            logits,
        })
    }

    /// `[R, V]` f32.
    pub fn logits(&self) -> &Tensor {
        &self.logits
    }

    /// Feeds one token per row.
    pub fn advance(&mut self, tokens: &[u32]) -> Result<()> {
        let lm = &self.model.language_model;
        let ids = Tensor::from_vec(tokens.to_vec(), (tokens.len(), 1), self.model.device())?;
        let hidden = self.rows.step(lm, &lm.embed(&ids)?)?;
        self.logits = lm.logits(&hidden)?.to_dtype(DType::F32)?;
        Ok(())
    }

    /// Keeps only the given rows, in that order.
    pub fn retain(&mut self, rows: &[u32]) -> Result<()> {
        self.rows.select(rows)?;
        self.logits = select_tensor_rows(&self.logits, rows)?;
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
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
    pub finish_reason: FinishReason,
}

/// A token as it is produced, for streaming. Returning `false` from the
/// observer cancels every sample of that item.
#[derive(Debug, Clone, Copy)]
pub struct TokenEvent {
    pub item: usize,
    pub sample: usize,
    pub token: u32,
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
                    finish_reason: FinishReason::Length,
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
            out.token_ids.push(token);
            out.logprobs.push(token_logprob(
                &logits[row],
                token,
                items[*i].sampling.logprob_temperature(),
            ));
            if !cancelled_items[*i]
                && !observer(TokenEvent {
                    item: *i,
                    sample: *s,
                    token,
                })
            {
                cancelled_items[*i] = true;
            }
            if token == eos {
                out.finish_reason = FinishReason::Stop;
            } else if out.token_ids.len() < items[*i].max_new_tokens {
                keep.push(row);
            }
            tokens.push(token);
        }
        for (i, cancelled) in cancelled_items.iter().enumerate() {
            if *cancelled {
                for out in &mut results[i] {
                    if out.finish_reason == FinishReason::Length
                        && out.token_ids.len() < items[i].max_new_tokens
                    {
                        out.finish_reason = FinishReason::Cancelled;
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
            tokens = keep.iter().map(|&r| tokens[r]).collect();
            let mut old: Vec<Option<(usize, usize, Sampler)>> =
                active.into_iter().map(Some).collect();
            active = keep
                .iter()
                .map(|&r| old[r].take().expect("row kept once"))
                .collect();
        }
        decoder.advance(&tokens)?;
    }
}

/// Image rows mid-decode with classifier-free guidance: for every image one
/// conditional and one unconditional row.
pub struct CfgDecoder<'m> {
    model: &'m Janus,
    rows: Rows,
    images: usize,
    /// `[2n, K]` f32: conditional rows first, then unconditional.
    logits: Tensor,
}

impl<'m> CfgDecoder<'m> {
    /// `prompts[p]` with `counts[p]` images each.
    pub fn new(
        model: &'m Janus,
        prompts: &[&GenerationPrompt],
        counts: &[usize],
        pad_id: u32,
    ) -> Result<Self> {
        let p = prompts.len();
        let id_rows: Vec<&[u32]> = prompts
            .iter()
            .map(|g| g.cond_ids.as_slice())
            .chain(prompts.iter().map(|g| g.uncond_ids.as_slice()))
            .collect();
        let (ids, t, pads) = left_pad(&id_rows, pad_id);
        let ids = Tensor::from_vec(ids, (2 * p, t), model.device())?;
        let lm = &model.language_model;
        let (mut rows, last) = Rows::prefill(lm, &lm.embed(&ids)?, pads)?;
        let owner: Vec<u32> = counts
            .iter()
            .enumerate()
            .flat_map(|(i, &c)| std::iter::repeat_n(i as u32, c))
            .collect();
        let expand: Vec<u32> = owner
            .iter()
            .copied()
            .chain(owner.iter().map(|&i| i + p as u32))
            .collect();
        rows.select(&expand)?;
        let logits = select_tensor_rows(
            &model.gen_head.forward(&last)?.to_dtype(DType::F32)?,
            &expand,
        )?;
        Ok(Self {
            model,
            rows,
            images: owner.len(),
            logits,
        })
    }

    /// `[n, K]` conditional logits.
    pub fn cond_logits(&self) -> Result<Tensor> {
        Ok(self.logits.narrow(0, 0, self.images)?)
    }

    /// `[n, K]` unconditional logits.
    pub fn uncond_logits(&self) -> Result<Tensor> {
        Ok(self.logits.narrow(0, self.images, self.images)?)
    }

    /// `uncond + w * (cond - uncond)` with one weight per image.
    pub fn cfg_logits(&self, weights: &[f32]) -> Result<Tensor> {
        let cond = self.cond_logits()?;
        let uncond = self.uncond_logits()?;
        let w = Tensor::new(weights, cond.device())?.unsqueeze(1)?;
        Ok((&uncond + (cond - &uncond)?.broadcast_mul(&w)?)?)
    }

    /// Feeds the chosen token of every image to both of its rows.
    pub fn advance(&mut self, tokens: &[u32]) -> Result<()> {
        let both: Vec<u32> = tokens.iter().chain(tokens).copied().collect();
        let ids = Tensor::from_vec(both, (2 * tokens.len(), 1), self.model.device())?;
        let embeds = self.model.gen_token_embeds(&ids)?;
        let hidden = self.rows.step(&self.model.language_model, &embeds)?;
        self.logits = self.model.gen_head.forward(&hidden)?.to_dtype(DType::F32)?;
        Ok(())
    }

    /// Keeps only the given images, in that order.
    pub fn retain(&mut self, images: &[u32]) -> Result<()> {
        let n = self.images as u32;
        let rows: Vec<u32> = images
            .iter()
            .copied()
            .chain(images.iter().map(|&i| i + n))
            .collect();
        self.rows.select(&rows)?;
        self.logits = select_tensor_rows(&self.logits, &rows)?;
        self.images = images.len();
        Ok(())
    }
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
            tokens = keep.iter().map(|&r| tokens[r]).collect();
            let mut old: Vec<Option<_>> = active.into_iter().map(Some).collect();
            active = keep
                .iter()
                .map(|&r| old[r].take().expect("row kept once"))
                .collect();
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
