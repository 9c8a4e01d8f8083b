"""VideoDiT conditioning: text cross-attention (zero init, masks, null caption, dropout), pooled
text, per-frame timesteps, and the model.conditioning keys. CPU, tiny sizes."""
import pytest
import torch

from models.dit import Condition, VideoDiT
from utils.config import ModelConfig, TrainRunConfig, load_config
from utils.errors import ConfigError

C, D_TEXT, D_POOL, L = 4, 12, 6, 5  # latent channels, encoder hidden size, pooled size, tokens


def cfg(**kw) -> ModelConfig:
    base = dict(hidden_size=32, depth=2, num_heads=2, patch_size=2, patch_t=1, conditioning="text")
    return ModelConfig(**{**base, **kw})


def text_model(seed: int = 0, pooled: bool = False, live: bool = True, **kw) -> VideoDiT:
    """A text model in eval mode; `live`: zero-initialised tensors given random values, so every
    path (cross-attention, pooled MLP, gates, output) carries signal."""
    torch.manual_seed(seed)
    model = VideoDiT(cfg(**kw), C, 3, 4, text_dim=D_TEXT, pooled_dim=D_POOL if pooled else 0).eval()
    if live:
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for p in model.parameters():
                if not p.any():
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


def inputs(b: int = 2, frames: int = 3, seed: int = 0):
    """x (B, C, T, 4, 4), t (B,), text (B, L, D_TEXT), mask (B, L) with the last tokens padding."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, C, frames, 4, 4, generator=g)
    t = torch.tensor([17, 640][:b] + [300] * max(0, b - 2))
    text = torch.randn(b, L, D_TEXT, generator=g)
    mask = torch.arange(L)[None].expand(b, L) < torch.tensor([3, 5][:b] + [2] * max(0, b - 2))[:, None]
    return x, t, text, mask


# --------------------------------------------------------------------------- class / none unchanged

# state_dict keys of a depth-2 class-conditional model with qk-norm, as main's code builds it
MAIN_KEYS = ["x_embed.weight", "x_embed.bias", "t_embed.mlp.0.weight", "t_embed.mlp.0.bias", "t_embed.mlp.2.weight",
             "t_embed.mlp.2.bias", "y_embed.table.weight"] + [
    f"blocks.{i}.{name}" for i in range(2) for name in [
        "attn.qkv.weight", "attn.qkv.bias", "attn.q_norm.weight", "attn.q_norm.bias", "attn.k_norm.weight",
        "attn.k_norm.bias", "attn.proj.weight", "attn.proj.bias", "mlp.0.weight", "mlp.0.bias", "mlp.2.weight",
        "mlp.2.bias", "adaLN_modulation.1.weight", "adaLN_modulation.1.bias"]] + [
    "final_layer.adaLN_modulation.1.weight", "final_layer.adaLN_modulation.1.bias", "final_layer.linear.weight",
    "final_layer.linear.bias"]


@pytest.mark.parametrize("spelling", [dict(), dict(class_conditional=True), dict(conditioning="class")])
def test_class_model_keeps_mains_keys_and_numbers(spelling):
    """Outputs of main's code (before text existed) for this seed and input: the per-clip path
    must compute exactly what it computed, so old checkpoints load and behave the same."""
    torch.manual_seed(0)
    model = VideoDiT(ModelConfig(hidden_size=32, depth=2, num_heads=2, patch_size=2, **spelling),
                     C, 3, 4, num_classes=3).eval()
    assert list(model.state_dict()) == MAIN_KEYS
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    x = torch.randn(2, C, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    out = model(x, torch.tensor([3, 700]), torch.tensor([0, 2]))
    golden = [-0.9348627924919128, 0.049957968294620514, -0.5631912350654602, 0.950666606426239,
              -0.020875193178653717, 0.8081471920013428]
    assert torch.allclose(out.flatten()[:6], torch.tensor(golden), rtol=1e-5, atol=1e-6)
    assert out.abs().sum().item() == pytest.approx(181.57083129882812, rel=1e-5)


def test_unconditional_model_has_no_text_keys():
    model = VideoDiT(ModelConfig(hidden_size=32, depth=2, num_heads=2, conditioning="none"), C, 3, 4)
    assert list(model.state_dict()) == [k for k in MAIN_KEYS if not k.startswith("y_embed")]


# --------------------------------------------------------------------------- text


@pytest.mark.parametrize("attention", ["factorized", "full"])
@pytest.mark.parametrize("pooled", [False, True])
def test_fresh_text_model_equals_the_model_without_text(attention, pooled):
    torch.manual_seed(0)
    plain = VideoDiT(cfg(attention=attention, conditioning="none"), C, 3, 4).eval()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # live gates and output layer, so the comparison is not 0 == 0
        for p in plain.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    model = text_model(attention=attention, pooled=pooled, live=False)
    missing, unexpected = model.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(
        k.startswith("text_embed.") or ".cross_attn." in k or ".norm_cross." in k for k in missing)
    x, t, text, mask = inputs()
    pooled_vec = torch.randn(2, D_POOL) if pooled else None
    expected = plain(x, t)
    assert expected.abs().sum() > 0
    assert torch.equal(model(x, t, text=text, text_mask=mask, pooled=pooled_vec), expected)
    assert torch.equal(model(x, t), expected)  # the null caption


@pytest.mark.parametrize("attention", ["factorized", "full"])
def test_padding_tokens_are_never_attended(attention):
    model = text_model(attention=attention)
    x, t, text, mask = inputs()
    out = model(x, t, text=text, text_mask=mask)
    other = torch.where(mask[..., None], text, torch.randn_like(text) * 100)  # new padding values
    assert torch.allclose(model(x, t, text=other, text_mask=mask), out, atol=1e-5)
    longer = torch.cat([text, torch.randn(2, 7, D_TEXT)], dim=1)  # 7 more padding tokens
    longer_mask = torch.cat([mask, torch.zeros(2, 7, dtype=torch.bool)], dim=1)
    assert torch.allclose(model(x, t, text=longer, text_mask=longer_mask), out, atol=1e-5)
    # ... while the real tokens matter, and the mask is what decides
    changed = text.clone()
    changed[:, 0] += 1.0
    assert not torch.allclose(model(x, t, text=changed, text_mask=mask), out, atol=1e-3)
    assert not torch.allclose(model(x, t, text=text), out, atol=1e-3)  # no mask: all 5 tokens read


def test_all_padding_rows_and_dropped_captions_are_the_null_without_nan():
    model = text_model(pooled=True)
    x, t, text, mask = inputs()
    pooled = torch.randn(2, D_POOL)
    null = model(x, t)  # text None: the null caption for every sample
    empty = model(x, t, text=text, text_mask=torch.zeros(2, L, dtype=torch.bool), pooled=pooled,
                  drop_text=torch.tensor([True, True]))
    assert torch.isfinite(empty).all() and torch.allclose(empty, null, atol=1e-5)
    # an all-padding mask alone (the pooled vector still read) stays finite
    assert torch.isfinite(model(x, t, text=text, text_mask=torch.zeros(2, L, dtype=torch.bool), pooled=pooled)).all()
    cond = model(x, t, text=text, text_mask=mask, pooled=pooled)
    half = model(x, t, text=text, text_mask=mask, pooled=pooled, drop_text=torch.tensor([True, False]))
    assert torch.allclose(half[0], null[0], atol=1e-5) and torch.allclose(half[1], cond[1], atol=1e-5)
    assert not torch.allclose(cond[0], null[0], atol=1e-3)


def test_caption_dropout_draws_the_null_at_its_rate_in_training_only():
    torch.manual_seed(0)
    model = VideoDiT(cfg(caption_dropout=0.3), C, 1, 2, text_dim=D_TEXT)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(std=0.3)
    b = 400
    x, t = torch.randn(b, C, 1, 2, 2), torch.full((b,), 500)
    text = torch.randn(b, L, D_TEXT)
    model.eval()
    null, cond = model(x, t), model(x, t, text=text)
    model.train()
    torch.manual_seed(7)
    out = model(x, t, text=text)
    is_null = (out - null).flatten(1).abs().amax(1) < 1e-5
    is_cond = (out - cond).flatten(1).abs().amax(1) < 1e-5
    assert bool((is_null ^ is_cond).all())  # every sample is one or the other
    assert 0.3 * b - 45 < is_null.sum() < 0.3 * b + 45  # ~5 standard deviations
    explicit = model(x, t, text=text, drop_text=torch.zeros(b, dtype=torch.bool))  # the seam decides
    assert torch.allclose(explicit, cond, atol=1e-5)


@pytest.mark.parametrize("attention", ["factorized", "full"])
def test_gradients_reach_the_text_path_after_one_step(attention):
    torch.manual_seed(0)
    model = VideoDiT(cfg(attention=attention), C, 3, 4, text_dim=D_TEXT, pooled_dim=D_POOL)
    with torch.no_grad():  # live gates and output layer (as after some training); text path as at init
        for name, p in model.named_parameters():
            if not p.any() and "cross_attn" not in name and not name.startswith("text_embed"):
                p.normal_(std=0.1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, t, text, mask = inputs()
    pooled = torch.randn(2, D_POOL)

    def step():
        opt.zero_grad()
        model(x, t, text=text, text_mask=mask, pooled=pooled, drop_text=torch.tensor([False, False])
              ).square().mean().backward()

    step()
    assert all(b.cross_attn.proj.weight.grad.abs().sum() > 0 for b in model.blocks)
    assert model.text_embed.pooled[-1].weight.grad.abs().sum() > 0
    opt.step()
    step()
    for name, p in model.named_parameters():
        assert p.grad is not None, name  # every parameter takes part (DDP requires it)
        if "cross_attn" in name or name.startswith("text_embed") and name != "text_embed.null_pooled":
            assert p.grad.abs().sum() > 0, name


def test_condition_tuple_is_the_forward_keywords_and_checkpointing_agrees():
    model = text_model(pooled=True)
    x, t, text, mask = inputs()
    cond = Condition(text=text, text_mask=mask, pooled=torch.randn(2, D_POOL))
    t_frames = torch.tensor([[0, 17, 17], [0, 640, 640]])
    out = model(x, t_frames, **cond._asdict())
    model.activation_checkpointing = True
    assert torch.allclose(model(x, t_frames, **cond._asdict()), out, atol=1e-6)


def test_text_cached_in_a_half_dtype_is_computed_in_the_models():
    model = text_model(pooled=True)
    x, t, text, mask = inputs()
    text, pooled = text.bfloat16(), torch.randn(2, D_POOL).bfloat16()  # as an encoder in bf16 caches them
    out = model(x, t, text=text, text_mask=mask, pooled=pooled)
    assert out.dtype == torch.float32
    assert torch.equal(out, model(x, t, text=text.float(), text_mask=mask, pooled=pooled.float()))


def test_text_arguments_are_checked():
    model = text_model(pooled=True)
    x, t, text, mask = inputs()
    with pytest.raises(ValueError, match="pooled"):
        model(x, t, text=text, text_mask=mask)  # pooled model without the pooled vector
    with pytest.raises(ValueError, match=r"text must be \(B=2, L, 12\)"):
        model(x, t, text=text[..., :5], pooled=torch.randn(2, D_POOL))
    with pytest.raises(ValueError, match="text_mask"):
        model(x, t, text=text, text_mask=mask[:, :3], pooled=torch.randn(2, D_POOL))
    plain = VideoDiT(cfg(conditioning="none"), C, 3, 4)
    with pytest.raises(ValueError, match="without text"):
        plain(x, t, text=text)


# --------------------------------------------------------------------------- per-frame timesteps


@pytest.mark.parametrize("attention", ["factorized", "full"])
@pytest.mark.parametrize("patch_t", [1, 2])
@pytest.mark.parametrize("kind", ["none", "class", "text"])
def test_per_frame_timesteps_equal_to_a_broadcast_give_the_same_output(attention, patch_t, kind):
    frames = 4
    torch.manual_seed(0)
    model = VideoDiT(cfg(attention=attention, patch_t=patch_t, conditioning=kind), C, frames, 4,
                     num_classes=3 if kind == "class" else 0, text_dim=D_TEXT if kind == "text" else 0).eval()
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(std=0.3)
    x, t, text, mask = inputs(frames=frames)
    extra = dict(y=torch.tensor([0, 2])) if kind == "class" else dict(text=text, text_mask=mask) if kind == "text" else {}
    out = model(x, t, **extra)
    per_frame = model(x, t[:, None].expand(2, frames), **extra)  # (B, T)
    assert per_frame.shape == out.shape and torch.allclose(per_frame, out, atol=1e-5)
    clean_first = t[:, None].repeat(1, frames)
    clean_first[:, :patch_t] = 0  # the first latent frame(s) given clean
    changed = model(x, clean_first, **extra)
    assert changed.shape == x.shape and not torch.allclose(changed, out, atol=1e-3)
    assert torch.isfinite(changed).all()


def test_per_frame_timesteps_are_checked():
    model = VideoDiT(cfg(patch_t=2, conditioning="none"), C, 4, 4)
    x = torch.randn(2, C, 4, 4, 4)
    with pytest.raises(ValueError, match=r"\(B, T\) = \(2, 4\)"):
        model(x, torch.zeros(2, 3))
    # checked on the device (no host sync per training step): on CPU it raises at once
    with pytest.raises(RuntimeError, match="temporal patch of model.patch_t = 2"):
        model(x, torch.tensor([[0, 5, 5, 5], [5, 5, 5, 5]]))
    assert model(x, torch.tensor([[0, 0, 5, 5], [5, 5, 9, 9]])).shape == x.shape


# --------------------------------------------------------------------------- config


def _load(*overrides):
    return load_config(TrainRunConfig, None, ["vae.path=x", *overrides])


@pytest.mark.parametrize("overrides, kind", [
    ([], "class"), (["model.class_conditional=true"], "class"), (["model.class_conditional=false"], "none"),
    (["model.conditioning=text"], "text"), (["model.conditioning=none", "model.class_conditional=false"], "none"),
    (["model.conditioning=text", "model.class_conditional=false"], "text"),
    (["model.conditioning=class", "model.class_conditional=true"], "class"),
])
def test_conditioning_resolves_from_either_key(overrides, kind):
    m = _load(*overrides).model
    assert m.conditioning_kind() == kind
    r = m.resolved()
    assert (r.conditioning, r.class_conditional) == (kind, kind == "class")
    r.validate()  # the resolved spelling is consistent


@pytest.mark.parametrize("overrides, words", [
    (["model.conditioning=text", "model.class_conditional=true"],
     ["model.class_conditional = true", "model.conditioning = text", "remove model.class_conditional"]),
    (["model.conditioning=none", "model.class_conditional=true"], ["model.class_conditional", "model.conditioning"]),
    (["model.conditioning=class", "model.class_conditional=false"], ["model.class_conditional = false"]),
    (["model.conditioning=words"], ["model.conditioning", "'words'", "'text'"]),
    (["model.caption_dropout=1.0"], ["model.caption_dropout = 1.0", "[0, 1)"]),
    (["model.first_frame_conditioning=1.5"], ["model.first_frame_conditioning = 1.5", "[0, 1]"]),
    (["model.condition_frames=0"], ["model.condition_frames = 0", ">= 1"]),
    (["model.condition_frames=3", "model.patch_t=2", "model.first_frame_conditioning=0.5"],
     ["model.condition_frames = 3", "model.patch_t = 2"]),
])
def test_conditioning_config_errors_name_the_keys(overrides, words):
    with pytest.raises(ConfigError) as e:
        _load(*overrides)
    for w in words:
        assert w in str(e.value)


def test_patch_t_alone_is_not_refused_for_first_frames_that_are_off():
    """condition_frames (default 1) counts only with model.first_frame_conditioning > 0:
    `model.patch_t=2` on its own was refused for a condition that was off."""
    assert _load("model.patch_t=2").model.patch_t == 2


def test_defaults():
    m = ModelConfig()
    assert (m.caption_dropout, m.first_frame_conditioning, m.condition_frames) == (0.1, 0.0, 1)


def test_constructor_arguments_must_match_the_conditioning():
    with pytest.raises(ConfigError, match="model.conditioning = text.*text_dim = 0"):
        VideoDiT(cfg(), C, 3, 4)
    with pytest.raises(ConfigError, match="model.conditioning = class.*text_dim = 12"):
        VideoDiT(cfg(conditioning="class"), C, 3, 4, text_dim=D_TEXT)
    with pytest.raises(ConfigError, match="model.conditioning = text.*num_classes = 3"):
        VideoDiT(cfg(), C, 3, 4, num_classes=3, text_dim=D_TEXT)
    with pytest.raises(ConfigError, match="model.condition_frames = 3.*3 latent frames"):
        VideoDiT(cfg(first_frame_conditioning=0.5, condition_frames=3), C, 3, 4, text_dim=D_TEXT)
    VideoDiT(cfg(first_frame_conditioning=0.5, condition_frames=2), C, 3, 4, text_dim=D_TEXT)
