"""Does torch's context parallel (`torch.distributed.tensor.experimental.context_parallel`) train
on CPU processes over gloo? The probe behind docs/distributed.md's "Context parallel" section.

    python -m torch.distributed.run --nproc_per_node=2 benchmarks/context_parallel_probe.py

One attention, q = x W, k = v = x, on a sequence of 16 tokens sharded over the processes along
the sequence (the buffer `x`, as context_parallel shards it), forward and backward, against
the same attention in one piece; once with SDPA's default CPU kernel, once with its math kernel.
Rank 0 prints, per kernel, the largest error of the output and of W's gradient, or the error
that stopped it. Nothing here is used by training.
"""
from __future__ import annotations

import torch
import torch.distributed as torch_dist
import torch.nn.functional as F


def probe(kernel: str, mesh) -> str:
    from torch.distributed.tensor.experimental import context_parallel
    from torch.distributed.tensor.experimental._attention import context_parallel_unshard
    from torch.nn.attention import SDPBackend, sdpa_kernel
    torch.manual_seed(0)
    x = torch.randn(1, 2, 16, 8)  # (B, heads, L, head dim)
    w = torch.randn(8, 8, requires_grad=True)

    def attention(inp: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(inp @ w, inp, inp)

    reference = attention(x)
    reference.sum().backward()
    grad, w.grad = w.grad.clone(), None
    backends = {"default": [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH], "math": [SDPBackend.MATH]}[kernel]
    sharded = x.clone()
    try:
        with sdpa_kernel(backends), context_parallel(mesh, buffers=[sharded], buffer_seq_dims=[2]):
            out = attention(sharded)  # (B, heads, L / world, head dim) on each process
            out.sum().backward()
    except Exception as e:  # the point of a probe: report whatever stops it
        return f"{kernel} kernel: FAILED ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
    (whole,) = context_parallel_unshard(mesh, [out.detach()], [2])
    torch_dist.all_reduce(w.grad)  # each process holds its tokens' share of the gradient
    return (f"{kernel} kernel: forward error {(whole - reference).abs().max().item():.1e}, "
            f"gradient error {(w.grad - grad).abs().max().item():.1e}")


def main() -> None:
    from torch.distributed.device_mesh import init_device_mesh
    torch_dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (torch_dist.get_world_size(),))
    try:
        for kernel in ("default", "math"):
            line = probe(kernel, mesh)
            if torch_dist.get_rank() == 0:
                print(f"torch {torch.__version__}, {torch_dist.get_world_size()} CPU processes (gloo): {line}")
    finally:
        torch_dist.destroy_process_group()


if __name__ == "__main__":
    main()
