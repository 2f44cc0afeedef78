"""The tokenizer of every generated test model: a small byte-level BPE trained with the
``tokenizers`` package on fixed text (identical on every machine), saved as
tokenizer.json + tokenizer_config.json with ``tokenizer_class: PreTrainedTokenizerFast``
so that transformers' AutoTokenizer, hence ``mlx_lm.load``, accepts it for any
model_type. Nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence, Union

CORPUS = [
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n",
    "class LRUCache:\n    def __init__(self, capacity):\n        self.capacity = capacity\n",
    "import os\nimport sys\nfrom typing import List, Optional\n\nprint('hello, world')\n",
    "The quick brown fox jumps over the lazy dog. Mixture-of-experts models route tokens.\n",
    "for i in range(10):\n    if i % 2 == 0:\n        continue\n    yield i * i\n",
]


def write_tokenizer(
    path: Union[str, Path],
    vocab_size: int = 384,
    *,
    specials: Sequence[str] = ("<|endoftext|>",),
    eos: str = "<|endoftext|>",
    bos: Optional[str] = None,
    chat_template: Optional[str] = None,
    model_max_length: int = 1 << 20,
) -> int:
    """Write the tokenizer files into ``path``; returns the vocabulary size, at most
    ``vocab_size`` (256 byte tokens, the specials, then merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    tok.save(str(path / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": eos,
        "bos_token": bos,
        "model_max_length": model_max_length,
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return tok.get_vocab_size()
