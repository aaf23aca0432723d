"""`just bench-serve`: throughput and latency of `overfill serve` with continuous batching
against the same model served one request at a time (--max-batch-size 1).

For each server and each number of concurrent clients C (closed loop: every client sends its
next request when the last one is answered), REQUESTS = max(MIN_REQUESTS, 2 C) completions of
exactly MAX_TOKENS greedy tokens (ignore_eos) are timed. Reported: generated tokens/s over the
wall time, p50/p99 request latency, and the speed-up of batching at each C.

    python bench_serve.py --binary target/release/overfill --model FULL [--decoder DEC]
        [--concurrency 1,8,32] [--max-tokens 32] [--min-requests 32] [--threads N] [--json OUT]
"""
import argparse
import json
import subprocess
import sys
import threading
import time

from serve_load import get, one_request


def start_server(args, max_batch_size):
    cmd = [args.binary, "serve", "--model", args.model, "--port", "0", "--device", args.device,
           "--dtype", args.dtype, "--max-batch-size", str(max_batch_size), "--max-queue", "4096"]
    if args.decoder:
        cmd += ["--decoder", args.decoder]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if "listening on http://" in line:
            address = line.split("listening on http://")[1].split()[0]
            # Keep draining stderr so the server never blocks on a full pipe.
            threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
            return proc, f"http://{address}"
    proc.wait()
    sys.exit(f"the server did not start: {' '.join(cmd)}")


def percentile(values, q):
    values = sorted(values)
    if not values:
        return float("nan")
    k = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return values[k]


def run_clients(base, clients, requests, max_tokens):
    """Closed-loop clients; returns (wall seconds, generated tokens, latencies, failures)."""
    next_request = iter(range(requests))
    lock = threading.Lock()
    latencies, tokens, failures = [], [0], []

    def client():
        while True:
            with lock:
                i = next(next_request, None)
            if i is None:
                return
            r = one_request(base, i, stream=False, chat=False, max_tokens=max_tokens,
                            prompt=f"Benchmark request {i}: write a short story about the sea.", timeout=3600)
            with lock:
                if r["status"] != 200 or r["problems"]:
                    failures.append(r)
                else:
                    latencies.append(r["latency"])
                    tokens[0] += r["completion_tokens"]

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start, tokens[0], latencies, failures


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--binary", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--decoder")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="f32")
    parser.add_argument("--threads", type=int, help="libtorch intra-op threads of each server")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--min-requests", type=int, default=32)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]

    # Both servers run side by side (an idle one costs nothing) and every level is measured on
    # one, then the other, so that a machine whose load drifts treats them alike.
    servers = [("one at a time", 1), ("continuous batching", args.max_batch_size)]
    started = [start_server(args, batch) for _, batch in servers]
    rows = []
    try:
        for _, base in started:  # warm-up
            for i in range(4):
                one_request(base, -1 - i, stream=False, chat=False, max_tokens=args.max_tokens)
        for clients in levels:
            requests = max(args.min_requests, 2 * clients)
            for (mode, batch), (_, base) in zip(servers, started):
                wall, tokens, latencies, failures = run_clients(base, clients, requests, args.max_tokens)
                if failures:
                    sys.exit(f"{len(failures)} requests failed, e.g. {failures[0]}")
                row = {"mode": mode, "max_batch_size": batch, "clients": clients, "requests": requests,
                       "generated_tokens": tokens, "seconds": wall, "tokens_per_second": tokens / wall,
                       "p50_latency_s": percentile(latencies, 50), "p99_latency_s": percentile(latencies, 99)}
                rows.append(row)
                print(f"{mode:>20} | {clients:>3} clients | {requests:>4} requests | "
                      f"{row['tokens_per_second']:9.1f} tokens/s | p50 {row['p50_latency_s']:7.3f} s | "
                      f"p99 {row['p99_latency_s']:7.3f} s", flush=True)
        for _, base in started:
            status, _ = get(base, "/health")
            assert status == 200
    finally:
        for proc, _ in started:
            proc.terminate()
        for proc, _ in started:
            proc.wait(timeout=300)

    print()
    print(f"model {args.model}" + (f", decoder {args.decoder}" if args.decoder else "") +
          f", {args.device} {args.dtype}, {args.max_tokens} tokens per request")
    print("| clients | one at a time tokens/s | batched tokens/s | speed-up | p50 s (1 / batched) | p99 s (1 / batched) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for clients in levels:
        single = next(r for r in rows if r["clients"] == clients and r["max_batch_size"] == 1)
        batched = next(r for r in rows if r["clients"] == clients and r["max_batch_size"] != 1)
        speedup = batched["tokens_per_second"] / single["tokens_per_second"]
        batched["speedup"] = speedup
        print(f"| {clients} | {single['tokens_per_second']:.1f} | {batched['tokens_per_second']:.1f} | "
              f"{speedup:.2f}x | {single['p50_latency_s']:.3f} / {batched['p50_latency_s']:.3f} | "
              f"{single['p99_latency_s']:.3f} / {batched['p99_latency_s']:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
