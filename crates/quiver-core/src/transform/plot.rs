//! PNG heatmap of the MBC similarity matrix (METHOD.md section 1, step 5)
//! with rows and columns grouped by cluster, so the block structure that
//! k-means found is visible at a glance.
//!
//! Drawn with plotters' bitmap backend. With expert names
//! ([`plot_similarity_named`]) and a font ([`crate::eval::plot::find_font`])
//! rows are labelled on the left and columns on top; without a font the
//! picture has no text. The colour scale (viridis-like, dark = low, bright = high)
//! spans the off-diagonal values; the diagonal (always 1) is clipped to the
//! brightest colour. White lines separate clusters; the strip on the right
//! is the colour bar, low at the bottom. [`HeatmapScale`] returns the
//! numbers the picture cannot show.

use std::path::Path;

use plotters::prelude::*;

use crate::error::{Error, Result};

/// What the colours of a heatmap mean.
#[derive(Debug, Clone, PartialEq)]
pub struct HeatmapScale {
    /// Similarity drawn in the darkest colour.
    pub low: f32,
    /// Similarity drawn in the brightest colour.
    pub high: f32,
    /// Row/column order of the picture (indices into the matrix).
    pub order: Vec<usize>,
}

const VIRIDIS: [(u8, u8, u8); 5] = [
    (68, 1, 84),
    (59, 82, 139),
    (33, 145, 140),
    (94, 201, 98),
    (253, 231, 37),
];

fn colour(t: f32) -> RGBColor {
    let t = t.clamp(0.0, 1.0) * (VIRIDIS.len() - 1) as f32;
    let i = (t.floor() as usize).min(VIRIDIS.len() - 2);
    let f = t - i as f32;
    let (a, b) = (VIRIDIS[i], VIRIDIS[i + 1]);
    let mix = |x: u8, y: u8| (x as f32 + f * (y as f32 - x as f32)).round() as u8;
    RGBColor(mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2))
}

/// Writes `s` (`N x N`) as a PNG heatmap at `path`, rows and columns
/// ordered by `labels` (cluster index per row), then by index.
pub fn plot_similarity(path: &Path, s: &[Vec<f32>], labels: &[usize]) -> Result<HeatmapScale> {
    plot_similarity_named(path, s, labels, &[])
}

/// [`plot_similarity`] with row `i` labelled `names[i]` (left, and rotated
/// on top) when a font is available; `names` empty: no labels.
pub fn plot_similarity_named(
    path: &Path,
    s: &[Vec<f32>],
    labels: &[usize],
    names: &[String],
) -> Result<HeatmapScale> {
    let n = s.len();
    if !names.is_empty() && names.len() != n {
        return Err(Error::invalid(
            "the heatmap needs one name per row of the similarity matrix",
        ));
    }
    let text = !names.is_empty() && crate::eval::plot::ensure_font().is_ok();
    if n == 0 || labels.len() != n || s.iter().any(|r| r.len() != n) {
        return Err(Error::invalid(
            "the heatmap needs a square similarity matrix and one label per row",
        ));
    }
    if path.extension().and_then(|e| e.to_str()) != Some("png") {
        return Err(Error::invalid(format!(
            "{}: the plot is written as PNG, so its name must end in .png",
            path.display()
        )));
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|&i| (labels[i], i));
    let (mut low, mut high) = (f32::INFINITY, f32::NEG_INFINITY);
    for (i, row) in s.iter().enumerate() {
        for (j, &v) in row.iter().enumerate() {
            if i != j {
                low = low.min(v);
                high = high.max(v);
            }
        }
    }
    if !low.is_finite() {
        (low, high) = (0.0, 1.0);
    }
    let span = (high - low).max(1e-6);

    let cell = (720 / n as u32).clamp(2, 48);
    let side = cell * n as u32;
    let (margin, bar_gap, bar_w) = (12u32, 12u32, 18u32);
    let font_px = (cell as f64 * 0.8).clamp(8.0, 14.0);
    let label_w = if text {
        (names.iter().map(|n| n.chars().count()).max().unwrap_or(0) as f64 * font_px * 0.6) as u32
            + 8
    } else {
        0
    };
    let (left, top) = (margin + label_w, margin + label_w);
    let width = left + side + bar_gap + bar_w + margin;
    let height = top + side + margin;
    let fail = |e: &dyn std::fmt::Display| {
        Error::invalid(format!("{}: cannot write the plot: {e}", path.display()))
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    {
        let root = BitMapBackend::new(path, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| fail(&e))?;
        let (m, c) = (margin as i32, cell as i32);
        let (mx, my) = (left as i32, top as i32);
        if text {
            let style = ("sans-serif", font_px).into_font().color(&BLACK);
            let rotated = ("sans-serif", font_px)
                .into_font()
                .transform(FontTransform::Rotate270)
                .color(&BLACK);
            for (r, &i) in order.iter().enumerate() {
                let mid = r as i32 * c + c / 2 - font_px as i32 / 2;
                root.draw_text(&names[i], &style, (m, my + mid))
                    .map_err(|e| fail(&e))?;
                root.draw_text(&names[i], &rotated, (mx + mid, top as i32 - 4))
                    .map_err(|e| fail(&e))?;
            }
        }
        for (r, &i) in order.iter().enumerate() {
            for (q, &j) in order.iter().enumerate() {
                let t = (s[i][j] - low) / span;
                let (x, y) = (mx + q as i32 * c, my + r as i32 * c);
                root.draw(&Rectangle::new(
                    [(x, y), (x + c, y + c)],
                    colour(t).filled(),
                ))
                .map_err(|e| fail(&e))?;
            }
        }
        // Cluster boundaries.
        let line = if cell >= 8 { 2 } else { 1 };
        for r in 1..n {
            if labels[order[r]] != labels[order[r - 1]] {
                let (px, py) = (mx + r as i32 * c, my + r as i32 * c);
                let (ex, ey) = (mx + side as i32, my + side as i32);
                for rect in [
                    [(px - line / 2, my), (px - line / 2 + line, ey)],
                    [(mx, py - line / 2), (ex, py - line / 2 + line)],
                ] {
                    root.draw(&Rectangle::new(rect, WHITE.filled()))
                        .map_err(|e| fail(&e))?;
                }
            }
        }
        // Colour bar, low at the bottom.
        let bx = mx + side as i32 + bar_gap as i32;
        for y in 0..side as i32 {
            let t = 1.0 - y as f32 / (side.max(2) - 1) as f32;
            root.draw(&Rectangle::new(
                [(bx, my + y), (bx + bar_w as i32, my + y + 1)],
                colour(t).filled(),
            ))
            .map_err(|e| fail(&e))?;
        }
        root.present().map_err(|e| fail(&e))?;
    }
    Ok(HeatmapScale { low, high, order })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_ends() {
        assert_eq!(colour(0.0), RGBColor(68, 1, 84));
        assert_eq!(colour(1.0), RGBColor(253, 231, 37));
        assert_eq!(colour(2.0), RGBColor(253, 231, 37));
    }

    #[test]
    fn rejects_non_png_names() {
        let e = plot_similarity(Path::new("x.jpg"), &[vec![1.0]], &[0]).unwrap_err();
        assert!(e.to_string().contains(".png"), "{e}");
    }
}
