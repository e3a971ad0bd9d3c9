//! The routes page's picture: recent request sizes in log-scaled bins (two per doubling), with
//! the route's limits drawn as labelled vertical lines on the same axis. [`bins`] is pure and
//! shared with the JSON API; [`svg`] draws the inline SVG (no script, no external file).

use std::fmt::Write;

use serde::Serialize;

use super::html::escape;
use crate::config::units::human_bytes;

/// Bins per doubling of size: √2 wide, fine enough to tell 100 KB from 140 KB.
pub const BINS_PER_DOUBLING: u32 = 2;

/// One bin: sizes in `from..to` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Bin {
    /// Smallest size in the bin, in bytes.
    pub from: u64,
    /// First size past the bin, in bytes.
    pub to: u64,
    /// Recent requests with a body size in the bin.
    pub count: u64,
}

/// A limit drawn on the histogram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    /// What the limit is, shown beside the line (`upstream_limit`, `max_body`, `learned`).
    pub name: &'static str,
    /// The limit in bytes.
    pub bytes: u64,
}

/// The axis: from `2^lo` to `2^hi` bytes, in half-powers of two.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Axis {
    lo: u32,
    hi: u32,
}

impl Axis {
    /// An axis covering every sample and every line, at least 64 B to 4 KiB wide.
    fn covering(samples: &[u64], lines: &[Line]) -> Axis {
        let values = samples.iter().chain(lines.iter().map(|l| &l.bytes));
        let (min, max) = values
            .filter(|&&v| v > 0)
            .fold((u64::MAX, 0), |(lo, hi), &v| (lo.min(v), hi.max(v)));
        if max == 0 {
            return Axis { lo: 6, hi: 12 };
        }
        let lo = min.ilog2();
        // One step above the largest value, so a line at a power of two is not on the edge.
        let hi = (max.ilog2() + 1).max(lo + 6).min(63);
        Axis { lo, hi }
    }

    fn bins(&self) -> u32 {
        (self.hi - self.lo) * BINS_PER_DOUBLING
    }

    /// The lower edge of bin `i`, in bytes.
    fn edge(&self, i: u32) -> u64 {
        let exp = f64::from(self.lo) + f64::from(i) / f64::from(BINS_PER_DOUBLING);
        exp.exp2().round() as u64
    }

    /// Where `bytes` falls, from 0.0 (left edge) to 1.0 (right edge).
    fn position(&self, bytes: u64) -> f64 {
        let exp = (bytes.max(1) as f64).log2();
        ((exp - f64::from(self.lo)) / f64::from(self.hi - self.lo)).clamp(0.0, 1.0)
    }
}

/// Counts `samples` into log-scaled bins covering them and the `lines` (pure). Empty samples
/// give bins of count 0 (the axis is still drawn for the limits).
pub fn bins(samples: &[u64], lines: &[Line]) -> Vec<Bin> {
    let axis = Axis::covering(samples, lines);
    let mut bins: Vec<Bin> = (0..axis.bins())
        .map(|i| Bin {
            from: axis.edge(i),
            to: axis.edge(i + 1),
            count: 0,
        })
        .collect();
    for &size in samples {
        // The last bin whose lower edge is at or below the size (zero goes to the first).
        let index = bins.partition_point(|b| b.from <= size).saturating_sub(1);
        if let Some(bin) = bins.get_mut(index) {
            bin.count += 1;
        }
    }
    bins
}

const WIDTH: f64 = 420.0;
const HEIGHT: f64 = 150.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 20.0;
const LEFT: f64 = 8.0;
const RIGHT: f64 = 8.0;

/// The histogram as an inline SVG element with a title and a text description, `id` making its
/// element ids unique on the page.
pub fn svg(id: &str, route: &str, samples: &[u64], lines: &[Line]) -> String {
    let axis = Axis::covering(samples, lines);
    let bins = bins(samples, lines);
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let x = |bytes: u64| LEFT + axis.position(bytes) * plot_w;
    let tallest = bins.iter().map(|b| b.count).max().unwrap_or(0).max(1);
    let mut out = String::with_capacity(4096);
    let _ = write!(
        out,
        r#"<svg class="histogram" id="{id}" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" role="img" aria-labelledby="{id}-title {id}-desc"><title id="{id}-title">Recent request sizes of route {route}</title><desc id="{id}-desc">{desc}</desc>"#,
        route = escape(route),
        desc = escape(&describe(samples, lines)),
    );
    let _ = write!(
        out,
        r#"<line class="axis" x1="{LEFT}" y1="{base}" x2="{right}" y2="{base}"/>"#,
        base = TOP + plot_h,
        right = WIDTH - RIGHT,
    );
    let step = plot_w / f64::from(axis.bins());
    for (i, bin) in bins.iter().enumerate() {
        if bin.count == 0 {
            continue;
        }
        let h = (bin.count as f64 / tallest as f64 * plot_h).max(1.0);
        let _ = write!(
            out,
            r#"<rect class="bar" x="{x:.1}" y="{y:.1}" width="{w:.1}" height="{h:.1}"><title>{count} between {from} and {to}</title></rect>"#,
            x = LEFT + i as f64 * step + 0.5,
            y = TOP + plot_h - h,
            w = (step - 1.0).max(1.0),
            count = bin.count,
            from = human_bytes(bin.from),
            to = human_bytes(bin.to),
        );
    }
    // A tick label every second doubling keeps the labels apart.
    let mut exp = axis.lo + axis.lo % 2;
    while exp <= axis.hi {
        let _ = write!(
            out,
            r#"<text class="tick" x="{x:.1}" y="{y}" text-anchor="middle">{label}</text>"#,
            x = x(1u64 << exp).clamp(LEFT + 16.0, WIDTH - RIGHT - 16.0),
            y = HEIGHT - 6.0,
            label = human_bytes(1u64 << exp),
        );
        exp += 2;
    }
    for (row, line) in lines.iter().enumerate() {
        let lx = x(line.bytes);
        let anchor = if lx > WIDTH * 0.6 { "end" } else { "start" };
        let nudge = if anchor == "end" { -3.0 } else { 3.0 };
        let _ = write!(
            out,
            r#"<line class="limit limit-{name}" x1="{lx:.1}" y1="{y1}" x2="{lx:.1}" y2="{y2}"/><text class="limit-label" x="{tx:.1}" y="{ty}" text-anchor="{anchor}">{name} {size}</text>"#,
            name = line.name,
            y1 = 2.0 + 12.0 * row as f64,
            y2 = TOP + plot_h,
            tx = lx + nudge,
            ty = 11.0 + 12.0 * row as f64,
            size = human_bytes(line.bytes),
        );
    }
    if samples.is_empty() {
        let _ = write!(
            out,
            r#"<text class="empty" x="{cx}" y="{cy}" text-anchor="middle">no requests yet</text>"#,
            cx = WIDTH / 2.0,
            cy = TOP + plot_h / 2.0,
        );
    }
    out.push_str("</svg>");
    out
}

/// The text alternative of the picture.
fn describe(samples: &[u64], lines: &[Line]) -> String {
    let mut text = if samples.is_empty() {
        "No recent requests.".to_string()
    } else {
        let mut sorted = samples.to_vec();
        sorted.sort_unstable();
        let median = sorted[sorted.len() / 2];
        let largest = sorted[sorted.len() - 1];
        format!(
            "{} recent requests, median {}, largest {}.",
            sorted.len(),
            human_bytes(median),
            human_bytes(largest)
        )
    };
    for line in lines {
        let over = samples.iter().filter(|&&s| s > line.bytes).count();
        let _ = write!(
            text,
            " {} {}: {over} over it.",
            line.name,
            human_bytes(line.bytes)
        );
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(name: &'static str, bytes: u64) -> Line {
        Line { name, bytes }
    }

    #[test]
    fn bins_are_log_scaled_and_count_every_sample() {
        let samples = [1000, 1100, 3000, 100_000, 0];
        let b = bins(&samples, &[line("max_body", 1 << 20)]);
        // From 512 B (2^9) to 2 MiB (2^21), two bins per doubling.
        assert_eq!(b.len(), 24);
        assert_eq!(b[0].from, 512);
        assert_eq!(b.last().map(|b| b.to), Some(2 << 20));
        assert_eq!(b.iter().map(|b| b.count).sum::<u64>(), samples.len() as u64);
        for pair in b.windows(2) {
            assert_eq!(pair[0].to, pair[1].from);
            let ratio = pair[0].to as f64 / pair[0].from as f64;
            assert!((ratio - 2f64.sqrt()).abs() < 0.01, "{pair:?}");
        }
        // 1000 and 1100 share the 724..1024 and 1024..1448 bins.
        let bin_of = |size: u64| b.iter().position(|x| x.from <= size && size < x.to);
        assert_ne!(bin_of(1000), bin_of(1100));
        assert_eq!(bin_of(1100), bin_of(1400));
    }

    #[test]
    fn empty_samples_still_have_an_axis() {
        let b = bins(&[], &[]);
        assert_eq!(b.len(), 12);
        assert!(b.iter().all(|b| b.count == 0));
    }

    #[test]
    fn svg_draws_bars_lines_and_labels() {
        let svg = svg(
            "h-a",
            "a<b",
            &[2000, 2100, 90_000],
            &[line("upstream_limit", 100_000), line("max_body", 1 << 20)],
        );
        assert!(svg.starts_with("<svg "));
        assert_eq!(svg.matches("<rect class=\"bar\"").count(), 3);
        assert!(svg.contains(">upstream_limit 97.7 KiB</text>"));
        assert!(svg.contains(">max_body 1 MiB</text>"));
        assert!(svg.contains("route a&lt;b"));
        assert!(svg.contains("3 recent requests, median 2.1 KiB, largest 87.9 KiB."));
        assert!(svg.contains("upstream_limit 97.7 KiB: 0 over it."));
        assert!(!svg.contains("no requests yet"));
        assert!(super::svg("e", "e", &[], &[]).contains("no requests yet"));
    }
}
