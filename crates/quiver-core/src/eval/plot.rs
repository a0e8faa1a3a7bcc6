//! PNG line plots with text (title, axis labels, legend), for the routing
//! diagnostics of `quiver experiment`: the share of routing weight that
//! lands on a held-out task's own family, layer by layer.
//!
//! Text needs a TrueType font: `$QUIVER_FONT`, or DejaVu Sans / Liberation
//! Sans where Debian puts them (package `fonts-dejavu-core`). Without one,
//! [`plot_lines`] returns an error that says so; nothing else depends on it.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

use crate::error::{Error, Result};

/// Where fonts are looked for, after `$QUIVER_FONT`.
pub const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/Library/Fonts/Arial.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
];

/// The font file text is drawn with, if there is one.
pub fn find_font() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("QUIVER_FONT") {
        let p = PathBuf::from(p);
        return p.is_file().then_some(p);
    }
    FONT_PATHS.iter().map(PathBuf::from).find(|p| p.is_file())
}

/// Registers the font once per process as `sans-serif`.
pub(crate) fn ensure_font() -> Result<()> {
    static DONE: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        let path = find_font().ok_or_else(|| {
            "no TrueType font for the plot's text: install fonts-dejavu-core or set QUIVER_FONT to a .ttf file".to_string()
        })?;
        let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        register_font("sans-serif", FontStyle::Normal, bytes)
            .map_err(|_| format!("{}: not a TrueType font", path.display()))
    })
    .clone()
    .map_err(Error::invalid)
}

/// One line of a plot, and optionally its dashed reference level (chance).
#[derive(Debug, Clone)]
pub struct Series {
    pub label: String,
    /// y at x = 0, 1, 2, ...
    pub values: Vec<f64>,
    pub reference: Option<f64>,
}

const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

/// Writes a PNG line plot: one line per series (x = index), each with its
/// reference level dashed in the same colour, a title, axis labels and a
/// legend. y spans [0, 1].
pub fn plot_lines(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
) -> Result<()> {
    if path.extension().and_then(|e| e.to_str()) != Some("png") {
        return Err(Error::invalid(format!(
            "{}: the plot is written as PNG, so its name must end in .png",
            path.display()
        )));
    }
    if series.is_empty() || series.iter().all(|s| s.values.is_empty()) {
        return Err(Error::invalid("nothing to plot: no series has values"));
    }
    ensure_font()?;
    let fail = |e: &dyn std::fmt::Display| {
        Error::invalid(format!("{}: cannot write the plot: {e}", path.display()))
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let n = series.iter().map(|s| s.values.len()).max().unwrap_or(1);
    let root = BitMapBackend::new(path, (1000, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| fail(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..(n.max(2) - 1) as f64, 0f64..1f64)
        .map_err(|e| fail(&e))?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .axis_desc_style(("sans-serif", 16))
        .label_style(("sans-serif", 13))
        .draw()
        .map_err(|e| fail(&e))?;
    for (i, s) in series.iter().enumerate() {
        let c = PALETTE[i % PALETTE.len()];
        chart
            .draw_series(LineSeries::new(
                s.values.iter().enumerate().map(|(x, y)| (x as f64, *y)),
                c.stroke_width(2),
            ))
            .map_err(|e| fail(&e))?
            .label(s.label.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
        if let Some(r) = s.reference {
            // Dashed: short segments along y = r.
            let last = (n.max(2) - 1) as f64;
            let step = last / 60.0;
            let mut x = 0.0;
            while x < last {
                let end = (x + step / 2.0).min(last);
                chart
                    .draw_series(std::iter::once(PathElement::new(
                        vec![(x, r), (end, r)],
                        c.stroke_width(1),
                    )))
                    .map_err(|e| fail(&e))?;
                x += step;
            }
        }
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 13))
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(|e| fail(&e))?;
    root.present().map_err(|e| fail(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_a_png_with_text_or_says_why_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lines.png");
        let series = vec![
            Series {
                label: "task a".into(),
                values: vec![0.2, 0.5, 0.7],
                reference: Some(0.33),
            },
            Series {
                label: "task b".into(),
                values: vec![0.4, 0.3, 0.9],
                reference: None,
            },
        ];
        match plot_lines(&path, "title", "layer", "share", &series) {
            Ok(()) => {
                let bytes = std::fs::read(&path).unwrap();
                assert_eq!(&bytes[1..4], b"PNG");
                assert!(bytes.len() > 2000);
            }
            Err(e) => {
                assert!(find_font().is_none(), "a font exists but: {e}");
                eprintln!("skipping the picture check: {e}");
                assert!(e.to_string().contains("font"), "{e}");
            }
        }
        let bad = plot_lines(&dir.path().join("x.jpg"), "t", "x", "y", &series);
        assert!(bad.unwrap_err().to_string().contains(".png"));
    }
}
