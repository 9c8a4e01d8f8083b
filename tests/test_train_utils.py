"""The optimizer both trainers build: fused AdamW, kept fused across a checkpoint round trip."""
import torch
from torch import nn

from utils.train_utils import make_adamw, use_fast_adamw


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))


def train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(32, 8, generator=gen)
        model(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def test_make_adamw_is_fused_on_cpu_and_updates_like_reference_adamw():
    fast, ref = tiny_model(), tiny_model()
    opt = make_adamw(fast.parameters(), 1e-2, (0.9, 0.99), weight_decay=0.1)
    assert [(g["fused"], g["foreach"]) for g in opt.param_groups] == [(True, None)]
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1,
                                foreach=False)
    train_steps(fast, opt, 5)
    train_steps(ref, ref_opt, 5)
    for p, q in zip(fast.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert not torch.equal(fast[0].weight, tiny_model()[0].weight)  # it did train


def test_state_saved_by_another_adamw_loads_fused_and_continues_identically():
    """A checkpoint written by a per-tensor-loop AdamW (the flags ride in the state dict) is
    switched back to fused on load, and continues as an uninterrupted fused run does."""
    old, straight = tiny_model(), tiny_model()
    old_opt = torch.optim.AdamW(old.parameters(), lr=1e-2, weight_decay=0.0, foreach=False)
    straight_opt = make_adamw(straight.parameters(), 1e-2)
    train_steps(old, old_opt, 3)
    train_steps(straight, straight_opt, 3)
    state = old_opt.state_dict()
    assert state["param_groups"][0]["fused"] is None

    resumed = tiny_model()
    resumed.load_state_dict(old.state_dict())
    opt = make_adamw(resumed.parameters(), 1e-2)
    opt.load_state_dict(state)
    assert opt.param_groups[0]["fused"] is None  # what load_state_dict restores
    use_fast_adamw(opt)
    assert (opt.param_groups[0]["fused"], opt.param_groups[0]["foreach"]) == (True, None)
    train_steps(resumed, opt, 2, seed=2)
    train_steps(straight, straight_opt, 2, seed=2)
    for p, q in zip(resumed.parameters(), straight.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
