"""Frechet Video Distance as StyleGAN-V computes it (Skorokhodov et al. 2022, `fvd2048_16f`).

Features come from the I3D TorchScript file that StyleGAN-V and Latte use
(`i3d_torchscript.pt`, a port of the Kinetics-400 I3D behind google-research's FVD), called
as `detector(videos, rescale=True, resize=True, return_features=True)` on uint8 videos
(N, 3, T, H, W) with values in [0, 255], exactly as StyleGAN-V calls it
(src/metrics/metric_utils.py: dataset frames are uint8, generated ones are cast to uint8
before the call); it rescales them to [-1, 1], resizes frames to 224 x 224 itself and returns
(N, 400) features (the logits before the softmax). Its convolutions and matmuls run in full
fp32 (no TF32), as StyleGAN-V's calc_metrics scripts set (`allow_tf32 = False`). The file is
never downloaded here: the user gives its path, and `check_detector` calls it once on a tiny
clip at load so that a file with another call signature or feature width is refused before
any work.

Statistics as in StyleGAN-V's `FeatureStats`: float64 sums of features and of their outer
products, mean = sum / N and the biased covariance sum(x x^T) / N - mean mean^T.

Frechet distance between N(mu1, S1) and N(mu2, S2):
    d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)).
StyleGAN-V takes `scipy.linalg.sqrtm(S1 @ S2)` (a non-symmetric matrix, whose square root can
come back with spurious imaginary parts). Here the trace term is computed from symmetric
matrices only: S1 S2 is similar to A = S1^(1/2) S2 S1^(1/2) (same eigenvalues), A is
symmetric positive semi-definite, so tr((S1 S2)^(1/2)) = sum_i sqrt(lambda_i(A)), with both
eigendecompositions done by `numpy.linalg.eigh` in float64 and round-off negatives clipped
to 0. Equal to the scipy value in exact arithmetic; tests check it against closed forms and
against a general eigenvalue solver.

Per-frame FID and KID (optional) use the same code on the frames of the same clips, with the
Inception TorchScript of stylegan2-ada-pytorch (`inception-2015-12-05.pt`, a translation of
TF's Inception v3), called as `detector(frames, return_features=True)` on uint8 frames
(N, 3, H, W) -> (N, 2048). KID is the unbiased MMD^2 with the cubic polynomial kernel
k(x, y) = (x . y / D + 1)^3, averaged over random subsets (StyleGAN2-ADA's estimator).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import warnings
from typing import Iterable, Iterator, Literal, Optional

import numpy as np
import torch

from utils.errors import MissingFileError, UserError
from utils.paths import refuse_folder

DETECTOR_KWARGS = dict(rescale=True, resize=True, return_features=True)  # StyleGAN-V's call
INCEPTION_KWARGS = dict(return_features=True)  # StyleGAN2-ADA's call
DETECTOR_FILE = "i3d_torchscript.pt"
INCEPTION_FILE = "inception-2015-12-05.pt"
FEATURE_DIMS = {"i3d": 400, "inception": 2048}  # features per video (I3D) / per frame (Inception)
CHECK_SIZE = 32  # pixels per side of the clip a detector is tried on at load (it resizes to 224)
DetectorKind = Literal["i3d", "inception"]


def detector_help(key: str = "fvd.detector_path") -> str:
    return (f"{key} must point at `{DETECTOR_FILE}`, the TorchScript I3D (Kinetics-400) that "
            "StyleGAN-V and Latte compute FVD with. This repo never downloads it: fetch it yourself "
            "(StyleGAN-V's src/metrics/frechet_video_distance.py gives its address) and pass "
            f"{key}=/path/to/{DETECTOR_FILE}")


# --------------------------------------------------------------------------- statistics


class FeatureStats:
    """Running float64 sums of features (D,) and their outer products (D, D)."""

    def __init__(self, dim: Optional[int] = None, keep: bool = False):
        self.n = 0
        self.sum: Optional[torch.Tensor] = None  # (D,)
        self.sum_outer: Optional[torch.Tensor] = None  # (D, D)
        self.kept: Optional[list[np.ndarray]] = [] if keep else None  # float32 (n, D) chunks, for KID
        if dim is not None:
            self._init(dim)

    def _init(self, dim: int) -> None:
        self.sum = torch.zeros(dim, dtype=torch.float64)
        self.sum_outer = torch.zeros(dim, dim, dtype=torch.float64)

    def add(self, features: torch.Tensor) -> None:
        """`features`: (N, D), any float dtype and device."""
        if features.ndim != 2:
            raise ValueError(f"features must be (N, D), got {tuple(features.shape)}")
        x = features.detach().double().cpu()
        if self.sum is None:
            self._init(x.shape[1])
        self.n += x.shape[0]
        self.sum += x.sum(0)
        self.sum_outer += x.T @ x  # (D, D)
        if self.kept is not None:
            self.kept.append(x.float().numpy())

    def features(self) -> np.ndarray:
        """(N, D) float32: every feature added (only with keep=True)."""
        assert self.kept is not None, "FeatureStats(keep=True) keeps the features"
        return np.concatenate(self.kept)

    def packed(self) -> torch.Tensor:
        """(1 + D + D*D,) float64: n, sum, sum_outer; sums of these merge statistics."""
        return torch.cat([torch.tensor([float(self.n)], dtype=torch.float64),
                          self.sum, self.sum_outer.flatten()])

    @classmethod
    def from_packed(cls, packed: torch.Tensor, dim: int) -> "FeatureStats":
        packed = packed.double().cpu()
        stats = cls(dim)
        stats.n = int(round(packed[0].item()))
        stats.sum = packed[1:1 + dim].clone()
        stats.sum_outer = packed[1 + dim:].reshape(dim, dim).clone()
        return stats

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean (D,) and biased covariance (D, D), float64 (StyleGAN-V's `get_mean_cov`)."""
        if self.n == 0:
            raise ValueError("no features were added")
        mean = self.sum / self.n
        cov = self.sum_outer / self.n - torch.outer(mean, mean)
        return mean.numpy(), cov.numpy()


def trace_sqrt_product(s1: np.ndarray, s2: np.ndarray) -> float:
    """tr((S1 S2)^(1/2)) for symmetric PSD S1, S2, via A = S1^(1/2) S2 S1^(1/2) (symmetric)."""
    s1, s2 = _symmetric(s1), _symmetric(s2)
    w, u = np.linalg.eigh(s1)
    root1 = (u * np.sqrt(np.clip(w, 0, None))) @ u.T  # S1^(1/2)
    a = _symmetric(root1 @ s2 @ root1)
    return float(np.sqrt(np.clip(np.linalg.eigvalsh(a), 0, None)).sum())


def frechet_distance(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    """|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)), all in float64."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(s1, np.float64), np.asarray(s2, np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != mu1.shape * 2:
        raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, cov {s1.shape} vs {s2.shape}")
    mean_term = float(np.square(mu1 - mu2).sum())
    return mean_term + float(np.trace(s1) + np.trace(s2)) - 2 * trace_sqrt_product(s1, s2)


def fvd_from_stats(real: FeatureStats, generated: FeatureStats) -> float:
    return frechet_distance(*generated.mean_cov(), *real.mean_cov())


def kernel_inception_distance(real: np.ndarray, generated: np.ndarray, num_subsets: int = 100,
                              max_subset_size: int = 1000, seed: int = 0) -> float:
    """KID: the unbiased MMD^2 between feature sets (N, D) with k(x, y) = (x . y / D + 1)^3,
    averaged over `num_subsets` random subsets of m = min(N_real, N_gen, max_subset_size)
    features per side, drawn without replacement by a generator seeded with `seed`."""
    rng = np.random.default_rng(seed)
    d = real.shape[1]
    m = min(len(real), len(generated), max_subset_size)
    if m < 2:
        raise ValueError(f"KID needs >= 2 features per side, got {len(real)} and {len(generated)}")
    kernel = lambda a, b: (a @ b.T / d + 1) ** 3  # (m, m)
    total = 0.0
    for _ in range(num_subsets):
        x = generated[rng.choice(len(generated), m, replace=False)].astype(np.float64)
        y = real[rng.choice(len(real), m, replace=False)].astype(np.float64)
        within = kernel(x, x) + kernel(y, y)
        off_diagonal = within.sum() - np.trace(within)  # i != j terms: the unbiased part
        total += off_diagonal / (m * (m - 1)) - 2 * kernel(x, y).mean()
    return float(total / num_subsets)


def _symmetric(m: np.ndarray) -> np.ndarray:
    return (m + m.T) / 2


# --------------------------------------------------------------------------- the detector


def load_detector(path: Optional[str], device: torch.device, key: str = "fvd.detector_path",
                  kind: DetectorKind = "i3d", check_frames: Optional[int] = 16) -> torch.jit.ScriptModule:
    """The TorchScript detector at `path` (config key `key`), in eval mode on `device`, tried
    once on a clip of `check_frames` frames (`check_detector`; None = not yet, the caller
    checks it when the frame count is known)."""
    help_fn = detector_help if kind == "i3d" else inception_help
    if not path:
        raise MissingFileError(f"{key} is not set. {help_fn(key)}")
    refuse_folder(path, key, f"the TorchScript file. {help_fn(key)}")
    if not os.path.isfile(path):
        raise MissingFileError(f"{key} = {path}: no such file. {help_fn(key)}")
    try:
        with warnings.catch_warnings():
            # The detectors papers use are TorchScript files (torch.export cannot read them), so
            # torch's deprecation notice of jit.load is nothing a user can act on: not shown, and
            # not kept in log.txt at every evaluate or training start.
            warnings.filterwarnings("ignore", message=r"`torch\.jit\.load` is deprecated", category=FutureWarning)
            detector = torch.jit.load(path, map_location=device)
    except (RuntimeError, ValueError) as e:
        raise UserError(f"{key} = {path}: not a TorchScript file ({str(e).splitlines()[0]}). "
                        f"{help_fn(key)}") from None
    detector = detector.eval()
    if check_frames is not None:
        check_detector(detector, kind, check_frames, device, key, path)
    return detector


def check_detector(detector, kind: DetectorKind, num_frames: int, device: torch.device,
                   key: str = "fvd.detector_path", path: str = "") -> None:
    """Call the detector once as the metric will (StyleGAN-V's / StyleGAN2-ADA's kwargs, uint8
    input) on a tiny clip of `num_frames` frames; refuse, naming `key`, a file that takes
    another call, fails at this frame count, or returns features of another width than FID
    (2048) or FVD (400) are computed with."""
    help_fn = detector_help if kind == "i3d" else inception_help
    where = f"{key} = {path or '(loaded)'}"
    clip = torch.linspace(0, 255, 3 * num_frames * CHECK_SIZE ** 2).to(torch.uint8)
    clip = clip.reshape(1, 3, num_frames, CHECK_SIZE, CHECK_SIZE).to(device)  # (1, 3, T, H, W)
    try:
        with torch.no_grad(), full_fp32():
            feats = detector(clip, **DETECTOR_KWARGS) if kind == "i3d" else \
                detector(clip[:, :, 0], **INCEPTION_KWARGS)  # Inception: (1, 3, H, W), one frame
    except (torch.jit.Error, RuntimeError, TypeError, ValueError, IndexError) as e:
        lines = [l.strip() for l in str(e).splitlines() if l.strip()] or [type(e).__name__]
        why = lines[-1] if isinstance(e, torch.jit.Error) else lines[0]  # TorchScript: the raise
        raise UserError(f"{where}: the detector failed on a uint8 clip of {tuple(clip.shape)} "
                        f"called as detector(x, {_kwargs_text(kind)}) ({why[:300]}). "
                        f"{help_fn(key)}") from None
    width = FEATURE_DIMS[kind]
    if not isinstance(feats, torch.Tensor) or feats.shape != (1, width):
        shape = tuple(feats.shape) if isinstance(feats, torch.Tensor) else type(feats).__name__
        raise UserError(f"{where}: the detector returned features of shape {shape} for one "
                        f"{'clip' if kind == 'i3d' else 'frame'}, expected (1, {width}) "
                        f"({'FVD' if kind == 'i3d' else 'FID'} is defined on these features). "
                        f"{help_fn(key)}")
    if not torch.isfinite(feats).all():
        raise UserError(f"{where}: the detector returned NaN or infinite features for a plain "
                        f"uint8 clip. {help_fn(key)}")


def _kwargs_text(kind: DetectorKind) -> str:
    kwargs = DETECTOR_KWARGS if kind == "i3d" else INCEPTION_KWARGS
    return ", ".join(f"{k}={v}" for k, v in kwargs.items())


@contextlib.contextmanager
def full_fp32() -> Iterator[None]:
    """fp32 matmuls and convolutions without TF32 on CUDA (StyleGAN-V's metric scripts set
    `allow_tf32 = False`; torch's default lets cuDNN convolutions use TF32), restored after."""
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    saved = matmul.fp32_precision, conv.fp32_precision
    matmul.fp32_precision = conv.fp32_precision = "ieee"
    try:
        yield
    finally:
        matmul.fp32_precision, conv.fp32_precision = saved


def detector_precision() -> dict:
    """What `full_fp32` sets, read back from torch: recorded next to every number."""
    with full_fp32():
        matmul = torch.backends.cuda.matmul.fp32_precision
        conv = torch.backends.cudnn.conv.fp32_precision
    return {"tf32": "tf32" in (matmul, conv), "matmul_fp32_precision": matmul,
            "cudnn_conv_fp32_precision": conv}


def file_digest(path: str) -> str:
    """The file's sha256 (hex): which detector file a number came from."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@torch.no_grad()
def detector_features(detector, videos: torch.Tensor) -> torch.Tensor:
    """uint8 videos (N, 3, T, H, W) -> (N, D) float features: StyleGAN-V's call on uint8
    input, without TF32."""
    if videos.dtype != torch.uint8 or videos.ndim != 5 or videos.shape[1] != 3:
        raise ValueError(f"expected uint8 videos (N, 3, T, H, W), got {videos.dtype} "
                         f"{tuple(videos.shape)}")
    with full_fp32():
        feats = detector(videos, **DETECTOR_KWARGS)  # uint8 in [0, 255], as StyleGAN-V passes
    if feats.ndim != 2 or feats.shape[0] != videos.shape[0]:
        raise UserError(f"the FVD detector returned shape {tuple(feats.shape)} for "
                        f"{videos.shape[0]} videos, expected (N, 400). {detector_help()}")
    return feats


@torch.no_grad()
def image_features(detector, frames: torch.Tensor) -> torch.Tensor:
    """uint8 frames (N, 3, H, W) -> (N, 2048) Inception features, as StyleGAN2-ADA calls it."""
    if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[1] != 3:
        raise ValueError(f"expected uint8 frames (N, 3, H, W), got {frames.dtype} {tuple(frames.shape)}")
    with full_fp32():
        feats = detector(frames, **INCEPTION_KWARGS)
    if feats.ndim != 2 or feats.shape[0] != frames.shape[0]:
        raise UserError(f"the FID detector returned shape {tuple(feats.shape)} for {frames.shape[0]} "
                        f"frames, expected (N, 2048). {inception_help()}")
    return feats


def inception_help(key: str = "fid.detector_path") -> str:
    return (f"{key} must point at `{INCEPTION_FILE}`, stylegan2-ada-pytorch's TorchScript of TF's "
            "Inception v3 (the standard FID features). This repo never downloads it: fetch it "
            f"yourself (stylegan2-ada-pytorch's metrics/frechet_inception_distance.py gives its "
            f"address) and pass {key}=/path/to/{INCEPTION_FILE}, or leave {key} null to skip FID/KID")


def stats_of(detector, batches: Iterable[torch.Tensor], device: torch.device,
             stats: Optional[FeatureStats] = None) -> FeatureStats:
    """Feature statistics of uint8 video batches (N, 3, T, H, W)."""
    stats = stats or FeatureStats()
    for videos in batches:
        stats.add(detector_features(detector, videos.to(device)))
    return stats
