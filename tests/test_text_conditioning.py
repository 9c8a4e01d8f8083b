"""Text conditioning end to end through the one seam (training/conditioning.py): stage 2 on the
built-in captions with a tiny frozen T5, the embedding cache reused, exact resume, the encoder
recorded and a different one refused (resume, predict, evaluate), caption dropout, guidance
with prompts and a negative prompt, prompts.txt, and the class path's numbers unchanged."""
import os
import re
import subprocess
import sys

import pytest
import torch

import evaluate
from models.diffusion import guided_v
from models.dit import VideoDiT
from models.text_encoder import FrozenTextEncoder
from tests.test_evaluate import detector  # noqa: F401  (a fixture)
from tests.test_stage2 import ROOT, _predict, _train, random_vae  # noqa: F401  (random_vae is a fixture)
from training.conditioning import (ClassConditioning, TextConditioning, conditioning_from_checkpoint)
from utils.checkpoint import load_checkpoint
from utils.config import ModelConfig
from utils.errors import UserError

TEXT = ["model.conditioning=text", "data.builtin.captions=true"]  # on config_advanced.yaml: nothing else
PROMPTS = "prompts=[a red square moving left on a black background,a blue circle moving up on a black background]"


def _text_args(encoder, steps, extra=()):
    return [*TEXT, f"text_encoder.path={encoder}", f"train.max_steps={steps}", *extra]


@pytest.fixture(scope="module")
def text_run(tmp_path_factory, random_vae, text_encoders):
    root = str(tmp_path_factory.mktemp("t2v"))
    run = _train(root, random_vae, "run", _text_args(text_encoders["t5"], 3))
    return run


def _log(run):
    return open(os.path.join(run, "log.txt")).read()


def test_checkpoint_records_the_encoder_and_the_cache_is_reused(text_run, random_vae, text_encoders):
    ckpt = load_checkpoint(os.path.join(text_run, "latest.pth"))
    enc = FrozenTextEncoder.from_pretrained(text_encoders["t5"])
    cond = ckpt["conditioning"]
    assert cond["kind"] == "text" and cond["text_encoder"]["fingerprint"] == enc.fingerprint
    assert ckpt["model"]["dims"]["text_dim"] == enc.hidden_size and ckpt["model"]["dims"]["num_classes"] == 0
    # The optimizer holds the DiT's parameters only (the encoder is frozen and released).
    n_opt = sum(len(g["params"]) for g in ckpt["optimizer"]["param_groups"])
    assert n_opt == len(ckpt["model_state"])
    first = re.findall(r"(\d+) distinct captions, (\d+) encoded now, (\d+) reused", _log(text_run))
    assert first and int(first[0][1]) == int(first[0][0]) > 0 and first[0][2] == "0"
    # The same run resumed: every caption comes from the cache, nothing is encoded.
    _train(os.path.dirname(text_run), random_vae, "run",
           _text_args(text_encoders["t5"], 4, ["train.resume=auto"]))
    again = re.findall(r"(\d+) distinct captions, (\d+) encoded now, (\d+) reused", _log(text_run))
    assert len(again) == 2 and again[1][1] == "0" and again[1][2] == again[1][0]


def test_resume_with_text_is_bit_exact(tmp_path, random_vae, text_encoders):
    enc = text_encoders["t5"]
    straight = load_checkpoint(os.path.join(_train(tmp_path, random_vae, "straight", _text_args(enc, 4)),
                                            "latest.pth"))
    half = _train(tmp_path, random_vae, "half", _text_args(enc, 2))
    torch.manual_seed(999)  # resume must not depend on the process's RNG state
    resumed = load_checkpoint(os.path.join(_train(tmp_path, random_vae, "resumed", _text_args(
        enc, 4, [f"train.resume={os.path.join(half, 'latest.pth')}"])), "latest.pth"))
    assert resumed["step"] == straight["step"] == 4
    for key in ("model_state", "ema_state"):
        for name, tensor in straight[key].items():
            assert torch.equal(tensor, resumed[key][name]), f"{key}.{name} differs after resume"


def test_a_different_encoder_is_refused_by_resume_predict_and_evaluate(text_run, random_vae, text_encoders,
                                                                       tmp_path, detector):
    ckpt = os.path.join(text_run, "latest.pth")
    other = text_encoders["umt5"]  # same width, other weights and tokenizer
    with pytest.raises(UserError, match="text encoder mismatch"):
        _train(os.path.dirname(text_run), random_vae, "run", _text_args(other, 5, ["train.resume=auto"]))
    with pytest.raises(UserError, match="text encoder mismatch.*weights"):
        _predict(ckpt, str(tmp_path / "p"), [PROMPTS, f"text_encoder.path={other}"])
    assert not os.path.exists(tmp_path / "p" / "sample_000.mp4")
    with pytest.raises(UserError, match="text encoder mismatch"):
        evaluate.main(["--config", os.path.join(ROOT, "evaluate.yaml"), "device=cpu", f"checkpoint={ckpt}",
                       "num_videos=4", "num_steps=2", f"fvd.detector_path={detector}",
                       f"text_encoder.path={other}"])
    # As a command: exit status 2 and the message, no traceback.
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "predict_advanced.py"), "--config",
                           os.path.join(ROOT, "predict_advanced.yaml"), "device=cpu", f"checkpoint={ckpt}",
                           f"output_dir={tmp_path / 'q'}", PROMPTS, f"text_encoder.path={other}"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and "text encoder mismatch" in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr


def test_predict_writes_prompts_and_refuses_what_does_not_fit(text_run, tmp_path):
    ckpt = os.path.join(text_run, "latest.pth")
    out = str(tmp_path / "pred")
    assert _predict(ckpt, out, ["num_videos=3", PROMPTS, "negative_prompt=a green triangle"]) == 0
    lines = open(os.path.join(out, "prompts.txt"), encoding="utf-8").read().splitlines()
    assert lines == ["a red square moving left on a black background",
                     "a blue circle moving up on a black background",
                     "a red square moving left on a black background"]  # cycled over num_videos
    assert all(os.path.isfile(os.path.join(out, f"sample_{i:03d}.mp4")) for i in range(3))
    # prompts_file: one prompt per line
    pf = tmp_path / "prompts.txt"
    pf.write_text("a yellow triangle moving down on a black background\n", encoding="utf-8")
    assert _predict(ckpt, str(tmp_path / "pf"), ["num_videos=1", f"prompts_file={pf}"]) == 0
    assert open(tmp_path / "pf" / "prompts.txt").read() == "a yellow triangle moving down on a black background\n"
    with pytest.raises(UserError, match="text-conditioned: give prompts"):
        _predict(ckpt, str(tmp_path / "none"))
    with pytest.raises(UserError, match="num_videos = 1"):
        _predict(ckpt, str(tmp_path / "few"), ["num_videos=1", PROMPTS])
    with pytest.raises(UserError, match="give prompts"):
        _predict(ckpt, str(tmp_path / "cls"), ["class_labels=[0]"])


def test_three_prompts_give_three_videos(text_run, tmp_path, capsys):
    """num_videos null (predict_advanced.yaml's default): one video per prompt, as diffusers'
    pipelines; an explicit num_videos keeps cycling them, and says so; more prompts than an
    explicit num_videos is refused, and either advice it gives works."""
    import glob

    import predict_advanced
    three = ["a red square moving left on a black background", "a blue circle moving up on a black background",
             "a green triangle moving down on a black background"]
    args = lambda out, *extra: ["--config", os.path.join(ROOT, "predict_advanced.yaml"), "device=cpu",
                                f"checkpoint={os.path.join(text_run, 'latest.pth')}", f"output_dir={out}",
                                "num_steps=2", f"prompts=[{','.join(three)}]", *extra]
    out = tmp_path / "null"
    assert predict_advanced.main(args(out)) == 0
    assert len(glob.glob(str(out / "sample_*.mp4"))) == 3
    assert open(out / "prompts.txt").read().splitlines() == three
    assert "num_videos = null: 3 videos, one per entry of prompts" in capsys.readouterr().out
    out = tmp_path / "five"
    assert predict_advanced.main(args(out, "num_videos=5")) == 0
    assert open(out / "prompts.txt").read().splitlines() == three + three[:2]  # cycled, as before
    assert "num_videos = 5 with 3 prompts: cycled" in capsys.readouterr().out
    with pytest.raises(UserError) as e:
        predict_advanced.main(args(tmp_path / "two", "num_videos=2"))
    assert "set num_videos = 3" in str(e.value) and "leave num_videos null" in str(e.value)
    for advice in ("num_videos=3", "num_videos=null"):
        out = tmp_path / advice.replace("=", "_")
        assert predict_advanced.main(args(out, advice)) == 0
        assert len(glob.glob(str(out / "sample_*.mp4"))) == 3


def test_prompts_refused_by_a_class_checkpoint(tmp_path, random_vae):
    run = _train(tmp_path, random_vae, "cls", ["train.max_steps=1"])
    with pytest.raises(UserError, match="class-conditional; use class_labels"):
        _predict(os.path.join(run, "latest.pth"), str(tmp_path / "p"), [PROMPTS])


class _Table:
    """A stand-in TextTable: every caption -> fixed random tokens."""

    def __init__(self, dim=8, length=4):
        self.dim, self.length = dim, length

    def __contains__(self, text):
        return True

    def lookup(self, texts, trim=False):
        g = torch.Generator().manual_seed(0)
        tokens = torch.randn(len(texts), self.length, self.dim, generator=g)
        return tokens, torch.ones(len(texts), self.length, dtype=torch.bool), None


def _text_model(dim=8):
    cfg = ModelConfig(hidden_size=32, depth=2, num_heads=2, conditioning="text", class_conditional=None,
                      patch_size=1).resolved()
    torch.manual_seed(0)
    model = VideoDiT(cfg, 4, 2, 4, text_dim=dim).eval()
    with torch.no_grad():  # a trained-looking model: the zero-initialised outputs made non-zero
        for p in model.parameters():
            if not p.abs().sum():
                p.normal_(0, 0.05)
    return model


def test_caption_dropout_reaches_the_null_at_its_rate():
    seam = TextConditioning({"hidden_size": 8}, caption_dropout=0.1, table=_Table())
    gen = torch.Generator().manual_seed(0)
    kw = seam.train_kwargs({"caption": ["x"] * 20000}, torch.device("cpu"), gen)
    assert abs(kw["drop_text"].float().mean().item() - 0.1) < 0.01
    # Same generator state, same drops (resumable); no dropout outside training.
    again = seam.train_kwargs({"caption": ["x"] * 20000}, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert torch.equal(kw["drop_text"], again["drop_text"])
    assert not seam.eval_kwargs({"caption": ["x"] * 8}, torch.device("cpu"))["drop_text"].any()
    # A dropped caption IS the null condition: the model's output equals the output with no text.
    model = _text_model()
    small = seam.train_kwargs({"caption": ["x"] * 4}, torch.device("cpu"), None)
    small["drop_text"] = torch.tensor([True, False, True, False])
    x, t = torch.randn(4, 4, 2, 4, 4), torch.tensor([10, 20, 30, 40])
    with torch.no_grad():
        out, null, cond = model(x, t, **small), model(x, t), model(x, t, **{**small, "drop_text": None})
    torch.testing.assert_close(out[0::2], null[0::2])
    torch.testing.assert_close(out[1::2], cond[1::2])
    assert not torch.allclose(cond[0], null[0])


def test_guidance_with_prompts_and_a_negative_prompt(text_encoders):
    enc = FrozenTextEncoder.from_pretrained(text_encoders["t5"])
    seam = TextConditioning(enc.describe(), encoder=enc)
    model = _text_model(enc.hidden_size)
    calls = []

    def spy(x, t, **kw):
        calls.append(kw)
        return model(x, t, **kw)
    x, t = torch.randn(2, 4, 2, 4, 4), torch.tensor([500, 500])
    prompts = ["a red square moving left", "a blue circle moving up"]
    plain = seam.samples(2, prompts=prompts)
    negative = seam.samples(2, prompts=prompts, negative_prompt="a green triangle")
    with torch.no_grad():
        g1 = guided_v(spy, x, t, plain.cond, 1.0, uncond=plain.uncond)
        g3 = guided_v(spy, x, t, plain.cond, 3.0, uncond=plain.uncond)
        n3 = guided_v(spy, x, t, negative.cond, 3.0, uncond=negative.uncond)
        n1 = guided_v(spy, x, t, negative.cond, 1.0, uncond=negative.uncond)
    assert not torch.allclose(g1, g3) and not torch.allclose(g3, n3)
    torch.testing.assert_close(g1, n1)  # guidance 1: the uncond half is never run
    assert [c["text"].shape[0] for c in calls] == [2, 4, 4, 2]  # cond + uncond in one batched pass
    # The null uncond is every caption dropped; the negative uncond is the negative prompt's tokens.
    assert calls[1]["drop_text"].tolist() == [False, False, True, True]
    neg = enc.encode(["a green triangle"]).tokens[0]
    L = calls[2]["text"].shape[1]  # the prompts' longest caption: the masked padding is not computed
    assert L < enc.max_length and not neg[L:].any()
    torch.testing.assert_close(calls[2]["text"][2], neg[:L])
    assert not calls[2]["drop_text"].any()


def test_class_guidance_numbers_are_those_of_the_older_path():
    cfg = ModelConfig(hidden_size=32, depth=2, num_heads=2, patch_size=1).resolved()
    torch.manual_seed(0)
    model = VideoDiT(cfg, 4, 2, 4, num_classes=3).eval()
    seam = ClassConditioning(3, ["a", "b", "c"])
    conds = seam.samples(4)
    assert conds.cond["y"].tolist() == [0, 1, 2, 0]
    x, t = torch.randn(4, 4, 2, 4, 4), torch.full((4,), 300)
    with torch.no_grad():
        old = guided_v(model, x, t, conds.cond["y"], 2.5, model.null_class_id)
        new = guided_v(model, x, t, conds.cond, 2.5, uncond=conds.uncond)
    assert torch.equal(old, new)
    with pytest.raises(UserError, match="class_labels contains 5"):
        seam.samples(2, labels=[5])


def test_checkpoint_conditioning_of_older_checkpoints():
    old_class = {"model": {"dims": {"num_classes": 2}}, "class_names": ["a", "b"]}
    assert isinstance(conditioning_from_checkpoint(old_class, "x.pth", torch.device("cpu")), ClassConditioning)
    none = conditioning_from_checkpoint({"model": {"dims": {"num_classes": 0}}}, "x.pth", torch.device("cpu"))
    assert none.kind == "none" and none.samples(2).cond == {}
    with pytest.raises(UserError, match="not text-conditioned"):
        none.samples(2, prompts=["a dog"])


def test_diagnose_condition_check_names_the_encoder_and_measures_caption_reading(text_run, random_vae,
                                                                                 text_encoders):
    from models.vae import FrozenVAE
    from training import diagnostics
    from training.conditioning import conditioning_for_training
    from utils.config import TrainRunConfig, load_config
    from utils.logging import RunLogger
    path = os.path.join(text_run, "latest.pth")
    ckpt = load_checkpoint(path)
    device = torch.device("cpu")
    seam = conditioning_from_checkpoint(ckpt, path, device)
    vae = FrozenVAE.from_pretrained(random_vae)

    def configured(encoder):
        cfg = load_config(TrainRunConfig, os.path.join(ROOT, "config_advanced.yaml"),
                          ["device=cpu", "data.num_frames=4", "data.resolution=16", "data.builtin.num_clips=6",
                           "data.builtin.clip_frames=8", f"vae.path={random_vae}",
                           *_text_args(encoder, 3)])
        from data import build_dataset
        return cfg, conditioning_for_training(cfg, build_dataset(cfg.data, "train", 0), device, RunLogger(None))
    cfg, same = configured(text_encoders["t5"])
    clips, batch = diagnostics.real_clips(cfg, "val", 4)
    check = diagnostics.check_condition(ckpt, same, seam, vae, clips, batch, device, 0, path)
    m = re.search(r"loss with own captions ([\d.]+) vs shuffled ([\d.]+) on 4 held-out clips", check.line())
    assert m and float(m.group(1)) > 0 and check.status == ("PASS" if float(m.group(1)) < float(m.group(2)) else "FAIL")
    _, other = configured(text_encoders["umt5"])
    bad = diagnostics.check_condition(ckpt, other, seam, vae, clips, batch, device, 0, path)
    assert bad.status == "FAIL" and "text encoder mismatch" in bad.line()


def test_evaluate_conditions_on_the_real_clips_captions(text_run, detector):
    import training.evaluation as ev
    from training.sampling import sample_videos
    from utils.config import EvaluateConfig, load_config
    seen = []

    def spy(cfg, device, loaded=None):  # predict's sample_videos, recording the prompts it is given
        seen.extend(cfg.prompts)
        return sample_videos(cfg, device, loaded)
    path = os.path.join(text_run, "latest.pth")
    cfg = load_config(EvaluateConfig, os.path.join(ROOT, "evaluate.yaml"),
                      ["device=cpu", f"checkpoint={path}", "num_videos=4", "num_steps=2", "sampler=ddim",
                       f"fvd.detector_path={detector}"])
    result = ev.evaluate(cfg, torch.device("cpu"), spy)
    ckpt = load_checkpoint(path)
    real = ev.select_real_clips(cfg.data.resolved(ckpt["config"]["data"]), "all",
                                ckpt["config"]["experiment"]["seed"], 4, 0)
    assert seen == ev.real_prompts(real, 4) and len(set(seen)) >= 2  # video i: real clip i's caption
    g = result["protocol"]["generated"]
    assert g["first_prompt"] == seen[0] and "captions of the real clips" in g["prompts"]
    assert g["text_encoder"]["fingerprint"] == ckpt["conditioning"]["text_encoder"]["fingerprint"]


def test_evaluate_loads_the_checkpoint_vae_and_encoder_once(text_run, detector, monkeypatch):
    """Evaluate samples its videos in chunks of GENERATION_CHUNK: the checkpoint, the VAE and
    the text encoder are loaded (and fingerprinted: the encoder's weights hashed) once for all
    of them, not once per chunk (before: 1 + 3 checkpoint loads, 3 VAEs, 4 encoders here)."""
    import models.text_encoder as text_encoder
    import models.vae as vae_module
    import training.evaluation as ev
    import training.sampling as sampling
    from training.sampling import sample_videos
    from utils.config import EvaluateConfig, load_config
    counts = {"checkpoint": 0, "vae": 0, "text_encoder": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)
        return wrapper
    for module in (ev, sampling):
        monkeypatch.setattr(module, "load_checkpoint", counted("checkpoint", module.load_checkpoint))
    monkeypatch.setattr(vae_module, "vae_fingerprint", counted("vae", vae_module.vae_fingerprint))
    monkeypatch.setattr(text_encoder, "weights_fingerprint", counted("text_encoder", text_encoder.weights_fingerprint))
    monkeypatch.setattr(ev, "GENERATION_CHUNK", 2)
    cfg = load_config(EvaluateConfig, os.path.join(ROOT, "evaluate.yaml"),
                      ["device=cpu", f"checkpoint={os.path.join(text_run, 'latest.pth')}", "num_videos=6",
                       "num_steps=2", "batch_size=2", f"fvd.detector_path={detector}"])
    calls = []
    result = ev.evaluate(cfg, torch.device("cpu"), lambda *a: calls.append(a) or sample_videos(*a))
    assert len(calls) == 3 and result["num_generated"] == 6  # three chunks of two videos
    assert counts == {"checkpoint": 1, "vae": 1, "text_encoder": 1}, counts


def test_a_clip_encoder_with_a_pooled_vector_trains_and_predicts(tmp_path, random_vae, text_encoders):
    run = _train(tmp_path, random_vae, "clip", _text_args(text_encoders["clip_projection"], 2))
    ckpt = load_checkpoint(os.path.join(run, "latest.pth"))
    dims = ckpt["model"]["dims"]
    assert dims["pooled_dim"] == ckpt["conditioning"]["text_encoder"]["pooled_size"] > 0
    assert any(k.startswith("text_embed.pooled") for k in ckpt["model_state"])
    assert _predict(os.path.join(run, "latest.pth"), str(tmp_path / "p"), ["num_videos=2", PROMPTS]) == 0
