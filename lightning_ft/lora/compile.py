"""``compile_blocks``: ``torch.compile`` the transformer blocks of a model with LoRA adapters (pure torch).

Each block (Hugging Face's ``_no_split_modules`` classes: ``LlamaDecoderLayer``, ``BertLayer``, ...) is compiled in
place with ``nn.Module.compile``, so module names, state-dict keys, adapter export and the block structure that
FSDP2 shards stay as they are; the first step pays the compilation. ``LoRALinear`` traces without graph breaks
(``tests/test_lora_compile.py`` checks it with ``torch._dynamo.explain``); fused siblings run unfused inside a
compiled block. Whether it helps depends on the machine: see the README's LoRA speed table.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lightning_ft.modeling import hf_models


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The outermost submodules whose class is one of the Hugging Face models' ``_no_split_modules``."""
    wanted = {name for m in hf_models(model) for name in (getattr(m, "_no_split_modules", None) or [])}
    blocks: list[tuple[str, nn.Module]] = []
    for name, m in model.named_modules():
        if type(m).__name__ in wanted and not any(name.startswith(f"{n}.") for n, _ in blocks):
            blocks.append((name, m))
    return [m for _, m in blocks]


def compile_blocks(model: nn.Module, **compile_kwargs: Any) -> list[nn.Module]:
    """``block.compile(**compile_kwargs)`` for every transformer block of ``model``, in place; returns the blocks.

    Raises ``ValueError`` when ``model`` holds no Hugging Face model with ``_no_split_modules`` (compile your own
    model's blocks with ``module.compile()`` instead).
    """
    blocks = transformer_blocks(model)
    if not blocks:
        raise ValueError(
            f"compile=True found no transformer blocks in {type(model).__name__} (it needs a Hugging Face model with "
            "_no_split_modules); call .compile() on your model's blocks yourself, or leave compile=False"
        )
    for block in blocks:
        block.compile(**compile_kwargs)
    return blocks
