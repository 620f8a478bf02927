//! The world's examples as tensors.

use candle_core::{Device, Result, Tensor};
use image::RgbImage;
use ulm_world::{Example, Split};

/// Images as pixels in [-1, 1], `[B, 3, S, S]`: the VQ's input and output scale.
pub fn pixels(images: &[RgbImage], device: &Device) -> Result<Tensor> {
    let side = images.first().map_or(0, |i| i.width() as usize);
    let mut data = Vec::with_capacity(images.len() * 3 * side * side);
    for image in images {
        if image.width() as usize != side || image.height() as usize != side {
            candle_core::bail!("images of different sizes in one batch");
        }
        for c in 0..3 {
            data.extend(image.pixels().map(|p| p.0[c] as f32 / 127.5 - 1.0));
        }
    }
    Tensor::from_vec(data, (images.len(), 3, side, side), device)
}

/// Training examples `first..first + n` of the world of `seed`.
pub fn train_examples(seed: u64, first: u64, n: usize) -> Vec<Example> {
    (first..first + n as u64)
        .map(|i| Example::nth(seed, Split::Train, i))
        .collect()
}

/// Per-pixel weights `[B, 1, S, S]`: `object_weight` where a pixel is not
/// the world's background, 1 where it is.
pub fn object_weights(images: &[RgbImage], object_weight: f64, device: &Device) -> Result<Tensor> {
    let side = images.first().map_or(0, |i| i.width() as usize);
    let data: Vec<f32> = images
        .iter()
        .flat_map(|image| image.pixels())
        .map(|p| {
            if p.0 == ulm_world::scene::BACKGROUND {
                1.0
            } else {
                object_weight as f32
            }
        })
        .collect();
    Tensor::from_vec(data, (images.len(), 1, side, side), device)
}
