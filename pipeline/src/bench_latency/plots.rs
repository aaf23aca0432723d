//! The PNG figures of `overfill bench-latency`, styled after the paper's Figures 3–5: one
//! colour per system (full, pruned, overfill, then any speculative-kK), means with ±1 std error
//! bars, prefill and decode stacked in the prompt-length figure. The font is embedded (DejaVu Sans), so no system fonts
//! are needed.
use std::path::Path;
use std::sync::Once;

use anyhow::{anyhow, Result};
use plotters::prelude::*;

use super::measure::Row;

const SYSTEMS: [(&str, RGBColor); 3] = [
    ("full", RGBColor(31, 119, 180)),
    ("pruned", RGBColor(255, 127, 14)),
    ("overfill", RGBColor(44, 160, 44)),
];
/// Colours of the speculative systems, in the order they were measured.
const SPECULATIVE_COLORS: [RGBColor; 4] =
    [RGBColor(148, 103, 189), RGBColor(140, 86, 75), RGBColor(227, 119, 194), RGBColor(127, 127, 127)];
const SIZE: (u32, u32) = (960, 600);

/// The systems to draw: the three of the paper, then the speculative ones present in `rows`.
fn systems_of(rows: &[Row]) -> Vec<(String, RGBColor)> {
    let mut systems: Vec<(String, RGBColor)> = SYSTEMS.iter().map(|(n, c)| (n.to_string(), *c)).collect();
    for r in rows {
        if !systems.iter().any(|(n, _)| *n == r.system) {
            let color = SPECULATIVE_COLORS[(systems.len() - SYSTEMS.len()) % SPECULATIVE_COLORS.len()];
            systems.push((r.system.clone(), color));
        }
    }
    systems
}

pub(crate) fn plot_err(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("drawing the figure: {e}")
}

pub(crate) fn register_font() -> Result<()> {
    static REGISTER: Once = Once::new();
    let mut result = Ok(());
    REGISTER.call_once(|| {
        result = plotters::style::register_font(
            "sans-serif",
            FontStyle::Normal,
            dejavu::sans::regular(),
        )
        .map_err(|_| anyhow!("the embedded DejaVu Sans font did not load"));
    });
    result
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;

/// A white page for one figure, the run's subtitle (machine, dtype, threads) in a strip at its
/// top: the whole page (to present) and the area below the strip (for the chart).
pub(crate) fn page<'a>(path: &'a Path, subtitle: &str) -> Result<(Area<'a>, Area<'a>)> {
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let (top, body) = root.split_vertically(30);
    top.draw_text(
        subtitle,
        &("sans-serif", 15).into_font().color(&BLACK.mix(0.7)),
        (70, 10),
    )
    .map_err(plot_err)?;
    Ok((root, body))
}

/// The series' legend in the chart's upper-left corner, over a faint white box.
pub(crate) fn draw_legend<'a, X: Ranged<ValueType = f64>, Y: Ranged<ValueType = f64>>(
    chart: &mut ChartContext<'a, BitMapBackend<'a>, Cartesian2d<X, Y>>,
    font_size: u32,
) -> Result<()> {
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font(("sans-serif", font_size))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(plot_err)
}

pub fn draw_all(out: &Path, rows: &[Row], subtitle: &str) -> Result<()> {
    register_font()?;
    let of = |sweep: &str| {
        rows.iter()
            .filter(|r| r.sweep == sweep)
            .cloned()
            .collect::<Vec<_>>()
    };
    let gen = of("gen");
    if !gen.is_empty() {
        let (b, p) = (gen[0].batch, gen[0].prompt_len);
        lines(
            &out.join("fig3_latency_vs_generation_length.png"),
            &gen,
            |r| r.gen_len,
            &format!("Latency vs generation length (prompt {p}, batch {b})"),
            "generation length (tokens)",
            subtitle,
        )?;
    }
    let prompt = of("prompt");
    if !prompt.is_empty() {
        stacked_bars(
            &out.join("fig4_latency_vs_prompt_length.png"),
            &prompt,
            subtitle,
        )?;
    }
    let batch = of("batch");
    if !batch.is_empty() {
        let (p, g) = (batch[0].prompt_len, batch[0].gen_len);
        lines(
            &out.join("fig5_latency_vs_batch_size.png"),
            &batch,
            |r| r.batch,
            &format!("Latency vs batch size (prompt {p}, generation {g})"),
            "batch size",
            subtitle,
        )?;
    }
    Ok(())
}

/// End-to-end latency (s) of each system against `x`, with ±1 std error bars.
fn lines(
    path: &Path,
    rows: &[Row],
    x: impl Fn(&Row) -> usize,
    title: &str,
    x_desc: &str,
    subtitle: &str,
) -> Result<()> {
    let (root, body) = page(path, subtitle)?;
    let x_max = rows.iter().map(&x).max().unwrap_or(1) as f64;
    let x_min = rows.iter().map(&x).min().unwrap_or(0) as f64;
    // Headroom above the data for the legend.
    let y_max = rows
        .iter()
        .map(|r| r.total.mean + r.total.std)
        .fold(0.0, f64::max)
        * 1.3;
    let pad = (x_max - x_min).max(1.0) * 0.04;
    let mut chart = ChartBuilder::on(&body)
        .caption(title, ("sans-serif", 24))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(70)
        .build_cartesian_2d((x_min - pad)..(x_max + pad), 0.0..y_max.max(1e-6))
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        // Ticks fall between the measured integers too: label whole numbers only.
        .x_label_formatter(&|x: &f64| {
            if (x - x.round()).abs() < 1e-9 {
                format!("{x:.0}")
            } else {
                String::new()
            }
        })
        .y_desc("end-to-end latency (s)")
        .axis_desc_style(("sans-serif", 18))
        .label_style(("sans-serif", 15))
        .light_line_style(WHITE.mix(0.0))
        .draw()
        .map_err(plot_err)?;
    for (name, color) in systems_of(rows) {
        let mut points: Vec<(f64, f64, f64)> = rows
            .iter()
            .filter(|r| r.system == name)
            .map(|r| (x(r) as f64, r.total.mean, r.total.std))
            .collect();
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        chart
            .draw_series(LineSeries::new(
                points.iter().map(|p| (p.0, p.1)),
                color.stroke_width(3),
            ))
            .map_err(plot_err)?
            .label(name.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(3))
            });
        chart
            .draw_series(
                points
                    .iter()
                    .map(|p| Circle::new((p.0, p.1), 5, color.filled())),
            )
            .map_err(plot_err)?;
        let cap = pad * 0.3;
        chart
            .draw_series(points.iter().flat_map(|&(px, m, s)| {
                [
                    PathElement::new(vec![(px, m - s), (px, m + s)], color.stroke_width(2)),
                    PathElement::new(
                        vec![(px - cap, m - s), (px + cap, m - s)],
                        color.stroke_width(2),
                    ),
                    PathElement::new(
                        vec![(px - cap, m + s), (px + cap, m + s)],
                        color.stroke_width(2),
                    ),
                ]
            }))
            .map_err(plot_err)?;
    }
    draw_legend(&mut chart, 17)?;
    root.present().map_err(plot_err)
}

/// Figure 4: per prompt length one bar per system, prefill (light) under decode (solid).
fn stacked_bars(path: &Path, rows: &[Row], subtitle: &str) -> Result<()> {
    let mut lengths: Vec<usize> = rows.iter().map(|r| r.prompt_len).collect();
    lengths.sort_unstable();
    lengths.dedup();
    let (batch, gen) = (rows[0].batch, rows[0].gen_len);
    let (root, body) = page(path, subtitle)?;
    // Headroom above the bars for the legend (two columns of three).
    let y_max = rows
        .iter()
        .map(|r| r.total.mean + r.total.std)
        .fold(0.0, f64::max)
        * 1.5;
    let n = lengths.len() as f64;
    let labels = lengths.clone();
    let mut chart = ChartBuilder::on(&body)
        .caption(
            format!("Prefill + decode latency vs prompt length (generation {gen}, batch {batch})"),
            ("sans-serif", 24),
        )
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(70)
        .build_cartesian_2d(-0.5..(n - 0.5), 0.0..y_max.max(1e-6))
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .x_desc("prompt length (tokens)")
        .y_desc("latency (s)")
        .x_labels(lengths.len())
        .x_label_formatter(&|x: &f64| {
            let i = x.round();
            if (x - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < labels.len() {
                labels[i as usize].to_string()
            } else {
                String::new()
            }
        })
        .disable_x_mesh()
        .light_line_style(WHITE.mix(0.0))
        .axis_desc_style(("sans-serif", 18))
        .label_style(("sans-serif", 15))
        .draw()
        .map_err(plot_err)?;
    // Bars of all systems share 0.84 of each prompt length's slot (0.26 wide each for three).
    let systems = systems_of(rows);
    let n = systems.len() as f64;
    let width = 0.78 / n;
    for (j, (name, color)) in systems.into_iter().enumerate() {
        let offset = (j as f64 - (n - 1.0) / 2.0) * (width + 0.06 / n);
        let bars: Vec<(f64, f64, f64, f64)> = lengths
            .iter()
            .enumerate()
            .filter_map(|(i, &len)| {
                rows.iter()
                    .find(|r| r.system == name && r.prompt_len == len)
                    .map(|r| {
                        (
                            i as f64 + offset,
                            r.prefill.mean,
                            r.decode.mean,
                            r.total.std,
                        )
                    })
            })
            .collect();
        let light = color.mix(0.45);
        chart
            .draw_series(bars.iter().map(|&(x, p, _, _)| {
                Rectangle::new(
                    [(x - width / 2.0, 0.0), (x + width / 2.0, p)],
                    light.filled(),
                )
            }))
            .map_err(plot_err)?
            .label(format!("{name} prefill"))
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 18, y + 6)], light.filled()));
        chart
            .draw_series(bars.iter().map(|&(x, p, d, _)| {
                Rectangle::new(
                    [(x - width / 2.0, p), (x + width / 2.0, p + d)],
                    color.filled(),
                )
            }))
            .map_err(plot_err)?
            .label(format!("{name} decode"))
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 18, y + 6)], color.filled()));
        chart
            .draw_series(bars.iter().map(|&(x, p, d, s)| {
                PathElement::new(vec![(x, p + d - s), (x, p + d + s)], BLACK.stroke_width(2))
            }))
            .map_err(plot_err)?;
    }
    draw_legend(&mut chart, 16)?;
    root.present().map_err(plot_err)
}
