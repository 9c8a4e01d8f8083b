"""Throughput benchmark, measured side by side in one run on this machine.

    python benchmarks/bench.py [--quick] [--compile] [--json runs/bench.json] [--device cpu|cuda]
    python benchmarks/bench.py --real-size [--compile]   # DiT-B/2 at a real size, for a GPU

Prints a table (and writes JSON) of:
  - matmul peak of this machine in the training dtype (the MFU denominator);
  - DiT training step (forward, backward, AdamW): samples/s, tokens/s, GFLOP/s from FLOPs
    counted by torch's FlopCounterMode, MFU; the same for diffusers' LatteTransformer3DModel
    of equal width, block count and token count; the ratio ours / peer. Each model runs as
    its authors configure it: Latte with its tanh-approximate GELU (Latte-1's setting) and its
    caption cross-attention fed one token and torch's default AdamW (Latte's train.py), ours
    with exact GELU, qk-norm and the trainer's fused AdamW (also timed: without qk-norm, and
    with rotary positions, model.positions = rope). --compile adds both compiled,
    timed in a process of their own;
  - DiT training step conditioned on a caption (cross-attention to TEXT's tokens in every
    block) vs on a class label, at equal width, depth and tokens: the cost of text;
  - end-to-end stage-2 steps/s on the demo config with the latent cache vs encoding every step;
  - the text embedding cache: encoding the t2v demo's N distinct captions once (the cache
    build, written to disk) vs running the frozen text encoder on every training step's
    captions, for the demo's tiny T5 and a random T5 of T5-small's size (not with --quick);
  - seconds per sampled video for ddim / dpm++ at 10, 25, 50 steps and ddpm at 1000;
  - peak memory of a training step with and without activation checkpointing;
  - fraction of step time spent waiting for data.
--real-size measures only our DiT-B/2 training step on 16 x 32 x 32 latents with 4 channels
(16-frame 256x256 clips through an 8x VAE: 16 x 16 x 16 = 4096 tokens per clip) in the
training precision (bf16 autocast on CUDA, fp32 on CPU), against the peak of a large matmul
in that dtype measured on the same device (not a table of vendor numbers: what this device
and torch build really reach); --quick shrinks it to check the script.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from models.dit import VideoDiT  # noqa: E402
from utils.checkpoint import write_json  # noqa: E402
from utils.config import ModelConfig  # noqa: E402
from utils.paths import check_output_file  # noqa: E402
from utils.train_utils import autocast_context, make_adamw  # noqa: E402

# Benchmark size: DiT-S width (384, 6 heads) with 12 blocks (6 spatial + 6 temporal) on
# latents (4, 8, 16, 16) with 2x2 patches: 8 x 64 = 512 tokens per clip.
FULL = dict(hidden=384, depth=12, heads=6, frames=8, latent=16, batch=4)
QUICK = dict(hidden=64, depth=2, heads=2, frames=4, latent=8, batch=2)
# DiT-B/2 (hidden 768, 12 blocks, 12 heads) on 16-frame 256x256 clips through an 8x VAE.
REAL = dict(hidden=768, depth=12, heads=12, frames=16, latent=32, batch=8)
# A caption as the DiT receives it: T5-small's width (512), max_length 64, 40 real tokens.
TEXT = dict(dim=512, tokens=64, real=40)
# Text encoders of the caption-cache row (random T5s with the built-in captions' word-level
# tokenizer, as scripts/make_tiny_text_encoder.py writes them): the t2v demo's, and one of
# T5-small's size (512 wide, 6 layers, 8 heads; 1024 gated FF) for a realistic encoder cost.
TEXT_ENCODERS = {"tiny": dict(d_model=64, num_layers=2, num_heads=4),
                 "t5_small_size": dict(d_model=512, num_layers=6, num_heads=8)}


def timed(fn, reps: int, warmup: int = 2) -> float:
    """Median wall seconds of `fn()` (synchronising CUDA)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, reps: int) -> float:
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    return 2 * n ** 3 / timed(lambda: a @ b, reps) / 1e9


def demo_size() -> dict:
    """The DiT of config_advanced.yaml on the latents of config_vae.yaml's VAE."""
    from utils.config import TrainRunConfig, VAERunConfig, load_config
    cfg = load_config(TrainRunConfig, os.path.join(ROOT, "config_advanced.yaml"), [])
    vae = load_config(VAERunConfig, os.path.join(ROOT, "config_vae.yaml"), []).vae
    m = cfg.model.resolved()
    return dict(hidden=m.hidden_size, depth=m.depth, heads=m.num_heads, frames=cfg.data.num_frames,
                latent=cfg.data.resolution // vae.downsample_factor, attention=m.attention,
                batch=cfg.train.batch_size)


def ours(size: dict, device: torch.device, qk_norm: bool = True, positions: str = "sincos") -> torch.nn.Module:
    cfg = ModelConfig(hidden_size=size["hidden"], depth=size["depth"], num_heads=size["heads"],
                      patch_size=2, patch_t=1, attention=size.get("attention", "factorized"),
                      qk_norm=qk_norm, positions=positions, conditioning="none")
    return VideoDiT(cfg, in_channels=4, num_frames=size["frames"], latent_height=size["latent"]).to(device)


def peer(size: dict, device: torch.device) -> torch.nn.Module:
    """Latte with the same width, heads, block count (num_layers pairs = spatial + temporal)."""
    from diffusers import LatteTransformer3DModel
    return LatteTransformer3DModel(
        num_attention_heads=size["heads"], attention_head_dim=size["hidden"] // size["heads"],
        in_channels=4, out_channels=4, num_layers=size["depth"] // 2, sample_size=size["latent"],
        patch_size=2, activation_fn="gelu-approximate", norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6, caption_channels=16,
        video_length=size["frames"], attention_bias=True).to(device)


def train_step_fn(model, kind: str, size: dict, device: torch.device, compiled: bool = False,
                  amp_dtype: torch.dtype = torch.float32):
    """One training step (forward, MSE, backward, AdamW) as each repo runs it: ours with the
    trainer's optimizer (`make_adamw`: fused), Latte with torch's default AdamW as Latte's
    train.py builds it. `compiled`: run the forward through torch.compile; `amp_dtype`: the
    forward under autocast to it, as the trainer does (float32: no autocast)."""
    b, f, h = size["batch"], size["frames"], size["latent"]
    if kind == "ours":
        opt = make_adamw(model.parameters(), lr=1e-4)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)
    net = torch.compile(model, dynamic=False) if compiled else model  # sizes change between tables
    t = torch.randint(0, 1000, (b,), device=device)
    x = torch.randn(b, 4, f, h, h, device=device)  # (B, C, T, h, w); Latte takes the same layout
    if kind == "ours":
        forward = lambda: net(x, t)  # noqa: E731
    else:
        enc = torch.randn(b, 1, 16, device=device)
        forward = lambda: net(x, timestep=t, encoder_hidden_states=enc, return_dict=False)[0]  # noqa: E731

    def step():
        with autocast_context(device, amp_dtype):
            out = forward()
        (out.float() - x).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step, forward, x


def step_flops(model, forward, x) -> int:
    with FlopCounterMode(display=False) as counter:
        out = forward()
        (out - x).square().mean().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def time_variants(size: dict, device: torch.device, variants: list, reps: int) -> dict:
    """Median seconds per training step of each (name, kind, opts) variant, with FLOPs counted on
    the eager model (compiling changes the kernels, not the arithmetic). Repetitions are
    interleaved (one step of each in turn), so a change in machine load hits all alike."""
    steps, out = {}, {}
    for name, kind, opts in variants:
        torch.manual_seed(0)
        model = peer(size, device) if kind == "latte" else ours(size, device, qk_norm=opts.get("qk_norm", True),
                                                                 positions=opts.get("positions", "sincos"))
        step, forward, x = train_step_fn(model, kind, size, device)
        flops = step_flops(model, forward, x)
        if opts.get("compile"):
            step, _, _ = train_step_fn(model, kind, size, device, compiled=True)
        for _ in range(2):  # warm-up (and compilation)
            step()
        steps[name] = step
        out[name] = {"params_M": sum(p.numel() for p in model.parameters()) / 1e6, "gflop_per_step": flops / 1e9}
    times = {name: [] for name in steps}
    for _ in range(reps):
        for name, step in steps.items():
            times[name].append(timed(step, 1, warmup=0))
    for name, m in out.items():
        m["sec_per_step"] = statistics.median(times[name])
    return out


COMPILED = [("ours_compiled", "ours", {"compile": True}), ("latte_compiled", "latte", {"compile": True})]


def bench_models(size: dict, device: torch.device, peak: float, reps: int, compile_models: bool) -> dict:
    """Training step of ours (as shipped: qk-norm on, sin-cos positions), ours without qk-norm,
    ours with rotary positions (model.positions = rope) and Latte; with
    `compile_models` also both through torch.compile, timed in a process of their own: once
    Latte has been compiled, its eager steps in the same process run ~12% slower (measured:
    1.39 vs 1.24 s), which would flatter us."""
    variants = [("ours", "ours", {}), ("ours_no_qk_norm", "ours", {"qk_norm": False}),
                ("ours_rope", "ours", {"positions": "rope"}), ("latte", "latte", {})]
    out = time_variants(size, device, variants, reps)
    if compile_models:
        proc = subprocess.run([sys.executable, __file__, "--compiled-probe", json.dumps(size),
                               "--reps", str(reps), "--device", str(device)],
                              capture_output=True, text=True, check=True)
        out.update(json.loads(proc.stdout.strip().splitlines()[-1]))
    tokens = size["batch"] * size["frames"] * (size["latent"] // 2) ** 2
    for m in out.values():
        sec = m["sec_per_step"]
        m.update(samples_per_s=size["batch"] / sec, tokens_per_s=tokens / sec,
                 gflops=m["gflop_per_step"] / sec, mfu=m["gflop_per_step"] / sec / peak)
    for name in [n for n in out if n.startswith("ours")]:
        out[f"speed_ratio_{name}_over_latte"] = out["latte"]["sec_per_step"] / out[name]["sec_per_step"]
    if compile_models:
        out["speed_ratio_ours_compiled_over_latte_compiled"] = (
            out["latte_compiled"]["sec_per_step"] / out["ours_compiled"]["sec_per_step"])
    return out


def conditioned(size: dict, device: torch.device, kind: str) -> VideoDiT:
    """Our DiT at `size` conditioned on `kind`: class (10 labels) or text (TEXT's encoder width)."""
    cfg = ModelConfig(hidden_size=size["hidden"], depth=size["depth"], num_heads=size["heads"], patch_size=2,
                      patch_t=1, attention=size.get("attention", "factorized"), conditioning=kind)
    return VideoDiT(cfg, in_channels=4, num_frames=size["frames"], latent_height=size["latent"],
                    num_classes=10 if kind == "class" else 0,
                    text_dim=TEXT["dim"] if kind == "text" else 0).to(device)


def bench_conditioning(size: dict, device: torch.device, reps: int) -> dict:
    """Seconds and FLOPs per training step (forward, MSE, backward, fused AdamW) with class vs
    text conditioning, same DiT size and input; repetitions interleaved as in `time_variants`."""
    b, L = size["batch"], TEXT["tokens"]
    x = torch.randn(b, 4, size["frames"], size["latent"], size["latent"], device=device)  # (B, C, T, h, w)
    t = torch.randint(0, 1000, (b,), device=device)
    conds = {"class": dict(y=torch.randint(0, 10, (b,), device=device)),
             "text": dict(text=torch.randn(b, L, TEXT["dim"], device=device),  # (B, L, D_text)
                          text_mask=(torch.arange(L, device=device) < TEXT["real"]).expand(b, L))}  # (B, L)
    steps, out = {}, {}
    for kind, cond in conds.items():
        torch.manual_seed(0)
        model = conditioned(size, device, kind)
        opt = make_adamw(model.parameters(), lr=1e-4)

        def step(model=model, opt=opt, cond=cond):
            (model(x, t, **cond) - x).square().mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        for _ in range(2):  # warm-up
            step()
        steps[kind] = step
        flops = step_flops(model, lambda model=model, cond=cond: model(x, t, **cond), x)
        out[kind] = {"params_M": sum(p.numel() for p in model.parameters()) / 1e6, "gflop_per_step": flops / 1e9}
    times = {kind: [] for kind in steps}
    for _ in range(reps):
        for kind, step in steps.items():
            times[kind].append(timed(step, 1, warmup=0))
    for kind in steps:
        out[kind]["sec_per_step"] = statistics.median(times[kind])
    out["text_over_class"] = out["text"]["sec_per_step"] / out["class"]["sec_per_step"]
    out["flop_ratio_text_over_class"] = out["text"]["gflop_per_step"] / out["class"]["gflop_per_step"]
    return out


def memory_probe(size_name: str, checkpointing: bool) -> None:
    """Run in a subprocess: peak memory of training steps, printed as JSON."""
    size = QUICK if size_name == "quick" else FULL
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = ours(size, device)
    model.activation_checkpointing = checkpointing
    step, _, _ = train_step_fn(model, "ours", size, device)
    step()
    step()
    print(json.dumps({"peak_MiB": _peak_bytes(device) / 2 ** 20}))


def _peak_bytes(device: torch.device) -> int:
    """CUDA: peak allocated tensors. CPU: the process's peak RSS (same baseline for both runs).

    On Linux VmHWM, not ru_maxrss: ru_maxrss survives exec, so a probe started from this
    benchmark's own large process would report the parent's size (measured: 2285 MiB for
    both runs, against 2050 / 1636 MiB from VmHWM).
    """
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated()
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def bench_memory(size_name: str) -> dict:
    out = {}
    for ckpt in (False, True):
        proc = subprocess.run([sys.executable, __file__, "--memory-probe", size_name,
                               "--checkpointing", str(int(ckpt))], capture_output=True, text=True,
                              check=True)
        out["with_checkpointing" if ckpt else "without_checkpointing"] = json.loads(
            proc.stdout.strip().splitlines()[-1])["peak_MiB"]
    return out


def bench_training(quick: bool, device: torch.device) -> dict:
    """Demo config, stage 2 end to end: steps/s with and without the latent cache, data wait."""
    from models.vae import build_autoencoder
    from training.stage2 import setup, train
    from utils.config import TrainRunConfig, VAEArchConfig, load_config
    from utils.dist import DistInfo
    from utils.logging import RunLogger
    steps = 6 if quick else 300  # enough that the final checkpoint write is amortised
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        ae = build_autoencoder(VAEArchConfig())  # the demo VAE's architecture (its cost, not its quality)
        ae.register_to_config(scaling_factor=1.0)
        ae.save_pretrained(os.path.join(tmp, "vae"))
        small = ["data.builtin.num_clips=16", "model.depth=2", "model.hidden_size=64"] if quick else []
        for cache in ("off", "auto"):
            cfg = load_config(TrainRunConfig, os.path.join(ROOT, "config_advanced.yaml"), [
                f"vae.path={tmp}/vae", f"data.cache={cache}", f"train.max_steps={steps}",
                "validation.every_epochs=0", f"device={device.type}", "train.resume=null", *small])
            run = os.path.join(tmp, f"run_{cache}")
            s = setup(cfg, run, DistInfo(), device, torch.float32, RunLogger(None), None)
            t0 = time.perf_counter()
            train(s)
            sec = time.perf_counter() - t0
            out[f"cache_{cache}"] = {"steps_per_s": steps / sec, "data_wait_fraction": s.last_data_wait_fraction}
    out["cache_speedup"] = out["cache_auto"]["steps_per_s"] / out["cache_off"]["steps_per_s"]
    return out


def bench_text_encoding(quick: bool, device: torch.device, reps: int) -> dict:
    """The t2v demo's captions (config_t2v_demo.yaml: both splits' distinct captions, the
    validation prompts) encoded once into the text embedding cache (data/text_cache.py, on
    disk) vs the encoder run on every training step's batch of captions; per step, the
    cache's lookup of the same batch. Over the demo's train.max_steps: the total of each."""
    from data.builtin import CAPTION_WORDS, MovingShapes
    from data.text_cache import TextEmbeddingCache, text_cache_key
    from models.text_encoder import FrozenTextEncoder, make_tiny_text_encoder
    from utils.config import TrainRunConfig, load_config
    cfg = load_config(TrainRunConfig, os.path.join(ROOT, "config_t2v_demo.yaml"),
                      ["data.builtin.num_clips=16"] if quick else [])
    captions = sorted({*MovingShapes(cfg.data, "train").distinct_captions(),
                       *MovingShapes(cfg.data, "val").distinct_captions(), *(cfg.validation.prompts or [])})
    batch = cfg.train.batch_size
    gen = torch.Generator().manual_seed(0)
    steps_captions = [[captions[i] for i in torch.randint(len(captions), (batch,), generator=gen)]
                      for _ in range(reps)]  # the captions of `reps` training batches
    out = {"captions": len(captions), "batch": batch, "steps": cfg.train.max_steps, "encoders": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, size in TEXT_ENCODERS.items():
            if quick and name != "tiny":
                continue
            folder = make_tiny_text_encoder(os.path.join(tmp, name), CAPTION_WORDS, **size)
            encoder = FrozenTextEncoder.from_pretrained(folder, device)
            cache = TextEmbeddingCache(os.path.join(tmp, f"cache_{name}"), text_cache_key(
                encoder.fingerprint, encoder.max_length, encoder.dtype_name), log=lambda _: None)
            t0 = time.perf_counter()
            table = cache.ensure(captions, lambda b: tuple(encoder.encode(b)), cfg.text_encoder.batch_size,
                                 progress=False)
            _sync()
            once = time.perf_counter() - t0
            it = iter(steps_captions * 3)  # (warm-up 2 + reps) batches for each measure
            encode = timed(lambda: encoder.encode(next(it)), reps)
            it = iter(steps_captions * 3)
            lookup = timed(lambda: [t.to(device) for t in table.lookup(next(it)) if t is not None], reps)
            total_encode, total_cached = cfg.train.max_steps * encode, once + cfg.train.max_steps * lookup
            out["encoders"][name] = {
                "params_M": sum(p.numel() for p in encoder.parameters()) / 1e6, "width": encoder.hidden_size,
                "max_length": encoder.max_length, "once_s": once, "encode_per_step_s": encode,
                "lookup_per_step_s": lookup, "per_step_ratio": encode / lookup,
                "run_encode_s": total_encode, "run_cached_s": total_cached, "run_ratio": total_encode / total_cached,
                "break_even_steps": once / max(encode - lookup, 1e-12)}
    return out


def print_text_encoding(t: dict) -> None:
    for name, e in t["encoders"].items():
        print(f"text encoder {name} ({e['params_M']:.2f}M params, {e['max_length']} tokens of {e['width']}): "
              f"{t['captions']} captions cached once in {e['once_s']:.2f} s; per step (batch {t['batch']}) "
              f"encoding {e['encode_per_step_s'] * 1e3:.2f} ms vs cache lookup {e['lookup_per_step_s'] * 1e3:.3f} ms "
              f"({e['per_step_ratio']:.0f}x); over the demo's {t['steps']} steps {e['run_encode_s']:.1f} s encoding "
              f"every step vs {e['run_cached_s']:.2f} s cached ({e['run_ratio']:.0f}x; the cache pays off "
              f"after {e['break_even_steps']:.0f} steps)")


def bench_sampling(quick: bool, device: torch.device) -> dict:
    from models.vae import FrozenVAE, build_autoencoder
    from training.sampling import generate_videos
    from utils.config import DiffusionConfig, VAEArchConfig
    size = QUICK if quick else demo_size()
    model = ours(size, device).eval()
    vae = FrozenVAE(build_autoencoder(VAEArchConfig()).to(device))
    shape = (4, size["frames"], size["latent"], size["latent"])
    runs = [("ddim", n) for n in (10, 25, 50)] + [("dpm++", n) for n in (10, 25, 50)] + [("ddpm", 1000)]
    if quick:
        runs = [("ddim", 10), ("dpm++", 10), ("ddpm", 20)]
    out = {}
    for sampler, n in runs:
        t0 = time.perf_counter()
        generate_videos(model, vae, DiffusionConfig(), latent_shape=shape, seeds=[0, 1], labels=None,
                        sampler=sampler, num_steps=n, guidance_scale=1.0, null_class_id=None, device=device)
        out[f"{sampler}_{n}"] = (time.perf_counter() - t0) / 2
    return out


def bench_real_size(device: torch.device, quick: bool, compiled: bool, reps: int) -> dict:
    """Our DiT-B/2 training step at REAL size in the training precision; MFU against the
    measured matmul peak of that precision on this device."""
    size = QUICK if quick else REAL
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # the trainer's `auto`
    peak = matmul_peak(device, dtype, 1024 if quick or device.type != "cuda" else 8192, reps)
    torch.manual_seed(0)
    model = ours(size, device)
    step, forward, x = train_step_fn(model, "ours", size, device, amp_dtype=dtype)
    with autocast_context(device, dtype):
        flops = step_flops(model, forward, x)  # the arithmetic; compiling changes kernels only
    if compiled:
        step, _, _ = train_step_fn(model, "ours", size, device, compiled=True, amp_dtype=dtype)
    sec = timed(step, reps, warmup=3)
    tokens = size["batch"] * size["frames"] * (size["latent"] // 2) ** 2
    return {"device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "dtype": str(dtype).replace("torch.", ""), "size": size, "compiled": compiled,
            "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
            "peak_tflops": peak / 1e3, "tflop_per_step": flops / 1e12, "sec_per_step": sec,
            "samples_per_s": size["batch"] / sec, "tokens_per_s": tokens / sec,
            "mfu": flops / sec / (peak * 1e9)}


def print_real_size(r: dict) -> None:
    s = r["size"]
    name = "DiT-B/2" if s == REAL else "quick size"
    print(f"{name} training step on {r['device']} ({r['gpu']}), {r['dtype']}, "
          f"{'compiled' if r['compiled'] else 'eager'}: {r['params_M']:.1f}M params, batch {s['batch']} "
          f"x {s['frames']} x {(s['latent'] // 2) ** 2} tokens")
    print(f"  {r['sec_per_step'] * 1e3:.1f} ms/step, {r['samples_per_s']:.2f} samples/s, "
          f"{r['tokens_per_s']:.0f} tokens/s, {r['tflop_per_step']:.3g} TFLOP/step, MFU {r['mfu']:.1%} "
          f"of the measured {r['dtype']} matmul peak {r['peak_tflops']:.3g} TFLOP/s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks the script, not the machine")
    p.add_argument("--json", default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action="store_true", help="also time ours and Latte through torch.compile")
    p.add_argument("--real-size", action="store_true",
                   help="only our DiT-B/2 step on 16 x 32 x 32 latents (a GPU size): samples/s, tokens/s, MFU")
    p.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)
    p.add_argument("--checkpointing", default="0", help=argparse.SUPPRESS)
    p.add_argument("--compiled-probe", default=None, help=argparse.SUPPRESS)
    p.add_argument("--reps", type=int, default=7, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.json:
        check_output_file(args.json, "--json")  # before the measurements, not after them
    if args.memory_probe:
        return memory_probe(args.memory_probe, args.checkpointing == "1")
    if args.compiled_probe:  # a process of its own for the compiled models (see bench_models)
        result = time_variants(json.loads(args.compiled_probe), torch.device(args.device), COMPILED, args.reps)
        return print(json.dumps(result))
    device = torch.device(args.device)
    if args.real_size:
        result = bench_real_size(device, args.quick, args.compile, 3 if args.quick else 10)
        print_real_size(result)
        if args.json:
            write_json(result, args.json)
        return
    size, reps = (QUICK, 3) if args.quick else (FULL, 7)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # the training dtype
    results = {"device": str(device), "threads": torch.get_num_threads(), "size": size,
               "matmul_peak_gflops": matmul_peak(device, dtype, 512 if args.quick else 2048, reps)}
    results["dit_step"] = bench_models(size, device, results["matmul_peak_gflops"], reps, args.compile)
    if not args.quick:  # the small DiT of the demo, where per-op overheads weigh more
        results["demo_size"] = demo_size()
        results["dit_step_demo_size"] = bench_models(results["demo_size"], device,
                                                     results["matmul_peak_gflops"], 10 * reps, args.compile)
    results["conditioning_step"] = bench_conditioning(size, device, reps)
    results["text_encoding"] = bench_text_encoding(args.quick, device, 5 if args.quick else 50)
    results["memory_MiB"] = bench_memory("quick" if args.quick else "full")
    results["training"] = bench_training(args.quick, device)
    results["sampling_sec_per_video"] = bench_sampling(args.quick, device)
    print_table(results)
    if args.json:
        write_json(results, args.json)


def print_table(r: dict) -> None:
    print(f"device {r['device']} ({r['threads']} threads); matmul peak {r['matmul_peak_gflops']:.1f} GFLOP/s")
    print_models(r["dit_step"], r["size"])
    if "dit_step_demo_size" in r:
        print_models(r["dit_step_demo_size"], r["demo_size"])
    c = r["conditioning_step"]
    print(f"conditioning (same DiT): class {c['class']['sec_per_step']:.3f} s/step, text "
          f"{c['text']['sec_per_step']:.3f} s/step ({TEXT['tokens']} tokens of width {TEXT['dim']}, "
          f"{TEXT['real']} real; {c['text']['params_M'] - c['class']['params_M']:+.2f}M params): "
          f"text / class {c['text_over_class']:.2f}x time, {c['flop_ratio_text_over_class']:.2f}x FLOPs")
    print_text_encoding(r["text_encoding"])
    t = r["training"]
    print(f"stage 2 demo config: {t['cache_off']['steps_per_s']:.2f} steps/s encoding every step, "
          f"{t['cache_auto']['steps_per_s']:.2f} with the latent cache ({t['cache_speedup']:.2f}x); "
          f"data wait {t['cache_auto']['data_wait_fraction']:.1%} (cached), "
          f"{t['cache_off']['data_wait_fraction']:.1%} (encoding)")
    m = r["memory_MiB"]
    print(f"training step peak memory: {m['without_checkpointing']:.0f} MiB without, "
          f"{m['with_checkpointing']:.0f} MiB with activation checkpointing")
    print("seconds per sampled video: " + ", ".join(
        f"{k} {v:.2f}" for k, v in r["sampling_sec_per_video"].items()))


def print_models(d: dict, size: dict) -> None:
    print(f"DiT training step at hidden {size['hidden']}, {size['depth']} blocks, {size['heads']} heads, "
          f"batch {size['batch']} x {size['frames']} x {(size['latent'] // 2) ** 2} tokens")
    print(f"{'':<16}{'params M':>9}{'s/step':>9}{'samples/s':>10}{'tokens/s':>10}"
          f"{'GFLOP/step':>11}{'GFLOP/s':>9}{'MFU':>7}")
    kinds = [k for k in d if not k.startswith("speed_ratio")]
    for kind in kinds:
        m = d[kind]
        print(f"{kind:<16}{m['params_M']:>9.2f}{m['sec_per_step']:>9.3f}{m['samples_per_s']:>10.2f}"
              f"{m['tokens_per_s']:>10.0f}{m['gflop_per_step']:>11.1f}{m['gflops']:>9.1f}{m['mfu']:>7.1%}")
    ratios = [(k[len("speed_ratio_"):], v) for k, v in d.items() if k.startswith("speed_ratio")]
    print("speed: " + ", ".join(f"{name.replace('_over_', ' over ')} {v:.2f}x" for name, v in ratios))


if __name__ == "__main__":
    from utils.cli import run_main
    run_main(lambda argv: main())
