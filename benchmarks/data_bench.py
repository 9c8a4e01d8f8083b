"""The data pipeline on real-footage shapes: decoding speed, long clips, large folders.

    python benchmarks/data_bench.py [--files 10000] [--quick] [--json runs/data_bench.json]

Rows, all measured in one run, each as a ratio against its reference:
- pipeline vs raw PyAV: frames/s of the dataset's items (seek, decode, RGB, crop, resize,
  float) over every window of a clip, against PyAV decoding the same frames to RGB, front
  to back, in the same process;
- first vs last window: read time of the first and the last window of a long clip (3000
  frames, small), median of repeats after one warm-up read (the file's timeline is demuxed
  once per process);
- stage 2 without the latent cache on that 3000-frame clip against a 300-frame one (the same
  encoding), steps/s (random windows over the whole clip, VAE encode every step);
- index time for N files (copies of one tiny clip, distinct files): cold (nothing known,
  probed in `data.index_workers` processes) and warm (a new process: the saved index only).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import av  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

LONG, SHORT = 3000, 300  # frames of the long and the short clip
SIZE = (72, 128)  # clip height, width (16:9, small)
GOP = 30  # keyframe every second at 30 fps: a common camera / ffmpeg setting
WINDOW = 8  # frames per window


def write_clip(path: str, frames: int, gop: int = GOP, size=SIZE) -> None:
    """A smooth moving gradient, libx264 yuv420p at 30 fps with a keyframe every `gop` frames."""
    from tests.conftest import smooth_frames
    h, w = size
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.height, stream.width, stream.pix_fmt = h, w, "yuv420p"
        stream.codec_context.gop_size = gop
        stream.options = {"preset": "veryfast"}
        for start in range(0, frames, 100):
            for pixels in smooth_frames(min(100, frames - start), h, w):
                container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())


def quiet_folder(cfg):
    from data.videos import DataWarning, VideoFolder
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        return VideoFolder(cfg)


def data_cfg(path: str, **kw):
    from utils.config import DataConfig
    return DataConfig(path=path, num_frames=WINDOW, resolution=64, window_stride=WINDOW,
                      val_fraction=0.0, **kw)


def pipeline_vs_raw(folder: str) -> dict:
    """Frames/s of every window through the dataset vs PyAV decoding those frames."""
    ds = quiet_folder(data_cfg(folder))
    t0 = time.perf_counter()
    for i in range(len(ds)):
        ds[i]
    pipeline = len(ds) * WINDOW / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    n = 0
    with av.open(ds.sources[0][0]) as container:
        for frame in container.decode(video=0):
            frame.to_ndarray(format="rgb24")  # (H, W, 3), as the pipeline converts it
            n += 1
    raw = n / (time.perf_counter() - t0)
    return {"frames": len(ds) * WINDOW, "pipeline_fps": pipeline, "raw_pyav_fps": raw,
            "ratio": pipeline / raw}


def first_vs_last(path: str, frames: int, repeats: int) -> dict:
    from utils.video_io import read_frames
    first, last = list(range(WINDOW)), list(range(frames - WINDOW, frames))
    read_frames(path, first)  # warm-up: the timeline is demuxed once per process

    def timed(indices):
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            read_frames(path, indices)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)
    a, b = timed(first), timed(last)
    return {"first_s": a, "last_s": b, "ratio": b / a}


def stage2_steps_per_s(clip_folders: dict, steps: int) -> dict:
    """Stage 2, latent cache off, on each one-clip folder: {name: steps/s}, and the ratio."""
    from diffusers import AutoencoderKL

    from training.stage2 import setup, train
    from utils.config import TrainRunConfig, load_config
    from utils.dist import DistInfo
    from utils.logging import RunLogger
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                      block_out_channels=(16, 16, 16), layers_per_block=1, latent_channels=4,
                      norm_num_groups=8, scaling_factor=1.0).save_pretrained(os.path.join(tmp, "vae"))
        for name, folder in clip_folders.items():
            cfg = load_config(TrainRunConfig, os.path.join(ROOT, "config_advanced.yaml"), [
                f"vae.path={tmp}/vae", f"data.path={folder}", "data.cache=off", "data.val_fraction=0.0",
                f"data.num_frames={WINDOW}", "data.resolution=32", "data.window_stride=1",
                "model.class_conditional=false", f"train.max_steps={steps}", "train.time_limit_minutes=null",
                "validation.every_epochs=0", "validation.loss_clips=0", "device=cpu", "train.resume=null"])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                s = setup(cfg, os.path.join(tmp, f"run_{name}"), DistInfo(), torch.device("cpu"),
                          torch.float32, RunLogger(None), None)
            t0 = time.perf_counter()
            train(s)
            out[name] = steps / (time.perf_counter() - t0)
    return out


def index_times(n: int, workers) -> dict:
    """Seconds to index n tiny clips: cold (probing) and warm (the saved index, a new process)."""
    from data import source_index
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "clips")
        os.makedirs(os.path.join(folder, "sub0"))
        one = os.path.join(tmp, "one.mp4")
        write_clip(one, 16, size=(32, 32))
        for i in range(n):  # 100 per subfolder, as datasets ship them
            sub = os.path.join(folder, f"sub{i // 100}")
            os.makedirs(sub, exist_ok=True)
            shutil.copyfile(one, os.path.join(sub, f"clip{i:05d}.mp4"))
        cfg = data_cfg(folder, index_cache=os.path.join(tmp, "index.json"), index_workers=workers)
        source_index._MEMO.clear()
        t0 = time.perf_counter()
        ds = quiet_folder(cfg)
        cold = time.perf_counter() - t0
        assert len(ds.sources) == n
        source_index._MEMO.clear()  # what a new process knows: the saved file only
        t0 = time.perf_counter()
        quiet_folder(cfg)
        warm = time.perf_counter() - t0
    return {"files": n, "workers": workers or os.cpu_count(), "cold_s": cold, "warm_s": warm}


def run(files: int, quick: bool) -> dict:
    lengths = {"long": LONG // 5, "short": SHORT // 5} if quick else {"long": LONG, "short": SHORT}
    out = {"load_average": os.getloadavg()[0], "cpus": os.cpu_count(),
           "clip": {**lengths, "size": list(SIZE), "gop": GOP}}
    with tempfile.TemporaryDirectory() as tmp:
        folders = {}
        for name, frames in lengths.items():
            folders[name] = os.path.join(tmp, name)
            os.makedirs(folders[name])
            write_clip(os.path.join(folders[name], f"{name}.mp4"), frames)
        out["pipeline_vs_raw"] = pipeline_vs_raw(folders["short"])
        out["first_vs_last"] = first_vs_last(os.path.join(folders["long"], "long.mp4"),
                                             lengths["long"], repeats=5 if quick else 20)
        rates = stage2_steps_per_s(folders, steps=5 if quick else 40)
        out["stage2_no_cache"] = {"long_steps_per_s": rates["long"], "short_steps_per_s": rates["short"],
                                  "ratio": rates["short"] / rates["long"]}
    out["index"] = index_times(files, None)
    out["load_average_end"] = os.getloadavg()[0]
    return out


def print_rows(r: dict) -> None:
    c = r["clip"]
    p, f, s, i = r["pipeline_vs_raw"], r["first_vs_last"], r["stage2_no_cache"], r["index"]
    print(f"clips: {c['size'][0]}x{c['size'][1]} libx264, keyframe every {c['gop']} frames; "
          f"load average {r['load_average']:.1f} -> {r['load_average_end']:.1f} on {r['cpus']} CPUs")
    print(f"pipeline vs raw PyAV:    {p['pipeline_fps']:.0f} vs {p['raw_pyav_fps']:.0f} frames/s "
          f"({p['frames']} frames)  ratio {p['ratio']:.2f}")
    print(f"first vs last window:    {f['first_s'] * 1e3:.1f} vs {f['last_s'] * 1e3:.1f} ms "
          f"({c['long']}-frame clip)  last/first {f['ratio']:.2f} (target <= 2)")
    print(f"stage 2 without cache:   {s['short_steps_per_s']:.2f} steps/s on {c['short']} frames, "
          f"{s['long_steps_per_s']:.2f} on {c['long']}  short/long {s['ratio']:.2f} (target <= 1.5)")
    print(f"index {i['files']} files:       cold {i['cold_s']:.1f} s ({i['workers']} workers), "
          f"warm {i['warm_s']:.2f} s  cold/warm {i['cold_s'] / i['warm_s']:.0f}x "
          "(targets: 10000 cold < 60 s, warm < 5 s)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--files", type=int, default=1000, help="clips to index (the target is stated for 10000)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks the script, not the machine")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    r = run(args.files, args.quick)
    print_rows(r)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(r, f, indent=1)


if __name__ == "__main__":
    main()
