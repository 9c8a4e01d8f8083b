"""Time to quality: how many stage-2 steps and minutes each recipe needs before its samples
are coherent, side by side in one run.

    python benchmarks/time_to_quality.py \\
        --recipe v:diffusion.objective=v_prediction \\
        --recipe flow:diffusion.objective=flow_matching,predict.sampler=euler \\
        [--steps 6000] [--every 1000] [--chunk 250] [--videos 36] [--targets 30 34] \\
        [--config config_advanced.yaml] [--predict-config predict_advanced.yaml] \\
        [--runs-dir DIR (kept; default a temporary folder)] [--json out.json] [--quick]

A recipe is `name:key=value,key=value,...`: dotted overrides of the stage-2 config (any key:
objective, timestep sampling, lr, batch, width, EMA ...) and, prefixed `predict.`, of the
predict config that samples it (sampler, num_steps, guidance_scale). Every recipe trains the
same config otherwise (model, data, VAE, seed, so the same initial weights and data order
where the overrides allow) for `--steps` steps, its LR schedule spanning them.

The recipes train in turn, `--chunk` steps at a time (the order alternating), so the load of a
shared machine falls on all of them alike; each keeps its own RNG streams across the chunks,
so its run is the run it would be alone. Every `--every` steps (and at the end) each recipe's
checkpoint samples `--videos` videos exactly as predict does (EMA weights, the predict
config's seeds and labels) and `benchmarks/shape_coherence.py` scores them. Reported per
recipe: (steps, training minutes, coherent videos) at each evaluation, and the steps and
minutes at which it first reached each of `--targets` coherent videos. Minutes count training
only (chunks, checkpoint writes), not the evaluation's sampling.

`--quick`: a tiny model on tiny clips with a random VAE, a few steps and videos: checks the
script in seconds, not the recipes.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from benchmarks.shape_coherence import summarize, video_coherence  # noqa: E402
from training.sampling import checkpoint_sampler, sample_videos  # noqa: E402
from training.checkpoints import ensure_writable_dir  # noqa: E402
from training.stage2 import setup, train  # noqa: E402
from utils.checkpoint import capture_rng, restore_rng, write_json  # noqa: E402
from utils.config import PredictConfig, TrainRunConfig, load_config  # noqa: E402
from utils.dist import DistInfo  # noqa: E402
from utils.errors import UserError  # noqa: E402
from utils.logging import RunLogger  # noqa: E402
from utils.paths import check_output_file  # noqa: E402
from utils.train_utils import setup_runtime  # noqa: E402

PREDICT_PREFIX = "predict."
# Tiny sizes for --quick (as the tests' stage-2 runs): a random 4x VAE, 16x16 clips of 4 frames.
QUICK_TRAIN = ["data.num_frames=4", "data.resolution=16", "data.builtin.num_clips=6",
               "data.builtin.num_val_clips=2", "data.builtin.clip_frames=8", "data.window_stride=4",
               "model.hidden_size=32", "model.depth=2", "model.num_heads=2", "train.batch_size=2",
               "train.warmup_steps=2", "train.ema_warmup_steps=2"]
QUICK_PREDICT = ["num_steps=2", "batch_size=2"]


@dataclass
class Recipe:
    name: str
    train: list[str]  # dotted overrides of the stage-2 config
    predict: list[str]  # dotted overrides of the predict config (without the prefix)


@dataclass
class Trainee:
    """One recipe being trained: its stage-2 state, RNG streams and measurements."""
    recipe: Recipe
    state: object  # training.stage2.Stage2
    rng: dict  # the global RNG states it left at its last chunk (utils.checkpoint.capture_rng)
    train_seconds: float = 0.0
    evaluations: list[dict] = field(default_factory=list)


def parse_recipe(text: str) -> Recipe:
    """`name:key=value,key=value` -> Recipe. A comma starts a new override only where a
    `key=` follows, so list values (`train.betas=[0.9,0.99]`) keep theirs."""
    name, sep, rest = text.partition(":")
    if not sep or not re.fullmatch(r"[A-Za-z0-9_.+-]+", name):
        raise UserError(f"--recipe {text!r}: write it as name:key=value,key=value (a name of letters, "
                         "digits, _ . + -; e.g. v:diffusion.objective=v_prediction)")
    overrides = [o.strip() for o in re.split(r",(?=\s*[A-Za-z_][\w.]*=)", rest) if o.strip()]
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise UserError(f"--recipe {text!r}: {bad[0]!r} is not key=value")
    predict = [o[len(PREDICT_PREFIX):] for o in overrides if o.startswith(PREDICT_PREFIX)]
    train = [o for o in overrides if not o.startswith(PREDICT_PREFIX)]
    # Validation is off here, but its sampler must still serve the objective (a config
    # check): it follows predict.sampler unless the recipe names one.
    sampler = [o for o in predict if o.startswith("sampler=")]
    if sampler and not any(o.startswith("validation.sampler=") for o in train):
        train.append(f"validation.{sampler[-1]}")
    return Recipe(name, train, predict)


def first_reaching(evaluations: list[dict], target: int) -> Optional[dict]:
    """The first evaluation with at least `target` coherent videos: {"steps", "minutes"} or None."""
    for e in evaluations:
        if e["coherent"] >= target:
            return {"steps": e["steps"], "minutes": e["minutes"]}
    return None


def chunk_ends(steps: int, chunk: int, every: int) -> list[int]:
    """Step counts at which the chunks end: every `chunk` steps, at each evaluation and at the end."""
    return sorted(set(range(chunk, steps, chunk)) | set(range(every, steps, every)) | {steps})


def run(args: argparse.Namespace) -> dict:
    recipes = [parse_recipe(r) for r in args.recipe]
    names = [r.name for r in recipes]
    if len(set(names)) != len(names):
        raise UserError(f"--recipe names must differ: {names}")
    tmp = tempfile.TemporaryDirectory() if args.runs_dir is None else None
    runs_dir = tmp.name if tmp else args.runs_dir
    base = [f"train.max_steps={args.steps}", "train.time_limit_minutes=null", "train.resume=null",
            "validation.every_epochs=0",  # this script samples and scores; no validation inside
            f"train.log_every={args.chunk}", f"train.checkpoint_every={args.steps + 1}",
            f"experiment.runs_dir={runs_dir}", f"device={args.device}"]
    predict_base = [f"num_videos={args.videos}", f"device={args.device}"]
    if args.quick:
        base += QUICK_TRAIN + [f"vae.path={_random_vae(runs_dir)}"]
        predict_base += QUICK_PREDICT

    # Setup: every recipe from the same seeds (same initial weights and data order where its
    # overrides keep the model and data), each then keeping its own global RNG streams.
    trainees = []
    for recipe in recipes:
        cfg = load_config(TrainRunConfig, args.config, base + [f"experiment.name={recipe.name}"] + recipe.train)
        device, dtype = setup_runtime(cfg.device, cfg.experiment.seed, cfg.train.precision, cfg.train.tf32)
        run_dir = os.path.join(runs_dir, recipe.name)
        state = setup(cfg, run_dir, DistInfo(), device, dtype, RunLogger(run_dir), None)
        load_config(PredictConfig, args.predict_config,  # refuse a bad predict override now
                    predict_base + [f"checkpoint={run_dir}/latest.pth"] + recipe.predict)
        trainees.append(Trainee(recipe, state, capture_rng()))

    # Train in interleaved chunks; evaluate every `every` steps.
    for i, end in enumerate(chunk_ends(args.steps, min(args.chunk, args.every), args.every)):
        for t in (trainees if i % 2 == 0 else trainees[::-1]):
            restore_rng(t.rng)
            # The loop stops at `end` (the plan's step budget); the LR schedule keeps spanning all
            # --steps (the plan's end_step, fixed when the run was set up).
            t.state.total_steps = t.state.plan.total_steps = end
            start = time.perf_counter()
            train(t.state)  # ends with latest.pth written
            t.train_seconds += time.perf_counter() - start
            t.rng = capture_rng()
            if end % args.every == 0 or end == args.steps:
                t.evaluations.append(_evaluate(t, end, args.predict_config, predict_base, device))
                e = t.evaluations[-1]
                print(f"[{t.recipe.name}] step {end}: {e['coherent']}/{e['videos']} coherent after "
                      f"{e['minutes']:.2f} training minutes (sampling took {e['sample_seconds']:.0f} s)",
                      flush=True)
    result = {"steps": args.steps, "every": args.every, "chunk": args.chunk, "videos": args.videos,
              "targets": args.targets, "config": args.config, "predict_config": args.predict_config,
              "quick": args.quick, "torch_threads": torch.get_num_threads(),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "recipes": {}}
    for t in trainees:
        result["recipes"][t.recipe.name] = {
            "train_overrides": t.recipe.train, "predict_overrides": t.recipe.predict,
            "steps_per_s": args.steps / t.train_seconds, "evaluations": t.evaluations,
            "reached": {str(k): first_reaching(t.evaluations, k) for k in args.targets}}
    if tmp:
        tmp.cleanup()
    return result


def _evaluate(t: Trainee, steps: int, predict_config: str, predict_base: list[str],
              device: torch.device) -> dict:
    """Sample the recipe's latest.pth as predict does and score the videos."""
    ckpt = os.path.join(t.state.run_dir, "latest.pth")
    pcfg = load_config(PredictConfig, predict_config, predict_base + [f"checkpoint={ckpt}"] + t.recipe.predict)
    start = time.perf_counter()
    videos, ckpt = sample_videos(pcfg, device)
    s = summarize([video_coherence(v) for v in videos])
    return {"steps": steps, "checkpoint_step": ckpt["step"], "minutes": t.train_seconds / 60,
            "coherent": s["coherent"], "videos": s["videos"],
            "frames_with_one_blob": s["frames_with_one_blob"],
            "sample_seconds": time.perf_counter() - start, "sampler": checkpoint_sampler(pcfg.sampler, ckpt),
            "sample_steps": pcfg.num_steps, "guidance_scale": pcfg.guidance_scale}


def _random_vae(runs_dir: str) -> str:
    """--quick: an untrained tiny AutoencoderKL (4x), saved in `runs_dir`."""
    from models.vae import build_autoencoder
    from utils.config import VAEArchConfig
    path = os.path.join(runs_dir, "random_vae")
    torch.manual_seed(0)
    build_autoencoder(VAEArchConfig(block_out_channels=[16, 16, 16], norm_num_groups=8)).save_pretrained(path)
    return path


def print_table(r: dict) -> None:
    print(f"\ntime to quality ({r['date']}; {r['steps']} steps, {r['videos']} videos scored every "
          f"{r['every']} steps, chunks of {r['chunk']} steps interleaved):")
    for name, rec in r["recipes"].items():
        overrides = ", ".join(rec["train_overrides"] + [f"predict.{o}" for o in rec["predict_overrides"]])
        print(f"  {name} ({overrides or 'the config as is'}): {rec['steps_per_s']:.2f} steps/s")
        print("    " + "  ".join(f"{e['steps']}: {e['coherent']}/{e['videos']}" for e in rec["evaluations"]))
        for k, hit in rec["reached"].items():
            print(f"    {k}/{r['videos']} coherent: " + (f"step {hit['steps']}, {hit['minutes']:.1f} min"
                                                       if hit else f"not reached in {r['steps']} steps"))


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--recipe", action="append", required=True,
                   help="name:key=value,... (stage-2 overrides; predict.key=value for sampling); repeat")
    p.add_argument("--config", default=os.path.join(ROOT, "config_advanced.yaml"))
    p.add_argument("--predict-config", default=os.path.join(ROOT, "predict_advanced.yaml"))
    p.add_argument("--steps", type=int, default=None, help="steps per recipe (default: the config's "
                   "train.max_steps; --quick: 4)")
    p.add_argument("--every", type=int, default=None, help="steps between evaluations (default 1000; --quick 2)")
    p.add_argument("--chunk", type=int, default=None, help="steps per interleaved chunk (default 250; --quick 2)")
    p.add_argument("--videos", type=int, default=None, help="videos sampled per evaluation (default 36; --quick 2)")
    p.add_argument("--targets", type=int, nargs="+", default=None,
                   help="coherent-video counts to report steps and minutes for (default 30 34; --quick 1 2)")
    p.add_argument("--runs-dir", default=None, help="where the recipes' runs go (default: a temporary "
                   "folder, removed at the end)")
    p.add_argument("--device", default="auto")
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks the script, not the recipes")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    quick = args.quick
    defaults = dict(every=(2, 1000), chunk=(2, 250), videos=(2, 36), targets=([1, 2], [30, 34]))
    for key, (small, full) in defaults.items():  # `is None`: an explicit 0 is refused below, not replaced
        if getattr(args, key) is None:
            setattr(args, key, small if quick else full)
    if args.steps is None:
        args.steps = 4 if quick else _config_steps(args.config)
    for key in ("steps", "every", "chunk", "videos"):
        if getattr(args, key) < 1:
            raise UserError(f"--{key} = {getattr(args, key)}: must be >= 1")
    if args.runs_dir is not None:
        ensure_writable_dir(args.runs_dir, "--runs-dir")  # before any training, naming the flag
    if args.json:
        check_output_file(args.json, "--json")
    r = run(args)
    print_table(r)
    if args.json:
        write_json(r, args.json)
    return 0


def _config_steps(config: str) -> int:
    steps = load_config(TrainRunConfig, config, ["vae.path=unused"]).train.max_steps
    if steps is None:
        raise UserError(f"{config}: train.max_steps is null; give --steps")
    return steps


if __name__ == "__main__":
    from utils.cli import run_main
    run_main(main)
