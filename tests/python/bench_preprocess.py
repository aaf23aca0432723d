"""Benchmark references for `just bench-preprocess`.

1. The upstream way: HF `datasets` (load_dataset json + map with num_proc = cores) where each row
   is normalised and tokenized with `tokenizer.apply_chat_template(..., tokenize=True)` twice
   (whole conversation; context with add_generation_prompt=True) to get the split point.
2. Bare Python `tokenizers` `encode_batch` (add_special_tokens=False) over the same templated
   full texts (rendered beforehand, not timed): the tokenization floor.

Usage: bench_preprocess.py DATA.json TOKENIZER_DIR RUST_SECONDS RUST_ROWS RUST_TOKENS
Prints rows/s, tokens/s and the ratios.
"""
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

import datasets  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from preprocess_ref import PAPER_TEMPLATE  # noqa: E402

ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def to_messages(conversations):
    messages = [{"role": ROLES[t["from"]], "content": t["value"]} for t in conversations if t["value"].strip()]
    while messages and messages[-1]["role"] != "assistant":
        messages.pop()
    return messages


def main() -> None:
    data_path, tok_dir = sys.argv[1], sys.argv[2]
    rust_seconds, rust_rows, rust_tokens = float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    cores = os.cpu_count() or 1
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)

    def tokenize_row(row):
        messages = to_messages(row["conversations"])
        full = tokenizer.apply_chat_template(messages, chat_template=PAPER_TEMPLATE, tokenize=True)
        context = tokenizer.apply_chat_template(messages[:-1], chat_template=PAPER_TEMPLATE, tokenize=True, add_generation_prompt=True)
        return {"input_ids": full, "context_len": len(context)}

    datasets.disable_caching()
    with tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        ds = datasets.load_dataset("json", data_files=data_path, split="train", cache_dir=cache)
        ds = ds.map(tokenize_row, num_proc=cores, remove_columns=ds.column_names)
        ref_tokens = sum(len(ids) for ids in ds["input_ids"])
        ref_seconds = time.perf_counter() - start
        ref_rows = len(ds)

    # Templated texts for the bare tokenizer (rendered outside the timer).
    with open(data_path, encoding="utf-8") as f:
        rows = json.load(f)
    texts = [tokenizer.apply_chat_template(to_messages(r["conversations"]), chat_template=PAPER_TEMPLATE, tokenize=False) for r in rows]
    bare = Tokenizer.from_file(os.path.join(tok_dir, "tokenizer.json"))
    start = time.perf_counter()
    encodings = bare.encode_batch(texts, add_special_tokens=False)
    bare_seconds = time.perf_counter() - start
    bare_tokens = sum(len(e.ids) for e in encodings)

    def line(name, seconds, nrows, ntokens):
        print(f"{name:<42} {seconds:8.2f} s {nrows / seconds:12.0f} rows/s {ntokens / seconds:14.0f} tokens/s")

    print(f"cores: {cores}, rows in file: {len(rows)}")
    line("overfill preprocess (whole stage)", rust_seconds, rust_rows, rust_tokens)
    line("HF datasets map + apply_chat_template", ref_seconds, ref_rows, ref_tokens)
    line("bare tokenizers encode_batch (Python)", bare_seconds, len(texts), bare_tokens)
    print(f"speed-up vs HF datasets reference: {ref_seconds / rust_seconds:.2f}x (goal >= 5x)")
    print(f"overfill time / bare encode time:   {rust_seconds / bare_seconds:.2f} (goal <= 1.5)")


if __name__ == "__main__":
    main()
