//! Stage one: the VQ image tokenizer, trained as LlamaGen trains it but
//! without the perceptual and adversarial terms (the world's images are flat
//! colours): L2 reconstruction, codebook and commitment losses, the
//! straight-through estimator, and the L2-normalised codebook (distances
//! and both losses between unit vectors).

use std::collections::BTreeSet;

use candle_core::{DType, Device, Result, Tensor, Var};
use image::RgbImage;
use ulm_model::generate::to_rgb8;
use ulm_model::ops::{l2_normalize, Pass};
use ulm_model::vq::VqModel;
use ulm_rl::grpo::AdamW;
use ulm_world::{verify, Example};

use crate::data::{pixel_weights, pixels, train_examples};
use crate::{descend, learning_rate, PretrainError};

/// The losses of one batch.
pub struct VqLosses {
    /// The latents `[N, D]` the batch quantised (unit vectors when the
    /// codebook is normalised), detached: candidates for dead codes.
    pub latents: Tensor,
    /// Each latent's squared distance to its code.
    pub quantisation_errors: Vec<f32>,
    /// reconstruction + codebook + commitment, differentiable.
    pub total: Tensor,
    pub reconstruction: f64,
    pub codebook: f64,
    pub commitment: f64,
    /// The codes the batch quantised to.
    pub codes: Vec<u32>,
}

/// The VQ losses of images `pixels` (`[B, 3, S, S]` in [-1, 1]), each
/// pixel's reconstruction error weighted by `pixel_weights` (`[B, 1, S, S]`):
/// `w |x - D(sg(e) + z - sg(z))|^2 + |e - sg(z)|^2 + beta |z - sg(e)|^2`,
/// with `z` the encoder's latent and `e` its nearest code, both unit vectors
/// when the codebook is L2-normalised. Unless `quantise`, the decoder reads
/// `z` itself and the loss is the reconstruction alone (the codes chosen
/// are still reported).
pub fn vq_losses(
    vq: &VqModel,
    pixels: &Tensor,
    pixel_weights: &Tensor,
    beta: f64,
    quantise: bool,
) -> Result<VqLosses> {
    let latent = vq.latent(pixels, Pass::Training)?;
    let (b, d, h, w) = latent.dims4()?;
    let flat = latent.permute((0, 2, 3, 1))?.reshape((b * h * w, d))?;
    let codebook = vq.codebook()?;
    let z = if vq.l2_normalised() {
        l2_normalize(&flat)?
    } else {
        flat
    };
    // argmin |z - e|^2 = argmax over e of (2 z.e - |e|^2).
    let score = (z.detach().matmul(&codebook.detach().t()?)? * 2.0)?
        .broadcast_sub(&codebook.detach().sqr()?.sum(1)?.unsqueeze(0)?)?;
    let indices = score.argmax(1)?;
    let e = codebook.index_select(&indices, 0)?;
    let codebook_loss = (&e - z.detach())?.sqr()?.mean_all()?;
    let commitment = (&z - e.detach())?.sqr()?.mean_all()?;
    let decoded_from = if quantise {
        (&z + (&e - &z)?.detach())?
    } else {
        z.clone()
    };
    let entries = decoded_from
        .reshape((b, h, w, d))?
        .permute((0, 3, 1, 2))?
        .contiguous()?;
    let reconstruction = (vq.decode(&entries, Pass::Training)? - pixels)?
        .sqr()?
        .broadcast_mul(pixel_weights)?
        .mean_all()?;
    let total = if quantise {
        ((&reconstruction + &codebook_loss)? + (&commitment * beta)?)?
    } else {
        reconstruction.clone()
    };
    let scalar = |t: &Tensor| t.to_dtype(DType::F64)?.to_scalar::<f64>();
    Ok(VqLosses {
        reconstruction: scalar(&reconstruction)?,
        codebook: scalar(&codebook_loss)?,
        commitment: scalar(&commitment)?,
        codes: indices.to_vec1::<u32>()?,
        quantisation_errors: (&z - &e)?.detach().sqr()?.sum(1)?.to_vec1::<f32>()?,
        latents: z.detach(),
        total,
    })
}

/// How stage one trains.
#[derive(Debug, Clone)]
pub struct VqTraining {
    pub steps: usize,
    /// Images per step.
    pub batch: usize,
    /// Peak learning rate, reached after `warmup` steps and decayed to a
    /// tenth by the last.
    pub lr: f64,
    pub warmup: usize,
    /// Commitment weight (LlamaGen: 0.25).
    pub beta: f64,
    pub max_grad_norm: f64,
    /// Reconstruction weight of object pixels relative to background ones:
    /// objects cover a tenth of an image, and an unweighted loss is content
    /// with background and brown blobs.
    pub object_weight: f64,
    /// Reconstruction weight of pixels at an edge: shapes differ there.
    pub edge_weight: f64,
    /// Every this many steps, codes no latent chose since the last restart
    /// are moved onto latents of the current batch; 0 never.
    pub restart_every: usize,
    /// Steps at the start in which the decoder reads the encoder's latents
    /// unquantised; then every code is moved onto a latent of the batch.
    /// An autoencoder learns the world's patterns far faster than a VQ from
    /// random codes, and the codebook then starts on the latents it made.
    pub continuous_steps: usize,
    /// The world the images come from.
    pub world_seed: u64,
}

impl Default for VqTraining {
    fn default() -> Self {
        Self {
            steps: 2000,
            batch: 16,
            lr: 2e-3,
            warmup: 20,
            beta: 0.25,
            max_grad_norm: 1.0,
            object_weight: 10.0,
            edge_weight: 30.0,
            restart_every: 10,
            continuous_steps: 0,
            world_seed: 0,
        }
    }
}

/// What one step of stage one did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct VqStep {
    pub step: usize,
    pub loss: f64,
    pub reconstruction: f64,
    pub codebook: f64,
    pub commitment: f64,
    /// Distinct codes used by the step's batch.
    pub codes_used: usize,
    /// Dead codes moved onto latents at this step.
    pub codes_restarted: usize,
    pub lr: f64,
    pub grad_norm: f64,
}

/// The checkpoint name of the codebook.
pub const CODEBOOK: &str = "gen_vision_model.quantize.embedding.weight";

/// Moves codes not in `used` onto the latents of `latents` their codes
/// represent worst (largest `errors`), one code per latent: a pattern
/// that shares a code with another (a green square quantised to the orange
/// one) gets its own, where latents drawn at random would mostly be
/// background. Returns how many moved.
fn restart_dead_codes(
    codebook: &Var,
    used: &[bool],
    latents: &Tensor,
    errors: &[f32],
) -> Result<usize> {
    let dead: Vec<u32> = (0..used.len() as u32)
        .filter(|&c| !used[c as usize])
        .collect();
    let mut worst: Vec<u32> = (0..errors.len() as u32).collect();
    worst.sort_by(|&a, &b| {
        errors[b as usize]
            .total_cmp(&errors[a as usize])
            .then(a.cmp(&b))
    });
    let moved = dead.len().min(worst.len());
    if moved == 0 {
        return Ok(0);
    }
    let rows = Tensor::new(&worst[..moved], latents.device())?;
    let chosen = latents.index_select(&rows, 0)?.to_dtype(codebook.dtype())?;
    let mut values = codebook.as_tensor().copy()?;
    let dead_ids = Tensor::new(&dead[..moved], latents.device())?;
    values = values.index_add(
        &dead_ids,
        &(chosen - values.index_select(&dead_ids, 0)?)?,
        0,
    )?;
    codebook.set(&values)?;
    Ok(moved)
}

/// Trains the VQ tokenizer `vq`, whose parameters are `params` (the
/// `gen_vision_model.*` variables), on world images of the VQ's size,
/// reporting each step to `report`.
pub fn train_vq(
    vq: &VqModel,
    params: &[(String, Var)],
    cfg: &VqTraining,
    mut report: impl FnMut(&VqStep),
) -> std::result::Result<(), PretrainError> {
    let side = vq.image_size() as u32;
    let device = params
        .first()
        .map(|(_, v)| v.device().clone())
        .ok_or_else(|| PretrainError::Invalid("no VQ parameters to train".into()))?;
    let mut optimizer = AdamW::new(params, cfg.lr, 0.0)?;
    let codebook = params.iter().find(|(n, _)| n == CODEBOOK).map(|(_, v)| v);
    let mut used = vec![false; codebook.map_or(0, |c| c.dim(0).unwrap_or(0))];
    for step in 0..cfg.steps {
        let examples = train_examples(cfg.world_seed, (step * cfg.batch) as u64, cfg.batch);
        let images: Vec<_> = examples.iter().map(|e| e.image(side)).collect();
        let weights = pixel_weights(&images, cfg.object_weight, cfg.edge_weight, &device)?;
        let quantise = step >= cfg.continuous_steps;
        let losses = vq_losses(vq, &pixels(&images, &device)?, &weights, cfg.beta, quantise)?;
        optimizer.lr = learning_rate(cfg.lr, step, cfg.steps, cfg.warmup);
        let (loss, grad_norm) = descend(
            &losses.total,
            params,
            &mut optimizer,
            cfg.max_grad_norm,
            step,
        )?;
        for &c in &losses.codes {
            used[c as usize] = true;
        }
        let mut codes_restarted = 0;
        if let Some(codebook) = codebook {
            let last_continuous = step + 1 == cfg.continuous_steps;
            if last_continuous {
                used.fill(false);
            }
            let due = cfg.restart_every > 0 && (step + 1) % cfg.restart_every == 0;
            if (last_continuous || (quantise && due)) && step + 1 < cfg.steps {
                codes_restarted = restart_dead_codes(
                    codebook,
                    &used,
                    &losses.latents,
                    &losses.quantisation_errors,
                )?;
                used.fill(false);
            }
        }
        report(&VqStep {
            step,
            loss,
            reconstruction: losses.reconstruction,
            codebook: losses.codebook,
            commitment: losses.commitment,
            codes_used: losses.codes.iter().collect::<BTreeSet<_>>().len(),
            codes_restarted,
            lr: optimizer.lr,
            grad_norm,
        });
    }
    Ok(())
}

/// The examples' images after a round trip through the codes.
pub fn round_trip(
    vq: &VqModel,
    examples: &[Example],
    device: &Device,
) -> std::result::Result<Vec<RgbImage>, PretrainError> {
    let side = vq.image_size() as u32;
    let mut out = Vec::with_capacity(examples.len());
    for chunk in examples.chunks(16) {
        let images: Vec<_> = chunk.iter().map(|e| e.image(side)).collect();
        let codes = vq.encode(&pixels(&images, device)?)?.indices;
        let decoded = vq.decode_codes(&codes)?;
        for i in 0..chunk.len() {
            out.push(to_rgb8(&decoded.get(i)?)?);
        }
    }
    Ok(out)
}

/// Share of `examples` whose image, encoded to codes and decoded back,
/// the verifier still reads as exactly its scene.
pub fn reconstruction_accuracy(
    vq: &VqModel,
    examples: &[Example],
    device: &Device,
) -> std::result::Result<f64, PretrainError> {
    let images = round_trip(vq, examples, device)?;
    let right = images
        .iter()
        .zip(examples)
        .filter(|(image, e)| verify::is_scene(&verify::read(image), &e.scene))
        .count();
    Ok(right as f64 / examples.len().max(1) as f64)
}

/// A picture: the examples' images in the top row, their round trips
/// through the codes below.
pub fn reconstruction_grid(
    vq: &VqModel,
    examples: &[Example],
    device: &Device,
) -> std::result::Result<RgbImage, PretrainError> {
    let side = vq.image_size() as u32;
    let decoded = round_trip(vq, examples, device)?;
    let mut grid = RgbImage::new(side * examples.len() as u32, 2 * side);
    for (i, (example, back)) in examples.iter().zip(&decoded).enumerate() {
        let x = (i as u32 * side) as i64;
        image::imageops::replace(&mut grid, &example.image(side), x, 0);
        image::imageops::replace(&mut grid, back, x, side as i64);
    }
    Ok(grid)
}
