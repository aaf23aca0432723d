"""The demo's instruction data: WordNet's definitions as questions and answers, written by people.

Source: WordNet 3.0 (Princeton University; the WordNet 3.0 licence: use, copy, modify and
distribute for any purpose, with its copyright notice), installed by the set-up as the Debian
package `wordnet-base` (/usr/share/wordnet). For every single-word lemma the question is
`What does the <part of speech> "<lemma>" mean?` and the answer is the gloss of the lemma's most
frequent sense (the first synset the index lists), without its example sentences, as the
lexicographers wrote it (first letter capitalised, a full stop added).

Lemmas tagged in WordNet's sense-tagged corpus come first (they are the everyday words), then the
rest, each group in a seeded random order. The held-out lemmas are drawn first and never appear in
the training rows: each lemma-and-part-of-speech pair is one question.

Written with json.dump, as users' data would be:
  OUT/train.json     OpenHermes-2.5 rows ({"conversations": [{"from": "human"|"gpt", "value"}]})
  OUT/heldout.json   the held-out rows, also as OpenHermes (for `preprocess` → held-out shards)
  OUT/heldout.jsonl  one {"task", "prompt", "answer"} per line (for `overfill eval-tasks`)

Usage: python scripts/wordnet_data.py OUT --train-rows 12000 --heldout-rows 300 [--seed 0]
"""
import argparse
import json
import os
import random
import re
import sys

WORDNET = os.environ.get("WORDNET_DIR", "/usr/share/wordnet")
PARTS = {"noun": "noun", "verb": "verb", "adj": "adjective", "adv": "adverb"}
SINGLE_WORD = re.compile(r"^[a-z]{3,}$")


def read_data(path):
    """Synset offset -> gloss definition (the text before the first quoted example)."""
    glosses = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("  "):  # the licence header
                continue
            offset, _, rest = line.partition(" ")
            _, bar, gloss = rest.partition(" | ")
            if not bar:
                continue
            definition = re.split(r';\s*"', gloss.strip(), maxsplit=1)[0].strip().rstrip(";").strip()
            if definition:
                glosses[offset] = definition
    return glosses


def read_lemmas(part):
    """(lemma, most frequent sense's offset, tagged in the corpus) for each single-word lemma."""
    rows = []
    with open(os.path.join(WORDNET, f"index.{part}"), encoding="utf-8") as f:
        for line in f:
            if line.startswith("  "):
                continue
            fields = line.split()
            lemma, synset_count = fields[0], int(fields[2])
            tagged = int(fields[-synset_count - 1]) > 0
            if SINGLE_WORD.match(lemma):
                rows.append((lemma, fields[-synset_count], tagged))
    return rows


def as_answer(definition):
    text = definition[0].upper() + definition[1:]
    return text if text.endswith((".", "!", "?")) else text + "."


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out")
    parser.add_argument("--train-rows", type=int, required=True)
    parser.add_argument("--heldout-rows", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not os.path.isfile(os.path.join(WORDNET, "index.noun")):
        sys.exit(f"wordnet_data.py: no WordNet in {WORDNET} (the Debian package wordnet-base; `just setup` installs it)")

    questions = []  # (tagged, prompt, answer, part)
    for part, name in PARTS.items():
        glosses = read_data(os.path.join(WORDNET, f"data.{part}"))
        for lemma, offset, tagged in read_lemmas(part):
            if offset in glosses:
                prompt = f'What does the {name} "{lemma}" mean?'
                questions.append((tagged, prompt, as_answer(glosses[offset]), name))
    rng = random.Random(args.seed)
    tagged = [q for q in questions if q[0]]
    untagged = [q for q in questions if not q[0]]
    rng.shuffle(tagged)
    rng.shuffle(untagged)
    ordered = tagged + untagged
    needed = args.heldout_rows + args.train_rows
    if len(ordered) < needed:
        sys.exit(f"wordnet_data.py: WordNet has {len(ordered)} questions, {needed} asked for")
    heldout, train = ordered[:args.heldout_rows], ordered[args.heldout_rows:needed]

    def openhermes(rows):
        return [{"conversations": [{"from": "human", "value": p}, {"from": "gpt", "value": a}]} for _, p, a, _ in rows]

    os.makedirs(args.out, exist_ok=True)
    for name, rows in [("train.json", train), ("heldout.json", heldout)]:
        with open(os.path.join(args.out, name), "w", encoding="utf-8") as f:
            json.dump(openhermes(rows), f, ensure_ascii=False)
    with open(os.path.join(args.out, "heldout.jsonl"), "w", encoding="utf-8") as f:
        for _, prompt, answer, part in heldout:
            f.write(json.dumps({"task": part, "prompt": prompt, "answer": answer}, ensure_ascii=False) + "\n")
    print(f"wordnet_data.py: {len(train)} training and {len(heldout)} held-out questions "
          f"({len(tagged)} of {len(questions)} lemmas are corpus-tagged) in {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
