"""`just bench-ddp`: all-reduce throughput of overfill's c10d shim against torch.distributed
(Gloo, 2 processes on loopback, the same f32 tensor sizes), printed as a ratio per size.

Both sides follow one protocol (pipeline/src/dist/bench.rs has the overfill side): per size, one
checked all-reduce of ones, the tensor zeroed, `--warmup` untimed all-reduces, then per sample a
barrier and the same number of timed all-reduces (rank 0's clock). The count per size moves at
least `--mib-per-sample` MiB (and at least `--min-iters` calls), so a 1 MiB sample is hundreds of
calls, not five. The two implementations run alternately, `--repeats` times each (the first one
alternating too), so a load that comes and goes hits both alike; the table shows the median
seconds per call of each and their spread, and the ratio of the medians (the goal), and the
median CPU time per call of rank 0's process (all its threads), which shows per-call overhead
even on a busy machine.

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


def torch_rank(rank, world, port, sizes, iters, warmup, samples, queue):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    for mib, n in zip(sizes, iters):
        t = torch.ones(round(mib * (1 << 18)), dtype=torch.float32)
        dist.all_reduce(t)
        if t[0].item() != world or t[-1].item() != world:
            raise SystemExit(f"all-reduce of {mib} MiB gave {t[0].item()}, expected {world}")
        t.zero_()
        for _ in range(warmup):
            dist.all_reduce(t)
        for sample in range(samples):
            dist.barrier()
            start, cpu_start = time.perf_counter(), time.process_time()
            for _ in range(n):
                dist.all_reduce(t)
            seconds = (time.perf_counter() - start) / n
            cpu_seconds = (time.process_time() - cpu_start) / n
            if rank == 0:
                queue.put({"impl": "torch", "mib": mib, "sample": sample, "iters": n, "seconds": seconds, "cpu_seconds": cpu_seconds})
    dist.destroy_process_group()


def run_torch(world, sizes, iters, warmup, samples):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=torch_rank, args=(r, world, port, sizes, iters, warmup, samples, queue)) for r in range(world)]
    for p in procs:
        p.start()
    rows = [queue.get() for _ in range(len(sizes) * samples)]
    for p in procs:
        p.join()
        if p.exitcode != 0:
            sys.exit(f"torch.distributed rank exited with {p.exitcode}")
    return rows


def run_overfill(binary, world, sizes, iters, warmup, samples):
    cmd = [binary, "launch", "--nproc-per-node", str(world), "--", "debug-allreduce",
           "--sizes-mib", ",".join(map(str, sizes)), "--iters", ",".join(map(str, iters)),
           "--warmup", str(warmup), "--samples", str(samples)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    rows = []
    for line in out.splitlines():
        line = line.split("] ", 1)[-1]
        if line.startswith("{"):
            rows.append(json.loads(line))
    if len(rows) != len(sizes) * samples:
        sys.exit(f"overfill debug-allreduce printed {len(rows)} samples, expected {len(sizes) * samples}:\n{out}")
    return rows


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
    ap.add_argument("--samples", type=int, default=1, help="timed samples per size in each run")
    ap.add_argument("--repeats", type=int, default=6, help="runs of each implementation, alternating (each goes first half the time)")
    ap.add_argument("--json", help="also write every sample here")
    args = ap.parse_args()
    sizes = [float(s) for s in args.sizes_mib.split(",")]
    iters = [min(args.max_iters, max(args.min_iters, math.ceil(args.mib_per_sample / mib))) for mib in sizes]
    runners = {
        "overfill": lambda: run_overfill(args.overfill, args.world, sizes, iters, args.warmup, args.samples),
        "torch": lambda: run_torch(args.world, sizes, iters, args.warmup, args.samples),
    }
    print(f"{load()} at start", flush=True)
    samples = {name: {mib: [] for mib in sizes} for name in runners}
    cpu = {name: {mib: [] for mib in sizes} for name in runners}
    for repeat in range(args.repeats):
        order = ["overfill", "torch"] if repeat % 2 == 0 else ["torch", "overfill"]
        for name in order:
            for row in runners[name]():
                samples[name][row["mib"]].append(row["seconds"])
                cpu[name][row["mib"]].append(row["cpu_seconds"])
        print(f"repeat {repeat + 1}/{args.repeats} done ({load()})", file=sys.stderr, flush=True)
    print(f"all-reduce (sum, f32), Gloo, {args.world} processes on loopback; per size {args.warmup} warm-up calls, "
          f"then {args.repeats} runs × {args.samples} samples of each implementation (alternating), "
          f"each sample a barrier and the same number of timed calls")
    print(f"{'MiB':>7} {'calls':>6} {'overfill ms (min-max)':>24} {'torch ms (min-max)':>24} {'overfill GiB/s':>15} {'ratio':>7} {'CPU ms/call overfill, torch':>28}")
    ratios = []
    for mib, n in zip(sizes, iters):
        o, t = samples["overfill"][mib], samples["torch"][mib]
        om, tm = statistics.median(o), statistics.median(t)
        ratio = tm / om  # throughput ratio overfill / torch
        ratios.append(ratio)
        ospread = f"{om * 1e3:.3f} ({min(o) * 1e3:.3f}-{max(o) * 1e3:.3f})"
        tspread = f"{tm * 1e3:.3f} ({min(t) * 1e3:.3f}-{max(t) * 1e3:.3f})"
        print(f"{mib:>7g} {n:>6} {ospread:>24} {tspread:>24} {mib / 1024 / om:>15.2f} {ratio:>6.2f}× {statistics.median(cpu['overfill'][mib]) * 1e3:>13.3f}, {statistics.median(cpu['torch'][mib]) * 1e3:.3f}")
    worst = min(ratios)
    print(f"throughput ratio overfill/torch (medians): min {worst:.2f}× (goal ≥ 0.9×){'' if worst >= 0.9 else '  BELOW GOAL'}")
    print(f"{load()} at end")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"sizes_mib": sizes, "iters": iters, "samples": {k: {str(m): v for m, v in d.items()} for k, d in samples.items()},
                       "cpu_samples": {k: {str(m): v for m, v in d.items()} for k, d in cpu.items()}}, f)


if __name__ == "__main__":
    main()
