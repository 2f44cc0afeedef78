"""Peak memory is bounded by a few pieces of work, whatever the number of layers or
the size of a layer. Depth: convert
fixtures of 4 and 10 layers (each MoE layer ~32 MB of INT4 experts) in fresh processes
and compare their peaks. Both are deep enough for the pipeline's steady state (a job
being quantized, the next one read ahead, a shard being written); holding every
layer's output would add ~160 MB for the deeper model."""

import json
import subprocess
import sys

from moequant.testing import make_checkpoint

PROBE = r"""
import json, resource, sys
import mlx.core as mx
import moequant.convert_pipeline as pipeline
from moequant.convert import convert
if len(sys.argv) > 3:
    pipeline.PIECE_BYTES = int(sys.argv[3])
r = convert(sys.argv[1], sys.argv[2], "alis-3.6", progress=False)
try:  # ru_maxrss survives fork+exec on Linux (it starts at the parent's size); VmHWM does not
    rss = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
except OSError:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"rss": rss, "mlx_peak": mx.get_peak_memory(), "input": r.input_bytes,
                  "output": r.total_bytes}))
"""

BIG = {"hidden_size": 1024, "moe_intermediate_size": 512, "n_routed_experts": 32, "intermediate_size": 1024}


def probe(tmp_path, layers, experts=32, piece_bytes=None):
    name = f"{layers}-{experts}"
    src = make_checkpoint(
        tmp_path / f"src{name}",
        "kimi_k2",
        layers=layers,
        shards=4,
        text_overrides=dict(BIG, n_routed_experts=experts),
        random_codes=True,
    )
    r = subprocess.run(
        [sys.executable, "-c", PROBE, str(src), str(tmp_path / f"out{name}")]
        + ([str(piece_bytes)] if piece_bytes else []),
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_peak_memory_independent_of_depth(tmp_path):
    small, deep = probe(tmp_path, 4), probe(tmp_path, 10)
    per_layer = (deep["input"] - small["input"]) / 6
    assert per_layer > 25e6  # the test only means something if layers are heavy
    # MLX allocations: the same up to the pipeline's timing jitter (up to ~15 MB here).
    assert deep["mlx_peak"] < small["mlx_peak"] + 1.0 * per_layer, (small, deep)
    # Whole process (numpy read buffers, files, allocator caches included).
    assert deep["rss"] < small["rss"] + 1.5 * per_layer, (small, deep)


def test_peak_memory_independent_of_layer_size(tmp_path):
    """Memory holds a few pieces (a few experts each), not a layer: a 4x wider MoE layer
    (128 experts instead of 32: +85 MB of INT4 source) converts in about the same peak.
    Converting a whole expert stack per job, as before, grew with the layer."""
    small, wide = probe(tmp_path, 2, 32, 1 << 20), probe(tmp_path, 2, 128, 1 << 20)
    extra = wide["input"] - small["input"]
    assert extra > 80e6
    assert wide["mlx_peak"] < small["mlx_peak"] + 0.1 * extra, (small, wide)
    assert wide["rss"] < small["rss"] + 0.25 * extra, (small, wide)
