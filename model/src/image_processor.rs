//! Image preprocessing for understanding, identical to the reference
//! `VLMImageProcessor`: scale the longer side to the tower's size with PIL's
//! antialiased bicubic filter, paste centred on a square of the background
//! colour, rescale to [0, 1], normalise per channel.
//!
//! The resize reimplements Pillow's `ImagingResample` (8-bit, fixed-point
//! coefficients, horizontal pass then vertical) so pixels match PIL exactly
//! rather than approximately; a generic bicubic differs by several levels.

use std::io::Cursor;
use std::path::Path;

use candle_core::{Device, Tensor};
use image::{ImageFormat, RgbImage};
use serde::{Deserialize, Serialize};

use crate::ModelError;

pub const PREPROCESSOR_FILE: &str = "preprocessor_config.json";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageProcessorConfig {
    pub image_size: usize,
    #[serde(default = "default_min_size")]
    pub min_size: usize,
    #[serde(default = "default_half")]
    pub image_mean: [f32; 3],
    #[serde(default = "default_half")]
    pub image_std: [f32; 3],
    #[serde(default = "default_rescale")]
    pub rescale_factor: f64,
    #[serde(default = "default_background")]
    pub background_color: [u8; 3],
    #[serde(default = "default_true")]
    pub do_normalize: bool,
}

fn default_min_size() -> usize {
    14
}
fn default_half() -> [f32; 3] {
    [0.5; 3]
}
fn default_rescale() -> f64 {
    1.0 / 255.0
}
fn default_background() -> [u8; 3] {
    [127; 3]
}
fn default_true() -> bool {
    true
}

impl ImageProcessorConfig {
    /// The Janus-Pro defaults for a tower of side `image_size`.
    pub fn janus_default(image_size: usize) -> Self {
        Self {
            image_size,
            min_size: default_min_size(),
            image_mean: default_half(),
            image_std: default_half(),
            rescale_factor: default_rescale(),
            background_color: default_background(),
            do_normalize: true,
        }
    }

    /// Reads `preprocessor_config.json`; absent, the Janus defaults.
    pub fn from_dir(dir: &Path, image_size: usize) -> Result<Self, ModelError> {
        let path = dir.join(PREPROCESSOR_FILE);
        let Ok(text) = std::fs::read_to_string(&path) else {
            return Ok(Self::janus_default(image_size));
        };
        let cfg: Self = serde_json::from_str(&text).map_err(|e| ModelError::Config {
            field: PREPROCESSOR_FILE.into(),
            message: e.to_string(),
        })?;
        if cfg.image_size != image_size {
            return Err(ModelError::Config {
                field: format!("{PREPROCESSOR_FILE} image_size"),
                message: format!("{} != vision tower image_size {image_size}", cfg.image_size),
            });
        }
        if cfg.image_std.contains(&0.0) {
            return Err(ModelError::Config {
                field: format!("{PREPROCESSOR_FILE} image_std"),
                message: "must not contain 0".into(),
            });
        }
        Ok(cfg)
    }

    /// `[rows, cols]` of the resized image before padding.
    pub fn target_size(&self, width: u32, height: u32) -> (u32, u32) {
        let m = width.max(height) as f64;
        let s = self.image_size as f64;
        let rows = ((height as f64 / m * s) as usize).max(self.min_size).max(1);
        let cols = ((width as f64 / m * s) as usize).max(self.min_size).max(1);
        (rows as u32, cols as u32)
    }

    /// Resized and padded RGB image of side `image_size`.
    pub fn resize_and_pad(&self, img: &RgbImage) -> RgbImage {
        let (rows, cols) = self.target_size(img.width(), img.height());
        let resized = resize_bicubic(img, cols, rows);
        let side = rows.max(cols);
        let mut canvas = RgbImage::from_pixel(side, side, image::Rgb(self.background_color));
        let (x0, y0) = ((side - cols) / 2, (side - rows) / 2);
        image::imageops::replace(&mut canvas, &resized, x0 as i64, y0 as i64);
        canvas
    }

    /// Normalised `[3, S, S]` pixels, computed in the reference's precision
    /// (rescale in f64 then f32; normalise in f32).
    pub fn preprocess(&self, img: &RgbImage, device: &Device) -> Result<Tensor, ModelError> {
        let padded = self.resize_and_pad(img);
        let (w, h) = (padded.width() as usize, padded.height() as usize);
        let mut data = vec![0f32; 3 * w * h];
        for (x, y, p) in padded.enumerate_pixels() {
            for c in 0..3 {
                let mut v = (p.0[c] as f64 * self.rescale_factor) as f32;
                if self.do_normalize {
                    v = (v - self.image_mean[c]) / self.image_std[c];
                }
                data[c * w * h + y as usize * w + x as usize] = v;
            }
        }
        Ok(Tensor::from_vec(data, (3, h, w), device)?)
    }
}

/// Decodes PNG, JPEG or WebP bytes to RGB8 (alpha dropped, grey replicated,
/// as PIL's `convert("RGB")`), refusing images over `max_pixels` before any
/// pixel buffer is allocated.
pub fn decode_image(bytes: &[u8], max_pixels: u64) -> Result<RgbImage, ModelError> {
    let reader = image::ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| ModelError::Image(e.to_string()))?;
    match reader.format() {
        Some(ImageFormat::Png | ImageFormat::Jpeg | ImageFormat::WebP) => {}
        Some(other) => {
            return Err(ModelError::Image(format!(
                "{other:?} images are not supported (PNG, JPEG, WebP)"
            )))
        }
        None => return Err(ModelError::Image("not a PNG, JPEG or WebP image".into())),
    }
    let (w, h) = reader
        .into_dimensions()
        .map_err(|e| ModelError::Image(e.to_string()))?;
    if w == 0 || h == 0 {
        return Err(ModelError::Image("image has no pixels".into()));
    }
    if w as u64 * h as u64 > max_pixels {
        return Err(ModelError::ImageTooLarge(format!(
            "{w}x{h} exceeds the limit of {max_pixels} pixels"
        )));
    }
    let mut reader = image::ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| ModelError::Image(e.to_string()))?;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(w);
    limits.max_image_height = Some(h);
    limits.max_alloc = Some(max_pixels.saturating_mul(16).max(1 << 20));
    reader.limits(limits);
    let decoded = reader
        .decode()
        .map_err(|e| ModelError::Image(e.to_string()))?;
    Ok(decoded.to_rgb8())
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Per output index: first input index and fixed-point weights.
struct Coefficients {
    bounds: Vec<(usize, usize)>,
    weights: Vec<i32>,
    ksize: usize,
}

/// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for a full-range box.
fn coefficients(in_size: u32, out_size: u32) -> Coefficients {
    const SUPPORT: f64 = 2.0;
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = SUPPORT * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size as usize);
    let mut weights = vec![0i32; out_size as usize * ksize];
    let mut k = vec![0f64; ksize];
    for xx in 0..out_size as usize {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize - xmin;
        let mut ww = 0.0;
        for (x, kx) in k.iter_mut().enumerate().take(xmax) {
            *kx = bicubic((x as f64 + xmin as f64 - center + 0.5) * ss);
            ww += *kx;
        }
        for (x, kx) in k.iter().enumerate().take(xmax) {
            let w = if ww != 0.0 { kx / ww } else { *kx };
            let fixed = w * (1u32 << PRECISION_BITS) as f64;
            weights[xx * ksize + x] = if w < 0.0 {
                (fixed - 0.5) as i32
            } else {
                (fixed + 0.5) as i32
            };
        }
        bounds.push((xmin, xmax));
    }
    Coefficients {
        bounds,
        weights,
        ksize,
    }
}

fn clip8(v: i64) -> u8 {
    if v >= (1i64 << PRECISION_BITS) << 8 {
        255
    } else if v <= 0 {
        0
    } else {
        (v >> PRECISION_BITS) as u8
    }
}

/// PIL `Image.resize((w, h), BICUBIC)` on an RGB image.
pub fn resize_bicubic(img: &RgbImage, out_w: u32, out_h: u32) -> RgbImage {
    let (in_w, in_h) = img.dimensions();
    let src = img.as_raw();
    let initial = 1i64 << (PRECISION_BITS - 1);
    let horizontal = if out_w != in_w {
        let c = coefficients(in_w, out_w);
        let mut out = vec![0u8; out_w as usize * in_h as usize * 3];
        for y in 0..in_h as usize {
            for (xx, &(xmin, xmax)) in c.bounds.iter().enumerate() {
                let k = &c.weights[xx * c.ksize..xx * c.ksize + xmax];
                for ch in 0..3 {
                    let mut ss = initial;
                    for (x, &w) in k.iter().enumerate() {
                        ss += src[(y * in_w as usize + xmin + x) * 3 + ch] as i64 * w as i64;
                    }
                    out[(y * out_w as usize + xx) * 3 + ch] = clip8(ss);
                }
            }
        }
        out
    } else {
        src.clone()
    };
    let vertical = if out_h != in_h {
        let c = coefficients(in_h, out_h);
        let w = out_w as usize;
        let mut out = vec![0u8; w * out_h as usize * 3];
        for (yy, &(ymin, ymax)) in c.bounds.iter().enumerate() {
            let k = &c.weights[yy * c.ksize..yy * c.ksize + ymax];
            for xx in 0..w {
                for ch in 0..3 {
                    let mut ss = initial;
                    for (y, &wt) in k.iter().enumerate() {
                        ss += horizontal[((ymin + y) * w + xx) * 3 + ch] as i64 * wt as i64;
                    }
                    out[(yy * w + xx) * 3 + ch] = clip8(ss);
                }
            }
        }
        out
    } else {
        horizontal
    };
    RgbImage::from_raw(out_w, out_h, vertical).expect("buffer sized for the output image")
}
