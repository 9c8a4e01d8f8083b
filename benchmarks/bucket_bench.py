"""Buckets (`data.buckets`) against one shape: throughput, data wait, and sample quality per shape.

    python benchmarks/bucket_bench.py [--vae tests/fixtures/vae] [--rounds 3] [--steps 300]
        [--quality-steps 4000] [--videos 36] [--skip-quality] [--runs-dir DIR] [--json out.json] [--quick]
        [--seed N] [--only buckets|fixed] [--set KEY=VALUE ...] [--tag NAME]

Both runs are the demo's stage 2 (`config_advanced.yaml`: the built-in shapes, class labels,
the latent cache) on the VAE `--vae`; the bucketed one renders the built-in clips landscape
(24x40), portrait (40x24) and square (32x32), cycled over the clips, with `--stills` stills
beside them, under `data.buckets: auto` at data.resolution's area (32 x 32 = 1024 pixels), so
its batch sizes keep the tokens per step of the fixed run's 8 clips of 32x32x8.

Throughput (`--rounds` rounds, the two runs alternating within each, a fresh run of `--steps`
steps each time, its latent cache kept between rounds): optimizer steps per second and tokens
per second over the second half of the steps (the first half warms up every shape), the tokens
per step, and the share of that time spent waiting for data (`perf/data_wait_fraction`). The
ratio buckets / fixed is per round; its median and range are printed beside the host's fp32
matmul GFLOP/s (the machine is shared: the rounds say how noisy it was). Less noisy: the DiT's
training step alone at each bucket's shape and batch and at the fixed one, `--reps` steps each
with the shapes interleaved, the buckets weighed by their share of an epoch's steps.

Quality: each run trained `--quality-steps` steps (the LR schedule spanning them), then sampled
as predict does (EMA, ddpm 100 steps, guidance 2.5, seeds 0...) `--videos` videos at every
bucket of the bucketed run, and the fixed run at its own shape and at the others (which it was
never trained on), each scored by benchmarks/shape_coherence.py.

`--seed N`: the training runs' experiment.seed (another draw of init, data order and noise: the
spread between training seeds); `--only NAME`: one of the two runs (two processes can then train
them side by side, each with `--threads 1`).

`--set KEY=VALUE` (repeatable): a config override for both runs (e.g. `model.positions=rope`);
`--tag NAME`: a word in the quality runs' names (`quality_buckets_NAME_seed1`), so variants
trained into one `--runs-dir` keep their own folders.

`--quick`: tiny sizes and a random VAE; checks the script, not the numbers.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import utils.openmp  # noqa: E402,F401  (first: GOMP_SPINCOUNT before torch loads, as train_advanced.py)
import torch  # noqa: E402

import training.stage2 as stage2  # noqa: E402
from benchmarks.bench import matmul_peak  # noqa: E402
from benchmarks.shape_coherence import summarize, video_coherence  # noqa: E402
from benchmarks.time_to_quality import QUICK_TRAIN, _random_vae  # noqa: E402
from training.sampling import sample_videos  # noqa: E402
from utils.checkpoint import load_checkpoint, write_json  # noqa: E402
from utils.config import PredictConfig, TrainRunConfig, load_config  # noqa: E402
from utils.dist import DistInfo  # noqa: E402
from utils.logging import RunLogger  # noqa: E402
from utils.paths import check_output_file  # noqa: E402
from utils.train_utils import setup_runtime  # noqa: E402

SHAPES = "[[24,40],[40,24],32]"  # the built-in clips' own sizes, cycled (landscape, portrait, square)
QUICK_SHAPES = "[[16,24],[24,16],16]"
VIDEO, QUICK_VIDEO = ((24, 40), (32, 32), (40, 24)), ((16, 24), (16, 16), (24, 16))  # their video buckets


def variants(stills: int, quick: bool) -> dict[str, list[str]]:
    """The two runs' overrides: one shape, and auto buckets of three aspect ratios plus stills."""
    area = 256 if quick else 1024
    return {"fixed": [],
            "buckets": ["data.buckets=auto", f"data.bucket_area={area}",
                        f"data.builtin.resolutions={QUICK_SHAPES if quick else SHAPES}",
                        f"data.builtin.num_stills={stills}"]}


class Meter:
    """Times each optimizer step and counts the tokens of each micro-batch, by patching the
    stage-2 loop's `_optimizer_step` and `batch_latents` (restored by `close`)."""

    def __init__(self):
        self.step_times, self.tokens = [], []
        self._step, self._latents = stage2._optimizer_step, stage2.batch_latents

        def step(s, stats, per_sample):
            outcome = self._step(s, stats, per_sample)
            self.step_times.append(time.perf_counter())
            return outcome

        def latents(s, batch):
            x0, given = self._latents(s, batch)
            self.tokens.append(x0.shape[0] * s.family.tokens(x0.shape[1:]))
            return x0, given
        stage2._optimizer_step, stage2.batch_latents = step, latents

    def close(self) -> None:
        stage2._optimizer_step, stage2.batch_latents = self._step, self._latents


def train_run(overrides: list[str], run_dir: str, steps: int, log_every: int) -> stage2.Stage2:
    """A fresh stage-2 run of `steps` steps in `run_dir` (its latent cache kept)."""
    for name in ("latest.pth", "outcome.txt"):
        if os.path.exists(os.path.join(run_dir, name)):
            os.remove(os.path.join(run_dir, name))
    cfg = load_config(TrainRunConfig, os.path.join(ROOT, "config_advanced.yaml"), [
        *overrides, f"train.max_steps={steps}", f"train.log_every={log_every}", "train.resume=null",
        f"train.checkpoint_every={steps + 1}", "validation.every_epochs=0", "train.time_limit_minutes=null"])
    device, dtype = setup_runtime(cfg.device, cfg.experiment.seed, cfg.train.precision, cfg.train.tf32)
    s = stage2.setup(cfg, run_dir, DistInfo(), device, dtype, RunLogger(run_dir), None)
    stage2.train(s)
    s.log.close()
    return s


def step_costs(s: stage2.Stage2, reps: int) -> dict:
    """The DiT's training step alone (forward, v loss, backward, AdamW) at each bucket's latent
    shape and batch size and at the fixed run's (the reference shape x train.batch_size): the
    median of `reps` steps each, the shapes interleaved so the machine's load falls on all alike.
    The buckets' expected step time weighs each bucket by its share of an epoch's steps."""
    model = s.family.build(s.dims, s.device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    shapes = {"fixed": (s.cfg.train.batch_size, *(s.dims[k] for k in ("in_channels", "num_frames",
                                                                      "latent_height", "latent_width")))}
    shapes.update({b.name: (b.batch_size, *shape) for b, shape in zip(s.buckets.buckets, s.buckets.latent_shapes)})
    times: dict[str, list[float]] = {name: [] for name in shapes}
    for rep in range(reps + 1):  # the first round warms every shape up
        for name, (batch, *latent) in shapes.items():
            x = torch.randn(batch, *latent)
            t, y = torch.randint(0, 1000, (batch,)), torch.zeros(batch, dtype=torch.long)
            start = time.perf_counter()
            (model(x, t, y=y) - x).square().mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if rep:
                times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(x) for name, x in times.items()}
    share = [n / s.sampler.per_rank for n in s.sampler.batches_of]  # of an epoch's steps, per bucket
    expected = sum(p * median[b.name] for p, b in zip(share, s.buckets.buckets))
    return {"seconds": median, "share": dict(zip(s.buckets.names, share)), "reps": reps,
            "buckets_seconds_per_step": expected, "ratio_steps_per_s": median["fixed"] / expected}


def throughput(base: list[str], runs: dict[str, list[str]], runs_dir: str, rounds: int, steps: int,
               reps: int) -> dict:
    """Steps/s, tokens/s, tokens per step and data wait of the second half of each run; the
    DiT step's cost per bucket shape (`step_costs`)."""
    half = steps // 2
    out, costs = {name: [] for name in runs}, None
    for r in range(rounds):
        for name in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
            meter = Meter()
            try:
                s = train_run([*base, *runs[name], f"experiment.name=speed_{name}"],
                              os.path.join(runs_dir, f"speed_{name}"), steps, half)
            finally:
                meter.close()
            times, tokens = meter.step_times[half - 1:], meter.tokens[half:]
            seconds = times[-1] - times[0]
            out[name].append({"steps_per_s": (len(times) - 1) / seconds, "tokens_per_s": sum(tokens) / seconds,
                              "tokens_per_step": sum(tokens) / len(tokens),
                              "data_wait_fraction": s.last_data_wait_fraction})
            print(f"round {r + 1} {name}: {out[name][-1]['steps_per_s']:.2f} steps/s, "
                  f"{out[name][-1]['tokens_per_step']:.0f} tokens/step, data wait "
                  f"{out[name][-1]['data_wait_fraction']:.1%}", flush=True)
            if name == "buckets" and costs is None:
                costs = step_costs(s, reps)
    ratios = [b["steps_per_s"] / f["steps_per_s"] for b, f in zip(out["buckets"], out["fixed"])]
    token_ratios = [b["tokens_per_s"] / f["tokens_per_s"] for b, f in zip(out["buckets"], out["fixed"])]
    return {"rounds": out, "steps": steps, "ratio_steps_per_s": ratios, "ratio_tokens_per_s": token_ratios,
            "step_costs": costs}


def quality(base: list[str], runs: dict[str, list[str]], runs_dir: str, steps: int, videos: int,
            quick: bool, device: torch.device, suffix: str = "") -> dict:
    """Coherent videos of `videos` per shape: every bucket of the bucketed run; the fixed run at
    its shape and the bucketed run's (untrained for it)."""
    ckpts, minutes = {}, {}
    for name, overrides in runs.items():
        start = time.perf_counter()
        s = train_run([*base, *overrides, f"experiment.name=quality_{name}{suffix}"],
                      os.path.join(runs_dir, f"quality_{name}{suffix}"), steps, max(1, steps // 10))
        minutes[name] = (time.perf_counter() - start) / 60
        ckpts[name] = os.path.join(s.run_dir, "latest.pth")
        print(f"{name}: {steps} steps in {minutes[name]:.1f} min", flush=True)
    if "buckets" in ckpts:
        shapes = [(b["resolution"], b["num_frames"]) for b in load_checkpoint(ckpts["buckets"])["buckets"]]
    else:  # the fixed run alone: the video buckets `data.buckets: auto` makes of the three shapes
        shapes = [(list(r), 8 if not quick else 4) for r in (QUICK_VIDEO if quick else VIDEO)]
    predict = [f"num_videos={videos}", f"device={device.type}"] + (["num_steps=2", "batch_size=2"] if quick else [])
    result = {name: {} for name in runs}
    for name, path in ckpts.items():
        for resolution, frames in shapes:
            if name == "fixed" and frames == 1:
                continue  # the fixed run never saw a still; its clips are the comparison
            key = f"{resolution[0]}x{resolution[1]}x{frames}"
            cfg = load_config(PredictConfig, os.path.join(ROOT, "predict_advanced.yaml"), [
                *predict, f"checkpoint={path}", f"resolution={resolution}".replace(" ", ""),
                f"num_frames={frames}"])
            clips, _ = sample_videos(cfg, device)
            result[name][key] = summarize([video_coherence(v) for v in clips])
            print(f"{name} at {key}: {result[name][key]['coherent']}/{videos} coherent", flush=True)
    return {"steps": steps, "videos": videos, "train_minutes": minutes, "coherent": result}


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    tmp = tempfile.TemporaryDirectory() if args.runs_dir is None else None
    runs_dir = tmp.name if tmp else args.runs_dir
    vae = _random_vae(runs_dir) if args.quick else args.vae
    base = [f"vae.path={vae}", f"experiment.runs_dir={runs_dir}", "data.cache=auto", f"device={device.type}",
            *(QUICK_TRAIN if args.quick else []), *([f"experiment.seed={args.seed}"] if args.seed is not None else []), *args.set]
    runs = variants(args.stills, args.quick)
    if args.only:
        runs = {args.only: runs[args.only]}
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch_threads": torch.get_num_threads(),
              "matmul_gflops": matmul_peak(device, torch.float32, 256 if args.quick else 1024, 5),
              "variants": runs, "overrides": args.set, "vae": vae, "quick": args.quick}
    if not args.skip_throughput:
        result["throughput"] = throughput(base, runs, runs_dir, args.rounds, args.steps, args.reps)
    if not args.skip_quality:
        result["quality"] = quality(base, runs, runs_dir, args.quality_steps, args.videos, args.quick, device,
                                    (f"_{args.tag}" if args.tag else "")
                                    + ("" if args.seed is None else f"_seed{args.seed}"))
    if tmp:
        tmp.cleanup()
    return result


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} (range {min(values):.3f}-{max(values):.3f}, {len(values)} rounds)"


def print_table(r: dict) -> None:
    print(f"\nbuckets vs one shape ({r['date']}; host fp32 matmul {r['matmul_gflops']:.0f} GFLOP/s, "
          f"{r['torch_threads']} threads)")
    if "throughput" in r:
        print_throughput(r["throughput"])
    if "quality" in r:
        print_quality(r["quality"])


def print_throughput(t: dict) -> None:
    print(f"  {t['steps']} steps per run, the second half timed:")
    for name, rounds in t["rounds"].items():
        print(f"  {name}: steps/s {spread([x['steps_per_s'] for x in rounds])}, tokens/step "
              f"{statistics.median(x['tokens_per_step'] for x in rounds):.0f}, data wait "
              f"{spread([x['data_wait_fraction'] for x in rounds])}")
    print(f"  buckets / fixed: steps/s {spread(t['ratio_steps_per_s'])}, tokens/s {spread(t['ratio_tokens_per_s'])}")
    c = t["step_costs"]
    print(f"  the DiT step alone, median of {c['reps']} interleaved steps per shape (ms; share of the buckets' "
          "steps): fixed " + f"{1e3 * c['seconds']['fixed']:.1f}; " + ", ".join(
              f"{n} {1e3 * c['seconds'][n]:.1f} ({c['share'][n]:.0%})" for n in c["share"])
          + f"; buckets / fixed steps/s {c['ratio_steps_per_s']:.3f}")


def print_quality(q: dict) -> None:
    print(f"  coherent of {q['videos']} after {q['steps']} steps (training minutes "
          + ", ".join(f"{k} {v:.1f}" for k, v in q["train_minutes"].items()) + "):")
    shapes = dict.fromkeys(k for run in q["coherent"].values() for k in run)
    for shape in shapes:
        got = {name: run.get(shape) for name, run in q["coherent"].items()}
        print(f"    {shape}: " + ", ".join(f"{name} {'-' if v is None else v['coherent']}" for name, v in got.items()))


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vae", default=os.path.join(ROOT, "tests", "fixtures", "vae"))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--reps", type=int, default=None, help="DiT steps timed per shape (default 40; --quick 2)")
    p.add_argument("--steps", type=int, default=None, help="steps per throughput run (default 300; --quick 6)")
    p.add_argument("--quality-steps", type=int, default=None, help="steps per quality run (default 4000; --quick 4)")
    p.add_argument("--videos", type=int, default=None, help="videos per shape (default 36; --quick 2)")
    p.add_argument("--stills", type=int, default=None, help="built-in stills beside the clips (default 256; --quick 4)")
    p.add_argument("--skip-quality", action="store_true")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--runs-dir", default=None, help="where the runs go (default: a temporary folder)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's; 1 is "
                   "fastest when other jobs keep the cores busy)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, a random VAE: checks the script")
    p.add_argument("--json", default=None)
    p.add_argument("--seed", type=int, default=None, help="experiment.seed of the training runs (default: the config's)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for both runs (repeatable), e.g. model.positions=rope")
    p.add_argument("--tag", default=None, help="a word in the quality runs' folder names")
    p.add_argument("--only", choices=["buckets", "fixed"], default=None, help="train and score one of the two runs")
    args = p.parse_args(argv)
    for key, (small, full) in dict(steps=(6, 300), quality_steps=(4, 4000), videos=(2, 36), stills=(4, 256),
                                   reps=(2, 40)).items():
        if getattr(args, key) is None:
            setattr(args, key, small if args.quick else full)
    if args.only and not args.skip_throughput:
        from utils.errors import UserError
        raise UserError(f"--only {args.only} trains one of the two runs, and the speed ratio needs both: add "
                        "--skip-throughput")
    if args.json:
        check_output_file(args.json, "--json")
    if args.threads:
        torch.set_num_threads(args.threads)
    r = run(args)
    print_table(r)
    if args.json:
        write_json(r, args.json)
    return 0


if __name__ == "__main__":
    from utils.cli import run_main
    run_main(main)
