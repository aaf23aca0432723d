"""Reference token ids for the preprocess stage, from Hugging Face transformers.

Input (JSON file, argv[1]): {"tokenizer": DIR, "template": JINJA or null, "conversations": [[{role, content}, ...], ...]}
Output (JSON, stdout): [{"full_ids": [...], "context_ids": [...]}, ...] where
  full_ids    = apply_chat_template(messages, tokenize=True, add_generation_prompt=False)
  context_ids = apply_chat_template(messages[:-1], tokenize=True, add_generation_prompt=True)
The Rust side must produce context_ids and full_ids[len(context_ids):] exactly.
"""
import json
import sys

from transformers import AutoTokenizer

PAPER_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def main() -> None:
    with open(sys.argv[1], encoding="utf-8") as f:
        request = json.load(f)
    tokenizer = AutoTokenizer.from_pretrained(request["tokenizer"])
    template = request.get("template") or PAPER_TEMPLATE
    out = []
    for messages in request["conversations"]:
        full = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=True, add_generation_prompt=False)
        context = tokenizer.apply_chat_template(messages[:-1], chat_template=template, tokenize=True, add_generation_prompt=True)
        out.append({"full_ids": list(full), "context_ids": list(context)})
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
