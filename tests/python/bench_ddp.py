"""`just bench-ddp`: all-reduce throughput of overfill's c10d shim against torch.distributed
(Gloo, 2 processes on loopback, the same f32 tensor sizes), printed as a ratio per size.

Run by scripts/bench-ddp.sh. Without --overfill it is one torch.distributed rank (started by
torch.multiprocessing here) and prints JSON lines like `overfill debug-allreduce`.
"""
import argparse
import json
import os
import socket
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


def torch_rank(rank, world, port, sizes, iters, queue):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    for mib in sizes:
        t = torch.ones((mib << 20) // 4, dtype=torch.float32)
        dist.all_reduce(t)
        dist.barrier()
        start = time.perf_counter()
        for _ in range(iters):
            dist.all_reduce(t)
        seconds = (time.perf_counter() - start) / iters
        if rank == 0:
            queue.put({"impl": "torch", "mib": mib, "seconds": seconds, "gib_per_s": mib / 1024 / seconds})
    dist.destroy_process_group()


def run_torch(world, sizes, iters):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=torch_rank, args=(r, world, port, sizes, iters, queue)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
        if p.exitcode != 0:
            sys.exit(f"torch.distributed rank exited with {p.exitcode}")
    return {row["mib"]: row for row in (queue.get() for _ in sizes)}


def run_overfill(binary, world, sizes, iters):
    cmd = [binary, "launch", "--nproc-per-node", str(world), "--", "debug-allreduce",
           "--sizes-mib", ",".join(map(str, sizes)), "--iters", str(iters)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    rows = {}
    for line in out.splitlines():
        line = line.split("] ", 1)[-1]
        if line.startswith("{"):
            row = json.loads(line)
            rows[row["mib"]] = row
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--overfill", required=True, help="the overfill binary")
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--sizes-mib", default="1,4,16,64,256")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3, help="alternating runs of each; the best time of each is kept")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes_mib.split(",")]
    best = {"overfill": {}, "torch": {}}
    for _ in range(args.repeats):
        for name, rows in (("overfill", run_overfill(args.overfill, args.world, sizes, args.iters)),
                           ("torch", run_torch(args.world, sizes, args.iters))):
            for mib, row in rows.items():
                if mib not in best[name] or row["seconds"] < best[name][mib]:
                    best[name][mib] = row["seconds"]
    print(f"all-reduce (sum, f32), Gloo, {args.world} processes on loopback, best of {args.repeats} × {args.iters} iterations")
    print(f"{'MiB':>6} {'overfill ms':>12} {'torch ms':>10} {'overfill GiB/s':>15} {'ratio':>7}")
    ratios = []
    for mib in sizes:
        o, t = best["overfill"][mib], best["torch"][mib]
        ratio = t / o  # throughput ratio overfill / torch
        ratios.append(ratio)
        print(f"{mib:>6} {o * 1e3:>12.2f} {t * 1e3:>10.2f} {mib / 1024 / o:>15.2f} {ratio:>6.2f}×")
    worst = min(ratios)
    print(f"throughput ratio overfill/torch: min {worst:.2f}× (goal ≥ 0.9×){'' if worst >= 0.9 else '  BELOW GOAL'}")


if __name__ == "__main__":
    main()
