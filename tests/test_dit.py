"""VideoDiT: patch round trips, zero init, attention grouping, class dropout. CPU, tiny sizes."""
import pytest
import torch

from models.dit import Block, VideoDiT, patchify, unpatchify
from utils.config import ModelConfig
from utils.errors import ConfigError

C = 4  # latent channels


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(hidden_size=32, depth=2, num_heads=2, patch_size=2, patch_t=1, class_dropout=0.1)
    return ModelConfig(**{**base, **kw})


def randomize_zero_init(model: torch.nn.Module) -> None:
    """Give the zero-initialised adaLN / output layers random weights, so every path is live."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(std=0.1)


def latents(b: int, t: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, C, t, size, size, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- patches


@pytest.mark.parametrize("frames,patch_t", [(5, 1), (7, 1), (6, 2), (1, 1)])
def test_patchify_round_trip_is_exact(frames, patch_t):
    x = latents(2, frames, 8)
    tokens = patchify(x, patch_t, 2)
    assert tokens.shape == (2, (frames // patch_t) * 4 * 4, patch_t * 2 * 2 * C)
    assert torch.equal(unpatchify(tokens, (frames // patch_t, 4, 4), patch_t, 2), x)


def test_patchify_groups_neighbouring_pixels():
    x = latents(1, 2, 4)
    tokens = patchify(x, 1, 2)  # (1, 2 * 2 * 2, 2 * 2 * C)
    first = tokens[0, 0].reshape(2, 2, C)  # (ph, pw, c) of frame 0, top-left patch
    assert torch.equal(first, x[0, :, 0, :2, :2].permute(1, 2, 0))


@pytest.mark.parametrize("frames,patch_t", [(5, 1), (7, 1), (6, 2)])
def test_output_shape_equals_input_shape(frames, patch_t):
    model = VideoDiT(tiny_cfg(patch_t=patch_t), C, frames, 8)
    x = latents(2, frames, 8)
    assert model(x, torch.tensor([3, 999])).shape == x.shape


def test_patch_mismatch_raises_config_error_naming_key():
    with pytest.raises(ConfigError, match=r"model\.patch_size = 3.*8x8"):
        VideoDiT(tiny_cfg(patch_size=3), C, 4, 8)
    with pytest.raises(ConfigError, match=r"model\.patch_t = 2.*5 latent frames"):
        VideoDiT(tiny_cfg(patch_t=2), C, 5, 8)
    with pytest.raises(ConfigError, match=r"model\.patch_size"):
        patchify(latents(1, 4, 6), 1, 4)


def test_wrong_channels_or_an_unpatchable_grid_is_refused():
    model = VideoDiT(tiny_cfg(), C, 4, 8)
    with pytest.raises(ValueError, match=r"latents \(B, C=4, T, h, w\)"):
        model(torch.zeros(1, 3, 4, 8, 8), torch.tensor([1]))
    with pytest.raises(ConfigError, match=r"model\.patch_size = 2 does not divide the latent size 7x8"):
        model(torch.zeros(1, C, 4, 7, 8), torch.tensor([1]))


@pytest.mark.parametrize("positions", ["sincos", "rope"])
@pytest.mark.parametrize("grid", [(5, 8, 8), (1, 4, 12), (3, 12, 4), (4, 8, 8)])
def test_any_grid_equals_a_model_built_for_it(grid, positions):
    """Buckets: a DiT built for 4 x 8 x 8 latents takes any other grid, and its output there is
    what a DiT built for that grid (the same weights) gives; the tables are cached per grid."""
    torch.manual_seed(0)
    model = VideoDiT(tiny_cfg(positions=positions), C, 4, 8, num_classes=3)
    randomize_zero_init(model)
    own = VideoDiT(tiny_cfg(positions=positions), C, grid[0], grid[1], grid[2], num_classes=3)
    own.load_state_dict(model.state_dict())
    model.eval(), own.eval()  # no label dropout
    x = torch.randn(2, C, *grid, generator=torch.Generator().manual_seed(1))
    t, y = torch.tensor([3, 700]), torch.tensor([0, 2])
    out = model(x, t, y=y)
    assert out.shape == x.shape and torch.equal(out, own(x, t, y=y))
    per_frame = torch.tensor([[0] + [500] * (grid[0] - 1)] * 2)  # per-frame timesteps follow T
    assert torch.equal(model(x, per_frame, y=y), own(x, per_frame, y=y))
    tables = dict(model._pos_tables)
    # sin-cos: the reference grid uses the buffer; rope: every grid's tables are kept alike
    assert len(tables) == (0 if grid == (4, 8, 8) and positions == "sincos" else 1)
    model(x, t, y=y)
    assert all(model._pos_tables[k] is v for k, v in tables.items())  # computed once


def test_rope_scores_depend_on_the_offset_alone_and_each_block_kind_reads_its_axes():
    """model.positions = rope: after rotation q_i . k_j is a function of the (frame, row, column)
    offset of tokens i and j alone, and different offsets give different scores (each axis has
    its own channels); a spatial block's table (one frame) and a temporal block's (one position)
    give the very scores the full table gives inside a frame and along a position."""
    from diffusers.models.embeddings import apply_rotary_emb
    from models.dit import rope_split, video_rope
    grid, e = (3, 4, 5), 32
    assert rope_split(e) == (12, 10, 10) and rope_split(128) == (44, 42, 42)  # Wan's split at 128
    tables = video_rope(e, grid)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(4, 1, 1, e, generator=g), torch.randn(4, 1, 1, e, generator=g)  # 4 pairs

    def scores(kind: str, n: int) -> torch.Tensor:
        rq = apply_rotary_emb(q.expand(4, 1, n, e), tables[kind])[:, 0].double()
        rk = apply_rotary_emb(k.expand(4, 1, n, e), tables[kind])[:, 0].double()
        return rq @ rk.transpose(1, 2)  # (4, n, n): each pair the same at every token, so only positions differ

    full = scores("full", 60)
    where = [(t, r, c) for t in range(3) for r in range(4) for c in range(5)]  # frame-major
    by_offset: dict = {}
    for i, a in enumerate(where):
        for j, b in enumerate(where):
            by_offset.setdefault(tuple(x - y for x, y in zip(a, b)), []).append(full[:, i, j])
    assert len(by_offset) == 5 * 7 * 9
    assert max((torch.stack(v) - v[0]).abs().max().item() for v in by_offset.values()) < 1e-5
    firsts = torch.stack([v[0] for v in by_offset.values()])  # (offsets, 4)
    assert (torch.cdist(firsts, firsts) + torch.eye(len(firsts))).min() > 1e-3  # distinct offsets, distinct scores
    assert torch.allclose(scores("spatial", 20), full[:, 40:60, 40:60], atol=1e-5)  # frame 2
    along = [7, 27, 47]  # row 1, column 2 of each frame
    assert torch.allclose(scores("temporal", 3), full[:, along][:, :, along], atol=1e-5)


def test_rope_keeps_the_parameters_and_moves_position_into_attention():
    """The same state dict as sin-cos (no buffer, no parameter added): a sin-cos model's weights
    load into a rope one; nothing is added to the tokens, and the output differs from sin-cos'."""
    torch.manual_seed(0)
    sincos = VideoDiT(tiny_cfg(), C, 4, 8, num_classes=3)
    randomize_zero_init(sincos)
    rope = VideoDiT(tiny_cfg(positions="rope"), C, 4, 8, num_classes=3)
    rope.load_state_dict(sincos.state_dict())
    assert rope.pos_embed is None and "pos_embed" not in dict(rope.named_buffers())
    sincos.eval(), rope.eval()
    x, t, y = latents(2, 4, 8), torch.tensor([3, 700]), torch.tensor([0, 2])
    a, b = sincos(x, t, y), rope(x, t, y)
    assert a.shape == b.shape and (a - b).abs().max() > 1e-3
    cfg = tiny_cfg(positions="rope", hidden_size=24, num_heads=4)  # head dim 6: too few channels
    with pytest.raises(ConfigError, match=r"model\.positions = rope: head dim 6 .* at least 8 channels"):
        cfg.validate()


def test_preset_sets_sizes():
    model = VideoDiT(ModelConfig(preset="DiT-T/4", depth=1), C, 2, 8)
    assert model.cfg.hidden_size == 192 and model.cfg.patch_size == 4 and len(model.blocks) == 6


# --------------------------------------------------------------------------- init and training


def test_zero_init_output_then_one_step_trains_every_block():
    torch.manual_seed(0)
    model = VideoDiT(tiny_cfg(depth=4), C, 3, 4, num_classes=3)
    x, t, y = latents(2, 3, 4), torch.tensor([10, 500]), torch.tensor([0, 2])
    assert torch.equal(model(x, t, y), torch.zeros_like(x))  # adaLN-Zero final layer

    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(3):  # step 1 opens the output layer, step 2 the block gates
        opt.zero_grad()
        out = model(x, t, y)
        if step == 0:
            first = out
        (out - x).square().mean().backward()
        if step == 1:  # gradient reaches every block through its gate
            assert all(b.adaLN_modulation[-1].weight.grad.abs().sum() > 0 for b in model.blocks)
        opt.step()
    assert not torch.equal(model(x, t, y), first)
    opt.zero_grad()
    (model(x, t, y) - x).square().mean().backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert dead == []


def test_activation_checkpointing_gives_same_output_and_grads():
    model = VideoDiT(tiny_cfg(), C, 3, 4, num_classes=2)
    randomize_zero_init(model)
    x, t, y = latents(2, 3, 4), torch.tensor([10, 500]), torch.tensor([0, 1])
    model.eval()  # no label dropout, so both passes see the same labels
    grads = []
    for flag in (False, True):
        model.zero_grad()
        model.activation_checkpointing = flag
        out = model(x, t, y)
        out.square().sum().backward()
        grads.append((out.detach(), model.blocks[0].attn.qkv.weight.grad.clone()))
    assert torch.allclose(grads[0][0], grads[1][0]) and torch.allclose(grads[0][1], grads[1][1])


def test_num_params_matches_the_published_dit_xl2():
    """facebookresearch/DiT prints "DiT Parameters: 675,129,632" for DiT-XL/2 (256 px ImageNet:
    4 x 32 x 32 latents, 1000 classes). Ours on one frame of the same latents differs by two
    documented design choices only: the sin-cos position table is a buffer here (DiT keeps it
    as a frozen nn.Parameter: 256 tokens x 1152 = 294,912), and the output is v alone (DiT's
    learn_sigma doubles it: 1152 x 16 + 16 = 18,448 more in the final linear). Built on the
    meta device: counting needs no 2.7 GB of weights."""
    cfg = ModelConfig(preset="DiT-XL/2", qk_norm=False)
    with torch.device("meta"):
        model = VideoDiT(cfg, in_channels=4, num_frames=1, latent_height=32, num_classes=1000)
    assert model.num_params() == 675_129_632 - 256 * 1152 - (1152 * 16 + 16) == 674_816_272


def test_num_params_closed_form_and_trainable_only():
    """A tiny config counted by hand: hidden D, patch values P = C*pt*p*p, K classes."""
    D, depth, head_dim, r, P, K = 32, 2, 16, 4, C * 1 * 2 * 2, 2
    block = (D * 3 * D + 3 * D) + 2 * (2 * head_dim) + (D * D + D) \
        + (D * r * D + r * D + r * D * D + D) + (D * 6 * D + 6 * D)  # qkv, qk-norms, proj, mlp, adaLN
    expected = (P * D + D) + (256 * D + D + D * D + D) + (K + 1) * D + depth * block \
        + (D * 2 * D + 2 * D) + (D * P + P)  # x_embed, t_embed (256 freqs), y table, blocks, final
    model = VideoDiT(tiny_cfg(qk_norm=True), C, 3, 4, num_classes=K)
    assert model.num_params() == expected == 50_512
    model.y_embed.requires_grad_(False)
    assert model.num_params(trainable_only=True) == expected - (K + 1) * D


# --------------------------------------------------------------------------- attention grouping


def changed_frames(model, x, frame: int) -> set[int]:
    """Latent frames whose output moves when input `frame` is perturbed."""
    x2 = x.clone()
    x2[:, :, frame] += torch.randn_like(x2[:, :, frame])
    t = torch.tensor([100] * x.shape[0])
    with torch.no_grad():
        diff = (model(x2, t) - model(x, t)).abs().amax(dim=(0, 1, 3, 4))  # (T,)
    return {i for i, d in enumerate(diff.tolist()) if d > 1e-6}


@pytest.mark.parametrize("attention", ["factorized", "full"])
def test_both_attention_kinds_run_and_backprop(attention):
    model = VideoDiT(tiny_cfg(attention=attention), C, 5, 4)
    randomize_zero_init(model)
    out = model(latents(2, 5, 4), torch.tensor([0, 999]))
    out.sum().backward()
    assert out.shape == (2, C, 5, 4, 4) and model.blocks[0].attn.qkv.weight.grad.any()


def test_spatial_attention_stays_within_its_frame():
    # depth 1 factorised = one spatial block: a frame can only influence itself
    spatial_only = VideoDiT(tiny_cfg(depth=1), C, 5, 4)
    randomize_zero_init(spatial_only)
    assert spatial_only.blocks[0].attn.kind == "spatial"
    x = latents(2, 5, 4)
    assert changed_frames(spatial_only, x, frame=2) == {2}
    # the same probe does see mixing, through temporal attention or full attention
    for cfg in (tiny_cfg(depth=2), tiny_cfg(depth=1, attention="full")):
        model = VideoDiT(cfg, C, 5, 4)
        randomize_zero_init(model)
        assert changed_frames(model, x, frame=2) == {0, 1, 2, 3, 4}


@pytest.mark.parametrize("kind", ["spatial", "temporal", "full"])
def test_block_mixes_exactly_its_group(kind):
    frames, per_frame, dim = 3, 4, 16
    block = Block(dim, 2, 2.0, kind, qk_norm=True)
    randomize_zero_init(block)
    x = torch.randn(2, frames * per_frame, dim)  # (B, T*S, D)
    c = torch.randn(2, dim)
    x2 = x.clone()
    x2[:, 1 * per_frame + 2] += torch.randn(dim)  # token (frame 1, position 2); not a constant,
    # which LayerNorm would erase
    with torch.no_grad():
        moved = (block(x2, c, frames) - block(x, c, frames)).abs().amax(dim=(0, 2)) > 1e-6  # (T*S,)
    moved = moved.reshape(frames, per_frame)  # (T, S)
    expected = torch.zeros(frames, per_frame, dtype=torch.bool)
    if kind == "spatial":
        expected[1, :] = True
    elif kind == "temporal":
        expected[:, 2] = True
    else:
        expected[:] = True
    assert torch.equal(moved, expected)


# --------------------------------------------------------------------------- classes


def test_null_class_and_dropout_only_in_training():
    model = VideoDiT(tiny_cfg(class_dropout=0.5), C, 1, 2, num_classes=3)
    assert model.null_class_id == 3 and model.y_embed.table.num_embeddings == 4
    y = torch.randint(0, 3, (2000,), generator=torch.Generator().manual_seed(0))
    table = model.y_embed.table.weight
    model.eval()
    assert torch.equal(model.y_embed(y), table[y])
    model.train()
    dropped = (model.y_embed(y) == table[3]).all(dim=1).float().mean().item()
    assert 0.45 < dropped < 0.55


def test_y_none_is_the_null_class_and_unconditional_refuses_labels():
    model = VideoDiT(tiny_cfg(), C, 2, 4, num_classes=3).eval()
    randomize_zero_init(model)
    x, t = latents(2, 2, 4), torch.tensor([5, 5])
    assert torch.equal(model(x, t, None), model(x, t, torch.tensor([3, 3])))
    assert not torch.equal(model(x, t, torch.tensor([0, 0])), model(x, t, None))
    uncond = VideoDiT(tiny_cfg(), C, 2, 4)
    assert uncond.null_class_id is None
    with pytest.raises(ValueError, match="unconditional"):
        uncond(x, t, torch.tensor([0, 1]))


def test_float_and_int_timesteps_agree():
    model = VideoDiT(tiny_cfg(), C, 2, 4).eval()
    randomize_zero_init(model)
    x = latents(2, 2, 4)
    assert torch.allclose(model(x, torch.tensor([7, 999])), model(x, torch.tensor([7.0, 999.0])))


def test_compiled_buckets_compile_each_shape_once_per_grad_mode():
    """torch.compile over bucket shapes (dynamo alone, backend eager: no code generation): with
    the tables made beforehand (`prepare_grids`, what stage 2 does for data.buckets) each shape
    compiles once in training and once under no_grad, and a second pass compiles nothing; the
    limit `allow_recompiles` sets holds them all (dynamo's default, 8, would not)."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    from training.parallel import allow_recompiles
    shapes = [(C, 4, 6, 10), (C, 4, 10, 6), (C, 1, 8, 8)]
    with torch._dynamo.config.patch(recompile_limit=8):
        assert allow_recompiles(len(shapes)) == (8, 20) and allow_recompiles(len(shapes)) is None
        assert torch._dynamo.config.recompile_limit == 20
    model = VideoDiT(tiny_cfg(positions="rope"), C, 4, 8, num_classes=3)  # sincos: the same cache
    model.prepare_grids(shapes, torch.device("cpu"))
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="eager")
    graphs = []
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            for _ in range(2):
                for shape in shapes:
                    batch = 2 if shape[1] > 1 else 5
                    compiled(torch.randn(batch, *shape), torch.rand(batch) * 999, torch.zeros(batch, dtype=torch.long))
                graphs.append(counters["stats"]["unique_graphs"])
    torch._dynamo.reset()
    assert graphs == [3, 3, 6, 6]
