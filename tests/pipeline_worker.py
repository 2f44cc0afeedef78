"""One rank of a distributed greedy decode (run by mlx.launch): load a saved model with
pipeline_load (argv[4] "pipeline", the default) or tensor-parallel sharded_load
("tensor"), optionally apply moequant.patch (argv[2] "fused"), optionally decode with an
argv[5]-bit latent KV cache from the first token, and print the greedy tokens as JSON."""

import json
import sys

import mlx.core as mx
from mlx_lm.generate import generate_step
from mlx_lm.utils import pipeline_load, sharded_load

import moequant


def main():
    path, mode, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    group = mx.distributed.init()
    if len(sys.argv) > 4 and sys.argv[4] == "tensor":
        model, _ = sharded_load(path, pipeline_group=None, tensor_group=group)
    else:
        model, _ = pipeline_load(path)
    patched = moequant.patch(model) if mode == "fused" else 0
    prompt = mx.array(list(range(40, 52)))
    kv = dict(kv_bits=int(sys.argv[5]), quantized_kv_start=0) if len(sys.argv) > 5 else {}
    tokens = [int(t) for t, _ in generate_step(prompt, model, max_tokens=n, **kv)]
    # generate_step leaves one step in flight; finish it on every rank before exiting.
    mx.eval(mx.distributed.all_sum(mx.array(1.0), stream=mx.cpu))
    print(
        json.dumps({"rank": group.rank(), "size": group.size(), "patched": patched, "tokens": tokens}),
        flush=True,
    )


if __name__ == "__main__":
    main()
