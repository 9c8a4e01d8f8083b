"""The data pipeline on real-footage shapes: decoding speed, long clips, large folders.

    python benchmarks/data_bench.py [--files 10000] [--quick] [--json runs/data_bench.json]

Rows, all measured in one run, each as a ratio against its reference:
- pipeline vs raw PyAV: frames/s of the dataset's items (seek, decode, RGB, crop, resize,
  float; one torch thread, as in a DataLoader worker) over every window of a clip, against
  PyAV decoding the same frames to RGB, front to back, in the same process;
- first vs last window: read time of the first and the last window of a long clip (3000
  frames, small, a keyframe every 30), median of repeats after one warm-up read (the file's
  timeline is demuxed once per process); and with a keyframe every 250 frames, the mean over
  windows spread across the first vs the last keyframe interval (a window decodes from its
  keyframe: up to 250 frames, wherever it is);
- random windows of the 3000-frame clip against a 300-frame one (the same encoding): mean
  read time, interleaved;
- stage 2 without the latent cache on that 3000-frame clip against the 300-frame one, steps/s (random windows over the whole clip, VAE encode every step), the best
  of two runs each, alternating;
- index time for N files (copies of one tiny clip, distinct files): cold (nothing known,
  probed in `data.index_workers` processes) and warm (a new process: the saved index only).
"""
from __future__ import annotations

import argparse
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

from utils.checkpoint import write_json  # noqa: E402
from utils.paths import check_output_file  # noqa: E402

LONG, SHORT = 3000, 300  # frames of the long and the short clip
SIZE = (72, 128)  # clip height, width (16:9, small)
GOP = 30  # keyframe every second at 30 fps: common for cameras and phones
LONG_GOP = 250  # libx264's default keyframe interval
WINDOW = 8  # frames per window


def write_clip(path: str, frames: int, gop: int = GOP, size=SIZE) -> None:
    """A smooth moving gradient, libx264 yuv420p at 30 fps with a keyframe every `gop` frames
    (and no others: scene-cut detection off)."""
    h, w = size
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.height, stream.width, stream.pix_fmt = h, w, "yuv420p"
        stream.codec_context.gop_size = gop
        stream.options = {"preset": "veryfast", "x264-params": "scenecut=0"}
        for i in range(frames):
            rgb = np.stack([np.sin(3 * x + 0.05 * i), np.cos(2 * y - 0.03 * i), np.sin(2 * (x + y))], -1)
            pixels = ((rgb + 1) * 127.5).round().astype(np.uint8)  # (h, w, 3)
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
    ds[0]  # warm-up: the file's timeline, torch's first interpolate
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker
    t0 = time.perf_counter()
    for i in range(len(ds)):
        ds[i]
    pipeline = len(ds) * WINDOW / (time.perf_counter() - t0)
    torch.set_num_threads(threads)
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

    times: dict[int, list[float]] = {0: [], 1: []}
    for _ in range(repeats):  # interleaved, so load changes hit both
        for k, indices in enumerate((first, last)):
            t0 = time.perf_counter()
            read_frames(path, indices)
            times[k].append(time.perf_counter() - t0)
    a, b = statistics.median(times[0]), statistics.median(times[1])
    return {"first_s": a, "last_s": b, "ratio": b / a}


def random_windows(paths: dict, reads: int) -> dict:
    """Mean read time of random windows of each clip ({name: path}), interleaved."""
    from utils.video_io import probe_video, read_frames
    lengths = {name: probe_video(p).frames for name, p in paths.items()}
    rng = np.random.default_rng(0)
    spent = dict.fromkeys(paths, 0.0)
    for _ in range(reads):
        for name, path in paths.items():
            start = int(rng.integers(0, lengths[name] - WINDOW + 1))
            t0 = time.perf_counter()
            read_frames(path, list(range(start, start + WINDOW)))
            spent[name] += time.perf_counter() - t0
    means = {name: s / reads for name, s in spent.items()}
    return {"long_s": means["long"], "short_s": means["short"], "ratio": means["long"] / means["short"]}


def start_vs_end_long_gop(path: str, frames: int, gop: int) -> dict:
    """Mean read time of windows spread over the first vs the last `gop` frames of a clip
    whose keyframes are `gop` apart: each window decodes from its keyframe, wherever it is."""
    from utils.video_io import read_frames
    read_frames(path, list(range(WINDOW)))  # warm-up

    def mean_read(first: int) -> float:
        starts = np.linspace(first, first + gop - WINDOW, 8).round().astype(int)
        t0 = time.perf_counter()
        for start in starts:
            read_frames(path, list(range(start, start + WINDOW)))
        return (time.perf_counter() - t0) / len(starts)
    last_gop = (frames - 1) // gop * gop - gop  # the last full keyframe interval
    a, b = mean_read(0), mean_read(last_gop)
    return {"gop": gop, "start_s": a, "end_s": b, "ratio": b / a}


def stage2_steps_per_s(clip_folders: dict, steps: int, rounds: int = 2) -> dict:
    """Stage 2, latent cache off, on each one-clip folder: {name: best steps/s}. The runs
    alternate (A B B A ...), so a change in machine load hits both."""
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
        names = list(clip_folders)
        order = [n for r in range(rounds) for n in (names if r % 2 == 0 else names[::-1])]
        for k, name in enumerate(order):
            folder = clip_folders[name]
            cfg = load_config(TrainRunConfig, os.path.join(ROOT, "config_advanced.yaml"), [
                f"vae.path={tmp}/vae", f"data.path={folder}", "data.cache=off", "data.val_fraction=0.0",
                f"data.num_frames={WINDOW}", "data.resolution=32", "data.window_stride=1",
                "model.conditioning=none", f"train.max_steps={steps}", "train.time_limit_minutes=null",
                "validation.every_epochs=0", "validation.loss_clips=0", "device=cpu", "train.resume=null"])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                s = setup(cfg, os.path.join(tmp, f"run_{k}"), DistInfo(), torch.device("cpu"),
                          torch.float32, RunLogger(None), None)
            t0 = time.perf_counter()
            train(s)
            out[name] = max(out.get(name, 0.0), steps / (time.perf_counter() - t0))
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
        out["random_windows"] = random_windows(
            {name: os.path.join(folders[name], f"{name}.mp4") for name in lengths}, 20 if quick else 150)
        long_gop = os.path.join(tmp, "long_gop.mp4")
        write_clip(long_gop, lengths["long"], gop=LONG_GOP)
        out["long_gop"] = start_vs_end_long_gop(long_gop, lengths["long"], LONG_GOP)
        rates = stage2_steps_per_s(folders, steps=3 if quick else 20, rounds=1 if quick else 2)
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
    w = r["random_windows"]
    print(f"random windows:          {w['short_s'] * 1e3:.1f} ms per read on {c['short']} frames, "
          f"{w['long_s'] * 1e3:.1f} on {c['long']}  long/short {w['ratio']:.2f}")
    g = r["long_gop"]
    print(f"keyframe every {g['gop']}:     mean window read {g['start_s'] * 1e3:.1f} ms over the first "
          f"{g['gop']} frames vs {g['end_s'] * 1e3:.1f} over the last  end/start {g['ratio']:.2f}")
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
    if args.json:
        check_output_file(args.json, "--json")  # before the measurements, not after them
    r = run(args.files, args.quick)
    print_rows(r)
    if args.json:
        write_json(r, args.json)


if __name__ == "__main__":
    from utils.cli import run_main
    run_main(lambda argv: main())
