//! Learning curves as PNG, drawn with plotters and the bundled DejaVu Sans font (so no system fonts
//! are needed).

use super::MetricsRow;
use plotters::prelude::*;
use std::path::Path;
use std::sync::Once;

const FONT: &str = "pixel-sans";
static REGISTER: Once = Once::new();

fn register_font() {
    REGISTER.call_once(|| {
        let bytes: &'static [u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");
        plotters::style::register_font(FONT, FontStyle::Normal, bytes)
            .unwrap_or_else(|_| panic!("the bundled font is a valid TrueType font"));
    });
}

/// One curve: a label and (epoch, bits per dimension) points.
pub struct Curve {
    pub label: String,
    pub points: Vec<(f64, f64)>,
    pub dashed: bool,
}

/// Train and test bits per dimension of one run against the epoch.
pub fn learning_curve(title: &str, rows: &[MetricsRow], path: &Path) -> std::io::Result<()> {
    let curves = vec![
        Curve {
            label: "train".into(),
            points: rows
                .iter()
                .map(|r| (r.epoch as f64, r.train_bits_per_dim))
                .collect(),
            dashed: true,
        },
        Curve {
            label: "test".into(),
            points: rows
                .iter()
                .map(|r| (r.epoch as f64, r.test_bits_per_dim))
                .collect(),
            dashed: false,
        },
    ];
    curves_png(title, &curves, path)
}

/// Several curves on one chart (a sweep's test curves).
pub fn curves_png(title: &str, curves: &[Curve], path: &Path) -> std::io::Result<()> {
    register_font();
    let points = curves.iter().flat_map(|c| c.points.iter());
    let (mut x1, mut y0, mut y1) = (1.0f64, f64::INFINITY, f64::NEG_INFINITY);
    for &(x, y) in points.filter(|p| p.1.is_finite()) {
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if !y0.is_finite() {
        (y0, y1) = (0.0, 8.0);
    }
    let (width, height) = (800usize, 500usize);
    let mut rgb = vec![0u8; width * height * 3];
    draw(title, curves, (x1, y0, y1), &mut rgb, (width, height)).map_err(std::io::Error::other)?;
    // Written whole or not at all, as every file of a run.
    crate::atomic::write(path, &crate::data::png::encode(&rgb, 3, height, width)?)
}

/// Draws the chart into an RGB buffer of `size`.
fn draw(
    title: &str,
    curves: &[Curve],
    (x1, y0, y1): (f64, f64, f64),
    rgb: &mut [u8],
    size: (usize, usize),
) -> Result<(), String> {
    let err = |e: &dyn std::fmt::Display| e.to_string();
    let pad = ((y1 - y0) * 0.08).max(0.01);
    let root = BitMapBackend::with_buffer(rgb, (size.0 as u32, size.1 as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FONT, 22))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(0.8f64..x1 + 0.2, (y0 - pad)..(y1 + pad))
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("epoch")
        .x_labels((x1 as usize).clamp(2, 12))
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_desc("bits per dimension")
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 16))
        .draw()
        .map_err(|e| err(&e))?;
    for (i, c) in curves.iter().enumerate() {
        let colour = Palette99::pick(i).to_rgba();
        let style = colour.stroke_width(2);
        let series = if c.dashed {
            chart.draw_series(DashedLineSeries::new(c.points.iter().copied(), 6, 4, style))
        } else {
            chart.draw_series(LineSeries::new(c.points.iter().copied(), style))
        };
        series
            .map_err(|e| err(&e))?
            .label(c.label.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2))
            });
        chart
            .draw_series(c.points.iter().map(|&p| Circle::new(p, 3, colour.filled())))
            .map_err(|e| err(&e))?;
    }
    chart
        .configure_series_labels()
        .label_font((FONT, 14))
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_a_png_of_the_requested_size() {
        let rows: Vec<MetricsRow> = (1..=4)
            .map(|e| MetricsRow {
                epoch: e,
                train_bits_per_dim: 3.0 / e as f64,
                test_bits_per_dim: 2.5 / e as f64,
                train_seconds: 1.0,
                test_seconds: 1.0,
                train_images_per_second: 1.0,
                ..Default::default()
            })
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("curve.png");
        learning_curve("x", &rows, &p).unwrap();
        let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&p).unwrap()));
        let info = decoder.read_info().unwrap().info().clone();
        assert_eq!((info.width, info.height), (800, 500));
        // A single epoch and an empty chart draw too.
        learning_curve("one", &rows[..1], &p).unwrap();
        curves_png("none", &[], &p).unwrap();
    }
}
