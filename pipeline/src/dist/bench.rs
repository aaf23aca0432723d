//! `overfill debug-allreduce` (hidden): all-reduce throughput of the c10d shim, run under
//! `overfill launch` (or torchrun). Rank 0 prints one JSON line per tensor size; `just bench-ddp`
//! compares them with torch.distributed on the same sizes (`scripts/bench_ddp.py`).
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use serde_json::json;
use tch::{Device, Kind, Tensor};

use super::Dist;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Tensor sizes in MiB (f32).
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,64,256")]
    pub sizes_mib: Vec<usize>,
    /// Timed all-reduces per size (after one warm-up).
    #[arg(long, default_value_t = 5)]
    pub iters: usize,
    /// Collective timeout in seconds.
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
}

pub fn run(args: Args) -> Result<()> {
    tch::set_num_threads(1);
    if args.iters == 0 {
        bail!("--iters must be at least 1");
    }
    let dist = Dist::from_env(Device::Cpu, Duration::from_secs(args.timeout))?;
    for &mib in &args.sizes_mib {
        let numel = (mib << 20) / 4;
        let tensor = Tensor::ones([numel as i64], (Kind::Float, Device::Cpu));
        dist.all_reduce_sum(std::slice::from_ref(&tensor))?;
        dist.barrier()?;
        let started = Instant::now();
        for _ in 0..args.iters {
            dist.all_reduce_sum(std::slice::from_ref(&tensor))?;
        }
        let seconds = started.elapsed().as_secs_f64() / args.iters as f64;
        // ones summed over 1 + iters all-reduces: world^(1 + iters) exactly representable for small worlds.
        let expected = (dist.world_size() as f64).powi(1 + args.iters as i32);
        let got = tensor.double_value(&[0]);
        if (got - expected).abs() > 1e-6 * expected {
            bail!("all-reduce of {mib} MiB gave {got}, expected {expected}");
        }
        if dist.is_main() {
            println!("{}", json!({"impl": "overfill", "mib": mib, "world_size": dist.world_size(), "seconds": seconds, "gib_per_s": mib as f64 / 1024.0 / seconds}));
        }
    }
    Ok(())
}
