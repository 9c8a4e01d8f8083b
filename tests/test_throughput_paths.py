"""Precision and throughput paths on CPU with tiny configs: bf16 autocast (both stages), fp16
with the GradScaler, activation checkpointing, torch.compile, gradient accumulation."""
import os
import re

import pytest
import torch

import train_advanced
import train_vae
from tests.fixed_noise import assert_same_update, train_fixed
from tests.test_stage2 import ROOT, TINY, random_vae  # noqa: F401  (fixture)
from tests.test_vae import TINY_OVERRIDES as VAE_TINY
from utils.checkpoint import load_checkpoint


pytestmark = pytest.mark.usefixtures("one_thread")


def _stage1(tmp_path, *extra):
    args = ["--config", os.path.join(ROOT, "config_vae.yaml"), *VAE_TINY,
            f"experiment.runs_dir={tmp_path}", "experiment.name=vae", "train.max_steps=3", *extra]
    assert train_vae.main(args) == 0
    run = os.path.join(tmp_path, "vae")
    return load_checkpoint(os.path.join(run, "latest.pth")), open(os.path.join(run, "log.txt")).read()


def _stage2(tmp_path, vae, name, *extra):
    args = ["--config", os.path.join(ROOT, "config_advanced.yaml"), *TINY, f"vae.path={vae}",
            f"experiment.runs_dir={tmp_path}", f"experiment.name={name}", "train.max_steps=3", *extra]
    assert train_advanced.main(args) == 0
    run = os.path.join(tmp_path, name)
    return load_checkpoint(os.path.join(run, "latest.pth")), open(os.path.join(run, "log.txt")).read()


@pytest.mark.parametrize("precision, dtype", [("bf16", "bfloat16"), ("fp16", "float16")])
def test_both_stages_train_in_half_precision_on_cpu(tmp_path, random_vae, precision, dtype):  # noqa: F811
    """An explicit train.precision runs on CPU too (`auto` stays fp32 there); fp16 brings the
    GradScaler, whose state is checkpointed."""
    ckpt, log = _stage1(tmp_path, f"train.precision={precision}")
    assert ckpt["step"] == 3 and dtype in log and "held-out PSNR" in log
    assert bool(ckpt["scaler"]) == (precision == "fp16")  # a disabled scaler's state is {}
    ckpt, log = _stage2(tmp_path, random_vae, "s2", f"train.precision={precision}")
    assert ckpt["step"] == 3 and f"precision {dtype}" in log
    losses = [float(x) for x in re.findall(r"loss ([\d.]+) grad_norm", log)]
    assert len(losses) == 3 and all(0 < x < 10 for x in losses), losses
    if precision == "fp16":
        assert ckpt["scaler"]["scale"] > 1 and ckpt["scaler"]["_growth_tracker"] >= 0


def test_auto_precision_is_fp32_on_cpu(tmp_path, random_vae):  # noqa: F811
    ckpt, log = _stage2(tmp_path, random_vae, "auto", "train.max_steps=1")
    assert "precision float32" in log and ckpt["scaler"] == {}


def test_activation_checkpointing_trains_the_same(tmp_path, random_vae):  # noqa: F811
    """Recomputing each block in the backward changes memory, not the numbers: same weights
    after 3 steps of the trainer (label dropout included: checkpointing replays the RNG)."""
    runs = [_stage2(tmp_path, random_vae, f"ac{flag}", f"train.activation_checkpointing={flag}")[0]
            for flag in ("false", "true")]
    for name, w in runs[0]["model_state"].items():
        torch.testing.assert_close(runs[1]["model_state"][name], w, rtol=1e-5, atol=1e-6)


def test_compiled_model_trains(tmp_path, random_vae, monkeypatch):  # noqa: F811
    """train.compile=true: dynamo traces the trainer's model, forward and backward (AOT
    autograd), and checkpoints hold the bare module's names. The backend is aot_eager: inductor's
    C++ code generation takes ~60 s here for the same check (scripts/gpu_check.sh runs it on CUDA)."""
    calls = []
    real_compile = torch.compile

    def compile_aot_eager(model, **kwargs):
        calls.append(type(model).__name__)
        return real_compile(model, **{**kwargs, "backend": "aot_eager"})
    monkeypatch.setattr(torch, "compile", compile_aot_eager)
    torch._dynamo.reset()
    ckpt, log = _stage2(tmp_path, random_vae, "compiled", "train.compile=true", "train.max_steps=2")
    assert calls == ["VideoDiT"] and ckpt["step"] == 2
    assert not any(k.startswith("_orig_mod") for k in ckpt["model_state"])
    counters = torch._dynamo.utils.counters
    assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"], dict(counters["graph_break"])


def test_gradient_accumulation_matches_one_big_batch(tmp_path, random_vae):  # noqa: F811
    """2 x batch 4 accumulated == batch 8: weights and AdamW moments after 3 steps, with the
    trainer's own loop (loss / grad_accum_steps, one clip and step per 2 micro-batches)."""
    data = [*TINY, f"vae.path={random_vae}", "data.builtin.num_clips=12", "train.max_steps=3"]
    big = train_fixed(data + ["train.batch_size=8"], str(tmp_path / "big"))
    accumulated = train_fixed(data + ["train.batch_size=4", "train.grad_accum_steps=2"],
                              str(tmp_path / "acc"))
    assert big["step"] == 3
    assert_same_update(big, accumulated)
    wrong = train_fixed(data + ["train.batch_size=4"], str(tmp_path / "wrong"))  # 3 steps of 4
    with pytest.raises(AssertionError):
        assert_same_update(big, wrong)
