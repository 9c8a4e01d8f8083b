"""Read frames from videos and frame folders; write mp4 / gif; tensor <-> uint8 frames.

Layouts: frames on disk and in numpy are `(T, H, W, 3)` uint8 RGB; pixel tensors are
`(3, T, H, W)` float in [-1, 1] (the repo's layout, see STYLE.md rule 4).

Backends (DESIGN.md, "Video IO"):
- mp4/mov/mkv are written by imageio v3 with the PyAV plugin (libx264, yuv420p).
- Reading and counting use PyAV (`av`, the library under imageio's plugin) directly:
  imageio's reader converts every decoded frame to RGB, we convert only the frames a window
  needs and stop decoding after the last one.
- GIFs are written by PyAV as `pal8` with one adaptive palette per video (computed with
  pillow). PyAV's fixed `rgb8` palette costs ~15 dB on smooth content, and pillow's own GIF
  writer merges identical consecutive frames, which changes the frame count.
- png/jpg frames are read with pillow.
"""
from __future__ import annotations

import io
import os
import re
from typing import Optional, Sequence

import av
import imageio.v3 as iio
import numpy as np
import torch
from einops import rearrange
from PIL import Image

from utils.errors import UserError

VIDEO_EXTS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".gif")
FRAME_EXTS = (".png", ".jpg", ".jpeg")
H264_EXTS = (".mp4", ".mov", ".mkv")  # containers write_video fills with libx264
# Containers whose frame count in the header is an exact sample table (mp4/mov `stts`).
# Everything else (mkv/webm: no count; avi/gif: counts that can be off) is decoded to count.
EXACT_COUNT_FORMATS = ("mov", "mp4")
GIF_PALETTE_PIXELS = 1 << 18  # pixels sampled (from all frames) to build a GIF palette
_NUMBER = re.compile(r"(\d+)(?!.*\d)")  # the last run of digits in a name


class VideoReadError(UserError):
    """A file that cannot be used as a clip; the message names the file and the reason."""


# --------------------------------------------------------------------------- frame folders


def frame_number(name: str) -> Optional[int]:
    """The last number in a file name without its extension: 'clip3_frame_012.png' -> 12."""
    match = _NUMBER.search(os.path.splitext(os.path.basename(name))[0])
    return int(match.group(1)) if match else None


def list_frame_files(folder: str) -> list[str]:
    """Paths of the numbered png/jpg files in `folder` (not recursive), sorted by number.

    Sorting is numeric, so frame_2 comes before frame_10 with or without zero padding.
    Images without a number in their name are not frames and are left out.
    """
    names = [e.name for e in os.scandir(folder)
             if e.is_file() and e.name.lower().endswith(FRAME_EXTS) and not e.name.startswith(".")
             and frame_number(e.name) is not None]
    names.sort(key=lambda n: (frame_number(n), n))
    return [os.path.join(folder, n) for n in names]


def frame_number_gaps(files: Sequence[str]) -> list[tuple[int, int]]:
    """Missing runs `(first, last)` in the numbering of sorted frame files."""
    numbers = [frame_number(f) for f in files]
    return [(a + 1, b - 1) for a, b in zip(numbers, numbers[1:]) if b > a + 1]


def _read_image(path: str) -> np.ndarray:
    """One png/jpg as (H, W, 3) uint8 RGB; gray, palette, RGBA and 16-bit are converted."""
    try:
        with Image.open(path) as img:
            if img.mode.startswith("I;16"):  # 16-bit gray: keep the top 8 bits
                gray = (np.asarray(img, dtype=np.uint16) >> 8).astype(np.uint8)  # (H, W)
                return np.repeat(gray[..., None], 3, axis=-1)
            return np.asarray(img.convert("RGB"))
    except OSError as e:  # PIL.UnidentifiedImageError is an OSError
        raise VideoReadError(f"{path}: not a readable image ({e})") from None


def _read_folder_frames(folder: str, indices: Sequence[int]) -> np.ndarray:
    files = list_frame_files(folder)
    if max(indices) >= len(files):
        raise VideoReadError(f"{folder}: has {len(files)} frames, frame {max(indices)} was asked "
                             "for (did the folder change after the dataset was indexed?)")
    frames = [_read_image(files[i]) for i in indices]
    if len({f.shape for f in frames}) > 1:
        raise VideoReadError(f"{folder}: frames differ in size {sorted({f.shape for f in frames})}")
    return np.stack(frames)  # (N, H, W, 3)


# --------------------------------------------------------------------------- reading videos


def _open_video(path: str) -> av.container.InputContainer:
    if not os.path.isfile(path):
        raise VideoReadError(f"{path}: file not found")
    if os.path.getsize(path) == 0:
        raise VideoReadError(f"{path}: empty file (0 bytes)")
    try:
        container = av.open(path)
    except av.FFmpegError as e:
        raise VideoReadError(f"{path}: not a readable video ({e.strerror or e})") from None
    if not container.streams.video:
        container.close()
        raise VideoReadError(f"{path}: has no video stream")
    return container


def _decode(container: av.container.InputContainer, path: str):
    """Decoded frames of the first video stream; decoder errors name the file."""
    try:
        yield from container.decode(container.streams.video[0])
    except av.FFmpegError as e:
        raise VideoReadError(f"{path}: decoding failed ({e.strerror or e})") from None


def _header_frame_count(container: av.container.InputContainer) -> Optional[int]:
    """Frame count from an mp4/mov header if it agrees with duration * frame rate, else None."""
    stream = container.streams.video[0]
    if not any(f in container.format.name.split(",") for f in EXACT_COUNT_FORMATS):
        return None
    if stream.frames <= 0 or not stream.average_rate:
        return None
    if stream.duration is not None:
        seconds = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        seconds = container.duration / av.time_base
    else:
        return None
    estimate = seconds * float(stream.average_rate)
    return stream.frames if abs(estimate - stream.frames) <= max(1.5, 0.02 * stream.frames) else None


def count_frames(path: str) -> int:
    """Number of frames of a video file or a frame folder.

    mp4/mov: the header's sample count (checked against duration * fps), after decoding the
    first frame to make sure the file decodes at all. Other containers: decode to count
    (no RGB conversion). Raises `VideoReadError` for files that are not usable videos.
    """
    if os.path.isdir(path):
        return len(list_frame_files(path))
    with _open_video(path) as container:
        n = _header_frame_count(container)
        if n is not None and (found := _packet_count(container)) < n:
            raise VideoReadError(f"{path}: truncated: its header promises {n} frames but the file "
                                 f"holds {max(found, 0)} (re-download or re-encode it)")
        if n is not None:
            container.seek(0)  # back to the start, to prove the first frame decodes
        if n is None:  # every frame gets decoded: let FFmpeg use threads
            container.streams.video[0].thread_type = "AUTO"
        frames = _decode(container, path)
        if next(frames, None) is None:
            raise VideoReadError(f"{path}: no decodable frames")
        if n is None:
            n = 1 + sum(1 for _ in frames)
        frames.close()
        return n


def _packet_count(container) -> int:
    """Video packets with data (no decoding: cheap), one per frame in mp4/mov."""
    try:
        return sum(1 for p in container.demux(container.streams.video[0]) if p.size)
    except av.error.FFmpegError:
        return -1  # damaged past the header: decoding decides


def read_frames(path: str, indices: Sequence[int]) -> np.ndarray:
    """Frames `indices` (any order, repeats allowed) of a video or frame folder: (N, H, W, 3) uint8.

    Videos are decoded sequentially from the start and decoding stops after the last needed
    frame; only the needed frames are converted to RGB.
    """
    if len(indices) == 0 or min(indices) < 0:
        raise ValueError(f"indices must be non-empty and >= 0, got {list(indices)}")
    if os.path.isdir(path):
        return _read_folder_frames(path, indices)
    wanted, last = set(indices), max(indices)
    found: dict[int, np.ndarray] = {}
    decoded = 0
    with _open_video(path) as container:
        for frame in _decode(container, path):
            if decoded in wanted:
                found[decoded] = frame.to_ndarray(format="rgb24")  # (H, W, 3)
            decoded += 1
            if decoded > last:
                break
    if last not in found:
        raise VideoReadError(f"{path}: only {decoded} frames decode, frame {last} was asked for "
                             "(re-encode the file, e.g. ffmpeg -i in.mp4 out.mp4)")
    return np.stack([found[i] for i in indices])  # (N, H, W, 3)


# --------------------------------------------------------------------------- writing


def _check_frames(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise ValueError(f"frames must be (T, H, W, 3) uint8 with T >= 1, "
                         f"got {frames.shape} {frames.dtype}")
    return frames


def _make_parent(path: str) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write {path}: cannot create its folder ({e.strerror}); "
                        "choose a writable output path") from None
    if not os.access(parent, os.W_OK):
        raise UserError(f"cannot write {path}: folder {parent} is not writable; "
                        "choose a writable output path")


def _pad_even(frames: np.ndarray) -> np.ndarray:
    """yuv420p needs even sides: repeat the last row / column if one is odd."""
    t, h, w, _ = frames.shape
    return np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")


def _gif_palette(frames: np.ndarray) -> Image.Image:
    """One adaptive 256-colour palette from pixels sampled over all frames."""
    t, h, w, _ = frames.shape
    step = max(1, int(np.ceil(np.sqrt(t * h * w / GIF_PALETTE_PIXELS))))
    sample = frames[:, ::step, ::step]  # (T, h', W', 3)
    strip = Image.fromarray(np.ascontiguousarray(sample.reshape(-1, sample.shape[2], 3)))
    return strip.quantize(colors=256, method=Image.Quantize.MEDIANCUT)


def gif_bytes(frames: np.ndarray, fps: int) -> bytes:
    """An animated, forever-looping GIF of (T, H, W, 3) uint8 frames (one frame per input frame)."""
    frames = _check_frames(frames)
    palette_img = _gif_palette(frames)
    rgb = np.asarray(palette_img.getpalette()[:768], dtype=np.uint8).reshape(-1, 3)  # (P, 3)
    argb = np.zeros((256, 4), dtype=np.uint8)  # PyAV wants (256, 4) ARGB
    argb[:, 0] = 255
    argb[: len(rgb), 1:] = rgb
    buf = io.BytesIO()
    with av.open(buf, "w", format="gif") as container:  # the gif muxer loops forever by default
        stream = container.add_stream("gif", rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "pal8"
        for frame in frames:
            idx = np.asarray(Image.fromarray(frame).quantize(palette=palette_img,
                                                             dither=Image.Dither.NONE))  # (H, W)
            container.mux(stream.encode(av.VideoFrame.from_ndarray((idx, argb), format="pal8")))
        container.mux(stream.encode())
    return buf.getvalue()


def write_video(path: str, frames: np.ndarray, fps: int) -> None:
    """Write (T, H, W, 3) uint8 frames to .mp4/.mov/.mkv (libx264, yuv420p) or .gif.

    Odd heights/widths are padded by one repeated row/column for yuv420p, so such an mp4
    reads back one pixel larger. The file appears atomically (temp file, then rename).
    """
    frames = _check_frames(frames)
    root, ext = os.path.splitext(path)
    ext = ext.lower()
    if ext != ".gif" and ext not in H264_EXTS:
        raise UserError(f"cannot write {path}: use one of {', '.join(H264_EXTS + ('.gif',))}")
    _make_parent(path)
    tmp = f"{root}.tmp{ext}"  # keeps the extension: it picks the container format
    try:
        if ext == ".gif":
            with open(tmp, "wb") as f:
                f.write(gif_bytes(frames, fps))
        else:
            iio.imwrite(tmp, _pad_even(frames), plugin="pyav", codec="libx264", fps=fps,
                        out_pixel_format="yuv420p")
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None


# --------------------------------------------------------------------------- tensors and grids


def video_tensor_to_uint8(video: torch.Tensor) -> np.ndarray:
    """(3, T, H, W) float in [-1, 1] (any device/dtype) -> (T, H, W, 3) uint8."""
    if video.ndim != 4 or video.shape[0] != 3:
        raise ValueError(f"expected a (3, T, H, W) video tensor, got {tuple(video.shape)}")
    x = ((video.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return rearrange(x, "c t h w -> t h w c").numpy()


def uint8_to_video_tensor(frames: np.ndarray) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> (3, T, H, W) float32 in [-1, 1]."""
    x = torch.from_numpy(_check_frames(frames)).float() / 127.5 - 1
    return rearrange(x, "t h w c -> c t h w").contiguous()


def save_grid_png(path: str, videos: list[np.ndarray], max_frames: int = 16,
                  separator: int = 2) -> None:
    """PNG with one row per (T, H, W, 3) uint8 video and one column per frame.

    Videos longer than `max_frames` show `max_frames` evenly spaced frames; shorter rows are
    padded with the separator colour (white). Separators are `separator` pixels wide.
    """
    videos = [_check_frames(v) for v in videos]
    if not videos or len({v.shape[1:] for v in videos}) > 1:
        raise ValueError(f"need >= 1 videos of one frame size, got {[v.shape for v in videos]}")
    h, w = videos[0].shape[1:3]
    cols = min(max_frames, max(len(v) for v in videos))
    grid = np.full((len(videos) * (h + separator) - separator,
                    cols * (w + separator) - separator, 3), 255, dtype=np.uint8)
    for r, video in enumerate(videos):
        keep = np.linspace(0, len(video) - 1, min(cols, len(video))).round().astype(int)
        for c, i in enumerate(keep):
            y, x = r * (h + separator), c * (w + separator)
            grid[y: y + h, x: x + w] = video[i]
    _make_parent(path)
    Image.fromarray(grid).save(path)
