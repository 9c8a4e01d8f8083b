"""Stage 2 + predict on tiny configs: frozen VAE, checkpoints, exact resume, refusals."""
import glob
import hashlib
import os
import shutil
import subprocess
import sys

import pytest
import torch

import predict_advanced
import train_advanced
from models.vae import FrozenVAE, build_autoencoder
from utils.checkpoint import load_checkpoint
from utils.config import VAEArchConfig
from utils.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = ["device=cpu", "data.num_frames=4", "data.resolution=16", "data.builtin.num_clips=6",
        "data.builtin.clip_frames=8", "data.window_stride=4", "model.hidden_size=32", "model.depth=2",
        "model.num_heads=2", "train.batch_size=2", "train.warmup_steps=2", "train.log_every=1",
        "train.ema_warmup_steps=2", "validation.num_videos=2", "validation.num_steps=3",
        "validation.every_epochs=0"]


@pytest.fixture(scope="module")
def random_vae(tmp_path_factory) -> str:
    """An untrained (random) AutoencoderKL directory: enough for plumbing tests."""
    torch.manual_seed(0)
    ae = build_autoencoder(VAEArchConfig(block_out_channels=[16, 16, 16], norm_num_groups=8))
    ae.register_to_config(scaling_factor=0.8)
    path = str(tmp_path_factory.mktemp("vae") / "vae")
    ae.save_pretrained(path)
    return path


def _train(tmp_path, vae, name, extra=()):
    args = ["--config", os.path.join(ROOT, "config_advanced.yaml"), *TINY, f"vae.path={vae}",
            f"experiment.runs_dir={tmp_path}", f"experiment.name={name}", *extra]
    assert train_advanced.main(args) == 0
    return os.path.join(tmp_path, name)


def _predict(ckpt, out, extra=()):
    args = ["--config", os.path.join(ROOT, "predict_advanced.yaml"), "device=cpu",
            f"checkpoint={ckpt}", f"output_dir={out}", "num_videos=2", "num_steps=3", *extra]
    return predict_advanced.main(args)


def _dir_digest(path):
    h = hashlib.sha256()
    for f in sorted(glob.glob(os.path.join(path, "*"))):
        h.update(open(f, "rb").read())
    return h.hexdigest()


def test_run_dir_contents_and_frozen_vae(tmp_path, random_vae):
    before = FrozenVAE.from_pretrained(random_vae).ae.state_dict()
    digest = _dir_digest(random_vae)
    run = _train(tmp_path, random_vae, "run", ["train.max_steps=3", "validation.every_epochs=1"])
    for name in ("config.yaml", "log.txt", "latest.pth"):
        assert os.path.isfile(os.path.join(run, name)), name
    assert glob.glob(os.path.join(run, "tensorboard", "events.*"))
    assert glob.glob(os.path.join(run, "samples", "*", "sample_000.mp4"))
    ckpt = load_checkpoint(os.path.join(run, "latest.pth"))
    assert ckpt["step"] == 3
    vae = FrozenVAE.from_pretrained(random_vae)
    assert ckpt["vae"]["fingerprint"] == vae.fingerprint
    assert ckpt["vae"]["scaling_factor"] == pytest.approx(0.8)
    # The VAE is bit-identical after stage 2: files and weights.
    assert _dir_digest(random_vae) == digest
    for k, v in vae.ae.state_dict().items():
        assert torch.equal(v, before[k]), k
    log = open(os.path.join(run, "log.txt")).read()
    assert "trainable" in log and "frozen" in log


def test_optimizer_never_holds_vae_parameters(tmp_path, random_vae):
    from training.stage2 import setup
    from utils.config import TrainRunConfig, load_config
    from utils.dist import DistInfo
    from utils.logging import RunLogger
    cfg = load_config(TrainRunConfig, os.path.join(ROOT, "config_advanced.yaml"),
                      TINY + [f"vae.path={random_vae}"])
    s = setup(cfg, str(tmp_path), DistInfo(), torch.device("cpu"), torch.float32,
              RunLogger(None), None)
    opt_params = {id(p) for g in s.optimizer.param_groups for p in g["params"]}
    assert opt_params == {id(p) for p in s.model.parameters()}
    assert not any(p.requires_grad for p in s.vae.parameters()) and not s.vae.training
    s.vae.train()
    assert not s.vae.training


def test_resume_matches_uninterrupted_run(tmp_path, random_vae, monkeypatch):
    """7 steps straight == 4 steps, checkpoint, resume in a new process state to 7.

    6 batches per epoch, so step 4 is mid-epoch: this checks data position, cosine LR, EMA,
    optimizer and RNG state all resume exactly.
    """
    import training.stage2 as stage2
    ck4 = os.path.join(tmp_path, "step4.pth")
    original_save = stage2.save

    def spy_save(s, name="latest.pth", **kw):
        original_save(s, name, **kw)
        if s.pos.step == 4 and name == "latest.pth":
            shutil.copy(os.path.join(s.run_dir, name), ck4)

    monkeypatch.setattr(stage2, "save", spy_save)
    steps = ["train.max_steps=7", "train.checkpoint_every=4"]
    straight = load_checkpoint(os.path.join(_train(tmp_path, random_vae, "straight", steps), "latest.pth"))
    monkeypatch.setattr(stage2, "save", original_save)
    assert load_checkpoint(ck4)["step"] == 4 and load_checkpoint(ck4)["micro"] == 4
    torch.manual_seed(999)  # resume must not depend on the process's RNG state
    resumed = load_checkpoint(os.path.join(
        _train(tmp_path, random_vae, "resumed", steps + [f"train.resume={ck4}"]), "latest.pth"))
    assert resumed["step"] == straight["step"] == 7
    for key in ("model_state", "ema_state"):
        for name, tensor in straight[key].items():
            assert torch.equal(tensor, resumed[key][name]), f"{key}.{name} differs after resume"


def test_resume_refuses_other_model(tmp_path, random_vae):
    run = _train(tmp_path, random_vae, "run", ["train.max_steps=2"])
    with pytest.raises(UserError, match=r"another model: config.depth is 2 in the checkpoint but 3 now"):
        _train(tmp_path, random_vae, "run", ["train.max_steps=4", "model.depth=3",
                                             "train.resume=auto"])
    assert load_checkpoint(os.path.join(run, "latest.pth"))["step"] == 2  # nothing lost


def _as_written_before_conditions(src: str, dst: str) -> None:
    """A checkpoint as train_advanced.py wrote it before the conditioning seam and first frames:
    no model.conditioning / caption_dropout / first_frame_conditioning / condition_frames /
    positions in
    its model record, no 'conditioning' or 'lr_plan' entry."""
    ckpt = torch.load(src, weights_only=True)
    for key in ("conditioning", "caption_dropout", "first_frame_conditioning", "condition_frames", "positions"):
        ckpt["model"]["config"].pop(key)
    ckpt.pop("conditioning")
    ckpt.pop("lr_plan")
    torch.save(ckpt, dst)


def test_resume_of_a_checkpoint_older_than_the_new_model_keys(tmp_path, random_vae):
    """Keys added to the model config take their defaults when a checkpoint predates them (as
    diffusion keys do): such a checkpoint resumes, and is still refused for a real change."""
    run = _train(tmp_path, random_vae, "run", ["train.max_steps=2"])
    old = str(tmp_path / "old.pth")
    _as_written_before_conditions(os.path.join(run, "latest.pth"), old)
    resumed = _train(tmp_path, random_vae, "resumed", ["train.max_steps=3", f"train.resume={old}"])
    assert load_checkpoint(os.path.join(resumed, "latest.pth"))["step"] == 3
    with pytest.raises(UserError, match=r"another model: config.first_frame_conditioning is 0.0 in the "
                                        r"checkpoint but 0.5 now"):
        _train(tmp_path, random_vae, "ffc", ["train.max_steps=3", f"train.resume={old}",
                                             "model.first_frame_conditioning=0.5"])
    with pytest.raises(UserError, match=r"another model: config.positions is 'sincos' in the checkpoint but "
                                        r"'rope' now"):  # a checkpoint before positions was sin-cos
        _train(tmp_path, random_vae, "rope", ["train.max_steps=3", f"train.resume={old}", "model.positions=rope"])


def test_fresh_start_does_not_overwrite(tmp_path, random_vae):
    _train(tmp_path, random_vae, "run", ["train.max_steps=1"])
    with pytest.raises(UserError, match="already exists and train.resume is null"):
        _train(tmp_path, random_vae, "run", ["train.max_steps=1", "train.resume=null"])


def _altered_vae(src, dst):
    ae = FrozenVAE.from_pretrained(src).ae
    with torch.no_grad():
        next(ae.parameters()).add_(1e-3)
    ae.save_pretrained(dst)
    return dst


def test_predict_writes_videos_deterministically(tmp_path, random_vae):
    run = _train(tmp_path, random_vae, "run", ["train.max_steps=2"])
    ckpt = os.path.join(run, "latest.pth")
    assert _predict(ckpt, str(tmp_path / "a")) == 0
    assert _predict(ckpt, str(tmp_path / "b"), ["batch_size=1"]) == 0
    for name in ("sample_000.mp4", "sample_000.gif", "sample_001.mp4", "sample_001.gif", "grid.png"):
        a, b = tmp_path / "a" / name, tmp_path / "b" / name
        assert a.stat().st_size > 0
        if name.endswith(".gif") or name.endswith(".png"):  # lossless: byte-identical
            assert a.read_bytes() == b.read_bytes(), name


def test_predict_refuses_a_different_vae(tmp_path, random_vae):
    run = _train(tmp_path, random_vae, "run", ["train.max_steps=1"])
    other = _altered_vae(random_vae, str(tmp_path / "other_vae"))
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "predict_advanced.py", "--config", "predict_advanced.yaml", "device=cpu",
         f"checkpoint={run}/latest.pth", f"output_dir={out}", f"vae.path={other}", "num_steps=2"],
        cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "VAE mismatch" in proc.stderr and "scrambled" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not glob.glob(str(out / "*.mp4"))


def test_resume_refuses_a_different_vae(tmp_path, random_vae):
    _train(tmp_path, random_vae, "run", ["train.max_steps=1"])
    other = _altered_vae(random_vae, str(tmp_path / "other_vae"))
    with pytest.raises(UserError, match="VAE mismatch"):
        _train(tmp_path, other, "run",
               ["train.max_steps=2", "train.resume=auto"])


def test_latent_cache_matches_encoding_and_rebuilds(tmp_path, random_vae, capsys):
    """Cached posterior moments train like encoding every step; an unchanged key reuses the
    cache, a changed VAE or data config rebuilds it and says why."""
    steps = ["train.max_steps=3", "train.lr_schedule=constant"]
    plain = load_checkpoint(os.path.join(_train(tmp_path, random_vae, "plain", steps), "latest.pth"))
    run = _train(tmp_path, random_vae, "cached", steps + ["data.cache=auto"])
    cached = load_checkpoint(os.path.join(run, "latest.pth"))
    for name, tensor in plain["model_state"].items():
        torch.testing.assert_close(cached["model_state"][name], tensor, rtol=1e-4, atol=1e-5)
    assert "latent cache: building" in capsys.readouterr().out

    manifest = os.path.join(run, "latent_cache", "manifest.json")
    stamp = os.path.getmtime(manifest)
    _train(tmp_path, random_vae, "cached", ["train.max_steps=4", "data.cache=auto"])  # resumes
    assert "latent cache: using" in capsys.readouterr().out and os.path.getmtime(manifest) == stamp

    other = _altered_vae(random_vae, str(tmp_path / "other_vae"))
    for name, vae, extra, why in [("new_vae", other, [], "the VAE changed"),
                                  ("new_data", random_vae, ["data.builtin.num_clips=5"],
                                   "data setting 'builtin' changed")]:
        shutil.copytree(os.path.join(run, "latent_cache"), os.path.join(tmp_path, name, "latent_cache"))
        _train(tmp_path, vae, name, ["train.max_steps=1", "data.cache=auto", *extra])
        assert f"latent cache: building {os.path.join(tmp_path, name, 'latent_cache')} ({why})" \
            in capsys.readouterr().out


def test_latent_cache_on_a_folder_and_off_with_augmentation(tmp_path, random_vae, capsys):
    from tests.conftest import smooth_frames
    from utils.video_io import write_video
    for i in range(2):
        write_video(str(tmp_path / "clips" / f"c{i}.mp4"), smooth_frames(12, 24, 32), fps=8)
    folder = [f"data.path={tmp_path / 'clips'}", "data.val_fraction=0.0", "train.max_steps=2"]
    _train(tmp_path, random_vae, "folder", folder + ["data.cache=auto"])
    assert "latent cache: building" in capsys.readouterr().out
    _train(tmp_path, random_vae, "aug", folder + ["data.cache=auto", "data.hflip=true"])
    assert "latent cache off: data.random_crop / data.hflip" in capsys.readouterr().out


def test_predict_says_guidance_is_off_for_an_unconditional_model(tmp_path, random_vae, capsys):
    run = _train(tmp_path, random_vae, "run", ["train.max_steps=1", "model.class_conditional=false"])
    capsys.readouterr()
    assert _predict(os.path.join(run, "latest.pth"), str(tmp_path / "out"), ["guidance_scale=2.5"]) == 0
    assert "no guidance (guidance_scale = 2.5 needs a class- or text-conditional model)" in capsys.readouterr().out


@pytest.mark.slow
def test_compiled_training_saves_plain_weights_that_predict_loads(tmp_path, random_vae):
    """train.compile=true: the compiled wrapper trains, and the checkpoint holds the model's own
    parameter names (no `_orig_mod.` prefix), so predict loads it. (Values are not compared
    with an eager run: compiled code draws label dropout from another random stream.)"""
    steps = ["train.max_steps=3"]
    eager = load_checkpoint(os.path.join(_train(tmp_path, random_vae, "eager", steps), "latest.pth"))
    run = _train(tmp_path, random_vae, "compiled", steps + ["train.compile=true"])
    compiled = load_checkpoint(os.path.join(run, "latest.pth"))
    assert compiled["step"] == 3
    for key in ("model_state", "ema_state"):
        assert set(compiled[key]) == set(eager[key])
    final = compiled["model_state"]["final_layer.linear.weight"]  # zero at init: it trained
    assert final.abs().max() > 0 and torch.isfinite(final).all()
    assert _predict(os.path.join(run, "latest.pth"), str(tmp_path / "pred")) == 0
    assert len(glob.glob(str(tmp_path / "pred" / "*.mp4"))) == 2


def test_too_many_condition_frames_refused_before_the_latent_cache(tmp_path, random_vae):
    """model.condition_frames >= the latent frames leaves nothing to generate: refused with the
    other geometry checks, before the latent cache (or the text cache) is built."""
    from utils.errors import ConfigError
    with pytest.raises(ConfigError, match=r"model.condition_frames = 4: the clips have only 4 latent frames"):
        _train(tmp_path, random_vae, "run", ["train.max_steps=1", "model.first_frame_conditioning=0.5",
                                             "model.condition_frames=4"])
    assert not os.path.exists(os.path.join(tmp_path, "run", "latent_cache"))
