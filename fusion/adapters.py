"""LoRA adapters: one base model, one small adapter file per product or line.

Training (``lineside fit --model.adapter '{base: runs/quickstart/checkpoints/best.ckpt, rank: 8}'``)
loads the base checkpoint's weights, wraps the target layers with ``peft`` LoRA (low-rank
``B @ A`` beside a frozen weight: the fusion transformer's attention (q/k/v in-projection and
out-projection) and feed-forward Linears, the backbone's 1×1 convolutions and the encoder's 1×1
token projection), freezes everything else except the task heads (``train_head``), and keeps the
backbone's batch-norm statistics frozen. At the end of the fit the adapter of the best checkpoint
is written beside the run as ``adapter.safetensors`` (LoRA tensors + the head's weights) and
``adapter.json`` (rank, alpha, targets, the base file's sha256 …): a few hundred KB beside a
base of MBs.

Inference never needs ``peft``: :func:`merge_adapter` folds ``W += alpha/rank · B @ A`` into a
plain model with torch alone (``score``, ``export`` and the station load base + adapter, and the
exported graph holds the merged weights). An adapter is refused, with a clear error, on a base
whose sha256 differs from the one it was trained on.

The classes here import neither Lightning nor ``peft`` at module level (``peft`` only inside
:func:`apply_lora`, for training: ``pip install 'lineside[adapt]'``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from lineside.fusion.checkpoint_file import CheckpointError, read_checkpoint
from torch import nn

__all__ = [
    "ADAPTER_FORMAT",
    "AdapterError",
    "LoraAdapter",
    "adapter_state",
    "apply_lora",
    "file_sha256",
    "load_adapter",
    "load_weights",
    "merge_adapter",
    "merge_peft_state",
    "model_state",
    "prepare_weights",
    "save_adapter",
    "write_run_adapter",
]

ADAPTER_FORMAT = "lineside-lora/1"
ADAPT_EXTRA = "pip install 'lineside[adapt]'"

# module-name patterns (full match): attention q/k/v + output projection and the feed-forward of the
# fusion transformer, the backbone's 1x1 convs (expansion conv_pw and projection conv_pwl of the
# inverted-residual blocks) and the encoder's 1x1 token projection
DEFAULT_TARGETS = [
    r"fusion\.encoder\.layers\.\d+\.self_attn",
    r"fusion\.encoder\.layers\.\d+\.linear[12]",
    r"image_encoder\.backbone\..*\.conv_pwl?",
    r"image_encoder\.proj\.\d+",
]
# parameter-name patterns (full match) trained in full beside the adapter when train_head is set
HEAD_PARAMS = [r"(grading|localization|grasp)_head\..*", r"heads\..*"]


class AdapterError(RuntimeError):
    """An adapter file is unreadable, or does not fit the base model it is applied to."""


@dataclass
class LoraAdapter:
    """LoRA settings of an adapter fit (``--model.adapter '{base: …, rank: 8}'`` or a YAML mapping).

    Args:
        base: the base model's checkpoint (``lineside fit`` ``best.ckpt``); its weights are loaded
            and frozen, and its sha256 is recorded in the adapter.
        rank: rank r of each ``B @ A`` update.
        alpha: scale numerator: the update is ``alpha / rank · B @ A``.
        targets: module names (regular expressions, full match) wrapped with LoRA; default: the
            fusion transformer's attention and feed-forward, the backbone's 1×1 convs and the
            encoder's 1×1 projection.
        dropout: dropout on the LoRA branch's input.
        train_head: train the task heads in full as well (stored in the adapter file).
        file: file name of the adapter written in the run folder (``trainer.default_root_dir``).
    """

    base: str
    rank: int = 8
    alpha: float = 16.0
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    dropout: float = 0.0
    train_head: bool = True
    file: str = "adapter.safetensors"

    @property
    def scale(self) -> float:
        return float(self.alpha) / float(self.rank)


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _peft():
    try:
        import peft
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise ImportError(f"LoRA adapter training needs peft: {ADAPT_EXTRA}") from exc
    return peft


def _freeze_norm_statistics(model: nn.Module) -> None:
    """Batch-norm layers keep the base's running statistics (eval mode whatever ``train()`` says)."""
    enc = getattr(model, "image_encoder", None)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase)]
    if enc is not None and isinstance(getattr(enc, "_frozen_norms", None), list):
        known = {id(m) for m in enc._frozen_norms}
        enc._frozen_norms.extend(m for m in norms if id(m) not in known)
    for m in norms:
        m.eval()


def peft_attention_out_factor() -> float:
    """How many times peft's LoRA on an ``nn.MultiheadAttention`` applies its output-projection update
    in the forward (peft 0.21 folds it in twice: once into the weight, once by the wrapped Linear's merge),
    measured on a small attention layer. Recorded with each adapter, so merging reproduces what was trained."""
    peft = _peft()
    gen = torch.Generator().manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    plain = nn.MultiheadAttention(8, 2, batch_first=True)
    plain.load_state_dict(mha.state_dict())
    holder = _Holder(mha)
    peft.inject_adapter_in_model(peft.LoraConfig(r=2, lora_alpha=2, target_modules=["mha"]), holder)
    mha = holder.mha
    out = mha.get_base_layer().out_proj
    for p in (out.lora_A["default"].weight, out.lora_B["default"].weight):
        p.data = torch.randn(p.shape, generator=gen)
    x = torch.randn(1, 3, 8, generator=gen)
    delta = _delta(out.lora_A["default"].weight, out.lora_B["default"].weight, 1.0, plain.out_proj.weight.shape)
    with torch.no_grad():
        y = mha(x, x, x, need_weights=False)[0]
        errors = {}
        for factor in (1.0, 2.0):
            probe = nn.MultiheadAttention(8, 2, batch_first=True)
            probe.load_state_dict(plain.state_dict())
            probe.out_proj.weight += factor * delta
            errors[factor] = float((probe(x, x, x, need_weights=False)[0] - y).abs().max())
    return min(errors, key=errors.get)


class _Holder(nn.Module):
    def __init__(self, mha: nn.Module) -> None:
        super().__init__()
        self.mha = mha


def apply_lora(model: nn.Module, adapter: LoraAdapter) -> dict[str, Any]:
    """Load ``adapter.base``'s weights into ``model``, wrap its targets with peft LoRA (in place) and
    freeze all but the LoRA tensors (and the heads with ``train_head``).

    Returns parameter counts (``trainable``, ``lora``, ``base_params``) and the base checkpoint's ``pruned``
    record. Raises :class:`AdapterError` when no module matches the targets.
    """
    meta = load_weights(model, adapter.base)
    names = [n for n, _ in model.named_modules()]
    pattern = "(?:" + "|".join(adapter.targets) + ")"
    matched = [n for n in names if re.fullmatch(pattern, n)]
    if not matched:
        raise AdapterError(f"adapter targets {adapter.targets} match no module of the model (e.g. {names[1:6]})")
    peft = _peft()
    config = peft.LoraConfig(r=int(adapter.rank), lora_alpha=adapter.alpha, lora_dropout=adapter.dropout, target_modules=pattern)
    peft.inject_adapter_in_model(config, model)
    head = "(?:" + "|".join(HEAD_PARAMS) + ")"
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name or (adapter.train_head and re.fullmatch(head, name) is not None))
    _freeze_norm_statistics(model)
    for layer in model.modules():
        # torch's fused encoder-layer kernel (eval, no grad) reads the attention's in-projection directly and
        # would skip peft's LoRA on it: such layers take the module path (this flag only selects the fused kernel)
        if isinstance(layer, nn.TransformerEncoderLayer) and not isinstance(layer.self_attn, nn.MultiheadAttention):
            layer.activation_relu_or_gelu = 0
    named = list(model.named_parameters())
    return {"attention_out_factor": peft_attention_out_factor(), "trainable": sum(p.numel() for _, p in named if p.requires_grad),
            "lora": sum(p.numel() for n, p in named if "lora_" in n),
            "base_params": sum(p.numel() for n, p in named if "lora_" not in n), "pruned": meta.get("pruned")}


def prepare_weights(model: nn.Module, init_from: str | None = None, adapter: dict | LoraAdapter | None = None) -> dict[str, Any]:
    """What ``InspectionModule(init_from=…, adapter=…)`` does to its model before training: load
    ``init_from``'s weights (a pruned checkpoint re-shapes the model first), or load ``adapter``'s base
    and wrap it with LoRA. Returns the record kept in the fit's checkpoints (``pruned``, ``adapter``)."""
    record: dict[str, Any] = {}
    if init_from and adapter:
        raise ValueError("give either init_from or adapter (whose base is the starting point), not both")
    if init_from:
        pruned = load_weights(model, init_from).get("pruned")
        if pruned:
            record["pruned"] = pruned
    if adapter:
        if isinstance(adapter, dict):
            try:
                adapter = LoraAdapter(**adapter)
            except TypeError as exc:
                raise ValueError(f"adapter: {exc}; fields: base, rank, alpha, targets, dropout, train_head, file") from exc
        counts = apply_lora(model, adapter)
        if counts.pop("pruned", None):
            record["pruned"] = True
        record["adapter"] = {**asdict(adapter), "scale": adapter.scale, "base_sha256": file_sha256(adapter.base), **counts}
    return record


def write_run_adapter(model: nn.Module, record: dict[str, Any], folder: str | os.PathLike, best_checkpoint: str | None = None) -> Path:
    """Write the adapter of ``best_checkpoint`` (else of ``model`` as it is) as ``folder/<record['file']>``
    with its ``.json`` record."""
    settings = LoraAdapter(**{k: record[k] for k in ("base", "rank", "alpha", "targets", "dropout", "train_head", "file")})
    if best_checkpoint and os.path.isfile(best_checkpoint):
        tensors = adapter_state(read_checkpoint(best_checkpoint)["state_dict"], settings.train_head, prefix="model.")
        source = os.fspath(best_checkpoint)
    else:
        tensors, source = adapter_state(model.state_dict(), settings.train_head), "end of fit"
    extra = {k: record[k] for k in ("attention_out_factor", "trainable", "lora", "base_params", "base_sha256") if k in record}
    return save_adapter(tensors, Path(folder) / settings.file, settings, {**extra, "checkpoint": source})


_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])\.[^.]+\.weight$")


def _plain(name: str) -> str:
    return name.replace(".base_layer", "")


def adapter_state(state: dict[str, torch.Tensor], train_head: bool = True, prefix: str = "") -> dict[str, torch.Tensor]:
    """The adapter's tensors from a peft-wrapped state dict (a model's, or a checkpoint's with ``prefix``):
    ``<module>.lora_A`` / ``<module>.lora_B`` under the plain (unwrapped) module names, and with
    ``train_head`` the heads' parameters as ``full.<name>``."""
    out: dict[str, torch.Tensor] = {}
    head = "(?:" + "|".join(HEAD_PARAMS) + ")"
    for key, value in state.items():
        if not key.startswith(prefix):
            continue
        key = key[len(prefix):]
        m = _LORA_KEY.match(key)
        if m:
            out[f"{_plain(m['module'])}.lora_{m['ab']}"] = value.detach().cpu().contiguous()
        elif train_head and re.fullmatch(head, _plain(key)):
            out[f"full.{_plain(key)}"] = value.detach().cpu().contiguous()
    return out


def _is_attention_out(module: str, names: Any) -> bool:
    """``module`` is the output projection of an attention layer (whose ``in_proj_weight`` is in ``names``)."""
    parent, _, last = module.rpartition(".")
    return last == "out_proj" and f"{parent}.in_proj_weight" in names


def merge_peft_state(state: dict[str, torch.Tensor], scale: float, attention_out_factor: float = 1.0) -> dict[str, torch.Tensor]:
    """A peft-wrapped state dict (keys with ``base_layer`` / ``lora_A``) → the plain model's state dict
    with each LoRA update merged into its weight. Keys without LoRA pass through unchanged.
    ``attention_out_factor``: see :func:`peft_attention_out_factor`."""
    plain: dict[str, torch.Tensor] = {}
    lora: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        m = _LORA_KEY.match(key)
        if m:
            lora.setdefault(_plain(m["module"]), {})[m["ab"]] = value
        else:
            plain[_plain(key)] = value
    for module, ab in lora.items():
        target = f"{module}.in_proj_weight" if f"{module}.in_proj_weight" in plain else f"{module}.weight"
        k = scale * (attention_out_factor if _is_attention_out(module, plain) else 1.0)
        plain[target] = plain[target] + _delta(ab["A"], ab["B"], k, plain[target].shape).to(plain[target].dtype)
    return plain


def _delta(a: torch.Tensor, b: torch.Tensor, scale: float, shape: torch.Size) -> torch.Tensor:
    """``scale · B @ A`` in the weight's shape (Linear (out, in), 1×1 Conv2d (out, in, 1, 1))."""
    return (scale * (b.float().flatten(1) @ a.float().flatten(1))).reshape(shape)


def model_state(ckpt: dict, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The pure model's state dict in a lineside checkpoint (``model.`` keys; an adapter fit's LoRA
    layers merged into their weights)."""
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{source}: no state_dict inside; expected a checkpoint from `lineside fit` or `lineside prune`")
    prefix = "model."
    state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    adapter = (ckpt.get("lineside") or {}).get("adapter")
    if adapter or any(".lora_A." in k for k in state):
        scale = float((adapter or {}).get("alpha", 1.0)) / float((adapter or {}).get("rank", 1))
        state = merge_peft_state(state, scale, float((adapter or {}).get("attention_out_factor", 1.0)))
    return state


def load_weights(model: nn.Module, path: str | os.PathLike, trust_checkpoint: bool = False) -> dict[str, Any]:
    """Load a lineside checkpoint's model weights into ``model`` (built from the same config), re-shaping
    it first when the checkpoint is pruned. Returns the checkpoint's ``lineside`` record.

    Raises :class:`CheckpointError` naming the file when the weights do not fit.
    """
    path = os.fspath(path)
    ckpt = read_checkpoint(path, "cpu", trust_checkpoint)
    meta = dict(ckpt.get("lineside") or {}) if isinstance(ckpt, dict) else {}
    state = model_state(ckpt, path)
    if meta.get("pruned"):
        from lineside.fusion.pruning import fit_to_state

        fit_to_state(model, state)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not fit the configured model (missing {missing[:5]}, unexpected {unexpected[:5]})")
    bad = [k for k, v in model.state_dict().items() if k in state and tuple(v.shape) != tuple(state[k].shape)]
    if bad:
        raise CheckpointError(f"{path}: weights do not fit the configured model (shapes differ: {bad[:5]})")
    return meta


def save_adapter(tensors: dict[str, torch.Tensor], path: str | os.PathLike, adapter: LoraAdapter,
                 extra: dict[str, Any] | None = None) -> Path:
    """Write ``path`` (safetensors) and ``path`` with ``.json`` (the adapter's record: format, rank,
    alpha, scale, targets, base file and its sha256, parameter counts …)."""
    from safetensors.torch import save_file

    path = Path(path)
    extra = dict(extra or {})
    record = {"format": ADAPTER_FORMAT, **asdict(adapter), "scale": adapter.scale,
              "base_sha256": extra.pop("base_sha256", None) or file_sha256(adapter.base),
              "adapter_params": int(sum(t.numel() for t in tensors.values())), **extra}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"lineside": json.dumps(record)})
    os.chmod(tmp, 0o644)  # safetensors writes 0600: a station's service user reads it too
    os.replace(tmp, path)
    path.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    return path


def load_adapter(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The adapter's tensors and record (plain safetensors: no code runs)."""
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise AdapterError(f"{path}: adapter file not found")
    try:
        with safe_open(path, framework="pt") as f:
            record = json.loads((f.metadata() or {}).get("lineside", "{}"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not iterable
    except Exception as exc:
        raise AdapterError(f"{path}: not a readable adapter file ({str(exc).splitlines()[0][:200]})") from exc
    if record.get("format") != ADAPTER_FORMAT:
        raise AdapterError(f"{path}: not a lineside LoRA adapter (format {record.get('format')!r}, expected {ADAPTER_FORMAT!r})")
    return tensors, record


def merge_adapter(model: nn.Module, path: str | os.PathLike, base_path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Fold the adapter in ``path`` into ``model``'s weights, in place (plain torch; no peft).

    ``base_path``: the checkpoint ``model`` was loaded from; refused (:class:`AdapterError`) when its
    sha256 differs from the base the adapter was trained on. Shapes are checked too. Returns the record.
    """
    tensors, record = load_adapter(path)
    if base_path is not None:
        sha = file_sha256(base_path)
        if sha != record.get("base_sha256"):
            raise AdapterError(
                f"{path}: adapter was trained on base {record.get('base')} (sha256 {str(record.get('base_sha256'))[:12]}…), "
                f"not on {os.fspath(base_path)} (sha256 {sha[:12]}…); load it with the base it was trained on")
    params = dict(model.named_parameters())
    scale = float(record["scale"])
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in tensors if ".lora_" in k})
    with torch.no_grad():
        for module in modules:
            name = f"{module}.in_proj_weight" if f"{module}.in_proj_weight" in params else f"{module}.weight"
            a, b = tensors.get(f"{module}.lora_A"), tensors.get(f"{module}.lora_B")
            if name not in params or a is None or b is None:
                raise AdapterError(f"{path}: adapter layer {module} does not exist in the model (wrong base?)")
            w = params[name]
            k = scale * (float(record.get("attention_out_factor", 1.0)) if _is_attention_out(module, params) else 1.0)
            if b.shape[0] != w.shape[0] or a.flatten(1).shape[1] != w.flatten(1).shape[1]:
                raise AdapterError(f"{path}: adapter layer {module} is {b.shape[0]}x{a.flatten(1).shape[1]}, the model's "
                                   f"{tuple(w.shape)} (wrong base?)")
            w.add_(_delta(a, b, k, w.shape).to(w.dtype))
        for key, value in tensors.items():
            if key.startswith("full."):
                name = key[len("full."):]
                if name not in params or params[name].shape != value.shape:
                    raise AdapterError(f"{path}: adapter tensor {name} {tuple(value.shape)} does not fit the model (wrong base?)")
                params[name].copy_(value)
    return record
