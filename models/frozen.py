"""What every frozen pretrained module of the repo shares (the VAE, `models/vae.py`; the text
encoder, `models/text_encoder.py`): held in eval mode whatever a caller asks, no gradients, so
never in an optimizer or a loss; cast to its run dtype only after its identity was taken; and
identified by a fingerprint of its weights as stored, which checkpoints and caches record and
later runs check. A pretrained DiT's frozen base is identified the same way by its folder's
fingerprint (`models/backbones.py` `check_base`), but part of it may train (LoRA), so it is not
one of these.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
from torch import nn


class FrozenPretrained(nn.Module):
    """A wrapper holding one pretrained module frozen. A subclass calls `hold` once in its
    `__init__`, names the attribute it keeps the module in (`held`), and gives `describe()`
    (the record checkpoints keep) and `summary()` (the log line)."""

    held = ""  # the attribute holding the frozen module ("ae", "model")

    def hold(self, module: nn.Module, path: str, found: str, fingerprint: str,
             dtype: Optional[torch.dtype]) -> nn.Module:
        """`module` frozen (eval, no grads) and cast to `dtype`; `fingerprint` is taken by the
        caller from the weights as stored, before this cast. `found`: how the path was reached
        (for the log; default the path)."""
        self._path, self.found, self._fingerprint = path, found or path, fingerprint
        if dtype is not None and dtype != next(module.parameters()).dtype:
            module = module.to(dtype=dtype)
        module = module.eval().requires_grad_(False)
        super().train(False)  # the wrapper too: `.training` is False from the start
        return module

    def train(self, mode: bool = True) -> "FrozenPretrained":
        return super().train(False)  # frozen: stays in eval whatever the caller asks

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    @property
    def path(self) -> str:
        return self._path

    @property
    def device(self) -> torch.device:
        return next(getattr(self, self.held).parameters()).device

    @contextlib.contextmanager
    def on(self, device: torch.device | str) -> Iterator["FrozenPretrained"]:
        """This module on `device` for the block, and back where it was after: a module parked
        in CPU memory between its uses (the VAE while training reads cached latents) comes to
        the GPU only while it works."""
        home = self.device
        self.to(device)
        try:
            yield self
        finally:
            self.to(home)
            if torch.device(device).type == "cuda" and home.type != "cuda":
                torch.cuda.empty_cache()

    @property
    def dtype(self) -> torch.dtype:
        return next(getattr(self, self.held).parameters()).dtype

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).replace("torch.", "")
