"""Stage 2: train the video DiT (v-prediction or flow matching, `diffusion.objective`) on the
latents of a frozen VAE, with the condition of `training/conditioning.py` and, optionally, first
frames (`training/first_frames.py`).

The VAE is loaded once, frozen (`requires_grad_(False)`, eval, never in the optimizer) and
its identity goes into every checkpoint. `setup()` builds the parts, `train()` is the one
training loop, in headed phases.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict
from typing import Optional, Sequence

import torch
from tqdm import tqdm

from data import build_dataset
from data.latent_cache import CacheCorruptError, LatentCache, cache_disabled_reason, cache_key
from data.loader import make_loader, position_sampler
from data.source_index import RUN_INDEX_FILE
from models.backbones import Family, check_base, family_for, ignored_architecture_keys
from models.diffusion import make_objective
from models.dit import check_condition_frames
from models.vae import FrozenVAE
from training import checkpoints as ckpts
from training.buckets import (bucket_loader, bucket_rules, bucket_sampler, by_shape, check_buckets,
                              check_listed, report as report_buckets)
from training.common import (Deadline, LoopHooks, LRPlan, Position, StepControl, StepOutcome,
                             StopReason, capture_rank_rng, check_epoch, checkpoint_note,
                             make_lr_schedule, maybe_no_sync, now, optimizer_step, out_of_memory,
                             restore_position, restore_rank_rng, run_epochs, seed_rank, total_steps)
from training.outcome import signal_outcome, stage2_outcome, write_outcome
from training.parallel import allow_recompiles, grad_bytes, local_state_bytes, memory_line, parallel_for
from training.conditioning import TEXT_CACHE_DIR, Conditioning, conditioning_for_training
from training.first_frames import FirstFrames
from training.state import Stage2
from training.validation import NUM_T_BUCKETS, validate
from utils import sharded_checkpoint
from utils.checkpoint import atomic_save, load_checkpoint
from utils.config import TrainRunConfig, check_resolution_multiple, config_to_dict
from utils.dist import (DistInfo, all_reduce_mean, all_reduce_sum, any_rank, barrier, gather_dicts,
                        gather_objects, local_tensor)
from utils.errors import ConfigError, UserError
from utils.fvd import load_detector
from utils.logging import RunLogger
from utils.run_guard import save_before_fail, weights_finite
from utils.train_utils import (GracefulStop, autocast_context, count_parameters, device_memory, make_adamw,
                               make_grad_scaler, use_fast_adamw)

RMS_CLIPS = 8  # training clips whose normalised latent RMS is printed at start
RMS_RANGE = (0.5, 2.0)  # outside: warn that the VAE's normalisation does not fit



# ----------------------------------------------------------------------------- setup


def latent_dims(cfg: TrainRunConfig, vae: FrozenVAE, family: Optional[Family] = None) -> dict:
    """The DiT's input geometry, derived from data + the VAE's measured geometry (never a second
    copy in `model`), checked against what the network (`family`: the repo's DiT by default)
    can take. `num_frames` is the number of LATENT frames: 1 + (T - 1) / f_t for a causal video
    VAE, T for a per-frame VAE; sampling decodes back to data.num_frames. The condition's
    dimensions (classes, text width) are the conditioning seam's (`Conditioning.dims`)."""
    mcfg, factor = cfg.model.resolved(), vae.downsample_factor
    family = family or Family(mcfg)
    patch_t, patch = family.patch
    what = f"model.patch_size {patch}" if not family.pretrained else f"the {family.class_name}'s patch {patch}"
    check_resolution_multiple(cfg.data, factor * patch, f"VAE factor {factor} x {what} = {factor * patch}")
    channels, frames, height, width = vae.latent_shape(  # frame rule checked
        cfg.data.num_frames, cfg.data.height, cfg.data.width)
    if frames % patch_t and not family.pretrained:
        raise ConfigError(f"data.num_frames = {cfg.data.num_frames} gives {frames} latent frames, not "
                          f"divisible by model.patch_t = {mcfg.patch_t}")
    family.check_latents((channels, frames, height, width), vae, mcfg.first_frame_conditioning > 0)
    check_condition_frames(mcfg, frames)  # first frames: some latent frame left to generate
    FirstFrames.of(mcfg).check_vae(vae.geometry, frames, patch_t,  # ... and the VAE can encode them alone
                                   f"the VAE {vae.path} ({vae.class_name})")
    return dict(in_channels=channels, num_frames=frames, latent_height=height, latent_width=width)


def setup(cfg: TrainRunConfig, run_dir: str, dist: DistInfo, device: torch.device,
          dtype: torch.dtype, log: RunLogger, resume_path: Optional[str],
          started: Optional[float] = None) -> Stage2:
    """`started`: time.monotonic() at launch, from which train.time_limit_minutes counts."""
    tcfg = cfg.train
    parallel = parallel_for(tcfg.parallel, dist, device, dtype)  # refuses what it cannot do, first
    family = _family(cfg, log)  # model.pretrained: its folder's config and schedule, not its weights yet
    vae = FrozenVAE.from_config(cfg.vae, device)
    log.info(f"VAE {vae.summary()}")
    _check_encode_memory(vae, cfg, device)
    # Every check the config, the data index, the VAE and the checkpoint allow, before the
    # latent cache is built or a step runs.
    rules = bucket_rules(cfg, vae, family)  # data.buckets: what the VAE and the DiT allow (None: one shape)
    check_listed(cfg, vae, family)
    dataset = build_dataset(cfg.data, "train", cfg.experiment.seed,  # the index: frame counts only
                            index_file=os.path.join(run_dir, RUN_INDEX_FILE), rules=rules)
    text_length = family.text_length(cfg.text_encoder.max_length)
    cond = conditioning_for_training(cfg, dataset, device, log, dist, family.text_convention(text_length),
                                     text_length, family.default_text_length)  # text: the frozen encoder, loaded on rank 0
    cond.check_family(family)  # a pretrained DiT reads text of its width
    dims = {**latent_dims(cfg, vae, family), **cond.dims()}  # resolution, frame rule, patch; classes / text
    buckets = sampler = None
    if rules is not None:  # every bucket checked as data.resolution is; listed in log.txt and buckets.json
        buckets = check_buckets(cfg, vae, family, rules, dataset.plan.buckets)
        sampler = bucket_sampler(dataset, cfg, dist)
        report_buckets(dataset, sampler, run_dir, dist, log)
        if not family.pretrained and cfg.model.positions == "sincos":
            log.info("note: buckets with model.positions sincos; rotary positions (model.positions=rope) "
                     "sampled more coherent videos at every bucket shape here (docs/data.md#measured)")
    steps_per_epoch = check_epoch(len(dataset), tcfg, dist, tcfg.grad_accum_steps) if sampler is None \
        else sampler.per_rank // tcfg.grad_accum_steps
    ckpt = _checked_checkpoint(cfg, resume_path, vae, dims, cond, family, parallel.reads_shards()) \
        if resume_path else None
    detector = None
    if cfg.validation.fvd.detector_path is not None:  # fail now, not at the first validation
        detector = load_detector(cfg.validation.fvd.detector_path, device,  # tried on a clip
                                 key="validation.fvd.detector_path", check_frames=cfg.data.num_frames)
    val_captions: list[str] = []

    def captions() -> list[str]:  # every caption the run looks up: both splits, validation prompts
        val_captions.extend(build_dataset(cfg.data, "val", cfg.experiment.seed, rules=rules).distinct_captions())
        return [*dataset.distinct_captions(), *val_captions, *(cfg.validation.prompts or [])]
    cond.prepare(captions, os.path.join(run_dir, TEXT_CACHE_DIR), dist, log, cfg.text_encoder.batch_size)
    cached = _maybe_cached(dataset, cfg, vae, run_dir, dist, device, log)
    if dist.is_main:
        _log_latent_rms(vae, cached, log)
    park_vae(vae, cached is not dataset, device, log)
    dataset = cached
    loader = make_loader(dataset, tcfg.batch_size, shuffle=True, seed=cfg.experiment.seed,
                         num_workers=cfg.data.num_workers, rank=dist.rank,
                         world_size=dist.world_size, drop_last=True, device_type=device.type,
                         collate_fn=cond.collate) if sampler is None else \
        bucket_loader(dataset, sampler, cfg, dist, device.type, cond.collate)  # text: captions looked up in the workers
    model = family.build(dims, device, base_dtype=dtype if family.pretrained else torch.float32)
    model.activation_checkpointing = tcfg.activation_checkpointing  # around each block call: before sharding
    if buckets is not None:  # per-shape tables made now, not inside a compiled call
        family.prepare_shapes(model, buckets.latent_shapes, device)
        raised = allow_recompiles(len(buckets.latent_shapes)) if tcfg.compile else None
        if raised:
            log.info(f"compile: {len(buckets.latent_shapes)} bucket shapes, each compiled on first use; "
                     f"torch._dynamo recompile_limit raised from {raised[0]} to {raised[1]}")
    parallel.prepare(model, family.blocks(model), tcfg.compile)  # fsdp: compile, shard (training/parallel.py)
    ema = parallel.make_ema(model, tcfg.ema_decay, tcfg.ema_warmup_steps)  # the trainable weights (a LoRA: adapters only)
    optimizer = make_adamw([p for p in model.parameters() if p.requires_grad], tcfg.lr, tcfg.betas,
                           tcfg.weight_decay)  # fsdp: over the sharded parameters
    total = total_steps(tcfg, steps_per_epoch)
    deadline = Deadline(now() if started is None else started, tcfg.time_limit_minutes)
    plan = LRPlan(tcfg, total, deadline)
    lr_sched = make_lr_schedule(optimizer, plan)
    net, ddp = parallel.wrap(model, tcfg.compile)  # ddp: DDP, then compile that
    noise_gen = seed_rank(cfg.experiment.seed, dist, device)
    s = Stage2(cfg, run_dir, dist, device, dtype, log, vae, make_objective(cfg.diffusion, family.native_scheduler()),
               model, net, ddp, ema, optimizer, make_grad_scaler(device, dtype),
               lr_sched, loader, position_sampler(loader), noise_gen, dims,
               list(getattr(dataset, "class_names", [])), Position(), total, deadline, plan)
    s.detector, s.cond, s.val_captions, s.family = detector, cond, sorted(set(val_captions)), family
    s.parallel = parallel
    s.buckets = buckets
    s.first_frames = FirstFrames.of(cfg.model)
    # the windows' frame rate (data.fps, else the clips' median), or validation.fps for data
    # with no time of its own (built-in clips); predict writes videos at it by default
    s.fps = getattr(dataset, "frame_rate", None) or cfg.validation.fps
    _log_setup(s, dataset, steps_per_epoch)
    if ckpt is not None:
        _resume(s, ckpt, resume_path)
    return s


def _family(cfg: TrainRunConfig, log: RunLogger) -> Family:
    """The DiT family of `model.*`, and what follows from it settled in `cfg` before anything is
    loaded: the objective and schedule (diffusion.* nulls filled with the model's, a
    contradiction refused), vae.path and text_encoder.path defaulting to a pretrained pipeline
    folder's vae/ and text_encoder/, and the keys that depend on the schedule."""
    family = family_for(cfg.model)
    family.check_first_frames(cfg.model.first_frame_conditioning > 0, cfg.model.condition_frames)
    log.info(f"model: {family.summary()}")
    if family.pretrained:
        ignored = ignored_architecture_keys(cfg.model)
        if ignored:
            log.info(f"warning: {', '.join('model.' + k for k in ignored)} describe the repo's own DiT and are "
                     f"ignored: the pretrained {family.class_name} brings its own architecture")
        pipeline = family.pipeline_folder
        if cfg.vae.path is None:
            if pipeline is None or not os.path.isdir(os.path.join(pipeline, "vae")):
                raise ConfigError(f"vae.path is not set and model.pretrained = {cfg.model.pretrained} is no "
                                  "pipeline folder with a vae/: set vae.path to the VAE the model was trained with")
            cfg.vae.path = pipeline
        if cfg.text_encoder.path is None and pipeline is not None and \
                os.path.isdir(os.path.join(pipeline, "text_encoder")):
            cfg.text_encoder.path = pipeline
    cfg.diffusion = family.resolve_diffusion(cfg.diffusion)
    cfg.check_schedule()
    return family
def _check_encode_memory(vae: FrozenVAE, cfg: TrainRunConfig, device: torch.device) -> None:
    """Refuse, before any clip is encoded, a resolution at which even one VAE call cannot fit
    in the device's free memory (a lower bound: `FrozenVAE.encode_bytes`)."""
    need, free = vae.encode_bytes(cfg.data.height, cfg.data.width, cfg.data.num_frames), device_memory(device)
    if free is not None and need > free:
        raise UserError(f"data.resolution = {cfg.data.resolution}: one VAE encode call at this size needs at "
                        f"least {need / 2**30:.1f} GiB on {device}, more than the {free / 2**30:.1f} GiB "
                        "free; lower data.resolution, or set vae.tiling: true (the VAE then encodes tiles)")


def _maybe_cached(dataset, cfg: TrainRunConfig, vae: FrozenVAE, run_dir: str, dist: DistInfo,
                  device: torch.device, log: RunLogger):
    """With `data.cache: auto`, the dataset's windows served from latents encoded once."""
    reason = cache_disabled_reason(dataset, cfg.data.cache)
    if reason is not None:
        if cfg.data.cache == "auto":
            log.info(f"latent cache off: {reason}")
        return dataset
    per_window = vae.temporal_factor > 1  # causal latents of a window != a slice of the clip's
    cache = LatentCache(dataset, os.path.join(run_dir, "latent_cache"),
                        cache_key(dataset, vae.fingerprint, {"vae_dtype": vae.describe()["dtype"],
                                                             "layout": "window" if per_window else "frame"}),
                        per_window=per_window, vae_record=vae.describe())
    usable, why = cache.status()
    loaded = None
    if usable:
        try:
            loaded = cache.load()
        except CacheCorruptError as e:  # reported and rebuilt, never a traceback at every start
            why = f"the cache is damaged: {e}"
    (rebuild,) = any_rank([loaded is None], dist, device)
    if not rebuild:
        log.info(f"latent cache: using {cache.dir}")
        return loaded
    log.info(f"latent cache: building {cache.dir} ({why or 'another rank needs it'}); "
             f"{dataset.num_sources} sources over {dist.world_size} process(es); an interrupted "
             "build resumes where it stopped")
    part = cache.build_part(vae.encode_moments, dist.rank, dist.world_size, progress=dist.is_main)
    shards = gather_dicts(part, dist, setup=True)  # a long wait for a slow rank: the setup group's timeout
    if dist.is_main:
        cache.write_manifest(shards)
    barrier(dist, setup=True)
    return cache.load()


def park_vae(vae: FrozenVAE, cached: bool, device: torch.device, log: RunLogger) -> bool:
    """With every latent cached, the training step never runs the VAE: on a GPU it waits in CPU
    memory and comes back only while validation decodes (`validate`: `vae.on(device)`), as the
    text encoder is released once the captions are cached. True when parked."""
    if not (cached and device.type == "cuda"):
        return False
    vae.to("cpu")
    torch.cuda.empty_cache()
    log.info(f"VAE parked in CPU memory ({count_parameters(vae)[1] / 1e6:.1f}M parameters): training reads "
             "cached latents, validation brings it to the GPU while it decodes")
    return True


def _log_latent_rms(vae: FrozenVAE, dataset, log: RunLogger) -> None:
    """RMS of the normalised latents (posterior means) of a few training clips: the DiT's noise
    schedule assumes ~1, and a wrong scale is the classic silent mistake."""
    n = min(len(dataset), RMS_CLIPS)
    items = [dataset[int(i)] for i in torch.linspace(0, len(dataset) - 1, n).round().long()]
    squares = []  # the squared latents of each shape of clip (buckets: several)
    for group in by_shape(items, lambda it: it["mean" if "mean" in it else "video"].shape):
        if "mean" in group[0]:  # cached moments
            z = vae.latents_from_moments(torch.stack([it["mean"] for it in group]).to(vae.device),
                                         torch.stack([it["std"] for it in group]).to(vae.device), sample=False)
        else:
            z = vae.encode(torch.stack([it["video"] for it in group]), sample=False)  # (n, C, t, h, w)
        squares.append(z.float().pow(2))
    rms = (squares[0].mean() if len(squares) == 1 else  # one shape: as before buckets
           sum(x.sum() for x in squares) / sum(x.numel() for x in squares)).sqrt().item()
    log.info(f"normalised training latents: RMS {rms:.3f} over {n} clips (posterior means; want ~1)")
    if not RMS_RANGE[0] <= rms <= RMS_RANGE[1]:
        log.info(f"warning: latent RMS {rms:.3f} is outside [{RMS_RANGE[0]}, {RMS_RANGE[1]}]: the VAE's "
                 f"normalisation ({vae.normalisation.formula}, read from {vae.path}/config.json) does not "
                 "fit these latents, so the noise schedule sees the wrong scale. Check scaling_factor / "
                 "shift_factor / latents_mean / latents_std in that config.json")


def _schedule_note(d) -> str:
    if d.objective == "flow_matching":
        shift = "dynamic shift" if d.flow_shift_dynamic else f"shift {d.flow_shift:g}"
        return f"{d.num_train_timesteps} timesteps, {shift}"
    return (f"{d.num_train_timesteps} timesteps, {d.beta_schedule} betas {d.beta_start:g}-{d.beta_end:g}"
            f"{', zero terminal SNR' if d.rescale_betas_zero_snr else ''}"
            f"{f', SNR shift {d.snr_shift_scale:g}' if d.snr_shift_scale != 1 else ''}")


def _log_setup(s: Stage2, dataset, steps_per_epoch: int) -> None:
    trainable, total = count_parameters(s.model)
    vae_trainable, vae_total = count_parameters(s.vae)
    t = s.cfg.train
    global_batch = t.batch_size * s.dist.world_size * t.grad_accum_steps
    frozen = "" if trainable == total else " (the rest, the pretrained base, frozen)"
    s.log.info(f"DiT {trainable / 1e6:.2f}M trainable of {total / 1e6:.2f}M{frozen}; VAE {vae_trainable} "
               f"trainable of {vae_total / 1e6:.2f}M (frozen); optimizer holds the DiT's trainable parameters only")
    s.log.scalars({"model/trainable_params": trainable, "model/total_params": total}, 0)
    s.log.info(f"objective {s.diffusion.objective} ({_schedule_note(s.cfg.diffusion)})")
    s.log.info(f"latents (C, t, h, w) = {ckpts.latent_shape(s.dims)} from {s.cfg.data.num_frames} frames "
               f"of {s.cfg.data.height}x{s.cfg.data.width} pixels, "
               f"{s.family.tokens(ckpts.latent_shape(s.dims))} tokens per clip, condition: {s.cond.summary()}, {s.first_frames.summary()}; "
               f"{len(dataset)} training clips, {steps_per_epoch} steps/epoch, {s.total_steps} steps total")
    s.log.info(f"device {s.device}, precision {str(s.dtype).replace('torch.', '')}, world size "
               f"{s.dist.world_size}, global batch {global_batch} = {t.batch_size} per process x "
               f"{s.dist.world_size} processes x {t.grad_accum_steps} accumulation")
    s.log.info(f"parallel: {s.parallel.summary()}")


# ----------------------------------------------------------------------------- checkpoints


def checkpoint_dict(s: Stage2, gather: bool = True, final: bool = False) -> dict:
    """Called on every rank (the RNG states are gathered; under fsdp each rank writes its shards
    of the weights); rank 0 writes it. `gather=False`: a failing run, whose other ranks may not
    answer, records rank 0's RNG states alone. `final`: training stops (or an epoch checkpoint):
    under fsdp the weights are gathered into the file, as ddp always has them."""
    return {
        "format": ckpts.FORMAT,
        "step": s.pos.step, "epoch": s.pos.epoch, "micro": s.pos.micro,
        "world_size": s.dist.world_size, "batch_size": s.cfg.train.batch_size,
        "num_items": len(s.loader.dataset),  # training windows: a resume on other data starts a new epoch
        "model": ckpts.model_record(s.cfg.model, s.dims, s.family),
        # model_state (a LoRA: the adapters alone), ema_state, optimizer (fsdp, while training: sharded)
        **s.parallel.checkpoint_weights(s.model, s.ema, s.optimizer, s.run_dir, s.pos.step, final, gather),
        "scaler": s.scaler.state_dict(),
        "lr_sched": s.lr_sched.state_dict(),
        "lr_plan": s.plan.state_dict(),
        "rng": capture_rank_rng(s.noise_gen, s.dist, gather),  # index = rank
        "vae": ckpts.vae_record(s.vae),
        "diffusion": asdict(s.cfg.diffusion),
        "class_names": list(s.class_names),
        "conditioning": s.cond.record(),  # kind, classes or the text encoder's describe()
        "fps": s.fps,
        "config": config_to_dict(s.cfg),
        **({"buckets": s.buckets.record()} if s.buckets is not None else {}),  # the shapes trained
    }


def save(s: Stage2, name: str = "latest.pth", collective: bool = True, final: bool = False) -> None:
    """Rank 0 writes (atomically); everyone waits so no rank races ahead of a checkpoint.
    `collective=False` (a failing run): no collective call, rank 0 alone writes. `final`: see
    `checkpoint_dict`. Sharded directories latest.pth no longer names are removed after it."""
    ckpt = checkpoint_dict(s, gather=collective, final=final)
    if s.dist.is_main:
        atomic_save(ckpt, os.path.join(s.run_dir, name))
        if name == "latest.pth":
            sharded_checkpoint.prune(s.run_dir, (ckpt.get("sharded") or {}).get("path"))
    if name == "latest.pth":
        s.saved_step, s.saved_whole = s.pos.step, not ckpt.get("sharded")
    if collective:
        barrier(s.dist)


def _save_on_failure(s: Stage2) -> None:
    """latest.pth at the last optimizer step: a half-accumulated step is dropped."""
    s.pos.micro -= s.pos.micro % s.cfg.train.grad_accum_steps
    save(s, collective=False)


def _checked_checkpoint(cfg: TrainRunConfig, path: str, vae: FrozenVAE, dims: dict,
                        cond: Conditioning, family: Family, own_shards: bool = False) -> dict:
    """The checkpoint to resume from, refused now if it does not fit, naming what differs: the
    pretrained base, the condition (a text encoder), the data, the model, the diffusion
    schedule or the VAE. `own_shards`: a sharded one's tensors are left in its directory, for
    each process to read its own shards (`Parallel.load_weights`)."""
    ckpt = load_checkpoint(path, map_location="cpu", shards=not own_shards)
    ckpts.check_format(ckpt, path)
    ckpts.check_entries(ckpt, path)
    check_base((ckpt["model"].get("family") or {"name": "video_dit"}), family, path)
    try:
        cond.check_checkpoint(ckpt, path)
    except UserError:
        # A condition that changed with data.path (its class folders gone) is a change of data.
        if ckpt.get("config", {}).get("data", {}).get("path", cfg.data.path) != cfg.data.path:
            ckpts.check_model(ckpt, ckpts.model_record(cfg.model, dims, family), path, asdict(cfg.data))
        raise
    ckpts.check_model(ckpt, ckpts.model_record(cfg.model, dims, family), path, asdict(cfg.data))
    ckpts.check_vae(ckpt, vae, path)
    ckpts.check_diffusion(ckpt, asdict(cfg.diffusion), path)
    return ckpt


def _resume(s: Stage2, ckpt: dict, path: str) -> None:
    s.parallel.load_weights(s.model, s.ema, s.optimizer, ckpt, path)  # model_state, ema_state, optimizer
    for entry, load in (("scaler", s.scaler.load_state_dict), ("lr_sched", s.lr_sched.load_state_dict)):
        ckpts.load_entry(path, entry, load, ckpt[entry])
    use_fast_adamw(s.optimizer)  # the checkpoint may carry another implementation's flags
    rng = ckpt["rng"] if isinstance(ckpt["rng"], list) else [{**ckpt["rng"], "noise_gen": ckpt["noise_gen"]}]
    restore_rank_rng(rng, s.noise_gen, s.cfg.experiment.seed, s.dist, s.log)  # rank 0's only before
    s.pos = restore_position(ckpt, s.dist, s.cfg.train.batch_size, len(s.loader.dataset), s.log,
                             s.buckets.record() if s.buckets is not None else None)
    s.saved_step, s.saved_whole = s.pos.step, not ckpt.get("sharded")
    s.log.info(f"resumed from {path} ({ckpts.checkpoint_summary(ckpt)})")
    s.plan.load_state_dict(ckpt.get("lr_plan"), s.log)


# ----------------------------------------------------------------------------- the loop


class LossStats:
    """Device-side sums between log steps: no host sync on ordinary steps. `buckets`: the
    names of data.buckets' buckets, whose losses are also summed apart (train_loss_by_bucket/)."""

    def __init__(self, device: torch.device, num_train_timesteps: int, buckets: Sequence[str] = ()):
        self.device, self.T, self.buckets = device, num_train_timesteps, list(buckets)
        self.reset()

    def reset(self) -> None:
        self.loss_sum = torch.zeros(NUM_T_BUCKETS, device=self.device, dtype=torch.float64)
        self.count = torch.zeros(NUM_T_BUCKETS, device=self.device, dtype=torch.float64)
        self.by_bucket = torch.zeros(2, len(self.buckets), device=self.device, dtype=torch.float64)  # sums, counts
        self.grad_norm_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        self.steps, self.samples, self.data_wait, self.t0 = 0, 0, 0.0, time.perf_counter()
        self.wait_start = self.t0  # when the loop last asked the loader for a batch

    def add(self, per_sample: torch.Tensor, t: torch.Tensor, shape: Optional[torch.Tensor] = None) -> None:
        # t is the model time in [0, T]: integer (v) or float s * T (flow), bucketed by t / T;
        # shape: (B,) the data bucket of each sample (data.buckets), None without buckets
        bucket = (t * NUM_T_BUCKETS // self.T).long().clamp_(max=NUM_T_BUCKETS - 1)
        self.loss_sum.index_add_(0, bucket, per_sample.detach().double())
        self.count.index_add_(0, bucket, torch.ones_like(per_sample, dtype=torch.float64))
        if shape is not None and self.buckets:
            shape = shape.to(self.device, non_blocking=True)
            self.by_bucket[0].index_add_(0, shape, per_sample.detach().double())
            self.by_bucket[1].index_add_(0, shape, torch.ones_like(per_sample, dtype=torch.float64))
        self.samples += per_sample.shape[0]

    def summary(self, dist: DistInfo) -> dict[str, float]:
        sums = all_reduce_sum(torch.stack([self.loss_sum, self.count]), dist).cpu()  # (2, buckets), one sync
        elapsed = time.perf_counter() - self.t0
        out = {"train/loss": (sums[0].sum() / sums[1].sum().clamp(min=1)).item(),
               "train/grad_norm": (all_reduce_mean(self.grad_norm_sum, dist) / max(1, self.steps)).item(),
               "perf/samples_per_sec": self.samples * dist.world_size / elapsed,
               "perf/sec_per_step": elapsed / max(1, self.steps),
               "perf/data_wait_fraction": self.data_wait / elapsed}
        width = self.T // NUM_T_BUCKETS
        for b in range(NUM_T_BUCKETS):
            if sums[1, b] > 0:
                out[f"train_loss_by_t/t{b * width:04d}-{(b + 1) * width - 1:04d}"] = \
                    (sums[0, b] / sums[1, b]).item()
        if self.buckets:  # every rank trains the same bucket at a step: one more sum over ranks
            by_bucket = all_reduce_sum(self.by_bucket, dist).cpu()  # (2, buckets)
            for name, total, n in zip(self.buckets, *by_bucket.tolist()):
                if n > 0:
                    out[f"train_loss_by_bucket/{name}"] = total / n
        return out


def train(s: Stage2) -> Position:
    """Runs the loop. Any error saves latest.pth first (when there is a sound, newer state)
    and is recorded in log.txt; a CUDA out-of-memory error becomes a message saying what to change."""
    try:
        with save_before_fail(lambda: _save_on_failure(s), lambda: s.pos.step, lambda: s.saved_step,
                              lambda: weights_finite(local_tensor(p) for p in s.model.parameters()), s.log,
                              os.path.join(s.run_dir, "latest.pth")):
            return _train_loop(s)
    except torch.OutOfMemoryError:
        raise out_of_memory(s.cfg.train.batch_size, s.device,
                            " (raise train.grad_accum_steps to keep the global batch), set "
                            "train.activation_checkpointing=true, or use a smaller model",
                            checkpoint_note(s.run_dir, s.cfg.train.checkpoint_every)) from None


def _train_loop(s: Stage2) -> Position:
    tcfg, T = s.cfg.train, s.cfg.diffusion.num_train_timesteps
    stats = LossStats(s.device, T, s.buckets.names if s.buckets is not None else ())
    bar = tqdm(total=s.total_steps, initial=s.pos.step, disable=not s.dist.is_main,
               dynamic_ncols=True, desc=_epoch_desc(s))

    def start_epoch() -> None:
        s.optimizer.zero_grad(set_to_none=True)
        bar.set_description(_epoch_desc(s))
        stats.wait_start = time.perf_counter()

    def train_step(batch: dict) -> Optional[StepOutcome]:
        stats.data_wait += time.perf_counter() - stats.wait_start
        # Latents of the frozen VAE (no graph: the VAE never sees a gradient): x0 to train on,
        # and the posterior means that first frames are given as (predict encodes them so).
        x0, x_given = batch_latents(s, batch)  # each (B, C, T, h, w)
        # Sample t and noise.
        t = s.diffusion.sample_timesteps(x0.shape[0], s.device, s.noise_gen, latent_shape=x0.shape)
        noise = torch.randn(x0.shape, device=s.device, generator=s.noise_gen)
        x_t = s.diffusion.add_noise(x0, noise, t)
        # The condition (cached text, labels; caption dropout from noise_gen), from the seam.
        kw = s.cond.train_kwargs(batch, s.device, s.noise_gen)
        # First frames (model.first_frame_conditioning): some clips, drawn from noise_gen, are
        # given their first latent frames as the family takes them: clean at t = 0 without loss
        # (training/first_frames.py says why), or as image channels (CogVideoX-I2V).
        given = s.first_frames.draw(x0.shape[0], s.device, s.noise_gen)
        x_t, t, frame_mask, inputs = s.family.first_frame_inputs(  # t (B,) or (B, T)
            s.first_frames, x_given, x_t, t, given)
        kw = {**kw, **inputs}  # the image channels' input, where the family takes one
        # Forward and backward.
        sync = s.pos.micro % tcfg.grad_accum_steps == 0
        with maybe_no_sync(s.ddp, sync), autocast_context(s.device, s.dtype):
            v_pred = s.net(x_t, t, **kw)  # (B, C, T, h, w)
        per_sample = s.diffusion.loss(v_pred.float(), x0, noise, t, frame_mask).loss  # (B,)
        s.scaler.scale(per_sample.mean() / tcfg.grad_accum_steps).backward()
        stats.add(per_sample, t if t.ndim == 1 else t.max(dim=1).values,  # the generated frames' t
                  batch.get("bucket"))
        # Step (when this micro-batch closes one).
        outcome = _optimizer_step(s, stats, per_sample) if sync else None
        stats.wait_start = time.perf_counter()
        return outcome

    def after_step() -> None:
        # EMA.
        s.ema.update(s.model, s.pos.step)
        # Log, sample, checkpoint.
        bar.update(1)
        if _log_due(s, s.pos.step):
            _log_step(s, stats, bar)
        if s.pos.step % tcfg.checkpoint_every == 0:
            save(s)
        stats.wait_start = time.perf_counter()

    with GracefulStop() as stop:
        s.control = StepControl(s.dist, s.device, s.deadline, s.plan, s.pos, stop, s.log)
        reason = run_epochs(s, LoopHooks(train_step, after_step, lambda: _end_epoch(s), start_epoch))
        bar.close()
        if reason is StopReason.TIME_LIMIT:
            s.log.info(f"train.time_limit_minutes = {tcfg.time_limit_minutes} reached at step "
                       f"{s.pos.step} of {s.total_steps}")
        _finish(s, interrupted=reason is StopReason.SIGNAL, timed_out=reason is StopReason.TIME_LIMIT)
    return s.pos


def batch_latents(s: Stage2, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, given): scaled latents (B, C, T, h, w) from cached posterior moments, or by encoding
    pixels. x0 is what the loss trains on: posterior samples (`vae.sample_posterior`, drawn from
    the run's noise generator) or means. `given` is what first-frame conditioning puts in the
    condition frames: the posterior MEANS, as predict encodes an image or the previous window
    (`sample=False`), so train and predict condition alike (training/first_frames.py). The same
    tensor as x0 when they are equal or when first frames are off (no extra work then)."""
    if "mean" in batch:
        mean, std = (batch[k].to(s.device, non_blocking=True) for k in ("mean", "std"))
    else:
        mean, std = s.vae.encode_moments(batch["video"].to(s.device, non_blocking=True))
    sample = s.cfg.vae.sample_posterior
    x0 = s.vae.latents_from_moments(mean, std, sample, s.noise_gen)
    if not (sample and s.first_frames.enabled):
        return x0, x0
    return x0, s.vae.latents_from_moments(mean, std, sample=False)


def _optimizer_step(s: Stage2, stats: LossStats, per_sample: torch.Tensor) -> StepOutcome:
    """Clip, step, schedule: the LR schedule moves only when the update was made (on every
    rank alike: `s.control.agree`). Before a logged step: the gradients' local bytes (the step
    frees them)."""
    if _log_due(s, s.pos.step + 1):
        s.grad_bytes = grad_bytes(s.model)
    outcome, grad_norm = optimizer_step(s.optimizer, s.scaler, per_sample, s.cfg.train.grad_clip,
                                        s.control.agree)
    if outcome is StepOutcome.STEPPED:
        s.lr_sched.step()
        stats.grad_norm_sum += grad_norm.double()
        stats.steps += 1
    return outcome


def _log_due(s: Stage2, step: int) -> bool:
    return step % s.cfg.train.log_every == 0 or step == s.plan.end_step


def _end_epoch(s: Stage2) -> None:
    """After s.pos moved to the next epoch: validation and the epoch checkpoint, if due."""
    every, tcfg = s.cfg.validation.every_epochs, s.cfg.train
    if every and s.pos.epoch % every == 0 and s.control.reason() is None:
        if s.saved_step != s.pos.step:  # first: a stop during validation then loses nothing
            save(s)
        validate(s)
    if tcfg.epoch_checkpoint_every and s.pos.epoch % tcfg.epoch_checkpoint_every == 0:
        save(s, f"epoch_{s.pos.epoch:04d}.pth", final=True)  # kept for later use: whole under fsdp too
        if s.dist.is_main:
            ckpts.prune_epoch_checkpoints(s.run_dir, tcfg.keep_last)


def _finish(s: Stage2, interrupted: bool, timed_out: bool = False) -> None:
    if s.saved_step != s.pos.step or not s.saved_whole or not os.path.exists(os.path.join(s.run_dir, "latest.pth")):
        save(s, final=True)  # under fsdp: the weights gathered into latest.pth, the shards removed
    if interrupted:
        s.log.info(f"stopped by signal at step {s.pos.step}; saved {s.run_dir}/latest.pth "
                   "(continue with train.resume=auto)")
        if s.dist.is_main:
            write_outcome(s.run_dir, signal_outcome(2, s.pos.step, s.total_steps))
        return
    if s.cfg.validation.every_epochs and not validate(s):
        s.log.info(f"stopped by signal during the final validation; {s.run_dir}/latest.pth "
                   f"holds step {s.pos.step} (continue with train.resume=auto)")
        return
    s.log.info(f"done: {s.pos.step} steps; checkpoint {s.run_dir}/latest.pth")
    _export(s)
    if s.dist.is_main:  # what stopped it and what the model is worth: also <run>/outcome.txt
        outcome = stage2_outcome(StopReason.TIME_LIMIT if timed_out else StopReason.STEPS, s.pos.step,
                                 s.total_steps, s.val_losses, s.cfg.train.time_limit_minutes)
        write_outcome(s.run_dir, outcome)
        s.log.info(outcome)


def _export(s: Stage2) -> None:
    """A pretrained run's weights back in diffusers' format, in <run>/export/ (rank 0): the
    EMA weights where EMA is on (`export.py` does the same from any checkpoint)."""
    if not s.family.pretrained or not s.dist.is_main:
        return
    module = s.parallel.module_for_export(s.model, s.ema, s.cfg.train.ema_decay > 0,
                                          os.path.join(s.run_dir, "latest.pth"))
    written = s.family.export(module, os.path.join(s.run_dir, "export"))
    s.log.info(f"exported the {'EMA' if s.cfg.train.ema_decay > 0 else 'trained'} weights for diffusers: {written}")


def _log_step(s: Stage2, stats: LossStats, bar: tqdm) -> None:
    values = stats.summary(s.dist)
    values["train/lr"] = s.lr_sched.get_last_lr()[0]
    _log_memory(s, values)
    s.last_data_wait_fraction = values["perf/data_wait_fraction"]
    s.log.scalars(values, s.pos.step)
    bar.set_postfix(loss=f"{values['train/loss']:.4f}", lr=f"{values['train/lr']:.2e}",
                    refresh=False)
    s.log.info(f"step {s.pos.step}/{s.total_steps} epoch {s.pos.epoch + 1} "
               f"loss {values['train/loss']:.4f} grad_norm {values['train/grad_norm']:.3f} "
               f"lr {values['train/lr']:.2e} {values['perf/samples_per_sec']:.1f} samples/s",
               echo=False)  # the progress bar shows it; log.txt keeps every log step
    stats.reset()


def _log_memory(s: Stage2, values: dict) -> None:
    """Every process's local parameter, gradient, optimizer and EMA bytes (and on CUDA its peak
    allocated memory of this logging interval) into `values` (TensorBoard memory/..._mib/rank<R>),
    and once per launch into log.txt. Called on every rank (one small all-gather)."""
    mine: dict = local_state_bytes(s.model, s.optimizer, s.ema, s.grad_bytes)
    if s.device.type == "cuda":  # peak memory of this logging interval
        mine["peak_gib"] = torch.cuda.max_memory_allocated(s.device) / 2 ** 30
        values["perf/peak_memory_gb"] = mine["peak_gib"]  # rank 0's, as ever
        torch.cuda.reset_peak_memory_stats(s.device)
    per_rank = gather_objects(mine, s.dist)
    for rank, m in enumerate(per_rank):
        values.update({f"memory/{k}_mib/rank{rank}": v / 2 ** 20 for k, v in m.items() if k != "peak_gib"})
        if "peak_gib" in m:
            values[f"memory/peak_allocated_gib/rank{rank}"] = m["peak_gib"]
    if not s.memory_logged:
        s.log.info(memory_line(per_rank, s.cfg.train.parallel), echo=False)
        s.memory_logged = True


def _epoch_desc(s: Stage2) -> str:
    return f"epoch {min(s.pos.epoch + 1, s.cfg.train.epochs)}/{s.cfg.train.epochs}"
