"""The demo's result as a distribution: the whole demo recipe (stage 1, stage 2) trained with
several training seeds, each sampled with several sampling seed sets, scored by
benchmarks/shape_coherence.py (coherent videos out of `--videos`).

    python benchmarks/demo_seeds.py [--seeds 0 1 2] [--sample-seeds 0 1000] [--videos 36]
        [--runs-dir runs/demo_seeds] [--stage2 key=value ...] [--stage1 key=value ...]
        [--name recipe] [--json runs/demo_seeds/recipe.json]

Each training seed s trains its own VAE (config_vae.yaml with experiment.seed=s, reused when
its folder exists: stage 1 does not depend on the stage-2 recipe) and its own DiT
(config_advanced.yaml with experiment.seed=s and the `--stage2` overrides), one process each,
as ./demo.sh runs them; every (training seed, sampling seed) pair then samples `--videos`
videos with predict_advanced.yaml's settings (seed = the sampling seed). Printed and written:
each pair's count, and over all pairs and per training seed the min / median / max, with the
host's fp32 matmul GFLOP/s (the machine's speed decides nothing here: no stage stops on time).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from utils.checkpoint import write_json  # noqa: E402


def run(cmd: list[str], log: str) -> None:
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:3])} ... failed (exit {proc.returncode}); see {log}")


def coherence(checkpoint: str, seed: int, videos: int, out: str) -> int:
    """Coherent videos of `videos` sampled from `checkpoint` with `seed` (shape_coherence.py's
    count, kept in `out`; an `out` written after the checkpoint, for it and as many videos, is
    read again rather than sampled anew, so an interrupted run resumes)."""
    if os.path.isfile(out) and os.path.getmtime(out) > os.path.getmtime(checkpoint):
        with open(out) as f:
            done = json.load(f)
        if done.get("checkpoint") == checkpoint and done["coherence"]["videos"] == videos and done["seed"] == seed:
            return int(done["coherence"]["coherent"])
    run([sys.executable, "benchmarks/shape_coherence.py", "--config", "predict_advanced.yaml", "device=cpu",
         f"checkpoint={checkpoint}", f"num_videos={videos}", f"seed={seed}", "--json", out], out + ".log")
    with open(out) as f:
        return int(json.load(f)["coherence"]["coherent"])


def matmul_gflops() -> float:
    import torch

    from benchmarks.bench import matmul_peak
    return matmul_peak(torch.device("cpu"), torch.float32, 2048, 5)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (experiment.seed)")
    ap.add_argument("--sample-seeds", type=int, nargs="+", default=[0, 1000], help="predict seeds")
    ap.add_argument("--videos", type=int, default=36)
    ap.add_argument("--runs-dir", default="runs/demo_seeds")
    ap.add_argument("--name", default="demo", help="the recipe's name (its stage-2 runs' prefix)")
    ap.add_argument("--stage1", nargs="*", default=[], help="overrides of config_vae.yaml")
    ap.add_argument("--stage2", nargs="*", default=[], help="overrides of config_advanced.yaml")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    runs = os.path.abspath(args.runs_dir)
    os.makedirs(runs, exist_ok=True)
    gflops = matmul_gflops()
    print(f"host fp32 matmul {gflops:.0f} GFLOP/s; recipe {args.name}: stage 2 {' '.join(args.stage2) or '(shipped)'}",
          flush=True)
    result = {"recipe": args.name, "stage1": args.stage1, "stage2": args.stage2, "videos": args.videos,
              "matmul_gflops": gflops, "date": time.strftime("%Y-%m-%d"), "runs": []}
    for seed in args.seeds:
        vae = os.path.join(runs, f"vae_s{seed}")
        common = ["device=cpu", f"experiment.runs_dir={runs}", f"experiment.seed={seed}"]
        if not os.path.isfile(os.path.join(vae, "vae", "config.json")):
            t0 = time.time()
            run([sys.executable, "train_vae.py", "--config", "config_vae.yaml", *common,
                 f"experiment.name=vae_s{seed}", "train.resume=auto", *args.stage1], vae + ".log")
            print(f"seed {seed}: stage 1 {time.time() - t0:.0f} s", flush=True)
        name = f"{args.name}_s{seed}"
        t0 = time.time()
        run([sys.executable, "train_advanced.py", "--config", "config_advanced.yaml", *common,
             f"experiment.name={name}", f"vae.path={os.path.join(vae, 'vae')}", "train.resume=auto",
             *args.stage2], os.path.join(runs, name + ".log"))
        minutes = (time.time() - t0) / 60
        for sample_seed in args.sample_seeds:
            out = os.path.join(runs, f"{name}_p{sample_seed}.json")
            n = coherence(os.path.join(runs, name, "latest.pth"), sample_seed, args.videos, out)
            result["runs"].append({"seed": seed, "sample_seed": sample_seed, "coherent": n,
                                   "stage2_minutes": round(minutes, 1)})
            print(f"seed {seed}, sampling seed {sample_seed}: {n}/{args.videos} coherent "
                  f"(stage 2 {minutes:.1f} min)", flush=True)
    counts = [r["coherent"] for r in result["runs"]]
    per_seed = {s: [r["coherent"] for r in result["runs"] if r["seed"] == s] for s in args.seeds}
    result["summary"] = {"min": min(counts), "median": statistics.median(counts), "max": max(counts),
                         "worst_seed_mean": min(statistics.mean(v) for v in per_seed.values())}
    s = result["summary"]
    print(f"{args.name}: coherent videos over {len(counts)} (training seed, sampling seed) pairs: min {s['min']}, "
          f"median {s['median']}, max {s['max']} of {args.videos}; per training seed: "
          + ", ".join(f"s{k} {v}" for k, v in per_seed.items()))
    write_json(result, args.json or os.path.join(runs, f"{args.name}.json"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
