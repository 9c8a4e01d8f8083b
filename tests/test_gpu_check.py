"""scripts/gpu_check.sh: refuses at once without CUDA; every step's command line is accepted."""
import os
import shlex
import subprocess

import pytest
import torch

from utils.cli import parse_args
from utils.config import PredictConfig, TrainRunConfig, VAERunConfig, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.sh")
CONFIGS = {"train_vae.py": (VAERunConfig, ()), "train_advanced.py": (TrainRunConfig, ("resume",)),
           "predict_advanced.py": (PredictConfig, ()),
           "diagnose.py": (TrainRunConfig, ("checkpoint", "min-vae-psnr"))}


def _run(env_extra: dict) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "GPU_CHECK_DRY_CPU"}
    return subprocess.run(["bash", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=120,
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
    assert list(steps) == ["stage1", "stage2_bf16", "stage2_fp16", "predict", "diagnose", "torchrun",
                           "benchmark"]
    for name, argv in steps.items():
        script = next((a for a in argv if a.endswith(".py")), None)
        if script in CONFIGS:
            cls, flags = CONFIGS[script]
            config, overrides, _ = parse_args(argv[argv.index(script) + 1:], "", flags)
            cfg = load_config(cls, os.path.join(ROOT, config), overrides)
            assert cfg.device == "cpu", name
    assert "--nproc_per_node=2" in steps["torchrun"] and "torch.distributed.run" in steps["torchrun"]
    bf16 = load_config(TrainRunConfig, os.path.join(ROOT, "config_advanced.yaml"),
                       [a for a in steps["stage2_bf16"] if "=" in a and not a.startswith("-")])
    assert (bf16.train.precision, bf16.train.tf32, bf16.train.compile, bf16.train.activation_checkpointing) \
        == ("bf16", True, True, True)
    assert "fp16" in " ".join(steps["stage2_fp16"]) and "--real-size" in steps["benchmark"]
