"""Tiny Kimi-style checkpoints and DeepSeek-V3 models (tiny_deepseek) for tests, the
demo and benchmarks."""

from .tiny_checkpoint import ct_quantize, make_checkpoint, tiny_text_config

__all__ = ["make_checkpoint", "tiny_text_config", "ct_quantize"]
