"""CogVideoX image-to-video through the family seam (models/backbones.py, "channels" first
frames): tiny random CogVideoX-5b-I2V- and 1.5-5B-I2V-shaped pipeline folders
(tests/pretrained_fixtures.py) checked against CogVideoXImageToVideoPipeline and diffusers'
I2V training convention, then trained, sampled from an image, exported and refused."""
import os

import diffusers
import pytest
import torch

from models.backbones import load_pretrained
from models.diffusion import make_objective, sample
from models.vae import FrozenVAE
from tests.test_pretrained import ROOT, TINY, _ft, predict_from_image
from training.first_frames import FirstFrames
from utils.config import DiffusionConfig, ModelConfig
from utils.errors import ConfigError

# per variant: pixel frames of a clip, its latent shape (C, T, h, w)
VARIANT = {"i2v": dict(frames=9, latent=(4, 3, 4, 4)), "i2v_1.5": dict(frames=5, latent=(4, 2, 4, 4))}


@pytest.fixture(scope="module")
def i2v_pipelines(tmp_path_factory) -> dict:
    from tests.pretrained_fixtures import cogvideox_pipeline
    root = tmp_path_factory.mktemp("cogvideox_i2v")
    out = {}
    for name, v15 in (("i2v", False), ("i2v_1.5", True)):
        cogvideox_pipeline(image_to_video=True, v15=v15).save_pretrained(str(root / name))
        out[name] = str(root / name)
    return out


def _tiny(name: str) -> list[str]:
    return [*TINY, f"data.num_frames={VARIANT[name]['frames']}", "validation.sampler=ddim"]


def _setup(folder: str, latent_shape):
    """The family (its image scale read from the VAE, as training does), its module, the VAE."""
    family = load_pretrained(ModelConfig(pretrained=folder, finetune="full", conditioning="text",
                                         first_frame_conditioning=1.0), folder)
    vae = FrozenVAE.from_pretrained(folder)
    family.check_latents(latent_shape, vae, True)
    return family, family.build({}, "cpu").eval(), vae


def _inputs(name, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (2, *VARIANT[name]["latent"])
    return torch.randn(shape, generator=g), torch.randn(2, 16, 32, generator=g), torch.tensor([250, 800])


@pytest.mark.parametrize("name", list(VARIANT))
def test_the_seam_calls_the_transformer_as_the_i2v_pipeline_does(i2v_pipelines, name):
    """[latents, image latents] on the channels of CogVideoX's (B, F, C, H, W), rotary positions
    and (1.5) ofs as the pipeline prepares them; <= 1e-6 against the transformer called so."""
    folder = i2v_pipelines[name]
    family, module, vae = _setup(folder, VARIANT[name]["latent"])
    assert family.first_frames_as == "channels" and module.first_frames_as == "channels"
    assert family.pipeline_class == "CogVideoXImageToVideoPipeline"
    assert family.image_scale == (1 / 0.9 ** 2 if name == "i2v_1.5" else 1.0)  # invert_scale_latents
    x, text, t = _inputs(name)
    image = torch.zeros_like(x)
    image[:, :, :1] = torch.randn(2, 4, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    pipe = diffusers.CogVideoXImageToVideoPipeline.from_pretrained(folder)
    raw = pipe.transformer.eval()
    rotary = pipe._prepare_rotary_positional_embeddings(16, 16, x.shape[2], x.device)
    ofs = None if raw.config.ofs_embed_dim is None else x.new_full((1,), 2.0)
    with torch.no_grad():
        ours = module(x, t, text=text, image=image)
        both = torch.cat([x, image * family.image_scale], dim=1).permute(0, 2, 1, 3, 4)
        theirs = raw(hidden_states=both, encoder_hidden_states=text, timestep=t, ofs=ofs,
                     image_rotary_emb=rotary, return_dict=False)[0].permute(0, 2, 1, 3, 4)
        assert ours.shape == x.shape and (ours - theirs).abs().max().item() <= 1e-6
        # no image (a clip trained without its first frame, or an unconditioned sample): zeros
        assert torch.equal(module(x, t, text=text), module(x, t, text=text, image=torch.zeros_like(x)))


@pytest.mark.parametrize("name", list(VARIANT))
def test_sampler_matches_the_i2v_pipeline(i2v_pipelines, name, monkeypatch):
    """4 guided DDIM steps from the same latents, prompt embeddings and image: the repo's sampler
    (the image's latent as predict encodes it, a GivenImage call) against
    CogVideoXImageToVideoPipeline (its image encoding taken at the posterior mean, as the repo
    gives first frames: training/first_frames.py), <= 1e-5."""
    import diffusers.pipelines.cogvideo.pipeline_cogvideox_image2video as i2v
    monkeypatch.setattr(i2v, "retrieve_latents", lambda out, generator=None, sample_mode="sample":
                        out.latent_dist.mode())
    folder = i2v_pipelines[name]
    shape = (2, *VARIANT[name]["latent"])
    family, module, vae = _setup(folder, shape[1:])
    objective = make_objective(family.resolve_diffusion(DiffusionConfig()), family.native_scheduler())
    g = torch.Generator().manual_seed(2)
    pixels = torch.rand(2, 3, 16, 16, generator=g)  # [0, 1]: the pipeline's image processor maps it to [-1, 1]
    _, text, _ = _inputs(name)
    negative = torch.randn(text.shape, generator=torch.Generator().manual_seed(9))
    seeds = [3, 4]
    latents = torch.stack([torch.randn(shape[1:], generator=torch.Generator().manual_seed(s)) for s in seeds])
    with torch.no_grad():
        cond = vae.encode(pixels[:, :, None] * 2 - 1, sample=False)[:, :, :1]  # (B, C, 1, h, w)
        ours = sample(module, shape, scheduler=objective.make_scheduler("auto"), num_steps=4,
                      generator=[torch.Generator().manual_seed(s) for s in seeds], device="cpu",
                      cond={"text": text}, uncond={"text": negative}, guidance_scale=3.0, cond_frames=cond)
        pipe = diffusers.CogVideoXImageToVideoPipeline.from_pretrained(folder)
        theirs = pipe(image=pixels, latents=latents.permute(0, 2, 1, 3, 4), prompt_embeds=text,
                      negative_prompt_embeds=negative, guidance_scale=3.0, num_inference_steps=4, height=16,
                      width=16, num_frames=VARIANT[name]["frames"], output_type="latent").frames
    assert (ours - theirs.permute(0, 2, 1, 3, 4)).abs().max().item() <= 1e-5


def test_i2v_trains_as_the_diffusers_example(i2v_pipelines):
    """diffusers' train_cogvideox_image_to_video_lora.py: x_t from the video latents alone, the
    image latents (frame 0, zeros behind) concatenated on the channels, the 1 / (1 - alpha_bar)-
    weighted x0-MSE on every frame; a clip not given its image gets zeros there."""
    from diffusers import CogVideoXDDIMScheduler
    folder = i2v_pipelines["i2v"]
    family, module, _ = _setup(folder, VARIANT["i2v"]["latent"])
    objective = make_objective(family.resolve_diffusion(DiffusionConfig()))
    sched = CogVideoXDDIMScheduler.from_pretrained(folder, subfolder="scheduler")
    x0, text, t = _inputs("i2v")
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5))
    given = torch.tensor([True, False])
    x_t = objective.add_noise(x0, noise, t)
    xi, ti, mask, kw = family.first_frame_inputs(FirstFrames(0.95, 1), x0, x_t, t, given)
    assert xi is x_t and ti is t and mask is None  # noise, t and loss as without the condition
    with torch.no_grad():
        ours = objective.loss(module(xi, ti, text=text, **kw), x0, noise, ti, mask).loss
        image = torch.zeros_like(x0)
        image[0, :, :1] = x0[0, :, :1]  # clip 0 given its first latent frame, clip 1 not
        raw = diffusers.CogVideoXImageToVideoPipeline.from_pretrained(folder)
        rotary = raw._prepare_rotary_positional_embeddings(16, 16, x0.shape[2], x0.device)
        x_t = sched.add_noise(x0, noise, t)
        out = raw.transformer(hidden_states=torch.cat([x_t, image], dim=1).permute(0, 2, 1, 3, 4),
                              encoder_hidden_states=text, timestep=t, image_rotary_emb=rotary,
                              return_dict=False)[0].permute(0, 2, 1, 3, 4)
        x0_pred = sched.get_velocity(out, x_t, t)  # with (output, sample): x0
        w = 1 / (1 - sched.alphas_cumprod[t].float())
        theirs = (w.view(-1, 1, 1, 1, 1) * (x0_pred - x0).square()).mean(dim=(1, 2, 3, 4))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_i2v_lora_trains_predicts_from_an_image_and_exports(i2v_pipelines, tmp_path):
    folder = i2v_pipelines["i2v"]
    run = _ft(str(tmp_path), "cogvideox", "run", folder,
              [*_tiny("i2v"), "train.max_steps=3", "model.finetune=lora", "model.lora.rank=4",
               "model.first_frame_conditioning=0.95", "validation.every_epochs=1"])
    log = open(os.path.join(run, "log.txt")).read()
    assert "first 1 latent frame(s) given with p = 0.95" in log
    assert predict_from_image(run, str(tmp_path / "i2v"), "ddim", 13) == 13  # two windows of 9, joined on frame 9
    # the export loads in diffusers' image-to-video pipeline
    pipe = diffusers.CogVideoXImageToVideoPipeline.from_pretrained(folder)
    pipe.load_lora_weights(os.path.join(run, "export"))
    assert any("lora" in n for n, _ in pipe.transformer.named_parameters())


def test_i2v_refusals(i2v_pipelines, tmp_path, capsys):
    from tests.test_pretrained import _refused
    base = ["--config", os.path.join(ROOT, "config_finetune.yaml"), *_tiny("i2v"), f"experiment.runs_dir={tmp_path}",
            f"model.pretrained={i2v_pipelines['i2v']}"]
    _refused(capsys, base + ["experiment.name=a", "model.first_frame_conditioning=0"],
             "CogVideoX image-to-video transformer", "set model.first_frame_conditioning > 0")
    _refused(capsys, base + ["experiment.name=b", "model.first_frame_conditioning=0.9",
                             "model.condition_frames=2"], "takes one image", "model.condition_frames: 1")
    with pytest.raises(ConfigError, match="1.5"):  # 1.5's temporal patches: an even latent frame count
        family = load_pretrained(ModelConfig(pretrained=i2v_pipelines["i2v_1.5"], conditioning="text",
                                             first_frame_conditioning=1.0), i2v_pipelines["i2v_1.5"])
        family.check_latents((4, 3, 4, 4), FrozenVAE.from_pretrained(i2v_pipelines["i2v_1.5"]), True)
