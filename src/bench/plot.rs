//! `--plot FILE.svg`: latency against percentile, one curve per server, drawn as a
//! hand-written SVG (a few dozen elements; a plotting crate would bring more code than
//! the plot has).
//!
//! The x axis is the percentile on the scale HdrHistogram's plots use: the position of
//! percentile p is `log10(1 / (1 - p))`, so that 90 %, 99 %, 99.9 %, … are equally
//! spaced and the tail gets the room it deserves. The y axis is linear latency from 0.

use std::fmt::Write as _;
use std::path::Path;

use super::stats::Percentile;

/// One curve: a label (the server's URL) and its points.
#[derive(Debug, Clone, Copy)]
pub struct Curve<'a> {
    /// The legend's text.
    pub label: &'a str,
    /// Points in increasing percentile order.
    pub points: &'a [Percentile],
}

const WIDTH: f64 = 800.0;
const HEIGHT: f64 = 500.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 60.0;
const COLOURS: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
];

/// Writes the plot of `curves` to `path`.
pub fn write_svg(path: &Path, title: &str, curves: &[Curve<'_>]) -> Result<(), String> {
    std::fs::write(path, svg(title, curves))
        .map_err(|e| format!("--plot {}: cannot write: {e}", path.display()))
}

/// The plot as SVG text.
pub fn svg(title: &str, curves: &[Curve<'_>]) -> String {
    // The last point is the maximum at 100 %, which has no place on a 1 / (1 - p)
    // scale: it is drawn at the right edge, one decade past the last percentile.
    let decades = curves
        .iter()
        .filter_map(|c| c.points.iter().rev().nth(1))
        .map(|p| x_of(p.percentile))
        .fold(1.0f64, f64::max)
        .ceil()
        + 1.0;
    let max_us = curves
        .iter()
        .flat_map(|c| c.points.iter().map(|p| p.us))
        .fold(0.0f64, f64::max);
    let (y_top, y_step) = nice_axis(max_us);
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let px = |x: f64| LEFT + x / decades * plot_w;
    let py = |us: f64| TOP + plot_h - us / y_top * plot_h;

    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        out,
        r#"<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>"#
    );
    let _ = writeln!(
        out,
        r#"<text x="{}" y="24" text-anchor="middle" font-size="15">{}</text>"#,
        WIDTH / 2.0,
        escape(title)
    );
    // Grid and ticks: x at 0 %, 90 %, 99 %, …; y at multiples of the step.
    for decade in 0..=decades as u32 {
        let x = px(f64::from(decade));
        let _ = writeln!(
            out,
            r##"<line x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{:.1}" stroke="#ddd"/>"##,
            TOP + plot_h
        );
        let label = if decade == decades as u32 && decade > 0 {
            "max".to_owned()
        } else {
            percent_label(decade)
        };
        let _ = writeln!(
            out,
            r#"<text x="{x:.1}" y="{:.1}" text-anchor="middle">{label}</text>"#,
            TOP + plot_h + 18.0
        );
    }
    let mut tick = 0.0;
    while tick <= y_top + y_step / 2.0 {
        let y = py(tick);
        let _ = writeln!(
            out,
            r##"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#ddd"/>"##,
            LEFT + plot_w
        );
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
            LEFT - 6.0,
            y + 4.0,
            axis_number(tick)
        );
        tick += y_step;
    }
    let _ = writeln!(
        out,
        r#"<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="black"/>"#
    );
    let _ = writeln!(
        out,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">percentile</text>"#,
        LEFT + plot_w / 2.0,
        HEIGHT - 14.0
    );
    let _ = writeln!(
        out,
        r#"<text transform="translate(18 {:.1}) rotate(-90)" text-anchor="middle">latency (µs)</text>"#,
        TOP + plot_h / 2.0
    );
    for (i, curve) in curves.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let n = curve.points.len();
        let points: Vec<String> = curve
            .points
            .iter()
            .enumerate()
            .map(|(j, p)| {
                let x = if j + 1 == n && n > 1 {
                    decades
                } else {
                    x_of(p.percentile).min(decades)
                };
                format!("{:.1},{:.1}", px(x), py(p.us))
            })
            .collect();
        let _ = writeln!(
            out,
            r#"<polyline fill="none" stroke="{colour}" stroke-width="2" points="{}"/>"#,
            points.join(" ")
        );
        let ly = TOP + 16.0 + 18.0 * i as f64;
        let _ = writeln!(
            out,
            r#"<line x1="{:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{colour}" stroke-width="2"/>"#,
            LEFT + 12.0,
            LEFT + 36.0
        );
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{:.1}">{}</text>"#,
            LEFT + 42.0,
            ly + 4.0,
            escape(curve.label)
        );
    }
    out.push_str("</svg>\n");
    out
}

/// The x position of a percentile: `log10(1 / (1 - p))`, in decades.
fn x_of(percentile: f64) -> f64 {
    let tail = (1.0 - percentile / 100.0).max(1e-9);
    -tail.log10()
}

/// `0 %`, `90 %`, `99 %`, `99.9 %`, … for decade 0, 1, 2, 3, …
fn percent_label(decade: u32) -> String {
    match decade {
        0 => "0 %".to_owned(),
        1 => "90 %".to_owned(),
        2 => "99 %".to_owned(),
        d => format!("99.{} %", "9".repeat(d as usize - 2)),
    }
}

/// The top of the y axis and its step: 1, 2 or 5 × a power of ten, 4 to 10 steps.
fn nice_axis(max: f64) -> (f64, f64) {
    if !(max.is_finite() && max > 0.0) {
        return (1.0, 0.25);
    }
    let raw = max / 5.0;
    let magnitude = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * magnitude)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * magnitude);
    ((max / step).ceil() * step, step)
}

fn axis_number(v: f64) -> String {
    if v >= 1.0 || v == 0.0 {
        super::stats::thousands(v.round() as u64)
    } else {
        format!("{v}")
    }
}

/// Escapes text for SVG content and attributes.
fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axes_and_labels() {
        assert_eq!(nice_axis(830.0), (1000.0, 200.0));
        assert_eq!(nice_axis(0.0), (1.0, 0.25));
        assert_eq!(percent_label(0), "0 %");
        assert_eq!(percent_label(2), "99 %");
        assert_eq!(percent_label(4), "99.99 %");
        assert!((x_of(99.0) - 2.0).abs() < 1e-9);
        assert_eq!(escape("a<b&\"c\""), "a&lt;b&amp;&quot;c&quot;");
    }

    #[test]
    fn one_polyline_per_curve() {
        let a = [
            Percentile {
                percentile: 0.0,
                us: 10.0,
            },
            Percentile {
                percentile: 90.0,
                us: 20.0,
            },
            Percentile {
                percentile: 100.0,
                us: 50.0,
            },
        ];
        let svg = svg(
            "t <1>",
            &[
                Curve {
                    label: "ws://a/",
                    points: &a,
                },
                Curve {
                    label: "ws://b/",
                    points: &a[..2],
                },
            ],
        );
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("t &lt;1&gt;"));
        assert!(svg.trim_end().ends_with("</svg>"));
    }
}
