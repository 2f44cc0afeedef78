"""The bit widths and group sizes of MLX's affine quantization that moequant's kernels
run (requantize, quantize, moe_swiglu, quantized_linear): one definition for the Python
side (recipes, the mlx-lm patch, inspect, the checkpoint's INT4 group sizes).
csrc/common/quant_formats.h holds the same lists for the C++ side; tests/test_quant_formats.py
checks that they agree."""

BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)
# The MLA latent KV cache (kv_cache.py, mla_decode_attention).
KV_CACHE_BITS = (4, 8)


def supported(bits, group_size) -> bool:
    return bits in BITS and group_size in GROUP_SIZES
