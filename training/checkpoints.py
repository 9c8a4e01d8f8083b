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
from typing import Any, Optional

from models.vae import FrozenVAE
from utils.config import ModelConfig
from utils.errors import UserError

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


def model_record(model_cfg: ModelConfig, dims: dict) -> dict:
    """The resolved architecture and its input geometry (C, T, latent height and width, classes)."""
    return {"config": asdict(model_cfg.resolved()), "dims": dict(dims)}


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


def check_model(ckpt: dict, expected: dict, ckpt_path: str) -> None:
    """Refuse a checkpoint whose architecture or input geometry differs from the config's."""
    diffs = _diff({**ckpt["model"], "dims": model_dims(ckpt["model"])}, expected)
    if diffs:
        raise UserError(
            f"checkpoint {ckpt_path} was made for another model: " + "; ".join(diffs) +
            ". Resume with the config it was trained with (it is stored in the run's config.yaml), "
            "or start a new run (another experiment.name, or train.resume=null in a fresh directory).")


def check_format(ckpt: dict, ckpt_path: str, expected: str = FORMAT) -> None:
    if ckpt.get("format") != expected:
        stage = "stage-1" if expected == STAGE1_FORMAT else "stage-2"
        raise UserError(f"{ckpt_path} is not a {stage} checkpoint of this repo "
                        f"(format {ckpt.get('format')!r}, expected {expected!r}); point "
                        "train.resume at one, or start fresh (another experiment.name)")


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
        os.remove(path)


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
    return (f"step {ckpt['step']}, epoch {ckpt['epoch']}, VAE {ckpt['vae']['fingerprint']}")


def model_from_checkpoint(ckpt: dict, use_ema: bool, device) -> "VideoDiT":
    """Rebuild the DiT from the architecture recorded in the checkpoint (not from any YAML)."""
    from models.dit import VideoDiT
    from utils.config import config_from_dict
    model = VideoDiT(config_from_dict(ModelConfig, ckpt["model"]["config"]), **model_dims(ckpt["model"]))
    model.load_state_dict(ckpt["ema_state" if use_ema else "model_state"])
    return model.to(device).eval().requires_grad_(False)


def ensure_writable_dir(path: str, key: str) -> None:
    """Create `path` or fail now, before any work is done, naming the config key."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write_test_{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise UserError(f"{key} = {path!r} is not a writable directory ({e.strerror}); "
                        f"choose another {key}") from None
