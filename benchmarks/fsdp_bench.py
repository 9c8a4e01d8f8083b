"""train.parallel: ddp against fsdp on 2 CPU processes (torchrun, gloo): steps/s and the memory
each process holds, at two model sizes, measured side by side on this machine.

    python benchmarks/fsdp_bench.py [--quick] [--rounds 3] [--steps 40] [--json runs/fsdp_bench.json]

Each run is `train_advanced.py` under `torchrun --nproc_per_node=2` (OMP_NUM_THREADS=1: one
core per process) on the built-in clips at 32 x 32 pixels, 8 frames, through an untrained
3-block VAE (latents 4 x 8 x 8 x 8, 2 x 2 patches: 128 tokens per clip), batch 4 per process,
fp32, validation off, the latent cache on. The two sizes of the repo's DiT:

  small   hidden 128, depth 4, 4 heads   (1.3 M parameters)
  large   hidden 384, depth 8, 6 heads   (21.8 M parameters)

Within a round each size runs ddp then fsdp, or fsdp then ddp (alternating by round), so a
change of the machine's load hits both; the fsdp / ddp ratio is taken per round and its median
and range reported (the machine is shared and noisy). Per run: steps/s from the run's own
TensorBoard `perf/sec_per_step` over the logging intervals after the first (warm-up), and
log.txt's memory line (parameters, gradients, AdamW state and EMA held by each process). The
host's fp32 matmul GFLOP/s is measured before and after (benchmarks/bench.py `matmul_peak`).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from training.parallel import logged_memory  # noqa: E402
from utils.checkpoint import write_json  # noqa: E402

SIZES = {"small": dict(hidden=128, depth=4, heads=4), "large": dict(hidden=384, depth=8, heads=6)}
QUICK = {"small": dict(hidden=32, depth=2, heads=2), "large": dict(hidden=64, depth=2, heads=2)}
KINDS = ("ddp", "fsdp")
LOG_EVERY = 10  # steps per timed interval; the first interval is warm-up


def write_vae(folder: str) -> None:
    """An untrained AutoencoderKL with 4x spatial downsampling (the tests' plumbing VAE)."""
    from models.vae import build_autoencoder
    from utils.config import VAEArchConfig
    torch.manual_seed(0)
    ae = build_autoencoder(VAEArchConfig(block_out_channels=[16, 16, 16], norm_num_groups=8))
    ae.register_to_config(scaling_factor=1.0)
    ae.save_pretrained(folder)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(kind: str, size: dict, steps: int, vae: str, runs: str, name: str) -> dict:
    """One 2-process training run: {"steps_per_s", "memory": [per rank {params, grads, optimizer, ema} MiB]}."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_port()}",
           "--master_addr=127.0.0.1", "train_advanced.py", "--config", "config_advanced.yaml", "device=cpu",
           f"vae.path={vae}", "data.path=builtin:moving_shapes", "data.resolution=32", "data.num_frames=8",
           "data.builtin.num_clips=32", "data.cache=auto", "data.num_workers=0",
           f"model.hidden_size={size['hidden']}", f"model.depth={size['depth']}", f"model.num_heads={size['heads']}",
           "train.batch_size=4", f"train.max_steps={steps}", f"train.log_every={LOG_EVERY}", "train.precision=fp32",
           "train.checkpoint_every=100000", "validation.every_epochs=0", f"train.parallel={kind}",
           f"experiment.runs_dir={runs}", f"experiment.name={name}", "train.resume=null"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} run failed:\n{proc.stderr[-3000:]}")
    run_dir = os.path.join(runs, name)
    seconds = [sec for step, sec in _scalars(run_dir, "perf/sec_per_step") if step > LOG_EVERY]
    return {"steps_per_s": 1 / statistics.median(seconds), "memory": logged_memory(os.path.join(run_dir, "log.txt"))}


def _scalars(run_dir: str, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(os.path.join(run_dir, "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def params_m(size: dict) -> float:
    from models.dit import VideoDiT
    from utils.config import ModelConfig
    model = VideoDiT(ModelConfig(hidden_size=size["hidden"], depth=size["depth"], num_heads=size["heads"]),
                     in_channels=4, num_frames=8, latent_height=8)
    return sum(p.numel() for p in model.parameters()) / 1e6


def host_gflops() -> float:
    from benchmarks.bench import matmul_peak
    torch.set_num_threads(1)  # as each training process runs
    return matmul_peak(torch.device("cpu"), torch.float32, 1024, 10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 1 round (a smoke test)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per run (timed after the first 10)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    sizes, rounds = (QUICK, 1) if args.quick else (SIZES, args.rounds)
    results = {"date": datetime.date.today().isoformat(), "torch": torch.__version__,
               "host_matmul_gflops_fp32_1_thread": [host_gflops()], "rounds": rounds, "steps": args.steps,
               "sizes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        vae = os.path.join(tmp, "vae")
        write_vae(vae)
        for name, size in sizes.items():
            results["sizes"][name] = {**size, "params_M": params_m(size), "ddp": [], "fsdp": []}
        for r in range(rounds):
            for name, size in sizes.items():
                for kind in (KINDS if r % 2 == 0 else KINDS[::-1]):
                    out = run(kind, size, args.steps, vae, tmp, f"{name}_{kind}_{r}")
                    results["sizes"][name][kind].append(out)
                    print(f"round {r + 1} {name} {kind}: {out['steps_per_s']:.2f} steps/s", flush=True)
    results["host_matmul_gflops_fp32_1_thread"].append(host_gflops())
    for entry in results["sizes"].values():
        entry["ratio_fsdp_over_ddp"] = [f["steps_per_s"] / d["steps_per_s"] for d, f in zip(entry["ddp"], entry["fsdp"])]
    print_table(results)
    if args.json:
        write_json(results, args.json)


def _spread(values: list[float], fmt: str = ".2f") -> str:
    return f"{statistics.median(values):{fmt}} [{min(values):{fmt}}-{max(values):{fmt}}]"


def print_table(r: dict) -> None:
    gflops = r["host_matmul_gflops_fp32_1_thread"]
    print(f"\n{r['date']}, torch {r['torch']}, 2 processes x 1 thread (gloo); host fp32 matmul "
          f"{gflops[0]:.0f} / {gflops[-1]:.0f} GFLOP/s per thread (before / after); {r['rounds']} rounds, "
          "median [min-max]")
    print("| size | params | ddp steps/s | fsdp steps/s | fsdp / ddp | per process, ddp: params + grads + "
          "AdamW + EMA MiB | fsdp (rank 0 / rank 1) |")
    print("|---|---|---|---|---|---|---|")
    for name, e in r["sizes"].items():
        total = lambda m: m["params"] + m["grads"] + m["optimizer"] + m["ema"]  # noqa: E731
        ddp_mem, fsdp_mem = e["ddp"][0]["memory"], e["fsdp"][0]["memory"]
        print(f"| {name} (hidden {e['hidden']}, depth {e['depth']}) | {e['params_M']:.2f} M | "
              f"{_spread([x['steps_per_s'] for x in e['ddp']])} | {_spread([x['steps_per_s'] for x in e['fsdp']])} | "
              f"{_spread(e['ratio_fsdp_over_ddp'])} | {total(ddp_mem[0]):.2f} | "
              f"{total(fsdp_mem[0]):.2f} / {total(fsdp_mem[1]):.2f} |")


if __name__ == "__main__":
    main()
