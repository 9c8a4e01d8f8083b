"""The numeric pass conditions of scripts/gpu_check.sh, one subcommand each; exit 0 = PASS.

Each prints one line: what it measured and the bound it held to (or missed). Run from the repo
root: `python scripts/gpu_check_conditions.py loss runs/x/log.txt --falling`.

  loss LOG [--falling]          every logged training loss finite; with --falling the mean of
                                the last third of the logged steps is below the first third's
  val_loss LOG                  the held-out loss (fixed clips, noise and t: no sampling noise) of the
                                last validation is below the first's
  steps RUN N                   the run made N real updates (fp16: a run whose every step the
                                GradScaler skipped never reaches its step count), losses finite
  bench JSON                    bench.py's samples/s, tokens/s and MFU are finite numbers > 0
  agree CKPT DEVICE             the checkpoint's DiT: torch.compile vs eager (outputs and
                                gradients) and bf16 autocast vs fp32 (outputs), relative L2 error bounded
  fsdp RUN DEVICE               a train.parallel=fsdp run: latest.pth consolidated (plain tensors, no
                                shards left), the memory line's parameters = the model's bytes (world
                                size 1), a CUDA peak logged; its DiT sharded (FSDP2, bf16 parameters)
                                vs eager fp32: outputs and gradients within BF16_TOL (relative L2)
  same_weights CKPT_A CKPT_B TOL  the trained weights of two checkpoints within TOL (relative L2 over
                                all of them): FSDP against DDP on the same steps
  diagnose LOG                  every code-path check of diagnose.py PASSed (quality checks of a
                                short run are reported, not required)
  vae_bf16 VAE DEVICE           a video VAE's bf16 encode/decode agrees with fp32 (relative L2)
  cache RUN                     the run's latent cache is per window (a causal video VAE's layout)
  fvd JSON                      evaluate's FVD is a finite number >= 0 over the counts it was asked for
  text RUN                      a text run: the checkpoint records a text model (kind text, text_dim
                                > 0, the encoder's fingerprint) and the last validation folder has
                                one non-empty prompts.txt line per sample video
  first_frames JSON N           evaluate's image_to_video record: frame 0 within FIRST_FRAME_TOL dB
                                PSNR of the image's own VAE round trip, a finite FVD >= 0 for each of
                                the N window positions
  pretrained RUN FINETUNE DEVICE  a fine-tune of a tiny pretrained DiT (FINETUNE lora | full): the
                                checkpoint records the base's fingerprint and holds the trainable
                                weights only (a LoRA: fp32 adapters, none of the base), all finite;
                                export/ written; the model rebuilt from it in bf16 autocast agrees
                                with fp32 (relative L2 below BF16_TOL)
  make_video_vae DIR            writes a tiny random AutoencoderKLWan (a causal video VAE) to DIR
  make_pretrained DIR           writes tiny random Wan and CogVideoX pipeline folders to DIR/wan, DIR/cogvideox
  make_clips DIR N              writes N smooth 9-frame mp4 clips to DIR (real files for DataLoader workers)
  make_detector PATH            writes a stand-in I3D TorchScript (I3D's call, random weights) to PATH
"""
from __future__ import annotations

import glob
import json
import math
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

COMPILE_TOL = 1e-3  # torch.compile vs eager, fp32 with TF32 off: only reduction order differs
BF16_TOL = 5e-2  # bf16 keeps 8 bits of mantissa (~4e-3 per op); a few layers stay well under this
FIRST_FRAME_TOL = 0.5  # dB: frame 0 is the image through one VAE round trip (the condition is kept exactly)
LOSS_LINE = re.compile(r" step (\d+)/\d+ .*?\bloss (\S+)")  # stage 1 and stage 2 training lines


def _result(ok: bool, text: str) -> int:
    print(("ok: " if ok else "FAILED: ") + text)
    return 0 if ok else 1


def _losses(log: str) -> list[float]:
    with open(log) as f:
        return [float(m.group(2)) for m in map(LOSS_LINE.search, f) if m]


def loss(log: str, falling: bool = False) -> int:
    values = _losses(log)
    if len(values) < (3 if falling else 1):
        return _result(False, f"{len(values)} training losses logged in {log}")
    if not all(math.isfinite(v) for v in values):
        return _result(False, f"non-finite training loss in {log}: {values}")
    third = max(1, len(values) // 3)
    first, last = sum(values[:third]) / third, sum(values[-third:]) / third
    text = f"loss {first:.4f} -> {last:.4f} (means of the first and last {third} of {len(values)} logged steps)"
    return _result(last < first if falling else True, text + (", falling" if falling and last < first else ""))


VAL_LINE = re.compile(r"step (\d+) val/loss (\S+) ")


def val_loss(log: str) -> int:
    with open(log) as f:
        values = [(int(m.group(1)), float(m.group(2))) for m in map(VAL_LINE.search, f) if m]
    if len(values) < 2:
        return _result(False, f"{len(values)} validations logged in {log}: need two to compare")
    (s0, first), (s1, last) = values[0], values[-1]
    ok = math.isfinite(last) and last < first
    return _result(ok, f"val/loss {first:.4f} at step {s0} -> {last:.4f} at step {s1}")


def steps(run: str, expected: int) -> int:
    """All `expected` optimizer steps were made (fp16: a step the GradScaler skipped does not
    count, so a run whose every step was skipped never gets there) and every loss is finite."""
    from utils.checkpoint import load_checkpoint
    done = load_checkpoint(os.path.join(run, "latest.pth"))["step"]
    values = _losses(os.path.join(run, "log.txt"))
    ok = done == expected and values and all(math.isfinite(v) for v in values)
    return _result(bool(ok), f"{done} of {expected} updates made (skipped ones do not count), "
                             f"{len(values)} logged losses, last {values[-1:]}")


def bench(path: str) -> int:
    r = json.load(open(path))
    ok = all(isinstance(r.get(k), (int, float)) and math.isfinite(r[k]) and r[k] > 0
             for k in ("samples_per_s", "tokens_per_s", "mfu"))
    return _result(ok, f"{r.get('samples_per_s', 0):.2f} samples/s, {r.get('tokens_per_s', 0):.0f} tokens/s, "
                       f"MFU {r.get('mfu', 0):.1%}")


def _rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def agree(ckpt_path: str, device_name: str) -> int:
    import torch
    from training.checkpoints import latent_shape, model_dims, model_from_checkpoint
    from utils.checkpoint import load_checkpoint
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    device = torch.device(device_name)
    ckpt = load_checkpoint(ckpt_path)
    model = model_from_checkpoint(ckpt, True, device, ckpt_path).requires_grad_(True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, *latent_shape(model_dims(ckpt["model"])), generator=g).to(device)  # (B, C, T, h, w)
    t = torch.tensor([100, 700], device=device)
    y = torch.zeros(2, dtype=torch.long, device=device) if model.num_classes else None

    def run(net):
        model.zero_grad()
        out = net(x, t, y)
        out.square().mean().backward()
        return out.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    eager_out, eager_grad = run(model)
    compiled_out, compiled_grad = run(torch.compile(model))
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        bf16_out = model(x, t, y)
    errs = {"compiled output": _rel(compiled_out, eager_out), "compiled grads": _rel(compiled_grad, eager_grad),
            "bf16 output": _rel(bf16_out, eager_out)}
    ok = errs["compiled output"] <= COMPILE_TOL and errs["compiled grads"] <= COMPILE_TOL and \
        errs["bf16 output"] <= BF16_TOL
    return _result(ok, ", ".join(f"{k} {v:.1e}" for k, v in errs.items()) +
                   f" (relative L2 vs eager fp32; bounds {COMPILE_TOL:g} compiled, {BF16_TOL:g} bf16)")


def fsdp(run: str, device_name: str) -> int:
    import torch
    from torch.distributed.tensor import DTensor
    from training.checkpoints import family_of_checkpoint, latent_shape, model_dims, model_from_checkpoint
    from training.parallel import Sharded, logged_memory
    from utils.checkpoint import load_checkpoint
    from utils.dist import DistInfo, cleanup
    device, path = torch.device(device_name), os.path.join(run, "latest.pth")
    raw = torch.load(path, weights_only=True)
    plain = "sharded" not in raw and all(type(t) is torch.Tensor for t in raw["model_state"].values()) \
        and not os.path.exists(os.path.join(run, "sharded"))
    if not plain:
        return _result(False, f"{path} is not consolidated: it names shards, holds DTensors, or shards are left")
    memory = logged_memory(os.path.join(run, "log.txt"))[0]
    model_mib = sum(t.numel() * t.element_size() for t in raw["model_state"].values()) / 2 ** 20
    peak = memory.get("peak_gib", 0.0) > 0 or device.type != "cuda"
    ckpt = load_checkpoint(path)
    reference = model_from_checkpoint(ckpt, False, device, path).requires_grad_(True)
    sharded = model_from_checkpoint(ckpt, False, device, path).requires_grad_(True)
    strategy = Sharded(DistInfo(), device, torch.bfloat16)
    try:
        strategy.prepare(sharded, family_of_checkpoint(ckpt, path).blocks(sharded), compile_blocks=False)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, *latent_shape(model_dims(ckpt["model"])), generator=g).to(device)  # (B, C, T, h, w)
        t = torch.tensor([100, 700], device=device)
        y = torch.zeros(2, dtype=torch.long, device=device) if getattr(reference, "num_classes", 0) else None

        def run_step(net, bf16):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                out = net(x, t, y)
            out.float().square().mean().backward()
            grads = [p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad for p in net.parameters()]
            return out.detach(), torch.cat([gr.flatten().float() for gr in grads if gr is not None])
        (ref_out, ref_grad), (out, grad) = run_step(reference, False), run_step(sharded, True)
    finally:
        cleanup(DistInfo())
    errs = {"output": _rel(out, ref_out), "grads": _rel(grad, ref_grad)}
    ok = abs(memory["params"] - model_mib) <= 0.01 * model_mib and peak and max(errs.values()) <= BF16_TOL
    return _result(ok, f"latest.pth consolidated; rank 0 holds {memory['params']:.2f} MiB of parameters, the model {model_mib:.2f} MiB; "
                       f"CUDA peak {memory.get('peak_gib', 'not logged')}; FSDP bf16 vs eager fp32: "
                       + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()) + f" (bound {BF16_TOL:g})")


def same_weights(path_a: str, path_b: str, tol: str) -> int:
    import torch
    from utils.checkpoint import load_checkpoint
    a, b = load_checkpoint(path_a)["model_state"], load_checkpoint(path_b)["model_state"]
    if set(a) != set(b):
        return _result(False, f"{path_a} and {path_b} hold different weights ({len(a)} vs {len(b)} tensors)")
    keys = sorted(a)
    err = _rel(torch.cat([b[k].flatten().float() for k in keys]), torch.cat([a[k].flatten().float() for k in keys]))
    return _result(err <= float(tol), f"trained weights differ by {err:.1e} (relative L2 over {len(keys)} tensors; "
                                      f"bound {float(tol):g})")


def diagnose(log: str) -> int:
    from training.diagnostics import CODE_PATH_CHECKS as CODE_CHECKS  # diagnose's own names
    status = {}
    with open(log) as f:
        for line in f:
            m = re.match(r"\[(PASS|WARN|FAIL|SKIP)\] (\S+)", line)
            if m:
                status[m.group(2)] = m.group(1)
    bad = [c for c in CODE_CHECKS if status.get(c) != "PASS"]
    quality = ", ".join(f"{k} {v}" for k, v in status.items() if k not in CODE_CHECKS)
    return _result(not bad, (f"code-path checks not passed: {', '.join(f'{c} {status.get(c)}' for c in bad)}"
                             if bad else f"{len(CODE_CHECKS)} code-path checks PASS") + f"; quality: {quality}")


def vae_bf16(vae_dir: str, device_name: str) -> int:
    import torch
    from models.vae import FrozenVAE
    from tests.conftest import smooth_frames
    from utils.video_io import uint8_to_video_tensor
    device = torch.device(device_name)
    clip = uint8_to_video_tensor(smooth_frames(9, 32, 32))[None].to(device)  # (1, 3, T, H, W)
    out = {}
    for dtype in ("fp32", "bf16"):
        vae = FrozenVAE.from_pretrained(vae_dir, device, dtype=dtype)
        with torch.no_grad():
            z = vae.encode(clip, sample=False)  # (1, C, t, h, w) normalised posterior means
            out[dtype] = (z, vae.decode(z))  # (1, 3, T, H, W)
    err_z, err_x = _rel(out["bf16"][0], out["fp32"][0]), _rel(out["bf16"][1], out["fp32"][1])
    return _result(err_z <= BF16_TOL and err_x <= BF16_TOL,
                   f"video VAE bf16 vs fp32: latents {err_z:.1e}, decode {err_x:.1e} (bound {BF16_TOL:g})")


def cache(run: str) -> int:
    manifest = os.path.join(run, "latent_cache", "manifest.json")
    layout = json.load(open(manifest)).get("key", {}).get("layout") if os.path.exists(manifest) else None
    return _result(layout == "window", f"latent cache layout {layout!r} (want 'window': one entry per "
                                       f"window of a causal video VAE) in {manifest}")


def parked(log: str, device_name: str) -> int:
    """On a GPU with every latent cached, the VAE waited in CPU memory (training/stage2.py `park_vae`)."""
    with open(log) as f:
        found = "VAE parked in CPU memory" in f.read()
    ok = found or not device_name.startswith("cuda")
    return _result(ok, f"VAE parked in CPU memory between validations: {found} ({log}, device {device_name})")


def fvd(path: str) -> int:
    record = json.load(open(path))
    value = record.get("fvd")
    ok = isinstance(value, (int, float)) and math.isfinite(value) and value >= 0
    return _result(ok, f"fvd {value} in {path}")


def text(run: str) -> int:
    from utils.checkpoint import load_checkpoint
    ckpt = load_checkpoint(os.path.join(run, "latest.pth"))
    cond = ckpt.get("conditioning") or {}
    text_dim = int(ckpt["model"]["dims"].get("text_dim", 0) or 0)
    fingerprint = (cond.get("text_encoder") or {}).get("fingerprint")
    folders = sorted(glob.glob(os.path.join(run, "samples", "step_*")))
    last = folders[-1] if folders else os.path.join(run, "samples", "(none)")
    videos = len(glob.glob(os.path.join(last, "sample_*.mp4")))
    prompts = os.path.join(last, "prompts.txt")
    lines = open(prompts, encoding="utf-8").read().splitlines() if os.path.isfile(prompts) else []
    ok = cond.get("kind") == "text" and text_dim > 0 and bool(fingerprint) and videos > 0 \
        and len(lines) == videos and all(line.strip() for line in lines)
    return _result(ok, f"conditioning {cond.get('kind')!r}, text_dim {text_dim}, encoder {fingerprint}; "
                       f"{videos} validation videos, {len(lines)} prompts in {prompts}")


def first_frames(path: str, windows: int) -> int:
    r = json.load(open(path)).get("image_to_video") or {}
    psnr, bound = r.get("first_frame_psnr"), r.get("first_frame_psnr_vae_round_trip")
    fvds = r.get("fvd_by_window") or []
    numbers = all(isinstance(v, (int, float)) and math.isfinite(v) for v in [psnr, bound, *fvds])
    ok = numbers and psnr >= bound - FIRST_FRAME_TOL and len(fvds) == windows and min(fvds) >= 0
    show = lambda v: f"{v:.2f}" if isinstance(v, (int, float)) else repr(v)  # noqa: E731
    return _result(bool(ok), f"frame 0 PSNR {show(psnr)} dB vs the image's VAE round trip {show(bound)} dB "
                             f"(at most {FIRST_FRAME_TOL:g} dB below it); FVD by window "
                             f"[{', '.join(map(show, fvds))}] ({windows} wanted)")


def pretrained(run: str, finetune: str, device_name: str) -> int:
    import torch

    from training.checkpoints import model_from_checkpoint, model_dims
    from utils.checkpoint import load_checkpoint
    ckpt = load_checkpoint(os.path.join(run, "latest.pth"))
    family = ckpt["model"].get("family") or {}
    state = ckpt["model_state"]
    lora = [k for k in state if "lora_" in k]
    finite = all(torch.isfinite(v).all() for v in state.values())
    export = os.path.join(run, "export", "pytorch_lora_weights.safetensors" if finetune == "lora" else "transformer")
    if finetune == "lora":
        shape_ok = lora and len(lora) == len(state) and all(state[k].dtype == torch.float32 for k in lora)
    else:
        shape_ok = not lora and len(state) > 0
    device = torch.device(device_name)
    module = model_from_checkpoint(ckpt, True, device, run).float()
    dims = model_dims(ckpt["model"])
    g = torch.Generator().manual_seed(0)
    shape = (2, dims["in_channels"], dims["num_frames"], dims["latent_height"], dims["latent_width"])
    x = torch.randn(shape, generator=g).to(device)
    text = torch.randn(2, ckpt["conditioning"]["text_encoder"]["max_length"], dims["text_dim"], generator=g).to(device)
    t = torch.tensor([300, 700], device=device)
    with torch.no_grad():
        ref = module(x, t, text=text).float()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            low = module(x, t, text=text).float()
    err = _rel(low, ref)
    ok = bool(family.get("fingerprint")) and family.get("finetune") == finetune and shape_ok and finite \
        and os.path.exists(export) and err < BF16_TOL
    return _result(ok, f"{family.get('class_name')} {finetune}: {len(state)} trainable tensors in the checkpoint "
                       f"({len(lora)} LoRA), finite {finite}, base {family.get('fingerprint')}, export "
                       f"{'written' if os.path.exists(export) else 'MISSING'}; bf16 vs fp32 {err:.2e} (< {BF16_TOL:g})")


def make_pretrained(folder: str) -> int:
    from tests.pretrained_fixtures import cogvideox_pipeline, write_pipelines
    written = write_pipelines(folder)
    written["cogvideox_i2v"] = os.path.join(folder, "cogvideox_i2v")
    cogvideox_pipeline(image_to_video=True).save_pretrained(written["cogvideox_i2v"])
    return _result(True, f"tiny Wan, CogVideoX and CogVideoX-I2V pipelines in {', '.join(written.values())}")


def make_video_vae(folder: str) -> int:
    from tests.vae_families import build
    build("wan").save_pretrained(folder)
    return _result(True, f"tiny AutoencoderKLWan in {folder}")


def make_clips(folder: str, count: str) -> int:
    from tests.conftest import smooth_frames
    from utils.video_io import write_video
    for i in range(int(count)):
        write_video(os.path.join(folder, f"clip_{i:03d}.mp4"), smooth_frames(9 + i % 3, 32, 32), fps=8)
    return _result(True, f"{count} clips in {folder}")


def make_detector(path: str) -> int:
    import torch
    from tests.test_evaluate import StandInI3D
    torch.manual_seed(0)
    torch.jit.save(torch.jit.script(StandInI3D()), path)
    return _result(True, f"stand-in I3D TorchScript (random weights: a code-path check, not a real FVD) at {path}")


COMMANDS = {"loss": loss, "val_loss": val_loss, "steps": lambda run, n: steps(run, int(n)), "bench": bench, "agree": agree,
            "fsdp": fsdp, "same_weights": same_weights,
            "diagnose": diagnose, "vae_bf16": vae_bf16, "cache": cache, "parked": parked, "fvd": fvd, "text": text,
            "first_frames": lambda path, n: first_frames(path, int(n)),
            "pretrained": pretrained, "make_pretrained": make_pretrained,
            "make_video_vae": make_video_vae, "make_clips": make_clips, "make_detector": make_detector}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in COMMANDS:
        print(__doc__)
        return 2
    args = [a for a in argv[1:] if a != "--falling"]
    if argv[0] == "loss":
        return loss(args[0], falling="--falling" in argv)
    return COMMANDS[argv[0]](*args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
