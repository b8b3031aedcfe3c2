"""The one resize of lineside, and FramePreprocessor: uint8 frames → the pixels the model was trained on.

Every path resizes with one kernel, ``_resize_levels``: the training and evaluation transforms
(:class:`vision.transforms.FrameResize`), ``lineside score`` and the station on the host
(:func:`resize_frame`, :func:`frames_to_batch`) and every exported graph
(:class:`FramePreprocessor`, inside the model; :func:`resize_uint8` for torch tensors). A model
that changes its grade on half a grey level (``lineside bench --stability`` measures how often)
would otherwise change it between paths, so there is exactly one implementation and it is
integer arithmetic. The same lines run on NumPy arrays on the host (single-threaded, so decode
threads never wait on the thread pool the model runs in) and on torch tensors in graphs.

The resize is bilinear with half-pixel centres and no antialiasing, in fixed point: each output
pixel takes two source columns with 11-bit weights (``w0 + w1 = 2048``), then two of those rows
with 11-bit weights, and rounds to a whole grey level as ``(((r0 >> 4)·b0 >> 16) + ((r1 >> 4)·b1 >> 16) + 2) >> 2``.
Positions and weights follow OpenCV's ``cv2.resize(…, INTER_LINEAR)``, and the result equals
it bit for bit on ``uint8`` frames (OpenCV 5; ``tests/test_resize_parity.py`` checks it on real
cells and random sizes), so models trained on OpenCV-resized cells keep their figures.

The arithmetic uses only gathers (``index_select``), int32 multiplies and adds, and right
shifts of non-negative int32 values (integer floor divisions by powers of two in ONNX graphs:
``Gather``, ``Mul``, ``Add``, ``Div``, ``Mod``, ``Less``, ``Equal``, ``And``, ``Sub``, ``Cast``, all
on int32/bool and all in TensorRT's parser; no float arithmetic), and no intermediate exceeds
2³¹, so no runtime's float kernels can move a pixel: eager torch, ONNX Runtime and AOTInductor
give the same bytes as the host (tested), and TensorRT runs the same int32 operators. A float
resize cannot promise that.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["RESIZE_COEF_BITS", "FramePreprocessor", "resize_taps", "resize_uint8", "resize_frame", "frames_to_batch"]

RESIZE_COEF_BITS = 11  # fixed-point weights: w0 + w1 = 2**11
_ONE = 1 << RESIZE_COEF_BITS


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, (int, np.integer)) else (int(size[0]), int(size[1]))


@lru_cache(maxsize=64)
def resize_taps(src: int, dst: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One axis of a ``src`` → ``dst`` pixel resize: ``(i0, i1, w0, w1)``, each of length ``dst``.

    Output pixel ``d`` is ``(w0[d]·x[i0[d]] + w1[d]·x[i1[d]]) / 2048``. Its source position is
    ``f = float32((d + 0.5) · (1 / (dst / src)) − 0.5)`` (double, then single precision, as
    OpenCV computes it), ``i0 = floor(f)``, ``w1 = rint(2048 · (f − i0))``,
    ``w0 = rint(2048 · (1 − (f − i0)))``; indices outside the frame are clamped to its edge.
    Returns int64 indices and int32 weights (read-only, cached).
    """
    scale = 1.0 / (float(dst) / float(src))
    f = ((np.arange(dst, dtype=np.float64) + 0.5) * scale - 0.5).astype(np.float32)
    s = np.floor(f)
    frac = (f - s).astype(np.float32)
    w0 = np.rint((np.float32(1.0) - frac) * np.float32(_ONE)).astype(np.int32)
    w1 = np.rint(frac * np.float32(_ONE)).astype(np.int32)
    s = s.astype(np.int64)
    out = (np.clip(s, 0, src - 1), np.clip(s + 1, 0, src - 1), w0, w1)
    for a in out:
        a.setflags(write=False)
    return out


_TAP_TENSORS: dict[tuple[int, int, str], tuple[Tensor, ...]] = {}


@torch.compiler.disable
def _taps(src: int, dst: int, device: torch.device) -> tuple[Tensor, ...]:
    """:func:`resize_taps` as tensors on ``device`` (cached). Kept out of ``torch.compile`` graphs
    (NumPy); a :class:`FramePreprocessor` built with its ``input_size`` holds them as buffers."""
    key = (int(src), int(dst), str(device))
    taps = _TAP_TENSORS.get(key)
    if taps is None:
        with torch.inference_mode(False):
            taps = tuple(torch.tensor(a, device=device) for a in resize_taps(int(src), int(dst)))
        if all(type(t) is torch.Tensor for t in taps):  # not the fake tensors of a trace
            _TAP_TENSORS[key] = taps
    return taps


def _take(x, index, axis: int):
    """Gather along ``axis``: ``index_select`` on a tensor (ONNX ``Gather``), ``take`` on an array."""
    return x.index_select(axis, index) if isinstance(x, Tensor) else x.take(index, axis=axis)


def _levels(image: Tensor) -> Tensor:
    """Frames → int32 grey levels. In an ONNX graph uint8 goes through float (TensorRT casts uint8
    only to and from floating types); float frames are rounded and clipped to 0..255."""
    if image.dtype == torch.int32:
        return image
    if image.is_floating_point():
        return image.float().round().clamp(0, 255).to(torch.int32)
    if torch.onnx.is_in_onnx_export():
        return image.float().to(torch.int32)
    return image.to(torch.int32)


def _shr(x, bits: int):
    """``x >> bits`` of non-negative int32 values. ONNX graphs spell it as a floor division by
    ``2**bits``, exported as integer ``Div`` (+ a sign correction that never fires here): ONNX
    ``BitShift`` takes unsigned types only and TensorRT lacks it, and the other division modes
    export through float, inexact above 2²⁴. Eager torch and AOTInductor shift (several times
    faster on a CPU), as do NumPy arrays; the results are the same integers."""
    if isinstance(x, Tensor) and torch.onnx.is_in_onnx_export():
        return x // (1 << bits)
    return x >> bits


def _resize_levels(x, size: tuple[int, int], taps: Sequence | None = None):
    """The resize: (…, H, W) int32 grey levels 0..255 → (…, size[0], size[1]) int32 grey levels
    0..255, on a torch tensor (any device, traced into graphs) or a NumPy array (the host; uint8
    works too, the first multiply by the int32 weights promotes it).

    Horizontal pass exact (≤ 255·2048), vertical pass ``(((r0 >> 4)·b0 >> 16) + ((r1 >> 4)·b1 >> 16) + 2) >> 2``;
    every value is non-negative and below 2³¹ (at most 255·2048 / 16 · 2048). ``taps``: the column
    then row taps ``(x0, x1, a0, a1, y0, y1, b0, b1)`` when already at hand."""
    h, w = size
    H, W = int(x.shape[-2]), int(x.shape[-1])
    if taps is None:
        taps = (*_taps(W, w, x.device), *_taps(H, h, x.device)) if isinstance(x, Tensor) else (*resize_taps(W, w), *resize_taps(H, h))
    x0, x1, a0, a1, y0, y1, b0, b1 = taps
    rows = _shr(_take(x, x0, -1) * a0 + _take(x, x1, -1) * a1, 4)  # (…, H, w)
    top = _shr(_take(rows, y0, -2) * b0[:, None], 16)
    bottom = _shr(_take(rows, y1, -2) * b1[:, None], 16)
    return _shr(top + bottom + 2, 2)


def resize_uint8(image: Tensor, size: int | Sequence[int]) -> Tensor:
    """The resize of every path: (…, H, W) uint8 frames → (…, size[0], size[1]) uint8.

    Bilinear, half-pixel centres, no antialiasing, rounded to whole grey levels; equal to
    ``cv2.resize(frame, (w, h), interpolation=cv2.INTER_LINEAR)`` on uint8 (see the module
    docstring). Works on any device; returns the input when it already has ``size``.
    """
    size = _pair(size)
    if tuple(image.shape[-2:]) == size:
        return image
    if image.dtype != torch.uint8:
        raise TypeError(f"resize_uint8 takes uint8 frames, got {image.dtype}")
    return _resize_levels(_levels(image), size).to(torch.uint8)


class FramePreprocessor(nn.Module):
    """uint8 frames → float pixels 0..255 at the training size, resized by :func:`resize_uint8`'s arithmetic.

    Inside the graph the result is handed to the model as float whole grey levels (the model's
    :class:`vision.image_encoder.ImageEncoder` normalises), exactly the pixels a host-side
    :func:`resize_frame` to the training size would give.

    Args:
        size: (height, width) the model was trained on.
        input_size: (height, width) of the frames it will mostly get (an artefact's fixed input
            size): their taps are kept as (non-persistent) buffers, constants of a traced graph.
            Frames of other sizes work too.

    Shapes:
        forward: (N, C, H, W) uint8 (or float 0..255, rounded to whole levels when resized) →
        (N, C, size[0], size[1]) float32; no resize when (H, W) already equals ``size``.
    """

    def __init__(self, size: int | Sequence[int], input_size: int | Sequence[int] | None = None) -> None:
        super().__init__()
        self.size = _pair(size)
        self.input_size = _pair(input_size) if input_size is not None else None
        self.has_taps = self.input_size is not None and self.input_size != self.size
        if self.has_taps:
            (h, w), (H, W) = self.size, self.input_size
            names = ("x0", "x1", "a0", "a1", "y0", "y1", "b0", "b1")
            for name, a in zip(names, (*resize_taps(W, w), *resize_taps(H, h))):
                self.register_buffer(f"tap_{name}", torch.from_numpy(a.copy()), persistent=False)

    def _buffered_taps(self) -> tuple[Tensor, ...]:
        return tuple(getattr(self, f"tap_{n}") for n in ("x0", "x1", "a0", "a1", "y0", "y1", "b0", "b1"))

    def forward(self, image: Tensor) -> Tensor:
        if tuple(image.shape[-2:]) == self.size:
            return image.float()
        taps = self._buffered_taps() if self.has_taps and tuple(image.shape[-2:]) == self.input_size else None
        return _resize_levels(_levels(image), self.size, taps).float()


def _resize_chw(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(…, C, H, W) uint8 array (any strides) → (…, C, size[0], size[1]) uint8, on the host."""
    if frames.dtype != np.uint8:
        raise TypeError(f"frames are uint8, got {frames.dtype}")
    return _resize_levels(frames, size).astype(np.uint8)  # uint8 · int32 weights → int32 from the first gather


def resize_frame(frame: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """A (H, W, C) or (H, W) uint8 frame → (size[0], size[1], C) uint8 (the one resize, on the host)."""
    h, w = _pair(size)
    frame = frame if frame.ndim == 3 else frame[:, :, None]
    if frame.shape[:2] == (h, w):
        return frame
    return np.ascontiguousarray(_resize_chw(frame.transpose(2, 0, 1), (h, w)).transpose(1, 2, 0))


def frames_to_batch(frames: Sequence[np.ndarray], size: Sequence[int]) -> np.ndarray:
    """(H, W, C) uint8 frames of any sizes → one (N, C, size[0], size[1]) uint8 batch (the one resize, on the host)."""
    h, w = _pair(size)
    if not len(frames):
        return np.zeros((0, 1, h, w), dtype=np.uint8)
    frames = [f if f.ndim == 3 else f[:, :, None] for f in frames]
    out = np.empty((len(frames), frames[0].shape[2], h, w), dtype=np.uint8)
    for i, f in enumerate(frames):  # frame by frame: stays in cache, and frames may differ in size
        if f.shape[2] != out.shape[1]:
            raise ValueError(f"frames differ in channels: {f.shape[2]} vs {out.shape[1]}")
        out[i] = f.transpose(2, 0, 1) if f.shape[:2] == (h, w) else _resize_chw(f.transpose(2, 0, 1), (h, w))
    return out
