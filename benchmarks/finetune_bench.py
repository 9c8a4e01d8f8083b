"""Fine-tuning a pretrained DiT: the repo's step against a bare diffusers + peft loop, and
LoRA against a full fine-tune, measured side by side on this machine.

    python benchmarks/finetune_bench.py [--quick] [--rounds 3] [--steps 40] [--json runs/finetune_bench.json]

A random Wan-architecture transformer (WanTransformer3DModel, 4 blocks of 4 x 32 heads, on
latents (4, 2, 8, 8): 32 tokens per clip, 16 text tokens of 64) is written as a pipeline folder
with a 4-channel Wan VAE and a small UMT5, then trained on the built-in captioned clips at
32 x 32 pixels, batch 4, in four configurations, each in a process of its own (so that peak
RSS is its own), interleaved over `--rounds` rounds (the machine's load moves: the ratios are
taken per round and their median and spread reported):

  repo-lora   train_advanced's stage 2 (model.pretrained, LoRA rank 16 on attention + FFN):
              cached latents and text, the loop with its EMA, logging and checkpoints
  bare-lora   the same transformer with the same adapters (diffusers' add_adapter + peft), the
              same flow-matching loss, AdamW and batch, in a plain loop on batches held in memory
  repo-full   the repo with model.finetune=full
  bare-full   the bare loop training every weight

Per configuration: steps/s over the steps after the first 10 (warm-up), trainable and total
parameters, AdamW state bytes, peak RSS. The overhead ratio is repo / bare steps/s.
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

from utils.checkpoint import write_json  # noqa: E402

WARMUP = 10  # steps left out of the timing
SIZE = dict(heads=4, head_dim=32, layers=4, ffn=512, text_dim=64, text_tokens=16, batch=4, resolution=32,
            frames=5, rank=16)
QUICK = dict(SIZE, heads=2, head_dim=12, layers=2, ffn=32, text_dim=32, batch=2, resolution=16)


def write_pipeline(folder: str, size: dict) -> None:
    """A random Wan pipeline at `size` (transformer, 4-channel VAE, UMT5, UniPC)."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from tests.text_fixtures import unigram_tokenizer
    torch.manual_seed(0)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=size["heads"], attention_head_dim=size["head_dim"],
        in_channels=4, out_channels=4, text_dim=size["text_dim"], freq_dim=64, ffn_dim=size["ffn"],
        num_layers=size["layers"], cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=64)
    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1,
                           temperal_downsample=[True, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4,
                           scale_factor_spatial=4, scale_factor_temporal=4)
    tokenizer = unigram_tokenizer()
    encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), d_model=size["text_dim"], d_kv=8, d_ff=64,
                                          num_layers=2, num_heads=4, pad_token_id=tokenizer.pad_token_id,
                                          eos_token_id=tokenizer.eos_token_id))
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    WanPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=vae, transformer=transformer,
                scheduler=scheduler).save_pretrained(folder)


def _overrides(folder: str, size: dict, finetune: str, steps: int, runs: str) -> list[str]:
    return ["device=cpu", f"model.pretrained={folder}", f"model.finetune={finetune}", f"model.lora.rank={size['rank']}",
            f"model.lora.alpha={size['rank']}", "data.path=builtin:moving_shapes", "data.captions=null",
            "data.builtin.captions=true", f"data.resolution={size['resolution']}", f"data.num_frames={size['frames']}",
            "data.builtin.num_clips=64", "data.window_stride=8", "data.num_workers=0", "vae.tiling=false",
            f"train.batch_size={size['batch']}", f"train.max_steps={steps}", "train.log_every=5",
            "train.checkpoint_every=100000", "train.activation_checkpointing=false", "train.ema_decay=0.99",
            "validation.every_epochs=0", f"text_encoder.max_length={size['text_tokens']}",
            f"experiment.runs_dir={runs}", "experiment.name=run", "train.warmup_steps=0"]


def run_repo(folder: str, size: dict, finetune: str, steps: int) -> dict:
    """train_advanced's stage 2, timed from its own loop (the log steps' clock)."""
    import training.stage2 as stage2
    from utils.config import TrainRunConfig, load_config
    from utils.dist import DistInfo
    from utils.logging import RunLogger
    stamps = []
    original = stage2._log_step
    stage2._log_step = lambda s, stats, bar: (stamps.append((s.pos.step, time.perf_counter())),
                                              original(s, stats, bar))
    with tempfile.TemporaryDirectory() as runs:
        cfg = load_config(TrainRunConfig, os.path.join(ROOT, "config_finetune.yaml"),
                          _overrides(folder, size, finetune, steps, runs))
        s = stage2.setup(cfg, os.path.join(runs, "run"), DistInfo(), torch.device("cpu"), torch.float32,
                         RunLogger(None), None)
        stage2.train(s)
        timed = [(k, t) for k, t in stamps if k >= WARMUP]
        (k0, t0), (k1, t1) = timed[0], timed[-1]
        return _summary(s.model, s.optimizer, (k1 - k0) / (t1 - t0))


def run_bare(folder: str, size: dict, finetune: str, steps: int) -> dict:
    """The same transformer, adapters, loss, optimizer and batch in a plain loop: what a bare
    diffusers + peft script does per step, with its batches already in memory."""
    from diffusers import WanTransformer3DModel
    from peft import LoraConfig
    torch.manual_seed(0)
    model = WanTransformer3DModel.from_pretrained(os.path.join(folder, "transformer"))
    if finetune == "lora":
        model.requires_grad_(False)
        model.add_adapter(LoraConfig(r=size["rank"], lora_alpha=size["rank"], init_lora_weights=True,
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj",
                                                     "ffn.net.2"]))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)  # torch's default, as a plain script has it
    latent = size["resolution"] // 4
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(size["batch"], 4, 2, latent, latent, generator=g)
    text = torch.randn(size["batch"], size["text_tokens"], size["text_dim"], generator=g)
    t0 = None
    for step in range(steps):
        if step == WARMUP:
            t0 = time.perf_counter()
        noise = torch.randn(x0.shape, generator=g)
        s = torch.rand(size["batch"], generator=g)
        s = 3.0 * s / (1 + 2.0 * s)  # the folder's flow shift
        x_t = (1 - s.view(-1, 1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1, 1) * noise
        pred = model(hidden_states=x_t, timestep=s * 1000, encoder_hidden_states=text, return_dict=False)[0]
        loss = (pred.float() - (noise - x0)).square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
    return _summary(model, optimizer, (steps - WARMUP) / (time.perf_counter() - t0))


def _summary(model, optimizer, steps_per_s: float) -> dict:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    optim = sum(v.numel() * v.element_size() for st in optimizer.state.values() for v in st.values()
                if isinstance(v, torch.Tensor))
    return {"steps_per_s": steps_per_s, "trainable": trainable, "total": total, "optimizer_bytes": optim,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def child(kind: str, folder: str, size: dict, steps: int) -> None:
    who, finetune = kind.split("-")
    result = (run_repo if who == "repo" else run_bare)(folder, size, finetune, steps)
    print("RESULT " + json.dumps(result), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes: checks the script, measures nothing")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    size = QUICK if args.quick else SIZE
    steps = max(args.steps, WARMUP + 10)
    if args.child:
        child(args.child, args.folder, size, steps)
        return 0
    kinds = ["repo-lora", "bare-lora", "repo-full", "bare-full"]
    results: dict[str, list[dict]] = {k: [] for k in kinds}
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "wan")
        write_pipeline(folder, size)
        for r in range(args.rounds):
            for kind in kinds:
                cmd = [sys.executable, os.path.abspath(__file__), "--child", kind, "--folder", folder,
                       "--steps", str(steps)] + (["--quick"] if args.quick else [])
                proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
                line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
                if proc.returncode != 0 or not line:
                    print(proc.stderr[-3000:], file=sys.stderr)
                    return 1
                results[kind].append(json.loads(line[0][7:]))
                print(f"round {r + 1} {kind}: {results[kind][-1]['steps_per_s']:.2f} steps/s", flush=True)
    report = {"size": size, "steps": steps, "rounds": args.rounds, "runs": results, "threads": torch.get_num_threads()}
    for ft in ("lora", "full"):
        ratios = [a["steps_per_s"] / b["steps_per_s"] for a, b in zip(results[f"repo-{ft}"], results[f"bare-{ft}"])]
        report[f"overhead_{ft}"] = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}
    _print(report)
    if args.json:
        write_json(report, args.json)
    return 0


def _print(r: dict) -> None:
    print(f"\ntiny Wan {r['size']}, {r['steps']} steps ({WARMUP} warm-up), {r['rounds']} rounds, "
          f"{r['threads']} threads")
    print(f"{'':<11}{'steps/s (median)':>18}{'trainable':>12}{'total':>10}{'AdamW MB':>10}{'peak RSS MB':>13}")
    for kind, runs in r["runs"].items():
        last = runs[-1]
        print(f"{kind:<11}{statistics.median(x['steps_per_s'] for x in runs):>18.2f}{last['trainable']:>12,}"
              f"{last['total']:>10,}{last['optimizer_bytes'] / 2 ** 20:>10.2f}"
              f"{statistics.median(x['peak_rss_mb'] for x in runs):>13.0f}")
    for ft in ("lora", "full"):
        o = r[f"overhead_{ft}"]
        print(f"repo / bare steps/s, {ft}: median {o['median']:.3f} (min {o['min']:.3f}, max {o['max']:.3f})")


if __name__ == "__main__":
    sys.exit(main())
