"""How stage 2 spreads its DiT over the torchrun processes (`train.parallel`): the one place
that knows the kinds. The loop, validation and checkpoints ask `parallel_for(...)`'s answer.

- `ddp` (`Replicated`; also any one-process run): every process holds the whole model, its
  gradients, AdamW moments and EMA; DistributedDataParallel all-reduces the gradients. A
  checkpoint is one plain file, written by rank 0.
- `fsdp` (`Sharded`): torch FSDP2. `fully_shard` on every transformer block (the family's
  `blocks`), then on the root, over a 1-D mesh of all processes: each process holds 1/world of
  every trainable and frozen parameter, gradient, AdamW moment and EMA weight (DTensors sharded
  on dim 0). A block's parameters are all-gathered while it runs and freed after, its gradients
  reduce-scattered (averaged) in the backward; the last block stays gathered between forward
  and backward, which starts with it (finetrainers' `apply_fsdp2`). On CUDA the blocks compute
  in bf16 with fp32 master weights and fp32 gradient reduction (`MixedPrecisionPolicy(bf16,
  fp32)`); on the CPU everything is fp32. Gradient accumulation reduce-scatters every
  micro-batch: keeping unsharded gradients between micro-batches (FSDP's no_sync) would cost
  the memory sharding saves.

Composition order under fsdp, the one torch documents (torchtitan, PyTorch's reference trainer,
`parallelize`: "turn on per-TransformerBlock compile after AC wrapping and before FSDP"; the
fully_shard contract: "the optimizer must be initialized with the DTensor model.parameters()"):
  1. activation checkpointing, around each block call inside the model's forward (the repo's
     DiT, diffusers' gradient checkpointing), switched on before sharding;
  2. torch.compile of each block in place (`block.compile()`, so parameter names and checkpoint
     keys do not change; FSDP2 marks its hooks torch._dynamo.disable, so they run outside the
     compiled code);
  3. fully_shard(block) for each block, then fully_shard(root);
  4. the optimizer, over the sharded parameters (stage 2 builds it after `prepare`).
Under ddp the order is unchanged: DDP, then torch.compile of the DDP module.

Checkpoints under fsdp (utils/sharded_checkpoint.py): while training, every process writes its
shards of the weights, EMA and AdamW state into `<run>/sharded/step_N/` and rank 0 writes
latest.pth, a plain dict naming that directory; when training stops, the state is gathered
into one plain latest.pth (as ddp writes it: predict, evaluate, export and any resume read it).
A resume reads either kind on any world size: a sharded directory is resharded by DCP, a plain
file sliced by each process.

EMA and validation under fsdp: the EMA is one averaged tensor per trainable parameter, sharded
as the parameter (`ShardedEMA`). Sampling puts the averaged shards into the trained module and
every process runs the validation's forwards in lockstep (each block gathered in turn), then
the trained shards go back: no process holds a second copy of the model, gathered or not.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from typing import Optional

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel

from training.checkpoints import load_entry, model_from_checkpoint
from utils import sharded_checkpoint
from utils.checkpoint import load_checkpoint
from utils.dist import DistInfo, barrier, copy_shard_, local_tensor, single_process_group
from utils.errors import UserError
from utils.train_utils import EMA, check_state_keys, load_trainable_state_dict, trainable_state_dict

MIB = 2 ** 20


class Replicated:
    """`train.parallel: ddp`, and every one-process run: the model whole on every process."""
    kind = "ddp"
    lockstep = False  # True: every process must run each forward of the model together

    def __init__(self, dist: DistInfo, device: torch.device, dtype: torch.dtype):
        self.dist, self.device, self.dtype = dist, device, dtype

    def prepare(self, model: nn.Module, blocks: list[nn.Module], compile_blocks: bool) -> None:
        """Before the EMA and the optimizer are made: nothing to do for a replicated model."""

    def wrap(self, model: nn.Module, compile_model: bool):
        """(what the loop calls, the DDP module or None). DDP, then compile that: PyTorch's
        supported order, in which dynamo's DDP optimizer splits the graph at DDP's gradient
        buckets so their all-reduces overlap the rest of the backward. The loop keeps the DDP
        module itself for no_sync() (DDP's forward still runs it).
        benchmarks/ddp_compile_bench.py: the same weights as the other order, no_sync included."""
        ddp = DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None) \
            if self.dist.enabled else None
        net = ddp if ddp is not None else model
        return (torch.compile(net) if compile_model else net), ddp

    def make_ema(self, model: nn.Module, decay: float, warmup_steps: int) -> EMA:
        return EMA(model, decay, warmup_steps)  # the trainable weights (a LoRA: adapters only)

    def summary(self) -> str:
        return ("ddp: the whole DiT on every process, gradients all-reduced" if self.dist.enabled
                else "one process")

    # ---- checkpoints

    def checkpoint_weights(self, model: nn.Module, ema: EMA, optimizer: torch.optim.Optimizer,
                           run_dir: str, step: int, final: bool, collective: bool) -> dict:
        """The checkpoint's weight entries: model_state (a LoRA: the adapters alone), ema_state,
        optimizer, as plain state dicts (the same on every process; rank 0 writes them)."""
        return {"model_state": trainable_state_dict(model), "ema_state": ema.state_dict(),
                "optimizer": optimizer.state_dict()}

    def load_weights(self, model: nn.Module, ema: EMA, optimizer: torch.optim.Optimizer,
                     ckpt: dict, path: str) -> None:
        """From a plain checkpoint (utils.checkpoint.load_checkpoint reads a sharded one whole)."""
        for entry, load in (("model_state", lambda state: load_trainable_state_dict(model, state)),
                            ("ema_state", ema.load_state_dict), ("optimizer", optimizer.load_state_dict)):
            load_entry(path, entry, load, ckpt[entry])

    def reads_shards(self) -> bool:
        """Whether a resume reads a sharded checkpoint's directory itself (each process its own
        shards) rather than whole (`load_checkpoint`)."""
        return False

    def module_for_export(self, model: nn.Module, ema: EMA, use_ema: bool, latest: str) -> nn.Module:
        """Rank 0: the module whose weights `Family.export` writes: the EMA's or the trained one."""
        return ema.model if use_ema else model


class Sharded(Replicated):
    """`train.parallel: fsdp`: FSDP2 (see the module docstring)."""
    kind = "fsdp"
    lockstep = True

    def __init__(self, dist: DistInfo, device: torch.device, dtype: torch.dtype):
        super().__init__(dist, device, dtype)
        if dtype == torch.float16:
            raise UserError("train.parallel = fsdp cannot train in fp16 (train.precision = fp16, or auto on "
                            "a GPU without bf16): FSDP2 has no sharded loss scaler. Use train.precision=bf16 "
                            "or fp32, or train.parallel=ddp")
        single_process_group(device)  # not under torchrun: a group of one (FSDP and DCP need one)
        self.mesh = init_device_mesh(device.type, (dist.world_size,))
        self.blocks = 0

    def mixed_precision(self):
        """bf16 parameters and fp32 gradient reduction on CUDA in bf16; fp32 otherwise. Forward
        inputs are not cast: autocast (the loop's) casts per op, so the timesteps stay fp32."""
        if self.device.type != "cuda" or self.dtype != torch.bfloat16:
            return MixedPrecisionPolicy()
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                    cast_forward_inputs=False)

    def prepare(self, model: nn.Module, blocks: list[nn.Module], compile_blocks: bool) -> None:
        """Compile each block in place, shard it, then the root (the module docstring's order)."""
        # The repo's DiT block and the roots (VideoDiT's unpatchify, PretrainedDiT's layout)
        # return views, which FSDP warns about at every forward: an in-place op on one would skip
        # the hook that gathers the module for the backward. Nothing writes to them in place: the
        # next block, the final layer and the loss (models/diffusion.py) read them out of place.
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDP(Block|VideoDiT|PretrainedDiT)\) "
                                                  r"returned a view tensor")
        policy = self.mixed_precision()
        for i, block in enumerate(blocks):
            if compile_blocks:
                block.compile()
            # the last block stays gathered after forward: the backward starts with it
            fully_shard(block, mesh=self.mesh, mp_policy=policy, reshard_after_forward=i < len(blocks) - 1)
        fully_shard(model, mesh=self.mesh, mp_policy=policy)
        self.blocks = len(blocks)

    def wrap(self, model: nn.Module, compile_model: bool):
        return model, None  # the root FSDP module itself; its blocks are compiled already

    def make_ema(self, model: nn.Module, decay: float, warmup_steps: int) -> "ShardedEMA":
        return ShardedEMA(model, decay, warmup_steps)

    def summary(self) -> str:
        precision = "bf16 parameters, fp32 gradient reduction" if self.mixed_precision().param_dtype \
            else "fp32"
        return (f"fsdp: {self.blocks} transformer blocks and the root sharded over {self.dist.world_size} "
                f"process(es) (FSDP2, {precision})")

    # ---- checkpoints

    def checkpoint_weights(self, model: nn.Module, ema: "ShardedEMA", optimizer: torch.optim.Optimizer,
                           run_dir: str, step: int, final: bool, collective: bool) -> dict:
        """While training: every process writes its shards into `<run>/sharded/step_N/` and the
        entries name it (`sharded`), their tensors left out. `final` (training stops, epoch
        checkpoints): the whole state gathered, plain tensors on rank 0 ({} elsewhere)."""
        if not collective:
            raise UserError("under train.parallel = fsdp every process holds only its shard of the weights, and "
                            "a failing run cannot gather them; latest.pth keeps the last checkpoint "
                            "(train.checkpoint_every)")
        optim = optimizer.state_dict()
        if final:
            return {"model_state": self._gathered(trainable_state_dict(model)),
                    "ema_state": self._gathered(ema.state_dict()),
                    "optimizer": {"state": {i: self._gathered(s) for i, s in optim["state"].items()},
                                  "param_groups": optim["param_groups"]}}
        flat = sharded_checkpoint.flatten({"model_state": trainable_state_dict(model), "ema_state": ema.state_dict(),
                                           "optimizer": {"state": optim["state"]}})
        path = sharded_checkpoint.write_shards(flat, run_dir, step, self.dist.is_main, lambda: barrier(self.dist))
        return {"model_state": {}, "ema_state": {}, "optimizer": {"state": {}, "param_groups": optim["param_groups"]},
                "sharded": {"path": path, "world_size": self.dist.world_size}}

    def _gathered(self, state: dict) -> dict:
        """Whole tensors, on the CPU, on rank 0 ({} elsewhere): one all-gather per DTensor, so a
        process holds one whole tensor at a time beyond its shards."""
        out = {}
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                value = (value.full_tensor() if isinstance(value, DTensor) else value).detach().cpu()
            if self.dist.is_main:
                out[name] = value
        return out

    def reads_shards(self) -> bool:
        return True

    def load_weights(self, model: nn.Module, ema: "ShardedEMA", optimizer: torch.optim.Optimizer,
                     ckpt: dict, path: str) -> None:
        """Each process its own shards, from a sharded directory (DCP reshards: any world size
        wrote it) or from a plain checkpoint's whole tensors (sliced here)."""
        if ckpt.get("sharded"):
            directory = os.path.join(os.path.dirname(os.path.abspath(path)), ckpt["sharded"]["path"])
            stored = sharded_checkpoint.shard_keys(directory, path)  # a missing directory: its own message
            load_entry(path, "sharded", lambda entry: self._load_shards(model, ema, optimizer, ckpt, directory,
                                                                        stored, path), ckpt["sharded"])
            return
        load_entry(path, "model_state", lambda state: _copy_state(model, state), ckpt["model_state"])
        load_entry(path, "ema_state", ema.load_state_dict, ckpt["ema_state"])
        load_entry(path, "optimizer", lambda state: optimizer.load_state_dict(_sharded_optimizer_state(
            optimizer, state)), ckpt["optimizer"])

    def _load_shards(self, model: nn.Module, ema: "ShardedEMA", optimizer: torch.optim.Optimizer, ckpt: dict,
                     directory: str, stored: dict, path: str) -> None:
        """`stored`: the directory's {flat key: (size, dtype)} (`sharded_checkpoint.shard_keys`)."""
        model_state, ema_state = trainable_state_dict(model), ema.state_dict()
        for entry, state in (("model_state", model_state), ("ema_state", ema_state)):
            check_state_keys({k.split("/", 1)[1]: None for k in stored if k.startswith(entry + "/")}, set(state))
        params = _optimizer_params(optimizer)
        skeleton: dict = {}  # the optimizer state to read into: shaped as the parameter, or as stored
        for key, (size, dtype) in stored.items():
            parts = key.split("/")
            if parts[:2] == ["optimizer", "state"]:
                p = params[int(parts[2])]
                skeleton.setdefault(int(parts[2]), {})[parts[3]] = torch.zeros_like(p) if size == p.shape \
                    else torch.zeros(size, dtype=dtype)
        targets = sharded_checkpoint.flatten({"model_state": model_state, "ema_state": ema_state,
                                              "optimizer": {"state": skeleton}})
        sharded_checkpoint.load_shards(targets, directory, path)
        optimizer.load_state_dict({"state": skeleton, "param_groups": ckpt["optimizer"]["param_groups"]})

    def module_for_export(self, model: nn.Module, ema: "ShardedEMA", use_ema: bool, latest: str) -> nn.Module:
        """The module rebuilt on rank 0's CPU from the consolidated latest.pth just written (the
        trained module here holds shards only)."""
        return model_from_checkpoint(load_checkpoint(latest), use_ema, "cpu", latest)


def allow_recompiles(shapes: int) -> Optional[tuple[int, int]]:
    """torch.compile with `shapes` latent shapes (data.buckets): dynamo compiles each shape once
    per grad mode (training; fsdp's compiled blocks also run validation) and per block kind
    (spatial, temporal), and past `torch._dynamo.config.recompile_limit` (8) it runs new shapes
    uncompiled, with a warning only. Raise the limit to 4 per shape + 8; returns (old, new), or
    None when it was high enough already."""
    import torch._dynamo
    config = torch._dynamo.config
    need = 4 * shapes + 8
    if config.recompile_limit >= need:
        return None
    old, config.recompile_limit = config.recompile_limit, need
    return old, need


def parallel_for(kind: str, dist: DistInfo, device: torch.device, dtype: torch.dtype) -> Replicated:
    """`train.parallel`'s strategy."""
    return Sharded(dist, device, dtype) if kind == "fsdp" else Replicated(dist, device, dtype)


def _optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The parameters in the order of the optimizer's state_dict indices."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def _copy_state(model: nn.Module, state: dict) -> None:
    """A plain trainable state dict (whole tensors) into a sharded model: each process its slice."""
    current = trainable_state_dict(model)
    check_state_keys(state, set(current))
    for name, value in state.items():
        copy_shard_(current[name], value)


def _sharded_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> dict:
    """A plain optimizer state_dict with each tensor shaped as its parameter made a DTensor placed
    as the parameter (each process slices its own part), for `optimizer.load_state_dict`."""
    params = _optimizer_params(optimizer)
    if set(state.get("state", {})) - set(range(len(params))):
        raise KeyError(f"optimizer state for {len(state['state'])} parameters, this optimizer has {len(params)}")
    out = {}
    for i, entries in state["state"].items():
        p = params[int(i)]
        out[i] = {k: distribute_tensor(v.to(p.device, p.dtype), p.device_mesh, p.placements, src_data_rank=None)
                  if isinstance(p, DTensor) and isinstance(v, torch.Tensor) and v.shape == p.shape else v
                  for k, v in entries.items()}
    return {"state": out, "param_groups": state["param_groups"]}


# ----------------------------------------------------------------------------- EMA


class ShardedEMA(EMA):
    """EMA of a model whose trainable parameters are FSDP's sharded DTensors: one averaged tensor
    per trainable parameter, sharded as it is (each process averages its own shard), and no copy
    of the module. `applied(model)` swaps the averaged shards into the trained module for
    sampling and swaps them back after."""

    def __init__(self, model: nn.Module, decay: float, warmup_steps: int = 0):
        self.decay, self.warmup_steps = decay, warmup_steps
        self.shadow = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        self._keys = set(trainable_state_dict(model))
        self._trained = model  # its buffers are the EMA's (as EMA copies them at every update)
        self._source, self._pairs = None, None

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        params = [p for p in model.parameters() if p.requires_grad]
        if self._source is None or len(params) != len(self._source) or \
                any(a is not b for a, b in zip(params, self._source)):
            self._source = params  # FSDP keeps its sharded parameters: built once, checked each step
            names = [n for n, p in model.named_parameters() if p.requires_grad]
            self._pairs = ([local_tensor(self.shadow[n]) for n in names], [local_tensor(p.detach()) for p in params])
        ema, local = self._pairs
        torch._foreach_lerp_(ema, local, 1.0 - self.decay_at(step))  # ema += (1 - d) * (p - ema), shard by shard

    def averaged(self) -> list[torch.Tensor]:
        return list(self.shadow.values())

    def state_dict(self) -> dict:
        buffers = {k: v for k, v in self._trained.state_dict().items() if k in self._keys and k not in self.shadow}
        return {**{k: v.detach() for k, v in self.shadow.items()}, **buffers}

    def load_state_dict(self, state: dict) -> None:
        """Whole tensors (a plain checkpoint) or DTensors placed as the shadow; the buffers are
        the trained model's (loaded with its model_state)."""
        check_state_keys(state, self._keys)
        for name, shadow in self.shadow.items():
            copy_shard_(shadow, state[name])

    @contextlib.contextmanager
    def applied(self, model: nn.Module):
        """`model` holding the averaged weights: all processes call it in lockstep (each forward
        gathers block by block). The swap goes shard by shard through one temporary, and every
        FSDP module is resharded before and after, so no gathered copy of either weights is
        left over for the next forward."""
        fsdp_modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
        _reshard(fsdp_modules)  # a gathered root left by an eval forward holds the other weights
        pairs = [(local_tensor(p.detach()), local_tensor(self.shadow[n]))
                 for n, p in model.named_parameters() if n in self.shadow]
        was_training = model.training
        _swap(pairs)
        try:
            yield model
        finally:
            _reshard(fsdp_modules)
            _swap(pairs)
            model.train(was_training)


def _reshard(fsdp_modules: list) -> None:
    for m in fsdp_modules:
        m.reshard()


@torch.no_grad()
def _swap(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    for a, b in pairs:
        tmp = a.clone()
        a.copy_(b)
        b.copy_(tmp)


# ----------------------------------------------------------------------------- memory


def local_state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer, ema: EMA,
                      grads: Optional[int] = None) -> dict[str, int]:
    """Bytes this process holds of the DiT's parameters (frozen ones too), their gradients
    (`grads`: measured before the last step cleared them; else those present now), the
    optimizer state and the EMA's own weights: local shards under fsdp, whole tensors under
    ddp. Metadata only: no communication, no device sync."""
    def nbytes(tensors) -> int:
        return sum(local_tensor(t).numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
    return {"params": nbytes(model.parameters()),
            "grads": grad_bytes(model) if grads is None else grads,
            "optimizer": nbytes(v for s in optimizer.state.values() for v in s.values()),
            "ema": nbytes(ema.averaged())}


def grad_bytes(model: nn.Module) -> int:
    return sum(local_tensor(p.grad).numel() * p.grad.element_size() for p in model.parameters()
               if p.grad is not None)


MEMORY_LINE = "memory held per process"


def memory_line(per_rank: list[dict], kind: str) -> str:
    """log.txt's account of `local_state_bytes` (+ CUDA `peak_gib`) of every process."""
    parts = []
    for rank, m in enumerate(per_rank):
        part = (f"rank {rank}: params {m['params'] / MIB:.4g}, grads {m['grads'] / MIB:.4g}, optimizer "
                f"{m['optimizer'] / MIB:.4g}, EMA {m['ema'] / MIB:.4g}")
        parts.append(part + (f", CUDA peak allocated {m['peak_gib']:.3f} GiB" if "peak_gib" in m else ""))
    return f"{MEMORY_LINE} (MiB, train.parallel {kind}): " + "; ".join(parts)


def logged_memory(log_path: str) -> list[dict[str, float]]:
    """`memory_line` read back from a run's log.txt: per rank {params, grads, optimizer, ema}
    in MiB, and peak_gib on CUDA (benchmarks/fsdp_bench.py, the tests and gpu_check read it)."""
    with open(log_path) as f:
        line = next((line for line in f if MEMORY_LINE in line), None)
    if line is None:
        raise ValueError(f"{log_path} has no '{MEMORY_LINE}' line (no step was logged)")
    per_rank = []
    for part in line.split("): ", 1)[1].split("; "):
        fields = [f.strip().rsplit(" ", 1) for f in part.split(": ", 1)[1].split(",")]
        per_rank.append({("peak_gib" if k.startswith("CUDA") else k.lower()):
                         float(k.split()[-1] if k.startswith("CUDA") else v) for k, v in fields})
    return per_rank
