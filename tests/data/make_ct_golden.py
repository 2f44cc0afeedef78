"""Make tests/data/ct_int4_golden.safetensors with the real compressed-tensors library.

Run once, in a throwaway venv that has torch and compressed-tensors (CI never runs it):
    python -m venv /tmp/venv-ct
    /tmp/venv-ct/bin/pip install torch==2.13.0 compressed-tensors numpy safetensors
    /tmp/venv-ct/bin/python tests/data/make_ct_golden.py

It quantizes a few bf16 matrices with compressed-tensors' own minmax qparams
(symmetric INT4, group 32 and 128) and its PackedQuantizationCompressor, and stores the
inputs and outputs. tests/test_fixtures.py checks moequant.testing's packer against it.
"""

from pathlib import Path

import compressed_tensors
import torch
from compressed_tensors.compressors import PackedQuantizationCompressor
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from compressed_tensors.quantization.utils import calculate_qparams
from safetensors.torch import save_file

OUT = Path(__file__).with_name("ct_int4_golden.safetensors")


def compress(weight: torch.Tensor, group_size: int) -> dict:
    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=group_size)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    groups = weight.reshape(weight.shape[0], -1, group_size)
    scale, zp = calculate_qparams(groups.amin(-1), groups.amax(-1), args)
    state = {"weight": weight, "weight_scale": scale, "weight_zero_point": zp}
    return PackedQuantizationCompressor.compress(state, scheme)


def main():
    gen = torch.Generator().manual_seed(1234)
    tensors = {}
    for name, shape, group_size in [("a", (16, 256), 32), ("b", (8, 512), 128)]:
        w = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
        w[0, :32] = 0  # an all-zero group exercises the eps scale
        out = compress(w, group_size)
        tensors[f"{name}.weight"] = w
        for key in ("weight_packed", "weight_scale", "weight_shape"):
            tensors[f"{name}.{key}"] = out[key].contiguous()
        tensors[f"{name}.group_size"] = torch.tensor([group_size], dtype=torch.int32)
    save_file(
        tensors,
        OUT,
        metadata={"compressed_tensors": compressed_tensors.__version__, "torch": torch.__version__},
    )
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
