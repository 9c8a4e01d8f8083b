"""The video DiT: latents (B, C, T, h, w) + timestep (+ class or text) -> output, same shape.

Design (DiT, Peebles & Xie 2023; Latte, Ma et al. 2024):
- Tokens: non-overlapping `patch_t x patch x patch` patches, flattened and linearly embedded
  (a linear layer on rearranged patches is a Conv3d with stride = kernel, and patchify is then
  the very code the round-trip test checks). Token order is frame-major: n = t * S + s, where
  S = (h / patch) * (w / patch) tokens per latent frame.
- Position (`model.positions`), a function of the token grid alone either way, so the network
  takes latents of any grid (aspect-ratio and duration buckets, `data.buckets`). Row r and
  column c mean the same position in every grid: a taller frame has more rows, not rescaled ones.
  `sincos` (the default): fixed sin-cos, separable: a 2-D spatial table (half the channels for
  rows, half for columns) plus a 1-D temporal table, summed and added once to the tokens. The
  table of the grid the model was built for is a buffer (the numbers it always had, op for op),
  any other grid's is computed once and kept per (grid, device).
  `rope`: 3-D rotary positions (RoFormer; Wan's split of a head's channels: 2 * (E // 6) for
  rows, as many for columns, the rest for frames) rotate every self-attention's queries and keys
  after qk-norm, so attention sees relative offsets only; nothing is added to the tokens and no
  parameter changes. diffusers' `get_1d_rotary_pos_embed` makes each axis' cos / sin and
  `apply_rotary_emb` rotates. A spatial block's tokens share a frame and a temporal block's a
  position, so their tables are the full table's first frame and first position (the rotation
  of the axis they share cancels in q . k).
- Blocks: pre-norm transformer blocks with adaLN-Zero conditioning on c = emb(t) + emb(y)
  (+ emb(pooled text)).
  `model.attention = "factorized"` alternates spatial blocks (the S tokens of one frame attend
  to each other) and temporal blocks (the T tokens at one spatial position attend to each
  other), as Latte; `"full"` attends over all T * S tokens in every block. Every block keeps
  the tokens as (B, N, D); only attention regroups them, from one fused qkv projection.
  qk-norm (`model.qk_norm`) is a LayerNorm over each head's q and k.
- Classes: an embedding table with one extra row, the null class `null_class_id =
  num_classes`, used for label dropout in training and for the unconditional half of
  classifier-free guidance (pass y = null_class_id; y = None means unconditional too).
- Text (PixArt-alpha / Latte-T2V): the encoder's hidden states (B, L, text_dim) go through a
  caption projection (Linear -> GELU(tanh) -> Linear, diffusers' PixArtAlphaTextProjection) to
  the hidden size once per forward; every block then adds `x + cross_attn(norm(x), text, mask)`
  after self-attention and before the MLP, its output projection zero-initialised, so a fresh
  text model computes exactly what the same model without text computes. Queries attend to the
  text independently, so factorised and full blocks share one cross-attention on the (B, N, D)
  tokens: no regrouping, no copy of the text per frame (Latte-T2V repeats it per frame only
  because its tokens are laid out (B*T, S, D)). A CLIP-style pooled vector (`pooled_dim` > 0)
  goes through a small MLP (last layer zero) into the adaLN conditioning c, as Open-Sora 2.0.
- The null caption (caption dropout, the unconditional half of guidance) is a LEARNED null
  token that the model owns, as the null class is a learned row of the class table, not the
  encoding of "" (diffusers pipelines, Open-Sora 2.0). Why: (1) train and predict use the same
  null by construction, with no encoder call and no cached "" embedding to keep in step (the
  diffusers PixArt port trains on one null and samples with another); (2) it is one token in
  the hidden space, independent of the encoder's max_length and padding; (3) it is trained by
  every dropped caption. The null token is also the first key of EVERY caption's sequence
  ([null | caption tokens]) and is never masked, so a mask with no real token (an all-padding
  row, a dropped caption) is simply the null condition: softmax never sees an empty row and
  gives no NaN, and dropping a caption is masking its tokens (`drop_text`). A caption's
  queries may also read the null token (a constant "attention sink" the model can use or not).
  A negative prompt at predict is an ordinary caption, not the null.
- Per-frame timesteps (first-frame conditioning and extension; the per-token timesteps of
  LTX-Video and Open-Sora 1.2): t may be (B, T) with one timestep per latent frame (the clean
  condition frames at t = 0; with patch_t > 1 the frames of one temporal patch share one t).
  c is then (B, T', D), computed per frame, and every adaLN modulation (blocks and final
  layer) broadcasts over the S tokens of a frame through a (B, T', S, D) view: no per-token
  Linear. With t of shape (B,) the computation is today's, op for op. Which frames are clean,
  their noise and their loss mask are the objective's business, not the network's.

The network knows nothing of the objective: the diffusion module decides what the output means.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

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


def check_condition_frames(cfg: ModelConfig, num_frames: int) -> None:
    """Raise ConfigError when first-frame conditioning would give every latent frame of the
    `num_frames` as the condition (nothing left to generate)."""
    if cfg.first_frame_conditioning > 0 and cfg.condition_frames >= num_frames:
        raise ConfigError(f"model.condition_frames = {cfg.condition_frames}: the clips have only "
                          f"{num_frames} latent frames (from data.num_frames), so nothing would be "
                          f"left to generate; give fewer, e.g. model.condition_frames = 1")


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


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """A head's channels rotated by (frame, row, column), as Wan: 2 * (E // 6) for rows and for
    columns, the rest for frames (all even: pairs never straddle two axes)."""
    side = 2 * (head_dim // 6)
    return head_dim - 2 * side, side, side


def video_rope(head_dim: int, grid: tuple[int, int, int]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """3-D rotary tables of a token grid (T', H', W') for each attention kind: kind -> (cos, sin),
    each (L, head_dim) float32 in the interleaved-pairs layout of diffusers' apply_rotary_emb:
    `full` over all N tokens (frame-major), `spatial` over one frame's S tokens (frame 0),
    `temporal` over one position's T' tokens (row 0, column 0)."""
    from diffusers.models.embeddings import get_1d_rotary_pos_embed
    t, h, w = grid
    axes = [get_1d_rotary_pos_embed(dim, n, use_real=True, freqs_dtype=torch.float64)
            for dim, n in zip(rope_split(head_dim), grid)]  # per axis (cos, sin), each (n, dim)
    index = (torch.arange(t).repeat_interleave(h * w), torch.arange(h).repeat_interleave(w).repeat(t),
             torch.arange(w).repeat(t * h))  # frame, row, column of token n
    cos, sin = (torch.cat([axis[part][i] for axis, i in zip(axes, index)], dim=1).float() for part in (0, 1))
    s = h * w
    return {"full": (cos, sin), "spatial": (cos[:s].contiguous(), sin[:s].contiguous()),
            "temporal": (cos[::s].contiguous(), sin[::s].contiguous())}


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


class TextEmbedder(nn.Module):
    """Encoder hidden states -> the keys/values of every block's cross-attention, and an
    optional pooled vector -> an addition to c. See the module docstring for the null token."""

    def __init__(self, text_dim: int, pooled_dim: int, hidden: int, dropout: float):
        super().__init__()
        # Imported here: diffusers costs ~2 s to import, and only text models need it.
        from diffusers.models.embeddings import PixArtAlphaTextProjection
        self.dropout = dropout  # probability of the null caption in training (when drop is not given)
        self.proj = PixArtAlphaTextProjection(text_dim, hidden)  # linear_1 -> GELU(tanh) -> linear_2
        self.null = nn.Parameter(torch.zeros(1, 1, hidden))  # (1, 1, D) the null caption token
        self.pooled = None
        if pooled_dim > 0:
            self.pooled = nn.Sequential(nn.Linear(pooled_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
            self.null_pooled = nn.Parameter(torch.zeros(hidden))  # (D,) pooled part of the null

    def forward(self, text: Optional[torch.Tensor], mask: Optional[torch.Tensor],
                pooled: Optional[torch.Tensor], drop: Optional[torch.Tensor], batch: int
                ) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """-> keys (B, 1 + L, D) = [null | projected text], their mask (B, 1 + L) bool (None: all
        real) and the pooled embedding (B, D) (None without pooled_dim). text None: the null."""
        null = self.null.expand(batch, -1, -1)  # (B, 1, D)
        if text is None:
            if mask is not None or pooled is not None:
                raise ValueError("text_mask / pooled given without text: pass the encoder's tokens too")
            pooled_emb = None if self.pooled is None else self.null_pooled.expand(batch, -1)  # (B, D)
            return null, None, pooled_emb
        if text.ndim != 3 or text.shape[0] != batch or text.shape[2] != self.proj.linear_1.in_features:
            raise ValueError(f"text must be (B={batch}, L, {self.proj.linear_1.in_features}) encoder "
                             f"hidden states, got {tuple(text.shape)}")
        if mask is not None and mask.shape != text.shape[:2]:
            raise ValueError(f"text_mask must be (B, L) = {tuple(text.shape[:2])}, got {tuple(mask.shape)}")
        if self.training and drop is None and self.dropout > 0:
            drop = torch.rand(batch, device=text.device) < self.dropout  # (B,) caption dropout
        if drop is not None:  # a dropped caption: all its tokens masked, the null token remains
            base = torch.ones(text.shape[:2], dtype=torch.bool, device=text.device) if mask is None else mask
            mask = base.bool() & ~drop.bool()[:, None]  # (B, L)
        # Cached embeddings may be stored in the encoder's dtype (bf16/fp16): compute in the model's.
        projected = self.proj(text.to(self.proj.linear_1.weight.dtype))  # (B, L, D)
        keys = torch.cat([null.to(projected.dtype), projected], dim=1)  # (B, 1 + L, D)
        if mask is not None:
            mask = torch.cat([mask.new_ones(batch, 1, dtype=torch.bool), mask.bool()], dim=1)  # (B, 1 + L)
        return keys, mask, self._pooled(pooled, drop, batch)

    def _pooled(self, pooled: Optional[torch.Tensor], drop: Optional[torch.Tensor],
                batch: int) -> Optional[torch.Tensor]:
        """(B, pooled_dim) -> (B, D), the null's pooled part where `drop`."""
        if self.pooled is None:
            if pooled is not None:
                raise ValueError("pooled text given to a model built without pooled_dim")
            return None
        if pooled is None:
            raise ValueError(f"this model reads a pooled text vector (pooled_dim = "
                             f"{self.pooled[0].in_features}): pass pooled (B, pooled_dim) with the text")
        emb = self.pooled(pooled.to(self.pooled[0].weight.dtype))  # (B, D)
        # null_pooled always in the graph (a zero gradient when nothing is dropped): DDP requires
        # every parameter to take part in each step
        null = torch.zeros(batch, dtype=torch.bool, device=emb.device) if drop is None else drop.bool()
        return torch.where(null[:, None], self.null_pooled.to(emb.dtype), emb)


# --------------------------------------------------------------------------- blocks


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x * (1 + scale) + shift; x (B, N, D), shift/scale (B, 1, D); or per frame x (B, T', S, D),
    shift/scale (B, T', 1, D)."""
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
    """Multi-head self-attention over `kind` groups of tokens, with optional qk-norm and, given
    `rope` tables (`video_rope`), rotary positions on the queries and keys."""

    def __init__(self, dim: int, num_heads: int, kind: str, qk_norm: bool):
        super().__init__()
        self.num_heads, self.kind = num_heads, kind
        self.qkv = nn.Linear(dim, 3 * dim)
        # qk-norm per head: LayerNorm, a fused kernel on CPU (RMSNorm is ~5 ops there)
        self.q_norm = nn.LayerNorm(dim // num_heads, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(dim // num_heads, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, frames: int, rope: Optional[dict] = None) -> torch.Tensor:
        group = {} if self.kind == "full" else {"t": frames}
        q, k, v = rearrange(self.qkv(x), _QKV_IN[self.kind], k=3, h=self.num_heads, **group)
        q, k = self.q_norm(q), self.k_norm(k)  # (batch, h, L, e)
        if rope is not None:
            from diffusers.models.embeddings import apply_rotary_emb  # loaded by video_rope already
            q, k = apply_rotary_emb(q, rope[self.kind]), apply_rotary_emb(k, rope[self.kind])
        out = F.scaled_dot_product_attention(q, k, v)  # (batch, h, L, e)
        return self.proj(rearrange(out, _OUT[self.kind], b=x.shape[0]))  # (B, N, D)


class CrossAttention(nn.Module):
    """Tokens (B, N, D) attend to text keys (B, L, D), padding masked out; any block kind (each
    query reads the text on its own, so no grouping of the tokens is needed)."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.q_norm = nn.LayerNorm(dim // num_heads, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(dim // num_heads, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)  # zero-initialised: a fresh layer adds nothing

    def forward(self, x: torch.Tensor, text: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        q = rearrange(self.q(x), "b n (h e) -> b h n e", h=self.num_heads)
        k, v = rearrange(self.kv(text), "b l (k h e) -> k b h l e", k=2, h=self.num_heads)
        mask = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, L): True = attend
        out = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v, attn_mask=mask)  # (B, h, N, e)
        return self.proj(rearrange(out, "b h n e -> b n (h e)"))  # (B, N, D)


class Block(nn.Module):
    """Pre-norm transformer block with adaLN-Zero: gates start at 0, so the block starts as identity.
    `text`: a cross-attention to the text between self-attention and the MLP (PixArt-alpha)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, kind: str, qk_norm: bool,
                 text: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads, kind, qk_norm)
        self.cross_attn = None
        if text:  # unmodulated by t (as PixArt), so its norm keeps its own affine parameters
            self.norm_cross = nn.LayerNorm(dim, eps=1e-6)
            self.cross_attn = CrossAttention(dim, num_heads, qk_norm)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        # Exact (erf) GELU: on CPU the tanh approximation of DiT/Latte costs 2x as much forward
        # and backward (measured: 7.7 vs 3.5 ms on 1024 x 512), on GPU the two cost the same.
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor, frames: int, text: Optional[torch.Tensor] = None,
                text_mask: Optional[torch.Tensor] = None, rope: Optional[dict] = None) -> torch.Tensor:
        # x (B, N, D) tokens, N = T' * S; c (B, D) one conditioning per clip, or (B, T', D) one per
        # latent frame; text (B, L, D) cross-attention keys, text_mask (B, L) bool or None;
        # rope: the grid's rotary tables (model.positions = rope) or None
        tokens = x.shape  # (B, N, D): attention works on this layout
        if c.ndim == 3:
            x = x.view(tokens[0], frames, -1, tokens[2])  # (B, T', S, D): a view, no copy
        mods = self.adaLN_modulation(c).unsqueeze(-2).chunk(6, dim=-1)  # each (B, 1, D) or (B, T', 1, D)
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mods
        h = self.attn(modulate(self.norm1(x), shift_a, scale_a).view(tokens), frames, rope)  # (B, N, D)
        x = torch.addcmul(x, gate_a, h.view(x.shape))
        if self.cross_attn is not None:
            x = x + self.cross_attn(self.norm_cross(x).view(tokens), text, text_mask).view(x.shape)
        x = torch.addcmul(x, gate_m, self.mlp(modulate(self.norm2(x), shift_m, scale_m)))
        return x.view(tokens)  # (B, N, D)


class FinalLayer(nn.Module):
    """adaLN + linear to patch values; zero-initialised, so the model outputs 0 at init."""

    def __init__(self, dim: int, patch_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, patch_dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor, frames: int) -> torch.Tensor:
        # x (B, N, D); c (B, D), or (B, T', D) per latent frame (modulated through a (B, T', S, D) view)
        batch, n, dim = x.shape
        if c.ndim == 3:
            x = x.view(batch, frames, -1, dim)  # (B, T', S, D)
        shift, scale = self.adaLN_modulation(c).unsqueeze(-2).chunk(2, dim=-1)  # each (B, 1, D) or (B, T', 1, D)
        return self.linear(modulate(self.norm(x), shift, scale)).view(batch, n, -1)  # (B, N, patch_dim)


# --------------------------------------------------------------------------- the model


class Condition(NamedTuple):
    """What the DiT is told besides (x_t, t), batch-first; every field may be None. A seam calls
    `model(x, t, **cond._asdict())`."""
    y: Optional[torch.Tensor] = None  # (B,) class ids; null_class_id or None = no class
    text: Optional[torch.Tensor] = None  # (B, L, text_dim) encoder hidden states; None = null caption
    text_mask: Optional[torch.Tensor] = None  # (B, L) bool, True = a real token; None = all real
    pooled: Optional[torch.Tensor] = None  # (B, pooled_dim) pooled text (CLIP), with text
    drop_text: Optional[torch.Tensor] = None  # (B,) bool, True = the null caption for that sample


class VideoDiT(nn.Module):
    """Network on latents (B, C, T, h, w) built for T = num_frames, h = latent_height,
    w = latent_width (None: latent_height, a square grid): its reference grid (the position
    table kept as a buffer, the checkpoint's `dims`). It takes any other T, h, w that split into
    whole patches too (position tables computed per grid).

    `num_classes = 0`: no class labels. `text_dim` > 0 (the text encoder's hidden size, for
    `model.conditioning = text`): cross-attention to the text in every block; `pooled_dim` > 0
    (a CLIP encoder's pooled size) also adds the pooled vector to the adaLN conditioning. Set
    `activation_checkpointing = True` to recompute each block's forward in the backward pass
    (activation memory of one block, one more forward).
    """

    def __init__(self, cfg: ModelConfig, in_channels: int, num_frames: int, latent_height: int,
                 latent_width: Optional[int] = None, num_classes: int = 0, text_dim: int = 0,
                 pooled_dim: int = 0):
        super().__init__()
        cfg = cfg.resolved()
        latent_width = latent_height if latent_width is None else latent_width
        check_patchable(num_frames, latent_height, latent_width, cfg.patch_t, cfg.patch_size)
        if cfg.positions == "sincos" and cfg.hidden_size % 4:
            raise ConfigError(f"model.hidden_size = {cfg.hidden_size}: must be a multiple of 4 "
                              "(2-D sin-cos position embedding)")
        self._check_condition(cfg, num_frames, num_classes, text_dim, pooled_dim)
        self.cfg, self.in_channels, self.num_classes = cfg, in_channels, num_classes
        self.text_dim, self.pooled_dim = text_dim, pooled_dim
        self.input_shape = (in_channels, num_frames, latent_height, latent_width)  # (C, T, h, w)
        # (T', H', W') tokens per axis: N = T' * H' * W', S = H' * W' per latent frame
        self.grid = self.token_grid(self.input_shape)
        patch_dim = in_channels * cfg.patch_t * cfg.patch_size ** 2
        dim = cfg.hidden_size

        self.x_embed = nn.Linear(patch_dim, dim)
        if cfg.positions == "sincos":
            self.register_buffer("pos_embed", video_pos_embed(dim, self.grid), persistent=False)  # (1, N, D)
        else:
            self.pos_embed = None  # rope: positions rotate q and k in attention (`rotary`)
        self._pos_tables: dict = {}  # (grid, device) -> (1, N, D) sin-cos (other grids than self.grid) or rope tables
        self.t_embed = TimestepEmbedder(dim)
        self.y_embed = LabelEmbedder(num_classes, dim, cfg.class_dropout) if num_classes > 0 else None
        if text_dim > 0:  # only text models have these modules: other state_dicts are unchanged
            self.text_embed = TextEmbedder(text_dim, pooled_dim, dim, cfg.caption_dropout)
        else:
            self.text_embed = None
        self.blocks = nn.ModuleList(
            Block(dim, cfg.num_heads, cfg.mlp_ratio, kind, cfg.qk_norm, text=text_dim > 0)
            for kind in self.block_kinds(cfg))
        self.final_layer = FinalLayer(dim, patch_dim)
        self.activation_checkpointing = False  # set by the trainer
        self.initialize_weights()

    @staticmethod
    def _check_condition(cfg: ModelConfig, num_frames: int, num_classes: int, text_dim: int,
                         pooled_dim: int) -> None:
        """The constructor's condition arguments agree with model.conditioning (resolved)."""
        if (text_dim > 0) != (cfg.conditioning == "text"):
            raise ConfigError(f"model.conditioning = {cfg.conditioning} but the DiT was given text_dim = "
                              f"{text_dim}: a text model needs the text encoder's hidden size (> 0), "
                              "any other model none")
        if num_classes > 0 and cfg.conditioning != "class":
            raise ConfigError(f"model.conditioning = {cfg.conditioning} but the DiT was given "
                              f"num_classes = {num_classes}; class labels need conditioning class")
        if pooled_dim > 0 and text_dim == 0:
            raise ConfigError(f"pooled_dim = {pooled_dim} needs a text model (text_dim > 0)")
        check_condition_frames(cfg, num_frames)

    @staticmethod
    def block_kinds(cfg: ModelConfig) -> list[str]:
        if cfg.attention == "full":
            return ["full"] * cfg.depth
        return ["spatial" if i % 2 == 0 else "temporal" for i in range(cfg.depth)]

    @property
    def null_class_id(self) -> Optional[int]:
        """Label meaning "no class" (= num_classes); None for a model without classes."""
        return self.y_embed.null_class_id if self.y_embed is not None else None

    def initialize_weights(self) -> None:
        """As facebookresearch/DiT: xavier linears, N(0, 0.02) embeddings, zero adaLN and output.
        Text (as PixArt-alpha): N(0, 0.02) caption projection and null token; zero cross-attention
        output and pooled-MLP output, so a fresh text model equals the model without text."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.t_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embed.mlp[2].weight, std=0.02)
        if self.y_embed is not None:
            nn.init.normal_(self.y_embed.table.weight, std=0.02)
        zeros = [b.adaLN_modulation[-1] for b in self.blocks] + [
            self.final_layer.adaLN_modulation[-1], self.final_layer.linear]
        if self.text_embed is not None:
            nn.init.normal_(self.text_embed.proj.linear_1.weight, std=0.02)
            nn.init.normal_(self.text_embed.proj.linear_2.weight, std=0.02)
            nn.init.normal_(self.text_embed.null, std=0.02)
            zeros += [b.cross_attn.proj for b in self.blocks]
            if self.text_embed.pooled is not None:
                zeros.append(self.text_embed.pooled[-1])
        for layer in zeros:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def num_params(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def condition(self, t: torch.Tensor, y: Optional[torch.Tensor], batch: int,
                  pooled_emb: Optional[torch.Tensor] = None, frames: Optional[int] = None) -> torch.Tensor:
        """Conditioning c = emb(t) + emb(y) (+ pooled text): (B, D) for t (B,) or a scalar;
        (B, T', D) for t (B, T), one timestep per latent frame (`frames` T: the latents' frames,
        None: the reference grid's). y = None is the null class."""
        if t.ndim == 2:
            t = self._frame_timesteps(t, batch, self.input_shape[1] if frames is None else frames)  # (B, T')
            c = self.t_embed(t.flatten()).view(batch, t.shape[1], -1)  # (B, T', D)
        else:
            t = t.expand(batch) if t.ndim == 0 else t  # (B,)
            c = self.t_embed(t)  # (B, D)
        if pooled_emb is not None:
            c = c + (pooled_emb if c.ndim == 2 else pooled_emb[:, None])
        if self.y_embed is None:
            if y is not None:
                raise ValueError("class labels given to an unconditional model (num_classes = 0)")
            return c
        if y is None:
            y = torch.full((batch,), self.null_class_id, dtype=torch.long, device=c.device)
        y_emb = self.y_embed(y)  # (B, D)
        return c + (y_emb if c.ndim == 2 else y_emb[:, None])

    def _frame_timesteps(self, t: torch.Tensor, batch: int, frames: int) -> torch.Tensor:
        """(B, T) one timestep per latent frame -> (B, T') one per temporal patch."""
        pt = self.cfg.patch_t
        if t.shape != (batch, frames):
            raise ValueError(f"per-frame timesteps must be (B, T) = ({batch}, {frames}), one per latent "
                             f"frame, got {tuple(t.shape)}")
        if pt == 1:
            return t
        first = t[:, ::pt]  # (B, T')
        # Checked on the device, not read on the host (a sync in every training step): the
        # callers (FirstFrames, the sampler) condition whole patches by construction, so a
        # failure is a bug in the caller. On CPU it raises here; on CUDA at a later kernel.
        torch._assert_async((first.repeat_interleave(pt, dim=1) == t).all(),
                            f"per-frame timesteps differ inside a temporal patch of model.patch_t = {pt} "
                            "latent frames; give the frames of one patch one timestep")
        return first

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None,
                text: Optional[torch.Tensor] = None, text_mask: Optional[torch.Tensor] = None,
                pooled: Optional[torch.Tensor] = None, drop_text: Optional[torch.Tensor] = None
                ) -> torch.Tensor:
        """x (B, C, T, h, w) latents; t (B,) timesteps, or (B, T) one per latent frame (clean
        condition frames: t = 0); the condition as in `Condition` (text None on a text model: the
        null caption for every sample; in training, `drop_text` None draws caption dropout at
        model.caption_dropout) -> (B, C, T, h, w), for any T, h, w that split into whole patches."""
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"VideoDiT takes latents (B, C={self.in_channels}, T, h, w), got {tuple(x.shape)}")
        p, pt = self.cfg.patch_size, self.cfg.patch_t
        grid = self.token_grid(x.shape[1:])  # (T', H', W') tokens per axis
        batch, frames = x.shape[0], grid[0]
        table, rope = self.position_inputs(grid, x.device)
        tokens = self.x_embed(patchify(x, pt, p))  # (B, N, D), N = T' * S
        if table is not None:
            tokens = tokens + table
        keys, key_mask, pooled_emb = self._text(text, text_mask, pooled, drop_text, batch)
        c = self.condition(t, y, batch, pooled_emb, x.shape[2])  # (B, D) or (B, T', D)
        for block in self.blocks:
            if self.activation_checkpointing and torch.is_grad_enabled():
                tokens = checkpoint(block, tokens, c, frames, keys, key_mask, rope, use_reentrant=False)
            else:
                tokens = block(tokens, c, frames, keys, key_mask, rope)
        out = self.final_layer(tokens, c, frames)  # (B, N, pt * p * p * C)
        return unpatchify(out, grid, pt, p)  # (B, C, T, h, w)

    def positions(self, grid: tuple[int, int, int], device: torch.device) -> torch.Tensor:
        """(1, N, D) sin-cos position table of a token grid (T', H', W'): the buffer for the
        reference grid, else computed once per (grid, device) and kept (a few KB to MB each;
        a run has a handful of buckets). Not in the state dict: it is a function of the grid."""
        if grid == self.grid:
            return self.pos_embed
        key = (grid, str(device), self.pos_embed.dtype)  # the buffer's dtype: as .to(dtype) left it
        table = self._pos_tables.get(key)
        if table is None:
            table = video_pos_embed(self.cfg.hidden_size, grid).to(device=device, dtype=self.pos_embed.dtype)
            self._pos_tables[key] = table
        return table

    def token_grid(self, latent_shape) -> tuple[int, int, int]:
        """(T', H', W') tokens per axis of latents (C, T, h, w)."""
        p, pt = self.cfg.patch_size, self.cfg.patch_t
        return latent_shape[1] // pt, latent_shape[2] // p, latent_shape[3] // p

    def position_inputs(self, grid: tuple[int, int, int], device: torch.device
                        ) -> tuple[Optional[torch.Tensor], Optional[dict]]:
        """Where the tokens of `grid` are, as model.positions says: (the sin-cos table to add,
        None) or (None, the rotary tables attention applies). Kept per grid once made."""
        if self.cfg.positions == "sincos":
            return self.positions(grid, device), None
        return None, self.rotary(grid, device)

    def prepare_grids(self, latent_shapes, device: torch.device) -> None:
        """Make and keep the position tables of every latent shape (C, T, h, w) the model will
        be called on (the buckets) before torch.compile traces it: a table made inside a compiled
        call changes the cache the next call reads, and dynamo would compile that shape twice."""
        for shape in latent_shapes:
            self.position_inputs(self.token_grid(shape), device)

    def rotary(self, grid: tuple[int, int, int], device: torch.device) -> dict:
        """The rotary tables of a token grid (`video_rope`), computed once per (grid, device) and
        kept; float32 whatever the model's dtype (apply_rotary_emb rotates in float32)."""
        key = ("rope", grid, str(device))
        tables = self._pos_tables.get(key)
        if tables is None:
            tables = {kind: tuple(a.to(device) for a in pair)
                      for kind, pair in video_rope(self.cfg.hidden_size // self.cfg.num_heads, grid).items()}
            self._pos_tables[key] = tables
        return tables

    def _text(self, text: Optional[torch.Tensor], mask: Optional[torch.Tensor], pooled: Optional[torch.Tensor],
              drop: Optional[torch.Tensor], batch: int):
        """Cross-attention keys (B, 1 + L, D), their mask (B, 1 + L) or None, pooled emb (B, D)
        or None; all None for a model without text."""
        if self.text_embed is not None:
            return self.text_embed(text, mask, pooled, drop, batch)
        if any(a is not None for a in (text, mask, pooled, drop)):
            raise ValueError("text given to a model built without text (text_dim = 0, "
                             f"model.conditioning = {self.cfg.conditioning})")
        return None, None, None
