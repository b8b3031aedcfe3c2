"""Quantization-aware training (QAT): fake INT8 quantization in the forward pass while fine-tuning.

    lineside fit --config configs/quickstart_qat.yaml      # from runs/quickstart/checkpoints/best.ckpt
    lineside export int8 --ckpt runs/quickstart_qat/checkpoints/best.ckpt --out export/qat

The scheme is the one the INT8 export (:mod:`export.quantize`) deploys, so what trains is what runs:

* **weights**: INT8 symmetric per output channel on the grid ``max|w| / 127`` (``torch.ao.quantization``
  moving-average per-channel min/max observer, ``per_channel_symmetric``, range -127..127: the grid
  ONNX Runtime's quantizer and TensorRT use, so the INT8 weights of every export are the trained ones);
* **activations**: the *input* of every quantized Conv / Linear, INT8 symmetric per tensor (zero
  point 0, the only kind TensorRT takes), moving-average min/max observer;
* **float**: the first ``float_convs`` convolutions of the image encoder (stem + first block at full
  resolution), normalisation, residual adds, attention products, softmax and the decoders; biases.

:func:`prepare_qat` turns the model's ``nn.Conv2d`` / ``nn.Linear`` modules (timm's ``Conv2dSame``
too) into fake-quantized ones in place, by class swap: the weight stays the same parameter under the
same state-dict key and reads back fake-quantized, a forward pre-hook fake-quantizes the input. The
quantizers' buffers (scales, observers' ranges) are kept **out** of the Lightning ``state_dict``
(:class:`fusion.qat_training.QuantizationAwareTraining` moves them to ``checkpoint["lineside_qat"]``), so a QAT
checkpoint loads as a plain float model everywhere (``score``, ``export onnx``, post-training
``export int8``); :func:`load_qat_state` puts the fake quantization back (``lineside export int8`` on a QAT checkpoint).

:func:`freeze_qat` gives an export copy whose quantizers are fixed ``fake_quantize_per_*_affine``
(``quantized_decomposed`` quantize → dequantize ops) with the learnt scales: ``torch.onnx`` writes each
as a ``QuantizeLinear`` / ``DequantizeLinear`` pair.
"""

from __future__ import annotations

import copy
import logging
import math
from typing import Any

import torch
import torch.ao.quantization.fx._decomposed  # registers torch.ops.quantized_decomposed, which the export copy calls
from torch import Tensor, nn

__all__ = [
    "QAT_KEY",
    "StaticFakeQuant",
    "activation_fake_quant",
    "calibrate_qat",
    "freeze_qat",
    "is_qat",
    "load_qat_state",
    "prepare_qat",
    "qat_state",
    "quantized_modules",
    "set_fake_quant",
    "set_observers",
    "weight_fake_quant",
]

log = logging.getLogger(__name__)

QAT_KEY = "lineside_qat"  # checkpoint key: {"spec": prepare_qat kwargs, "state": quantizer buffers}
FLOAT_CONVS = 3  # as export.quantize.FLOAT_CONVS: stem + first block stay float
QMIN, QMAX = -128, 127  # INT8 activations; symmetric, zero point 0 (ONNX QuantizeLinear's int8 range)
WMIN, WMAX = -127, 127  # INT8 weights: the symmetric grid amax/127 of TensorRT and ONNX Runtime's quantizer


def weight_fake_quant() -> nn.Module:
    """INT8 symmetric per-output-channel weight quantizer (torch.ao's default per-channel QAT weight scheme)."""
    from torch.ao.quantization import (
        FakeQuantize,
        MovingAveragePerChannelMinMaxObserver,
    )

    return FakeQuantize(observer=MovingAveragePerChannelMinMaxObserver, quant_min=WMIN, quant_max=WMAX, dtype=torch.qint8,
                        qscheme=torch.per_channel_symmetric, ch_axis=0, reduce_range=False)


def activation_fake_quant(averaging_constant: float = 0.01) -> nn.Module:
    """INT8 symmetric per-tensor activation quantizer (zero point 0), moving-average min/max."""
    from torch.ao.quantization import FakeQuantize, MovingAverageMinMaxObserver

    return FakeQuantize(observer=MovingAverageMinMaxObserver, quant_min=QMIN, quant_max=QMAX, dtype=torch.qint8,
                        qscheme=torch.per_tensor_symmetric, reduce_range=False, averaging_constant=averaging_constant)


class _FakeQuantWeight:
    """Mixin put in front of a Conv / Linear class: ``self.weight`` reads back fake-quantized."""

    @property
    def weight(self) -> Tensor:  # type: ignore[override]
        return self.weight_quant(self._parameters["weight"])


def _quantize_input(module: nn.Module, args: tuple) -> tuple:
    return (module.input_quant(args[0]), *args[1:])


_SWAPPED: dict[type, type] = {}


def _swap_class(module: nn.Module) -> None:
    cls = type(module)
    if cls not in _SWAPPED:
        _SWAPPED[cls] = type(f"FakeQuant{cls.__name__}", (_FakeQuantWeight, cls), {"__module__": __name__})
    module.__class__ = _SWAPPED[cls]


def is_qat(model: nn.Module) -> bool:
    """True when :func:`prepare_qat` has fake-quantized some of ``model``'s layers."""
    return any(isinstance(m, _FakeQuantWeight) for m in model.modules())


def quantized_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Name → fake-quantized Conv / Linear module."""
    return {n: m for n, m in model.named_modules() if isinstance(m, _FakeQuantWeight)}


def prepare_qat(model: nn.Module, float_convs: int = FLOAT_CONVS, linear: bool = True, averaging_constant: float = 0.01,
                modules: list[str] | None = None) -> list[str]:
    """Fake-quantize ``model`` in place; returns the names of the quantized modules (in module order).

    Args:
        model: an ``InspectionModel`` (or any module; convolutions are counted in module order).
        float_convs: how many of the first ``nn.Conv2d`` stay float (as the post-training INT8 export).
        linear: also quantize ``nn.Linear`` layers (fusion transformer feed-forward, heads; not attention's
            output projection, whose weight attention reads directly).
        averaging_constant: moving-average rate of the activation observers.
        modules: quantize exactly these modules (by name) instead of choosing by the rules above
            (:func:`load_qat_state` passes the ones a checkpoint's quantizers belong to).
    """
    if is_qat(model):
        raise ValueError("the model is already fake-quantized (prepare_qat was called on it before)")
    names, convs = [], 0
    # attention reads out_proj.weight itself (F.multi_head_attention_forward), never out_proj's forward: no input to quantize
    skip = {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    wanted = set(modules) if modules is not None else None
    if wanted is not None:
        present = {n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
        if wanted - present:
            raise ValueError(f"no Conv2d / Linear layer named {sorted(wanted - present)[:4]} in {type(model).__name__}")
    for name, m in list(model.named_modules()):
        if wanted is not None:
            if name not in wanted:
                continue
        elif id(m) in skip:
            continue
        elif isinstance(m, nn.Conv2d):
            convs += 1
            if convs <= float_convs:
                continue
        elif not (linear and isinstance(m, nn.Linear)):
            continue
        m.weight_quant = weight_fake_quant()
        m.input_quant = activation_fake_quant(averaging_constant)
        m.register_forward_pre_hook(_quantize_input)
        _swap_class(m)
        names.append(name)
    if not names:
        raise ValueError(f"no Conv2d / Linear layer to quantize in {type(model).__name__} (float_convs={float_convs})")
    return names


def _fake_quants(model: nn.Module):
    from torch.ao.quantization import FakeQuantizeBase

    return [m for m in model.modules() if isinstance(m, FakeQuantizeBase)]


def set_observers(model: nn.Module, enabled: bool) -> None:
    """Let the quantizers' observers update their ranges (calibration, early QAT) or freeze them."""
    for fq in _fake_quants(model):
        fq.enable_observer(enabled)


def set_fake_quant(model: nn.Module, enabled: bool) -> None:
    """Quantize in the forward pass (True) or pass floats through (False, observers may still watch)."""
    for fq in _fake_quants(model):
        fq.enable_fake_quant(enabled)


def qat_state(model: nn.Module) -> dict[str, Tensor]:
    """The quantizers' buffers (scales, zero points, observer ranges, switches) by state-dict key."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if ".weight_quant." in f".{k}" or ".input_quant." in f".{k}"}


def load_qat_state(model: nn.Module, spec: dict[str, Any], state: dict[str, Tensor], source: str = "checkpoint") -> list[str]:
    """Fake-quantize a float ``model`` as ``spec`` says (:func:`prepare_qat` kwargs) and load the quantizers' ``state``."""
    quantized = sorted({k.split(".weight_quant.")[0] for k in state if ".weight_quant." in k})
    names = prepare_qat(model, **{**spec, "modules": quantized or None})
    own = model.state_dict()
    expected = {k for k in own if ".weight_quant." in f".{k}" or ".input_quant." in f".{k}"}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"{source}: quantizer state does not fit the model (missing {missing[:4]}, unexpected {unexpected[:4]})")
    for k, v in state.items():
        buf = own[k]
        if buf.shape != v.shape:  # observers' per-channel ranges start empty
            _set_buffer(model, k, v.clone())
        else:
            buf.copy_(v)
    return names


def _set_buffer(model: nn.Module, key: str, value: Tensor) -> None:
    path, _, name = key.rpartition(".")
    owner = model.get_submodule(path)
    owner._buffers[name] = value


@torch.no_grad()
def calibrate_qat(model: nn.Module, batches, forward) -> int:
    """Initial activation and weight ranges: ``forward(model, batch)`` over ``batches`` with observers on and
    quantization off (the first QAT steps then start from calibrated scales, not from scale 1). Returns the count."""
    was_training = model.training
    model.eval()
    set_fake_quant(model, False)
    set_observers(model, True)
    n = 0
    for batch in batches:
        forward(model, batch)
        n += 1
    set_fake_quant(model, True)
    model.train(was_training)
    return n


class StaticFakeQuant(nn.Module):
    """A frozen quantizer: INT8 quantize → dequantize at fixed scales (per tensor, or per channel along ``ch_axis``).

    ``torch.onnx`` exports it as ``QuantizeLinear`` → ``DequantizeLinear``.
    """

    def __init__(self, scale: Tensor, zero_point: Tensor, quant_min: int, quant_max: int, ch_axis: int | None) -> None:
        super().__init__()
        self.quant_min, self.quant_max, self.ch_axis = int(quant_min), int(quant_max), ch_axis
        self.register_buffer("scale", scale.detach().float().clone())
        self.register_buffer("zero_point", zero_point.detach().to(torch.int32).clone())
        if ch_axis is None:
            self._scale, self._zp = float(self.scale.reshape(-1)[0]), int(self.zero_point.reshape(-1)[0])

    def forward(self, x: Tensor) -> Tensor:
        ops = _decomposed_ops()
        lo, hi = self.quant_min, self.quant_max
        if self.ch_axis is None:
            q = ops.quantize_per_tensor(x, self._scale, self._zp, lo, hi, torch.int8)
            return ops.dequantize_per_tensor(q, self._scale, self._zp, lo, hi, torch.int8)
        q = ops.quantize_per_channel(x, self.scale, self.zero_point, self.ch_axis, lo, hi, torch.int8)
        return ops.dequantize_per_channel(q, self.scale, self.zero_point, self.ch_axis, lo, hi, torch.int8)


def _decomposed_ops():
    """``torch.ops.quantized_decomposed`` (quantize/dequantize as separate ops: what torch.export keeps
    and torch.onnx maps to QuantizeLinear / DequantizeLinear; ``fake_quantize_*`` do not export)."""
    return torch.ops.quantized_decomposed


def _static(fq: nn.Module) -> StaticFakeQuant:
    per_channel = fq.qscheme in (torch.per_channel_symmetric, torch.per_channel_affine)
    if not bool(fq.fake_quant_enabled[0]):
        raise ValueError("a quantizer has fake quantization switched off; freeze a model that quantizes")
    return StaticFakeQuant(fq.scale, fq.zero_point, fq.quant_min, fq.quant_max, fq.ch_axis if per_channel else None)


def freeze_qat(model: nn.Module) -> nn.Module:
    """An eval copy of a fake-quantized ``model`` with every quantizer frozen at its learnt scale
    (:class:`StaticFakeQuant`): deterministic, no observers, exportable. ``model`` is not changed."""
    if not is_qat(model):
        raise ValueError("freeze_qat: the model is not fake-quantized (prepare_qat / load_qat_state first)")
    frozen = copy.deepcopy(model).eval()
    for m in quantized_modules(frozen).values():
        # refresh the weight scales from the final weights (the moving average lags the last steps)
        m.weight_quant.activation_post_process.reset_min_max_vals()
        m.weight_quant.activation_post_process.averaging_constant = 1.0
        m.weight_quant.enable_observer(True)
        m.weight_quant(m._parameters["weight"].detach())
        m.weight_quant.enable_observer(False)
        m.weight_quant = _static(m.weight_quant)
        m.input_quant = _static(m.input_quant)
    return frozen


def scale_summary(model: nn.Module) -> dict[str, float]:
    """Median activation scale and weight-scale spread (for logs and metadata)."""
    acts = [float(m.input_quant.scale.reshape(-1)[0]) for m in quantized_modules(model).values()]
    acts = [a for a in acts if math.isfinite(a)]
    return {"layers": len(acts), "median_input_scale": float(sorted(acts)[len(acts) // 2]) if acts else float("nan")}
