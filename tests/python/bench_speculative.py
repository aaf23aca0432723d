"""Lossless two-stage (speculative) decoding against the full model alone, one run, batch 1:
`overfill generate --json` for every prompt with the full model alone, with the decoder drafting
(`--speculative K` for each K), with the decoder alone (plain OverFill, not lossless: the speed
without verification) and, if given, with a second (e.g. untrained pruned) drafter. Reports per
system: acceptance rate, drafts kept per verification, summed decode seconds and their ratio to
the full model's, and whether every speculative output equals the full model's token for token.

Usage (scripts/bench-speculative.sh builds the binary and makes a default random pair):
  bench_speculative.py --binary BIN --model FULL --decoder DEC [--pruned DIR] --prompts JSONL
      [--draft-lens 2,4,8] [--max-new-tokens 128] [--limit 20] [--stop-at-eos] [--out FILE]
      [-- extra generate flags, e.g. --template chatml --dtype bf16]
The prompts file is what `overfill generate --input` reads (one "prompt", "messages" or
"prompt_ids" object per line; other keys, e.g. eval-tasks' "answer", are ignored).
"""
import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def generate(args, prompt_file, extra):
    """The --json object of one `overfill generate` run over one prompt."""
    cmd = [args.binary, "generate", "--model", args.model, "--input", str(prompt_file),
           "--max-new-tokens", str(args.max_new_tokens), "--json", *extra, *args.generate_flags]
    if not args.stop_at_eos:
        cmd += ["--stop-ids", "none"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def systems(args):
    """(name, drafter label, K, extra generate flags) of every system measured."""
    drafters = [("decoder", args.decoder)] + ([("pruned", args.pruned)] if args.pruned else [])
    yield "full model alone", "-", None, []
    yield "overfill (decoder decodes)", "decoder", None, ["--decoder", args.decoder]
    for label, path in drafters:
        for k in args.draft_lens:
            yield f"speculative K={k}", label, k, ["--decoder", path, "--speculative", str(k)]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--binary", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--decoder", required=True, help="the trained OverFill decoder")
    parser.add_argument("--pruned", help="a second drafter, e.g. the untrained pruned checkpoint")
    parser.add_argument("--prompts", required=True)
    parser.add_argument("--draft-lens", default="2,4,8", type=lambda s: [int(k) for k in s.split(",")])
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--limit", type=int, default=20, help="prompts used (the first N lines)")
    parser.add_argument("--stop-at-eos", action="store_true",
                        help="stop at the stop ids (default: exactly --max-new-tokens tokens)")
    parser.add_argument("--out", help="write the summary as JSON here")
    parser.add_argument("generate_flags", nargs="*", help="after --: more `overfill generate` flags")
    args = parser.parse_args()

    lines = [l for l in Path(args.prompts).read_text().splitlines() if l.strip()][: args.limit]
    if not lines:
        sys.exit(f"{args.prompts} has no prompts")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, line in enumerate(lines):
            prompt_file = Path(tmp) / f"prompt{i}.jsonl"
            prompt_file.write_text(line + "\n")
            for name, drafter, k, extra in systems(args):
                r = results.setdefault((name, drafter), {"k": k, "decode_seconds": 0.0, "tokens": 0,
                                                         "proposed": 0, "accepted": 0,
                                                         "verifications": 0, "identical": 0, "outputs": []})
                out = generate(args, prompt_file, extra)
                r["decode_seconds"] += out["decode_seconds"]
                r["tokens"] += out["generated_tokens"]
                r["outputs"].append(out["token_ids"][0])
                if "speculative" in out:
                    s = out["speculative"]
                    for key in ("proposed", "accepted", "verifications"):
                        r[key] += s[key]
            print(f"prompt {i + 1}/{len(lines)} done", file=sys.stderr)

    full = results[("full model alone", "-")]
    summary = []
    header = f"{'system':<28} {'drafter':<8} {'accept':>7} {'kept/ver':>8} {'decode s':>9} {'vs full':>8} {'identical':>10}"
    print(header)
    for (name, drafter), r in results.items():
        speculative = r["k"] is not None
        identical = sum(a == b for a, b in zip(r["outputs"], full["outputs"]))
        row = {
            "system": name, "drafter": drafter, "draft_len": r["k"], "prompts": len(lines),
            "generated_tokens": r["tokens"], "decode_seconds": r["decode_seconds"],
            "decode_time_over_full": r["decode_seconds"] / full["decode_seconds"],
            "identical_to_full": identical,
        }
        if speculative:
            row.update(proposed=r["proposed"], accepted=r["accepted"], verifications=r["verifications"],
                       acceptance_rate=r["accepted"] / max(r["proposed"], 1),
                       # batch 1: one row per verification
                       mean_accepted_per_verification=r["accepted"] / max(r["verifications"], 1))
        summary.append(row)
        accept = f"{100 * row['acceptance_rate']:6.1f}%" if speculative else "-"
        kept = f"{row['mean_accepted_per_verification']:.2f}" if speculative else "-"
        print(f"{name:<28} {drafter:<8} {accept:>7} {kept:>8} {r['decode_seconds']:9.3f} "
              f"{row['decode_time_over_full']:7.2f}x {identical:>4}/{len(lines):<5}")
    print(f"batch 1, {args.max_new_tokens} new tokens, {len(lines)} prompts; decode seconds summed over prompts; "
          "'identical' counts outputs equal to the full model's token for token")
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
