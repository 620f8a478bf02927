//! Learning curves as PNG: plotters drawing into an RGB buffer, text in the
//! bundled DejaVu Sans Mono, so no system font is needed.

use std::sync::Once;

use image::RgbImage;
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

use crate::PretrainError;

const FONT: &[u8] = include_bytes!("../assets/DejaVuSansMono.ttf");
/// The font family the bundled font is registered as.
pub(crate) const FAMILY: &str = "sans-serif";
const PALETTE: [RGBColor; 4] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
];

/// One named curve of (step, value) points.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

impl Series {
    /// The curve of `values` by step, each point the mean of the last
    /// `window` values: per-step losses are too noisy to read raw.
    pub fn smoothed(name: &str, values: &[f64], window: usize) -> Self {
        let window = window.max(1);
        let points = (0..values.len())
            .map(|i| {
                let from = (i + 1).saturating_sub(window);
                let span = &values[from..=i];
                (i as f64, span.iter().sum::<f64>() / span.len() as f64)
            })
            .collect();
        Self {
            name: name.to_string(),
            points,
        }
    }
}

/// Registers the bundled font, once.
pub(crate) fn font() {
    static REGISTER: Once = Once::new();
    // The font is compiled in and known to parse; a failure would only
    // leave the text out.
    REGISTER.call_once(|| {
        let _ = register_font(FAMILY, FontStyle::Normal, FONT);
    });
}

/// A `width` x `height` chart of `series` on a logarithmic value axis.
pub fn line_chart(
    title: &str,
    y_label: &str,
    series: &[Series],
    (width, height): (u32, u32),
) -> Result<RgbImage, PretrainError> {
    font();
    let fail = |e: String| PretrainError::Invalid(format!("plotting {title}: {e}"));
    let points = || series.iter().flat_map(|s| s.points.iter());
    let last_step = points().map(|p| p.0).fold(1.0, f64::max);
    let values = || points().map(|p| p.1).filter(|v| v.is_finite() && *v > 0.0);
    let low = values().fold(f64::INFINITY, f64::min);
    let high = values().fold(0.0, f64::max);
    if !low.is_finite() || high <= 0.0 {
        return Err(fail("no positive values".into()));
    }
    let mut buffer = vec![255u8; (width * height * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buffer, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| fail(e.to_string()))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, (FAMILY, 20))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(64)
            .build_cartesian_2d(0f64..last_step, (low * 0.8..high * 1.25).log_scale())
            .map_err(|e| fail(e.to_string()))?;
        chart
            .configure_mesh()
            .light_line_style(RGBColor(238, 238, 238))
            .x_label_formatter(&|x| format!("{x:.0}"))
            .x_desc("step")
            .y_desc(y_label)
            .label_style((FAMILY, 13))
            .draw()
            .map_err(|e| fail(e.to_string()))?;
        for (i, s) in series.iter().enumerate() {
            let colour = PALETTE[i % PALETTE.len()];
            let kept = s.points.iter().copied().filter(|p| p.1 > 0.0);
            chart
                .draw_series(LineSeries::new(kept, colour.stroke_width(2)))
                .map_err(|e| fail(e.to_string()))?
                .label(s.name.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], colour));
        }
        chart
            .configure_series_labels()
            .label_font((FAMILY, 14))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(|e| fail(e.to_string()))?;
        root.present().map_err(|e| fail(e.to_string()))?;
    }
    RgbImage::from_raw(width, height, buffer).ok_or_else(|| fail("buffer size".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chart_draws_its_curves_and_text() {
        let falling: Vec<f64> = (0..200).map(|i| 5.0 * (-(i as f64) / 50.0).exp()).collect();
        let chart = line_chart(
            "test",
            "loss",
            &[
                Series::smoothed("falling", &falling, 10),
                Series::smoothed("flat", &[0.5; 200], 10),
            ],
            (480, 320),
        )
        .unwrap();
        let coloured = |c: [u8; 3]| chart.pixels().filter(|p| p.0 == c).count();
        assert!(coloured([31, 119, 180]) > 200, "the first curve");
        assert!(coloured([214, 39, 40]) > 200, "the second curve");
        let dark = chart
            .pixels()
            .filter(|p| p.0.iter().all(|&c| c < 80))
            .count();
        assert!(dark > 500, "axes and text: {dark} dark pixels");
    }
}
