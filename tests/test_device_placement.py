"""Device placement without a GPU: every path that trains, validates, predicts and diagnoses
runs with device=cuda under tests/devicecheck.py, which fails on a tensor on the wrong device."""
import os

import numpy as np
import pytest
import torch

import diagnose
import predict_advanced
import train_advanced
import train_vae
from tests.devicecheck import DeviceMismatch, logical_cuda
from tests.test_stage2 import ROOT, TINY, random_vae  # noqa: F401  (fixture)
from tests.test_vae import TINY_OVERRIDES as VAE_TINY
from utils.checkpoint import load_checkpoint
from utils.metrics import psnr


pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- the checker itself


def test_the_stage1_bug_is_caught():
    """finish() compared a reconstruction on the GPU with pixels on the CPU (issue #12)."""
    pixels = torch.rand(2, 3, 4, 8, 8) * 2 - 1
    with logical_cuda():
        recon = pixels.to("cuda") * 0.9
        assert recon.device.type == "cuda" and pixels.device.type == "cpu"
        with pytest.raises(DeviceMismatch, match="mixes devices.*cuda.*cpu"):
            psnr(recon, pixels)
        assert psnr(recon.cpu(), pixels) > 20  # the fix


def test_rules_follow_cuda():
    with logical_cuda():
        a, b = torch.ones(3, device="cuda"), torch.ones(3)
        with pytest.raises(DeviceMismatch):
            torch.stack([a, b])
        with pytest.raises(DeviceMismatch):
            b.add_(a)
        assert (a * torch.tensor(2.0)).device.type == "cuda"  # a 0-dim CPU tensor is a scalar
        with pytest.raises(DeviceMismatch, match="numpy"):
            a.numpy()
        with pytest.raises(DeviceMismatch, match="numpy"):
            np.asarray(a.sum(dim=0, keepdim=True))
        assert a.cpu().numpy().tolist() == [1.0, 1.0, 1.0] and a.sum().item() == 3.0
        with pytest.raises(DeviceMismatch, match="indices"):
            b[torch.tensor([0, 1], device="cuda")]
        assert a[torch.tensor([0, 1])].device.type == "cuda"  # CPU indices into a GPU tensor: fine
        b.copy_(a)  # copies cross devices
        b[0] = a[1]


def test_generators_and_modules_follow_their_device():
    with logical_cuda():
        g = torch.Generator("cuda").manual_seed(0)
        with pytest.raises(DeviceMismatch, match="generator"):
            torch.randn(3, generator=g)  # a CPU tensor from a GPU generator
        with pytest.raises(DeviceMismatch, match="generator"):
            torch.randn(3, device="cuda", generator=torch.Generator().manual_seed(0))
        assert torch.randn(3, device="cuda", generator=g).device.type == "cuda"
        net = torch.nn.Linear(3, 2).to("cuda")
        assert next(net.parameters()).device.type == "cuda"
        with pytest.raises(DeviceMismatch):
            net(torch.ones(1, 3))
        net(torch.ones(1, 3, device="cuda")).sum().backward()
        assert net.weight.grad.device.type == "cuda"
        opt = torch.optim.AdamW(net.parameters(), fused=True)
        opt.step()
        assert opt.state[net.weight]["exp_avg"].device.type == "cuda"
    assert torch.Generator is torch._C.Generator and not torch.cuda.is_available()  # all restored


# --------------------------------------------------------------------------- the real paths


def test_stage1_on_a_logical_gpu(tmp_path):
    args = ["--config", os.path.join(ROOT, "config_vae.yaml"), *VAE_TINY, "device=cuda",
            f"experiment.runs_dir={tmp_path}", "experiment.name=vae", "train.max_steps=2"]
    with logical_cuda() as mode:
        assert train_vae.main(args) == 0
        assert train_vae.main(args[:-1] + ["train.max_steps=3", "train.resume=auto"]) == 0
    assert mode.calls > 1000  # the checker saw the run
    assert os.path.isfile(tmp_path / "vae" / "vae" / "config.json")
    assert load_checkpoint(str(tmp_path / "vae" / "latest.pth"))["step"] == 3


def test_stage2_predict_diagnose_on_a_logical_gpu(tmp_path, random_vae, capsys):  # noqa: F811
    train = ["--config", os.path.join(ROOT, "config_advanced.yaml"), *TINY, "device=cuda",
             f"vae.path={random_vae}", f"experiment.runs_dir={tmp_path}", "experiment.name=s2",
             "train.precision=fp32", "validation.every_epochs=1", "train.checkpoint_every=2"]
    run = tmp_path / "s2"
    with logical_cuda():
        assert train_advanced.main(train + ["train.max_steps=2", "train.resume=null"]) == 0
        assert train_advanced.main(train + ["train.max_steps=3", "train.resume=auto"]) == 0
        assert predict_advanced.main(["--config", os.path.join(ROOT, "predict_advanced.yaml"),
                                      "device=cuda", f"checkpoint={run / 'latest.pth'}",
                                      f"output_dir={tmp_path / 'pred'}", "num_videos=2",
                                      "num_steps=3", "sampler=dpm++"]) == 0
        assert diagnose.main(train + ["--checkpoint", str(run / "latest.pth")]) in (0, 1)
    out = capsys.readouterr().out
    assert "resumed from" in open(run / "log.txt").read()
    assert os.path.isfile(tmp_path / "pred" / "grid.png")
    assert "device cuda" in out and "[PASS] gradients" in out and "[PASS] jigsaw" in out


@pytest.mark.parametrize("extra", [
    [],  # the default config
    ["model.first_frame_conditioning=0.5"],  # per-frame t and a loss mask
    ["model.patch_t=2"],  # temporal patches
    ["model.patch_t=2", "model.condition_frames=2", "model.first_frame_conditioning=0.5"],  # one t per patch
], ids=["default", "first_frames", "patch_t", "patch_t_first_frames"])
def test_an_ordinary_training_step_makes_one_host_sync(tmp_path, random_vae, extra):  # noqa: F811
    """Between log steps a stage-2 step reads one GPU value on the host: the finite flag the
    update decision needs (`StepControl.agree`; under DDP the all-reduced flags, read once),
    whatever the config: first-frame conditioning's loss mask and the per-patch timesteps of
    patch_t > 1 are checked on the device, not read. Counted as the reads of GPU tensors
    (`.item()`, `bool()`, `.tolist()`, `.cpu()`, `torch.equal`, ...) of runs of 4 and 8 steps
    that log and save only at their end: the difference is the steps'."""
    reads = {}
    for steps in (4, 8):
        with logical_cuda() as mode:
            assert train_advanced.main([
                "--config", os.path.join(ROOT, "config_advanced.yaml"), *TINY, "device=cuda",
                f"vae.path={random_vae}", f"experiment.runs_dir={tmp_path}", f"experiment.name=s{steps}",
                f"train.max_steps={steps}", "train.log_every=1000", "train.checkpoint_every=1000",
                *extra]) == 0
        reads[steps] = mode.host_reads
    assert (reads[8] - reads[4]) / 4 == 1, reads
