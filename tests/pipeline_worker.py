"""One rank of a pipeline-parallel greedy decode (run by mlx.launch): pipeline_load a
saved model, optionally apply moequant.patch, and print the greedy tokens as JSON."""

import json
import sys

import mlx.core as mx
from mlx_lm.generate import generate_step
from mlx_lm.utils import pipeline_load

import moequant


def main():
    path, mode, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    model, _ = pipeline_load(path)
    group = mx.distributed.init()
    patched = moequant.patch(model) if mode == "fused" else 0
    prompt = mx.array(list(range(40, 52)))
    tokens = [int(t) for t, _ in generate_step(prompt, model, max_tokens=n)]
    # generate_step leaves one step in flight; finish it on every rank before exiting.
    mx.eval(mx.distributed.all_sum(mx.array(1.0), stream=mx.cpu))
    print(json.dumps({"rank": group.rank(), "size": group.size(), "patched": patched,
                      "tokens": tokens}), flush=True)


if __name__ == "__main__":
    main()
