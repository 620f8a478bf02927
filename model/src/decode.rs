//! Batched decoding state with a KV cache. [`TextDecoder`] and
//! [`CfgDecoder`] hold a batch of rows mid-decode: they prefill the prompts
//! once (left-padded to a common length), copy cache rows for every sample
//! of a prompt, and drop rows that finished. The sampling loops of
//! `generate` drive them; the parity tests drive them with forced tokens.

use candle_core::{DType, Tensor};
use image::RgbImage;

use crate::image_processor::ImageProcessorConfig;
use crate::janus::Janus;
use crate::llama::{KvCache, Llama};
use crate::ops::Pass;
use crate::processor::{GenerationPrompt, Processor, UnderstandingPrompt};
use crate::ModelError;

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

    /// Keeps `rows`, in that order, and drops the leading positions that
    /// are padding in every one of them (so a batch that rows join and leave
    /// does not grow without bound).
    fn select(&mut self, rows: &[u32]) -> Result<()> {
        let drop = rows
            .iter()
            .map(|&r| self.pads[r as usize])
            .min()
            .unwrap_or(0);
        self.cache = self.cache.select_rows(rows, drop)?;
        self.key_valid = rows
            .iter()
            .map(|&r| self.key_valid[r as usize][drop..].to_vec())
            .collect();
        self.pads = rows.iter().map(|&r| self.pads[r as usize] - drop).collect();
        Ok(())
    }

    /// The rows of `self` then those of `other`; the shorter side is
    /// left-padded to the longer, so every row keeps its positions.
    fn join(&self, other: &Rows) -> Result<Rows> {
        let len = self.cache.len().max(other.cache.len());
        let mut key_valid = Vec::with_capacity(self.key_valid.len() + other.key_valid.len());
        let mut pads = Vec::with_capacity(key_valid.capacity());
        for side in [self, other] {
            let extra = len - side.cache.len();
            for (valid, &pad) in side.key_valid.iter().zip(&side.pads) {
                let mut row = vec![false; extra];
                row.extend_from_slice(valid);
                key_valid.push(row);
                pads.push(pad + extra);
            }
        }
        Ok(Rows {
            cache: KvCache::concat(&[&self.cache, &other.cache])?,
            key_valid,
            pads,
        })
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

impl TextPrompt {
    /// A question about one image, to decode `samples` times: the chat
    /// prompt with its image span, and the image preprocessed for the
    /// vision tower on the model's device. The one place an understanding
    /// prompt is assembled.
    pub fn question(
        model: &Janus,
        processor: &Processor,
        image_processor: &ImageProcessorConfig,
        image: &RgbImage,
        question: &str,
        samples: usize,
    ) -> Result<Self> {
        let pixels = image_processor.preprocess(image, model.device())?;
        Ok(Self {
            prompt: processor.understanding_prompt(question)?,
            pixels: Some(pixels.unsqueeze(0)?),
            samples,
        })
    }
}

/// Text rows mid-decode; `logits()` are those predicting each row's next
/// token. It holds no model: every call that runs one takes it, so a batch
/// can outlive the borrow it started with (the engine keeps it across
/// requests).
pub struct TextDecoder {
    rows: Rows,
    logits: Tensor,
}

impl TextDecoder {
    pub fn new(model: &Janus, prompts: &[TextPrompt], pad_id: u32) -> Result<Self> {
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
        Ok(Self { rows, logits })
    }

    /// Rows decoding.
    pub fn len(&self) -> usize {
        self.rows.pads.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `[R, V]` f32.
    pub fn logits(&self) -> &Tensor {
        &self.logits
    }

    /// Feeds one token per row.
    pub fn advance(&mut self, model: &Janus, tokens: &[u32]) -> Result<()> {
        let lm = &model.language_model;
        let ids = Tensor::from_vec(tokens.to_vec(), (tokens.len(), 1), model.device())?;
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

    /// This batch's rows followed by `other`'s (prefilled separately, on the
    /// same model), at whatever step each one is.
    pub fn join(&self, other: &TextDecoder) -> Result<TextDecoder> {
        Ok(TextDecoder {
            rows: self.rows.join(&other.rows)?,
            logits: Tensor::cat(&[&self.logits, &other.logits], 0)?,
        })
    }
}

/// Image rows mid-decode with classifier-free guidance: for every image one
/// conditional and one unconditional row.
pub struct CfgDecoder {
    rows: Rows,
    images: usize,
    /// `[2n, K]` f32: conditional rows first, then unconditional.
    logits: Tensor,
}

impl CfgDecoder {
    /// `prompts[p]` with `counts[p]` images each.
    pub fn new(
        model: &Janus,
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
            rows,
            images: owner.len(),
            logits,
        })
    }

    /// Images decoding.
    pub fn images(&self) -> usize {
        self.images
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
    pub fn advance(&mut self, model: &Janus, tokens: &[u32]) -> Result<()> {
        let both: Vec<u32> = tokens.iter().chain(tokens).copied().collect();
        let ids = Tensor::from_vec(both, (2 * tokens.len(), 1), model.device())?;
        let embeds = model.gen_token_embeds(&ids)?;
        let hidden = self.rows.step(&model.language_model, &embeds)?;
        self.logits = model.gen_head.forward(&hidden)?.to_dtype(DType::F32)?;
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

    /// This batch's images followed by `other`'s (prefilled separately, on
    /// the same model), each image's two rows kept in their halves.
    pub fn join(&self, other: &CfgDecoder) -> Result<CfgDecoder> {
        let (a, b) = (self.images as u32, other.images as u32);
        // Joined rows are [a cond, a uncond, b cond, b uncond].
        let order: Vec<u32> = (0..a)
            .chain(2 * a..2 * a + b)
            .chain(a..2 * a)
            .chain(2 * a + b..2 * (a + b))
            .collect();
        let mut rows = self.rows.join(&other.rows)?;
        rows.select(&order)?;
        let logits = Tensor::cat(&[&self.logits, &other.logits], 0)?;
        Ok(CfgDecoder {
            rows,
            images: (a + b) as usize,
            logits: select_tensor_rows(&logits, &order)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};

    use super::*;
    use crate::bundle::ModelBundle;
    use crate::demo::DEFAULT_SEED;

    fn prompt(bundle: &ModelBundle, question: &str) -> TextPrompt {
        let image = RgbImage::from_pixel(20, 20, image::Rgb([200, 10, 10]));
        TextPrompt::question(
            &bundle.model,
            &bundle.processor,
            &bundle.image_processor,
            &image,
            question,
            1,
        )
        .unwrap()
    }

    #[test]
    fn joined_rows_are_left_padded_and_the_padding_goes_with_the_rows_that_needed_it() {
        let bundle = ModelBundle::demo(DEFAULT_SEED, DType::F32, &Device::Cpu).unwrap();
        let (model, pad) = (&bundle.model, bundle.processor.special.pad);
        let mut old = TextDecoder::new(model, &[prompt(&bundle, "What is this?")], pad).unwrap();
        for _ in 0..5 {
            old.advance(model, &[40]).unwrap();
        }
        let new = TextDecoder::new(model, &[prompt(&bundle, "Why?")], pad).unwrap();
        let (old_len, new_len) = (old.rows.cache.len(), new.rows.cache.len());
        assert!(old_len > new_len);
        let mut joined = old.join(&new).unwrap();
        assert_eq!(joined.rows.cache.len(), old_len);
        assert_eq!(joined.rows.pads, vec![0, old_len - new_len]);
        assert_eq!(joined.len(), 2);
        // Once the old row leaves, the cache is the new row's length again.
        joined.retain(&[1]).unwrap();
        assert_eq!(joined.rows.cache.len(), new_len);
        assert_eq!(joined.rows.pads, vec![0]);
        assert_eq!(joined.rows.key_valid[0].len(), new_len);
    }
}
