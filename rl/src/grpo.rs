//! GRPO for CoRL: per-token log-probs of both tasks with the differentiable
//! forward, group-relative advantages, the clipped objective with the k3 KL
//! estimator, and AdamW.

use candle_core::{DType, Result, Tensor, Var, D};

use ulm_model::ops::{compute_dtype, Pass};
use ulm_model::Janus;

/// Prompt + completion rows of the understanding task.
pub struct UnderstandingBatch<'a> {
    /// `[G, T + L]` ids, prompts left-padded to T.
    pub ids: &'a Tensor,
    /// Per row: which positions are real (left padding and post-EOS are not).
    pub attention_mask: &'a [Vec<bool>],
    /// Per row: which positions take image features.
    pub images_seq_mask: &'a [Vec<bool>],
    /// `[n_images, N, H]` aligned image features (the vision side is frozen).
    pub image_embeds: Option<&'a Tensor>,
    /// L.
    pub completion_len: usize,
}

/// Prompt + image-token rows of the generation task (conditional only, no CFG).
pub struct GenerationBatch<'a> {
    /// `[G, P]` prompt ids, left-padded.
    pub prompt_ids: &'a Tensor,
    /// Per row: which prompt positions are real.
    pub prompt_mask: &'a [Vec<bool>],
    /// `[G, M]` image tokens.
    pub completion: &'a Tensor,
}

/// Which hidden state scores image token k.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum T2iAlignment {
    /// The state that predicted the token, as sampling does (default).
    Predicting,
    /// The token's own position, as the ULM-R1 reference trainer does.
    OwnPosition,
}

/// Positions that skip left padding: real tokens count from 0 in every row.
fn positions(mask: &[Vec<bool>]) -> Vec<Vec<u32>> {
    mask.iter()
        .map(|row| {
            let pad = row.iter().take_while(|&&m| !m).count();
            (0..row.len())
                .map(|i| i.saturating_sub(pad) as u32)
                .collect()
        })
        .collect()
}

/// `log softmax(logits / temperature)` at `ids`: `[G, L, V]`, `[G, L]` -> `[G, L]`.
fn token_logps(logits: &Tensor, ids: &Tensor, temperature: f64) -> Result<Tensor> {
    let logits = (logits.to_dtype(compute_dtype(logits.dtype()))? / temperature)?;
    let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    logp.gather(
        &ids.to_dtype(DType::U32)?
            .contiguous()?
            .unsqueeze(D::Minus1)?,
        D::Minus1,
    )?
    .squeeze(D::Minus1)
}

/// Per-token log-probs `[G, L]` of the completions of understanding rows.
pub fn understanding_logps(
    model: &Janus,
    batch: &UnderstandingBatch,
    temperature: f64,
    pass: Pass,
) -> Result<Tensor> {
    let lm = &model.language_model;
    let (_, total) = batch.ids.dims2()?;
    let embeds = model.merge_image_embeds(batch.ids, batch.images_seq_mask, batch.image_embeds)?;
    let ctx = lm.context(&positions(batch.attention_mask), batch.attention_mask)?;
    let hidden = lm.forward_hidden(&embeds, &ctx, None, pass)?;
    let l = batch.completion_len;
    // The states at T-1 .. T+L-2 predict the completion tokens T .. T+L-1.
    let predicting = hidden.narrow(1, total - l - 1, l)?;
    let completion = batch.ids.narrow(1, total - l, l)?;
    token_logps(&lm.logits(&predicting)?, &completion, temperature)
}

/// Per-token log-probs `[G, M]` of image tokens, conditional rows without CFG.
pub fn generation_logps(
    model: &Janus,
    batch: &GenerationBatch,
    temperature: f64,
    alignment: T2iAlignment,
    pass: Pass,
) -> Result<Tensor> {
    let lm = &model.language_model;
    let (_, p) = batch.prompt_ids.dims2()?;
    let (_, m) = batch.completion.dims2()?;
    let embeds = Tensor::cat(
        &[
            &lm.embed(batch.prompt_ids)?,
            &model.gen_token_embeds(batch.completion)?,
        ],
        1,
    )?;
    let mask: Vec<Vec<bool>> = batch
        .prompt_mask
        .iter()
        .map(|row| {
            row.iter()
                .copied()
                .chain(std::iter::repeat_n(true, m))
                .collect()
        })
        .collect();
    let ctx = lm.context(&positions(&mask), &mask)?;
    let hidden = lm.forward_hidden(&embeds, &ctx, None, pass)?;
    let start = match alignment {
        T2iAlignment::Predicting => p - 1,
        T2iAlignment::OwnPosition => p,
    };
    let scoring = hidden.narrow(1, start, m)?;
    token_logps(
        &model.gen_head.forward(&scoring)?,
        batch.completion,
        temperature,
    )
}

/// Group-relative advantages: `(r - mean) / (std + 1e-4)` per consecutive
/// group of `group_size` rewards, with the unbiased standard deviation.
pub fn group_advantages(rewards: &[f32], group_size: usize) -> Vec<f32> {
    rewards
        .chunks(group_size.max(1))
        .flat_map(|group| {
            let n = group.len() as f64;
            let mean = group.iter().map(|&r| r as f64).sum::<f64>() / n;
            let var = if group.len() > 1 {
                group
                    .iter()
                    .map(|&r| (r as f64 - mean).powi(2))
                    .sum::<f64>()
                    / (n - 1.0)
            } else {
                0.0
            };
            let std = var.sqrt();
            group
                .iter()
                .map(move |&r| ((r as f64 - mean) / (std + 1e-4)) as f32)
        })
        .collect()
}

/// Settings of the per-token objective.
#[derive(Debug, Clone, Copy)]
pub struct ObjectiveConfig {
    /// KL weight.
    pub beta: f64,
    /// PPO clipping: the ratio is clipped to [1 - epsilon_low, 1 + epsilon_high].
    pub epsilon_low: f64,
    pub epsilon_high: f64,
}

/// One task's loss and its diagnostics.
pub struct Objective {
    /// Scalar loss (differentiable).
    pub loss: Tensor,
    /// Masked mean KL per sequence, averaged (0 without a reference).
    pub kl: f64,
    /// Share of completion tokens whose ratio was clipped.
    pub clip_fraction: f64,
}

/// The GRPO objective of one task: per token
/// `-(min(r A, clip(r) A) - beta * kl)`, `r = exp(logp - old_logp)`,
/// `kl = exp(ref - logp) - (ref - logp) - 1`; mean over each sequence's
/// completion tokens, then over sequences.
pub fn objective(
    logps: &Tensor,
    old_logps: &Tensor,
    ref_logps: Option<&Tensor>,
    advantages: &Tensor,
    mask: &Tensor,
    cfg: ObjectiveConfig,
) -> Result<Objective> {
    let dtype = logps.dtype();
    let mask = mask.to_dtype(dtype)?;
    // Masked positions (padding) take 0 in every input, selected rather
    // than multiplied: an infinite log-prob there would otherwise turn the
    // loss or its gradient into NaN through `inf * 0`.
    let keep = mask.gt(0.0)?;
    let masked = |t: &Tensor| -> Result<Tensor> { keep.where_cond(t, &t.zeros_like()?) };
    let logps = &masked(logps)?;
    let ratio = (logps - masked(&old_logps.detach())?)?.exp()?;
    let adv = advantages.to_dtype(dtype)?.unsqueeze(1)?;
    // Where the clipped term is the minimum it is a constant: the ratio gets
    // no gradient there. Expressed with a detached mask, the objective equals
    // PPO's min(r A, clip(r) A) and its gradient.
    let r = ratio.detach();
    let above = r.gt(1.0 + cfg.epsilon_high)?.to_dtype(dtype)?;
    let below = r.lt(1.0 - cfg.epsilon_low)?.to_dtype(dtype)?;
    let positive = adv.gt(0.0)?.to_dtype(dtype)?.broadcast_as(r.shape())?;
    let negative = adv.lt(0.0)?.to_dtype(dtype)?.broadcast_as(r.shape())?;
    let clipped = ((above * &positive)? + (below * &negative)?)?;
    let clipped_ratio = r.clamp(1.0 - cfg.epsilon_low, 1.0 + cfg.epsilon_high)?;
    let free = (1.0 - &clipped)?;
    let surrogate = ((ratio * &free)? + (clipped_ratio * &clipped)?)?.broadcast_mul(&adv)?;
    let (per_token, kl_value) = match ref_logps {
        Some(reference) if cfg.beta != 0.0 => {
            let delta = (masked(&reference.detach())? - logps)?;
            let kl = ((delta.exp()? - &delta)? - 1.0)?;
            let kl_value = masked_sequence_mean(&kl.detach(), &mask)?
                .mean_all()?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?;
            ((surrogate - (kl * cfg.beta)?)?.neg()?, kl_value)
        }
        _ => (surrogate.neg()?, 0.0),
    };
    let loss = masked_sequence_mean(&per_token, &mask)?.mean_all()?;
    let scalar = |t: Tensor| -> Result<f64> { t.to_dtype(DType::F64)?.to_scalar::<f64>() };
    let tokens = scalar(mask.sum_all()?)?.max(1.0);
    let clip_fraction = scalar((clipped * &mask)?.sum_all()?)? / tokens;
    Ok(Objective {
        loss,
        kl: kl_value,
        clip_fraction,
    })
}

/// `sum_t(x * mask) / sum_t(mask)` per row, `[G]`.
fn masked_sequence_mean(x: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let counts = mask.sum(1)?.clamp(1.0, f64::MAX)?;
    (x * mask)?.sum(1)?.div(&counts)
}

/// AdamW as `torch.optim.AdamW`, with its state exposed for checkpoints.
pub struct AdamW {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub step: u64,
    /// First and second moments, one pair per parameter.
    pub moments: Vec<(Tensor, Tensor)>,
}

impl AdamW {
    pub fn new(params: &[(String, Var)], lr: f64, weight_decay: f64) -> Result<Self> {
        let moments = params
            .iter()
            .map(|(_, v)| Ok((v.zeros_like()?, v.zeros_like()?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
            step: 0,
            moments,
        })
    }

    /// One update from `grads` (one per parameter, `None` for no gradient).
    pub fn apply(&mut self, params: &[(String, Var)], grads: &[Option<Tensor>]) -> Result<()> {
        self.step += 1;
        let t = self.step as i32;
        let (b1, b2) = (self.beta1, self.beta2);
        let bias1 = 1.0 - b1.powi(t);
        let bias2 = 1.0 - b2.powi(t);
        for (((_, var), grad), (m, v)) in params.iter().zip(grads).zip(self.moments.iter_mut()) {
            let Some(g) = grad else { continue };
            let g = g.to_dtype(m.dtype())?;
            *m = ((&*m * b1)? + (&g * (1.0 - b1))?)?;
            *v = ((&*v * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let m_hat = (&*m / bias1)?;
            let v_hat = (&*v / bias2)?;
            let decayed = (var.as_tensor() * (1.0 - self.lr * self.weight_decay))?;
            let update = (m_hat / (v_hat.sqrt()? + self.eps)?)?;
            var.set(&(decayed - (update * self.lr)?)?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    #[test]
    fn infinite_log_probs_at_masked_positions_change_nothing() {
        let dev = &Device::Cpu;
        let cfg = ObjectiveConfig {
            beta: 0.04,
            epsilon_low: 0.2,
            epsilon_high: 0.2,
        };
        let mask = Tensor::new(&[[1f32, 1., 0.], [1., 0., 0.]], dev).unwrap();
        let advantages = Tensor::new(&[1f32, -1.], dev).unwrap();
        let run = |pad: f32, old_pad: f32| {
            let logps = Var::new(&[[-1f32, -2., pad], [-0.5, pad, pad]], dev).unwrap();
            let old = Tensor::new(&[[-1.1f32, -1.9, old_pad], [-0.4, old_pad, 0.]], dev).unwrap();
            let reference = Tensor::new(&[[-1f32, -2.1, pad], [-0.6, pad, -0.0]], dev).unwrap();
            let o = objective(
                logps.as_tensor(),
                &old,
                Some(&reference),
                &advantages,
                &mask,
                cfg,
            )
            .unwrap();
            let grad = o.loss.backward().unwrap().get(&logps).unwrap().clone();
            let loss = o.loss.to_scalar::<f32>().unwrap();
            (
                loss,
                grad.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                o.kl,
            )
        };
        let (loss, grad, kl) = run(-3.0, -3.0);
        for (pad, old_pad) in [
            (f32::NEG_INFINITY, -3.0),
            (-3.0, f32::NEG_INFINITY),
            (f32::INFINITY, f32::NAN),
        ] {
            let (l, g, k) = run(pad, old_pad);
            assert_eq!(l, loss, "pad {pad}, old {old_pad}");
            assert_eq!(g, grad, "pad {pad}, old {old_pad}");
            assert_eq!(k, kl);
        }
        assert!(loss.is_finite() && grad.iter().all(|g| g.is_finite()));
        // Masked positions get no gradient.
        assert_eq!((grad[2], grad[4], grad[5]), (0.0, 0.0, 0.0));
    }
}
