"""Configs of the tiny transformers models the test suites build (random init).

Weights cannot be downloaded here, so every model a test folds or serves is built from
one of these configs: a few hundred K parameters at most, with the architecture's real
parameter names and shapes. The conformance suite and the serving-runtime tests build
from the same table, so a change of size lands in both at once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

VOCAB = 64

SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
HEADS = {"num_attention_heads": 2}


def _configs() -> dict[str, Callable[..., Any]]:
    import transformers as t

    def text(cls: Any, **fixed: Any) -> Callable[..., Any]:
        """``cls`` with the tiny sizes and ``fixed`` settings, overridable per call."""
        return lambda **kw: cls(**({"vocab_size": VOCAB} | SMALL | HEADS | fixed | kw))

    def decoder(cls: Any, *, tied: bool) -> Callable[..., Any]:
        return text(cls, num_key_value_heads=1, pad_token_id=0, tie_word_embeddings=tied)

    return {
        "bert": text(t.BertConfig, max_position_embeddings=32),
        "roberta": text(t.RobertaConfig, max_position_embeddings=40, pad_token_id=1),
        "gpt2": lambda **kw: t.GPT2Config(
            **(
                {
                    "vocab_size": VOCAB,
                    "n_embd": 32,
                    "n_layer": 2,
                    "n_head": 2,
                    "n_positions": 32,
                    "pad_token_id": 0,
                }
                | kw
            )
        ),
        "llama": decoder(t.LlamaConfig, tied=False),
        "qwen2": decoder(t.Qwen2Config, tied=True),
        "t5": lambda **kw: t.T5Config(
            **(
                {
                    "vocab_size": VOCAB,
                    "d_model": 32,
                    "d_ff": 64,
                    "num_layers": 2,
                    "num_decoder_layers": 2,
                    "num_heads": 2,
                    "d_kv": 16,
                    "decoder_start_token_id": 0,
                    "pad_token_id": 0,
                }
                | kw
            )
        ),
        "vit": lambda **kw: t.ViTConfig(
            **({"image_size": 16, "patch_size": 8, "num_channels": 3} | SMALL | HEADS | kw)
        ),
        "clip": lambda **kw: t.CLIPConfig(
            **(
                {
                    "text_config": {
                        "vocab_size": VOCAB,
                        **SMALL,
                        **HEADS,
                        "num_hidden_layers": 1,
                        "max_position_embeddings": 16,
                    },
                    "vision_config": {
                        "image_size": 16,
                        "patch_size": 8,
                        **SMALL,
                        **HEADS,
                        "num_hidden_layers": 1,
                    },
                    "projection_dim": 16,
                }
                | kw
            )
        ),
    }


def config_of(arch: str, **overrides: Any) -> Any:
    """The tiny config of ``arch`` (``bert``, ``gpt2``, ``llama``...), with ``overrides``."""
    return _configs()[arch](**overrides)
