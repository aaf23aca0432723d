"""Benchmark: calibration throughput of `overfill calibrate-prune` against the Python reference.

Both sides run the same tiny-but-not-trivial random Llama (default 8 layers, hidden 512) on the
CPU with the same thread count over the same length-sorted, padded batches, and time only the
calibration pass (forward with activation taps + scoring + calibration loss), not model loading.
Peak RSS of our process is reported at two calibration sizes to show it does not grow with it.

usage: bench_calibrate.py --overfill PATH [--threads N] [--layers 8 --hidden 512 ...]
"""
import argparse
import json
import os
import random
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def run(cmd):
    """Run a command; return the last JSON line of its stdout."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{stderr}")
    return json.loads(stdout.strip().splitlines()[-1])


def run_with_rss(cmd):
    """Run a command and return (last JSON line of stdout, peak RSS of that child in MiB)."""
    with tempfile.TemporaryFile(mode="w+") as out, tempfile.TemporaryFile(mode="w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            sys.exit(f"{' '.join(cmd)} failed:\n{err.read()}")
        return json.loads(out.read().strip().splitlines()[-1]), usage.ru_maxrss / 1024.0


def sorted_batches(rows, batch_size):
    """Longest first, the same batching as ours (calibrate::length_sorted_batches)."""
    rows = sorted(rows, key=len, reverse=True)
    return [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--overfill", required=True, help="path of the overfill binary")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=1536)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--calib-size", type=int, default=64)
    p.add_argument("--large-calib-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-seq-len", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    py = sys.executable
    ref = os.path.join(HERE, "prune_ref.py")

    with tempfile.TemporaryDirectory(prefix="overfill-bench-calibrate-") as tmp:
        model = os.path.join(tmp, "model")
        run([py, ref, "make-model", "--out", model, "--layers", str(args.layers), "--hidden", str(args.hidden),
             "--intermediate", str(args.intermediate), "--heads", str(args.heads), "--kv-heads", str(args.kv_heads),
             "--head-dim", str(args.hidden // args.heads), "--vocab", str(args.vocab), "--seed", str(args.seed)])
        rng = random.Random(args.seed)

        def samples(n):
            return [[rng.randrange(args.vocab) for _ in range(rng.randint(args.max_seq_len // 2, args.max_seq_len))]
                    for _ in range(n)]

        small = samples(args.calib_size)
        large = small + samples(args.large_calib_size - args.calib_size)
        paths = {}
        for name, rows in (("small", small), ("large", large)):
            paths[name] = os.path.join(tmp, f"{name}.json")
            with open(paths[name], "w") as f:
                json.dump(rows, f)
        batches = os.path.join(tmp, "batches.json")
        with open(batches, "w") as f:
            json.dump(sorted_batches(small, args.batch_size), f)

        # Python reference: hooks on the HF modules, same batches.
        theirs, their_rss = run_with_rss([py, ref, "score", "--model", model, "--batches", batches, "--threads",
                                          str(args.threads), "--out", os.path.join(tmp, "ref.safetensors")])
        results = {}
        for name in ("small", "large"):
            n = args.calib_size if name == "small" else args.large_calib_size
            ours, rss = run_with_rss([args.overfill, "calibrate-prune", "--model", model, "--data", paths[name],
                                      "--width-hidden", "0.5", "--width-intermediate", "0.5", "--calib-size", str(n),
                                      "--batch-size", str(args.batch_size), "--max-seq-len", str(args.max_seq_len),
                                      "--device", "cpu", "--dtype", "f32", "--threads", str(args.threads),
                                      "--calibrate-only", "--save-scores", os.path.join(tmp, f"ours-{name}.safetensors"),
                                      "--out", os.path.join(tmp, f"out-{name}"), "--json"])
            results[name] = (ours, rss)

    ours, our_rss = results["small"]
    ratio = ours["calibration"]["tokens_per_second"] / theirs["tokens_per_second"]
    print(f"model: {args.layers} layers, hidden {args.hidden}, intermediate {args.intermediate}, vocab {args.vocab}; "
          f"CPU, {args.threads} threads; {args.calib_size} samples <= {args.max_seq_len} tokens, batch {args.batch_size}")
    print(f"python reference (transformers + hooks): {theirs['tokens_per_second']:10.0f} tokens/s "
          f"({theirs['tokens']} tokens in {theirs['seconds']:.2f}s), peak RSS {their_rss:.0f} MiB")
    print(f"overfill calibrate-prune:                {ours['calibration']['tokens_per_second']:10.0f} tokens/s "
          f"({ours['calibration']['tokens']} tokens in {ours['calibration']['seconds']:.2f}s), peak RSS {our_rss:.0f} MiB")
    print(f"throughput ratio (ours / reference): {ratio:.2f}x (goal >= 1.0x)")
    large, large_rss = results["large"]
    print(f"peak RSS at calib_size {args.calib_size}: {our_rss:.0f} MiB; at calib_size {args.large_calib_size}: "
          f"{large_rss:.0f} MiB ({large['calibration']['tokens_per_second']:.0f} tokens/s)")
    print(json.dumps({"ratio": ratio, "ours_tokens_per_second": ours["calibration"]["tokens_per_second"],
                      "reference_tokens_per_second": theirs["tokens_per_second"], "rss_small_mib": our_rss,
                      "rss_large_mib": large_rss}))


if __name__ == "__main__":
    main()
