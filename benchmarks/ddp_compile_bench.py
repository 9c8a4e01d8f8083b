"""DDP and torch.compile: which wraps which. Run under torchrun (2 CPU processes, gloo):

    python -m torch.distributed.run --nproc_per_node=2 benchmarks/ddp_compile_bench.py [--steps 30] [--repeats 3]

Times training steps (forward, backward with DDP's all-reduce, AdamW) of the demo-sized DiT
in both orders, alternating so load changes hit both:
- `ddp_of_compiled`: DDP(torch.compile(model)) (this repo before issue 18);
- `compiled_ddp`: torch.compile(DDP(model)), the order PyTorch documents: dynamo's DDP
  optimizer splits the graph at DDP's bucket boundaries, so gradient all-reduces overlap the
  rest of the backward.
Also prints the largest weight difference between the two orders after the same 3 steps of
2 micro-batches (`no_sync` on the first): it should be at float round-off. It is printed, not
asserted, and it cannot show whether `no_sync` skipped the first micro-batch's all-reduce
(averaging is linear: reducing each micro-batch gives the same sum); counting the all-reduces
(a DDP comm hook) would. Rank 0 prints steps/s per order and repeat.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as torch_dist
from torch.nn.parallel import DistributedDataParallel as DDP

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from models.dit import VideoDiT  # noqa: E402
from utils.config import ModelConfig  # noqa: E402


def build(order: str, seed: int = 0):
    torch.manual_seed(seed)
    model = VideoDiT(ModelConfig(hidden_size=128, depth=4, num_heads=4, patch_size=2),
                     in_channels=4, num_frames=8, latent_height=8, num_classes=0)
    if order == "ddp_of_compiled":
        ddp = DDP(torch.compile(model))
        net = ddp
    else:
        ddp = DDP(model)
        net = torch.compile(ddp)
    return model, ddp, net, torch.optim.AdamW(model.parameters(), lr=1e-3)


def batch(step: int, rank: int):
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(4, 4, 8, 8, 8, generator=g)  # (B, C, T, h, w)
    t = torch.randint(0, 1000, (4,), generator=g)
    return x, t


def train(net, ddp, opt, steps: int, rank: int, accum: int = 1) -> float:
    """Seconds per optimizer step over `steps` steps (after the first, which compiles)."""
    start = None
    for step in range(steps + 1):
        if step == 1:
            torch_dist.barrier()
            start = time.perf_counter()
        for micro in range(accum):
            x, t = batch(step * accum + micro, rank)
            ctx = ddp.no_sync() if micro < accum - 1 else torch.enable_grad()
            with ctx:
                loss = (net(x, t) - x).pow(2).mean()
                loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch_dist.barrier()
    return (time.perf_counter() - start) / steps


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch_dist.init_process_group("gloo")
    rank = torch_dist.get_rank()
    torch.set_num_threads(1)
    orders = ("ddp_of_compiled", "compiled_ddp")
    built = {o: build(o) for o in orders}
    results = {o: [] for o in orders}
    for o in orders:  # compile, then equal weights after the same steps (1 accumulation step too)
        model, ddp, net, opt = built[o]
        train(net, ddp, opt, 3, rank, accum=2)
    a, b = (dict(built[o][0].named_parameters()) for o in orders)
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    for _ in range(args.repeats):
        for o in orders:
            model, ddp, net, opt = built[o]
            results[o].append(1.0 / train(net, ddp, opt, args.steps, rank))
    if rank == 0:
        print(f"max weight difference after 3 steps (2 micro-batches each, no_sync on the first): {diff:.2e}")
        for o in orders:
            print(f"{o}: steps/s " + " ".join(f"{r:.2f}" for r in results[o]))
        ratio = [b / a for a, b in zip(results[orders[0]], results[orders[1]])]
        print("compiled_ddp / ddp_of_compiled: " + " ".join(f"{r:.2f}" for r in ratio))
    torch_dist.destroy_process_group()


if __name__ == "__main__":
    main()
