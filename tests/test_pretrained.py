"""Fine-tuning pretrained video DiTs through the family seam (models/backbones.py): tiny random
Wan and CogVideoX pipeline folders (tests/pretrained_fixtures.py) checked against diffusers'
own transformer calls, pipelines and training conventions; LoRA and full fine-tunes trained,
resumed, exported back to diffusers and refused when they do not fit."""
import os
import shutil
import socket
import subprocess
import sys

import diffusers
import pytest
import torch

import predict_advanced
import train_advanced
from models.backbones import folder_fingerprint, load_pretrained
from models.diffusion import make_objective, sample
from tests.pretrained_fixtures import COGVIDEOX_SNR_SHIFT, WAN_SHIFT
from training.checkpoints import model_from_checkpoint, objective_of
from utils.checkpoint import load_checkpoint
from utils.config import DiffusionConfig, ModelConfig
from utils.errors import ConfigError, UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# per family: pixel frames of a training clip, its latent shape (C, T, h, w), the native sampler
FAMILY = {"wan": dict(frames=5, latent=(4, 2, 4, 4), sampler="unipc", text=16),
          "cogvideox": dict(frames=9, latent=(4, 3, 4, 4), sampler="ddim", text=16)}
TINY = ["device=cpu", "data.path=builtin:moving_shapes", "data.captions=null", "data.builtin.captions=true",
        "data.resolution=16", "data.builtin.num_clips=6", "data.builtin.clip_frames=12", "data.window_stride=4",
        "data.num_workers=0", "vae.tiling=false", "train.batch_size=2", "train.warmup_steps=2", "train.log_every=1",
        "train.activation_checkpointing=false", "validation.every_epochs=0", "validation.num_videos=2",
        "validation.num_steps=2", "train.lr=1e-3", "text_encoder.max_length=16"]


def _tiny(name: str) -> list[str]:
    f = FAMILY[name]
    return [*TINY, f"data.num_frames={f['frames']}", f"validation.sampler={f['sampler']}"]


def _family(folder: str, finetune: str = "full"):
    return load_pretrained(ModelConfig(pretrained=folder, finetune=finetune, conditioning="text"), folder)


def _raw(folder: str):
    """The diffusers transformer itself, for reference calls."""
    config = _family(folder).class_name
    return getattr(diffusers, config).from_pretrained(os.path.join(folder, "transformer")).eval()


def _reference_call(name, folder, raw, x, t, text):
    """The transformer called as its diffusers pipeline calls it: Wan on (B, C, T, H, W); CogVideoX
    on (B, F, C, H, W) with the rotary embeddings its pipeline prepares."""
    if name == "wan":
        return raw(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
    pipe = diffusers.CogVideoXPipeline.from_pretrained(folder)
    rotary = pipe._prepare_rotary_positional_embeddings(x.shape[3] * 4, x.shape[4] * 4, x.shape[2], x.device)
    out = raw(hidden_states=x.permute(0, 2, 1, 3, 4), encoder_hidden_states=text, timestep=t,
              image_rotary_emb=rotary, return_dict=False)[0]
    return out.permute(0, 2, 1, 3, 4)


def _inputs(name, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, *FAMILY[name]["latent"]), generator=g)
    text = torch.randn(batch, FAMILY[name]["text"], 32, generator=g)
    t = torch.tensor([250.0, 800.0])[:batch] if name == "wan" else torch.tensor([250, 800])[:batch]
    return x, t, text


def _ft(root, name, run, folder, extra=()):
    args = ["--config", os.path.join(ROOT, "config_finetune.yaml"), *_tiny(name), f"model.pretrained={folder}",
            f"experiment.runs_dir={root}", f"experiment.name={run}", *extra]
    assert train_advanced.main(args) == 0
    return os.path.join(root, run)


# --------------------------------------------------------------------------- the seam against diffusers


@pytest.mark.parametrize("name", list(FAMILY))
def test_forward_parity_with_the_diffusers_transformer(pretrained_pipelines, name):
    folder = pretrained_pipelines[name]
    module, raw = _family(folder).build({}, "cpu").eval(), _raw(folder)
    x, t, text = _inputs(name)
    with torch.no_grad():
        ours, theirs = module(x, t, text=text), _reference_call(name, folder, raw, x, t, text)
    assert ours.shape == x.shape and (ours - theirs).abs().max().item() <= 1e-6
    if name == "wan":  # per-frame t (B, T) is Wan 2.2's per-token timestep (B, T * S)
        t_frames = torch.tensor([[0.0, 400.0], [0.0, 900.0]])
        with torch.no_grad():
            ours = module(x, t_frames, text=text)
            theirs = _reference_call(name, folder, raw, x, t_frames.repeat_interleave(4, dim=1), text)
        assert (ours - theirs).abs().max().item() <= 1e-6


@pytest.mark.parametrize("name", list(FAMILY))
def test_sampler_matches_the_diffusers_pipeline(pretrained_pipelines, name):
    """N guided steps from the same latents and prompt embeddings: the repo's sampler with the
    family's objective and native scheduler against WanPipeline / CogVideoXPipeline."""
    folder = pretrained_pipelines[name]
    family = _family(folder)
    module = family.build({}, "cpu").eval()
    objective = make_objective(family.resolve_diffusion(DiffusionConfig()), family.native_scheduler())
    shape = (2, *FAMILY[name]["latent"])
    seeds = [3, 4]
    latents = torch.stack([torch.randn(shape[1:], generator=torch.Generator().manual_seed(s)) for s in seeds])
    _, _, text = _inputs(name)
    negative = torch.randn(text.shape, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        assert objective.resolve_sampler("auto") == FAMILY[name]["sampler"]  # auto: the model's own sampler
        ours = sample(module, shape, scheduler=objective.make_scheduler("auto"), num_steps=4,
                      generator=[torch.Generator().manual_seed(s) for s in seeds], device="cpu",
                      cond={"text": text}, uncond={"text": negative}, guidance_scale=3.0)
        pipe = getattr(diffusers, family.pipeline_class).from_pretrained(folder)
        frames = FAMILY[name]["frames"]
        given = latents if name == "wan" else latents.permute(0, 2, 1, 3, 4)
        theirs = pipe(latents=given, prompt_embeds=text, negative_prompt_embeds=negative, guidance_scale=3.0,
                      num_inference_steps=4, height=16, width=16, num_frames=frames, output_type="latent").frames
    theirs = theirs if name == "wan" else theirs.permute(0, 2, 1, 3, 4)
    assert (ours - theirs).abs().max().item() <= 1e-5


def test_wan_trains_as_flow_matching_with_its_folders_shift(pretrained_pipelines):
    """Wan: x_t = (1 - s) x0 + s eps, target eps - x0, timestep 1000 s, s shifted by the folder's
    flow_shift (finetrainers' and DiffSynth's convention), the loss a plain MSE."""
    folder = pretrained_pipelines["wan"]
    family = _family(folder)
    cfg = family.resolve_diffusion(DiffusionConfig())
    assert (cfg.objective, cfg.flow_shift, cfg.num_train_timesteps) == ("flow_matching", WAN_SHIFT, 1000)
    objective, module, raw = make_objective(cfg), family.build({}, "cpu").eval(), _raw(folder)
    x0, _, text = _inputs("wan")
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(1)
    t = objective.sample_timesteps(2, "cpu", g, latent_shape=x0.shape)
    u = torch.rand(2, generator=torch.Generator().manual_seed(1))
    s = WAN_SHIFT * u / (1 + (WAN_SHIFT - 1) * u)  # FlowMatchEulerDiscreteScheduler's shift
    torch.testing.assert_close(t, s * 1000, rtol=0, atol=1e-4)
    with torch.no_grad():
        ours = objective.loss(module(objective.add_noise(x0, noise, t), t, text=text), x0, noise, t).loss
        x_t = (1 - s.view(-1, 1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1, 1) * noise
        pred = _reference_call("wan", folder, raw, x_t, s * 1000, text)
        theirs = (pred - (noise - x0)).square().mean(dim=(1, 2, 3, 4))
    assert (ours - theirs).abs().max().item() <= 1e-6


def test_cogvideox_trains_as_its_diffusers_example(pretrained_pipelines):
    """CogVideoX: v-prediction on CogVideoXDDIMScheduler's schedule (SNR shift, zero terminal
    SNR); diffusers' train_cogvideox_lora.py loss, 1 / (1 - alpha_bar)-weighted x0-MSE with x0
    from `get_velocity(out, x_t, t)`, equals the repo's v-MSE."""
    from diffusers import CogVideoXDDIMScheduler
    folder = pretrained_pipelines["cogvideox"]
    family = _family(folder)
    cfg = family.resolve_diffusion(DiffusionConfig())
    assert (cfg.objective, cfg.snr_shift_scale, cfg.beta_schedule) == ("v_prediction", COGVIDEOX_SNR_SHIFT,
                                                                       "scaled_linear")
    objective, module, raw = make_objective(cfg), family.build({}, "cpu").eval(), _raw(folder)
    sched = CogVideoXDDIMScheduler.from_pretrained(folder, subfolder="scheduler")
    torch.testing.assert_close(objective.alphas_cumprod, sched.alphas_cumprod.double(), rtol=0, atol=1e-12)
    x0, t, text = _inputs("cogvideox")
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ours = objective.loss(module(objective.add_noise(x0, noise, t), t, text=text), x0, noise, t).loss
        x_t = sched.add_noise(x0, noise, t)
        out = _reference_call("cogvideox", folder, raw, x_t, t, text)
        x0_pred = sched.get_velocity(out, x_t, t)  # diffusers' name; with (output, sample) it is x0
        w = 1 / (1 - sched.alphas_cumprod[t].float())
        theirs = (w.view(-1, 1, 1, 1, 1) * (x0_pred - x0).square()).mean(dim=(1, 2, 3, 4))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(FAMILY))
def test_text_is_encoded_as_the_pipeline_encodes_it(pretrained_pipelines, name):
    """Wan: each caption cut at its length and zero-padded; CogVideoX: padded to its 16 tokens
    with the padding attended and kept; the null is the encoding of "" (the pipelines' default
    negative prompt)."""
    from models.text_encoder import FrozenTextEncoder
    from training.conditioning import TextConditioning
    folder = pretrained_pipelines[name]
    family = _family(folder)
    convention = family.text_convention(16)
    encoder = FrozenTextEncoder.from_pretrained(folder, max_length=16, attend_padding=not convention.encoder_mask)
    seam = TextConditioning(encoder.describe(), encoder=encoder, convention=convention)
    prompts = ["a red square moving left", "a blue circle"]
    got = seam.samples(2, prompts=prompts, guidance_scale=3.0)
    pipe = getattr(diffusers, family.pipeline_class).from_pretrained(folder)
    with torch.no_grad():
        pos, neg = pipe.encode_prompt(prompts, negative_prompt=["", ""], do_classifier_free_guidance=True,
                                      max_sequence_length=16, device="cpu")[:2]
    assert set(got.cond) == {"text"} and set(got.uncond) == {"text"}  # no mask, no learned null
    torch.testing.assert_close(got.cond["text"], pos, rtol=0, atol=1e-6)
    torch.testing.assert_close(got.uncond["text"], neg, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- LoRA


def test_lora_at_initialisation_is_the_base_exactly(pretrained_pipelines):
    folder = pretrained_pipelines["wan"]
    lora, raw = _family(folder, "lora").build({}, "cpu").eval(), _raw(folder)
    x, t, text = _inputs("wan")
    with torch.no_grad():
        assert torch.equal(lora(x, t, text=text), _reference_call("wan", folder, raw, x, t, text))
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert all(p.dtype == torch.float32 for n, p in lora.named_parameters() if "lora_" in n)


def test_lora_run_trains_adapters_only_and_its_export_loads_in_the_pipeline(pretrained_pipelines, tmp_path,
                                                                          monkeypatch):
    import training.stage2 as stage2
    folder = pretrained_pipelines["wan"]
    kept = {}
    original = stage2._export
    monkeypatch.setattr(stage2, "_export", lambda s: (kept.setdefault("s", s), original(s)))
    run = _ft(str(tmp_path), "wan", "lora", folder, ["train.max_steps=4", "train.ema_decay=0.5",
                                                      "train.ema_warmup_steps=0"])
    ckpt = load_checkpoint(os.path.join(run, "latest.pth"))
    # The checkpoint: the adapters, their EMA and optimizer state, the base's fingerprint, not the base.
    assert ckpt["model_state"] and all("lora_" in k for k in ckpt["model_state"])
    assert set(ckpt["ema_state"]) == set(ckpt["model_state"])
    assert sum(len(g["params"]) for g in ckpt["optimizer"]["param_groups"]) == len(ckpt["model_state"])
    family = ckpt["model"]["family"]
    assert family["fingerprint"] == folder_fingerprint(os.path.join(folder, "transformer"))
    assert family["finetune"] == "lora" and family["class_name"] == "WanTransformer3DModel"
    # The base in memory after training: bit-identical to the folder's; the adapters moved.
    raw = _raw(folder)
    trained = kept["s"].model.transformer
    base = dict(raw.named_parameters())
    for name, p in trained.named_parameters():
        if "lora_" not in name:
            assert torch.equal(p, base[name.replace(".base_layer", "")]), name
    assert any(p.abs().sum() > 0 for n, p in trained.named_parameters() if "lora_B" in n)
    log = open(os.path.join(run, "log.txt")).read()
    assert "trainable of" in log and "(the rest, the pretrained base, frozen)" in log
    # The export, loaded by WanPipeline.load_lora_weights, samples what the repo samples.
    export = os.path.join(run, "export")
    assert os.path.isfile(os.path.join(export, "pytorch_lora_weights.safetensors"))
    pipe = diffusers.WanPipeline.from_pretrained(folder)
    pipe.load_lora_weights(export)
    module = model_from_checkpoint(ckpt, use_ema=True, device="cpu")
    objective = objective_of(ckpt)
    shape = (1, *FAMILY["wan"]["latent"])
    _, _, text = _inputs("wan", batch=1)
    latents = torch.randn(shape[1:], generator=torch.Generator().manual_seed(7))[None]
    with torch.no_grad():
        ours = sample(module, shape, scheduler=objective.make_scheduler("unipc"), num_steps=3,
                      generator=[torch.Generator().manual_seed(7)], device="cpu", cond={"text": text})
        theirs = pipe(latents=latents, prompt_embeds=text, guidance_scale=1.0, num_inference_steps=3,
                      height=16, width=16, num_frames=5, output_type="latent").frames
    assert (ours - theirs).abs().max().item() <= 1e-5
    base_ours = _family(folder).build({}, "cpu").eval()  # and the adapters change the output
    with torch.no_grad():
        plain = sample(base_ours, shape, scheduler=objective.make_scheduler("unipc"), num_steps=3,
                       generator=[torch.Generator().manual_seed(7)], device="cpu", cond={"text": text})
    assert (plain - ours).abs().max().item() > 1e-4
    # predict reads the checkpoint (base from the recorded folder, the EMA adapters)
    out = str(tmp_path / "videos")
    assert predict_advanced.main(["--config", os.path.join(ROOT, "predict_advanced.yaml"), "device=cpu",
                                  f"checkpoint={run}/latest.pth", f"output_dir={out}", "num_videos=2",
                                  "num_steps=2", "sampler=unipc", "prompts=[a red square moving left]",
                                  "guidance_scale=2"]) == 0
    assert os.path.isfile(os.path.join(out, "sample_001.mp4"))


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_resume_is_bit_exact(pretrained_pipelines, tmp_path, monkeypatch, finetune):
    import training.stage2 as stage2
    folder = pretrained_pipelines["wan"]
    ck = os.path.join(tmp_path, "step2.pth")
    original_save = stage2.save

    def spy_save(s, name="latest.pth", **kw):
        original_save(s, name, **kw)
        if s.pos.step == 2 and name == "latest.pth":
            shutil.copy(os.path.join(s.run_dir, name), ck)

    monkeypatch.setattr(stage2, "save", spy_save)
    steps = [f"model.finetune={finetune}", "train.max_steps=4", "train.checkpoint_every=2", "train.ema_decay=0.9",
             "model.caption_dropout=0.5"]
    straight = load_checkpoint(os.path.join(_ft(str(tmp_path), "wan", "straight", folder, steps), "latest.pth"))
    monkeypatch.setattr(stage2, "save", original_save)
    torch.manual_seed(123)
    resumed = load_checkpoint(os.path.join(_ft(str(tmp_path), "wan", "resumed", folder,
                                               steps + [f"train.resume={ck}"]), "latest.pth"))
    assert resumed["step"] == straight["step"] == 4
    for key in ("model_state", "ema_state"):
        assert set(straight[key]) == set(resumed[key])
        for name, tensor in straight[key].items():
            assert torch.equal(tensor, resumed[key][name]), f"{key}.{name} differs after resume"
    if finetune == "full":  # every weight is in the checkpoint: predict needs no base
        assert os.path.isdir(os.path.join(tmp_path, "resumed", "export", "transformer"))
        exported = diffusers.WanTransformer3DModel.from_pretrained(os.path.join(tmp_path, "resumed", "export",
                                                                                "transformer"))
        for name, p in exported.named_parameters():
            assert torch.equal(p, resumed["ema_state"][f"transformer.{name}"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_process_lora_matches_one_process(pretrained_pipelines, tmp_path, extra=()) -> None:
    """2 gloo processes x batch 2 (overrides `extra`) == 1 process x batch 4 for a LoRA on the
    tiny Wan: adapters and their AdamW moments after 3 steps, t and noise fixed per window
    (tests/fixed_noise.py). The 2-process run is `tmp_path / "two"`."""
    from tests.fixed_noise import assert_same_update, train_fixed
    data = [*_tiny("wan"), f"model.pretrained={pretrained_pipelines['wan']}", "data.builtin.num_clips=4",
            "train.max_steps=3", "model.lora.rank=4", "validation.every_epochs=0"]
    one = train_fixed(data + ["train.batch_size=4"], str(tmp_path / "one"), config="config_finetune.yaml")
    out = tmp_path / "two.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           "--master_addr=127.0.0.1", os.path.join(ROOT, "tests", "fixed_noise.py"), str(out), str(tmp_path / "two"),
           "--config=config_finetune.yaml", *data, "train.batch_size=2", *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = torch.load(out, weights_only=True)
    lora = {k for k in one["model"] if "lora_" in k}
    # the optimizer holds the adapters alone, in both runs
    assert lora and len(one["exp_avg"]) == len(two["exp_avg"]) == len(lora)
    assert_same_update({**one, "model": {k: one["model"][k] for k in lora}},
                       {**two, "model": {k: two["model"][k] for k in lora}})


@pytest.mark.slow
def test_two_process_ddp_with_lora_matches_one_process(pretrained_pipelines, tmp_path):
    two_process_lora_matches_one_process(pretrained_pipelines, tmp_path)


# --------------------------------------------------------------------------- refusals


def _refused(capsys, args, *expected):
    """train_advanced refuses `args` with a UserError naming `expected` (run_main prints it
    without a traceback and exits 2: checked once by subprocess in test_refusals_name_what_is_wrong)."""
    with pytest.raises(UserError) as e:
        train_advanced.main(args)
    for text in expected:
        assert text in str(e.value), str(e.value)
    return str(e.value)


def test_refusals_name_what_is_wrong(pretrained_pipelines, tmp_path, capsys):
    base = ["--config", os.path.join(ROOT, "config_finetune.yaml"), *_tiny("wan"), f"experiment.runs_dir={tmp_path}"]
    wan = pretrained_pipelines["wan"]
    # an unsupported transformer class, named with the supported ones
    other = tmp_path / "other"
    shutil.copytree(wan, other)
    config = (other / "transformer" / "config.json").read_text().replace("WanTransformer3DModel", "FluxTransformer2DModel")
    (other / "transformer" / "config.json").write_text(config)
    _refused(capsys, base + [f"model.pretrained={other}", "experiment.name=a"], "'FluxTransformer2DModel'",
             "supported: WanTransformer3DModel, CogVideoXTransformer3DModel")
    proc = subprocess.run([sys.executable, "train_advanced.py", *base, f"model.pretrained={other}",
                           "experiment.name=a"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "FluxTransformer2DModel" in proc.stderr
    # a pipeline folder without transformer/
    (other / "transformer" / "config.json").unlink()
    shutil.rmtree(other / "transformer")
    _refused(capsys, base + [f"model.pretrained={other}", "experiment.name=b"], "without transformer/")
    # an objective that contradicts the model's
    _refused(capsys, base + [f"model.pretrained={wan}", "experiment.name=c", "diffusion.objective=v_prediction"],
             "diffusion.objective = 'v_prediction' (the model's: 'flow_matching')", "Remove diffusion.objective")
    _refused(capsys, base + [f"model.pretrained={wan}", "experiment.name=d", "diffusion.flow_shift=5.0"],
             "diffusion.flow_shift = 5.0 (the model's: 3.0)")
    # a frame count off the VAE's rule, naming the counts that work
    _refused(capsys, base + [f"model.pretrained={wan}", "experiment.name=e", "data.num_frames=6"],
             "1 + 4k frames", "Use 5 or 9")
    # first frames on a model that takes one timestep per clip
    _refused(capsys, base[:-1] + [*_tiny("cogvideox"), f"experiment.runs_dir={tmp_path}",
                                  f"model.pretrained={pretrained_pipelines['cogvideox']}", "experiment.name=f",
                                  "model.first_frame_conditioning=0.5"],
             "takes one timestep per clip and no image channels", "WanTransformer3DModel",
             "CogVideoX image-to-video")


def test_a_changed_base_is_refused_on_resume_and_predict(pretrained_pipelines, tmp_path, capsys):
    changed = tmp_path / "changed"
    shutil.copytree(pretrained_pipelines["wan"], changed)
    run = _ft(str(tmp_path), "wan", "run", str(changed), ["train.max_steps=1"])
    from tests.pretrained_fixtures import wan_transformer
    wan_transformer(seed=5).save_pretrained(str(changed / "transformer"))  # the base trained further
    args = ["--config", os.path.join(ROOT, "config_finetune.yaml"), *_tiny("wan"), f"model.pretrained={changed}",
            f"experiment.runs_dir={tmp_path}", "experiment.name=run", "train.max_steps=2"]
    _refused(capsys, args, "the pretrained base changed", "fingerprint")
    with pytest.raises(UserError, match="the pretrained base changed"):
        predict_advanced.main(["--config", os.path.join(ROOT, "predict_advanced.yaml"), "device=cpu",
                               f"checkpoint={run}/latest.pth", f"output_dir={tmp_path}/p", "num_videos=1",
                               "num_steps=2", "sampler=unipc", "prompts=[a red square]"])
    # the base it was trained on, given to predict as an override: accepted (fingerprint checked)
    assert predict_advanced.main(["--config", os.path.join(ROOT, "predict_advanced.yaml"), "device=cpu",
                                  f"checkpoint={run}/latest.pth", f"output_dir={tmp_path}/p", "num_videos=1",
                                  "num_steps=2", "sampler=unipc", "prompts=[a red square]",
                                  f"pretrained={pretrained_pipelines['wan']}"]) == 0


def test_architecture_keys_are_ignored_loudly_and_the_family_needs_text(pretrained_pipelines, tmp_path, capsys):
    run = _ft(str(tmp_path), "wan", "run", pretrained_pipelines["wan"], ["train.max_steps=1", "model.depth=9"])
    assert "model.depth describe the repo's own DiT and are ignored" in open(os.path.join(run, "log.txt")).read()
    args = ["--config", os.path.join(ROOT, "config_finetune.yaml"), *_tiny("wan"), f"experiment.runs_dir={tmp_path}",
            f"model.pretrained={pretrained_pipelines['wan']}", "experiment.name=x", "model.conditioning=class"]
    _refused(capsys, args, "a text-to-video model", "set model.conditioning: text")
    with pytest.raises(ConfigError, match="reads exactly 16 text tokens"):
        _family(pretrained_pipelines["cogvideox"]).text_length(32)
    with pytest.raises(UserError, match="no such folder"):
        _family(str(tmp_path / "missing"))


# --------------------------------------------------------------------------- downstream


@pytest.mark.parametrize("name", list(FAMILY))
def test_pretrained_families_train_and_predict_buckets(pretrained_pipelines, tmp_path, monkeypatch, name):
    """data.buckets with a pretrained DiT (rotary positions: any grid): landscape and portrait
    clips train at their own shapes, one bucket per step, and predict samples the portrait
    bucket; CogVideoX's rotary tables for both shapes are made before training (prepare_shapes)."""
    import imageio.v3 as iio
    from models.backbones import CogVideoXFamily
    frames = FAMILY[name]["frames"]
    prepared = []
    original = CogVideoXFamily.prepare_shapes

    def spy(self, module, shapes, device):
        prepared.extend(tuple(s) for s in shapes)
        original(self, module, shapes, device)
        assert {k[:3] for k in self._rotary} >= {tuple(s[1:]) for s in shapes}  # made, before any call
    monkeypatch.setattr(CogVideoXFamily, "prepare_shapes", spy)
    buckets = ", ".join(f"{{resolution: {r}, num_frames: {frames}, batch_size: 2}}" for r in ("[16, 32]", "[32, 16]"))
    run = _ft(str(tmp_path), name, "run", pretrained_pipelines[name],
              ["train.max_steps=4", f"data.buckets=[{buckets}]", "data.builtin.resolutions=[[16,32],[32,16]]"])
    ckpt = load_checkpoint(os.path.join(run, "latest.pth"))
    assert [b["resolution"] for b in ckpt["buckets"]] == [[16, 32], [32, 16]] and ckpt["step"] == 4
    latent = FAMILY[name]["latent"]
    assert [b["latent_shape"] for b in ckpt["buckets"]] == [[latent[0], latent[1], 4, 8], [latent[0], latent[1], 8, 4]]
    assert prepared == ([] if name == "wan" else [tuple(b["latent_shape"]) for b in ckpt["buckets"]])
    log = open(os.path.join(run, "log.txt")).read()
    assert f"bucket 16x32x{frames}: 16x32 pixels" in log and f"bucket 32x16x{frames}: 32x16 pixels" in log
    out = str(tmp_path / "out")
    assert predict_advanced.main(["--config", os.path.join(ROOT, "predict_advanced.yaml"), "device=cpu",
                                  f"checkpoint={run}/latest.pth", f"output_dir={out}", "num_videos=1", "num_steps=2",
                                  f"sampler={FAMILY[name]['sampler']}", "prompts=[a red square moving left]",
                                  "resolution=[32,16]", f"num_frames={frames}"]) == 0
    assert iio.imread(os.path.join(out, "sample_000.mp4")).shape[:3] == (frames, 32, 16)


@pytest.fixture(scope="module")
def wan_lora_run(pretrained_pipelines, tmp_path_factory):
    """A LoRA on the tiny Wan, trained with first-frame conditioning (per-token timesteps)."""
    root = str(tmp_path_factory.mktemp("wan_lora"))
    return _ft(root, "wan", "run", pretrained_pipelines["wan"], ["train.max_steps=3",
                                                                 "model.first_frame_conditioning=0.5"])


def predict_from_image(run: str, out: str, sampler: str, num_frames: int) -> int:
    """Predict one video from a grey 16x16 PNG with `num_frames` frames; its frame count."""
    import numpy as np
    from PIL import Image

    from utils.video_io import count_frames
    os.makedirs(out, exist_ok=True)
    image = os.path.join(out, "first.png")
    Image.fromarray(np.full((16, 16, 3), 200, dtype=np.uint8)).save(image)
    assert predict_advanced.main(["--config", os.path.join(ROOT, "predict_advanced.yaml"), "device=cpu",
                                  f"checkpoint={run}/latest.pth", f"output_dir={out}/videos", "num_videos=1",
                                  "num_steps=2", f"sampler={sampler}", "prompts=[a red square moving left]",
                                  f"image={image}", f"num_frames={num_frames}"]) == 0
    return count_frames(os.path.join(out, "videos", "sample_000.mp4"))


def test_wan_image_to_video_and_extension(wan_lora_run, tmp_path):
    assert predict_from_image(wan_lora_run, str(tmp_path), "unipc", 9) == 9  # two windows of 5, joined on frame 5


def test_diagnose_and_evaluate_read_a_fine_tuned_checkpoint(wan_lora_run, pretrained_pipelines, tmp_path):
    import evaluate
    from tests.test_evaluate import StandInI3D
    from training.diagnostics import PASS, run_diagnostics
    from utils.config import TrainRunConfig, load_config
    cfg = load_config(TrainRunConfig, os.path.join(ROOT, "config_finetune.yaml"),
                      [*_tiny("wan"), f"model.pretrained={pretrained_pipelines['wan']}",
                       "model.first_frame_conditioning=0.5", f"experiment.runs_dir={tmp_path}"])
    checks = {c.name: c for c in run_diagnostics(cfg, f"{wan_lora_run}/latest.pth", torch.device("cpu"))}
    for name in ("patchify", "identities", "gradients", "checkpoint", "vae_fingerprint"):  # the code paths
        assert checks[name].status == PASS, checks[name].line()
    assert "as configured; loss with own captions" in checks["condition"].measured  # measured (3 steps: no verdict)
    import re
    got, of = map(int, re.search(r"(\d+)/(\d+) DiT tensors", checks["gradients"].measured).groups())
    adapters = len(load_checkpoint(f"{wan_lora_run}/latest.pth")["model_state"])
    assert got == of == adapters  # every adapter gets a gradient; the frozen base none (it is not counted)
    assert all(not c.measured.startswith("crashed") for c in checks.values()), [c.line() for c in checks.values()]
    torch.manual_seed(0)
    detector = str(tmp_path / "i3d.pt")
    torch.jit.save(torch.jit.script(StandInI3D()), detector)
    out = str(tmp_path / "fvd.json")
    assert evaluate.main(["--config", os.path.join(ROOT, "evaluate.yaml"), "device=cpu",
                          f"checkpoint={wan_lora_run}/latest.pth", "num_videos=3", "num_steps=2", "sampler=unipc",
                          f"fvd.detector_path={detector}", f"output={out}"]) == 0
    import json
    assert json.load(open(out))["fvd"] >= 0


def test_the_folders_scheduler_class_is_the_native_sampler(pretrained_pipelines, tmp_path):
    """Wan with a FlowMatchEuler scheduler/ samples with `euler` (its shift the schedule's);
    CogVideoX-5B's CogVideoXDPMScheduler config is sampled by CogVideoXDDIMScheduler (the DPM
    class steps with another signature)."""
    from diffusers import CogVideoXDPMScheduler, FlowMatchEulerDiscreteScheduler
    wan = tmp_path / "wan"
    shutil.copytree(pretrained_pipelines["wan"], wan)
    shutil.rmtree(wan / "scheduler")
    FlowMatchEulerDiscreteScheduler(shift=2.0).save_pretrained(str(wan / "scheduler"))
    family = _family(str(wan))
    objective = make_objective(family.resolve_diffusion(DiffusionConfig()), family.native_scheduler())
    assert objective.cfg.flow_shift == 2.0 and objective.resolve_sampler("auto") == "euler"
    scheduler = objective.make_scheduler("auto")
    assert type(scheduler).__name__ == "FlowMatchEulerDiscreteScheduler" and scheduler.config.shift == 2.0
    assert type(objective.make_scheduler("unipc")).__name__ == "UniPCMultistepScheduler"  # the repo's, same shift
    cog = tmp_path / "cog"
    shutil.copytree(pretrained_pipelines["cogvideox"], cog)
    shutil.rmtree(cog / "scheduler")
    CogVideoXDPMScheduler(snr_shift_scale=1.0, rescale_betas_zero_snr=True, prediction_type="v_prediction",
                          timestep_spacing="trailing").save_pretrained(str(cog / "scheduler"))
    family = _family(str(cog))
    objective = make_objective(family.resolve_diffusion(DiffusionConfig()), family.native_scheduler())
    assert objective.cfg.snr_shift_scale == 1.0
    assert type(objective.make_scheduler("auto")).__name__ == "CogVideoXDDIMScheduler"
