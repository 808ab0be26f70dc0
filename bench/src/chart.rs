//! The latency-by-percentile chart: one panel per latency scenario, one line per
//! path, percentiles on a log scale (50, 90, 99, 99.9, ... equally spaced) and
//! latency on a log scale. Plain SVG written by hand.

use std::fmt::Write as _;

use crate::report::PathLatency;

const PANEL_WIDTH: f64 = 520.0;
const PANEL_HEIGHT: f64 = 340.0;
const MARGIN_LEFT: f64 = 70.0;
const MARGIN_RIGHT: f64 = 20.0;
const MARGIN_TOP: f64 = 40.0;
const MARGIN_BOTTOM: f64 = 50.0;
const COLORS: [(&str, &str); 3] = [
    ("direct", "#2b8a3e"),
    ("relay", "#1c7ed6"),
    ("mesh", "#e8590c"),
];
/// Where the x axis tops out: "max" is drawn one decade past 99.99.
const X_MAX: f64 = 5.0;

/// x position of a percentile: −log10(1 − p/100); max (100) is drawn at [`X_MAX`].
fn x_of(percentile: f64) -> f64 {
    if percentile >= 100.0 {
        X_MAX
    } else {
        -(1.0 - percentile / 100.0).log10()
    }
}

fn color(path: &str) -> &'static str {
    COLORS
        .iter()
        .find(|(name, _)| *name == path)
        .map_or("#555555", |(_, c)| c)
}

/// "100 µs", "1 ms", "10 s" for a power of ten of microseconds.
fn duration_label(us: f64) -> String {
    if us >= 1e6 {
        format!("{} s", us / 1e6)
    } else if us >= 1e3 {
        format!("{} ms", us / 1e3)
    } else {
        format!("{us} µs")
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The SVG document for `panels`: (title, one row per path).
pub fn svg(panels: &[(&str, &[PathLatency])]) -> String {
    let width = PANEL_WIDTH * panels.len().max(1) as f64;
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{PANEL_HEIGHT}" viewBox="0 0 {width} {PANEL_HEIGHT}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(out, r#"<rect width="100%" height="100%" fill="white"/>"#);
    for (i, (title, paths)) in panels.iter().enumerate() {
        panel(&mut out, PANEL_WIDTH * i as f64, title, paths);
    }
    out.push_str("</svg>\n");
    out
}

fn panel(out: &mut String, left: f64, title: &str, paths: &[PathLatency]) {
    let plot_x = left + MARGIN_LEFT;
    let plot_w = PANEL_WIDTH - MARGIN_LEFT - MARGIN_RIGHT;
    let plot_y = MARGIN_TOP;
    let plot_h = PANEL_HEIGHT - MARGIN_TOP - MARGIN_BOTTOM;
    let values = paths.iter().flat_map(|p| p.curve.iter().map(|(_, v)| *v));
    let (lo, hi) = values.fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let (lo, hi) = if lo > hi { (1.0, 10.0) } else { (lo, hi) };
    let decade_lo = lo.max(1.0).log10().floor();
    let decade_hi = hi.max(10.0).log10().ceil().max(decade_lo + 1.0);
    let sx = |p: f64| plot_x + x_of(p) / X_MAX * plot_w;
    let sy = |v: f64| {
        let t = (v.max(1.0).log10() - decade_lo) / (decade_hi - decade_lo);
        plot_y + plot_h * (1.0 - t)
    };

    let _ = writeln!(
        out,
        r#"<text x="{}" y="22" text-anchor="middle" font-weight="bold">{}</text>"#,
        left + PANEL_WIDTH / 2.0,
        escape(title)
    );
    let _ = writeln!(
        out,
        r##"<rect x="{plot_x}" y="{plot_y}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#999"/>"##
    );
    for (p, label) in [
        (50.0, "50"),
        (90.0, "90"),
        (99.0, "99"),
        (99.9, "99.9"),
        (99.99, "99.99"),
        (100.0, "max"),
    ] {
        let x = sx(p);
        let _ = writeln!(
            out,
            r##"<line x1="{x:.1}" y1="{plot_y}" x2="{x:.1}" y2="{:.1}" stroke="#eee"/><text x="{x:.1}" y="{:.1}" text-anchor="middle">{label}</text>"##,
            plot_y + plot_h,
            plot_y + plot_h + 16.0
        );
    }
    let _ = writeln!(
        out,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">percentile</text>"#,
        plot_x + plot_w / 2.0,
        plot_y + plot_h + 36.0
    );
    let mut decade = decade_lo;
    while decade <= decade_hi {
        let value = 10f64.powf(decade);
        let y = sy(value);
        let _ = writeln!(
            out,
            r##"<line x1="{plot_x}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#eee"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            plot_x + plot_w,
            plot_x - 6.0,
            y + 4.0,
            duration_label(value)
        );
        decade += 1.0;
    }
    for (i, path) in paths.iter().enumerate() {
        let points: Vec<String> = path
            .curve
            .iter()
            .map(|(p, v)| format!("{:.1},{:.1}", sx(*p), sy(*v)))
            .collect();
        let c = color(&path.path);
        let _ = writeln!(
            out,
            r#"<polyline fill="none" stroke="{c}" stroke-width="2" points="{}"/>"#,
            points.join(" ")
        );
        let ly = plot_y + 16.0 + 16.0 * i as f64;
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{ly:.1}" fill="{c}">{} (p50 {:.0} µs, p99 {:.0} µs)</text>"#,
            plot_x + 8.0,
            escape(&path.path),
            path.p50_us,
            path.p99_us
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::summarize;

    #[test]
    fn percentiles_are_evenly_spaced_nines() {
        assert!((x_of(90.0) - 1.0).abs() < 1e-9);
        assert!((x_of(99.0) - 2.0).abs() < 1e-9);
        assert!((x_of(99.9) - 3.0).abs() < 1e-6);
        assert_eq!(x_of(100.0), X_MAX);
    }

    #[test]
    fn the_chart_has_a_line_per_path_and_is_well_formed() {
        let mut h = crate::load::new_histogram();
        for v in 1..=1000u64 {
            h.record(v * 1000).unwrap();
        }
        let rows: Vec<_> = ["direct", "relay", "mesh"]
            .iter()
            .map(|name| summarize(name, &h, &h, 0, None))
            .collect();
        let doc = svg(&[
            ("request/response <1 KiB>", &rows),
            ("new connection", &rows),
        ]);
        assert!(doc.starts_with("<svg"));
        assert!(doc.trim_end().ends_with("</svg>"));
        assert_eq!(doc.matches("<polyline").count(), 6);
        assert!(doc.contains("&lt;1 KiB&gt;"));
        assert!(!doc.contains("NaN") && !doc.contains("inf"));
        assert_eq!(duration_label(100.0), "100 µs");
        assert_eq!(duration_label(10_000.0), "10 ms");
    }
}
