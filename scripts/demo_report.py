"""The demo's table (scripts/demo.sh, stage 5): results.md and summary.json from eval/.

Rows as the paper's Table 2: Full (SmolLM2-135M-Instruct zero-shot, not fine-tuned), Pruned
(P = 0.5, trained alone over context and answer) and OverFill (P = 0.5, trained over the full
model's KV cache), each decoder trained once per seed. Columns: decoder parameters, held-out
target loss (`overfill eval-loss`: mean cross-entropy over the answer tokens y1..yN), ROUGE-L F1
of the greedy answers against the reference answers (Google's `rouge-score` package, the
implementation HF `evaluate` wraps: RougeScorer(["rougeL"]), default tokenizer, no stemming; mean
over the held-out questions), and decode tokens/s (`overfill bench-latency`: batch 1, a 48-token
prompt, 64 new tokens, one thread, mean of 3 runs; the Pruned row is the pruned model decoding
after its own prefill, the OverFill row the same-size decoder after the full model's prefill).
Mean ± sample standard deviation (n - 1) over seeds.

Usage: python scripts/demo_report.py --work DIR --seeds 0,1,2
"""
import argparse
import csv
import json
import os
import statistics

from rouge_score import rouge_scorer


def load_json(work, name):
    with open(os.path.join(work, "eval", name)) as f:
        return json.load(f)


def load_answers(work, name):
    with open(os.path.join(work, "eval", f"answers-{name}.jsonl")) as f:
        return [json.loads(line) for line in f]


def rouge_l(rows, scorer):
    return statistics.fmean(scorer.score(r["answer"], r["generated"])["rougeL"].fmeasure for r in rows)


def spread(values):
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, std


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", required=True)
    parser.add_argument("--seeds", required=True)
    args = parser.parse_args()
    work, seeds = args.work, args.seeds.split(",")
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    with open(os.path.join(work, "eval", "latency", "latency.csv")) as f:
        decode_speed = {row["system"]: float(row["decode_tokens_per_s"]) for row in csv.DictReader(f)}

    systems = {}
    for system, runs in [("full", ["full"]), ("pruned", [f"pruned-s{s}" for s in seeds]),
                         ("overfill", [f"overfill-s{s}" for s in seeds])]:
        tasks = [load_json(work, f"tasks-{run}.json") for run in runs]
        losses = [load_json(work, f"loss-{run}.json") for run in runs]
        systems[system] = {
            "runs": runs,
            "decoder_parameters": tasks[0]["decoder_parameters"],
            "target_loss": [l["loss"] for l in losses],
            "target_tokens": losses[0]["tokens"],
            "rouge_l_f1": [rouge_l(load_answers(work, run), scorer) for run in runs],
            "exact_match": [t["accuracy"] for t in tasks],
            "decode_tokens_per_second": decode_speed[system],
            "decode_tokens_per_second_eval_tasks": [t["decode_tokens_per_second"] for t in tasks],
            "prompts": tasks[0]["total"],
        }
    summary = {"seeds": [int(s) for s in seeds], "systems": systems,
               "target_loss_before_training": {
                   "pruned": load_json(work, "loss-pruned-step0.json")["loss"],
                   "overfill": load_json(work, "loss-overfill-step0.json")["loss"]}}

    def cell(values, digits):
        mean, std = spread(values)
        return f"{mean:.{digits}f}" if len(values) == 1 else f"{mean:.{digits}f} ± {std:.{digits}f}"

    lines = ["| system | decoder params | held-out target loss | ROUGE-L F1 | decode tok/s |",
             "|---|---:|---:|---:|---:|"]
    labels = {"full": "Full (zero-shot)", "pruned": "Pruned (P = 0.5)", "overfill": "OverFill (P = 0.5)"}
    for name, s in systems.items():
        lines.append(f"| {labels[name]} | {s['decoder_parameters'] / 1e6:.1f}M | {cell(s['target_loss'], 4)} | "
                     f"{cell(s['rouge_l_f1'], 4)} | {s['decode_tokens_per_second']:.1f} |")

    (of_mean, of_std), (pr_mean, pr_std) = spread(systems["overfill"]["target_loss"]), spread(systems["pruned"]["target_loss"])
    margin = 2 * max(of_std, pr_std)
    summary["overfill_below_pruned_by"] = pr_mean - of_mean
    summary["twice_the_larger_std"] = margin
    # One seed has no spread: say so rather than compare with a standard deviation of 0.
    one_seed = len(seeds) < 2
    summary["overfill_beats_pruned_beyond_spread"] = None if one_seed else pr_mean - of_mean > margin
    before = summary["target_loss_before_training"]
    if one_seed:
        verdict = "with one seed there is no spread to compare it with (run --seeds 0,1,2)"
    else:
        verdict = ("more than" if pr_mean - of_mean > margin else "NOT more than") + f" twice the larger std ({margin:.4f})"
    note = (f"Seeds {', '.join(seeds)} (mean ± sample std over seeds; Full is one model). Held-out target loss: "
            f"{systems['full']['target_tokens']} answer tokens of {systems['full']['prompts']} held-out questions "
            f"about words never trained on. OverFill's mean is below Pruned's by {pr_mean - of_mean:.4f}, "
            f"{verdict}. Before decoder training: OverFill "
            f"{before['overfill']:.4f}, Pruned {before['pruned']:.4f}. ROUGE-L F1 of greedy answers "
            f"(≤ 48 tokens) against WordNet's glosses; decode tok/s: batch 1, 64 new tokens, one thread (bench-latency).")

    answers = {name: load_answers(work, s["runs"][0]) for name, s in systems.items()}
    samples = ["| question | reference | Full | Pruned (seed %s) | OverFill (seed %s) |" % (seeds[0], seeds[0]),
               "|---|---|---|---|---|"]
    clean = lambda text: " ".join(text.split()).replace("|", "\\|")
    for i in range(min(5, len(answers["full"]))):
        row = answers["full"][i]
        samples.append("| " + " | ".join(clean(t) for t in [
            row["prompt"], row["answer"], row["generated"],
            answers["pruned"][i]["generated"], answers["overfill"][i]["generated"]]) + " |")
    summary["samples"] = [{"prompt": answers["full"][i]["prompt"], "answer": answers["full"][i]["answer"],
                           **{name: answers[name][i]["generated"] for name in answers}}
                          for i in range(min(5, len(answers["full"])))]

    text = "\n".join(lines) + "\n\n" + note + "\n\n" + "\n".join(samples) + "\n"
    with open(os.path.join(work, "results.md"), "w") as f:
        f.write(text)
    with open(os.path.join(work, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
