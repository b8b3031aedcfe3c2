"""Few-label transfer to a new product: fine-tuning + feature alignment (MMD) + a contrastive term.

    lineside fit --config configs/elpv_mono_poly.yaml      # a mono-cell ELPV model → poly cells, 200 labels

In a config: ``model.domain_transfer`` is a :class:`DomainTransferCriterion` (the
``InspectionModule`` hands it dict batches of
:class:`lineside.fusion.transfer_datamodule.TransferDataModule`), and the :class:`InitWeights`
callback starts training from the source model's checkpoint.

The case: a model trained on one product (ELPV monocrystalline cells) meets another (polycrystalline
cells: grain texture the mono model never saw) with a few hundred labelled cells and many unlabelled
ones. Each training step sees one batch of each of

* **labelled** target cells: the grading loss (the task's own criterion);
* **source** cells (replay, labelled): the grading loss again, so the source skill is kept;
* **unlabelled** target cells, as two augmented views: ``mmd_weight`` · MMD² between the pooled
  image-encoder features of the source and of the target batch
  (:class:`lineside.fusion.domain_alignment.GaussianMMD`, the wafer transfer's alignment), and
  ``contrastive_weight`` · InfoNCE between the two views (:func:`info_nce`, SimCLR's NT-Xent on a
  small projection head), which asks the encoder for features that tell poly cells apart without labels.

All batches go through the model together (one batch-norm statistic). The projection head is part of
the criterion, not of the model: it is dropped after training and never exported.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lineside.fusion.domain_alignment import GaussianMMD
from torch import Tensor, nn

__all__ = ["DomainTransferCriterion", "FeatureTap", "InitWeights", "info_nce", "load_model_weights"]


def info_nce(a: Tensor, b: Tensor, temperature: float = 0.2) -> Tensor:
    """SimCLR's NT-Xent: row ``i`` of ``a`` (N, D) and row ``i`` of ``b`` (N, D) are two views of one item.

    Each of the 2N embeddings is classified among the other 2N - 1 (cosine similarity / ``temperature``)
    with its partner as the positive. Lower when partners are closer than the other pairs; ``log(2N - 1)``
    for embeddings that carry no information.
    """
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"info_nce takes two (N, D) batches of views, got {tuple(a.shape)} and {tuple(b.shape)}")
    n = a.shape[0]
    z = F.normalize(torch.cat([a, b]).float(), dim=1)
    sim = z @ z.t() / temperature
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, target)


class FeatureTap:
    """Keeps the image encoder's tokens of the last forward, mean-pooled: ``value`` (B, D)."""

    def __init__(self, encoder: nn.Module) -> None:
        self.value: Tensor | None = None
        self.handle = encoder.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output) -> None:
        tokens = output.tokens if hasattr(output, "tokens") else output
        self.value = tokens.mean(1) if tokens.ndim == 3 else tokens.flatten(1)

    def remove(self) -> None:
        self.handle.remove()


class DomainTransferCriterion(nn.Module):
    """The unlabelled-data terms: ``loss_mmd`` (source vs target features) and ``loss_contrast`` (two views),
    and the training step over a dict of batches (:meth:`training_step`).

    Args:
        embed_dim: width of the pooled encoder features.
        mmd_weight / contrastive_weight: the terms' weights (0 switches a term off).
        temperature: InfoNCE temperature.
        projection_dim: output width of the contrastive projection head (a 2-layer MLP, SimCLR).

    Shapes:
        forward: source (Ns, D) or None, view1 (Nt, D), view2 (Nt, D) or None → weighted terms (scalars).
    """

    def __init__(self, embed_dim: int, mmd_weight: float = 0.0, contrastive_weight: float = 0.0, temperature: float = 0.2,
                 projection_dim: int = 64) -> None:
        super().__init__()
        self.weight_dict = {"loss_mmd": float(mmd_weight), "loss_contrast": float(contrastive_weight)}
        self.temperature = float(temperature)
        self.mmd = GaussianMMD()
        self.projector = nn.Sequential(nn.Linear(embed_dim, embed_dim), nn.ReLU(inplace=True), nn.Linear(embed_dim, projection_dim))

    @property
    def active(self) -> bool:
        return any(w > 0 for w in self.weight_dict.values())

    def forward(self, source: Tensor | None, view1: Tensor, view2: Tensor | None) -> dict[str, Tensor]:
        terms: dict[str, Tensor] = {}
        if self.weight_dict["loss_mmd"] > 0:
            if source is None:
                raise ValueError("the MMD term needs a batch of source cells (source replay) beside the unlabelled target cells")
            terms["loss_mmd"] = self.mmd(source, view1)
        if self.weight_dict["loss_contrast"] > 0:
            if view2 is None:
                raise ValueError("the contrastive term needs two views of the unlabelled target cells")
            terms["loss_contrast"] = info_nce(self.projector(view1), self.projector(view2), self.temperature)
        return terms

    def training_step(self, module, batch: dict) -> Tensor:
        """One step of ``module`` (an :class:`~lineside.fusion.lightning_module.InspectionModule`) on
        ``{"labelled", "source"?, "unlabelled"?}`` batches: the task losses on the labelled and source cells
        (the unlabelled ones carry grade -1, which the task criteria skip) plus this criterion's weighted terms."""
        parts = [batch["labelled"]] + ([batch["source"]] if "source" in batch else [])
        unl = batch.get("unlabelled")
        images = [p["image"] for p in parts]
        grades = [p["grade"] for p in parts]
        if unl is not None:
            views = [unl["image"]] + ([unl["image2"]] if "image2" in unl else [])
            images += views
            grades += [torch.full((sum(len(v) for v in views),), -1, dtype=torch.long, device=unl["image"].device)]
        sizes = [len(x) for x in images]
        combined = {"image": torch.cat(images), "grade": torch.cat(grades)}
        tap = FeatureTap(module.model.image_encoder)
        try:
            losses = module._losses(module.model(**module.model.batch_inputs(combined)), combined)
        finally:
            tap.remove()
        if unl is not None and self.active:
            feats = torch.split(tap.value, sizes)
            source = feats[1] if "source" in batch else None
            view2 = feats[len(parts) + 1] if "image2" in unl else None
            for k, v in self(source, feats[len(parts)], view2).items():
                losses[k] = v
                losses["loss"] = losses["loss"] + self.weight_dict[k] * v
        n = sizes[0]
        module.log_dict({f"train/{k}": v for k, v in losses.items()}, prog_bar=False, batch_size=n)
        module.log("loss", losses["loss"], prog_bar=True, logger=False, batch_size=n)
        return losses["loss"]


def load_model_weights(model: nn.Module, path, what: str = "init_from") -> None:
    """Load the ``model.*`` weights of a ``lineside fit`` checkpoint into ``model`` (optimizer state not taken)."""
    import os

    from lineside.fusion.checkpoint_file import read_checkpoint

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: {path}: no such checkpoint (train the source model first)")
    ckpt = read_checkpoint(os.fspath(path), "cpu", False)
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{what}: {path}: weights do not fit the configured model (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}); use the model config of that run")


class InitWeights(Callback):
    """Lightning callback: at fit start (not when resuming) load the model weights of checkpoint ``path``."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit" and trainer.ckpt_path is None:
            load_model_weights(pl_module.model, self.path)
