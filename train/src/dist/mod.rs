//! Data-parallel runtime over libtorch's own c10d (issue 9): rendezvous from the standard
//! environment (torchrun's `RANK`/`WORLD_SIZE`/`LOCAL_RANK`/`MASTER_ADDR`/`MASTER_PORT`, or SLURM's
//! `SLURM_PROCID`/`SLURM_NTASKS`/`SLURM_LOCALID`), a TCPStore, and ProcessGroupGloo (CPU) or
//! ProcessGroupNCCL (CUDA) through the C++ shim in `shim.cpp`.
//!
//! Faults: every collective runs under the group's timeout, and a failed one is reported with a
//! diagnosis of the other ranks read from the rendezvous store (which rank is gone or behind), so
//! a dead or hung peer ends this rank with an error naming it instead of a silent hang.
//!
//! Gradients are all-reduced after the last micro-batch's backward, in buckets, not overlapped
//! with backward. What overlapping would take (torch 2.11's headers under
//! `torch/include/torch/csrc/distributed/c10d/`):
//! - c10d's `Reducer` (`reducer.hpp`, DDP's bucketing and overlap engine) is plain C++ compiled
//!   into `libtorch_cpu.so` and could be driven from the shim: it needs a `c10d::ProcessGroup`
//!   (the shim holds a `Backend`; a `ProcessGroup` wrapping it via `setBackend`), the parameters,
//!   buckets from `compute_bucket_assignment_by_size`, and a comm hook (`register_comm_hook` with a
//!   `CppCommHookInterface` from `comm.hpp` doing a plain SUM: without one the Reducer divides every
//!   bucket by the world size, `div_factor_`, and our loss is already the global token mean). Each
//!   step, `prepare_for_backward` before the last micro-batch's backward arms its post-hooks on the
//!   parameters' AccumulateGrad nodes; buckets are reduced as they fill and `finalize_backward`
//!   (queued on the autograd engine) writes the sums back into `.grad`.
//! - It is not used because it reduces `.grad`: in bf16 the optimizer moves each micro-batch's
//!   gradients into fp32 accumulators (`AdamW::accumulate_micro_batch`), so the Reducer would sum
//!   only the last micro-batch, in bf16; and ZeRO-1 needs a reduce-scatter, which it does not do.
//!   Using it means keeping the accumulation in `.grad` (a change to the training step).
//! - Without the Reducer, per-parameter hooks from the shim (`at::Tensor::register_hook` in
//!   `ATen/core/TensorBody.h`, or a `PostAccumulateGradHook` in `torch/csrc/autograd/function_hook.h`;
//!   tch has no hook API) would need our own readiness tracking and buckets, i.e. re-writing the
//!   Reducer.
pub mod bench;
pub mod stop;
pub mod train;
mod zero;
mod ffi;
mod waiting;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use tch::{Device, Kind, Tensor};


/// Flattened all-reduce buckets (PyTorch DDP's default bucket cap).
pub const DEFAULT_BUCKET_BYTES: usize = 25 << 20;
/// torchrun's default rendezvous port.
pub const DEFAULT_MASTER_PORT: u16 = 29500;

/// Where this process sits in the job, read from the environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DistEnv {
    pub rank: usize,
    pub world_size: usize,
    pub local_rank: usize,
    pub master_addr: String,
    pub master_port: u16,
    /// "torchrun" or "slurm": which variables were read (for messages).
    pub source: &'static str,
}

impl DistEnv {
    /// None when neither torchrun's nor SLURM's variables are set (a plain single process).
    pub fn from_env() -> Result<Option<DistEnv>> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Option<DistEnv>> {
        let number = |name: &str| -> Result<Option<usize>> {
            match get(name) {
                None => Ok(None),
                Some(v) if v.trim().is_empty() => Ok(None),
                Some(v) => v.trim().parse::<usize>().map(Some).map_err(|_| anyhow!("{name}={v:?} is not a non-negative integer")),
            }
        };
        let (rank, world_size, local_rank, source) = if let (Some(rank), Some(world)) = (number("RANK")?, number("WORLD_SIZE")?) {
            (rank, world, number("LOCAL_RANK")?.unwrap_or(rank), "torchrun")
        } else if get("RANK").is_some() || get("WORLD_SIZE").is_some() {
            bail!("RANK and WORLD_SIZE must be set together (torchrun sets both)");
        } else if let (Some(rank), Some(world)) = (number("SLURM_PROCID")?, number("SLURM_NTASKS")?) {
            (rank, world, number("SLURM_LOCALID")?.unwrap_or(0), "slurm")
        } else {
            return Ok(None);
        };
        if world_size == 0 || rank >= world_size {
            bail!("rank {rank} is outside the world size {world_size} ({source} environment)");
        }
        let master_addr = get("MASTER_ADDR").filter(|a| !a.trim().is_empty());
        let master_addr = match master_addr {
            Some(a) => a.trim().to_string(),
            None if world_size == 1 => "127.0.0.1".to_string(),
            None if source == "slurm" => bail!(
                "SLURM job of {world_size} tasks: set MASTER_ADDR (e.g. the first host of `scontrol show hostnames $SLURM_JOB_NODELIST`) and MASTER_PORT"
            ),
            None => bail!("WORLD_SIZE={world_size} but MASTER_ADDR is not set"),
        };
        let master_port = match get("MASTER_PORT").filter(|p| !p.trim().is_empty()) {
            Some(p) => p.trim().parse::<u16>().map_err(|_| anyhow!("MASTER_PORT={p:?} is not a port number"))?,
            None => DEFAULT_MASTER_PORT,
        };
        Ok(Some(DistEnv { rank, world_size, local_rank, master_addr, master_port, source }))
    }
}

/// This process's view of the job: rank, world size and (above world size 1) the process group.
pub struct Dist {
    rank: usize,
    world_size: usize,
    group: Option<Arc<ffi::Group>>,
    bucket_bytes: usize,
    timeout: Duration,
    /// Where host values travel for a reduction (NCCL reduces CUDA tensors only).
    device: Device,
    /// Collectives issued so far, published to the store by the heartbeat thread (a store write
    /// per collective would cost milliseconds each) for fault diagnosis.
    calls: Arc<AtomicU64>,
    heartbeat: Option<Heartbeat>,
    host: String,
}

/// Publishes this rank's collective count to the store every `HEARTBEAT` while it changes (each
/// store write is a round trip to rank 0's store thread; once a second costs nothing measurable).
struct Heartbeat {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

const HEARTBEAT: Duration = Duration::from_secs(1);

impl Heartbeat {
    fn start(group: Arc<ffi::Group>, rank: usize, calls: Arc<AtomicU64>) -> Heartbeat {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut published = 0;
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(HEARTBEAT);
                    let now = calls.load(Ordering::Relaxed);
                    // Errors surface in the main thread's next collective; nothing to do here.
                    if now != published && group.store_set(&format!("calls/{rank}"), now.to_string().as_bytes()).is_ok() {
                        published = now;
                    }
                }
            })
        };
        Heartbeat { stop, thread: Some(thread) }
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// What a rank waiting in the rendezvous says every 10 s (twice within a shorter timeout): who it
/// waits for, where, and how long until it gives up.
fn rendezvous_notice(env: &DistEnv, timeout: Duration) -> waiting::WaitNotice {
    let (rank, world_size, at) = (env.rank, env.world_size, format!("{}:{}", env.master_addr, env.master_port));
    waiting::WaitNotice::start(Duration::from_secs(10).min(timeout / 2).max(Duration::from_secs(1)), move |waited| {
        let whom = if rank == 0 {
            format!("the other {} of {world_size} ranks to join the store it hosts at {at}", world_size - 1)
        } else {
            format!("rank 0's store at {at} and the other ranks of {world_size}")
        };
        format!(
            "rank {rank} of {world_size}: waiting for {whom} ({:.0} s so far; gives up after {:.0} s)",
            waited.as_secs_f64(),
            timeout.as_secs_f64()
        )
    })
}

impl Dist {
    /// One process, no communication: every collective is the identity.
    pub fn single() -> Dist {
        Dist { rank: 0, world_size: 1, group: None, bucket_bytes: DEFAULT_BUCKET_BYTES, timeout: Duration::ZERO, device: Device::Cpu, calls: Arc::default(), heartbeat: None, host: host_name() }
    }

    /// Joins the job the environment describes (world size 1 when it describes none), with the
    /// backend that fits `device` (NCCL on CUDA, Gloo on CPU) and `timeout` on every collective.
    pub fn from_env(device: Device, timeout: Duration) -> Result<Dist> {
        match DistEnv::from_env()? {
            None => Ok(Dist::single()),
            Some(env) => Dist::join(&env, device, timeout),
        }
    }

    pub fn join(env: &DistEnv, device: Device, timeout: Duration) -> Result<Dist> {
        if env.world_size == 1 && !matches!(device, Device::Cuda(_)) {
            return Ok(Dist::single());
        }
        let (backend, device_index) = match device {
            Device::Cuda(_) if !ffi::has_nccl() => bail!(
                "rank {} of {}: data parallelism on CUDA needs NCCL, and this overfill was built without NCCL \
                 (the NCCL/CUDA header wheels were missing at build time: run scripts/setup.sh and rebuild)",
                env.rank,
                env.world_size
            ),
            Device::Cuda(i) => ("nccl", i),
            _ => ("gloo", 0),
        };
        let waiting = rendezvous_notice(env, timeout);
        let group = ffi::Group::new(backend, &env.master_addr, env.master_port, env.rank, env.world_size, timeout, device_index)
            .with_context(|| {
                format!(
                    "rank {} of {}: joining the {backend} process group at {}:{} (timeout {:?}, {} environment)",
                    env.rank, env.world_size, env.master_addr, env.master_port, timeout, env.source
                )
            })?;
        let mut dist = Dist {
            rank: env.rank,
            world_size: env.world_size,
            group: Some(Arc::new(group)),
            bucket_bytes: DEFAULT_BUCKET_BYTES,
            timeout,
            device: match device {
                Device::Cuda(_) => device,
                _ => Device::Cpu,
            },
            calls: Arc::default(),
            heartbeat: None,
            host: host_name(),
        };
        if let Some(group) = &dist.group {
            let who = format!("{} {}", dist.host, std::process::id());
            group.store_set(&format!("pid/{}", dist.rank), who.as_bytes()).map_err(|e| dist.failure("publishing this rank's pid", e))?;
            group.store_set(&format!("calls/{}", dist.rank), b"0").map_err(|e| dist.failure("publishing progress", e))?;
        }
        dist.barrier()?;
        drop(waiting);
        if let Some(group) = &dist.group {
            dist.heartbeat = Some(Heartbeat::start(group.clone(), dist.rank, dist.calls.clone()));
        }
        Ok(dist)
    }

    pub fn rank(&self) -> usize {
        self.rank
    }
    pub fn world_size(&self) -> usize {
        self.world_size
    }
    pub fn is_main(&self) -> bool {
        self.rank == 0
    }

    /// Sums each tensor over ranks, in place (bucketed: same-dtype tensors flattened into buckets of
    /// at most the bucket cap, one collective per bucket).
    pub fn all_reduce_sum(&self, tensors: &[Tensor]) -> Result<()> {
        self.collective("all-reduce", |g| g.all_reduce_sum(tensors, self.bucket_bytes))
    }

    /// Sums host-side numbers over ranks (in f64).
    pub fn all_reduce_f64(&self, values: &mut [f64]) -> Result<()> {
        if self.group.is_none() || values.is_empty() {
            return Ok(());
        }
        let t = Tensor::from_slice(values).to_kind(Kind::Double).to_device(self.device);
        self.all_reduce_sum(std::slice::from_ref(&t))?;
        let summed: Vec<f64> = Vec::try_from(&t.to_device(Device::Cpu)).context("reading back the all-reduced values")?;
        values.copy_from_slice(&summed);
        Ok(())
    }

    /// Copies rank `root`'s tensors into every rank's, in place.
    pub fn broadcast(&self, tensors: &[Tensor], root: usize) -> Result<()> {
        if root >= self.world_size {
            bail!("broadcast from rank {root} in a world of {}", self.world_size);
        }
        self.collective("broadcast", |g| g.broadcast(tensors, root))
    }

    /// `output` (n elements) = Σ over ranks of this rank's slice `input[rank·n..(rank+1)·n]`.
    pub fn reduce_scatter_sum(&self, output: &Tensor, input: &Tensor) -> Result<()> {
        if self.group.is_none() {
            tch::no_grad(|| output.view([-1]).copy_(&input.view([-1])));
            return Ok(());
        }
        self.collective("reduce-scatter", |g| g.reduce_scatter_sum(output, input))
    }

    /// `output` (world_size·n elements) = every rank's `input` (n elements) in rank order.
    pub fn all_gather(&self, output: &Tensor, input: &Tensor) -> Result<()> {
        if self.group.is_none() {
            tch::no_grad(|| output.view([-1]).copy_(&input.view([-1])));
            return Ok(());
        }
        self.collective("all-gather", |g| g.all_gather(output, input))
    }

    pub fn barrier(&self) -> Result<()> {
        self.collective("barrier", |g| g.barrier())
    }

    fn collective(&self, what: &str, run: impl FnOnce(&ffi::Group) -> Result<()>) -> Result<()> {
        let Some(group) = &self.group else { return Ok(()) };
        self.calls.fetch_add(1, Ordering::Relaxed);
        run(group).map_err(|e| self.failure(what, e))
    }

    /// The error of a failed collective, with what the store says about the other ranks.
    fn failure(&self, what: &str, error: anyhow::Error) -> anyhow::Error {
        let diagnosis = self.diagnose();
        anyhow!(
            "rank {} of {}: {what} failed (collective timeout {} s): {error:#}{diagnosis}",
            self.rank,
            self.world_size,
            self.timeout.as_secs_f64()
        )
    }

    /// Which peers are gone (exited, on this host) or behind (fewer collectives issued: hung or
    /// dead elsewhere); rank 0 is named when the store it hosts no longer answers.
    fn diagnose(&self) -> String {
        let Some(group) = &self.group else { return String::new() };
        // Let live peers' heartbeats publish their latest counts before comparing.
        std::thread::sleep(2 * HEARTBEAT);
        let mine = self.calls.load(Ordering::Relaxed);
        let mut gone = Vec::new();
        let mut behind = Vec::new();
        for peer in (0..self.world_size).filter(|&r| r != self.rank) {
            let pid = match group.store_get(&format!("pid/{peer}")) {
                Ok(v) => v,
                Err(_) => {
                    return format!(
                        "\n  the rendezvous store hosted by rank 0 no longer answers: rank 0 has died or is unreachable"
                    )
                }
            };
            if let Some(pid) = pid.map(|v| String::from_utf8_lossy(&v).into_owned()) {
                if let Some((host, pid)) = pid.rsplit_once(' ') {
                    if host == self.host && !process_alive(pid) {
                        gone.push(format!("rank {peer} (pid {pid}) has exited"));
                        continue;
                    }
                }
            }
            let calls = group
                .store_get(&format!("calls/{peer}"))
                .ok()
                .flatten()
                .and_then(|v| String::from_utf8_lossy(&v).parse::<u64>().ok());
            if let Some(calls) = calls {
                if calls < mine {
                    behind.push(format!("rank {peer} is behind (collective {calls}, this rank at {mine}): hung, or dead on another host"));
                }
            }
        }
        if gone.is_empty() && behind.is_empty() {
            return String::new();
        }
        format!("\n  {}", gone.into_iter().chain(behind).collect::<Vec<_>>().join("\n  "))
    }
}

/// Whether a process of this host is still running (a zombie, exited but not yet reaped by its
/// launcher, counts as gone).
fn process_alive(pid: &str) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state is the field after the parenthesised command name.
        Ok(stat) => !matches!(stat.rsplit_once(')').map(|(_, rest)| rest.trim_start().chars().next()), Some(Some('Z' | 'X'))),
        Err(_) => false,
    }
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_else(|_| "localhost".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> Result<Option<DistEnv>> {
        let vars: Vec<(String, String)> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        DistEnv::from_lookup(|name| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()))
    }

    #[test]
    fn torchrun_then_slurm_variables_then_single_process() {
        assert_eq!(env(&[]).unwrap(), None);
        let torchrun = env(&[("RANK", "3"), ("WORLD_SIZE", "8"), ("LOCAL_RANK", "1"), ("MASTER_ADDR", "node0"), ("MASTER_PORT", "1234")]).unwrap().unwrap();
        assert_eq!((torchrun.rank, torchrun.world_size, torchrun.local_rank, torchrun.master_addr.as_str(), torchrun.master_port), (3, 8, 1, "node0", 1234));
        assert_eq!(torchrun.source, "torchrun");
        // torchrun's variables win over SLURM's (torchrun inside an allocation).
        let both = env(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "a"), ("SLURM_PROCID", "5"), ("SLURM_NTASKS", "16")]).unwrap().unwrap();
        assert_eq!((both.rank, both.world_size, both.master_port), (0, 2, DEFAULT_MASTER_PORT));
        let slurm = env(&[("SLURM_PROCID", "5"), ("SLURM_NTASKS", "16"), ("SLURM_LOCALID", "1"), ("MASTER_ADDR", "n0"), ("MASTER_PORT", "29600")]).unwrap().unwrap();
        assert_eq!((slurm.rank, slurm.world_size, slurm.local_rank, slurm.source), (5, 16, 1, "slurm"));
        // One SLURM task needs no rendezvous address.
        let one = env(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "1")]).unwrap().unwrap();
        assert_eq!((one.world_size, one.master_addr.as_str()), (1, "127.0.0.1"));
    }

    #[test]
    fn inconsistent_environments_are_errors_naming_the_variable() {
        let err = |vars: &[(&str, &str)]| format!("{:#}", env(vars).unwrap_err());
        assert!(err(&[("RANK", "0")]).contains("RANK and WORLD_SIZE"));
        assert!(err(&[("RANK", "2"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "a")]).contains("rank 2 is outside the world size 2"));
        assert!(err(&[("RANK", "x"), ("WORLD_SIZE", "2")]).contains("RANK=\"x\""));
        assert!(err(&[("RANK", "0"), ("WORLD_SIZE", "2")]).contains("MASTER_ADDR"));
        assert!(err(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "4")]).contains("set MASTER_ADDR"));
        assert!(err(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "a"), ("MASTER_PORT", "99999")]).contains("MASTER_PORT"));
    }

    #[test]
    fn world_size_one_reduces_to_identities() {
        let dist = Dist::single();
        let t = Tensor::from_slice(&[1.0f32, 2.0]);
        dist.all_reduce_sum(std::slice::from_ref(&t)).unwrap();
        let mut v = [3.0];
        dist.all_reduce_f64(&mut v).unwrap();
        assert_eq!((Vec::<f32>::try_from(&t).unwrap(), v[0]), (vec![1.0, 2.0], 3.0));
    }
}
