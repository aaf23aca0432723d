"""Dataset files as the real world writes them, plus their transformers reference token ids.

Used by data/tests/real_files.rs. Parquet is written by pyarrow, JSON by Python's json.dump; we
never write our own inputs here.

Input (JSON file, argv[1]):
  {"tokenizer": DIR,
   "rows": [{"conversations": [{"from": "human"|"gpt"|"system", "value": str}, ...],
             "langdetect": str}, ...],
   "glob_parts": [n0, n1, ...]}          # row counts of the files under mix/, in order
Output folder (argv[2]):
  infinity-{snappy,gzip,brotli,lz4,zstd,none}.parquet   every row, Infinity-Instruct 7M schema,
      small row groups; `id` is int64 in some files and string in others (as in the releases);
      snappy is pyarrow's default (no compression argument)
  mix/part-{k}-{codec}.parquet    the rows split by glob_parts, codecs and id types cycling
  no-conversations.parquet        the Infinity schema without `conversations`
  conversations-wrong-type.parquet  `conversations` as list<string>
  openhermes-utf8.json            json.dump(rows, ensure_ascii=False, indent=2)
  openhermes-ascii.json           json.dump(rows, ensure_ascii=True) (\\uXXXX escapes, surrogate pairs)
  reference.json                  per row {"full_ids", "context_ids"} from apply_chat_template
                                  with preprocess_ref.py's template (the Rust side must produce
                                  context_ids and full_ids[len(context_ids):])
"""
import json
import os
import sys

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from preprocess_ref import PAPER_TEMPLATE  # noqa: E402

# pyarrow's name for each codec; None = pyarrow's default (Snappy).
CODECS = [("snappy", None), ("gzip", "gzip"), ("brotli", "brotli"), ("lz4", "lz4"), ("zstd", "zstd"), ("none", "none")]
ROLE = {"human": "user", "gpt": "assistant", "system": "system"}

TURN = pa.struct([("from", pa.string()), ("value", pa.string())])
LABEL = pa.struct([(k, pa.list_(pa.string())) for k in ("ability_en", "ability_zh", "cate_ability_en", "cate_ability_zh")])


def infinity_schema(id_type, conversations=pa.list_(TURN)):
    fields = [("id", id_type)]
    if conversations is not None:
        fields.append(("conversations", conversations))
    fields += [("label", LABEL), ("langdetect", pa.string()), ("source", pa.string()), ("reward", pa.float64())]
    return pa.schema(fields)


def infinity_columns(rows, first_id, id_type):
    ids = list(range(first_id, first_id + len(rows)))
    return {
        "id": [str(i) for i in ids] if id_type == pa.string() else ids,
        "conversations": [r["conversations"] for r in rows],
        "label": [
            {
                "ability_en": ["logical reasoning", "programming ability"][: 1 + i % 2],
                "ability_zh": ["逻辑推理"],
                "cate_ability_en": ["Logic and Reasoning"],
                "cate_ability_zh": ["逻辑与推理"],
            }
            for i in ids
        ],
        "langdetect": [r["langdetect"] for r in rows],
        "source": ["Subjective" if i % 3 else "code_exercises" for i in ids],
        "reward": [0.25 * (i % 7) - 0.5 for i in ids],
    }


def write_infinity(path, rows, first_id, id_type, compression, row_group_size):
    table = pa.table(infinity_columns(rows, first_id, id_type), schema=infinity_schema(id_type))
    kwargs = {} if compression is None else {"compression": compression}
    pq.write_table(table, path, row_group_size=row_group_size, **kwargs)


def openhermes_rows(rows):
    # The real OpenHermes-2.5 row layout: many null metadata fields, `weight` in every turn.
    return [
        {
            "custom_instruction": None,
            "topic": None,
            "model_name": None,
            "model": None,
            "skip_prompt_formatting": False,
            "category": "general",
            "conversations": [{"from": t["from"], "value": t["value"], "weight": None} for t in r["conversations"]],
            "views": None,
            "language": None,
            "id": None,
            "title": None,
            "idx": None,
            "hash": None,
            "avatarUrl": None,
            "system_prompt": None,
            "source": "airoboros2.2",
        }
        for r in rows
    ]


def reference(tokenizer_dir, rows):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    out = []
    for row in rows:
        messages = [{"role": ROLE[t["from"]], "content": t["value"]} for t in row["conversations"]]
        full = tokenizer.apply_chat_template(messages, chat_template=PAPER_TEMPLATE, tokenize=True, add_generation_prompt=False)
        context = tokenizer.apply_chat_template(messages[:-1], chat_template=PAPER_TEMPLATE, tokenize=True, add_generation_prompt=True)
        out.append({"full_ids": list(full), "context_ids": list(context)})
    return out


def main() -> None:
    with open(sys.argv[1], encoding="utf-8") as f:
        request = json.load(f)
    out = sys.argv[2]
    rows = request["rows"]
    os.makedirs(os.path.join(out, "mix"), exist_ok=True)

    for k, (name, compression) in enumerate(CODECS):
        id_type = pa.int64() if k % 2 == 0 else pa.string()
        write_infinity(os.path.join(out, f"infinity-{name}.parquet"), rows, 0, id_type, compression, row_group_size=7)

    start = 0
    for k, size in enumerate(request["glob_parts"] + [len(rows) - sum(request["glob_parts"])]):
        name, compression = CODECS[k % len(CODECS)]
        id_type = pa.string() if k % 2 == 0 else pa.int64()
        path = os.path.join(out, "mix", f"part-{k}-{name}.parquet")
        write_infinity(path, rows[start : start + size], start, id_type, compression, row_group_size=3)
        start += size

    columns = infinity_columns(rows[:5], 0, pa.int64())
    del columns["conversations"]
    pq.write_table(pa.table(columns, schema=infinity_schema(pa.int64(), conversations=None)), os.path.join(out, "no-conversations.parquet"))
    columns = infinity_columns(rows[:5], 0, pa.int64())
    columns["conversations"] = [[t["value"] for t in c] for c in columns["conversations"]]
    schema = infinity_schema(pa.int64(), conversations=pa.list_(pa.string()))
    pq.write_table(pa.table(columns, schema=schema), os.path.join(out, "conversations-wrong-type.parquet"))

    with open(os.path.join(out, "openhermes-utf8.json"), "w", encoding="utf-8") as f:
        json.dump(openhermes_rows(rows), f, ensure_ascii=False, indent=2)
    with open(os.path.join(out, "openhermes-ascii.json"), "w", encoding="ascii") as f:
        json.dump(openhermes_rows(rows), f, ensure_ascii=True)

    with open(os.path.join(out, "reference.json"), "w", encoding="utf-8") as f:
        json.dump(reference(request["tokenizer"], rows), f)


if __name__ == "__main__":
    main()
