"""Read frames from videos and frame folders; write mp4 / gif; tensor <-> uint8 frames.

Layouts: frames on disk and in numpy are `(T, H, W, 3)` uint8 RGB; pixel tensors are
`(3, T, H, W)` float in [-1, 1] (the repo's layout, see STYLE.md rule 4).

Backends (DESIGN.md, "Video IO"):
- mp4/mov/mkv are written by PyAV (`av`, the library under imageio's pyav plugin; libx264,
  yuv420p), encoded in memory: the plugin's close runs a full garbage collection per file.
- Reading and counting use PyAV directly:
  imageio's reader converts every decoded frame to RGB, we convert only the frames a window
  needs, seek to the keyframe before the first one (its cost does not grow with its position
  in the clip) and stop decoding after the last one. Any pixel format FFmpeg decodes works
  (10-bit, 4:4:4, gray); a display rotation (phone video) is applied.
- Indexing (`probe_video`) reads the frame count from an mp4/mov header or by decoding, and
  the timestamps from the packets, so clips can be resampled at a frame rate by time.
- GIFs are written by PyAV as `pal8` with one adaptive palette per video (computed with
  pillow). PyAV's fixed `rgb8` palette costs ~15 dB on smooth content, and pillow's own GIF
  writer merges identical consecutive frames, which changes the frame count. A GIF's delays are whole
  1/100 s: frame i is shown at round(100 i / fps) (`gif_ticks`), so the .gif has the .mp4's
  timestamps within 5 ms and its duration; rates above 100 fps are refused.
- png/jpg frames are read with pillow.
"""
from __future__ import annotations

import contextlib
import io
import math
import os
import re
from fractions import Fraction
from typing import Iterator, NamedTuple, Optional, Sequence

import av
import numpy as np
import torch
from einops import rearrange
from PIL import Image

from utils.config import IMAGE_EXTS
from utils.errors import UserError

VIDEO_EXTS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".gif")
FRAME_EXTS = (".png", ".jpg", ".jpeg")
H264_CONTAINERS = {".mp4": "mp4", ".mov": "mov", ".mkv": "matroska"}  # filled with libx264
H264_EXTS = tuple(H264_CONTAINERS)
# Containers whose frame count in the header is an exact sample table (mp4/mov `stts`).
# Everything else (mkv/webm: no count; avi/gif: counts that can be off) is decoded to count.
EXACT_COUNT_FORMATS = ("mov", "mp4")
GIF_PALETTE_PIXELS = 1 << 18  # pixels sampled (from all frames) to build a GIF palette
GIF_TICKS_PER_SECOND = 100  # GIF frame delays are whole hundredths of a second
GIF_MAX_FPS = 100  # one tick per frame at most: above this two frames share a timestamp
_NUMBER = re.compile(r"(\d+)(?!.*\d)")  # the last run of digits in a name
VFR_TOLERANCE = 0.01  # frame intervals further apart than this fraction: variable frame rate
NO_SEEK_FORMATS = ("gif",)  # GIF frames may only update part of the picture: decode from the start

# Per process, keyed by path: (size, mtime_ns) -> the file's timeline, and a folder's mtime ->
# its frame files. A DataLoader worker demuxes a file once, not once per window.
_TIMELINE_MEMO: dict[str, tuple[tuple[int, int], Optional["_Timeline"]]] = {}
_FOLDER_MEMO: dict[str, tuple[int, list[str]]] = {}


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
    """One png/jpg as (H, W, 3) uint8 RGB, writable (torch.from_numpy warns on read-only
    arrays); gray, palette, RGBA and 16-bit are converted."""
    try:
        with Image.open(path) as img:
            if img.mode.startswith("I;16"):  # 16-bit gray: keep the top 8 bits
                gray = (np.asarray(img, dtype=np.uint16) >> 8).astype(np.uint8)  # (H, W)
                return np.repeat(gray[..., None], 3, axis=-1)
            return np.array(img.convert("RGB"))  # a writable copy (np.asarray's is read-only)
    except OSError as e:  # PIL.UnidentifiedImageError is an OSError
        raise VideoReadError(f"{path}: not a readable image ({e})") from None
    except Image.DecompressionBombError as e:  # the header claims more pixels than PIL will decode
        raise VideoReadError(f"{path}: too large to read ({e}); frames are resized to at most "
                             "8192 pixels a side, so resize the image (e.g. to 4096 pixels a side)") from None


def _frame_files(folder: str) -> list[str]:
    """`list_frame_files`, memoised per folder (keyed by its mtime, which adding or removing a
    file changes): reading a window of a long frame folder must not list it every time."""
    mtime = os.stat(folder).st_mtime_ns
    memo = _FOLDER_MEMO.get(folder)
    if memo is None or memo[0] != mtime:
        memo = _FOLDER_MEMO[folder] = (mtime, list_frame_files(folder))
    return memo[1]


def _iter_folder_frames(folder: str, indices: Sequence[int]) -> Iterator[tuple[int, np.ndarray]]:
    files = _frame_files(folder)
    if indices and indices[-1] >= len(files):
        raise VideoReadError(f"{folder}: has {len(files)} frames, frame {indices[-1]} was asked "
                             "for (did the folder change after the dataset was indexed?)")
    shape = None
    for i in indices:
        frame = _read_image(files[i])
        if shape is not None and frame.shape != shape:
            raise VideoReadError(f"{folder}: frames differ in size ({shape} and {frame.shape})")
        shape = frame.shape
        yield i, frame


# --------------------------------------------------------------------------- reading videos


class VideoInfo(NamedTuple):
    """What indexing learns about a source: its frames, their times and their size."""
    frames: int
    rate: Optional[float]  # average frames per second; None when unknown (e.g. a frame folder)
    times: Optional[list[float]]  # seconds from the first frame, only when unevenly spaced (VFR)
    size: Optional[tuple[int, int]] = None  # (height, width) pixels of a frame as shown (rotation applied)


class _Timeline(NamedTuple):
    """Presentation timestamps of a video stream, from its packets (demuxed, not decoded)."""
    pts: np.ndarray  # (N,) int64 sorted: frame i has pts[i]
    keyframes: np.ndarray  # (K,) int64 sorted pts of the keyframes

    def index(self, pts: Optional[int], default: Optional[int] = None) -> Optional[int]:
        """The frame index of a decoded frame's pts (`default` if the timeline has no such pts)."""
        i = int(np.searchsorted(self.pts, pts)) if pts is not None else len(self.pts)
        return i if i < len(self.pts) and self.pts[i] == pts else default


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


def _rgb(frame: av.VideoFrame) -> np.ndarray:
    """(H, W, 3) uint8 RGB as it is meant to be shown: any pixel format (10-bit, 4:4:4, gray)
    is converted by FFmpeg, and a display rotation (phone video) is applied."""
    rgb = frame.to_ndarray(format="rgb24")  # (H, W, 3)
    quarter_turns = round(frame.rotation / 90) % 4  # counter-clockwise, as np.rot90 turns
    return np.ascontiguousarray(np.rot90(rgb, quarter_turns)) if quarter_turns else rgb


def _shown_size(frame: av.VideoFrame) -> tuple[int, int]:
    """(height, width) of a decoded frame as `_rgb` gives it (a quarter turn swaps them)."""
    turned = round(frame.rotation / 90) % 2
    return (frame.width, frame.height) if turned else (frame.height, frame.width)


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


def _demux_timeline(container: av.container.InputContainer) -> Optional[_Timeline]:
    """Packet timestamps (cheap: no decoding); None when a packet has none or demuxing fails."""
    pts, keys = [], []
    try:
        for packet in container.demux(container.streams.video[0]):
            if not packet.size:
                continue
            if packet.pts is None:
                return None
            pts.append(packet.pts)
            if packet.is_keyframe:
                keys.append(packet.pts)
    except av.FFmpegError:
        return None  # damaged past the header
    return _Timeline(np.sort(np.asarray(pts, dtype=np.int64)), np.sort(np.asarray(keys, dtype=np.int64)))


class _StreamFacts(NamedTuple):
    """What `_info` needs of a stream, copied out while its container is open (a PyAV stream
    read after its container is closed returns garbage: None, or another number)."""
    time_base: Optional[Fraction]  # seconds per timestamp tick
    nominal: tuple[Fraction, ...]  # the rates the container states (average, guessed, base)


def _stream_facts(stream) -> _StreamFacts:
    rates = []
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate and rate > 0 and Fraction(rate) not in rates:
            rates.append(Fraction(rate))
    time_base = Fraction(stream.time_base) if stream.time_base else None
    return _StreamFacts(time_base, tuple(rates))


def _simplest_between(lo: Fraction, hi: Fraction) -> Fraction:
    """The fraction with the smallest denominator in [lo, hi] (0 < lo <= hi), the one nearest
    the middle among those: 8 fps, not 7.98 (continued fractions: O(log) steps)."""
    def smallest(lo: Fraction, hi: Fraction) -> Fraction:  # minimal denominator (Stern-Brocot)
        whole = math.floor(lo)
        if whole == lo or whole + 1 <= hi:
            return Fraction(whole if whole == lo else whole + 1)
        return whole + 1 / smallest(1 / (hi - whole), 1 / (lo - whole))

    q = smallest(lo, hi).denominator
    mid = (lo + hi) / 2
    inside = [Fraction(k, q) for k in (math.floor(mid * q), math.ceil(mid * q)) if lo <= Fraction(k, q) <= hi]
    return min(inside, key=lambda f: abs(f - mid)) if inside else smallest(lo, hi)


def _grid_rate(facts: _StreamFacts, ticks: np.ndarray) -> Optional[float]:
    """The constant frame rate whose grid the timestamps sit on, or None (variable rate).

    `ticks`: (n,) timestamps from the first frame, in time_base units. Exactly even ones give
    their rate as stored (a GIF of 3/100 s per frame: 33.3 fps). Otherwise the frames are on a
    grid of period p ticks when every one is within `tol` of k * p, where `tol` is one tick
    (timestamps are rounded to whole ticks: GIFs count in 1/100 s, mkv in 1 ms) or 1% of a
    frame interval, whichever is larger. The error is measured against the whole grid, not
    frame to frame, so a rate slightly off (8.33 fps for an 8 fps GIF) drifts out of it. Of
    the rates that fit, the simplest fraction is taken: a GIF alternating 13 and 12 ticks is
    8 fps; 24 fps stored as 4 or 5 ticks is 24, not 23.8 (4.2 ticks fits as well). The
    container's own rates are never used here: for a GIF FFmpeg guesses them.
    """
    n = len(ticks)
    span = int(ticks[-1])
    if span <= 0:
        return None
    steps = np.diff(ticks)  # (n - 1,)
    if np.all(steps == steps[0]):  # exactly even: taken literally (a GIF of 3/100 s: 33.3 fps)
        return float(1 / (int(steps[0]) * facts.time_base))
    tol = max(Fraction(1), Fraction(VFR_TOLERANCE).limit_denominator(1000) * Fraction(span, n - 1))
    # feasible periods: for every frame k >= 1, |ticks[k] - k p| <= tol; the binding frames
    # are found in float, their bounds computed exactly
    k = np.arange(1, n)  # (n - 1,)
    rest = ticks[1:].astype(np.float64)
    i_lo, i_hi = int(np.argmax((rest - float(tol)) / k)), int(np.argmin((rest + float(tol)) / k))
    lo = (int(ticks[1 + i_lo]) - tol) / int(k[i_lo])
    hi = (int(ticks[1 + i_hi]) + tol) / int(k[i_hi])
    lo = max(lo, Fraction(span, 2 * (n - 1)))  # a bound for clips of frames one tick apart
    if lo > hi:
        return None
    tb = facts.time_base
    return float(_simplest_between(1 / (hi * tb), 1 / (lo * tb)))


def _info(facts: _StreamFacts, n: int, pts: Optional[np.ndarray]) -> VideoInfo:
    """Rate and, for unevenly spaced frames, times, from the sorted pts of n frames.

    The rate comes from the timestamps whenever there are >= 2 of them: the container's
    stated rate is only a candidate they must confirm (see `_grid_rate`)."""
    stated = float(facts.nominal[0]) if facts.nominal else None
    if pts is None or len(pts) != n or n < 2 or facts.time_base is None:
        return VideoInfo(n, stated, None)
    ticks = pts - pts[0]  # (n,) int64
    rate = _grid_rate(facts, ticks)
    if rate is not None:
        return VideoInfo(n, rate, None)
    times = ticks * float(facts.time_base)  # (n,) seconds
    if times[-1] <= 0 or np.any(np.diff(times) <= 0):
        return VideoInfo(n, stated, None)  # repeated timestamps: no time information
    return VideoInfo(n, (n - 1) / float(times[-1]), [round(float(t), 6) for t in times])


def probe_video(path: str) -> VideoInfo:
    """Frame count, rate and (variable frame rate only) times of a video file.

    mp4/mov: the header's sample count (checked against duration * fps and against the
    packets actually in the file), after decoding the first frame to make sure the file
    decodes at all. Other containers: decode to count (no RGB conversion). Raises
    `VideoReadError` for files that are not usable videos.
    """
    with _open_video(path) as container:
        stream = container.streams.video[0]
        n = _header_frame_count(container)
        if n is not None:
            timeline = _demux_timeline(container)
            found = len(timeline.pts) if timeline is not None else 0
            if found < n:
                raise VideoReadError(f"{path}: truncated: its header promises {n} frames but the file "
                                     f"holds {found} (re-download or re-encode it)")
            container.seek(0)  # back to the start, to prove the first frame decodes
            frames = _decode(container, path)
            first = next(frames, None)
            if first is None:
                raise VideoReadError(f"{path}: no decodable frames")
            frames.close()
            return _info(_stream_facts(stream), n, timeline.pts[:n])._replace(size=_shown_size(first))
        stream.thread_type = "AUTO"  # every frame gets decoded: let FFmpeg use threads
        pts, size = [], None
        for frame in _decode(container, path):
            pts.append(frame.pts)
            size = size or _shown_size(frame)
        facts = _stream_facts(stream)  # now: the stream must not be read once the file is closed
    if not pts:
        raise VideoReadError(f"{path}: no decodable frames")
    known = None if any(p is None for p in pts) else np.asarray(pts, dtype=np.int64)
    return _info(facts, len(pts), known)._replace(size=size)


def image_size(path: str) -> tuple[int, int]:
    """(height, width) of a png/jpg/webp from its header (a frame folder's first frame, a still)."""
    try:
        with Image.open(path) as img:
            return img.height, img.width
    except OSError as e:  # PIL.UnidentifiedImageError is an OSError
        raise VideoReadError(f"{path}: not a readable image ({e})") from None


def is_image_file(path: str) -> bool:
    """A still (png/jpg/webp file), not a video or a frame folder."""
    return path.lower().endswith(IMAGE_EXTS) and not os.path.isdir(path)


# What an index's answers depend on: data/source_index.py fingerprints these functions' code,
# and an index written under other code is probed again.
PROBE_FUNCTIONS = (probe_video, _info, _grid_rate, _simplest_between, _stream_facts,
                   _header_frame_count, _demux_timeline, _open_video, _decode, list_frame_files,
                   frame_number, frame_number_gaps, _shown_size, image_size, is_image_file)


def count_frames(path: str) -> int:
    """Number of frames of a video file or a frame folder (see `probe_video`)."""
    if os.path.isdir(path):
        return len(list_frame_files(path))
    return probe_video(path).frames


def _timeline(path: str, container: av.container.InputContainer) -> Optional[_Timeline]:
    """The file's timeline, demuxed once per process (memo keyed by path, size and mtime)."""
    st = os.stat(path)
    key = (st.st_size, st.st_mtime_ns)
    memo = _TIMELINE_MEMO.get(path)
    if memo is not None and memo[0] == key:
        return memo[1]
    timeline = None
    if container.format.name not in NO_SEEK_FORMATS:
        timeline = _demux_timeline(container)
        container.seek(0)
    _TIMELINE_MEMO[path] = (key, timeline)
    return timeline


def _frames_from(container, path: str, first: int) -> Iterator[tuple[int, av.VideoFrame]]:
    """(frame index, decoded frame) from the keyframe at or before frame `first` on.

    Frames are identified by their timestamps in the file's timeline. When seeking does not
    land where the timeline says (no timestamps, a damaged index, an open GOP), decoding
    restarts from the first frame and frames are counted instead: always right, only slower.
    """
    timeline = _timeline(path, container)
    if timeline is not None and 0 < first < len(timeline.pts):
        target = int(timeline.pts[first])
        keyframe = timeline.keyframes[timeline.keyframes <= target]
        if len(keyframe):
            container.seek(int(keyframe[-1]), stream=container.streams.video[0], backward=True)
            frames = _decode(container, path)
            head = next(frames, None)
            i = timeline.index(head.pts) if head is not None else None
            if i is not None and i <= first:
                yield i, head
                for frame in frames:
                    i = timeline.index(frame.pts, default=i + 1)
                    yield i, frame
                return
            frames.close()
            container.seek(0)
    yield from enumerate(_decode(container, path))


def iter_frames(path: str, indices: Sequence[int]) -> Iterator[tuple[int, np.ndarray]]:
    """(index, (H, W, 3) uint8 RGB, writable) for each of the distinct, increasing frame
    `indices` of a video or frame folder, decoding the file once, front to back.

    Videos seek to the keyframe before the first wanted frame and decode forward, so a
    window's cost does not grow with its position in the clip; only the wanted frames are
    converted to RGB.
    """
    indices = list(indices)
    if any(b <= a for a, b in zip(indices, indices[1:])) or (indices and indices[0] < 0):
        raise ValueError(f"indices must be distinct, increasing and >= 0, got {indices}")
    if not indices:
        return
    if os.path.isdir(path):
        yield from _iter_folder_frames(path, indices)
        return
    if is_image_file(path):  # a still: its one frame
        if indices != [0]:
            raise VideoReadError(f"{path}: a still image has frame 0 only, frames {indices} were asked for")
        yield 0, _read_image(path)
        return
    wanted, last, seen = set(indices), indices[-1], -1
    with _open_video(path) as container:
        for i, frame in _frames_from(container, path, indices[0]):
            seen = i
            if i in wanted:
                yield i, _rgb(frame)
            if i >= last:
                break
    if seen < last:
        raise VideoReadError(f"{path}: only {seen + 1} frames decode, frame {last} was asked for "
                             "(re-encode the file, e.g. ffmpeg -i in.mp4 out.mp4)")


def read_frames(path: str, indices: Sequence[int]) -> np.ndarray:
    """Frames `indices` (any order, repeats allowed) of a video or frame folder: (N, H, W, 3) uint8."""
    if len(indices) == 0 or min(indices) < 0:
        raise ValueError(f"indices must be non-empty and >= 0, got {list(indices)}")
    found = dict(iter_frames(path, sorted(set(indices))))
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


def check_write_fps(fps: float, what: str = "fps") -> None:
    """A rate both the mp4 and the GIF can show: GIF delays are whole hundredths of a second,
    so above GIF_MAX_FPS two frames would share a timestamp."""
    if not 0 < fps <= GIF_MAX_FPS:
        raise UserError(f"{what} = {fps:g} frames per second cannot be written: the .gif beside "
                        f"each .mp4 shows frames in whole 1/{GIF_TICKS_PER_SECOND} s, so at most "
                        f"{GIF_MAX_FPS} fps; choose a rate in (0, {GIF_MAX_FPS}]")


def _rate(fps: float) -> Fraction:
    return Fraction(fps).limit_denominator(1001)  # 29.97 is 2997/100, 30000/1001 stays exact


def gif_ticks(num_frames: int, fps: float) -> list[int]:
    """Presentation time of each frame and the end of the last, in GIF ticks (1/100 s): frame i
    is shown at round(100 * i / fps), so delays alternate where 100 / fps is not whole (12, 13,
    12, 13 at 8 fps) and the GIF keeps the mp4's timestamps within half a tick (5 ms) and its
    duration (num_frames / fps) exactly, up to that rounding."""
    return [int(Fraction(GIF_TICKS_PER_SECOND * i) / _rate(fps) + Fraction(1, 2))
            for i in range(num_frames + 1)]


def _gif_palette(frames: np.ndarray) -> Image.Image:
    """One adaptive 256-colour palette from pixels sampled over all frames."""
    t, h, w, _ = frames.shape
    step = max(1, int(np.ceil(np.sqrt(t * h * w / GIF_PALETTE_PIXELS))))
    sample = frames[:, ::step, ::step]  # (T, h', W', 3)
    strip = Image.fromarray(np.ascontiguousarray(sample.reshape(-1, sample.shape[2], 3)))
    return strip.quantize(colors=256, method=Image.Quantize.MEDIANCUT)


def gif_bytes(frames: np.ndarray, fps: float) -> bytes:
    """An animated, forever-looping GIF of (T, H, W, 3) uint8 frames (one frame per input frame),
    timed by `gif_ticks`: the same timestamps and duration as the mp4 of the same frames."""
    frames = _check_frames(frames)
    check_write_fps(fps)
    ticks = gif_ticks(len(frames), fps)
    palette_img = _gif_palette(frames)
    rgb = np.asarray(palette_img.getpalette()[:768], dtype=np.uint8).reshape(-1, 3)  # (P, 3)
    argb = np.zeros((256, 4), dtype=np.uint8)  # PyAV wants (256, 4) ARGB
    argb[:, 0] = 255
    argb[: len(rgb), 1:] = rgb
    tick = Fraction(1, GIF_TICKS_PER_SECOND)
    buf = io.BytesIO()
    # The gif muxer loops forever by default; final_delay: how long the last frame stays.
    with av.open(buf, "w", format="gif", options={"final_delay": str(ticks[-1] - ticks[-2])}) as container:
        stream = container.add_stream("gif", rate=_rate(fps))
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "pal8"
        stream.codec_context.time_base = tick
        for frame, pts in zip(frames, ticks):
            idx = np.asarray(Image.fromarray(frame).quantize(palette=palette_img,
                                                             dither=Image.Dither.NONE))  # (H, W)
            packed = av.VideoFrame.from_ndarray((idx, argb), format="pal8")
            packed.pts, packed.time_base = pts, tick
            container.mux(stream.encode(packed))
        container.mux(stream.encode())
    return buf.getvalue()


def h264_bytes(frames: np.ndarray, fps: float, container_format: str = "mp4") -> bytes:
    """(T, H, W, 3) uint8 frames as an h264 (libx264, yuv420p) `container_format` file in memory.

    PyAV directly, not imageio's pyav plugin: the plugin runs a full `gc.collect()` when it
    closes a file (twice per file), which in a process holding torch cost ~0.35 s per video,
    95% of predict's time on small videos (measured with cProfile)."""
    frames = _pad_even(_check_frames(frames))
    rate = _rate(fps)
    buf = io.BytesIO()
    with av.open(buf, "w", format=container_format) as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        stream.codec_context.time_base = 1 / rate
        for i, frame in enumerate(frames):
            packed = av.VideoFrame.from_ndarray(frame, format="rgb24")
            packed.pts, packed.time_base = i, 1 / rate
            container.mux(stream.encode(packed))
        container.mux(stream.encode())
    return buf.getvalue()


def encode_video(frames: np.ndarray, fps: float, ext: str) -> bytes:
    """The bytes of a `ext` (.mp4 .mov .mkv: h264; .gif) file of (T, H, W, 3) uint8 frames."""
    ext = ext.lower()
    if ext == ".gif":
        return gif_bytes(frames, fps)
    if ext not in H264_CONTAINERS:
        raise UserError(f"cannot write a {ext} video: use one of {', '.join(H264_EXTS + ('.gif',))}")
    return h264_bytes(frames, fps, H264_CONTAINERS[ext])


def write_bytes_atomic(path: str, data: bytes) -> None:
    """`data` to a temp file beside `path`, then renamed over it: `path` is whole or absent."""
    _make_parent(path)
    tmp = f"{path}.part.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def write_video(path: str, frames: np.ndarray, fps: float) -> None:
    """Write (T, H, W, 3) uint8 frames to .mp4/.mov/.mkv (libx264, yuv420p) or .gif.

    Odd heights/widths are padded by one repeated row/column for yuv420p, so such an mp4
    reads back one pixel larger. The file appears atomically (temp file, then rename).
    """
    ext = os.path.splitext(path)[1].lower()
    if ext != ".gif" and ext not in H264_EXTS:
        raise UserError(f"cannot write {path}: use one of {', '.join(H264_EXTS + ('.gif',))}")
    write_bytes_atomic(path, encode_video(frames, fps, ext))


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


def grid_png_bytes(videos: list[np.ndarray], max_frames: int = 16, separator: int = 2) -> bytes:
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
    buf = io.BytesIO()
    Image.fromarray(grid).save(buf, format="PNG")
    return buf.getvalue()


def save_grid_png(path: str, videos: list[np.ndarray], max_frames: int = 16,
                  separator: int = 2) -> None:
    """`grid_png_bytes` written to `path` (whole or absent)."""
    write_bytes_atomic(path, grid_png_bytes(videos, max_frames, separator))
