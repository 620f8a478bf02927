//! The model's own reading: how likely it finds an answer to a question
//! about an image (or to a text-only turn), teacher-forced. Pretraining's
//! answer loss is the mean of these log-probs; drawing picks, among
//! candidates drawn from one plan, the image whose description the model
//! finds the plan likeliest as.

use candle_core::{DType, Result, Tensor};
use image::RgbImage;
use ulm_model::image_processor::ImageProcessorConfig;
use ulm_model::ops::Pass;
use ulm_model::processor::Processor;
use ulm_model::Janus;

use crate::grpo::{understanding_states, UnderstandingBatch};

/// Per-token log-probs of answers, teacher-forced: `logps[r, j]` of the
/// `j`-th token of row `r`'s answer (its end-of-sentence token last),
/// where `mask[r, j]` is 1.
pub struct AnswerLogps {
    pub logps: Tensor,
    pub mask: Tensor,
}

impl AnswerLogps {
    /// Each row's answer log-likelihood.
    pub fn totals(&self) -> Result<Vec<f32>> {
        (&self.logps * &self.mask)?.sum(1)?.to_vec1()
    }
}

/// The log-probs of `turns[i]` (question, answer), each its own row, about
/// `images[i]` (the rows of an image share one pass of the vision tower),
/// or as text-only turns when `images` is `None`.
pub fn answer_logps(
    model: &Janus,
    processor: &Processor,
    image_processor: &ImageProcessorConfig,
    images: Option<&[RgbImage]>,
    turns: &[Vec<(String, String)>],
    pass: Pass,
) -> Result<AnswerLogps> {
    let device = model.device();
    let special = processor.special;
    let mut prompts = Vec::new();
    let mut answers = Vec::new();
    let mut row_image = Vec::new();
    for (i, turns) in turns.iter().enumerate() {
        for (question, answer) in turns {
            let prompt = match images {
                Some(_) => processor.understanding_prompt(question),
                None => processor.text_prompt(question),
            };
            prompts.push(prompt.map_err(model_error)?);
            let mut answer = processor.encode_plain(answer).map_err(model_error)?;
            answer.push(special.eos);
            answers.push(answer);
            row_image.push(i as u32);
        }
    }
    let t = prompts.iter().map(|p| p.ids.len()).max().unwrap_or(0);
    let l = answers.iter().map(Vec::len).max().unwrap_or(1);
    let (mut ids, mut attention, mut image_mask, mut loss_mask) = (vec![], vec![], vec![], vec![]);
    for (prompt, answer) in prompts.iter().zip(&answers) {
        let pad = t - prompt.ids.len();
        let tail = l - answer.len();
        let mut row = vec![special.pad; pad];
        row.extend(&prompt.ids);
        row.extend(answer);
        row.extend(std::iter::repeat_n(special.pad, tail));
        ids.push(row);
        let mut seen = vec![false; pad];
        seen.extend(std::iter::repeat_n(true, prompt.ids.len() + answer.len()));
        seen.extend(std::iter::repeat_n(false, tail));
        attention.push(seen);
        let mut image = vec![false; pad];
        image.extend(&prompt.images_seq_mask);
        image.extend(std::iter::repeat_n(false, l));
        image_mask.push(image);
        loss_mask.extend(std::iter::repeat_n(1f32, answer.len()));
        loss_mask.extend(std::iter::repeat_n(0f32, tail));
    }
    let ids = Tensor::new(ids, device)?;
    let embeds = match images {
        Some(images) => {
            let pixels = images
                .iter()
                .map(|image| image_processor.preprocess(image, device))
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(model_error)?;
            Some(
                model
                    .image_embeds(&Tensor::stack(&pixels, 0)?, pass)?
                    .index_select(&Tensor::new(row_image.as_slice(), device)?, 0)?,
            )
        }
        None => None,
    };
    let batch = UnderstandingBatch {
        ids: &ids,
        attention_mask: &attention,
        images_seq_mask: &image_mask,
        image_embeds: embeds.as_ref(),
        completion_len: l,
    };
    let logps = understanding_states(model, &batch, 1.0, pass)?.logps(model)?;
    Ok(AnswerLogps {
        logps: logps.to_dtype(DType::F32)?,
        mask: Tensor::from_vec(loss_mask, (answers.len(), l), device)?,
    })
}

fn model_error(e: ulm_model::ModelError) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}
