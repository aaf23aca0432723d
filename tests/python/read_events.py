"""Reads a TensorBoard run folder with TensorBoard's own EventAccumulator (the reader behind
`tensorboard --load_fast=false`), keeping every event.

Input: argv[1] = the run folder.
Output (JSON, stdout): {"scalars": {tag: [[step, value], ...]},
                        "texts": {tag: [[step, markdown], ...]}}   (text-plugin tensors only)
Values are the f32 stored in the file, printed exactly (as Python floats).
"""
import json
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def main() -> None:
    acc = EventAccumulator(sys.argv[1], size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    scalars = {tag: [[e.step, e.value] for e in acc.Scalars(tag)] for tag in tags["scalars"]}
    texts = {}
    for tag in acc.PluginTagToContent("text"):
        texts[tag] = [[e.step, e.tensor_proto.string_val[0].decode("utf-8")] for e in acc.Tensors(tag)]
    json.dump({"scalars": scalars, "texts": texts}, sys.stdout)


if __name__ == "__main__":
    main()
