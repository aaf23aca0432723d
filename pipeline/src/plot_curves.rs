//! `overfill plot-curves`: one scalar (e.g. `eval/loss`) of several training runs as one PNG,
//! read from the runs' TensorBoard event files (the demo's validation curves per seed).
//!
//! A run folder may hold several event files (a resumed run opens a new one); a step logged
//! twice keeps the value written last (by the events' wall time), as TensorBoard shows a resumed
//! run (the resumed writer's SessionLog START purges the steps after the checkpoint).
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use plotters::prelude::*;
use serde_json::json;
use tboard::tensorboard::{event::What, summary::value::Value as SummaryValue};

use crate::bench_latency::plots::{draw_legend, page, plot_err, register_font};

#[derive(clap::Args)]
pub struct Args {
    /// Runs to plot, each NAME=RUN_FOLDER (the folder holding events.out.tfevents.* files).
    #[arg(required = true, value_name = "NAME=DIR")]
    pub runs: Vec<String>,
    /// The scalar's tag.
    #[arg(long, default_value = "eval/loss")]
    pub tag: String,
    /// The PNG to write.
    #[arg(long, value_name = "PNG")]
    pub out: PathBuf,
    /// The figure's title (default: the tag).
    #[arg(long)]
    pub title: Option<String>,
    /// Also print the plotted points as one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
}

/// One run's points: step -> value.
struct Curve {
    name: String,
    points: BTreeMap<u64, f64>,
}

pub fn run(args: Args) -> Result<()> {
    let curves = args
        .runs
        .iter()
        .map(|spec| {
            let (name, dir) = spec
                .split_once('=')
                .ok_or_else(|| anyhow!("run {spec:?} is not NAME=RUN_FOLDER"))?;
            let points = read_scalar(Path::new(dir), &args.tag)?;
            Ok(Curve { name: name.to_string(), points })
        })
        .collect::<Result<Vec<_>>>()?;
    draw(&args.out, &curves, args.title.as_deref().unwrap_or(&args.tag), &args.tag)?;
    eprintln!("plot-curves: {} runs of {} in {}", curves.len(), args.tag, args.out.display());
    if args.json {
        let runs: serde_json::Map<String, serde_json::Value> =
            curves.iter().map(|c| (c.name.clone(), json!(c.points.iter().collect::<Vec<_>>()))).collect();
        println!("{}", json!({ "tag": args.tag, "runs": runs }));
    }
    Ok(())
}

/// Every value of `tag` in the event files of `dir`.
fn read_scalar(dir: &Path, tag: &str) -> Result<BTreeMap<u64, f64>> {
    let files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading run folder {}", dir.display()))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("events.out.tfevents.")))
        .collect();
    if files.is_empty() {
        bail!("{} has no TensorBoard event files (events.out.tfevents.*)", dir.display());
    }
    // step -> (wall time, value)
    let mut points: BTreeMap<u64, (f64, f64)> = BTreeMap::new();
    for path in &files {
        let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        for event in tboard::SummaryReader::new(std::io::BufReader::new(file)) {
            let event = event.map_err(|e| anyhow!("reading {}: {e}", path.display()))?;
            let Some(What::Summary(summary)) = event.what else { continue };
            for value in summary.value.iter().filter(|v| v.tag == tag) {
                if let Some(SummaryValue::SimpleValue(v)) = value.value {
                    let point = points.entry(event.step as u64).or_insert((f64::NEG_INFINITY, 0.0));
                    if event.wall_time >= point.0 {
                        *point = (event.wall_time, f64::from(v));
                    }
                }
            }
        }
    }
    if points.is_empty() {
        bail!("{} has no scalar {tag:?}", dir.display());
    }
    Ok(points.into_iter().map(|(step, (_, value))| (step, value)).collect())
}

/// The colour of a run: OverFill runs in greens, Pruned runs in oranges (the bench-latency
/// figures' colours), anything else in blues; darker for each further run of the same kind.
fn colour(name: &str, index_of_kind: usize) -> RGBColor {
    let shade = |(r, g, b): (u8, u8, u8)| {
        let f = 1.0 - 0.22 * index_of_kind.min(3) as f64;
        RGBColor((r as f64 * f) as u8, (g as f64 * f) as u8, (b as f64 * f) as u8)
    };
    if name.starts_with("overfill") {
        shade((44, 160, 44))
    } else if name.starts_with("pruned") {
        shade((255, 127, 14))
    } else {
        shade((31, 119, 180))
    }
}

fn draw(path: &Path, curves: &[Curve], title: &str, tag: &str) -> Result<()> {
    register_font()?;
    let all = || curves.iter().flat_map(|c| c.points.iter());
    let x_max = all().map(|(&s, _)| s).max().unwrap_or(1) as f64;
    let (y_min, y_max) = all().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), (_, &v)| (lo.min(v), hi.max(v)));
    // Headroom above the data for the legend.
    let span = (y_max - y_min).max(1e-6);
    let (root, body) = page(path, &format!("{tag} from the runs' TensorBoard event files"))?;
    let mut chart = ChartBuilder::on(&body)
        .caption(title, ("sans-serif", 20))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..x_max * 1.02, (y_min - 0.05 * span)..(y_max + 0.45 * span))
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .x_desc("optimizer step")
        .y_desc(tag)
        .axis_desc_style(("sans-serif", 18))
        .label_style(("sans-serif", 15))
        .light_line_style(WHITE.mix(0.0))
        .draw()
        .map_err(plot_err)?;
    let mut seen_of_kind: BTreeMap<String, usize> = BTreeMap::new();
    for curve in curves {
        let kind: String = curve.name.chars().take_while(|c| c.is_ascii_alphabetic()).collect();
        let index = seen_of_kind.entry(kind).or_insert(0);
        let color = colour(&curve.name, *index);
        *index += 1;
        let points: Vec<(f64, f64)> = curve.points.iter().map(|(&s, &v)| (s as f64, v)).collect();
        chart
            .draw_series(LineSeries::new(points.iter().copied(), color.stroke_width(2)))
            .map_err(plot_err)?
            .label(&curve.name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(3)));
        chart
            .draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled())))
            .map_err(plot_err)?;
    }
    draw_legend(&mut chart, 15)?;
    root.present().map_err(plot_err)
}
