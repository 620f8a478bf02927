//! Learning curves as PNG: plotters drawing into an RGB buffer, text in the
//! bundled DejaVu Sans Mono, so no system font is needed. Pretraining, the
//! `train` command and every RL job draw their curves here.

use std::sync::Once;

use image::{imageops, Rgb, RgbImage};
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

const FONT: &[u8] = include_bytes!("../assets/DejaVuSansMono.ttf");
/// The font family the bundled font is registered as.
pub const FAMILY: &str = "sans-serif";

#[derive(Debug, thiserror::Error)]
#[error("plotting {title}: {message}")]
pub struct PlotError {
    pub title: String,
    pub message: String,
}
const PALETTE: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
    RGBColor(127, 127, 127),
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
pub fn font() {
    static REGISTER: Once = Once::new();
    // The font is compiled in and known to parse; a failure would only
    // leave the text out.
    REGISTER.call_once(|| {
        let _ = register_font(FAMILY, FontStyle::Normal, FONT);
    });
}

/// How values are laid on the vertical axis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scale {
    /// For losses that fall over decades (non-positive values are left out).
    Log,
    /// For rewards, KL and anything that can reach 0 or below.
    Linear,
}

/// One chart: its title, what its values are, its curves.
pub struct Panel {
    pub title: String,
    /// What the horizontal axis counts (steps, rounds, ...).
    pub x_label: String,
    pub y_label: String,
    pub scale: Scale,
    pub series: Vec<Series>,
}

/// A `width` x `height` chart of the panel's curves.
pub fn line_chart(panel: &Panel, (width, height): (u32, u32)) -> Result<RgbImage, PlotError> {
    font();
    let fail = |message: String| PlotError {
        title: panel.title.clone(),
        message,
    };
    let shown = |v: f64| v.is_finite() && (panel.scale == Scale::Linear || v > 0.0);
    let points = || {
        panel
            .series
            .iter()
            .flat_map(|s| s.points.iter())
            .filter(|p| shown(p.1))
    };
    let last_step = points().map(|p| p.0).fold(1.0, f64::max);
    let low = points().map(|p| p.1).fold(f64::INFINITY, f64::min);
    let high = points().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
    if !low.is_finite() {
        return Err(fail("no values to draw".into()));
    }
    let mut buffer = vec![255u8; (width * height * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buffer, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| fail(e.to_string()))?;
        let mut builder = ChartBuilder::on(&root);
        builder
            .caption(panel.title.as_str(), (FAMILY, 20))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(64);
        match panel.scale {
            Scale::Log => {
                let chart = builder
                    .build_cartesian_2d(0f64..last_step, (low * 0.8..high * 1.25).log_scale())
                    .map_err(|e| fail(e.to_string()))?;
                draw_curves(chart, panel, &shown).map_err(fail)?;
            }
            Scale::Linear => {
                // A flat curve still gets a visible range.
                let pad = ((high - low) * 0.08).max(high.abs().max(1e-3) * 0.05);
                let chart = builder
                    .build_cartesian_2d(0f64..last_step, low - pad..high + pad)
                    .map_err(|e| fail(e.to_string()))?;
                draw_curves(chart, panel, &shown).map_err(fail)?;
            }
        }
        root.present().map_err(|e| fail(e.to_string()))?;
    }
    RgbImage::from_raw(width, height, buffer).ok_or_else(|| fail("buffer size".into()))
}

/// Mesh, curves and legend of a chart whatever its axis type.
fn draw_curves<'a, Y>(
    mut chart: ChartContext<
        'a,
        BitMapBackend<'a>,
        Cartesian2d<plotters::coord::types::RangedCoordf64, Y>,
    >,
    panel: &Panel,
    shown: &dyn Fn(f64) -> bool,
) -> Result<(), String>
where
    Y: Ranged<ValueType = f64> + plotters::coord::ranged1d::ValueFormatter<f64>,
{
    // A tick per step for short runs, so that no two ticks read the same.
    let last_step = chart.x_range().end;
    let ticks = (last_step.ceil() as usize + 1).clamp(2, 10);
    chart
        .configure_mesh()
        .light_line_style(RGBColor(238, 238, 238))
        .x_labels(ticks)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .x_desc(panel.x_label.as_str())
        .y_desc(panel.y_label.as_str())
        .label_style((FAMILY, 13))
        .draw()
        .map_err(|e| e.to_string())?;
    for (i, s) in panel.series.iter().enumerate() {
        let colour = PALETTE[i % PALETTE.len()];
        let kept = s.points.iter().copied().filter(|p| shown(p.1));
        chart
            .draw_series(LineSeries::new(kept, colour.stroke_width(2)))
            .map_err(|e| e.to_string())?
            .label(s.name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], colour));
    }
    chart
        .configure_series_labels()
        .label_font((FAMILY, 14))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| e.to_string())
}

/// The panels in a grid of `columns`, each `panel_size`; a panel that
/// cannot be drawn (it has nothing to draw) is left blank.
pub fn grid(panels: &[Panel], columns: u32, panel_size: (u32, u32)) -> RgbImage {
    let columns = columns.max(1);
    let rows = (panels.len() as u32).div_ceil(columns).max(1);
    let (w, h) = panel_size;
    let mut out = RgbImage::from_pixel(w * columns, h * rows, Rgb([255, 255, 255]));
    for (i, panel) in panels.iter().enumerate() {
        let (x, y) = ((i as u32 % columns) * w, (i as u32 / columns) * h);
        if let Ok(chart) = line_chart(panel, panel_size) {
            imageops::replace(&mut out, &chart, x as i64, y as i64);
        }
    }
    out
}

/// PNG bytes of an image.
pub fn png(image: &RgbImage) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    image
        .write_to(&mut out, image::ImageFormat::Png)
        .expect("encoding an RGB image as PNG in memory cannot fail");
    out.into_inner()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chart_draws_its_curves_and_text() {
        let falling: Vec<f64> = (0..200).map(|i| 5.0 * (-(i as f64) / 50.0).exp()).collect();
        let panel = Panel {
            title: "test".into(),
            x_label: "step".into(),
            y_label: "loss".into(),
            scale: Scale::Log,
            series: vec![
                Series::smoothed("falling", &falling, 10),
                Series::smoothed("flat", &[0.5; 200], 10),
            ],
        };
        let chart = line_chart(&panel, (480, 320)).unwrap();
        let coloured = |c: [u8; 3]| chart.pixels().filter(|p| p.0 == c).count();
        assert!(coloured([31, 119, 180]) > 200, "the first curve");
        assert!(coloured([214, 39, 40]) > 200, "the second curve");
        let dark = chart
            .pixels()
            .filter(|p| p.0.iter().all(|&c| c < 80))
            .count();
        assert!(dark > 500, "axes and text: {dark} dark pixels");
    }

    #[test]
    fn a_linear_grid_draws_values_at_and_below_zero() {
        let panel = |title: &str, values: Vec<f64>| Panel {
            title: title.into(),
            x_label: "step".into(),
            y_label: "value".into(),
            scale: Scale::Linear,
            series: vec![Series::smoothed(title, &values, 1)],
        };
        let panels = [
            panel("kl", (0..50).map(|i| -0.01 + i as f64 * 1e-3).collect()),
            panel("flat", vec![0.0; 50]),
            panel("empty", vec![]),
        ];
        let image = grid(&panels, 2, (320, 240));
        assert_eq!(image.dimensions(), (640, 480));
        let blue = |x0: u32, y0: u32| {
            (x0..x0 + 320)
                .flat_map(|x| (y0..y0 + 240).map(move |y| (x, y)))
                .filter(|&(x, y)| image.get_pixel(x, y).0 == [31, 119, 180])
                .count()
        };
        assert!(blue(0, 0) > 100, "the rising curve through 0");
        assert!(blue(320, 0) > 100, "the flat curve at 0");
        assert_eq!(blue(0, 240), 0, "the empty panel stays blank");
        assert_eq!(&png(&image)[..4], b"\x89PNG");
    }
}
