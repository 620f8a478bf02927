//! A picture of what the model draws: for each of a fixed list of prompts,
//! images from several seeds, each framed green where the verifier finds
//! the prompt true and red where not, with what the verifier read under it.

use image::{imageops, Rgb, RgbImage};
use plotters::prelude::*;
use ulm_model::bundle::ModelBundle;
use ulm_world::caption;
use ulm_world::verify::{self, Seen};

use crate::eval::{draw, draw_planned};
use crate::PretrainError;
use ulm_model::generate::ImageSample;
use ulm_plot::{font, FAMILY};

/// The prompts of the picture: every GenEval category, the example
/// first.
pub const SHOWCASE_PROMPTS: [&str; 8] = [
    "a red circle above a blue square",
    "a photo of a green triangle",
    "a purple square and an orange circle",
    "two yellow circles",
    "three blue triangles",
    "a photo of a red square",
    "a green circle to the left of a purple triangle",
    "a blue circle and a yellow triangle",
];

const SCALE: u32 = 3;
const TEXT_WIDTH: u32 = 250;
const READING_HEIGHT: u32 = 64;
const FRAME: u32 = 3;

/// "small red circle, top left": one line per object the verifier read.
fn reading(seen: &[Seen]) -> Vec<String> {
    if seen.is_empty() {
        return vec!["(nothing)".into()];
    }
    seen.iter()
        .map(|s| {
            format!(
                "{} {} {}, {}",
                s.size.name(),
                s.colour.name(),
                s.shape.name(),
                s.cell.name()
            )
        })
        .collect()
}

/// `text` in lines of at most about `width` characters, broken at spaces.
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines: Vec<String> = Vec::new();
    for word in text.split_whitespace() {
        match lines.last_mut() {
            Some(line) if line.len() + 1 + word.len() <= width => {
                line.push(' ');
                line.push_str(word);
            }
            _ => lines.push(word.to_string()),
        }
    }
    lines
}

/// The picture of `prompts`, `seeds` images each, sampled at
/// `temperature` with classifier-free guidance `cfg_weight`, each from its
/// own plan when `plan_temperature` is set (the best of `best_of`
/// candidates, [`draw_planned`]). Returns it with the share of
/// images the verifier found the prompt true of.
pub fn generation_grid(
    bundle: &ModelBundle,
    prompts: &[&str],
    seeds: usize,
    cfg_weight: f32,
    temperature: f32,
    plan_temperature: Option<f32>,
    best_of: usize,
) -> Result<(RgbImage, f64), PretrainError> {
    let claims = prompts
        .iter()
        .map(|p| caption::parse(p).map_err(|e| PretrainError::Invalid(format!("{p:?}: {e}"))))
        .collect::<Result<Vec<_>, _>>()?;
    let seeds_range = 0..seeds as u64;
    let images: Vec<Vec<Option<ImageSample>>> = match plan_temperature {
        Some(plan) => draw_planned(
            bundle,
            prompts,
            seeds_range,
            (cfg_weight, temperature),
            plan,
            best_of,
        )?
        .into_iter()
        .map(|row| row.into_iter().map(|p| p.image).collect())
        .collect(),
        None => draw(bundle, prompts, seeds_range, cfg_weight, temperature)?,
    };
    let side = bundle.model.gen_vision.image_size() as u32 * SCALE;
    let cell_w = side + 2 * FRAME + 40;
    let row_h = side + 2 * FRAME + READING_HEIGHT;
    let (width, height) = (
        TEXT_WIDTH + cell_w * seeds as u32,
        row_h * prompts.len() as u32,
    );
    let mut grid = RgbImage::from_pixel(width, height, Rgb([255, 255, 255]));
    let mut labels = Vec::new();
    let (mut right, mut total) = (0usize, 0usize);
    for (row, (samples, claim)) in images.iter().zip(&claims).enumerate() {
        let y = row as u32 * row_h;
        for (col, sample) in samples.iter().enumerate() {
            let Some(sample) = sample else { continue };
            let seen = verify::read(&sample.image);
            let holds = verify::check(claim, &seen);
            right += holds as usize;
            total += 1;
            let x = TEXT_WIDTH + col as u32 * cell_w;
            let frame = if holds { [40, 160, 40] } else { [200, 40, 40] };
            let framed = RgbImage::from_pixel(side + 2 * FRAME, side + 2 * FRAME, Rgb(frame));
            imageops::replace(&mut grid, &framed, x as i64, y as i64);
            let big = imageops::resize(&sample.image, side, side, imageops::FilterType::Nearest);
            imageops::replace(&mut grid, &big, (x + FRAME) as i64, (y + FRAME) as i64);
            for (i, line) in reading(&seen).into_iter().take(4).enumerate() {
                labels.push((line, x, y + side + 2 * FRAME + 2 + 14 * i as u32, 11));
            }
        }
        for (i, line) in wrap(prompts[row], 28).into_iter().enumerate() {
            labels.push((line, 6, y + side / 3 + 18 * i as u32, 14));
        }
    }
    font();
    let fail = |e: String| PretrainError::Invalid(format!("drawing the picture: {e}"));
    let mut buffer = grid.into_raw();
    {
        let root = BitMapBackend::with_buffer(&mut buffer, (width, height)).into_drawing_area();
        for (text, x, y, size) in &labels {
            root.draw(&Text::new(
                text.as_str(),
                (*x as i32, *y as i32),
                (FAMILY, *size).into_font().color(&BLACK),
            ))
            .map_err(|e| fail(e.to_string()))?;
        }
        root.present().map_err(|e| fail(e.to_string()))?;
    }
    let grid = RgbImage::from_raw(width, height, buffer).ok_or_else(|| fail("buffer".into()))?;
    Ok((grid, right as f64 / total.max(1) as f64))
}
