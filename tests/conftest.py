"""Media helpers shared by the data / video IO tests (all media are written into tmp_path)."""
from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

# Frame i of an "index clip" is flat gray LEVEL0 + LEVEL_STEP * i: flat frames survive h264
# and GIF palettes almost exactly, so a decoded frame tells which source frame it was.
LEVEL0, LEVEL_STEP, MAX_INDEX = 10, 8, 30


def index_frames(n: int, h: int = 16, w: int = 16) -> np.ndarray:
    """(n, h, w, 3) uint8, frame i flat at the gray level encoding i."""
    assert n <= MAX_INDEX + 1
    levels = LEVEL0 + LEVEL_STEP * np.arange(n, dtype=np.uint8)
    return np.broadcast_to(levels[:, None, None, None], (n, h, w, 3)).copy()


def frame_index(frame: np.ndarray) -> int:
    """Inverse of index_frames for one decoded (H, W, 3) frame (values in 0..255)."""
    return int(round((float(np.mean(frame)) - LEVEL0) / LEVEL_STEP))


def smooth_frames(t: int, h: int, w: int) -> np.ndarray:
    """(t, h, w, 3) uint8 moving colour gradients: content lossy h264 keeps well."""
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    frames = [np.stack([np.sin(3 * x + 0.3 * i), np.cos(2 * y - 0.2 * i), np.sin(2 * (x + y))], -1)
              for i in range(t)]
    return ((np.stack(frames) + 1) * 127.5).round().astype(np.uint8)


def write_frame_folder(folder: str, frames: np.ndarray, numbers=None, pattern="frame_{}.png") -> None:
    """Frames as png files named by `numbers` (default 0..T-1, not zero padded)."""
    os.makedirs(folder, exist_ok=True)
    numbers = range(len(frames)) if numbers is None else numbers
    for n, frame in zip(numbers, frames):
        Image.fromarray(frame).save(os.path.join(folder, pattern.format(n)))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0 ** 2 / max(mse, 1e-10)))


FIXTURE_VAE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "vae")


@pytest.fixture(scope="session")
def trained_vae() -> str:
    """A small stage-1 VAE trained on the built-in data (tests/fixtures/README.md says how)."""
    return FIXTURE_VAE


@pytest.fixture(scope="session")
def vae_families(tmp_path_factory) -> dict:
    """{family: folder} of tiny random VAEs of every supported family, plus "pipeline" (a
    pipeline folder with model_index.json + vae/); written once per session (tests/vae_families.py)."""
    from tests.vae_families import write_families
    return write_families(str(tmp_path_factory.mktemp("vae_families")))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and far faster when other jobs share the cores.
    A module opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def text_encoders(tmp_path_factory) -> dict:
    """{kind: folder} of tiny random text encoders (T5, UMT5, CLIP, CLIP with projection, a full
    T5, a pipeline folder, an unsupported BertModel); written once per session (tests/text_fixtures.py)."""
    from tests.text_fixtures import write_encoders
    return write_encoders(str(tmp_path_factory.mktemp("text_encoders")))


@pytest.fixture(scope="session")
def pretrained_pipelines(tmp_path_factory) -> dict:
    """Tiny random Wan and CogVideoX pipeline folders (tests/pretrained_fixtures.py), written once
    per session: {"wan": path, "cogvideox": path}."""
    from tests.pretrained_fixtures import write_pipelines
    return write_pipelines(str(tmp_path_factory.mktemp("pretrained")))
