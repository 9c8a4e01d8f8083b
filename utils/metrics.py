"""Video quality numbers: PSNR, and the "jigsaw" score that flags patch-grid artefacts.

The jigsaw score compares the squared pixel differences across the DiT's patch-grid
boundaries with those inside patches. Natural (or well-generated) videos have no preferred
grid, so the ratio is near 1; videos assembled from mismatched patches — the failure this
project was born from — have edges exactly on the grid and score well above 1.
"""
from __future__ import annotations

import math

import torch


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> float:
    """PSNR in dB between tensors in [-1, 1] (data_range 2)."""
    mse = torch.mean((a.double() - b.double()) ** 2).item()
    return math.inf if mse == 0 else 10 * math.log10(data_range ** 2 / mse)


def jigsaw_score(videos: torch.Tensor, cell: int) -> float:
    """Boundary / interior gradient energy for pixels (B, 3, T, H, W) on a grid of `cell` pixels.

    `cell` is the patch side in pixels: VAE downsampling factor x DiT patch size.
    """
    assert videos.ndim == 5 and cell >= 2, "expects (B, 3, T, H, W) and a cell of >= 2 pixels"
    x = videos.double()
    dx = (x[..., :, 1:] - x[..., :, :-1]) ** 2  # (B, 3, T, H, W-1): difference between columns j, j+1
    dy = (x[..., 1:, :] - x[..., :-1, :]) ** 2  # (B, 3, T, H-1, W)
    on_x = (torch.arange(1, x.shape[-1], device=x.device) % cell) == 0  # column j+1 starts a cell
    on_y = (torch.arange(1, x.shape[-2], device=x.device) % cell) == 0
    boundary = dx[..., on_x].mean() + dy[..., on_y, :].mean()
    interior = dx[..., ~on_x].mean() + dy[..., ~on_y, :].mean()
    return (boundary / interior.clamp(min=1e-12)).item()
