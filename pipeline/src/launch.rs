//! `overfill launch`: our own single-node launcher (torchrun's job for this binary). It spawns the
//! ranks with torchrun's environment (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`,
//! `GROUP_RANK`, `MASTER_ADDR`, `MASTER_PORT`), prefixes their output with the rank, forwards
//! SIGINT/SIGTERM (the ranks then finish their step, checkpoint and exit 0), and when one rank
//! fails it gives the others a grace period to notice (they exit naming it) and then kills them.
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Ranks (processes) to start on this node (one per GPU on CUDA).
    #[arg(long)]
    pub nproc_per_node: usize,
    /// Nodes in the job (each runs its own `overfill launch`).
    #[arg(long, default_value_t = 1)]
    pub nnodes: usize,
    /// This node's index (0 hosts the rendezvous store on rank 0).
    #[arg(long, default_value_t = 0)]
    pub node_rank: usize,
    /// Address of rank 0's rendezvous store.
    #[arg(long, default_value = "127.0.0.1")]
    pub master_addr: String,
    /// Port of the rendezvous store [default: a free port on a single node, 29500 across nodes].
    #[arg(long)]
    pub master_port: Option<u16>,
    /// Seconds the other ranks get to exit by themselves after one fails, before they are killed.
    #[arg(long, default_value_t = 30)]
    pub grace_period: u64,
    /// The overfill command every rank runs, after `--` (e.g. `-- train --config r.toml`).
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

/// The last SIGINT/SIGTERM the launcher received (0 = none since the last forward).
static PENDING_SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn remember_signal(signal: libc::c_int) {
    PENDING_SIGNAL.store(signal, Ordering::SeqCst);
}

struct Rank {
    rank: usize,
    child: Child,
    status: Option<ExitStatus>,
    printers: Vec<std::thread::JoinHandle<()>>,
}

pub fn run(args: Args) -> Result<()> {
    if args.nproc_per_node == 0 || args.nnodes == 0 {
        bail!("--nproc-per-node and --nnodes must be at least 1");
    }
    if args.node_rank >= args.nnodes {
        bail!("--node-rank {} is outside --nnodes {}", args.node_rank, args.nnodes);
    }
    let master_port = match args.master_port {
        Some(port) => port,
        None if args.nnodes == 1 => free_port()?,
        None => overfill_train::dist::DEFAULT_MASTER_PORT,
    };
    let world_size = args.nnodes * args.nproc_per_node;
    let exe = std::env::current_exe().context("locating the overfill binary")?;

    // SAFETY: the handler only stores into an atomic (async-signal-safe).
    unsafe {
        libc::signal(libc::SIGINT, remember_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, remember_signal as *const () as libc::sighandler_t);
    }

    let mut ranks = Vec::with_capacity(args.nproc_per_node);
    for local_rank in 0..args.nproc_per_node {
        let rank = args.node_rank * args.nproc_per_node + local_rank;
        let mut command = Command::new(&exe);
        command
            .args(&args.command)
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", world_size.to_string())
            .env("LOCAL_RANK", local_rank.to_string())
            .env("LOCAL_WORLD_SIZE", args.nproc_per_node.to_string())
            .env("GROUP_RANK", args.node_rank.to_string())
            .env("MASTER_ADDR", &args.master_addr)
            .env("MASTER_PORT", master_port.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Own process group: a terminal's Ctrl-C reaches the launcher only, which forwards it
            // once to every rank.
            .process_group(0);
        if std::env::var_os("OMP_NUM_THREADS").is_none() && args.nproc_per_node > 1 {
            // torchrun's default: one intra-op thread per rank unless the user says otherwise.
            command.env("OMP_NUM_THREADS", "1");
        }
        // SAFETY: prctl is async-signal-safe; a rank must not outlive a killed launcher.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = command.spawn().with_context(|| format!("starting rank {rank}: {} {}", exe.display(), args.command.join(" ")))?;
        let mut printers = Vec::new();
        if let Some(out) = child.stdout.take() {
            printers.push(prefix_lines(out, rank, false));
        }
        if let Some(err) = child.stderr.take() {
            printers.push(prefix_lines(err, rank, true));
        }
        ranks.push(Rank { rank, child, status: None, printers });
    }
    eprintln!(
        "overfill launch: {} ranks on this node (node {} of {}, world size {world_size}), rendezvous {}:{master_port}",
        args.nproc_per_node, args.node_rank, args.nnodes, args.master_addr
    );

    let mut first_failure: Option<(usize, ExitStatus)> = None;
    let mut kill_at: Option<Instant> = None;
    loop {
        let signal = PENDING_SIGNAL.swap(0, Ordering::SeqCst);
        if signal != 0 {
            eprintln!("overfill launch: forwarding {} to the ranks (they finish their step, save a checkpoint and stop)", signal_name(signal));
            for r in ranks.iter().filter(|r| r.status.is_none()) {
                // SAFETY: plain kill(2) on our own child.
                unsafe { libc::kill(r.child.id() as libc::pid_t, signal) };
            }
        }
        for r in ranks.iter_mut().filter(|r| r.status.is_none()) {
            if let Some(status) = r.child.try_wait().with_context(|| format!("waiting for rank {}", r.rank))? {
                r.status = Some(status);
                if !status.success() && first_failure.is_none() {
                    first_failure = Some((r.rank, status));
                    eprintln!(
                        "overfill launch: rank {} (pid {}) {}; stopping the other ranks (they get {} s to exit)",
                        r.rank,
                        r.child.id(),
                        describe(status),
                        args.grace_period
                    );
                    kill_at = Some(Instant::now() + Duration::from_secs(args.grace_period));
                }
            }
        }
        if ranks.iter().all(|r| r.status.is_some()) {
            break;
        }
        if kill_at.is_some_and(|at| Instant::now() >= at) {
            for r in ranks.iter_mut().filter(|r| r.status.is_none()) {
                eprintln!("overfill launch: rank {} did not exit within the grace period; killing it", r.rank);
                let _ = r.child.kill();
            }
            kill_at = None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    for r in &mut ranks {
        for printer in r.printers.drain(..) {
            let _ = printer.join();
        }
    }
    if let Some((rank, status)) = first_failure {
        let others: Vec<String> = ranks
            .iter()
            .filter(|r| r.rank != rank)
            .map(|r| format!("rank {}: {}", r.rank, r.status.map(describe).unwrap_or_default()))
            .collect();
        bail!("rank {rank} failed first ({}); {}", describe(status), others.join(", "));
    }
    Ok(())
}

/// Copies a rank's output line by line to ours, prefixed `[rankN] `.
fn prefix_lines(stream: impl std::io::Read + Send + 'static, rank: usize, to_stderr: bool) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stream);
        let mut line = Vec::new();
        loop {
            line.clear();
            match reader.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    if !line.ends_with(b"\n") {
                        line.push(b'\n');
                    }
                    let prefix = format!("[rank{rank}] ");
                    // One write per line so lines of different ranks do not interleave.
                    let mut buffer = prefix.into_bytes();
                    buffer.extend_from_slice(&line);
                    let _ = if to_stderr { std::io::stderr().lock().write_all(&buffer) } else { std::io::stdout().lock().write_all(&buffer) };
                }
            }
        }
    })
}

fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(0), _) => "exited successfully".to_string(),
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(signal)) => format!("was killed by {}", signal_name(signal)),
        _ => format!("ended ({status})"),
    }
}

fn signal_name(signal: i32) -> String {
    match signal {
        libc::SIGINT => "SIGINT".into(),
        libc::SIGTERM => "SIGTERM".into(),
        libc::SIGKILL => "SIGKILL".into(),
        libc::SIGSEGV => "SIGSEGV".into(),
        libc::SIGABRT => "SIGABRT".into(),
        libc::SIGBUS => "SIGBUS".into(),
        other => format!("signal {other}"),
    }
}

/// A port nobody listens on now (the ranks' rendezvous store binds it right after).
fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port for the rendezvous")?;
    Ok(listener.local_addr()?.port())
}
