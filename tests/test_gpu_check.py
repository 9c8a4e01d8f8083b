"""scripts/gpu_check.sh: refuses at once without CUDA; every step's command line is accepted;
each step's numeric pass condition (scripts/gpu_check_conditions.py) can fail, and a failed
condition fails the script."""
import json
import os
import shlex
import shutil
import subprocess
import sys

import pytest
import torch

from utils.cli import parse_args
from utils.config import EvaluateConfig, PredictConfig, TrainRunConfig, VAERunConfig, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.sh")
CONFIGS = {"train_vae.py": (VAERunConfig, {}), "train_advanced.py": (TrainRunConfig, {"resume": ""}),
           "predict_advanced.py": (PredictConfig, {}),
           "diagnose.py": (TrainRunConfig, {"checkpoint": "", "min-vae-psnr": ""}), "evaluate.py": (EvaluateConfig, {})}
CONDITIONS = os.path.join(ROOT, "scripts", "gpu_check_conditions.py")


def _run(env_extra: dict, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_")}
    return subprocess.run(["bash", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**env, **env_extra})


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_it_stops_at_once_saying_so():
    proc = _run({})
    assert proc.returncode == 1
    assert "needs a CUDA GPU" in proc.stderr and "nothing was run" in proc.stderr
    assert "PASS" not in proc.stdout and "FAIL" not in proc.stdout


def test_every_step_command_is_accepted_by_its_script():
    """GPU_CHECK_DRY_CPU=1 prints the steps' commands; each script's config loads them."""
    proc = _run({"GPU_CHECK_DRY_CPU": "1"})
    assert proc.returncode == 0, proc.stderr
    steps = {}
    for line in proc.stdout.splitlines():
        if line.startswith("DRY "):
            name, command = line[4:].split(":", 1)
            steps[name] = shlex.split(command)
    assert list(steps) == ["stage1", "stage2_bf16", "agreement", "stage2_fp16", "predict", "diagnose",
                           "torchrun", "fsdp", "buckets", "ddp_fp32", "fsdp_vs_ddp", "video_vae", "workers", "evaluate", "flow",
                           "text", "first_frames", "image_to_video", "wan_lora", "wan_full", "cogvideox_lora",
                           "cogvideox_full", "cogvideox_i2v_lora", "benchmark"]
    for name, argv in steps.items():
        script = next((a for a in argv if a.endswith(".py")), None)
        if script in CONFIGS:
            cls, flags = CONFIGS[script]
            config, overrides, _ = parse_args(argv[argv.index(script) + 1:], "", flags)
            cfg = load_config(cls, os.path.join(ROOT, config), overrides)
            assert cfg.device == "cpu", name
    assert "--nproc_per_node=2" in steps["torchrun"] and "torch.distributed.run" in steps["torchrun"]
    fsdp = load_config(TrainRunConfig, os.path.join(ROOT, "config_advanced.yaml"),
                       [a for a in steps["fsdp"] if "=" in a and not a.startswith("-")])
    assert (fsdp.train.parallel, fsdp.train.precision, fsdp.train.compile, fsdp.train.activation_checkpointing) \
        == ("fsdp", "bf16", True, True) and "torch.distributed.run" not in steps["fsdp"]  # world size 1
    buckets = load_config(TrainRunConfig, os.path.join(ROOT, "config_advanced.yaml"),
                          [a for a in steps["buckets"] if "=" in a and not a.startswith("-")])
    assert (buckets.data.buckets, buckets.model.positions, buckets.train.precision, buckets.train.compile) \
        == ("auto", "rope", "bf16", True) and buckets.data.builtin.num_stills > 0
    assert "train.parallel=fsdp" in steps["fsdp_vs_ddp"] and "train.parallel=fsdp" not in steps["ddp_fp32"]
    assert all("train.precision=fp32" in steps[k] and "--nproc_per_node=2" in steps[k] for k in ("ddp_fp32", "fsdp_vs_ddp"))
    bf16 = load_config(TrainRunConfig, os.path.join(ROOT, "config_advanced.yaml"),
                       [a for a in steps["stage2_bf16"] if "=" in a and not a.startswith("-")])
    assert (bf16.train.precision, bf16.train.tf32, bf16.train.compile, bf16.train.activation_checkpointing) \
        == ("bf16", True, True, True)
    assert "fp16" in " ".join(steps["stage2_fp16"]) and "--real-size" in steps["benchmark"]
    assert "data.cache=auto" in steps["video_vae"] and any(a.startswith("data.num_workers=") for a in steps["workers"])
    assert steps["agreement"][1:3] == ["scripts/gpu_check_conditions.py", "agree"]
    # the flow-matching, text and first-frame paths (issue 27): each step's run is what it names
    train_cfg = lambda name: load_config(TrainRunConfig, os.path.join(ROOT, "config_advanced.yaml"),  # noqa: E731
                                         [a for a in steps[name] if "=" in a and not a.startswith("-")])
    assert train_cfg("flow").diffusion.objective == "flow_matching" and train_cfg("flow").validation.every_epochs
    text = train_cfg("text")
    assert text.model.conditioning_kind() == "text" and text.data.builtin.captions and text.text_encoder.path
    assert train_cfg("first_frames").model.first_frame_conditioning > 0
    i2v = load_config(EvaluateConfig, os.path.join(ROOT, "evaluate.yaml"),
                      [a for a in steps["image_to_video"] if "=" in a and not a.startswith("-")])
    assert i2v.image_to_video and i2v.windows == 2 and i2v.checkpoint.endswith("ffc/latest.pth")
    # fine-tuning the tiny pretrained pipelines, LoRA and full, in bf16 (issue 26)
    for family in ("wan", "cogvideox"):
        for finetune in ("lora", "full"):
            ft = load_config(TrainRunConfig, os.path.join(ROOT, "config_finetune.yaml"),
                             [a for a in steps[f"{family}_{finetune}"] if "=" in a and not a.startswith("-")])
            assert ft.model.pretrained.endswith(f"pretrained/{family}") and ft.model.finetune == finetune
            assert ft.train.precision == "bf16" and ft.train.activation_checkpointing
    i2v = load_config(TrainRunConfig, os.path.join(ROOT, "config_finetune.yaml"),
                      [a for a in steps["cogvideox_i2v_lora"] if "=" in a and not a.startswith("-")])
    assert i2v.model.pretrained.endswith("pretrained/cogvideox_i2v") and i2v.model.first_frame_conditioning > 0


def test_the_header_says_ddp_is_not_exercised_on_one_gpu():
    header = open(SCRIPT).read().split("set -uo pipefail")[0]
    assert "every GPU code path" not in header.lower() and "Every GPU code path" not in header
    assert "DDP itself" in header and "NOT exercised" in header


def _condition(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, CONDITIONS, *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def _log(path, losses):
    path.write_text("".join(f"2026-12-02 10:00:00 step {i + 1}/{len(losses)} epoch 1 loss {v} grad_norm 1.0\n"
                            for i, v in enumerate(losses)))
    return path


@pytest.mark.parametrize("losses, falling, ok", [
    ([1.0, 0.9, 0.7, 0.6, 0.5, 0.4], True, True),
    ([0.4, 0.5, 0.6, 0.7, 0.9, 1.0], True, False),  # rising
    ([1.0, 0.8, 0.6], False, True),
    ([1.0, float("nan"), 0.6], False, False),  # non-finite
    ([1.0, 0.5], True, False),  # too few logged steps to say it falls
    ([], False, False),
])
def test_loss_condition(tmp_path, losses, falling, ok):
    proc = _condition("loss", _log(tmp_path / "log.txt", losses), *(["--falling"] if falling else []))
    assert (proc.returncode == 0) == ok, proc.stdout


def test_steps_condition_fails_when_every_fp16_step_was_skipped(tmp_path):
    """A GradScaler that skips every step never advances the step count."""
    import torch
    torch.save({"step": 0}, tmp_path / "latest.pth")
    _log(tmp_path / "log.txt", [1.0, 1.0])
    proc = _condition("steps", tmp_path, 100)
    assert proc.returncode == 1 and "0 of 100 updates" in proc.stdout
    torch.save({"step": 100}, tmp_path / "latest.pth")
    assert _condition("steps", tmp_path, 100).returncode == 0


def test_diagnose_condition_fails_on_a_failed_code_check(tmp_path):
    lines = ["[PASS] patchify         exact", "[PASS] identities       1e-7", "[PASS] gradients        ok",
             "[PASS] checkpoint       ok", "[PASS] vae_fingerprint  ok", "[FAIL] denoise          1.2"]
    (tmp_path / "d.log").write_text("\n".join(lines) + "\n")
    proc = _condition("diagnose", tmp_path / "d.log")
    assert proc.returncode == 0 and "denoise FAIL" in proc.stdout  # quality: shown, not required
    (tmp_path / "d.log").write_text("\n".join(lines).replace("[PASS] gradients", "[FAIL] gradients") + "\n")
    proc = _condition("diagnose", tmp_path / "d.log")
    assert proc.returncode == 1 and "gradients FAIL" in proc.stdout


def test_the_required_diagnose_checks_are_names_diagnose_prints():
    """The condition once required 'v_identities' after diagnose renamed the check 'identities':
    every real diagnose then FAILed the gpu_check step. The names come from diagnostics now."""
    import re

    import training.diagnostics as diagnostics
    with open(diagnostics.__file__) as f:
        emitted = set(re.findall(r'(?:_guarded|Check)\("(\w+)"', f.read()))
    assert set(diagnostics.CODE_PATH_CHECKS) <= emitted
    assert set(diagnostics.CODE_PATH_CHECKS).isdisjoint({"vae_roundtrip", "latent_scale", "denoise", "jigsaw"})


def _text_run(folder, kind="text", text_dim=32, videos=2, lines=2):
    import torch
    os.makedirs(folder / "samples" / "step_0000004")
    torch.save({"conditioning": {"kind": kind, "text_encoder": {"fingerprint": "abc"}},
                "model": {"dims": {"text_dim": text_dim}}}, folder / "latest.pth")
    last = folder / "samples" / "step_0000004"
    for i in range(videos):
        (last / f"sample_{i:03d}.mp4").write_bytes(b"")
    (last / "prompts.txt").write_text("".join(f"a red square {i}\n" for i in range(lines)))
    return folder


@pytest.mark.parametrize("kwargs, ok", [({}, True), ({"kind": "class"}, False), ({"text_dim": 0}, False),
                                        ({"lines": 1}, False), ({"videos": 0, "lines": 0}, False)])
def test_text_condition(tmp_path, kwargs, ok):
    proc = _condition("text", _text_run(tmp_path / "run", **kwargs))
    assert (proc.returncode == 0) == ok, proc.stdout


@pytest.mark.parametrize("record, ok", [
    ({"first_frame_psnr": 24.9, "first_frame_psnr_vae_round_trip": 25.0, "fvd_by_window": [3.0, 4.0]}, True),
    ({"first_frame_psnr": 18.0, "first_frame_psnr_vae_round_trip": 25.0, "fvd_by_window": [3.0, 4.0]}, False),
    ({"first_frame_psnr": 25.0, "first_frame_psnr_vae_round_trip": 25.0, "fvd_by_window": [3.0]}, False),
    ({"first_frame_psnr": 25.0, "first_frame_psnr_vae_round_trip": 25.0, "fvd_by_window": [3.0, float("nan")]}, False),
    ({}, False),
])
def test_first_frames_condition(tmp_path, record, ok):
    (tmp_path / "i2v.json").write_text(json.dumps({"fvd": 3.0, "image_to_video": record}))
    proc = _condition("first_frames", tmp_path / "i2v.json", 2)
    assert (proc.returncode == 0) == ok, proc.stdout


def test_fvd_and_bench_conditions(tmp_path):
    (tmp_path / "f.json").write_text(json.dumps({"fvd": 12.5}))
    assert _condition("fvd", tmp_path / "f.json").returncode == 0
    (tmp_path / "f.json").write_text(json.dumps({"fvd": float("nan")}))
    assert _condition("fvd", tmp_path / "f.json").returncode == 1
    (tmp_path / "b.json").write_text(json.dumps({"samples_per_s": 3.0, "tokens_per_s": 9.0, "mfu": 0.0}))
    assert _condition("bench", tmp_path / "b.json").returncode == 1


def test_parked_condition(tmp_path):
    log = tmp_path / "log.txt"
    log.write_text("latent cache: using runs/x/latent_cache\n")
    assert _condition("parked", log, "cuda").returncode == 1  # cached on a GPU, yet the VAE stayed there
    assert _condition("parked", log, "cpu").returncode == 0
    log.write_text("VAE parked in CPU memory (0.1M parameters): training reads cached latents\n")
    assert _condition("parked", log, "cuda").returncode == 0


def test_a_failed_condition_fails_the_script():
    """Stage 1 on the CPU with one logged step: the run itself succeeds (exit 0), but 'loss is
    falling' cannot be shown, so the step FAILs and the script exits 1."""
    proc = _run({"GPU_CHECK_DRY_CPU": "run", "GPU_CHECK_ONLY": "stage1",
                 "GPU_CHECK_OVERRIDES": "train.max_steps=1"}, timeout=600)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAIL stage1" in proc.stdout and "exit 0" in proc.stdout and "training losses logged" in proc.stdout
    assert "gpu_check: FAILED" in proc.stdout


def test_fsdp_and_same_weights_conditions(tmp_path):
    """`fsdp` passes on a consolidated one-process FSDP run and fails on a latest.pth that still
    names shards; `same_weights` fails when the weights moved by more than its bound."""
    import train_advanced
    from tests.test_stage2 import TINY
    from models.vae import build_autoencoder
    from utils.config import VAEArchConfig
    torch.manual_seed(0)
    ae = build_autoencoder(VAEArchConfig(block_out_channels=[16, 16, 16], norm_num_groups=8))
    ae.save_pretrained(str(tmp_path / "vae"))
    assert train_advanced.main(["--config", os.path.join(ROOT, "config_advanced.yaml"), *TINY,
                                f"vae.path={tmp_path / 'vae'}", f"experiment.runs_dir={tmp_path}", "experiment.name=run",
                                "train.parallel=fsdp", "train.max_steps=3", "train.checkpoint_every=2"]) == 0
    run = tmp_path / "run"
    proc = _condition("fsdp", run, "cpu")
    assert proc.returncode == 0 and "consolidated" in proc.stdout, proc.stdout + proc.stderr
    latest = torch.load(run / "latest.pth", weights_only=True)
    (tmp_path / "sharded_run").mkdir()
    shutil.copy(run / "log.txt", tmp_path / "sharded_run" / "log.txt")
    torch.save({**latest, "sharded": {"path": "sharded/step_0000002", "world_size": 2}},
               tmp_path / "sharded_run" / "latest.pth")
    proc = _condition("fsdp", tmp_path / "sharded_run", "cpu")
    assert proc.returncode == 1 and "not consolidated" in proc.stdout
    assert _condition("same_weights", run / "latest.pth", run / "latest.pth", 1e-6).returncode == 0
    moved = {**latest, "model_state": {k: v * 1.01 for k, v in latest["model_state"].items()}}
    torch.save(moved, tmp_path / "moved.pth")
    proc = _condition("same_weights", run / "latest.pth", tmp_path / "moved.pth", 1e-3)
    assert proc.returncode == 1 and "1.0e-02" in proc.stdout
