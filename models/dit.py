"""The video DiT: latents (B, C, T, h, w) + timestep (+ class) -> v, same shape.

Design (DiT, Peebles & Xie 2023; Latte, Ma et al. 2024):
- Tokens: non-overlapping `patch_t x patch x patch` patches, flattened and linearly embedded
  (a linear layer on rearranged patches is a Conv3d with stride = kernel, and patchify is then
  the very code the round-trip test checks). Token order is frame-major: n = t * S + s, where
  S = (h / patch) * (w / patch) tokens per latent frame.
- Position: fixed sin-cos, separable: a 2-D spatial table (half the channels for rows, half
  for columns) plus a 1-D temporal table, summed and added once to the tokens. No RoPE.
- Blocks: pre-norm transformer blocks with adaLN-Zero conditioning on c = emb(t) + emb(y).
  `model.attention = "factorized"` alternates spatial blocks (the S tokens of one frame attend
  to each other) and temporal blocks (the T tokens at one spatial position attend to each
  other), as Latte; `"full"` attends over all T * S tokens in every block. Every block keeps
  the tokens as (B, N, D); only attention regroups them, from one fused qkv projection.
  qk-norm (`model.qk_norm`) is a LayerNorm over each head's q and k.
- Classes: an embedding table with one extra row, the null class `null_class_id =
  num_classes`, used for label dropout in training and for the unconditional half of
  classifier-free guidance (pass y = null_class_id; y = None means unconditional too).

The network knows nothing of the objective: the diffusion module decides what the output means.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from utils.config import ModelConfig
from utils.errors import ConfigError

# --------------------------------------------------------------------------- patches


def check_patchable(num_frames: int, height: int, width: int, patch_t: int, patch: int) -> None:
    """Raise ConfigError unless the latent grid splits into whole patches."""
    if num_frames % patch_t:
        raise ConfigError(f"model.patch_t = {patch_t} does not divide the {num_frames} latent frames "
                          "(data.num_frames); pick a patch_t that divides it, e.g. 1")
    if height % patch or width % patch:
        raise ConfigError(f"model.patch_size = {patch} does not divide the latent size {height}x{width} "
                          "(data.resolution / VAE factor); pick a divisor, or change data.resolution")


def patchify(x: torch.Tensor, patch_t: int, patch: int) -> torch.Tensor:
    """(B, C, T, h, w) -> (B, N, patch_t * patch * patch * C), N = (T/pt) * (h/p) * (w/p)."""
    check_patchable(x.shape[2], x.shape[3], x.shape[4], patch_t, patch)
    return rearrange(x, "b c (t pt) (h ph) (w pw) -> b (t h w) (pt ph pw c)",
                     pt=patch_t, ph=patch, pw=patch)


def unpatchify(tokens: torch.Tensor, grid: tuple[int, int, int], patch_t: int, patch: int) -> torch.Tensor:
    """Exact inverse of `patchify`: (B, N, pt * p * p * C) -> (B, C, T, h, w); grid = (T/pt, h/p, w/p)."""
    t, h, w = grid
    return rearrange(tokens, "b (t h w) (pt ph pw c) -> b c (t pt) (h ph) (w pw)",
                     t=t, h=h, w=w, pt=patch_t, ph=patch, pw=patch)


# --------------------------------------------------------------------------- embeddings


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """(L,) positions -> (L, dim) [sin | cos] with frequencies 1 / 10000^(2i / dim)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim // 2))
    angles = positions.double()[:, None] * omega[None]  # (L, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def video_pos_embed(dim: int, grid: tuple[int, int, int]) -> torch.Tensor:
    """(1, T*H*W, dim) fixed embedding: spatial 2-D sin-cos (rows | columns) + temporal 1-D."""
    t, h, w = grid
    rows = sincos_1d(dim // 2, torch.arange(h).repeat_interleave(w))  # (H*W, dim/2), row of token s
    cols = sincos_1d(dim // 2, torch.arange(w).repeat(h))  # (H*W, dim/2), column of token s
    spatial = torch.cat([rows, cols], dim=1)  # (S, dim)
    temporal = sincos_1d(dim, torch.arange(t).double())  # (T, dim)
    pos = temporal[:, None, :] + spatial[None, :, :]  # (T, S, dim)
    return rearrange(pos, "t s d -> 1 (t s) d").float()


class TimestepEmbedder(nn.Module):
    """Scalar timesteps (float or int, in training steps) -> (B, hidden) via sin-cos + MLP."""

    def __init__(self, hidden: int, freq_dim: int = 256, max_period: float = 10000.0):
        super().__init__()
        self.freq_dim, self.max_period = freq_dim, max_period
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(self.max_period) / half * torch.arange(half, device=t.device))
        angles = t.float()[:, None] * freqs[None]  # (B, freq_dim/2)
        emb = torch.cat([angles.cos(), angles.sin()], dim=1)  # (B, freq_dim)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class ids -> (B, hidden); row `num_classes` is the null class (no label)."""

    def __init__(self, num_classes: int, hidden: int, dropout: float):
        super().__init__()
        self.null_class_id = num_classes
        self.dropout = dropout  # probability of replacing a label by the null class (training only)
        self.table = nn.Embedding(num_classes + 1, hidden)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if self.training and self.dropout > 0:
            drop = torch.rand(y.shape, device=y.device) < self.dropout
            y = torch.where(drop, torch.full_like(y, self.null_class_id), y)
        return self.table(y)


# --------------------------------------------------------------------------- blocks


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x * (1 + scale) + shift; x (B, N, D), shift/scale (B, 1, D)."""
    return torch.addcmul(shift, x, scale + 1)


# einops patterns from fused qkv (B, N, 3*D) to q/k/v (stacked in front) as 4-D
# (batch, heads, sequence, head_dim): 4-D inputs take SDPA's fused CPU/GPU kernels (5-D falls
# back to the slow math path). Spatial and full are views; temporal regroups with one copy.
_QKV_IN = {
    "full": "b n (k h e) -> k b h n e",  # sequence: all T*S tokens
    "spatial": "b (t s) (k h e) -> k (b t) h s e",  # sequence: the S tokens of one frame
    "temporal": "b (t s) (k h e) -> k (b s) h t e",  # sequence: the T tokens of one position
}
_OUT = {
    "full": "b h n e -> b n (h e)",
    "spatial": "(b t) h s e -> b (t s) (h e)",
    "temporal": "(b s) h t e -> b (t s) (h e)",
}


class Attention(nn.Module):
    """Multi-head self-attention over `kind` groups of tokens, with optional qk-norm."""

    def __init__(self, dim: int, num_heads: int, kind: str, qk_norm: bool):
        super().__init__()
        self.num_heads, self.kind = num_heads, kind
        self.qkv = nn.Linear(dim, 3 * dim)
        # qk-norm per head: LayerNorm, a fused kernel on CPU (RMSNorm is ~5 ops there)
        self.q_norm = nn.LayerNorm(dim // num_heads, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(dim // num_heads, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        group = {} if self.kind == "full" else {"t": frames}
        q, k, v = rearrange(self.qkv(x), _QKV_IN[self.kind], k=3, h=self.num_heads, **group)
        out = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v)  # (batch, h, L, e)
        return self.proj(rearrange(out, _OUT[self.kind], b=x.shape[0]))  # (B, N, D)


class Block(nn.Module):
    """Pre-norm transformer block with adaLN-Zero: gates start at 0, so the block starts as identity."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, kind: str, qk_norm: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads, kind, qk_norm)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        # Exact (erf) GELU: on CPU the tanh approximation of DiT/Latte costs 2x as much forward
        # and backward (measured: 7.7 vs 3.5 ms on 1024 x 512), on GPU the two cost the same.
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor, frames: int) -> torch.Tensor:
        # x (B, N, D) tokens; c (B, D) conditioning; each modulation (B, 1, D)
        mods = self.adaLN_modulation(c)[:, None].chunk(6, dim=-1)
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mods
        x = torch.addcmul(x, gate_a, self.attn(modulate(self.norm1(x), shift_a, scale_a), frames))
        return torch.addcmul(x, gate_m, self.mlp(modulate(self.norm2(x), shift_m, scale_m)))


class FinalLayer(nn.Module):
    """adaLN + linear to patch values; zero-initialised, so the model outputs 0 at init."""

    def __init__(self, dim: int, patch_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, patch_dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c)[:, None].chunk(2, dim=-1)  # each (B, 1, D)
        return self.linear(modulate(self.norm(x), shift, scale))  # (B, N, patch_dim)


# --------------------------------------------------------------------------- the model


class VideoDiT(nn.Module):
    """v-prediction network on latents (B, C, T, h, w) with T = num_frames, h = latent_height,
    w = latent_width (None: latent_height, a square grid).

    `num_classes = 0`: unconditional. Set `activation_checkpointing = True` to recompute each
    block's forward in the backward pass (activation memory of one block, one more forward).
    """

    def __init__(self, cfg: ModelConfig, in_channels: int, num_frames: int, latent_height: int,
                 latent_width: Optional[int] = None, num_classes: int = 0):
        super().__init__()
        cfg = cfg.resolved()
        latent_width = latent_height if latent_width is None else latent_width
        check_patchable(num_frames, latent_height, latent_width, cfg.patch_t, cfg.patch_size)
        if cfg.hidden_size % 4:
            raise ConfigError(f"model.hidden_size = {cfg.hidden_size}: must be a multiple of 4 "
                              "(2-D sin-cos position embedding)")
        self.cfg, self.in_channels, self.num_classes = cfg, in_channels, num_classes
        self.input_shape = (in_channels, num_frames, latent_height, latent_width)  # (C, T, h, w)
        # (T', H', W') tokens per axis: N = T' * H' * W', S = H' * W' per latent frame
        self.grid = (num_frames // cfg.patch_t, latent_height // cfg.patch_size, latent_width // cfg.patch_size)
        patch_dim = in_channels * cfg.patch_t * cfg.patch_size ** 2
        dim = cfg.hidden_size

        self.x_embed = nn.Linear(patch_dim, dim)
        self.register_buffer("pos_embed", video_pos_embed(dim, self.grid), persistent=False)  # (1, N, D)
        self.t_embed = TimestepEmbedder(dim)
        self.y_embed = LabelEmbedder(num_classes, dim, cfg.class_dropout) if num_classes > 0 else None
        self.blocks = nn.ModuleList(
            Block(dim, cfg.num_heads, cfg.mlp_ratio, kind, cfg.qk_norm) for kind in self.block_kinds(cfg))
        self.final_layer = FinalLayer(dim, patch_dim)
        self.activation_checkpointing = False  # set by the trainer
        self.initialize_weights()

    @staticmethod
    def block_kinds(cfg: ModelConfig) -> list[str]:
        if cfg.attention == "full":
            return ["full"] * cfg.depth
        return ["spatial" if i % 2 == 0 else "temporal" for i in range(cfg.depth)]

    @property
    def null_class_id(self) -> Optional[int]:
        """Label meaning "no class" (= num_classes); None for an unconditional model."""
        return self.y_embed.null_class_id if self.y_embed is not None else None

    def initialize_weights(self) -> None:
        """As facebookresearch/DiT: xavier linears, N(0, 0.02) embeddings, zero adaLN and output."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.t_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embed.mlp[2].weight, std=0.02)
        if self.y_embed is not None:
            nn.init.normal_(self.y_embed.table.weight, std=0.02)
        for layer in [b.adaLN_modulation[-1] for b in self.blocks] + [
                self.final_layer.adaLN_modulation[-1], self.final_layer.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def num_params(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def condition(self, t: torch.Tensor, y: Optional[torch.Tensor], batch: int) -> torch.Tensor:
        """(B, D) conditioning vector c = emb(t) + emb(y); y = None is the null class."""
        t = t.expand(batch) if t.ndim == 0 else t  # (B,)
        c = self.t_embed(t)
        if self.y_embed is None:
            if y is not None:
                raise ValueError("class labels given to an unconditional model (num_classes = 0)")
            return c
        if y is None:
            y = torch.full((batch,), self.null_class_id, dtype=torch.long, device=c.device)
        return c + self.y_embed(y)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x (B, C, T, h, w), t (B,) timesteps, y (B,) class ids or None -> v (B, C, T, h, w)."""
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"VideoDiT built for latents (B, {', '.join(map(str, self.input_shape))}) "
                             f"got {tuple(x.shape)}")
        p, pt = self.cfg.patch_size, self.cfg.patch_t
        tokens = self.x_embed(patchify(x, pt, p)) + self.pos_embed  # (B, N, D), N = T' * S
        c = self.condition(t, y, x.shape[0])  # (B, D)
        for block in self.blocks:
            if self.activation_checkpointing and torch.is_grad_enabled():
                tokens = checkpoint(block, tokens, c, self.grid[0], use_reentrant=False)
            else:
                tokens = block(tokens, c, self.grid[0])
        out = self.final_layer(tokens, c)  # (B, N, pt * p * p * C)
        return unpatchify(out, self.grid, pt, p)  # (B, C, T, h, w)
