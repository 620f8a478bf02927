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

/// The head that turns scoring states into logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Head {
    /// The language model's head over the text vocabulary.
    Text,
    /// The generation head over the image codebook.
    Image,
}

impl Head {
    fn logits(self, model: &Janus, hidden: &Tensor) -> Result<Tensor> {
        match self {
            Head::Text => model.language_model.logits(hidden),
            Head::Image => model.gen_head.forward(hidden),
        }
    }
}

/// Logit values one chunk of positions may hold: about 16M (64 MB in f32)
/// whatever the vocabulary, so that `[rows, length, vocab]` is never
/// materialised (1.7 GB per tensor at 16 x 256 x 102k).
const CHUNK_LOGITS: usize = 1 << 24;

/// The hidden states that score completion tokens, before the head: what
/// the log-probs and their gradient are computed from, chunk by chunk.
pub struct ScoringStates {
    /// `[G, L, H]`.
    pub hidden: Tensor,
    /// `[G, L]` token ids.
    pub targets: Tensor,
    pub head: Head,
    /// Divides the logits (the sampling temperature).
    pub temperature: f64,
    /// Logit values per chunk ([`CHUNK_LOGITS`] unless set).
    pub chunk_logits: usize,
}

/// Gradients of one backward pass through [`ScoringStates::backward`]:
/// the stores of every chunk and of the network below the states.
pub type GradStores = Vec<candle_core::backprop::GradStore>;

impl ScoringStates {
    fn rows(&self) -> Result<(usize, usize, usize)> {
        self.hidden.dims3()
    }

    /// Positions per chunk.
    fn chunk(&self, model: &Janus) -> usize {
        let vocab = match self.head {
            Head::Text => model.cfg.language.vocab_size,
            Head::Image => model.cfg.gen_vision.codebook_size,
        };
        (self.chunk_logits / vocab.max(1)).max(1)
    }

    /// `log softmax(head(h) / T)` at the targets of positions `h` (`[n, H]`,
    /// `targets` `[n]`): the target logit minus a log-sum-exp, in f32.
    fn chunk_logps(&self, model: &Janus, h: &Tensor, targets: &Tensor) -> Result<Tensor> {
        target_logps(&self.chunk_logits(model, h)?, targets, self.temperature)
    }

    /// The head's logits of positions `h`, in the compute dtype.
    fn chunk_logits(&self, model: &Janus, h: &Tensor) -> Result<Tensor> {
        let logits = self.head.logits(model, h)?;
        logits.to_dtype(compute_dtype(logits.dtype()))
    }

    fn flat(&self) -> Result<(Tensor, Tensor)> {
        let (g, l, h) = self.rows()?;
        Ok((
            self.hidden.reshape((g * l, h))?,
            self.targets
                .to_dtype(DType::U32)?
                .contiguous()?
                .reshape(g * l)?,
        ))
    }

    /// Per-token log-probs `[G, L]`, differentiable through the head and
    /// the states (every chunk's logits stay alive for the backward pass:
    /// for tests and small models; the trainer uses [`Self::backward`]).
    pub fn logps(&self, model: &Janus) -> Result<Tensor> {
        self.chunked_logps(model, false)
    }

    /// The log-probs' values `[G, L]`, no gradient: each chunk's logits
    /// are freed before the next chunk's are computed.
    pub fn logp_values(&self, model: &Janus) -> Result<Tensor> {
        self.chunked_logps(model, true)
    }

    /// The log-probs' values `[G, L]` under classifier-free guidance, as
    /// images are drawn: `log softmax((u + w (c - u)) / T)` at the targets,
    /// `c` the logits of these (conditional) states, `u` those of
    /// `uncond` (the same targets after the unconditional prompts), one
    /// weight `w` per row. No gradient.
    pub fn guided_logp_values(
        &self,
        model: &Janus,
        uncond: &ScoringStates,
        weights: &[f32],
    ) -> Result<Tensor> {
        let (g, l, _) = self.rows()?;
        if uncond.rows()? != self.rows()? || weights.len() != g {
            candle_core::bail!("guided scoring needs one unconditional row and weight per row");
        }
        let (cond, targets) = self.flat()?;
        let (uncond_hidden, _) = uncond.flat()?;
        let per_position: Vec<f32> = weights
            .iter()
            .flat_map(|&w| std::iter::repeat_n(w, l))
            .collect();
        let per_position = Tensor::from_vec(per_position, (g * l, 1), cond.device())?;
        let chunk = self.chunk(model);
        let parts = (0..g * l)
            .step_by(chunk)
            .map(|r| {
                let n = chunk.min(g * l - r);
                let c = self.chunk_logits(model, &cond.narrow(0, r, n)?.detach())?;
                let u = uncond.chunk_logits(model, &uncond_hidden.narrow(0, r, n)?.detach())?;
                let w = per_position.narrow(0, r, n)?.to_dtype(c.dtype())?;
                let guided = (&u + (c - &u)?.broadcast_mul(&w)?)?;
                Ok(target_logps(&guided, &targets.narrow(0, r, n)?, self.temperature)?.detach())
            })
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&parts, 0)?.reshape((g, l))
    }

    fn chunked_logps(&self, model: &Janus, detached: bool) -> Result<Tensor> {
        let (g, l, _) = self.rows()?;
        let (hidden, targets) = self.flat()?;
        let hidden = if detached { hidden.detach() } else { hidden };
        let chunk = self.chunk(model);
        let parts = (0..g * l)
            .step_by(chunk)
            .map(|r| {
                let n = chunk.min(g * l - r);
                let logps =
                    self.chunk_logps(model, &hidden.narrow(0, r, n)?, &targets.narrow(0, r, n)?)?;
                Ok(if detached { logps.detach() } else { logps })
            })
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&parts, 0)?.reshape((g, l))
    }

    /// Backpropagates `scale * sum(upstream * logps)` (`upstream` `[G, L]`:
    /// the loss's gradient with respect to the log-probs) through the head
    /// chunk by chunk, then through the network below the states once.
    /// Peak memory holds one chunk's logits, not `[G, L, vocab]`.
    pub fn backward(&self, model: &Janus, upstream: &Tensor, scale: f64) -> Result<GradStores> {
        let (g, l, _) = self.rows()?;
        let (hidden, targets) = self.flat()?;
        let wide = compute_dtype(hidden.dtype());
        let upstream = upstream.to_dtype(wide)?.reshape(g * l)?.detach();
        let detached = hidden.detach();
        let chunk = self.chunk(model);
        let mut stores = Vec::new();
        let mut state_grads = Vec::new();
        for r in (0..g * l).step_by(chunk) {
            let n = chunk.min(g * l - r);
            let h = Var::from_tensor(&detached.narrow(0, r, n)?)?;
            let logps = self.chunk_logps(model, h.as_tensor(), &targets.narrow(0, r, n)?)?;
            let surrogate = ((logps * upstream.narrow(0, r, n)?)?.sum_all()? * scale)?;
            let mut store = surrogate.backward()?;
            let grad = match store.remove(h.as_tensor()) {
                Some(grad) => grad,
                None => h.zeros_like()?,
            };
            state_grads.push(grad);
            stores.push(store);
        }
        // Detached: a gradient computed from tracked tensors records ops,
        // and through them this product would reach the head a second time.
        let state_grads = Tensor::cat(&state_grads, 0)?.to_dtype(wide)?.detach();
        // d/dθ sum(hidden * dL/dhidden) is the loss's gradient below the states.
        let below = (hidden.to_dtype(wide)? * state_grads)?.sum_all()?;
        stores.push(below.backward()?);
        Ok(stores)
    }
}

/// `log softmax(logits / T)` at the targets (`logits` `[n, V]`, `targets`
/// `[n]`): the target logit minus a log-sum-exp.
fn target_logps(logits: &Tensor, targets: &Tensor, temperature: f64) -> Result<Tensor> {
    let logits = (logits / temperature)?;
    // The maximum only keeps exp in range; its gradient cancels.
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let lse = (logits
        .broadcast_sub(&max)?
        .exp()?
        .sum_keepdim(D::Minus1)?
        .log()?
        + max)?;
    let target = logits.gather(&targets.unsqueeze(D::Minus1)?, D::Minus1)?;
    (target - lse)?.squeeze(D::Minus1)
}

/// The states scoring the completions of understanding rows.
pub fn understanding_states(
    model: &Janus,
    batch: &UnderstandingBatch,
    temperature: f64,
    pass: Pass,
) -> Result<ScoringStates> {
    let lm = &model.language_model;
    let (_, total) = batch.ids.dims2()?;
    let embeds = model.merge_image_embeds(batch.ids, batch.images_seq_mask, batch.image_embeds)?;
    let ctx = lm.context(&positions(batch.attention_mask), batch.attention_mask)?;
    let hidden = lm.forward_hidden(&embeds, &ctx, None, pass)?;
    let l = batch.completion_len;
    // The states at T-1 .. T+L-2 predict the completion tokens T .. T+L-1.
    Ok(ScoringStates {
        hidden: hidden.narrow(1, total - l - 1, l)?,
        targets: batch.ids.narrow(1, total - l, l)?,
        head: Head::Text,
        temperature,
        chunk_logits: CHUNK_LOGITS,
    })
}

/// Per-token log-probs `[G, L]` of the completions of understanding rows.
pub fn understanding_logps(
    model: &Janus,
    batch: &UnderstandingBatch,
    temperature: f64,
    pass: Pass,
) -> Result<Tensor> {
    understanding_states(model, batch, temperature, pass)?.logps(model)
}

/// The states scoring image tokens, conditional rows without CFG.
pub fn generation_states(
    model: &Janus,
    batch: &GenerationBatch,
    temperature: f64,
    alignment: T2iAlignment,
    pass: Pass,
) -> Result<ScoringStates> {
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
    Ok(ScoringStates {
        hidden: hidden.narrow(1, start, m)?,
        targets: batch.completion.clone(),
        head: Head::Image,
        temperature,
        chunk_logits: CHUNK_LOGITS,
    })
}

/// Per-token log-probs `[G, M]` of image tokens, conditional rows without CFG.
pub fn generation_logps(
    model: &Janus,
    batch: &GenerationBatch,
    temperature: f64,
    alignment: T2iAlignment,
    pass: Pass,
) -> Result<Tensor> {
    generation_states(model, batch, temperature, alignment, pass)?.logps(model)
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
///
/// The update runs in f32 (f64 for f64 parameters) whatever the model's
/// dtype: a half-precision parameter is the working copy of an f32 master
/// that the optimizer owns and updates, then casts back. Updating in bf16
/// loses the step: beta2 = 0.999 rounds to 1.0, eps = 1e-8 to 0 in f16, and
/// 0.02 - 4e-6 stays 0.02.
pub struct AdamW {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub step: u64,
    /// First and second moments, one pair per parameter, in the update
    /// dtype; written in place, so each must own its storage.
    pub moments: Vec<(Tensor, Tensor)>,
    /// The master copy of each half-precision parameter; none where the
    /// parameter itself is in the update dtype.
    masters: Vec<Option<Tensor>>,
}

impl AdamW {
    pub fn new(params: &[(String, Var)], lr: f64, weight_decay: f64) -> Result<Self> {
        let mut moments = Vec::with_capacity(params.len());
        let mut masters = Vec::with_capacity(params.len());
        for (_, v) in params {
            let dtype = compute_dtype(v.dtype());
            // Two tensors: the update writes each in place.
            let zeros = || Tensor::zeros(v.shape(), dtype, v.device());
            moments.push((zeros()?, zeros()?));
            masters.push(if dtype == v.dtype() {
                None
            } else {
                Some(v.as_tensor().to_dtype(dtype)?)
            });
        }
        Ok(Self {
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
            step: 0,
            moments,
            masters,
        })
    }

    /// The moments, copied (the update writes them in place).
    pub fn moments_copy(&self) -> Result<Vec<(Tensor, Tensor)>> {
        self.moments
            .iter()
            .map(|(m, v)| Ok((m.copy()?, v.copy()?)))
            .collect()
    }

    /// What was trained: each parameter's value in the update dtype (the
    /// master copy where there is one), copied.
    pub fn values(&self, params: &[(String, Var)]) -> Result<Vec<Tensor>> {
        params
            .iter()
            .zip(&self.masters)
            .map(|((_, var), master)| master.as_ref().unwrap_or(var.as_tensor()).copy())
            .collect()
    }

    /// Sets every parameter (and its master copy) to `values`, as read from
    /// a checkpoint or a snapshot.
    pub fn set_values(&mut self, params: &[(String, Var)], values: &[Tensor]) -> Result<()> {
        if values.len() != params.len() {
            candle_core::bail!("{} values for {} parameters", values.len(), params.len());
        }
        for (((_, var), master), value) in params.iter().zip(&mut self.masters).zip(values) {
            if value.dims() != var.dims() {
                candle_core::bail!("a value of shape {:?} for {:?}", value.dims(), var.dims());
            }
            var.set(&value.to_dtype(var.dtype())?)?;
            if let Some(master) = master {
                // A copy of its own: the update writes the master in place.
                *master = value.to_dtype(master.dtype())?.copy()?;
            }
        }
        Ok(())
    }

    /// One update from `grads` (one per parameter, `None` for no gradient).
    /// The moments, master copies and parameters are written in place, a
    /// block of rows at a time: the update's temporaries stay a few blocks
    /// in size, not several copies of the largest parameter (an embedding
    /// table of 102400 x 2048 is 0.8 GB in f32).
    pub fn apply(&mut self, params: &[(String, Var)], grads: &[Option<Tensor>]) -> Result<()> {
        self.step += 1;
        let t = self.step as i32;
        let (b1, b2) = (self.beta1, self.beta2);
        let bias1 = 1.0 - b1.powi(t);
        let bias2 = 1.0 - b2.powi(t);
        let state = self.moments.iter().zip(&self.masters);
        for (((_, var), grad), ((m, v), master)) in params.iter().zip(grads).zip(state) {
            let Some(g) = grad else { continue };
            let rows = var.dims().first().copied().unwrap_or(1).max(1);
            let block = (UPDATE_BLOCK / (var.elem_count() / rows).max(1)).max(1);
            let value = master.as_ref().unwrap_or(var.as_tensor());
            for first in (0..rows).step_by(block) {
                let n = block.min(rows - first);
                let part = |t: &Tensor| t.narrow(0, first, n);
                let g = part(g)?.to_dtype(m.dtype())?;
                let m_new = ((part(m)? * b1)? + (&g * (1.0 - b1))?)?;
                let v_new = ((part(v)? * b2)? + (g.sqr()? * (1.0 - b2))?)?;
                let step = ((&m_new / bias1)? / ((&v_new / bias2)?.sqrt()? + self.eps)?)?;
                let decayed = (part(value)? * (1.0 - self.lr * self.weight_decay))?;
                let updated = (decayed - (step * self.lr)?)?;
                m.slice_set(&m_new, 0, first)?;
                v.slice_set(&v_new, 0, first)?;
                if let Some(master) = master {
                    master.slice_set(&updated, 0, first)?;
                }
                var.as_tensor()
                    .slice_set(&updated.to_dtype(var.dtype())?, 0, first)?;
            }
        }
        Ok(())
    }
}

/// The global L2 norm of `grads`, which are scaled down to `max` when
/// above it (PyTorch's `clip_grad_norm_`).
pub fn clip_grad_norm(grads: &mut [Option<Tensor>], max: Option<f64>) -> Result<f64> {
    let mut sq = 0.0;
    for g in grads.iter().flatten() {
        sq += g
            .to_dtype(DType::F64)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f64>()?;
    }
    let norm = sq.sqrt();
    if let Some(max) = max.filter(|&max| norm > max) {
        let factor = max / (norm + 1e-6);
        for g in grads.iter_mut().flatten() {
            *g = (&*g * factor)?;
        }
    }
    Ok(norm)
}

/// Values per block of an in-place AdamW update (16 MB in f32).
const UPDATE_BLOCK: usize = 1 << 22;

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

    /// bf16 has no CPU matmul, but the update needs none: a bf16 weight of
    /// 0.02 under steps of 4e-6 moves as in f32 (in bf16 arithmetic each
    /// step rounds away and beta2 is 1.0).
    #[test]
    fn adamw_updates_bf16_parameters_through_f32_masters() {
        let dev = &Device::Cpu;
        let run = |dtype: DType| {
            let w = Var::from_tensor(
                &Tensor::full(0.02f32, 8, dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap(),
            )
            .unwrap();
            let params = vec![("w".to_string(), w)];
            let mut adam = AdamW::new(&params, 4e-6, 0.0).unwrap();
            let grad = Tensor::full(0.5f32, 8, dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            for _ in 0..50 {
                adam.apply(&params, &[Some(grad.clone())]).unwrap();
            }
            let master: Vec<f32> = adam.values(&params).unwrap()[0].to_vec1().unwrap();
            let working: Vec<f32> = params[0]
                .1
                .as_tensor()
                .to_dtype(DType::F32)
                .unwrap()
                .to_vec1()
                .unwrap();
            (master[0], working[0])
        };
        let (f32_value, _) = run(DType::F32);
        let (master, working) = run(DType::BF16);
        assert!(
            (f32_value - (0.02 - 50.0 * 4e-6)).abs() < 1e-7,
            "{f32_value}"
        );
        // The bf16 run starts from 0.02 rounded to bf16; it moves as far.
        let start = Tensor::new(0.02f32, dev)
            .and_then(|t| {
                t.to_dtype(DType::BF16)?
                    .to_dtype(DType::F32)?
                    .to_scalar::<f32>()
            })
            .unwrap();
        assert!(
            ((master - start) - (f32_value - 0.02)).abs() < 1e-7,
            "{master} from {start} vs {f32_value}"
        );
        // The working copy is the master rounded to bf16: it moved too.
        assert!(
            working < 0.02 && (working - master).abs() < 1e-4,
            "{working}"
        );
    }

    /// A parameter larger than one block is updated block by block, in
    /// place, as `torch.optim.AdamW` would update it whole.
    #[test]
    fn adamw_updates_large_parameters_block_by_block() {
        let dev = &Device::Cpu;
        let (rows, cols) = (5, UPDATE_BLOCK / 2);
        let w = Var::from_tensor(&Tensor::ones((rows, cols), DType::F32, dev).unwrap()).unwrap();
        let params = vec![("w".to_string(), w)];
        let mut adam = AdamW::new(&params, 0.01, 0.1).unwrap();
        let row_grads = [0.5f32, -1.0, 2.0, 0.0, -0.25];
        let grad = Tensor::new(&row_grads, dev)
            .unwrap()
            .unsqueeze(1)
            .unwrap()
            .broadcast_as((rows, cols))
            .unwrap()
            .contiguous()
            .unwrap();
        for _ in 0..2 {
            adam.apply(&params, &[Some(grad.clone())]).unwrap();
        }
        let got: Vec<Vec<f32>> = params[0].1.as_tensor().to_vec2().unwrap();
        for (r, &g) in row_grads.iter().enumerate() {
            let g = g as f64;
            let (mut w, mut m, mut v) = (1f64, 0f64, 0f64);
            for t in 1..=2 {
                m = 0.9 * m + 0.1 * g;
                v = 0.999 * v + 0.001 * g * g;
                let step =
                    (m / (1.0 - 0.9f64.powi(t))) / ((v / (1.0 - 0.999f64.powi(t))).sqrt() + 1e-8);
                w = w * (1.0 - 0.01 * 0.1) - 0.01 * step;
            }
            for c in [0, cols / 2, cols - 1] {
                assert!(
                    (got[r][c] as f64 - w).abs() < 1e-6,
                    "row {r}: {} vs {w}",
                    got[r][c]
                );
            }
        }
    }
}
