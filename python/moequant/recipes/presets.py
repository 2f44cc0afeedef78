"""Built-in recipes, in the same declarative form as a user's recipe JSON file."""

from __future__ import annotations

import copy

G = 64

PRESETS = {
    "alis-3.6": {
        "description": (
            "The Kimi alis-3.6 model card recipe: routed gate/up 3-bit; routed down_proj 4-bit "
            "on 16 of 60 MoE layers (scaled to the model's depth), 3-bit elsewhere; attention, "
            "shared experts, dense MLP, embeddings and lm_head 6-bit; all group 64. The router, "
            "norms and biases are never quantized."
        ),
        "rules": [
            {"match": "*.switch_mlp.gate_proj", "bits": 3, "group_size": G},
            {"match": "*.switch_mlp.up_proj", "bits": 3, "group_size": G},
            {
                "match": "*.switch_mlp.down_proj",
                "layers": {"select": "spread", "count": 16, "per": 60},
                "bits": 4,
                "group_size": G,
            },
            {"match": "*.switch_mlp.down_proj", "bits": 3, "group_size": G},
            {"match": "*", "bits": 6, "group_size": G},
        ],
    },
    "int4-native": {
        "description": (
            "The quality reference: INT4 routed experts repacked losslessly as MLX 4-bit at "
            "their source group size (no re-quantization); everything else 6-bit group 64."
        ),
        "rules": [
            {"match": "*.switch_mlp.*", "keep": True},
            {"match": "*", "bits": 6, "group_size": G},
        ],
    },
    "uniform-3": {
        "description": "Every quantizable module 3-bit group 64.",
        "rules": [{"match": "*", "bits": 3, "group_size": G}],
    },
    "uniform-4": {
        "description": "Every quantizable module 4-bit group 64.",
        "rules": [{"match": "*", "bits": 4, "group_size": G}],
    },
    "mixed-3-6": {
        "description": (
            "mlx-lm's --quant-predicate mixed_3_6 (group 64), applied to the experts too: "
            "6-bit for lm_head and, on mlx-lm's 'use_more_bits' layers, for every down_proj "
            "and v_proj/v_a_proj/v_b_proj path (kv_a_proj_with_mqa contains 'v_a_proj'); "
            "3-bit for the rest."
        ),
        "rules": [
            {
                "match": "re:.*(v_proj|v_a_proj|v_b_proj).*",
                "layers": {"select": "mlx_mixed"},
                "bits": 6,
                "group_size": G,
            },
            {"match": "*down_proj*", "layers": {"select": "mlx_mixed"}, "bits": 6, "group_size": G},
            {"match": "*lm_head*", "bits": 6, "group_size": G},
            {"match": "*", "bits": 3, "group_size": G},
        ],
    },
}

# alis-3.6's bit allocation with the routed experts (98.9% of Kimi's weights, 3/4-bit)
# least-squares fitted from INT4 (requantize_int4 fit="mse"). Byte for byte the size of
# alis-3.6. The 6-bit bf16 tensors keep min-max: the mse fit lowers their weight error
# too (~9% on the fixtures), but they are exactly the quality reference's (int4-native)
# own, so against it a fitted copy measures as a difference (bench/RESULTS.md: KL rose
# from 0.0042 to 0.0050 with them fitted); `--fit mse` fits them as well.
PRESETS["alis-3.6-mse"] = {
    "description": (
        "alis-3.6's bits, groups and layers with the routed experts fitted by least squares "
        "(fit mse: never worse than min-max group by group, the same file size, slower to "
        "convert); the 6-bit modules stay min-max like the int4-native reference's."
    ),
    "rules": [
        dict(r, fit="mse") if "switch_mlp" in r["match"] else dict(r)
        for r in copy.deepcopy(PRESETS["alis-3.6"]["rules"])
    ],
}

# Former spellings, still accepted on the command line and in the Python API.
ALIASES = {"mixed_3_6": "mixed-3-6"}
