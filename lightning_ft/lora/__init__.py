"""LoRA, pure torch (no Lightning import): layers, injection, merging, and the Hugging Face PEFT file format."""

from lightning_ft.lora.config import LoRAConfig
from lightning_ft.lora.inject import (
    inject_lora,
    lora_layers,
    lora_state_dict,
    mark_only_lora_trainable,
    merge_lora,
    merged_state_dict,
    unmerge_lora,
)
from lightning_ft.lora.layer import LoRALinear
from lightning_ft.lora.peft_format import load_peft_adapter, save_peft_adapter

__all__ = [
    "LoRAConfig",
    "LoRALinear",
    "inject_lora",
    "lora_layers",
    "load_peft_adapter",
    "lora_state_dict",
    "mark_only_lora_trainable",
    "merge_lora",
    "merged_state_dict",
    "save_peft_adapter",
    "unmerge_lora",
]
