"""Reference for `overfill distill`: writes prompt rows with json.dump (as a user's dataset
would be), and transformers' greedy answers to their prompts, one prompt at a time.

usage: distill_ref.py MODEL_DIR INPUT_JSON EXPECTED_JSON MAX_NEW_TOKENS
"""
import json
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from preprocess_ref import PAPER_TEMPLATE  # `--template auto` without the tokenizer's own: the paper's Llama 3

ROWS = [
    {"conversations": [{"from": "human", "value": "What is a fox?"}, {"from": "gpt", "value": "An animal."}]},
    {"system_prompt": "You answer briefly.",
     "conversations": [{"from": "human", "value": "Name a colour."}, {"from": "gpt", "value": "Red."},
                       {"from": "human", "value": "Another one?"}, {"from": "gpt", "value": "Blue."}]},
    {"conversations": [{"from": "human", "value": "Count to three: é, ü, 字."}]},
    {"messages": [{"role": "user", "content": "Why is the sky blue?"}, {"role": "assistant", "content": "Rayleigh."}]},
    {"conversations": [{"from": "tool", "value": "not a chat role"}]},
    {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"},
                       {"from": "human", "value": "Tell me a story about a sentence that goes on and on"}]},
]
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def prompt(row):
    turns = row.get("conversations") or row.get("messages")
    messages = []
    for t in turns:
        role, content = t.get("from", t.get("role")), t.get("value", t.get("content"))
        if role not in ROLES:
            return None
        messages.append({"role": ROLES[role], "content": content})
    if row.get("system_prompt") and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": row["system_prompt"]})
    if messages[-1]["role"] == "assistant":
        messages.pop()
    return messages


def main():
    model_dir, input_path, expected_path, max_new = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    with open(input_path, "w") as f:
        json.dump(ROWS, f)
    tok = AutoTokenizer.from_pretrained(model_dir)
    template = tok.chat_template or PAPER_TEMPLATE
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    stop = [128001, 128009]
    expected = []
    for row_id, row in enumerate(ROWS):
        messages = prompt(row)
        if messages is None:
            continue
        ids = tok.apply_chat_template(messages, chat_template=template, add_generation_prompt=True, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False,
                                 eos_token_id=stop, pad_token_id=stop[0])
        new = out[0, ids.shape[1]:].tolist()
        finished = bool(new) and new[-1] in stop
        body = new[:-1] if finished else new
        expected.append({"row_id": row_id, "messages": messages, "answer": tok.decode(body, skip_special_tokens=True),
                         "new_tokens": len(body), "finished": finished})
    with open(expected_path, "w") as f:
        json.dump(expected, f)


if __name__ == "__main__":
    main()
