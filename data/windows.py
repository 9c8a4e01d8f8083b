"""Sliding windows over a source clip: the one rule both datasets (built-in and folders) use."""
from __future__ import annotations


def window_span(num_frames: int, frame_stride: int) -> int:
    """Source frames covered by one window of `num_frames` frames every `frame_stride`."""
    return (num_frames - 1) * frame_stride + 1


def windows_per_clip(length: int, num_frames: int, frame_stride: int, window_stride: int) -> int:
    """Sliding windows in a source of `length` frames, one starting every `window_stride`."""
    return max(0, (length - window_span(num_frames, frame_stride)) // window_stride + 1)
