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

/// Per-pixel weights `[B, 1, S, S]`: 1 for the world's background,
/// `object_weight` for an object's pixels, and `edge_weight` for pixels on
/// either side of an edge (a 4-neighbour of another colour): the edges are
/// what tells a circle from a square, and a plain pixel loss learns them
/// last.
pub fn pixel_weights(
    images: &[RgbImage],
    object_weight: f64,
    edge_weight: f64,
    device: &Device,
) -> Result<Tensor> {
    let side = images.first().map_or(0, |i| i.width() as usize);
    let mut data = Vec::with_capacity(images.len() * side * side);
    for image in images {
        let (w, h) = image.dimensions();
        for (x, y, p) in image.enumerate_pixels() {
            let differs = |dx: i64, dy: i64| {
                let (nx, ny) = (x as i64 + dx, y as i64 + dy);
                nx >= 0
                    && ny >= 0
                    && nx < w as i64
                    && ny < h as i64
                    && image.get_pixel(nx as u32, ny as u32) != p
            };
            let weight = if differs(-1, 0) || differs(1, 0) || differs(0, -1) || differs(0, 1) {
                edge_weight
            } else if p.0 == ulm_world::scene::BACKGROUND {
                1.0
            } else {
                object_weight
            };
            data.push(weight as f32);
        }
    }
    Tensor::from_vec(data, (images.len(), 1, side, side), device)
}

#[cfg(test)]
mod tests {
    use image::Rgb;
    use ulm_world::scene::BACKGROUND;

    use super::*;

    #[test]
    fn edges_weigh_most_then_objects_then_background() {
        // A 3 x 3 red square at (2..5, 2..5) in an 8 x 8 image.
        let image = RgbImage::from_fn(8, 8, |x, y| {
            if (2..5).contains(&x) && (2..5).contains(&y) {
                Rgb([220, 30, 30])
            } else {
                Rgb(BACKGROUND)
            }
        });
        let w = pixel_weights(&[image], 10.0, 30.0, &Device::Cpu).unwrap();
        let w = w.reshape((8, 8)).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(w[3][3], 10.0, "the square's inside");
        assert_eq!((w[2][2], w[2][4], w[4][3]), (30.0, 30.0, 30.0), "its rim");
        assert_eq!((w[1][3], w[3][5]), (30.0, 30.0), "background touching it");
        assert_eq!((w[0][0], w[7][7], w[1][1]), (1.0, 1.0, 1.0), "background");
    }
}
