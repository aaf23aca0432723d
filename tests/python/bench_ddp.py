"""`just bench-ddp`: all-reduce throughput of overfill's c10d shim against torch.distributed
(Gloo, 2 processes on loopback, the same f32 tensor sizes), printed as a ratio per size.

Both sides follow one protocol (train/src/dist/bench.rs has the overfill side): per size, one
checked all-reduce of ones, the tensor zeroed, `--warmup` untimed all-reduces, then per sample a
barrier and the same number of timed all-reduces (rank 0's clock). The count per size moves at
least `--mib-per-sample` MiB (and at least `--min-iters` calls), so a 1 MiB sample is hundreds of
calls, not five.

Both jobs (2 overfill ranks, 2 torch.distributed ranks) are started once and paced from here: a
phase (a size's set-up and warm-up, or one sample) runs only when this script says so, and only one
job is active at a time. Samples alternate overfill, torch, torch, overfill, ... so a load that
comes and goes hits both alike; each adjacent pair gives a ratio. The table shows per size the
median seconds per call of each side with its spread, the median of the paired ratios (the goal:
>= 0.9) with their spread, and the median CPU time per call of rank 0's process (all threads),
which shows per-call overhead even on a busy machine.

Run by scripts/bench-ddp.sh.
"""
import argparse
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torch_rank(rank, world, port, sizes, iters, warmup, samples, conn):
    """One torch.distributed rank; rank 0 takes the go-ahead for each phase on `conn` and answers there."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)

    def begin_phase():
        if rank == 0:
            conn.recv()
        dist.barrier()

    def report(row):
        if rank == 0:
            conn.send(row)

    report({"ready": "init"})
    for mib, n in zip(sizes, iters):
        begin_phase()
        t = torch.ones(round(mib * (1 << 18)), dtype=torch.float32)
        dist.all_reduce(t)
        if t[0].item() != world or t[-1].item() != world:
            raise SystemExit(f"all-reduce of {mib} MiB gave {t[0].item()}, expected {world}")
        t.zero_()
        for _ in range(warmup):
            dist.all_reduce(t)
        dist.barrier()
        report({"ready": mib})
        for sample in range(samples):
            begin_phase()
            start, cpu_start = time.perf_counter(), time.process_time()
            for _ in range(n):
                dist.all_reduce(t)
            seconds = (time.perf_counter() - start) / n
            cpu_seconds = (time.process_time() - cpu_start) / n
            report({"impl": "torch", "mib": mib, "sample": sample, "iters": n, "seconds": seconds, "cpu_seconds": cpu_seconds})
    dist.destroy_process_group()


class TorchJob:
    def __init__(self, world, sizes, iters, warmup, samples):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        port = free_port()
        self.procs = [ctx.Process(target=torch_rank, args=(r, world, port, sizes, iters, warmup, samples, child if r == 0 else None))
                      for r in range(world)]
        for p in self.procs:
            p.start()
        child.close()  # a dead rank 0 then ends recv() with EOFError

    def read(self):
        try:
            return self.conn.recv()
        except EOFError:
            sys.exit(f"a torch.distributed rank died (exit codes {[p.exitcode for p in self.procs]})")

    def step(self):
        self.conn.send("go")
        return self.read()

    def finish(self):
        for p in self.procs:
            p.join()
            if p.exitcode != 0:
                sys.exit(f"torch.distributed rank exited with {p.exitcode}")


class OverfillJob:
    """The ranks of `overfill debug-allreduce --paced`, started with torchrun's environment."""

    def __init__(self, binary, world, sizes, iters, warmup, samples):
        port = str(free_port())
        cmd = [binary, "debug-allreduce", "--paced", "--sizes-mib", ",".join(map(str, sizes)),
               "--iters", ",".join(map(str, iters)), "--warmup", str(warmup), "--samples", str(samples)]
        self.procs = []
        for rank in range(world):
            env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
            self.procs.append(subprocess.Popen(cmd, env=env, text=True, stdin=subprocess.PIPE if rank == 0 else subprocess.DEVNULL,
                                               stdout=subprocess.PIPE if rank == 0 else subprocess.DEVNULL))

    def read(self):
        while True:
            line = self.procs[0].stdout.readline()
            if not line:
                codes = [p.poll() for p in self.procs]
                sys.exit(f"overfill debug-allreduce ended early (exit codes {codes})")
            if line.startswith("{"):
                return json.loads(line)

    def step(self):
        self.procs[0].stdin.write("go\n")
        self.procs[0].stdin.flush()
        return self.read()

    def finish(self):
        self.procs[0].stdin.close()
        for p in self.procs:
            if p.wait() != 0:
                sys.exit(f"overfill debug-allreduce rank exited with {p.returncode}")


def load():
    return "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--overfill", required=True, help="the overfill binary")
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--sizes-mib", default="1,4,16,64,256")
    ap.add_argument("--mib-per-sample", type=int, default=512,
                    help="timed all-reduces per sample: enough calls to move this many MiB")
    ap.add_argument("--min-iters", type=int, default=5, help="at least this many timed calls per sample")
    ap.add_argument("--max-iters", type=int, default=5000, help="at most this many (for sizes far below 1 MiB)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed all-reduces per size")
    ap.add_argument("--samples", type=int, default=8, help="timed samples per size of each implementation")
    ap.add_argument("--json", help="also write every sample here")
    args = ap.parse_args()
    sizes = [float(s) for s in args.sizes_mib.split(",")]
    iters = [min(args.max_iters, max(args.min_iters, math.ceil(args.mib_per_sample / mib))) for mib in sizes]
    print(f"{load()} at start", flush=True)
    jobs = {
        "overfill": OverfillJob(args.overfill, args.world, sizes, iters, args.warmup, args.samples),
        "torch": TorchJob(args.world, sizes, iters, args.warmup, args.samples),
    }
    for job in jobs.values():
        job.read()  # joined the process group
    rows = {name: {mib: [] for mib in sizes} for name in jobs}
    for mib in sizes:
        for job in jobs.values():
            job.step()  # set-up and warm-up of this size
        for sample in range(args.samples):
            order = ["overfill", "torch"] if sample % 2 == 0 else ["torch", "overfill"]
            for name in order:
                rows[name][mib].append(jobs[name].step())
        print(f"{mib:g} MiB done ({load()})", file=sys.stderr, flush=True)
    for job in jobs.values():
        job.finish()

    print(f"all-reduce (sum, f32), Gloo, {args.world} processes on loopback; per size {args.warmup} warm-up calls, then "
          f"{args.samples} samples of each implementation, interleaved; a sample = a barrier and the same number of timed calls")
    print(f"{'MiB':>7} {'calls':>6} {'overfill ms (min-max)':>24} {'torch ms (min-max)':>24} {'GiB/s':>6} "
          f"{'ratio (min-max)':>18} {'CPU ms/call overfill, torch':>28}")
    ratios = []
    for mib, n in zip(sizes, iters):
        o = [r["seconds"] for r in rows["overfill"][mib]]
        t = [r["seconds"] for r in rows["torch"][mib]]
        paired = [tt / oo for oo, tt in zip(o, t)]  # throughput ratio overfill / torch of adjacent samples
        ratio = statistics.median(paired)
        ratios.append(ratio)
        om, tm = statistics.median(o), statistics.median(t)
        ocpu = statistics.median(r["cpu_seconds"] for r in rows["overfill"][mib])
        tcpu = statistics.median(r["cpu_seconds"] for r in rows["torch"][mib])
        ospread = f"{om * 1e3:.3f} ({min(o) * 1e3:.3f}-{max(o) * 1e3:.3f})"
        tspread = f"{tm * 1e3:.3f} ({min(t) * 1e3:.3f}-{max(t) * 1e3:.3f})"
        rspread = f"{ratio:.2f}× ({min(paired):.2f}-{max(paired):.2f})"
        print(f"{mib:>7g} {n:>6} {ospread:>24} {tspread:>24} {mib / 1024 / om:>6.2f} {rspread:>18} {ocpu * 1e3:>13.3f}, {tcpu * 1e3:.3f}")
    worst = min(ratios)
    print(f"throughput ratio overfill/torch (median of paired samples): min {worst:.2f}× (goal ≥ 0.9×)"
          f"{'' if worst >= 0.9 else '  BELOW GOAL'}")
    print(f"{load()} at end")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"sizes_mib": sizes, "iters": iters, "samples": {k: {str(m): v for m, v in d.items()} for k, d in rows.items()}}, f)


if __name__ == "__main__":
    main()
