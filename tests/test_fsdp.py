"""train.parallel: fsdp (issue 29): FSDP2 on every transformer block and the root, for the repo's
DiT and the pretrained families; sharded checkpoints (atomic, read safely, resharded); the
EMA sharded beside its parameters; the local memory each process holds.

The 2-process tests (torchrun over gloo, as tests/test_ddp.py) train the tiny DiT 20 steps
under ddp and under fsdp from the same weights and data, with validation at every epoch and a
sharded checkpoint every 5 steps, once per module (`pair`), and compare them.
"""
import glob
import os
import pickle
import shutil
import subprocess
import sys

import pytest
import torch

import predict_advanced
from tests.test_ddp import _free_port
from tests.test_stage2 import ROOT, TINY, random_vae  # noqa: F401  (fixture)
from training.parallel import Replicated, Sharded, logged_memory
from utils import sharded_checkpoint
from utils.checkpoint import load_checkpoint
from utils.dist import DistInfo, cleanup
from utils.errors import UserError

STEPS = 20
# 16 clips -> 32 windows, 8 per rank and epoch: validation (held-out loss, samples) at steps 8
# and 16 and at the end, sharded checkpoints at 5, 10, 15; a constant LR after a short warmup.
RUN = [*TINY, "data.builtin.num_clips=16", f"train.max_steps={STEPS}", "train.checkpoint_every=5",
       "validation.every_epochs=1", "train.lr=1e-3", "model.class_dropout=0.5"]
TOL = 1e-5  # fp32: FSDP's reduce-scatter and DDP's all-reduce sum the same two gradients


def _torchrun(script_args, tmp_path, name, vae, extra=()):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           "--master_addr=127.0.0.1", *script_args, *RUN, f"vae.path={vae}", f"experiment.runs_dir={tmp_path}",
           f"experiment.name={name}", *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return os.path.join(tmp_path, name)


def _train2(tmp_path, name, vae, parallel, extra=()):
    return _torchrun(["train_advanced.py", "--config", "config_advanced.yaml"], tmp_path, name, vae,
                     [f"train.parallel={parallel}", *extra])


def _scalars(run, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(os.path.join(run, "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def _assert_close(a: dict, b: dict, what: str):
    assert set(a) == set(b), what
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=TOL, msg=lambda m: f"{what} {k}: {m}")


@pytest.fixture(scope="module")
def pair(tmp_path_factory, random_vae):  # noqa: F811
    """The same 20 steps under ddp and under fsdp (2 processes each): {"ddp": run, "fsdp": run}."""
    root = tmp_path_factory.mktemp("pair")
    return {kind: _train2(root, kind, random_vae, kind) for kind in ("ddp", "fsdp")}


# ----------------------------------------------------------------------------- 2 processes


@pytest.mark.slow  # the pair: two 2-process runs, ~50 s
def test_fsdp_trains_as_ddp_does(pair):
    """Losses at every step, final weights, EMA and AdamW state, and the validations' EMA loss
    agree within 1e-5; the FSDP run's latest.pth is consolidated (plain tensors, no shards left)."""
    losses = {k: _scalars(run, "train/loss") for k, run in pair.items()}
    assert [s for s, _ in losses["fsdp"]] == list(range(1, STEPS + 1))
    for (step, a), (_, b) in zip(losses["ddp"], losses["fsdp"]):
        assert abs(a - b) <= TOL, f"train/loss at step {step}: ddp {a}, fsdp {b}"
    val = {k: _scalars(run, "val/loss") for k, run in pair.items()}
    assert [s for s, _ in val["fsdp"]] == [8, 16, 20]
    assert all(abs(a - b) <= TOL for (_, a), (_, b) in zip(val["ddp"], val["fsdp"]))
    ddp, fsdp = (load_checkpoint(os.path.join(pair[k], "latest.pth")) for k in ("ddp", "fsdp"))
    assert fsdp["step"] == STEPS and "sharded" not in fsdp
    assert all(type(t) is torch.Tensor for t in fsdp["model_state"].values())  # not DTensors
    _assert_close(fsdp["model_state"], ddp["model_state"], "model_state")
    _assert_close(fsdp["ema_state"], ddp["ema_state"], "ema_state")
    for i, state in ddp["optimizer"]["state"].items():
        _assert_close(fsdp["optimizer"]["state"][i], state, f"optimizer state {i}")
    assert not os.path.exists(os.path.join(pair["fsdp"], "sharded"))  # gathered into latest.pth, then removed
    assert len(glob.glob(os.path.join(pair["fsdp"], "samples", "step_*", "sample_000.mp4"))) == 3
    log = open(os.path.join(pair["fsdp"], "log.txt")).read()
    assert "parallel: fsdp: 2 transformer blocks and the root sharded over 2 process(es)" in log


@pytest.mark.slow  # two 2-process runs, ~50 s
def test_fsdp_trains_buckets_as_ddp_does(tmp_path, random_vae):  # noqa: F811
    """data.buckets under fsdp: every step's batch has one shape on both ranks (the sharded
    all-gathers see the same blocks), and 6 steps over buckets of three aspect ratios and stills
    end with ddp's weights."""
    from tests.test_buckets import BUILTIN
    extra = [*BUILTIN, "data.builtin.num_clips=10", "train.max_steps=6", "validation.every_epochs=0",
             "train.checkpoint_every=100", "data.cache=auto"]
    runs = {kind: _train2(tmp_path, kind, random_vae, kind, extra) for kind in ("ddp", "fsdp")}
    ddp, fsdp = (load_checkpoint(os.path.join(runs[k], "latest.pth")) for k in ("ddp", "fsdp"))
    assert fsdp["step"] == ddp["step"] == 6 and len(fsdp["buckets"]) > 2 and fsdp["buckets"] == ddp["buckets"]
    _assert_close(fsdp["model_state"], ddp["model_state"], "model_state")
    _assert_close(fsdp["ema_state"], ddp["ema_state"], "ema_state")
    losses = {k: _scalars(run, "train/loss") for k, run in runs.items()}
    assert len(losses["fsdp"]) == 6 and all(abs(a - b) <= TOL for (_, a), (_, b) in zip(*losses.values()))


@pytest.mark.slow
def test_each_process_holds_one_half_under_fsdp(pair):
    """Parameters, gradients, AdamW state and EMA held locally: each FSDP process about 1/2 of
    what each DDP process holds, the two halves adding up to it."""
    ddp, fsdp = (logged_memory(os.path.join(pair[k], "log.txt")) for k in ("ddp", "fsdp"))
    assert len(ddp) == len(fsdp) == 2 and ddp[0] == ddp[1]
    for key in ("params", "grads", "optimizer", "ema"):
        whole = ddp[0][key]
        assert whole > 0
        assert sum(m[key] for m in fsdp) == pytest.approx(whole, rel=1e-3), key
        assert all(0.45 < m[key] / whole < 0.55 for m in fsdp), (key, fsdp, whole)
    state = lambda m: m["params"] + m["grads"] + m["optimizer"]  # noqa: E731
    assert max(state(m) for m in fsdp) / state(ddp[0]) == pytest.approx(0.5, abs=0.05)


@pytest.mark.slow
def test_the_consolidated_checkpoint_predicts_in_one_process(pair, tmp_path):
    """predict_advanced.py in one plain process reads the FSDP run's latest.pth and makes the very
    videos the DDP run's makes (the weights are the same)."""
    made = {}
    for kind, run in pair.items():
        out = tmp_path / kind
        assert predict_advanced.main(["--config", os.path.join(ROOT, "predict_advanced.yaml"), "device=cpu",
                                      f"checkpoint={run}/latest.pth", f"output_dir={out}", "num_videos=2",
                                      "num_steps=3"]) == 0
        made[kind] = [open(f, "rb").read() for f in sorted(glob.glob(str(out / "sample_*.mp4")))]
    assert len(made["fsdp"]) == 2 and made["fsdp"] == made["ddp"]


@pytest.mark.slow  # one 2-process run with no step: ~25 s
def test_a_ddp_checkpoint_resumes_under_fsdp(pair, tmp_path, random_vae):  # noqa: F811
    """A plain checkpoint (ddp's) into fsdp: each process takes its slice of every weight, EMA and
    AdamW tensor; gathered back when the run stops, they are the checkpoint's exactly."""
    run = _train2(tmp_path, "switched", random_vae, "fsdp",
                  [f"train.resume={pair['ddp']}/latest.pth", "validation.every_epochs=0"])
    _assert_same_state(os.path.join(pair["ddp"], "latest.pth"), os.path.join(run, "latest.pth"))


def _assert_same_state(path_a: str, path_b: str) -> tuple[dict, dict]:
    """Two checkpoints at step STEPS with bit-identical weights, EMA and AdamW state; returns both."""
    a, b = load_checkpoint(path_a), load_checkpoint(path_b)
    assert a["step"] == b["step"] == STEPS
    for key in ("model_state", "ema_state"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    for i, state in a["optimizer"]["state"].items():
        assert all(torch.equal(b["optimizer"]["state"][i][k], v) for k, v in state.items()), i
    return a, b


@pytest.fixture(scope="module")
def killed(tmp_path_factory, random_vae):  # noqa: F811
    """An fsdp run killed with SIGKILL (rank 0) in the middle of its step-10 sharded save: every
    shard and the metadata written, the directory not yet published (tests/ddp_hooks.py)."""
    from tests.test_schedule_ddp import _launch
    root = tmp_path_factory.mktemp("killed")
    args = [*RUN, f"vae.path={random_vae}", f"experiment.runs_dir={root}", "experiment.name=run",
            "train.parallel=fsdp"]
    results = _launch(2, "kill_save10", root / "rec", args)
    assert results[0][0] == -9, results[0][1][-2000:]  # SIGKILL
    return os.path.join(root, "run")


@pytest.mark.slow  # the killed run and its resume: two 2-process runs, ~50 s
def test_a_save_killed_midway_resumes_from_the_last_complete_one_bit_exactly(killed, pair, tmp_path, random_vae):  # noqa: F811
    run = os.path.join(tmp_path, "run")
    shutil.copytree(killed, run)
    latest = torch.load(os.path.join(run, "latest.pth"), weights_only=True)
    # the last complete save: step 8's, written before that epoch's validation
    assert latest["step"] == 8 and latest["sharded"]["path"] == "sharded/step_0000008"
    assert os.path.isfile(os.path.join(run, "sharded", ".step_0000010.tmp", ".metadata"))  # complete, unpublished
    assert not os.path.exists(os.path.join(run, "sharded", "step_0000010"))
    _train2(tmp_path, "run", random_vae, "fsdp", ["train.resume=auto"])
    log = open(os.path.join(run, "log.txt")).read()
    assert "resumed from" in log and "weights sharded by 2 process(es) in sharded/step_0000008" in log
    warned = [line for line in log.split("resumed from", 1)[1].lower().splitlines()
              if "warning" in line and "latent rms" not in line]
    assert not warned  # no reseed, no data-position warning: the resume was exact
    a, b = _assert_same_state(os.path.join(pair["fsdp"], "latest.pth"), os.path.join(run, "latest.pth"))
    for rank in (0, 1):
        assert torch.equal(a["rng"][rank]["noise_gen"], b["rng"][rank]["noise_gen"])
    assert not os.path.exists(os.path.join(run, "sharded"))


@pytest.mark.slow
def test_a_sharded_checkpoint_is_read_by_one_process(killed, tmp_path):
    """The killed run's latest.pth names step 8's shards: predict reads it whole in one plain
    process, and a one-process resume (fsdp: DCP reshards 2 -> 1; ddp: read whole) starts from
    exactly those weights."""
    import train_advanced
    from training import stage2
    from utils.train_utils import trainable_state_dict
    whole = load_checkpoint(os.path.join(killed, "latest.pth"))
    assert "sharded" not in whole and len(whole["model_state"]) == len(whole["ema_state"]) > 0
    assert predict_advanced.main(["--config", os.path.join(ROOT, "predict_advanced.yaml"), "device=cpu",
                                  f"checkpoint={killed}/latest.pth", f"output_dir={tmp_path / 'out'}",
                                  "num_videos=1", "num_steps=2"]) == 0
    seen = {}
    original = stage2._resume

    def spy(s, ckpt, path):
        original(s, ckpt, path)
        seen[s.cfg.train.parallel] = ({k: _whole(v) for k, v in trainable_state_dict(s.model).items()},
                                      {k: _whole(v) for k, v in s.ema.state_dict().items()})
    stage2._resume = spy
    try:
        for kind in ("fsdp", "ddp"):
            run = tmp_path / kind
            shutil.copytree(killed, run)
            assert train_advanced.main(["--config", os.path.join(ROOT, "config_advanced.yaml"), *RUN,
                                        f"vae.path={whole['vae']['path']}", f"experiment.runs_dir={tmp_path}",
                                        f"experiment.name={kind}", f"train.parallel={kind}", "train.max_steps=9",
                                        "validation.every_epochs=0", "train.resume=auto"]) == 0
    finally:
        stage2._resume = original
    for kind, (model, ema) in seen.items():
        assert all(torch.equal(model[k], whole["model_state"][k]) for k in whole["model_state"]), kind
        assert all(torch.equal(ema[k], whole["ema_state"][k]) for k in whole["ema_state"]), kind
    assert set(seen) == {"fsdp", "ddp"}
    assert "the world size changed" in open(tmp_path / "fsdp" / "log.txt").read()


def _whole(t):
    from torch.distributed.tensor import DTensor
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


@pytest.mark.slow  # a 2-process LoRA run on the tiny Wan and its 1-process reference: ~60 s
def test_fsdp_lora_on_the_tiny_wan_matches_one_process(pretrained_pipelines, tmp_path):
    """2 FSDP processes x batch 2 == 1 process x batch 4 for a LoRA on the tiny Wan (base frozen
    and sharded, adapters trained): adapters and their AdamW moments after 3 steps, t and noise
    fixed per window (tests/fixed_noise.py); the run exports its adapters for diffusers."""
    from tests.test_pretrained import two_process_lora_matches_one_process
    two_process_lora_matches_one_process(pretrained_pipelines, tmp_path, ["train.parallel=fsdp"])
    assert os.path.isfile(tmp_path / "two" / "export" / "pytorch_lora_weights.safetensors")
    assert "parallel: fsdp: 2 transformer blocks" in open(tmp_path / "two" / "log.txt").read()


# ----------------------------------------------------------------------------- one process


@pytest.fixture
def group():
    """A process group of one (FSDP and DCP need one), destroyed after the test."""
    yield Sharded(DistInfo(), torch.device("cpu"), torch.float32)
    cleanup(DistInfo())


def _built(family, dims, seed=0):
    torch.manual_seed(seed)  # LoRA's A matrices are random
    return family.build(dims, "cpu")


@pytest.mark.parametrize("name, finetune", [("video_dit", "full"), ("wan", "lora"), ("wan", "full"),
                                            ("cogvideox", "lora")])
def test_every_block_and_the_root_are_sharded(name, finetune, group, pretrained_pipelines):
    """fully_shard on each of the family's blocks and on the root; the optimizer holds the sharded
    trainable parameters (a LoRA: the adapters alone); forward and backward equal the plain
    module's (world size 1: the shards are the whole tensors). The repo's DiT also with
    activation checkpointing, which recomputes each sharded block inside the backward."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    from models.backbones import Family, load_pretrained
    from utils.config import ModelConfig
    from utils.train_utils import make_adamw
    if name == "video_dit":
        family = Family(ModelConfig(hidden_size=32, depth=2, num_heads=2, class_dropout=0.0))
        dims = dict(in_channels=4, num_frames=4, latent_height=4, latent_width=4, num_classes=3)
        x, t = torch.randn(2, 4, 4, 4, 4), torch.tensor([100, 700])
        kw = {"y": torch.tensor([0, 2])}
    else:
        from tests.test_pretrained import _inputs
        folder = pretrained_pipelines[name]
        family = load_pretrained(ModelConfig(pretrained=folder, finetune=finetune, conditioning="text"), folder)
        dims = {}
        x, t, text = _inputs(name)
        kw = {"text": text}
    checkpointing = (False, True) if name == "video_dit" else (False,)
    for ac in checkpointing:
        plain, sharded = _built(family, dims), _built(family, dims)
        plain.activation_checkpointing = sharded.activation_checkpointing = ac
        group.prepare(sharded, family.blocks(sharded), compile_blocks=False)
        assert isinstance(sharded, FSDPModule) and len(family.blocks(sharded)) == 2
        assert all(isinstance(b, FSDPModule) for b in family.blocks(sharded))
        assert all(isinstance(p, DTensor) for p in sharded.parameters())
        optimizer = make_adamw([p for p in sharded.parameters() if p.requires_grad], 1e-3)
        held = optimizer.param_groups[0]["params"]
        assert all(isinstance(p, DTensor) for p in held)
        assert len(held) == sum(p.requires_grad for p in plain.parameters())
        assert (finetune == "lora") == (len(held) < len(list(plain.parameters())))
        out_plain, out_sharded = plain(x, t, **kw), sharded(x, t, **kw)
        torch.testing.assert_close(out_sharded, out_plain, rtol=0, atol=1e-6)
        out_plain.square().mean().backward()
        out_sharded.square().mean().backward()
        for (n, p), q in zip(plain.named_parameters(), sharded.parameters()):
            assert (p.grad is None) == (q.grad is None), n
            if p.grad is not None:
                torch.testing.assert_close(q.grad.full_tensor(), p.grad, rtol=1e-5, atol=1e-7, msg=n)


@pytest.mark.slow  # dynamo traces each block: ~15 s of CPU
def test_compiled_blocks_under_fsdp_match_eager(group, monkeypatch):
    """train.compile under fsdp: each block compiled in place before it is sharded, activation
    checkpointing around each call (the documented order); two steps' outputs and gradients
    equal the eager sharded model's. (aot_eager: dynamo and AOT autograd without a C++ compiler.)"""
    from models.backbones import Family
    from utils.config import ModelConfig
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model=None, **kw: real(model, **{**kw, "backend": "aot_eager"}))
    family = Family(ModelConfig(hidden_size=32, depth=2, num_heads=2, class_dropout=0.0))
    dims = dict(in_channels=4, num_frames=4, latent_height=4, latent_width=4, num_classes=3)
    x, t, y = torch.randn(2, 4, 4, 4, 4), torch.tensor([100, 700]), torch.tensor([0, 2])
    results = []
    for compiled in (False, True):
        model = _built(family, dims)
        model.activation_checkpointing = True
        group.prepare(model, family.blocks(model), compile_blocks=compiled)
        assert all(getattr(b, "_compiled_call_impl", None) is not None for b in family.blocks(model)) == compiled
        for _ in range(2):
            out = model(x, t, y)
            out.square().mean().backward()
        results.append((out.detach(), [p.grad.full_tensor() for p in model.parameters()]))
    (eager, eager_grads), (compiled, compiled_grads) = results
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert set(_built(family, dims).state_dict()) == set(model.state_dict())  # names unchanged: checkpoints fit


def test_the_memory_line_reads_back(tmp_path):
    from training.parallel import memory_line
    per_rank = [{"params": 3 * 2 ** 20, "grads": 2 ** 20, "optimizer": 2 ** 21, "ema": 0, "peak_gib": 1.5},
                {"params": 3 * 2 ** 20, "grads": 2 ** 20, "optimizer": 2 ** 21, "ema": 0}]
    (tmp_path / "log.txt").write_text("2026-12-07 10:00:00 " + memory_line(per_rank, "fsdp") + "\n")
    assert logged_memory(str(tmp_path / "log.txt")) == [
        {"params": 3.0, "grads": 1.0, "optimizer": 2.0, "ema": 0.0, "peak_gib": 1.5},
        {"params": 3.0, "grads": 1.0, "optimizer": 2.0, "ema": 0.0}]


def test_fsdp_refuses_fp16():
    with pytest.raises(UserError, match="train.parallel = fsdp cannot train in fp16.*bf16"):
        Sharded(DistInfo(), torch.device("cpu"), torch.float16)
    assert Replicated(DistInfo(), torch.device("cpu"), torch.float16).kind == "ddp"


def test_flat_keys_round_trip():
    nested = {"model_state": {"blocks.0.attn.qkv.weight": torch.ones(2)},
              "optimizer": {"state": {3: {"exp_avg": torch.zeros(2), "step": torch.tensor(4.0)}}}}
    flat = sharded_checkpoint.flatten(nested)
    assert set(flat) == {"model_state/blocks.0.attn.qkv.weight", "optimizer/state/3/exp_avg", "optimizer/state/3/step"}
    back = sharded_checkpoint.unflatten_into({"optimizer": {"param_groups": []}}, flat)
    assert back["optimizer"]["state"][3]["step"] == 4.0 and back["optimizer"]["param_groups"] == []
    assert torch.equal(back["model_state"]["blocks.0.attn.qkv.weight"], torch.ones(2))
    with pytest.raises(TypeError, match="tensors only"):
        sharded_checkpoint.flatten({"lr": 1e-3})


class _Boom:
    def __reduce__(self):
        return (os.system, (f"touch {_Boom.marker}",))


def test_a_crafted_sharded_metadata_is_refused_and_not_run(tmp_path):
    """DCP reads .metadata with pickle; a directory whose .metadata names os.system is refused
    by name, and the command never runs. A missing or unfinished directory is named too."""
    directory = tmp_path / "sharded" / "step_0000001"
    directory.mkdir(parents=True)
    _Boom.marker = tmp_path / "ran"
    (directory / ".metadata").write_bytes(pickle.dumps(_Boom()))
    latest = tmp_path / "latest.pth"
    torch.save({"step": 1, "sharded": {"path": "sharded/step_0000001", "world_size": 2}}, latest)
    with pytest.raises(UserError, match="cannot be read safely .*system.*Nothing in it was run"):
        load_checkpoint(str(latest))
    assert not _Boom.marker.exists()
    (directory / ".metadata").unlink()
    with pytest.raises(UserError, match=r"step_0000001, which is unfinished \(no .metadata\)"):
        load_checkpoint(str(latest))
    shutil.rmtree(directory)
    with pytest.raises(UserError, match="which is missing"):
        load_checkpoint(str(latest))


def test_publish_replaces_and_prune_keeps_the_named_directory(tmp_path):
    root = tmp_path / "sharded"
    for name in ("step_0000005", "step_0000010", ".step_0000015.tmp"):
        (root / name).mkdir(parents=True)
        (root / name / "f").write_text(name)
    (root / ".step_0000010.tmp").mkdir()
    (root / ".step_0000010.tmp" / "f").write_text("new")
    sharded_checkpoint.publish(str(root / ".step_0000010.tmp"), str(root / "step_0000010"))
    assert (root / "step_0000010" / "f").read_text() == "new"  # a leftover of a killed run is replaced
    sharded_checkpoint.prune(str(tmp_path), "sharded/step_0000010")
    assert sorted(os.listdir(root)) == ["step_0000010"]
    sharded_checkpoint.prune(str(tmp_path), None)
    assert not root.exists()
