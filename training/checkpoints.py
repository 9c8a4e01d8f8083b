"""Stage-2 checkpoints that describe themselves, and the checks that refuse a mismatch.

A checkpoint records everything needed to rebuild the model and its latent space: the
resolved config, the model's input geometry, the diffusion schedule, and the identity of
the frozen VAE (path, fingerprint, class, measured geometry, normalisation). Mixing a DiT with a VAE other
than the one it was trained on decodes to scrambled videos, so that is refused.
"""
from __future__ import annotations

import glob
import os
import re
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, Callable, Optional

from models.vae import FrozenVAE
from utils.config import DiffusionConfig, ModelConfig, config_from_dict, config_to_dict
from utils.checkpoint import RESUME_KEY, checkpoint_advice, require_entries
from utils.errors import UserError
from utils.paths import remove_file

if TYPE_CHECKING:  # the network modules are imported where a model is built, not at import time
    from torch import nn

    from models.backbones import Family
    from models.diffusion import Objective

FORMAT = "video-ldm-stage2/1"
STAGE1_FORMAT = "video-ldm-stage1/1"  # train_vae.py's latest.pth

VAE_MISMATCH_HELP = (
    "A DiT only works in the latent space of the VAE it was trained with; decoding its latents "
    "with another VAE (or the same VAE after more training) gives scrambled 'jigsaw' videos. "
    "Use the VAE directory the checkpoint was trained with, or train the DiT again on this VAE.")


def vae_record(vae: FrozenVAE) -> dict:
    """The VAE's identity (fingerprint, folder), measured geometry and normalisation."""
    return {"path": os.path.abspath(vae.path), "fingerprint": vae.fingerprint,
            "scaling_factor": float(vae.scaling_factor), "shift_factor": float(vae.shift_factor),
            "latent_channels": int(vae.latent_channels),
            "downsample_factor": int(vae.downsample_factor), **vae.describe()}


def model_record(model_cfg: ModelConfig, dims: dict, family: Optional["Family"] = None) -> dict:
    """The resolved architecture, its input geometry (C, T, latent height and width, classes)
    and, for a pretrained DiT, its family record (class, folder, fingerprint, fine-tuning)."""
    record = {"config": asdict(model_cfg.resolved()), "dims": dict(dims)}
    if family is not None and family.pretrained:
        record["family"] = family.record()
    return record


def recorded_diffusion(ckpt: dict) -> DiffusionConfig:
    """The objective and schedule a checkpoint trained with; keys it predates take their
    defaults (no `objective` recorded: v_prediction)."""
    return config_from_dict(DiffusionConfig, ckpt["diffusion"]).resolved()


def model_dims(record: dict) -> dict:
    """The DiT's input geometry (VideoDiT's keyword arguments) from a checkpoint's model
    record. Checkpoints written before non-square frames record one `latent_size` for both
    sides; they read as latent_height = latent_width = latent_size."""
    dims = dict(record["dims"])
    if "latent_size" in dims:
        side = dims.pop("latent_size")
        dims.update(latent_height=side, latent_width=side)
    return dims


def latent_shape(dims: dict) -> tuple[int, int, int, int]:
    """(C, T, h, w) of one clip's latents, from a dims dict (`model_dims`, stage 2's `dims`)."""
    return (dims["in_channels"], dims["num_frames"], dims["latent_height"], dims["latent_width"])


def check_vae(ckpt: dict, vae: FrozenVAE, ckpt_path: str) -> None:
    recorded = ckpt["vae"]["fingerprint"]
    if recorded != vae.fingerprint:
        raise UserError(
            f"VAE mismatch: {ckpt_path} was trained with VAE fingerprint {recorded} "
            f"(from {ckpt['vae']['path']}), but the VAE at {vae.path} has fingerprint "
            f"{vae.fingerprint}. {VAE_MISMATCH_HELP}")


# What the resume and predict read from a stage-2 checkpoint, with the types they need.
ENTRIES = {"step": int, "epoch": int, "micro": int, "world_size": int, "batch_size": int,
           "model": dict, "model_state": dict, "ema_state": dict, "optimizer": dict, "scaler": dict,
           "lr_sched": dict, "rng": (list, dict), "vae": dict, "diffusion": dict, "config": dict}
PREDICT_ENTRIES = {k: ENTRIES[k] for k in ("step", "model", "model_state", "ema_state", "vae",
                                           "diffusion", "config")}
STAGE1_ENTRIES = {**{k: ENTRIES[k] for k in ("step", "epoch", "micro", "world_size", "batch_size",
                                             "model_state", "optimizer", "scaler", "lr_sched", "config")},
                  "rng": list}
DATA_GEOMETRY = ("num_frames", "resolution", "frame_stride")  # data keys the model's input derives from
RESTART_HELP = ("Resume with the config it was trained with (it is stored in the run's config.yaml), "
                "or start a new run (another experiment.name, or train.resume=null in a fresh directory).")


def check_entries(ckpt: dict, ckpt_path: str, entries: dict = ENTRIES, key: str = RESUME_KEY) -> None:
    """Every entry the caller reads is there, with its type, and nested records are complete.
    `key`: the setting that named the file (its advice is given)."""
    require_entries(ckpt, ckpt_path, entries, key)
    if "model" in entries:
        require_entries(ckpt["model"], f"{ckpt_path} (entry 'model')", {"config": dict, "dims": dict}, key)
    if "vae" in entries:
        require_entries(ckpt["vae"], f"{ckpt_path} (entry 'vae')", {"fingerprint": str, "path": str}, key)


def check_model(ckpt: dict, expected: dict, ckpt_path: str, data: Optional[dict] = None) -> None:
    """Refuse a checkpoint whose architecture or input geometry differs from the config's, saying
    whether the data (`data`: this run's data section) or the model differs."""
    diffs = _diff({**ckpt["model"], "config": _recorded_model_config(ckpt["model"]["config"]),
                   "dims": model_dims(ckpt["model"])}, expected)
    if not diffs:
        return
    trained = ckpt.get("config", {}).get("data", {})
    # The class count is the data's too (the classes found in data.path): a changed data.path
    # must not read as another model ("num_classes is 18 ... but 0 now").
    classes = [d for d in diffs if d.split(" ")[0].split(".")[-1] == "num_classes"]
    keys = DATA_GEOMETRY + (("path",) if classes else ())
    data_diffs = [f"data.{k} is {trained.get(k)!r} in the checkpoint but {data.get(k)!r} now"
                  for k in keys if data is not None and k in trained and trained[k] != data.get(k)]
    if classes and data is not None and not data_diffs:
        data_diffs = [f"its data had other classes ({classes[0]}; classes are the data's class "
                      "folders or labels)"]
    if data_diffs:
        raise UserError(f"checkpoint {ckpt_path} was trained on other data: " + "; ".join(data_diffs) +
                        " (the model's input size follows from them). " + RESTART_HELP)
    raise UserError(f"checkpoint {ckpt_path} was made for another model: " + "; ".join(diffs) +
                    ". " + RESTART_HELP)


def _recorded_model_config(config: dict) -> dict:
    """A checkpoint's model config as today's config would write it: keys it predates take
    their defaults (an older checkpoint has no model.conditioning, caption_dropout,
    first_frame_conditioning or condition_frames), as check_diffusion does for the schedule. A
    record that does not parse is compared as it is (check_model then names what differs)."""
    try:
        return asdict(config_from_dict(ModelConfig, config).resolved())
    except (ValueError, TypeError, AttributeError):  # UserError / ConfigError are ValueErrors
        return config


def load_entry(ckpt_path: str, entry: str, load: Callable[[Any], Any], value: Any,
               problem: str = "does not fit this run", key: str = RESUME_KEY) -> Any:
    """`load(value)` (a load_state_dict, a record parsed into a config), a malformed entry named
    rather than a traceback, with the advice of `key` (the setting that named the file).
    Returns what `load` returns."""
    try:
        return load(value)
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError, AttributeError) as e:
        text = e.args[0] if isinstance(e, KeyError) and e.args else str(e)  # KeyError quotes its text
        lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
        first = " ".join(lines[:2]) if len(lines) > 1 and lines[0].endswith(":") else \
            (lines[0] if lines else type(e).__name__)  # "Error(s) in loading ...:" says little alone
        raise UserError(f"checkpoint {ckpt_path}: entry {entry!r} {problem} "
                        f"({type(e).__name__}: {first[:300]}); the file was edited or written by "
                        f"other code. {checkpoint_advice(key)}") from None


def check_diffusion(ckpt: dict, expected: dict, ckpt_path: str) -> None:
    """The objective and noise schedule the model learnt are the ones it must keep. Keys a
    checkpoint predates take their defaults (no `objective` recorded: v_prediction)."""
    recorded = config_to_dict(recorded_diffusion(ckpt))
    diffs = _diff(recorded, expected)
    if diffs:
        raise UserError(f"checkpoint {ckpt_path} was trained with another diffusion schedule: "
                        + "; ".join(f"diffusion.{d}" for d in diffs) +
                        ". Resume with the checkpoint's diffusion settings (in the run's config.yaml).")


def check_format(ckpt: dict, ckpt_path: str, expected: str = FORMAT, key: str = "train.resume") -> None:
    """`ckpt` is the kind of checkpoint `key` (the config key that named it) needs."""
    found = ckpt.get("format")
    if found == expected:
        return
    if key != "train.resume" and found == STAGE1_FORMAT:
        vae_dir = os.path.join(os.path.dirname(os.path.abspath(ckpt_path)), "vae")
        raise UserError(f"{key} = {ckpt_path} is a stage-1 (VAE) checkpoint, written by train_vae.py; "
                        f"{key} needs a stage-2 (DiT) checkpoint, the latest.pth of a "
                        "train_advanced.py run (e.g. runs/demo/latest.pth). This stage-1 run's VAE is "
                        f"{vae_dir}: train a DiT on it with train_advanced.py vae.path={vae_dir}")
    stage = "stage-1" if expected == STAGE1_FORMAT else "stage-2"
    advice = ("point train.resume at one, or start fresh (another experiment.name)" if key == "train.resume"
              else f"point {key} at the latest.pth of a train_advanced.py run")
    raise UserError(f"{ckpt_path} is not a {stage} checkpoint of this repo "
                    f"(format {found!r}, expected {expected!r}); {advice}")


def resolve_resume(resume: Optional[str], run_dir: str) -> Optional[str]:
    """Which checkpoint to continue from: None (fresh), `auto` (this run's latest.pth), a path."""
    latest = os.path.join(run_dir, "latest.pth")
    if resume is None:
        if os.path.exists(latest):
            raise UserError(
                f"{latest} already exists and train.resume is null: starting fresh would overwrite "
                "it. Continue it with train.resume=auto, or pick another experiment.name.")
        return None
    if resume == "auto":
        return latest if os.path.exists(latest) else None
    if os.path.isdir(resume):
        raise UserError(f"train.resume = {resume!r} is a directory; give a checkpoint file in it "
                        f"(e.g. {os.path.join(resume, 'latest.pth')}), or use auto")
    if not os.path.isfile(resume):
        raise UserError(f"train.resume = {resume!r}: no such checkpoint file "
                        "(use null, auto, or the path of a .pth file)")
    return resume


def prune_epoch_checkpoints(run_dir: str, keep_last: int) -> None:
    if keep_last <= 0:
        return
    found = sorted(glob.glob(os.path.join(run_dir, "epoch_*.pth")),
                   key=lambda p: int(re.findall(r"\d+", os.path.basename(p))[0]))
    for path in found[:-keep_last]:
        remove_file(path)  # never a symlink, nor what it points at


def _diff(recorded: dict, expected: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(recorded) | set(expected)):
        a, b = recorded.get(key), expected.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key} is {a!r} in the checkpoint but {b!r} now")
    return out


def checkpoint_summary(ckpt: dict[str, Any]) -> str:
    sharded = ckpt.get("sharded")
    where = f", weights sharded by {sharded.get('world_size')} process(es) in {sharded.get('path')}" \
        if isinstance(sharded, dict) else ""
    return f"step {ckpt['step']}, epoch {ckpt['epoch']}, VAE {ckpt['vae']['fingerprint']}{where}"


def family_of_checkpoint(ckpt: dict, ckpt_path: str, pretrained: Optional[str] = None,
                         key: str = "checkpoint") -> "Family":
    """The DiT family a checkpoint was trained with; a LoRA's base is loaded from `pretrained`
    (an override) or the recorded folder and must have the recorded fingerprint."""
    from models.backbones import family_from_record
    model_cfg = load_entry(ckpt_path, "model", lambda r: config_from_dict(ModelConfig, r["config"]),
                           ckpt["model"], "is malformed", key)
    return family_from_record(ckpt["model"], model_cfg, ckpt_path, pretrained)


def patch_of(ckpt: dict) -> tuple[int, int]:
    """(patch_t latent frames, patch latent pixels) of one token of the checkpoint's DiT."""
    from models.backbones import family_from_record
    model_cfg = config_from_dict(ModelConfig, ckpt["model"]["config"])
    return family_from_record(ckpt["model"], model_cfg, "checkpoint", load=False).patch


def objective_of(ckpt: dict) -> "Objective":
    """The objective a checkpoint trained with (its recorded schedule), whose native sampler is
    its pretrained model's own scheduler, if any."""
    from models.backbones import native_scheduler_of
    from models.diffusion import make_objective
    return make_objective(recorded_diffusion(ckpt), native_scheduler_of(ckpt["model"].get("family")))


def model_from_checkpoint(ckpt: dict, use_ema: bool, device, ckpt_path: str = "checkpoint",
                          pretrained: Optional[str] = None, key: str = "checkpoint") -> "nn.Module":
    """Rebuild the DiT from what the checkpoint records (not from any YAML): the repo's DiT from
    its architecture, a pretrained one from its base (LoRA: `pretrained`, else the recorded
    folder, fingerprint checked) or its recorded architecture (full fine-tune), then the EMA or
    raw weights; eval mode, frozen. A malformed record or weights that do not fit it are named
    (UserError) with the advice of `key` (the setting that named the file), not a traceback."""
    from utils.train_utils import load_trainable_state_dict
    family = family_of_checkpoint(ckpt, ckpt_path, pretrained, key)
    module = load_entry(ckpt_path, "model", lambda record: family.build(model_dims(record), "cpu"),
                        ckpt["model"], "is malformed", key)
    weights = "ema_state" if use_ema else "model_state"
    load_entry(ckpt_path, weights, lambda state: load_trainable_state_dict(module, state), ckpt[weights],
               key=key)
    return module.to(device).eval().requires_grad_(False)


def export_checkpoint(path: str, out_dir: Optional[str] = None, use_ema: bool = True,
                      pretrained: Optional[str] = None) -> str:
    """Export a fine-tuned pretrained DiT from any checkpoint (`export.py`), as the run does when
    training stops: LoRA -> `<out_dir>/pytorch_lora_weights.safetensors`, full ->
    `<out_dir>/transformer/`. Returns what was written."""
    from utils.checkpoint import load_checkpoint
    ckpt = load_checkpoint(path, key="checkpoint")
    check_format(ckpt, path, key="checkpoint")
    check_entries(ckpt, path, PREDICT_ENTRIES, key="checkpoint")
    family = family_of_checkpoint(ckpt, path, pretrained)
    if not family.pretrained:
        raise UserError(f"{path} is a model trained from random weights (model.pretrained: null), not a "
                        "fine-tuned diffusers transformer: there is nothing to export to diffusers; sample "
                        "it with predict_advanced.py")
    module = model_from_checkpoint(ckpt, use_ema, "cpu", path, pretrained)
    out_dir = out_dir or os.path.join(os.path.dirname(os.path.abspath(path)), "export")
    ensure_writable_dir(out_dir, "output_dir")
    return family.export(module, out_dir)


def ensure_writable_dir(path: str, key: str) -> None:
    """Create `path` or fail now, before any work is done, naming the config key."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{key} = {path!r} is a file, not a directory; choose another {key} "
                        "or move the file away")
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write_test_{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise UserError(f"{key} = {path!r} is not a writable directory ({e.strerror}); "
                        f"choose another {key}") from None
