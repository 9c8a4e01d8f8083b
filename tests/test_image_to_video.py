"""Image-to-video and long videos (issue 21): first-frame conditioning in the loss, the noising
and the sampler; predict with `image` / `num_frames` (windows joined without repeated frames)
on a per-frame and a causal VAE; refusals; resume bit-exact with the condition on."""
import glob
import os
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import predict_advanced
import train_advanced
from data import build_dataset
from models.diffusion import Diffusion, make_scheduler, sample
from models.vae import Geometry
from tests.conftest import psnr
from tests.vae_families import RESOLUTION
from training.first_frames import FirstFrames, generate_long, window_plan, windows_of
from training.sampling import sample_videos
from utils.checkpoint import load_checkpoint
from utils.cli import run_main
from utils.config import DataConfig, DiffusionConfig, PredictConfig, config_from_dict
from utils.video_io import count_frames, uint8_to_video_tensor, video_tensor_to_uint8

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.usefixtures("one_thread")
TINY = ["device=cpu", "data.builtin.num_clips=4", "data.builtin.num_val_clips=1", "data.window_stride=4",
        "model.hidden_size=32", "model.depth=2", "model.num_heads=2", "train.batch_size=2",
        "train.warmup_steps=1", "train.log_every=1", "train.ema_warmup_steps=1",
        "validation.every_epochs=0", "train.max_steps=2"]
PER_FRAME = ["data.num_frames=4", "data.builtin.clip_frames=8", "data.resolution=32"]  # trained_vae: 4x, per frame
CAUSAL = ["data.num_frames=5", "data.builtin.clip_frames=9", f"data.resolution={RESOLUTION['wan']}"]
FFC = ["model.first_frame_conditioning=1.0"]


def _train(runs, vae, name, extra=()):
    args = ["--config", os.path.join(ROOT, "config_advanced.yaml"), *TINY, f"vae.path={vae}",
            f"experiment.runs_dir={runs}", f"experiment.name={name}", *extra]
    assert train_advanced.main(args) == 0
    return os.path.join(runs, name, "latest.pth")


def _predict_args(ckpt, out, extra=()):
    return ["--config", os.path.join(ROOT, "predict_advanced.yaml"), "device=cpu", f"checkpoint={ckpt}",
            f"output_dir={out}", "num_videos=1", "num_steps=2", "sampler=euler", *extra]


def _exit(argv, capsys):
    with pytest.raises(SystemExit) as e:
        run_main(lambda a: predict_advanced.main(argv))
    return e.value.code, capsys.readouterr().err


# --------------------------------------------------------------------------- loss and noising


@pytest.mark.parametrize("objective", ["v_prediction", "flow_matching"])
def test_condition_frames_carry_no_loss_and_are_exactly_clean(objective):
    diffusion = Diffusion(DiffusionConfig(objective=objective))
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 5, 2, 2, generator=g), torch.randn(3, 4, 5, 2, 2, generator=g)
    t = diffusion.sample_timesteps(3, "cpu", g)
    x_t = diffusion.add_noise(x0, noise, t)
    first = FirstFrames(1.0, 2)
    given = torch.tensor([True, False, True])
    xc, tc, mask = first.noised(x0, x_t, t, given)
    # conditioned clips: their first 2 frames are the clean latents exactly, at t = 0
    assert torch.equal(xc[[0, 2], :, :2], x0[[0, 2], :, :2])
    assert torch.equal(xc[[0, 2], :, 2:], x_t[[0, 2], :, 2:]) and torch.equal(xc[1], x_t[1])
    assert tc.shape == (3, 5) and (tc[[0, 2], :2] == 0).all()
    assert torch.equal(tc[1], t[1].expand(5)) and torch.equal(tc[[0, 2], 2:], t[[0, 2], None].expand(2, 3))
    assert mask.tolist() == [[False, False, True, True, True], [True] * 5, [False, False, True, True, True]]
    # no loss on the condition frames: any output there leaves the loss as it was
    out = torch.randn(x0.shape, generator=g)
    base = diffusion.loss(out, x0, noise, tc, mask)
    wild = out.clone()
    wild[[0, 2], :, :2] = 1e6
    assert torch.equal(diffusion.loss(wild, x0, noise, tc, mask).loss, base.loss)
    # the loss is the mean over the generated frames of the per-frame weighted MSE
    target = diffusion.target(x0, noise, tc)
    per_frame = (out - target).square().mean(dim=(1, 3, 4))
    w = diffusion.loss_weight(tc)
    for b in range(3):
        keep = mask[b]
        assert base.loss[b] == pytest.approx(float((per_frame[b] * w[b])[keep].mean()), rel=1e-5)
        assert base.mse[b] == pytest.approx(float(per_frame[b][keep].mean()), rel=1e-5)
    # unconditioned clip: the per-frame form equals the per-clip one
    plain = diffusion.loss(out, x0, noise, t)
    assert base.loss[1] == pytest.approx(float(plain.loss[1]), rel=1e-5)
    # off: nothing drawn, nothing changed
    assert FirstFrames(0.0, 1).draw(3, torch.device("cpu"), g) is None


def test_draw_uses_the_given_generator():
    first = FirstFrames(0.5, 1)
    a = first.draw(64, torch.device("cpu"), torch.Generator().manual_seed(3))
    b = first.draw(64, torch.device("cpu"), torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and 10 < int(a.sum()) < 54


@pytest.mark.parametrize("objective,sampler", [("v_prediction", "ddim"), ("v_prediction", "euler"),
                                               ("flow_matching", "euler"), ("flow_matching", "unipc")])
def test_sampler_keeps_condition_frames_clean_at_t0(objective, sampler):
    cfg = DiffusionConfig(objective=objective)
    cond = torch.randn(2, 3, 1, 2, 2)
    seen = []

    def model_fn(x, t, *args, **kw):
        seen.append((x[:, :, :1].clone(), t.clone()))
        return torch.zeros_like(x) + 0.1
    out = sample(model_fn, (2, 3, 4, 2, 2), scheduler=make_scheduler(sampler, cfg), num_steps=3,
                 generator=torch.Generator().manual_seed(0), device="cpu", cond_frames=cond)
    assert torch.equal(out[:, :, :1], cond)
    for x_first, t in seen:
        assert torch.equal(x_first, cond)  # the model input: the clean latents, also after Euler's scaling
        assert t.shape == (2, 4) and (t[:, 0] == 0).all() and (t[:, 1:] > 0).all()


# --------------------------------------------------------------------------- windows


UNIT = 0.03


class CountingVAE:
    """A stand-in VAE whose latents are pixel values: per frame (temporal 1) latent j = frame j;
    causal (temporal r) latent 0 = frame 0 alone, latent j = frame j * r, decoded by linear
    interpolation. With windows whose latent frames count up, the video must count 0, 1, 2, ..."""

    def __init__(self, temporal: int):
        self.geometry = Geometry(1, temporal, 1, temporal)
        self.encoded = []

    def encode(self, pixels, sample=False):  # (B, 3, F, H, W) -> (B, 1, t, H, W)
        self.encoded.append(pixels.shape[2])
        return pixels[:, :1, ::self.geometry.temporal]

    def decode(self, z):  # (B, 1, t, H, W) -> (B, 3, 1 + (t - 1) r, H, W)
        r = self.geometry.temporal
        frames = [z[:, :, :1]]
        for j in range(1, z.shape[2]):
            for m in range(1, r + 1):
                frames.append(z[:, :, j - 1:j] + m / r * (z[:, :, j:j + 1] - z[:, :, j - 1:j]))
        return torch.cat(frames, dim=2).expand(-1, 3, -1, -1, -1)


@pytest.mark.parametrize("temporal,frames", [(1, 1), (1, 2), (4, 1), (4, 2)])
def test_three_windows_join_without_repeated_frames(temporal, frames):
    vae = CountingVAE(temporal)
    latent_t = 4 if temporal == 1 else 3  # window: 4 pixel frames (per frame) or 9 (causal, 3 latents)
    window = vae.geometry.pixel_frames(latent_t)
    overlap = vae.geometry.pixel_frames(frames)
    conds = []

    def sample_window(shape, cond):  # continue counting from the condition's last frame
        conds.append(None if cond is None else cond.clone())
        z = torch.zeros(shape)
        start = 0.0 if cond is None else float(cond[0, 0, -1, 0, 0])
        k = 0 if cond is None else cond.shape[2]
        for j in range(shape[2]):
            if j < k:
                z[:, :, j] = cond[:, :, j]
            else:  # one UNIT per pixel frame (decoded pixels are clamped to [-1, 1])
                z[:, :, j] = start + (j - k + 1) * temporal * UNIT if k else j * temporal * UNIT
        return z
    num_frames = 3 * window - 2 * overlap
    video = generate_long(sample_window, vae, batch=1, latent_shape=(1, latent_t, 1, 1), frames=frames,
                          num_frames=num_frames, images=None, device=torch.device("cpu"))
    values = video[0, 0, :, 0, 0]
    assert video.shape[2] == num_frames == sum(window_plan(num_frames, window, overlap))
    assert torch.allclose(values / UNIT, torch.arange(num_frames, dtype=torch.float32), atol=1e-4)  # no frame twice
    assert len(conds) == 3 and conds[0] is None and all(c.shape[2] == frames for c in conds[1:])
    if temporal > 1:  # the causal VAE re-encodes the last `overlap` decoded frames per window
        assert vae.encoded == [overlap, overlap, overlap]
    spans = windows_of(num_frames, window, overlap)
    assert spans[0] == (0, window) and all(b - a == window for a, b in spans)
    assert spans[-1][1] == num_frames
    # num_frames is exact also when it does not fill the last window
    short = generate_long(sample_window, vae, batch=1, latent_shape=(1, latent_t, 1, 1), frames=frames,
                          num_frames=num_frames - 1, images=None, device=torch.device("cpu"))
    assert short.shape[2] == num_frames - 1


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def per_frame_run(tmp_path_factory, trained_vae):
    runs = tmp_path_factory.mktemp("i2v")
    return _train(runs, trained_vae, "ffc", [*PER_FRAME, *FFC, "diffusion.objective=flow_matching", "validation.sampler=euler",
                                             "model.conditioning=class", "validation.every_epochs=1"])


def test_validation_shows_an_image_to_video_sample(per_frame_run):
    run = os.path.dirname(per_frame_run)
    log = open(os.path.join(run, "log.txt")).read()
    found = re.search(r"image-to-video samples of \d+ held-out first frames: frame 0 PSNR ([\d.]+) dB", log)
    assert found and float(found.group(1)) > 20  # frame 0 is the image through the fixture VAE
    events = b"".join(open(p, "rb").read() for p in glob.glob(os.path.join(run, "tensorboard", "events.*")))
    assert b"val/image_to_video" in events and b"val/first_frame_psnr" in events


@pytest.fixture(scope="module")
def held_out_image(tmp_path_factory, per_frame_run):
    """Frame 0 of the held-out (val) clip, as a PNG, and as uint8 (H, W, 3)."""
    ckpt = load_checkpoint(per_frame_run)
    data = config_from_dict(DataConfig, ckpt["config"]["data"])
    video = build_dataset(data, "val", 0)[0]["video"]  # (3, T, H, W)
    frame = video_tensor_to_uint8(video)[0]  # (H, W, 3)
    path = str(tmp_path_factory.mktemp("img") / "frame.png")
    Image.fromarray(frame).save(path)
    return path, frame


def test_image_to_video_first_frame_matches_the_image(per_frame_run, held_out_image, trained_vae, tmp_path):
    path, frame = held_out_image
    cfg = config_from_dict(PredictConfig, {"device": "cpu", "checkpoint": per_frame_run, "num_videos": 2,
                                           "num_steps": 2, "sampler": "euler", "image": path,
                                           "output_dir": str(tmp_path)})
    videos, ckpt = sample_videos(cfg, torch.device("cpu"))
    from models.vae import FrozenVAE
    vae = FrozenVAE.from_pretrained(trained_vae)
    x = uint8_to_video_tensor(frame[None])[None]  # (1, 3, 1, H, W)
    round_trip = video_tensor_to_uint8(vae.decode(vae.encode(x, sample=False))[0])[0]
    floor = psnr(round_trip, frame)
    assert floor > 20  # the fixture VAE reconstructs the built-in clips
    for v in videos:
        assert v.shape == (4, 32, 32, 3)  # (frames, H, W, 3): the training window, the image's size
        assert psnr(v[0], frame) >= floor - 0.5
    # a different image gives a different frame 0: the image, not the model, made it
    other = str(tmp_path / "other.png")
    Image.fromarray(255 - frame).save(other)
    cfg.image = other
    assert psnr(sample_videos(cfg, torch.device("cpu"))[0][0][0], frame) < floor - 5


def test_predict_image_and_three_windows_per_frame_vae(per_frame_run, held_out_image, tmp_path):
    path, _ = held_out_image
    out = str(tmp_path / "p")
    # window 4 frames, 1 condition frame: 3 windows = 4 + 3 + 3
    assert predict_advanced.main(_predict_args(per_frame_run, out, [f"image={path}", "num_frames=10"])) == 0
    assert count_frames(os.path.join(out, "sample_000.mp4")) == 10
    assert predict_advanced.main(_predict_args(per_frame_run, out, ["num_frames=7", "num_videos=2",
                                                                    f"images=[{path},{path}]"])) == 0
    assert count_frames(os.path.join(out, "sample_001.mp4")) == 7


def test_causal_vae_image_and_three_windows(vae_families, tmp_path):
    ckpt = _train(tmp_path, vae_families["wan"], "ffc", [*CAUSAL, *FFC])
    assert load_checkpoint(ckpt)["model"]["config"]["first_frame_conditioning"] == 1.0
    img = str(tmp_path / "img.png")
    Image.fromarray(np.full((20, 24, 3), 90, np.uint8)).save(img)  # resized and cropped to 16 x 16
    out = str(tmp_path / "p")
    # window 5 pixel frames (2 latents), condition 1 latent = 1 pixel frame: 5 + 4 + 4
    assert predict_advanced.main(_predict_args(ckpt, out, [f"image={img}", "num_frames=13"])) == 0
    assert count_frames(os.path.join(out, "sample_000.mp4")) == 13


def test_refusals(tmp_path, trained_vae, per_frame_run, held_out_image, capsys):
    plain = _train(tmp_path, trained_vae, "plain", PER_FRAME)
    path, _ = held_out_image
    out = str(tmp_path / "p")
    for extra, words in [([f"image={path}"], ["image-to-video", "model.first_frame_conditioning = 0"]),
                         (["num_frames=9"], ["num_frames = 9", "4-frame training window",
                                             "model.first_frame_conditioning"])]:
        code, err = _exit(_predict_args(plain, out, extra), capsys)
        assert code == 2 and all(w in err for w in words), err
        assert not os.path.exists(os.path.join(out, "sample_000.mp4"))
    code, err = _exit(_predict_args(per_frame_run, out, [f"image={tmp_path}/none.png"]), capsys)
    assert code == 2 and "image = " in err and "none.png" in err
    code, err = _exit(_predict_args(per_frame_run, out, [f"image={path}", f"images=[{path}]"]), capsys)
    assert code == 2 and "image and images" in err
    not_image = tmp_path / "x.png"
    not_image.write_text("not a png")
    code, err = _exit(_predict_args(per_frame_run, out, [f"image={not_image}"]), capsys)
    assert code == 2 and "not a readable image" in err
    # the training window itself (or shorter) needs no condition
    assert predict_advanced.main(_predict_args(plain, out, ["num_frames=3"])) == 0
    assert count_frames(os.path.join(out, "sample_000.mp4")) == 3


def test_resume_bit_exact_with_the_condition_on(tmp_path, trained_vae, monkeypatch):
    import training.stage2 as stage2
    ck = os.path.join(tmp_path, "step2.pth")
    original_save = stage2.save

    def spy_save(s, name="latest.pth", **kw):
        original_save(s, name, **kw)
        if s.pos.step == 2 and name == "latest.pth":
            shutil.copy(os.path.join(s.run_dir, name), ck)

    monkeypatch.setattr(stage2, "save", spy_save)
    steps = [*PER_FRAME, "model.first_frame_conditioning=0.5", "train.max_steps=4",
             "train.checkpoint_every=2"]
    straight = load_checkpoint(_train(tmp_path, trained_vae, "straight", steps))
    monkeypatch.setattr(stage2, "save", original_save)
    torch.manual_seed(123)
    resumed = load_checkpoint(_train(tmp_path, trained_vae, "resumed", steps + [f"train.resume={ck}"]))
    assert resumed["step"] == straight["step"] == 4
    for key in ("model_state", "ema_state"):
        for name, tensor in straight[key].items():
            assert torch.equal(tensor, resumed[key][name]), f"{key}.{name} differs after resume"


# --------------------------------------------------------------------------- evaluate: fidelity and drift


def test_evaluate_first_frame_psnr_and_drift_by_window(per_frame_run, tmp_path, capsys, monkeypatch):
    import json

    import evaluate
    from training.evaluation import select_real_clips
    asked = []  # what each sampling call was told: video i continues real clip i, so its class

    def spy(chunk, device, loaded=None):
        asked.append((list(chunk.class_labels), list(chunk.images)))
        return sample_videos(chunk, device, loaded)

    monkeypatch.setattr(evaluate, "sample_videos", spy)
    from tests.test_evaluate import StandInI3D
    torch.manual_seed(0)
    detector = str(tmp_path / "i3d_torchscript.pt")
    torch.jit.save(torch.jit.script(StandInI3D()), detector)
    out = str(tmp_path / "e.json")
    assert evaluate.main(["--config", os.path.join(ROOT, "evaluate.yaml"), "device=cpu", f"output={out}",
                          f"checkpoint={per_frame_run}", "num_videos=3", "num_steps=2", "sampler=euler",
                          f"fvd.detector_path={detector}", "batch_size=3", "image_to_video=true",
                          "windows=3"]) == 0
    r = json.load(open(out))
    d = r["image_to_video"]
    assert d["windows"] == 3 and d["num_frames"] == 10 and d["overlap_frames"] == 1
    assert d["window_spans"] == [[0, 4], [3, 7], [6, 10]]
    assert len(d["fvd_by_window"]) == len(d["jigsaw_by_window"]) == 3
    assert d["fvd_by_window"][0] == pytest.approx(r["fvd"])  # FVD itself scores the first window
    assert d["first_frame_psnr"] >= d["first_frame_psnr_vae_round_trip"] - 0.5 > 20
    assert "FVD by window" in capsys.readouterr().out
    plan = r["protocol"]["real"]
    real = select_real_clips(config_from_dict(DataConfig, load_checkpoint(per_frame_run)["config"]["data"]),
                             plan["split"], plan["dataset_seed"], 3, 0)  # (labels: per video, not start)
    expected = [real.dataset.source_label(src) for src, _ in real.plan]
    assert [labels for labels, _ in asked] == [[expected[i % len(expected)] for i in range(3)]]
    assert r["protocol"]["generated"]["class_labels"] == "the class of real clip i"
    # refused for a checkpoint trained without the condition, naming the key
    plain = _train(tmp_path, _vae_of(per_frame_run), "plain", [*PER_FRAME])
    with pytest.raises(Exception, match="model.first_frame_conditioning"):
        evaluate.main(["--config", os.path.join(ROOT, "evaluate.yaml"), "device=cpu", f"checkpoint={plain}",
                       "num_videos=2", "num_steps=2", "sampler=euler", f"fvd.detector_path={detector}",
                       "windows=2"])


def _vae_of(ckpt_path):
    return load_checkpoint(ckpt_path)["vae"]["path"]


def test_drift_benchmark_quick(tmp_path, capsys):
    import json

    from benchmarks.drift import main
    out = str(tmp_path / "new_folder" / "drift.json")  # made, as by the other benchmarks' --json
    assert main(["--quick", "--json", out]) == 0
    r = json.load(open(out))
    assert r["image_to_video"] and r["num_frames"] == 7  # windows of 4 frames joined on 1: 4 + 3
    assert [row["frames"] for row in r["rows"]] == [[0, 4], [3, 7]]
    assert all(row["videos"] == 2 and 0 <= row["coherent_so_far"] <= row["videos"] for row in r["rows"])
    # a class checkpoint: video i is told the class of the clip its first frame comes from
    assert r["class_labels"] == r["image_labels"] and len(r["image_labels"]) == 2
    assert "| window | frames | coherent (this window)" in capsys.readouterr().out


def test_text_conditioning_with_first_frames(tmp_path, trained_vae, text_encoders, held_out_image):
    text = ["model.conditioning=text", "data.builtin.captions=true",
            f"text_encoder.path={text_encoders['t5']}", "validation.every_epochs=1"]
    ckpt = _train(tmp_path, trained_vae, "t2v_ffc", [*PER_FRAME, *FFC, *text])
    record = load_checkpoint(ckpt)
    assert record["conditioning"]["kind"] == "text"
    assert record["model"]["config"]["first_frame_conditioning"] == 1.0
    assert "image-to-video samples of" in open(os.path.join(tmp_path, "t2v_ffc", "log.txt")).read()
    path, frame = held_out_image
    out = str(tmp_path / "p")
    assert predict_advanced.main(_predict_args(ckpt, out, [
        f"image={path}", "num_frames=7", "guidance_scale=2.0",
        "prompts=[a red square moving left on a black background]"])) == 0
    assert count_frames(os.path.join(out, "sample_000.mp4")) == 7
    assert open(os.path.join(out, "prompts.txt")).read().startswith("a red square")


def _validation_state(cfg, seam, val_captions, log_text):
    """The parts of a stage-2 state `validation._log_image_to_video` reads (generation stubbed)."""
    from types import SimpleNamespace
    log = SimpleNamespace(video=lambda *a: None, scalar=lambda *a: None, info=lambda *a: None, text=log_text)
    return SimpleNamespace(cfg=cfg, cond=seam, val_captions=val_captions, log=log, diffusion=None,
                           ema=SimpleNamespace(model=None), vae=None, device=torch.device("cpu"),
                           dims=dict(in_channels=4, num_frames=4, latent_height=8, latent_width=8),
                           first_frames=FirstFrames(1.0, 1), pos=SimpleNamespace(step=1))


def test_validation_image_to_video_of_a_text_model_uses_each_images_caption(monkeypatch):
    """val/image_to_video of a text model: image i comes with its own clip's caption (not an
    unrelated held-out caption), so the two conditions describe one scene; both are logged."""

    from training import validation
    from training.conditioning import SampleConditions
    from utils.config import TrainRunConfig, load_config
    cfg = load_config(TrainRunConfig, os.path.join(ROOT, "config_advanced.yaml"),
                      [*TINY, *PER_FRAME, "vae.path=/nowhere", "data.builtin.captions=true",
                       "validation.num_videos=2"])

    from training.conditioning import TextConditioning

    class Seam:
        reads = ("caption",)
        clip_conditions = TextConditioning.clip_conditions  # the seam's: each clip's own caption

        def samples(self, n, *, prompts=None, **_):
            return SampleConditions({}, None, [prompts[i % len(prompts)] for i in range(n)])

    seen = {}

    def fake_generate(*args, conditions, images, **kwargs):
        seen["prompts"] = conditions.prompts
        return [np.zeros((4, 32, 32, 3), np.uint8) for _ in range(images.shape[0])]

    logged = {}
    s = _validation_state(cfg, Seam(), ["an unrelated caption"], lambda tag, text, step: logged.setdefault(tag, text))
    monkeypatch.setattr(validation, "generate_videos", fake_generate)
    validation._log_image_to_video(s, s.ema.model)
    val = build_dataset(cfg.data, "val", cfg.experiment.seed)
    index = np.unique(np.linspace(0, len(val) - 1, min(2, len(val))).round().astype(int))
    assert seen["prompts"] == [val[int(i)]["caption"] for i in index]
    assert seen["prompts"][0] in logged["val/image_to_video_prompts"]


def test_validation_image_to_video_of_a_class_model_uses_each_images_class(monkeypatch):
    """val/image_to_video of a class model: image i is sampled with its own clip's class, not
    the 0, 1, 2, ... of the other validation samples (a "red square" told to continue a blue
    circle's frame measures nothing)."""

    from training import validation
    from training.conditioning import SampleConditions
    from utils.config import TrainRunConfig, load_config
    cfg = load_config(TrainRunConfig, os.path.join(ROOT, "config_advanced.yaml"),
                      [*TINY, *PER_FRAME, "vae.path=/nowhere", "validation.num_videos=3"])

    from training.conditioning import ClassConditioning

    class Seam:
        reads = ("label",)
        clip_conditions = ClassConditioning.clip_conditions  # the seam's: each clip's own class

        def samples(self, n, *, labels=None, **_):
            labels = labels or list(range(n))
            return SampleConditions({"y": torch.tensor(labels)}, None, [""] * n)

    seen = {}

    def fake_generate(*args, conditions, images, **kwargs):
        seen["labels"] = conditions.cond["y"].tolist()
        return [np.zeros((4, 32, 32, 3), np.uint8) for _ in range(images.shape[0])]

    s = _validation_state(cfg, Seam(), [], lambda *a: None)
    monkeypatch.setattr(validation, "generate_videos", fake_generate)
    validation._log_image_to_video(s, s.ema.model)
    val = build_dataset(cfg.data, "val", cfg.experiment.seed)
    index = np.unique(np.linspace(0, len(val) - 1, min(3, len(val))).round().astype(int))
    expected = [int(val[int(i)]["label"]) for i in index]
    assert seen["labels"] == expected and expected != list(range(len(expected)))


# --------------------------------------------------------------------------- issue 27: train and predict alike


@pytest.mark.parametrize("cache", ["off", "auto"])
def test_training_conditions_on_the_posterior_means_as_predict_does(tmp_path, trained_vae, monkeypatch, cache):
    """With vae.sample_posterior: true (the default) x0 is a posterior sample, but the clean
    condition frames the DiT sees must be the posterior MEANS: predict encodes the image with
    `vae.encode(..., sample=False)`. Checked on the model input of a real training step, against
    each clip's first frame encoded the way predict encodes an image (cache off), or the cached
    moments' mean (cache auto)."""
    import training.stage2 as stage2
    from models.dit import VideoDiT
    from models.vae import FrozenVAE
    seen = {}
    latents, forward = stage2.batch_latents, VideoDiT.forward

    def spy_latents(s, batch):
        seen.setdefault("batch", batch)
        return latents(s, batch)

    def spy_forward(self, x, t, *args, **kwargs):
        if t.ndim == 2 and torch.is_grad_enabled() and "x" not in seen:  # the first training step
            seen["x"], seen["t"] = x.detach().clone(), t.clone()
        return forward(self, x, t, *args, **kwargs)
    monkeypatch.setattr(stage2, "batch_latents", spy_latents)
    monkeypatch.setattr(VideoDiT, "forward", spy_forward)
    _train(tmp_path, trained_vae, "run", [*PER_FRAME, *FFC, f"data.cache={cache}", "vae.sample_posterior=true",
                                          "train.max_steps=1"])
    vae, batch = FrozenVAE.from_pretrained(trained_vae), seen["batch"]
    if "video" in batch:  # predict's encoding of an image: frame 0 alone, sample=False
        expected = vae.encode(batch["video"][:, :, :1], sample=False)  # (B, C, 1, h, w)
    else:
        expected = vae.latents_from_moments(batch["mean"][:, :, :1], batch["std"][:, :, :1], sample=False)
    assert (seen["t"][:, 0] == 0).all() and (seen["t"][:, 1:] > 0).all()  # p = 1: every clip conditioned
    torch.testing.assert_close(seen["x"][:, :, :1], expected, atol=1e-5, rtol=1e-5)


def test_a_loss_mask_without_a_generated_frame_is_refused_on_the_device():
    diffusion = Diffusion(DiffusionConfig())
    x0 = torch.zeros(2, 3, 2, 2, 2)
    t = torch.tensor([[0, 5], [0, 0]])
    with pytest.raises(RuntimeError, match="no frame to carry loss"):  # checked by the device: no host read
        diffusion.loss(x0, x0, x0, t, torch.tensor([[False, True], [False, False]]))


def test_condition_frames_the_vae_cannot_encode_alone_are_refused_naming_those_that_can(
        tmp_path, vae_families, capsys):
    """CogVideoX encodes 1 + 8j frames: 2 latent condition frames are 5 pixel frames, which
    image-to-video, extension and val/image_to_video would fail to encode after training. Refused
    before training, naming the count that works; taking that advice trains and extends."""
    from utils.errors import ConfigError
    cog = ["data.num_frames=9", "data.builtin.clip_frames=13", f"data.resolution={RESOLUTION['cogvideox']}",
           "model.first_frame_conditioning=0.5"]
    with pytest.raises(ConfigError) as e:
        _train(tmp_path, vae_families["cogvideox"], "even", [*cog, "model.condition_frames=2"])
    said = str(e.value)
    assert "model.condition_frames = 2" in said and "1 + 8k frames" in said and "5 pixel frames" in said
    advice = re.search(r"use model.condition_frames = (\d+)", said)
    assert advice and advice.group(1) == "1"
    ckpt = _train(tmp_path, vae_families["cogvideox"], "odd", [*cog, f"model.condition_frames={advice.group(1)}"])
    img = str(tmp_path / "img.png")
    Image.fromarray(np.full((16, 16, 3), 90, np.uint8)).save(img)
    out = str(tmp_path / "p")
    assert predict_advanced.main(_predict_args(ckpt, out, [f"image={img}", "num_frames=17"])) == 0
    assert count_frames(os.path.join(out, "sample_000.mp4")) == 17


@pytest.mark.parametrize("family", ["cogvideox", "wan", "sd3"])
def test_the_condition_frame_check_agrees_with_what_the_vae_encodes(vae_families, family):
    """For every count k of condition frames below the clip's latent frames: the check passes
    exactly when the VAE encodes the k latent frames' pixel frames on their own (what
    image-to-video and extension do), so nothing it lets through fails after training."""
    from models.vae import FrozenVAE
    from utils.errors import ConfigError
    vae = FrozenVAE.from_pretrained(vae_families[family])
    g, side = vae.geometry, RESOLUTION[family]
    latent_frames = g.latent_frames(1 + 4 * g.frame_step) if g.temporal > 1 else 5
    for k in range(1, latent_frames):
        try:
            FirstFrames(0.5, k).check_vae(g, latent_frames)
            refused = False
        except ConfigError:
            refused = True
        try:
            vae.encode(torch.zeros(1, 3, g.pixel_frames(k), side, side), sample=False)
            encodes = True
        except ConfigError:
            encodes = False
        assert refused != encodes, (family, k)


def test_images_give_one_video_each_and_the_advice_on_too_few_videos_works(per_frame_run, held_out_image,
                                                                           tmp_path):
    """num_videos null: one video per image of `images` (`image` alone: one video). More images
    than an explicit num_videos is refused at load, and both ways it advises work."""
    from utils.config import load_config
    from utils.errors import ConfigError
    path, _ = held_out_image
    base = [a for a in _predict_args(per_frame_run, "", []) if not a.startswith(("num_videos", "output_dir"))]
    out = tmp_path / "three"
    assert predict_advanced.main([*base, f"output_dir={out}", f"images=[{path},{path},{path}]"]) == 0
    assert len(glob.glob(str(out / "sample_*.mp4"))) == 3
    out = tmp_path / "one"
    assert predict_advanced.main([*base, f"output_dir={out}", f"image={path}"]) == 0
    assert len(glob.glob(str(out / "sample_*.mp4"))) == 1
    images = f"images=[{path},{path}]"
    with pytest.raises(ConfigError) as e:
        load_config(PredictConfig, os.path.join(ROOT, "predict_advanced.yaml"), [images, "num_videos=1"])
    assert "set num_videos = 2 or leave it null" in str(e.value)
    for advice in ("num_videos=2", "num_videos=null"):
        out = tmp_path / advice.replace("=", "_")
        assert predict_advanced.main([*base, f"output_dir={out}", images, advice]) == 0
        assert len(glob.glob(str(out / "sample_*.mp4"))) == 2

