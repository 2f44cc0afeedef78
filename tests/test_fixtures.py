"""The tiny-checkpoint generator: its INT4 packer against a golden file made by the real
compressed-tensors library (tests/data/make_ct_golden.py), and its tokenizer."""

from pathlib import Path

import mlx.core as mx
import numpy as np

from moequant import int4
from moequant.testing import ct_quantize, make_checkpoint
from moequant.testing.tiny_checkpoint import bf16_bits

GOLDEN = Path(__file__).parent / "data" / "ct_int4_golden.safetensors"


def test_packer_matches_compressed_tensors_golden():
    g = mx.load(str(GOLDEN))
    for name in ("a", "b"):
        group = int(g[f"{name}.group_size"].item())
        w = np.array(g[f"{name}.weight"].astype(mx.float32))
        words, scale = ct_quantize(w, group)
        assert np.array_equal(words, np.array(g[f"{name}.weight_packed"]))
        assert np.array_equal(bf16_bits(scale), np.array(g[f"{name}.weight_scale"].view(mx.uint16)))
        assert np.array(g[f"{name}.weight_shape"]).tolist() == list(w.shape)
        # and the plain packer on the decoded codes
        assert np.array_equal(int4.pack(int4.unpack(words)), np.array(g[f"{name}.weight_packed"]))


def test_known_answers():
    # compressed-tensors.md 1.2
    assert int4.pack(np.arange(-8, 0)).view(np.uint32)[0] == 0x76543210
    assert int4.pack(np.array([-4, -4, -1, -2, 3, 2, -1, -7])).view(np.uint32)[0] == 0x17AB6744


def test_fixture_shapes_and_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    src = make_checkpoint(tmp_path / "k2", "kimi_k2", layers=2, shards=2)
    assert len(list(src.glob("model-*-of-000002.safetensors"))) == 2
    tok = AutoTokenizer.from_pretrained(str(src))
    ids = tok.encode("The quick brown fox")
    assert tok.decode(ids) == "The quick brown fox"
    assert tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    ).endswith("<|im_assistant|>")
