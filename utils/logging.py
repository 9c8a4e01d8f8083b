"""One logger per run: stdout, `<run>/log.txt` and TensorBoard, written by rank 0 only.

Videos go to TensorBoard as animated GIF image summaries that we encode ourselves
(`SummaryWriter.add_video` needs moviepy 1.x, one more pinned dependency for the same bytes).
"""
from __future__ import annotations

import os
import time
import warnings
from typing import Optional

import numpy as np
import tqdm


class RunLogger:
    def __init__(self, run_dir: Optional[str], enabled: bool = True):
        self.enabled = enabled and run_dir is not None
        self.run_dir = run_dir
        self._writer = None
        self._log_file = None
        if self.enabled:
            os.makedirs(run_dir, exist_ok=True)
            self._log_file = open(os.path.join(run_dir, "log.txt"), "a", buffering=1)
            self._showwarning = warnings.showwarning
            warnings.showwarning = self._warning  # data warnings (skipped files...) reach log.txt

    def _warning(self, message, category, filename, lineno, file=None, line=None) -> None:
        self.info(f"warning: {message}")

    @property
    def writer(self):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter  # slow import: only when used
            self._writer = SummaryWriter(os.path.join(self.run_dir, "tensorboard"))
        return self._writer

    def info(self, msg: str, echo: bool = True) -> None:
        """To log.txt, and to stdout unless `echo` is False."""
        if not self.enabled:
            return
        if echo:
            tqdm.tqdm.write(msg)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        for line in msg.splitlines() or [""]:
            self._log_file.write(f"{stamp} {line}\n")

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self.enabled:
            self.writer.add_scalar(tag, float(value), step)

    def scalars(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.scalar(tag, value, step)

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        """`image`: (H, W, 3) uint8."""
        if self.enabled:
            self.writer.add_image(tag, image, step, dataformats="HWC")

    def video(self, tag: str, frames: np.ndarray, step: int, fps: int) -> None:
        """`frames`: (T, H, W, 3) uint8, shown in TensorBoard's Images tab as an animated GIF."""
        if not self.enabled:
            return
        from tensorboard.compat.proto.summary_pb2 import Summary
        from utils.video_io import gif_bytes
        _, h, w, _ = frames.shape
        img = Summary.Image(height=h, width=w, colorspace=3,
                            encoded_image_string=gif_bytes(frames, fps))
        self.writer._get_file_writer().add_summary(
            Summary(value=[Summary.Value(tag=tag, image=img)]), step)

    def text(self, tag: str, text: str, step: int) -> None:
        """A text summary (markdown) in TensorBoard's Text tab, e.g. the prompts of the samples."""
        if self.enabled:
            self.writer.add_text(tag, text, step)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self.enabled and warnings.showwarning == self._warning:
            warnings.showwarning = self._showwarning
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
