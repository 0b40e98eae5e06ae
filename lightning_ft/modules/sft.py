"""``SFTModule``: full supervised fine-tuning, every weight trains."""

from __future__ import annotations

from typing_extensions import override

from lightning_ft.modules.base import FineTuneModule


class SFTModule(FineTuneModule):
    """Full fine-tuning of a causal LM or a sequence classifier; all arguments are those of ``FineTuneModule``."""

    @override
    def configure_model(self) -> None:
        super().configure_model()
        self.model.requires_grad_(True)
