//! `overfill debug-allreduce` (hidden): all-reduce throughput of the c10d shim, run under
//! `overfill launch` (or torchrun). `just bench-ddp` (tests/python/bench_ddp.py) runs it and
//! torch.distributed with the same protocol, alternately, and compares the medians.
//!
//! Protocol per tensor size (the Python reference does exactly the same steps):
//! one checked all-reduce of ones (every element must be the world size), the tensor zeroed (so
//! hundreds of sums cannot overflow), `warmup` untimed all-reduces, then `samples` times: a
//! barrier, `iters` timed all-reduces; rank 0 prints one JSON line per sample with the wall seconds
//! per call and the CPU seconds per call of its whole process (all threads: the caller and Gloo's
//! workers), which a busy machine inflates far less than wall time.
//!
//! `--paced` (what `just bench-ddp` uses): every phase (a size's set-up and warm-up, each sample)
//! waits until rank 0 reads a line on stdin, then a barrier; rank 0 prints a line when the phase is
//! done. The driver thus runs this and torch.distributed one sample at a time, alternately, with
//! only one of them active at a time, so a load that comes and goes hits both alike.
use std::io::{BufRead, Write};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::json;
use tch::{Device, Kind, Tensor};

use super::Dist;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Tensor sizes in MiB (f32; fractions allowed, e.g. 0.0625 for 64 KiB).
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,64,256")]
    pub sizes_mib: Vec<f64>,
    /// Timed all-reduces per sample: one count for every size, or one per size.
    #[arg(long, value_delimiter = ',', default_value = "20")]
    pub iters: Vec<usize>,
    /// Untimed all-reduces per size before the first sample.
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// Timed samples per size.
    #[arg(long, default_value_t = 1)]
    pub samples: usize,
    /// Collective timeout in seconds.
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
    /// Wait for a line on rank 0's stdin before every phase; print a line after it.
    #[arg(long)]
    pub paced: bool,
}

pub fn run(args: Args) -> Result<()> {
    tch::set_num_threads(1);
    let iters: Vec<usize> = match args.iters.len() {
        1 => vec![args.iters[0]; args.sizes_mib.len()],
        n if n == args.sizes_mib.len() => args.iters.clone(),
        n => bail!("--iters has {n} counts for {} sizes: give one count, or one per size", args.sizes_mib.len()),
    };
    if iters.contains(&0) || args.samples == 0 {
        bail!("--iters and --samples must be at least 1");
    }
    let dist = Dist::from_env(Device::Cpu, Duration::from_secs(args.timeout))?;
    let world = dist.world_size() as f64;
    // Before a phase: the go-ahead (paced), then every rank starts together.
    let begin_phase = || -> Result<()> {
        if args.paced && dist.is_main() {
            let mut line = String::new();
            if std::io::stdin().lock().read_line(&mut line).context("reading the go-ahead on stdin")? == 0 {
                bail!("stdin closed before the benchmark ended (--paced waits for a line before each phase)");
            }
        }
        dist.barrier()
    };
    let report = |line: serde_json::Value| -> Result<()> {
        if dist.is_main() {
            let mut out = std::io::stdout().lock();
            writeln!(out, "{line}")?;
            out.flush()?;
        }
        Ok(())
    };
    if args.paced {
        report(json!({"ready": "init"}))?;
    }
    for (&mib, &iters) in args.sizes_mib.iter().zip(&iters) {
        if args.paced {
            begin_phase()?;
        }
        let numel = (mib * (1 << 18) as f64).round() as i64;
        if numel < 1 {
            bail!("--sizes-mib {mib} is less than one f32");
        }
        let mut tensor = Tensor::ones([numel], (Kind::Float, Device::Cpu));
        dist.all_reduce_sum(std::slice::from_ref(&tensor))?;
        for index in [0, numel - 1] {
            let got = tensor.double_value(&[index]);
            if got != world {
                bail!("all-reduce of {mib} MiB gave {got} at element {index}, expected the world size {world}");
            }
        }
        let _ = tensor.zero_();
        for _ in 0..args.warmup {
            dist.all_reduce_sum(std::slice::from_ref(&tensor))?;
        }
        if args.paced {
            dist.barrier()?;
            report(json!({"ready": mib}))?;
        }
        for sample in 0..args.samples {
            begin_phase()?;
            let (started, cpu_started) = (Instant::now(), process_cpu_seconds());
            for _ in 0..iters {
                dist.all_reduce_sum(std::slice::from_ref(&tensor))?;
            }
            let seconds = started.elapsed().as_secs_f64() / iters as f64;
            let cpu_seconds = (process_cpu_seconds() - cpu_started) / iters as f64;
            report(json!({"impl": "overfill", "mib": mib, "world_size": dist.world_size(), "sample": sample, "iters": iters, "seconds": seconds, "cpu_seconds": cpu_seconds}))?;
        }
    }
    Ok(())
}

/// CPU time of this process, all threads (Python's `time.process_time()`).
fn process_cpu_seconds() -> f64 {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the timespec it is given; this clock exists on Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut now) };
    if rc != 0 {
        return f64::NAN;
    }
    now.tv_sec as f64 + now.tv_nsec as f64 * 1e-9
}
