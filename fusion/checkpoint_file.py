"""Reading a checkpoint file without running code from it.

A ``.ckpt`` is a pickle: unpickled without care, a file copied to a station from elsewhere can
run anything. :func:`read_checkpoint` loads with ``torch.load(..., weights_only=True)``, which
rebuilds tensors, containers and plain values only. Every checkpoint lineside writes
(``lineside fit`` / Lightning checkpoints, ``ensemble.ckpt`` from ``lineside crossval``, and
those written before the single ``lineside`` namespace) holds nothing else: hyper-parameters
are recorded as plain ``class_path`` / ``init_args`` dicts, so :data:`CHECKPOINT_SAFE_GLOBALS`
is empty. A class a future checkpoint needs goes there, and only there (it is allowed within
the load, never process-wide).

Anything else is refused with a :class:`CheckpointError` naming the file and what its pickle
asks for, unless the caller trusts the file (``--trust-checkpoint`` on the command line), in
which case it is loaded as a full pickle.

Pure torch, no Lightning: the exporter and the station read checkpoints through here too.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
from typing import Any

import torch

__all__ = ["CHECKPOINT_SAFE_GLOBALS", "CheckpointError", "TRUST_CHECKPOINT_FLAG", "read_checkpoint", "unsafe_globals"]

log = logging.getLogger("lineside.checkpoint")

TRUST_CHECKPOINT_FLAG = "--trust-checkpoint"

# Classes/functions, beyond torch's own weights-only allowlist, that lineside checkpoints need.
# Measured on checkpoints of every kind lineside writes (torch.serialization.get_unsafe_globals_in_checkpoint): none.
CHECKPOINT_SAFE_GLOBALS: tuple[Any, ...] = ()

# what torch's weights-only unpickler names in its refusal
_REFUSED_GLOBAL = re.compile(r"GLOBAL (\S+?)(?: was not an allowed global| whose module)")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, refused as unsafe or lacks what is needed to rebuild the model."""


def unsafe_globals(path: str | os.PathLike) -> list[str]:
    """The globals (``module.name``) the pickle of ``path`` names that a weights-only load refuses.

    Read from the pickle's opcodes without running it; empty for a file that is not a
    ``torch.save`` zip archive.
    """
    try:
        with torch.serialization.safe_globals(list(CHECKPOINT_SAFE_GLOBALS)):
            return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(os.fspath(path)))
    except Exception:  # noqa: BLE001 - legacy or corrupt files: the loader's own message says why
        return []


def read_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu", trust_checkpoint: bool = False) -> Any:
    """The object saved in ``path``, loaded with ``weights_only=True``.

    Args:
        path: a ``torch.save`` file (a Lightning checkpoint, ``ensemble.ckpt`` …).
        map_location: as for :func:`torch.load`.
        trust_checkpoint: when the weights-only load refuses the file, load it as a full pickle
            (runs whatever code the file holds: only for a file from a trusted source).

    Raises:
        CheckpointError: the file is missing or unreadable, or a weights-only load refuses it
            (the message names the file, what its pickle asks for and :data:`TRUST_CHECKPOINT_FLAG`)
            and ``trust_checkpoint`` is False.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        with torch.serialization.safe_globals(list(CHECKPOINT_SAFE_GLOBALS)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:  # the weights-only unpickler refused something
        refusal = str(exc)
    except Exception as exc:  # noqa: BLE001 - any other failure means an unusable file
        raise CheckpointError(f"{path}: not a readable checkpoint ({_first_line(str(exc))})") from exc
    offending = unsafe_globals(path) or sorted(set(_REFUSED_GLOBAL.findall(refusal)))
    what = f"its pickle names {', '.join(offending)}" if offending else f"its pickle holds more than weights ({_reason(refusal)})"
    if not trust_checkpoint:
        raise CheckpointError(
            f"{path}: refused to load: {what}, which a weights-only load does not allow; unpickling it could run "
            f"arbitrary code. Pass {TRUST_CHECKPOINT_FLAG} only if this file comes from a trusted source "
            "(for example your own `lineside fit` run)."
        )
    log.warning("%s: %s; loading it as a full pickle because the checkpoint is trusted (%s)", path, what, TRUST_CHECKPOINT_FLAG)
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"{path}: not a readable checkpoint ({_first_line(str(exc))})") from exc


def _first_line(text: str) -> str:
    return (text.strip().splitlines() or [""])[0][:300]


def _reason(refusal: str) -> str:
    """The weights-only unpickler's own words, without torch's advice around them."""
    tail = refusal.rpartition("WeightsUnpickler error:")[2] or refusal
    return _first_line(tail)
