"""Worker of ``test_lora_fused_ddp.py``: a few AdamW steps of a tiny Llama with fused LoRA adapters under plain
``DistributedDataParallel`` (gloo, one thread per rank), each rank on its own half of the batch; rank 0 saves the
adapter weights. ``train`` is also the single-process reference (``world=1``, the whole batch, unfused)."""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from helpers import tiny_llama

from lightning_ft.lora import inject_lora, lora_state_dict

VOCAB, ROWS, STEPS = 64, 4, 3


def data() -> torch.Tensor:
    return torch.randint(0, VOCAB, (STEPS, ROWS, 12), generator=torch.Generator().manual_seed(0))


def build(fuse: bool) -> torch.nn.Module:
    model = inject_lora(tiny_llama(VOCAB), r=4, alpha=8, rank_pattern={"k_proj": 2, "up_proj": 5}, fuse=fuse)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model.train()


def train(model: torch.nn.Module, rank: int = 0, world: int = 1) -> dict[str, torch.Tensor]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    per_rank = ROWS // world
    for batch in data():
        ids = batch[rank * per_rank : (rank + 1) * per_rank]
        logits = model(input_ids=ids).logits[:, :-1]
        F.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {k: v.detach().clone() for k, v in lora_state_dict(getattr(model, "module", model)).items()}


def main(out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = build(fuse=True)
    assert model.model.layers[0].self_attn.q_proj._fused is not None
    state = train(DistributedDataParallel(model), rank, world)
    if rank == 0:
        torch.save(state, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
