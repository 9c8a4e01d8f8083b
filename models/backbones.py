"""The one place that knows a DiT family, as models/vae.py knows VAE families.

A family answers everything the rest of the repo asks of a denoising network; the training
loop, validation, sampling, predict, evaluate and diagnose hold a `Family` and the nn.Module it
builds, and never test which family it is:

    family = family_for(cfg.model)                  # training: the repo's DiT, or model.pretrained
    family = family_from_record(ckpt["model"], where, pretrained_path)   # predict, evaluate
    family.check_latents((C, T, h, w), vae, first_frames)  # patch sizes, frame rule, channels, positions
    family.first_frame_inputs(first, x0, x_t, t, given)  # how given first frames enter the network
    family.schedule() / family.native_scheduler()   # the objective it was trained with
    family.text_convention(max_length)              # how its captions are encoded, its null caption
    module = family.build(dims, device, base_dtype) # forward(x (B, C, T, h, w), t, **condition)
    family.blocks(module)                           # its transformer blocks (FSDP shards each)
    family.record(dims)                             # what the checkpoint keeps under "model"
    family.export(module, out_dir)                  # back to diffusers (pretrained families)

Members:
- `VideoDiTFamily` (models/dit.py): the repo's own DiT from random weights; its layout is the
  repo's (B, C, T, h, w), its time the objective's model time, its text masked with a learned
  null token (models/dit.py says why), its objective any of the repo's.
- `WanFamily` (diffusers' WanTransformer3DModel: Wan 2.1 T2V 1.3B / 14B; Wan 2.2 where its
  per-token timesteps fit): input (B, C, T, H, W) as the repo's; time 1000 * sigma, i.e. the
  flow objective's model time; rotary positions built inside the model, so any latent grid up
  to rope_max_seq_len positions per axis; text: UMT5 (any encoder the repo loads), each caption
  cut at its length and zero-padded to text_encoder.max_length (512 as Wan's pipeline), no
  mask, the null caption the encoding of "" (pipeline_wan.py `_get_t5_prompt_embeds`,
  `negative_prompt=""`); objective flow matching with the shift of the folder's scheduler
  (FlowMatchEuler `shift`, UniPC `flow_shift`); per-token timesteps (a (B, T*S) timestep, as
  Wan 2.2 TI2V passes), so the repo's first-frame conditioning (clean prefix at t = 0) is
  expressible; LoRA targets the attention projections and the feed-forward linears.
- `CogVideoXFamily` (CogVideoXTransformer3DModel: 2B / 5B, and 1.5 with patch_size_t): input
  (B, F, C, H, W), so the call permutes; time the integer schedule index of v-prediction;
  rotary embeddings built outside the model (5B, 1.5) as CogVideoXPipeline does; text: T5 at
  226 tokens (max_text_seq_length) with the padding's embeddings kept and no mask (the
  pipeline encodes with no attention mask); the null the encoding of ""; objective
  v-prediction on the folder's CogVideoXDDIMScheduler schedule (scaled_linear betas, SNR shift
  snr_shift_scale, zero terminal SNR, trailing spacing); one timestep per clip, so the
  text-to-video models take no first frames. The image-to-video ones (CogVideoX-5b-I2V,
  CogVideoX1.5-5B-I2V: `in_channels` = 2 x the VAE's) take them as CogVideoXImageToVideoPipeline
  gives them: the image's latent frame, zeros behind it, concatenated on the channels at every
  step and in both halves of guidance, the loss on every frame (diffusers'
  train_cogvideox_image_to_video_lora.py); scaled by 1 / scaling_factor^2 where the VAE config
  says `invert_scale_latents` (1.5, as the pipeline does).

First frames: `first_frames_as` says how a network takes them, "prefix" (clean latent frames at
per-frame t = 0, no loss on them: the repo's DiT, Wan), "channels" (CogVideoX-I2V) or None (it
cannot: model.first_frame_conditioning is refused, naming the ones that can); the loop asks
`first_frame_inputs`, the sampler the module's `first_frames_as`.

Pretrained folders: `model.pretrained` is a diffusers pipeline folder (its `transformer/`, and
`scheduler/` for the schedule) or a transformer folder (config.json + safetensors). The family
comes from config.json `_class_name`. The base is frozen like the VAE under `model.finetune:
lora` (peft, through diffusers' `add_adapter`): never in the optimizer, fingerprinted (its
config and weight files), the fingerprint in every checkpoint and checked on resume and
predict. `full` trains every weight.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import torch
from einops import rearrange
from torch import nn

from utils.config import DiffusionConfig, LoRAConfig, ModelConfig
from utils.errors import ConfigError, MissingFileError, UserError

# Architecture keys of `model.*` that describe the repo's own DiT: a pretrained model brings its own.
OWN_ARCHITECTURE_KEYS = ("preset", "hidden_size", "depth", "num_heads", "mlp_ratio", "patch_size",
                         "patch_t", "attention", "qk_norm", "positions")
VOLATILE_CONFIG_KEYS = ("_diffusers_version", "_name_or_path", "_use_default_values")
HASH_CHUNK = 16 * 2 ** 20  # bytes read at a time when fingerprinting weight files


@dataclass(frozen=True)
class TextConvention:
    """How a family's captions are encoded and what its null caption is.

    encoder_mask: the encoder attends to real tokens only (padding masked, then zeroed); False:
        the tokenizer pads to `length` and the encoder reads the padding too (CogVideoX).
    model_mask: the DiT reads a token mask, so a batch may be cut to its longest caption; False:
        the DiT always gets `length` tokens (zeros or padding embeddings included).
    null: "learned" (the DiT's own null token: `drop_text`) or "empty" (the encoding of "").
    length: tokens per caption the DiT gets (None: the batch's longest, with a mask).
    """
    name: str
    encoder_mask: bool = True
    model_mask: bool = True
    null: str = "learned"
    length: Optional[int] = None

    def record(self) -> dict:
        return asdict(self)


MASKED = TextConvention("masked")  # the repo's DiT: masked tokens, the learned null


def convention_of(record: Optional[dict]) -> TextConvention:
    """A recorded convention (older checkpoints record none: the repo's masked one)."""
    return MASKED if not record else TextConvention(**record)


# ----------------------------------------------------------------------------- the seam


class Family:
    """The interface, and the answers of the repo's own VideoDiT (a member like any other)."""
    name = "video_dit"
    class_name = "VideoDiT"
    pretrained = False
    # first frames as a clean "prefix" at per-frame t = 0 (it takes t (B, T)), as image
    # "channels", or None (it cannot): the module docstring
    first_frames_as: Optional[str] = "prefix"
    text_required = False  # only a text-conditioned model exists (pretrained families)

    def __init__(self, model_cfg: ModelConfig):
        self.model_cfg = model_cfg.resolved()

    # ---- geometry

    @property
    def patch(self) -> tuple[int, int]:
        """(patch_t latent frames, patch latent pixels per side) of one token."""
        return self.model_cfg.patch_t, self.model_cfg.patch_size

    def tokens(self, latent_shape: Sequence[int]) -> int:
        """Tokens of one clip of latents (C, T, h, w)."""
        pt, p = self.patch
        return (latent_shape[1] // pt) * (latent_shape[2] // p) * (latent_shape[3] // p)

    def check_latents(self, latent_shape: Sequence[int], vae, first_frames: bool) -> None:
        """Refuse latents (C, T, h, w) of `vae` (models/vae.py FrozenVAE) the network cannot
        take, naming what to change."""
        from models.dit import check_patchable
        self.check_first_frames(first_frames)
        check_patchable(latent_shape[1], latent_shape[2], latent_shape[3], *self.patch)

    def check_first_frames(self, enabled: bool, frames: int = 1) -> None:
        """Refuse first-frame conditioning for a network that cannot take it (one timestep per
        clip and no image channels), and an image-to-video network trained without it."""
        if enabled and self.first_frames_as is None:
            raise ConfigError(f"model.first_frame_conditioning needs a network that takes first frames, and "
                              f"{self.class_name} takes one timestep per clip and no image channels; use a "
                              "Wan transformer (WanTransformer3DModel), a CogVideoX image-to-video one "
                              "(CogVideoX-5b-I2V, CogVideoX1.5-5B-I2V) or the repo's own DiT "
                              "(model.pretrained: null) for image-to-video, or set "
                              "model.first_frame_conditioning: 0")

    def first_frame_inputs(self, first, clean: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                           given: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor,
                                                                   Optional[torch.Tensor], dict]:
        """(x_t, t, frame_mask, extra keyword inputs) of a training step whose clips `given`
        (B,) bool (None: the condition is off) get their first frames (`first`: FirstFrames;
        `clean`: the posterior means they are given as). The prefix form: training/first_frames.py."""
        x_t, t, mask = first.noised(clean, x_t, t, given)
        return x_t, t, mask, {}

    # ---- objective and text

    def schedule(self) -> Optional[dict]:
        """The DiffusionConfig values the model was trained with (None: it takes any)."""
        return None

    def native_scheduler(self) -> Optional[dict]:
        """{"sampler", "class_name", "config"}: the model's own diffusers scheduler, or None."""
        return None

    @property
    def default_sampler(self) -> Optional[str]:
        return None if self.native_scheduler() is None else self.native_scheduler()["sampler"]

    def resolve_diffusion(self, diffusion: DiffusionConfig) -> DiffusionConfig:
        """`diffusion.*` with its null schedule keys filled: the model's schedule for a pretrained
        family (a key set to another value than the model's is refused, naming the model's), the
        defaults otherwise."""
        values = self.schedule()
        if values is None:
            return diffusion.resolved()
        wrong = [f"diffusion.{k} = {getattr(diffusion, k)!r} (the model's: {v!r})" for k, v in values.items()
                 if getattr(diffusion, k) is not None and getattr(diffusion, k) != v]
        if wrong:
            raise ConfigError(f"{'; '.join(wrong)}: the pretrained {self.class_name} in {self.source} was "
                              "trained with its own objective and schedule (its scheduler/ config), and "
                              "fine-tuning on another one unlearns it. Remove "
                              f"{', '.join(w.split(' = ')[0] for w in wrong)} from the config (null takes "
                              "the model's)")
        return diffusion.resolved(values)

    def text_convention(self, max_length: Optional[int]) -> TextConvention:
        return MASKED

    def text_length(self, asked: Optional[int]) -> Optional[int]:
        """text_encoder.max_length for this family (None: `default_text_length`, else the
        tokenizer's own)."""
        return asked

    default_text_length: Optional[int] = None  # tokens per caption when text_encoder.max_length is null

    def check_text(self, hidden_size: int) -> None:
        """Refuse a text encoder whose hidden size the model cannot read."""

    # ---- the network

    def build(self, dims: dict, device: torch.device | str = "cpu",
              base_dtype: torch.dtype = torch.float32) -> nn.Module:
        from models.dit import VideoDiT
        return VideoDiT(self.model_cfg, **dims).to(device)

    def blocks(self, module: nn.Module) -> list[nn.Module]:
        """The transformer blocks of a module `build` made, in call order: the units FSDP shards
        one by one (`training/parallel.py`: each block's parameters are gathered only while it runs)."""
        return list(module.blocks)

    def record(self) -> dict:
        """What a checkpoint keeps of the family (beside the model config and dims)."""
        return {"name": self.name}

    def prepare_shapes(self, module: nn.Module, latent_shapes: Sequence, device: torch.device) -> None:
        """Make what `module` keeps per latent shape (C, T, h, w) (position tables) for every
        shape it will train on, before torch.compile traces it (`VideoDiT.prepare_grids`)."""
        module.prepare_grids(latent_shapes, device)

    def summary(self) -> str:
        m = self.model_cfg
        return (f"the repo's VideoDiT, from random weights: hidden {m.hidden_size}, depth {m.depth}, "
                f"{m.num_heads} heads, patch {m.patch_t}x{m.patch_size}x{m.patch_size}, {m.attention} attention, "
                f"qk-norm {'on' if m.qk_norm else 'off'}, positions {m.positions}")

    def export(self, module: nn.Module, out_dir: str) -> Optional[str]:
        """Write `module`'s weights back in diffusers' format; None for the repo's own DiT."""
        return None


# ----------------------------------------------------------------------------- pretrained


class PretrainedDiT(nn.Module):
    """A diffusers video transformer seen as the repo's DiT: forward(x (B, C, T, h, w), t,
    text (B, L, D)) -> (B, C, T, h, w). The family adapts layout, time and positions."""

    def __init__(self, family: "PretrainedFamily", transformer: nn.Module):
        super().__init__()
        self.transformer = transformer
        self._family = family  # not a module: its state is the record

    @property
    def activation_checkpointing(self) -> bool:
        return bool(getattr(self.transformer, "gradient_checkpointing", False))

    @activation_checkpointing.setter
    def activation_checkpointing(self, on: bool) -> None:
        if on:
            self.transformer.enable_gradient_checkpointing()
        elif self.activation_checkpointing:
            self.transformer.disable_gradient_checkpointing()

    @property
    def first_frames_as(self) -> Optional[str]:
        return self._family.first_frames_as

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: Optional[torch.Tensor] = None,
                image: Optional[torch.Tensor] = None) -> torch.Tensor:
        """`image` (B, C, T, h, w): a "channels" family's image input (None: no image, zeros)."""
        if text is None:
            raise ValueError(f"the pretrained {self._family.class_name} is text-conditioned: pass text "
                             "(B, L, D), the empty caption's encoding for the null condition")
        if image is not None and self.first_frames_as != "channels":
            raise ValueError(f"the pretrained {self._family.class_name} takes no image channels")
        return self._family.call(self.transformer, x, t, text, image)


class PretrainedFamily(Family):
    """A diffusers transformer folder on disk. Subclasses: the layout, time and positions of
    their call, their schedule and their text convention."""
    pretrained = True
    first_frames_as: Optional[str] = None
    text_required = True
    image_scale = 1.0  # a "channels" family's image input: normalised latents times this
    lora_targets: tuple[str, ...] = ()

    def __init__(self, model_cfg: ModelConfig, folder: str, source: str, config: dict,
                 scheduler: Optional[dict], fingerprint: Optional[str] = None):
        super().__init__(model_cfg)
        self.folder, self.source, self.config = folder, source, config
        self.scheduler = scheduler  # {"class_name", "config"} of the folder's scheduler/, or None
        self._fingerprint = fingerprint
        self.finetune = self.model_cfg.finetune
        self.lora = self.model_cfg.lora

    @property
    def pipeline_folder(self) -> Optional[str]:
        """The pipeline folder the transformer came from (its vae/, text_encoder/ are the
        defaults of vae.path and text_encoder.path), or None for a bare transformer folder."""
        parent = os.path.dirname(self.folder)
        return parent if os.path.isfile(os.path.join(parent, "model_index.json")) else None

    @property
    def fingerprint(self) -> str:
        """sha256 of the folder's config and weight files (computed once, when first asked)."""
        if self._fingerprint is None:
            self._fingerprint = folder_fingerprint(self.folder)
        return self._fingerprint

    def call(self, transformer: nn.Module, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor,
             image: Optional[torch.Tensor] = None) -> torch.Tensor:
        raise NotImplementedError

    # ---- the network

    def load_transformer(self, dtype: torch.dtype = torch.float32, weights: bool = True) -> nn.Module:
        """The diffusers transformer: its folder's weights (`weights`), or its architecture alone
        (from the recorded config: a full fine-tune's checkpoint holds every weight)."""
        import diffusers
        cls = getattr(diffusers, self.class_name)
        if not weights:
            return cls.from_config(self.config).to(dtype)
        try:
            return cls.from_pretrained(self.folder, torch_dtype=dtype)
        except (OSError, ValueError, RuntimeError, KeyError, EnvironmentError) as e:
            raise UserError(f"model.pretrained: could not load the {self.class_name} in {self.folder} "
                            f"({type(e).__name__}: {str(e).splitlines()[0][:300]}); its files are "
                            "corrupt or incomplete: copy the folder again") from None

    def build(self, dims: dict, device: torch.device | str = "cpu",
              base_dtype: torch.dtype = torch.float32, weights: bool = True) -> nn.Module:
        """The transformer (the folder's weights in `base_dtype`), with LoRA adapters in fp32
        (`model.finetune: lora`: only they train) or every weight trainable (`full`, fp32)."""
        lora = self.finetune == "lora"
        transformer = self.load_transformer(base_dtype if lora else torch.float32, weights)
        transformer.requires_grad_(not lora)
        if lora:
            from peft import LoraConfig
            transformer.add_adapter(LoraConfig(
                r=self.lora.rank, lora_alpha=self.lora.alpha, lora_dropout=self.lora.dropout,
                init_lora_weights=True, target_modules=list(self.lora_target_modules())))
            for name, p in transformer.named_parameters():  # peft keeps adapters in fp32 over a bf16 base
                if "lora_" in name:
                    p.data = p.data.float()
        return PretrainedDiT(self, transformer).to(device)

    def blocks(self, module: nn.Module) -> list[nn.Module]:
        return list(getattr(module.transformer, self.blocks_attr))

    blocks_attr = ""  # the diffusers transformer's ModuleList of blocks

    def lora_target_modules(self) -> tuple[str, ...]:
        return tuple(self.lora.targets) if self.lora.targets else self.lora_targets

    def prepare_shapes(self, module: nn.Module, latent_shapes: Sequence, device: torch.device) -> None:
        """Nothing kept per shape by default (Wan builds its rotary positions inside its forward)."""

    def record(self) -> dict:
        return {"name": self.name, "class_name": self.class_name, "path": self.folder,
                "source": self.source, "fingerprint": self.fingerprint, "config": dict(self.config),
                "scheduler": self.scheduler, "finetune": self.finetune,
                "lora": asdict(self.lora) if self.finetune == "lora" else None, "image_scale": self.image_scale}

    def summary(self) -> str:
        what = (f"LoRA rank {self.lora.rank}, alpha {self.lora.alpha:g} on "
                f"{', '.join(self.lora_target_modules())}" if self.finetune == "lora" else "full fine-tune")
        return f"pretrained {self.class_name} from {self.folder} (fingerprint {self.fingerprint}), {what}"

    def check_text(self, hidden_size: int) -> None:
        expected = int(self.config.get(self.text_dim_key) or 0)
        if expected and hidden_size != expected:
            raise ConfigError(f"the text encoder gives {hidden_size}-dim tokens but the pretrained "
                              f"{self.class_name} in {self.folder} reads {self.text_dim_key} = {expected}: "
                              "use the text encoder it was trained with (text_encoder.path: its pipeline "
                              "folder)")

    text_dim_key = "text_dim"

    # ---- objective

    def native_scheduler(self) -> Optional[dict]:
        return self.native_of(self.scheduler)

    # {scheduler class in the folder: (the repo's sampler name, the class the sampler builds)}
    NATIVE: dict[str, tuple[str, str]] = {}

    @classmethod
    def native_of(cls, scheduler: Optional[dict]) -> Optional[dict]:
        """{"sampler", "class_name", "config"} of a folder's scheduler record: the sampler name
        it serves and the class built from its config; None when the repo cannot run that class
        as is (the family's schedule is then sampled by the repo's own samplers)."""
        if scheduler is None or scheduler.get("class_name") not in cls.NATIVE:
            return None
        sampler, class_name = cls.NATIVE[scheduler["class_name"]]
        return {"sampler": sampler, "class_name": class_name, "config": dict(scheduler["config"])}

    # ---- export

    def export(self, module: nn.Module, out_dir: str) -> str:
        """LoRA: `out_dir/pytorch_lora_weights.safetensors` in diffusers' format (the pipeline's
        `load_lora_weights(out_dir)` reads it, rank and alpha in its metadata); full:
        `out_dir/transformer/` (`save_pretrained`, loads with `from_pretrained`)."""
        transformer = module.transformer
        os.makedirs(out_dir, exist_ok=True)
        if self.finetune == "lora":
            from peft.utils import get_peft_model_state_dict
            import diffusers
            pipeline = getattr(diffusers, self.pipeline_class)
            layers = {k: v.detach().float().cpu().contiguous()
                      for k, v in get_peft_model_state_dict(transformer).items()}
            metadata = transformer.peft_config["default"].to_dict()
            metadata["target_modules"] = sorted(metadata["target_modules"])
            pipeline.save_lora_weights(out_dir, transformer_lora_layers=layers,
                                       transformer_lora_adapter_metadata=metadata)
            return os.path.join(out_dir, "pytorch_lora_weights.safetensors")
        target = os.path.join(out_dir, "transformer")
        transformer.save_pretrained(target)
        return target

    pipeline_class = ""


class WanFamily(PretrainedFamily):
    name = "wan"
    class_name = "WanTransformer3DModel"
    pipeline_class = "WanPipeline"
    blocks_attr = "blocks"
    # Wan's folders ship UniPC with flow sigmas; a FlowMatchEuler or DPM-Solver++ folder is
    # sampled by its own class too
    NATIVE = {"UniPCMultistepScheduler": ("unipc", "UniPCMultistepScheduler"),
              "FlowMatchEulerDiscreteScheduler": ("euler", "FlowMatchEulerDiscreteScheduler"),
              "DPMSolverMultistepScheduler": ("dpm++", "DPMSolverMultistepScheduler")}
    first_frames_as = "prefix"  # per-token timesteps (Wan 2.2 TI2V's (B, seq_len) form)
    # attention q/k/v/out of self- (attn1) and cross-attention (attn2), and the feed-forward
    # linears (ffn.net.0.proj, ffn.net.2): finetrainers' and DiffSynth's default set
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2")
    DEFAULT_TEXT_LENGTH = 512  # WanPipeline's max_sequence_length
    DEFAULT_SHIFT = 3.0  # Wan 2.1 at 480p (WanPipeline's documentation): a folder without scheduler/

    @property
    def patch(self) -> tuple[int, int]:
        pt, ph, pw = self.config.get("patch_size", (1, 2, 2))
        if ph != pw:
            raise ConfigError(f"{self.folder}: patch_size {self.config.get('patch_size')} is not square")
        return int(pt), int(ph)

    def check_latents(self, latent_shape: Sequence[int], vae, first_frames: bool) -> None:
        channels, vae_channels = int(self.config.get("in_channels", 16)), vae.latent_channels
        if channels != vae_channels:
            raise ConfigError(
                f"the pretrained {self.class_name} in {self.folder} takes {channels} input channels but "
                f"the VAE gives {vae_channels}-channel latents: use the VAE it was trained with "
                "(vae.path: its pipeline folder). Wan's image-to-video transformers (36 channels: latents, "
                "mask and image latents) are not supported; first-frame conditioning works on the "
                "text-to-video ones")
        super().check_latents(latent_shape, vae, first_frames)
        pt, p = self.patch
        grid = (latent_shape[1] // pt, latent_shape[2] // p, latent_shape[3] // p)
        limit = int(self.config.get("rope_max_seq_len", 1024))
        if max(grid) > limit:
            raise ConfigError(f"the latent grid {grid} (frames, rows, columns of tokens) exceeds the "
                              f"{limit} rotary positions per axis of {self.folder}; use a smaller "
                              "data.resolution or data.num_frames")

    def schedule(self) -> dict:
        shift, dynamic = self.DEFAULT_SHIFT, False
        if self.scheduler is not None:
            config = self.scheduler["config"]
            if self.scheduler["class_name"] == "FlowMatchEulerDiscreteScheduler":
                shift, dynamic = float(config.get("shift", 1.0)), bool(config.get("use_dynamic_shifting", False))
            else:  # UniPC / DPM-Solver with flow sigmas, as Wan's published folders ship
                shift = float(config.get("flow_shift") or 1.0)
        return dict(objective="flow_matching", num_train_timesteps=self._train_timesteps(),
                    flow_shift=1.0 if dynamic else shift, flow_shift_dynamic=dynamic)

    def _train_timesteps(self) -> int:
        return int((self.scheduler or {}).get("config", {}).get("num_train_timesteps", 1000))

    default_text_length = DEFAULT_TEXT_LENGTH  # within the encoder's limit (a smaller tokenizer's own)

    def text_convention(self, max_length: Optional[int]) -> TextConvention:
        return TextConvention("zero_padded", encoder_mask=True, model_mask=False, null="empty",
                              length=max_length)

    def call(self, transformer: nn.Module, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor,
             image: Optional[torch.Tensor] = None) -> torch.Tensor:
        # x (B, C, T, h, w) as Wan's hidden_states; t (B,) = 1000 * sigma, or (B, T) per latent
        # frame -> (B, T' * S) per token, the form Wan 2.2 TI2V passes
        dtype = transformer.patch_embedding.weight.dtype
        if t.ndim == 2:
            pt, p = self.patch
            tokens_per_frame = (x.shape[3] // p) * (x.shape[4] // p)
            t = t[:, ::pt].repeat_interleave(tokens_per_frame, dim=1)  # (B, T' * S)
        out = transformer(hidden_states=x.to(dtype), timestep=t, encoder_hidden_states=text.to(dtype),
                          return_dict=False)[0]
        return out  # (B, C, T, h, w)


class CogVideoXFamily(PretrainedFamily):
    name = "cogvideox"
    class_name = "CogVideoXTransformer3DModel"
    T2V_PIPELINE, I2V_PIPELINE = "CogVideoXPipeline", "CogVideoXImageToVideoPipeline"
    blocks_attr = "transformer_blocks"
    # CogVideoXPipeline's DDIM; a 5B folder's CogVideoXDPMScheduler steps with another signature
    # (the previous x0 and timestep), so its config is sampled by CogVideoXDDIMScheduler
    NATIVE = {"CogVideoXDDIMScheduler": ("ddim", "CogVideoXDDIMScheduler"),
              "CogVideoXDPMScheduler": ("ddim", "CogVideoXDDIMScheduler")}
    text_dim_key = "text_embed_dim"
    # attention q/k/v/out (diffusers' CogVideoX LoRA example) and the feed-forward linears
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")
    SCHEDULE_KEYS = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end",
                     "rescale_betas_zero_snr", "snr_shift_scale", "timestep_spacing")

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self._rotary: dict = {}

    @property
    def patch(self) -> tuple[int, int]:
        return int(self.config.get("patch_size_t") or 1), int(self.config.get("patch_size", 2))

    @property
    def image_to_video(self) -> bool:
        """An image-to-video transformer: its input is the latents and the image latents."""
        return int(self.config.get("in_channels", 16)) == 2 * int(self.config.get("out_channels", 16))

    @property
    def first_frames_as(self) -> Optional[str]:
        return "channels" if self.image_to_video else None

    @property
    def pipeline_class(self) -> str:
        return self.I2V_PIPELINE if self.image_to_video else self.T2V_PIPELINE

    def check_first_frames(self, enabled: bool, frames: int = 1) -> None:
        super().check_first_frames(enabled, frames)
        if self.image_to_video and not enabled:
            raise ConfigError(f"{self.folder} is a CogVideoX image-to-video transformer (its input: latents "
                              "and the first frame's image latents): set model.first_frame_conditioning > 0, "
                              "the share of clips given their first frame (0.95: diffusers' "
                              "train_cogvideox_image_to_video_lora.py drops the image for 5%), or use a "
                              "text-to-video CogVideoX")
        if self.image_to_video and frames != 1:
            raise ConfigError(f"model.condition_frames = {frames}: a CogVideoX image-to-video transformer takes "
                              "one image (one latent frame); set model.condition_frames: 1")

    def first_frame_inputs(self, first, clean, x_t, t, given):
        """The channel form (the module docstring): x_t, t and the loss as without the condition,
        the `image` input the given clips' first latent frame, zeros elsewhere."""
        if not self.image_to_video:
            return super().first_frame_inputs(first, clean, x_t, t, given)
        return x_t, t, None, {"image": first.image_input(clean, given)}

    def check_latents(self, latent_shape: Sequence[int], vae, first_frames: bool) -> None:
        vae_channels = vae.latent_channels
        channels = int(self.config.get("in_channels", 16)) // (2 if self.image_to_video else 1)
        if self.image_to_video:  # CogVideoXImageToVideoPipeline's scale of the image latents
            invert = bool(getattr(vae.ae.config, "invert_scale_latents", False))
            self.image_scale = 1.0 / vae.scaling_factor ** 2 if invert else 1.0
        if channels != vae_channels:
            raise ConfigError(f"the pretrained {self.class_name} in {self.folder} takes {channels} input "
                              f"channels but the VAE gives {vae_channels}-channel latents: use the VAE it "
                              "was trained with (vae.path: its pipeline folder)")
        pt, p = self.patch
        if latent_shape[1] % pt:
            raise ConfigError(f"{latent_shape[1]} latent frames do not split into the temporal patches of "
                              f"{pt} frames of {self.folder} (CogVideoX 1.5): pick data.num_frames giving an "
                              "even latent frame count (with a 4x causal VAE: 5, 13, 21, ... 85 frames)")
        super().check_latents(latent_shape, vae, first_frames)
        if self.config.get("use_learned_positional_embeddings"):
            want = (int(self.config.get("sample_height", 60)), int(self.config.get("sample_width", 90)))
            if tuple(latent_shape[2:]) != want:
                raise ConfigError(f"{self.folder} has learned positions for latents of {want[0]}x{want[1]} "
                                  f"only; got {latent_shape[2]}x{latent_shape[3]}: set data.resolution to "
                                  f"{want[0]} x {want[1]} latent pixels")

    def schedule(self) -> dict:
        if self.scheduler is None:
            raise ConfigError(f"{self.source} has no scheduler/ folder beside the transformer, so the "
                              "CogVideoX schedule it was trained with is unknown: give the pipeline folder "
                              "as model.pretrained (it holds scheduler/scheduler_config.json)")
        config = self.scheduler["config"]
        values = {k: config[k] for k in self.SCHEDULE_KEYS if config.get(k) is not None}
        if config.get("prediction_type", "v_prediction") != "v_prediction":
            raise ConfigError(f"{self.source}/scheduler: prediction_type {config.get('prediction_type')!r}; "
                              "CogVideoX trains with v_prediction")
        return dict(objective="v_prediction", **values)

    def text_length(self, asked: Optional[int]) -> int:
        length = int(self.config.get("max_text_seq_length", 226))
        if asked is not None and asked != length:
            raise ConfigError(f"text_encoder.max_length = {asked}: the pretrained {self.class_name} in "
                              f"{self.folder} reads exactly {length} text tokens (max_text_seq_length; its "
                              "video positions follow them); set text_encoder.max_length to "
                              f"{length} or null")
        return length

    def text_convention(self, max_length: Optional[int]) -> TextConvention:
        return TextConvention("full_padded", encoder_mask=False, model_mask=False, null="empty",
                              length=self.text_length(max_length))

    def prepare_shapes(self, module: nn.Module, latent_shapes: Sequence, device: torch.device) -> None:
        for _, frames, height, width in latent_shapes:  # the rotary tables `call` reads, made before compile
            self._rotary_embeddings(frames, height, width, device)

    def _rotary_embeddings(self, frames: int, height: int, width: int, device: torch.device):
        """CogVideoXPipeline's `_prepare_rotary_positional_embeddings` for latents (T, h, w):
        (cos, sin), or None for a model without rotary positions (2B)."""
        if not self.config.get("use_rotary_positional_embeddings"):
            return None
        key = (frames, height, width, device)
        if key not in self._rotary:
            from diffusers.models.embeddings import get_3d_rotary_pos_embed
            from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid
            pt, p = self.patch
            grid_h, grid_w = height // p, width // p
            base_h, base_w = int(self.config["sample_height"]) // p, int(self.config["sample_width"]) // p
            dim = int(self.config["attention_head_dim"])
            if self.config.get("patch_size_t") is None:  # CogVideoX 1.0
                crops = get_resize_crop_region_for_grid((grid_h, grid_w), base_w, base_h)
                emb = get_3d_rotary_pos_embed(embed_dim=dim, crops_coords=crops, grid_size=(grid_h, grid_w),
                                              temporal_size=frames, device=device)
            else:  # CogVideoX 1.5
                emb = get_3d_rotary_pos_embed(embed_dim=dim, crops_coords=None, grid_size=(grid_h, grid_w),
                                              temporal_size=(frames + pt - 1) // pt, grid_type="slice",
                                              max_size=(base_h, base_w), device=device)
            self._rotary[key] = emb
        return self._rotary[key]

    def call(self, transformer: nn.Module, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor,
             image: Optional[torch.Tensor] = None) -> torch.Tensor:
        # x (B, C, T, h, w) -> CogVideoX's (B, T, C, h, w); t (B,) integer schedule indices;
        # image-to-video: [x, image latents] on the channels (zeros: no image)
        if t.ndim != 1:
            raise ValueError(f"{self.class_name} takes one timestep per clip, got t of shape {tuple(t.shape)}")
        dtype = transformer.patch_embed.proj.weight.dtype
        if self.image_to_video:
            image = torch.zeros_like(x) if image is None else image.to(x.dtype) * self.image_scale
            x = torch.cat([x, image], dim=1)
        rotary = self._rotary_embeddings(x.shape[2], x.shape[3], x.shape[4], x.device)
        ofs = None if self.config.get("ofs_embed_dim") is None else x.new_full((x.shape[0],), 2.0)
        out = transformer(hidden_states=rearrange(x, "b c t h w -> b t c h w").to(dtype),
                          encoder_hidden_states=text.to(dtype), timestep=t, image_rotary_emb=rotary,
                          ofs=ofs, return_dict=False)[0]  # (B, T, C, h, w)
        return rearrange(out, "b t c h w -> b c t h w")


FAMILIES: dict[str, type[PretrainedFamily]] = {f.class_name: f for f in (WanFamily, CogVideoXFamily)}


# ----------------------------------------------------------------------------- loading


def resolve_pretrained(path: str, key: str = "model.pretrained") -> tuple[str, Optional[str]]:
    """(transformer folder, scheduler folder or None) of a pipeline folder or a transformer
    folder; a UserError naming `key` when neither."""
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.isfile(path):
        raise UserError(f"{key} = {path} is a file; give a diffusers pipeline folder (model_index.json, "
                        "transformer/) or a transformer folder (config.json + weights)")
    if not os.path.isdir(path):
        raise MissingFileError(f"{key} = {path}: no such folder; give a diffusers pipeline folder or a "
                               "transformer folder on disk (nothing is downloaded)")
    if os.path.isfile(os.path.join(path, "transformer", "config.json")):
        scheduler = os.path.join(path, "scheduler")
        return os.path.join(path, "transformer"), scheduler if os.path.isdir(scheduler) else None
    if os.path.isfile(os.path.join(path, "config.json")):
        parent = os.path.join(os.path.dirname(path), "scheduler")  # <pipeline>/transformer given directly
        if os.path.basename(path) == "transformer" and os.path.isdir(parent):
            return path, parent
        return path, None
    if os.path.isfile(os.path.join(path, "model_index.json")):
        raise UserError(f"{key} = {path} is a pipeline folder without transformer/ (e.g. a pipeline "
                        f"whose DiT is called otherwise); supported: {', '.join(FAMILIES)} in "
                        "transformer/")
    raise UserError(f"{key} = {path} holds neither transformer/config.json (a diffusers pipeline folder) "
                    "nor config.json (a transformer folder)")


def _read_json(path: str, key: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{key}: {path} cannot be read as JSON ({type(e).__name__}: {e}); copy the folder "
                        "again") from None
    if not isinstance(data, dict):
        raise UserError(f"{key}: {path} is not a JSON object; copy the folder again")
    return data


def _scheduler_record(folder: Optional[str], key: str) -> Optional[dict]:
    if folder is None:
        return None
    path = os.path.join(folder, "scheduler_config.json")
    if not os.path.isfile(path):
        return None
    config = _read_json(path, key)
    return {"class_name": str(config.get("_class_name")),
            "config": {k: v for k, v in config.items() if not k.startswith("_")}}


def folder_fingerprint(folder: str) -> str:
    """Short sha256 of a transformer folder: its config (volatile keys left out) and the bytes of
    its safetensors weight files, so the same model has the same fingerprint wherever it lives."""
    h = hashlib.sha256()
    config = _read_json(os.path.join(folder, "config.json"), "model.pretrained")
    h.update(json.dumps({k: v for k, v in config.items() if k not in VOLATILE_CONFIG_KEYS},
                        sort_keys=True).encode())
    files = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
    if not files:
        pickles = sorted(n for n in os.listdir(folder) if n.endswith((".bin", ".pt", ".pth", ".ckpt")))
        what = f" (only {', '.join(pickles)}: pickle files, which can run code when loaded)" if pickles else ""
        raise UserError(f"model.pretrained: {folder} has no .safetensors weights{what}; save the model with "
                        "save_pretrained (safetensors, diffusers' default)")
    for name in files:
        h.update(f"{name}|".encode())
        with open(os.path.join(folder, name), "rb") as f:
            while chunk := f.read(HASH_CHUNK):
                h.update(chunk)
    return h.hexdigest()[:16]


def load_pretrained(model_cfg: ModelConfig, path: str, key: str = "model.pretrained",
                    fingerprint: Optional[str] = None) -> PretrainedFamily:
    """The family of the transformer at `path` (pipeline or transformer folder), read from its
    config.json `_class_name`; an unknown class is refused naming the supported ones."""
    folder, scheduler = resolve_pretrained(path, key)
    config = _read_json(os.path.join(folder, "config.json"), key)
    found = config.get("_class_name")
    if found not in FAMILIES:
        raise UserError(f"{key} = {path}: its transformer is {found!r} ({folder}/config.json "
                        f"_class_name); supported: {', '.join(FAMILIES)}")
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    return FAMILIES[found](model_cfg, folder, os.path.abspath(os.path.expanduser(path)), config,
                           _scheduler_record(scheduler, key), fingerprint)


def family_for(model_cfg: ModelConfig) -> Family:
    """The family `model.*` describes: the repo's DiT, or the folder of `model.pretrained`."""
    model_cfg = model_cfg.resolved()
    if model_cfg.pretrained is None:
        return Family(model_cfg)
    return load_pretrained(model_cfg, model_cfg.pretrained)


def family_from_record(record: dict, model_cfg: ModelConfig, where: str,
                       pretrained_path: Optional[str] = None, load: bool = True) -> Family:
    """The family a checkpoint's model record names (older checkpoints record none: the repo's
    DiT). A pretrained LoRA base is read from `pretrained_path` (a user's override) or the
    recorded folder and must have the recorded fingerprint (`check_base`); a full fine-tune
    needs only the recorded architecture, and so does a question about it (`load=False`:
    patch sizes, schedule, no weights)."""
    family = record.get("family") or {"name": "video_dit"}
    if family.get("name") == "video_dit":
        return Family(model_cfg)
    cls = FAMILIES.get(family.get("class_name"))
    if cls is None:
        raise UserError(f"{where} names a pretrained transformer {family.get('class_name')!r} this repo "
                        f"does not support (supported: {', '.join(FAMILIES)})")
    lora_cfg = model_cfg.lora if family.get("lora") is None else LoRAConfig(**family["lora"])
    model_cfg = copy.copy(model_cfg)
    model_cfg.finetune, model_cfg.lora = family.get("finetune", "full"), lora_cfg
    if (model_cfg.finetune == "full" and pretrained_path is None) or not load:
        loaded = cls(model_cfg, family["path"], family.get("source", family["path"]), family["config"],
                     family.get("scheduler"), family["fingerprint"])
    else:
        loaded = load_pretrained(model_cfg, pretrained_path or family.get("source") or family["path"],
                                 "pretrained" if pretrained_path else f"{where}: the recorded model.pretrained")
        check_base(family, loaded, where)
    loaded.image_scale = float(family.get("image_scale", 1.0))  # how its training gave images
    return loaded


def check_base(recorded: dict, family: Family, where: str) -> None:
    """Refuse a base other than the one `recorded` (a checkpoint's family record) names: another
    family, or a pretrained base whose fingerprint changed."""
    was_pretrained = recorded.get("name", "video_dit") != "video_dit"
    if was_pretrained != family.pretrained:
        then = (f"the pretrained {recorded.get('class_name')} in {recorded.get('path')}" if was_pretrained
                else "the repo's DiT from random weights (model.pretrained: null)")
        raise UserError(f"{where} was trained from {then}, but this run has {family.summary()}; use the "
                        "model it was trained with")
    if family.pretrained and recorded.get("fingerprint") != family.fingerprint:
        raise UserError(f"the pretrained base changed: {where} was trained on {recorded.get('class_name')} "
                        f"fingerprint {recorded.get('fingerprint')} (from {recorded.get('path')}), but "
                        f"{family.folder} has fingerprint {family.fingerprint}. A LoRA or a fine-tune only "
                        "fits the base it was trained on: point model.pretrained (predict and evaluate: "
                        "pretrained) at that base")


def native_scheduler_of(record: Optional[dict]) -> Optional[dict]:
    """The native sampler of a checkpoint's family record (None: the repo's DiT, or a folder
    without a scheduler)."""
    if not record or record.get("class_name") not in FAMILIES:
        return None
    return FAMILIES[record["class_name"]].native_of(record.get("scheduler"))


def ignored_architecture_keys(model_cfg: ModelConfig) -> list[str]:
    """The own-DiT architecture keys set to other than their defaults (ignored by a pretrained run)."""
    default = ModelConfig()
    return [k for k in OWN_ARCHITECTURE_KEYS if getattr(model_cfg, k) != getattr(default, k)]
