"""Continual learning: EWC penalty and callback, class-dimension growth of heads, replay share."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from lineside.fusion import FusionTransformer, GradingHead, InspectionModel
from lineside.fusion.continual import (
    ContinualDetectionDataModule,
    ElasticWeightConsolidation,
    diagonal_fisher,
    ewc_penalty,
    expand_classes,
    load_expanded_state_dict,
    replay_buffer,
)
from lineside.fusion.lightning_module import InspectionModule
from lineside.fusion.localization_head import LocalizationHead
from lineside.vision import ImageEncoder
from lineside.vision.box_records import DetectionRecord

D = 16


def _grading_model(k: int = 3, seed: int = 0) -> InspectionModel:
    torch.manual_seed(seed)
    enc = ImageEncoder(backbone="test_efficientnet", embed_dim=D, in_chans=1, feature_levels=[-1], pretrained=False)
    return InspectionModel(image_encoder=enc, fusion=FusionTransformer(embed_dim=D, depth=1, num_heads=2, dropout=0.0),
                           grading_head=GradingHead(D, k, dropout=0.0))


# ----------------------------------------------------------------------------- EWC penalty


def test_ewc_penalty_zero_at_old_weights_and_quadratic_away():
    model = nn.Linear(5, 3)
    anchor = {n: p.detach().clone() for n, p in model.named_parameters()}
    fisher = {n: torch.rand_like(p) + 0.1 for n, p in model.named_parameters()}
    with torch.no_grad():
        assert float(ewc_penalty(model.named_parameters(), fisher, anchor)) == 0.0
    direction = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    values = []
    for step in (0.1, 0.2, 0.4):
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(anchor[n] + step * direction[n])
        values.append(float(ewc_penalty(model.named_parameters(), fisher, anchor)))
    assert 0 < values[0] < values[1] < values[2]
    assert values[1] / values[0] == pytest.approx(4.0, rel=1e-4)  # doubling the distance quadruples it
    assert values[2] / values[1] == pytest.approx(4.0, rel=1e-4)
    expected = sum(float((fisher[n] * (0.4 * direction[n]) ** 2).sum()) for n in fisher)
    assert values[2] == pytest.approx(expected, rel=1e-5)


def test_ewc_penalty_ignores_grown_rows_and_zero_fisher():
    model = nn.Linear(4, 5)  # grown from 3 classes
    anchor = {"weight": model.weight[:3].detach().clone(), "bias": model.bias[:3].detach().clone()}
    fisher = {"weight": torch.ones(3, 4), "bias": torch.ones(3)}
    with torch.no_grad():
        model.weight[3:] += 10.0  # new rows move freely
        model.bias[3:] -= 5.0
    assert float(ewc_penalty(model.named_parameters(), fisher, anchor)) == 0.0
    with torch.no_grad():
        model.weight[0, 0] += 0.5
    assert float(ewc_penalty(model.named_parameters(), fisher, anchor)) == pytest.approx(0.25)
    zero = {"weight": torch.zeros(3, 4), "bias": torch.zeros(3)}
    assert float(ewc_penalty(model.named_parameters(), zero, anchor)) == 0.0  # unimportant weights are free


def test_diagonal_fisher_is_mean_squared_gradient():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    batches = [{"x": torch.randn(4, 3), "y": torch.randint(0, 2, (4,))} for _ in range(3)]

    def loss_fn(b):
        return nn.functional.cross_entropy(model(b["x"]), b["y"])

    expected = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for b in batches:
        grads = torch.autograd.grad(loss_fn(b), list(model.parameters()))
        for (n, _), g in zip(model.named_parameters(), grads):
            expected[n] += g**2 / len(batches)
    raw = diagonal_fisher(model, loss_fn, batches, normalize=False)
    for n in expected:
        assert torch.allclose(raw[n], expected[n], atol=1e-7)
    normed = diagonal_fisher(model, loss_fn, batches)
    flat = torch.cat([f.flatten() for f in normed.values()])
    assert float(flat.mean()) == pytest.approx(1.0, rel=1e-5)
    assert all(p.grad is None for p in model.parameters())
    assert len(diagonal_fisher(model, loss_fn, iter(batches * 5), max_batches=2, normalize=False)) == 2


def test_ewc_callback_adds_penalty_to_training_loss(tmp_path):
    import lightning as L

    torch.manual_seed(0)
    module = InspectionModule(_grading_model(3))
    anchor = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    fisher = {n: torch.ones_like(p) for n, p in module.model.named_parameters()}
    with torch.no_grad():  # step 2 starts away from the step-1 weights
        module.model.grading_head.fc.weight.add_(0.3)
    torch.save({"fisher": fisher, "anchor": anchor}, tmp_path / "fisher.pt")
    ewc = ElasticWeightConsolidation(weight=2.0, fisher=str(tmp_path / "fisher.pt"))
    expected = 2.0 * float(ewc_penalty(module.model.named_parameters(), fisher, anchor))
    assert expected > 0

    images = torch.randint(0, 256, (4, 1, 64, 64), dtype=torch.uint8)
    grades = torch.tensor([0, 1, 2, 1])
    loader = torch.utils.data.DataLoader([0], collate_fn=lambda _: {"image": images, "grade": grades})
    seen = {}

    class Spy(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.update({k: float(v) for k, v in trainer.callback_metrics.items()})
            seen["returned"] = float(outputs["loss"])

    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[ewc, Spy()], log_every_n_steps=1,
                        default_root_dir=tmp_path)
    trainer.fit(module, train_dataloaders=loader)
    assert seen["train/loss_ewc"] == pytest.approx(expected, rel=1e-4)
    assert seen["returned"] == pytest.approx(seen["train/loss_grading"] + seen["train/loss_ewc"], rel=1e-5)
    assert ewc not in module.loss_hooks  # removed at fit end


def test_ewc_needs_a_fisher():
    with pytest.raises(ValueError, match="fisher"):
        ElasticWeightConsolidation(weight=1.0)


# ----------------------------------------------------------------------------- head growth


def test_expand_localization_head_keeps_old_outputs():
    from lineside.fusion.fusion_transformer import FusionOutput

    torch.manual_seed(0)
    head = LocalizationHead(embed_dim=D, num_classes=3, num_convs=1).eval()
    tokens = torch.randn(2, 16, D)
    fused = FusionOutput(tokens=tokens, queries=torch.zeros(2, 1, D), padding_mask=torch.zeros(2, 16, dtype=torch.bool),
                         spans={"image": (0, 16)})

    class Image:
        levels = ((4, 4),)

    head.level_tokens = lambda fused, image: (fused.tokens, 4, 4)
    before = head(fused, Image())
    expand_classes(head, 5)
    after = head(fused, Image())
    assert head.num_classes == 5 and after.heatmap.shape == (2, 5, 4, 4)
    assert torch.equal(after.heatmap[:, :3], before.heatmap)
    for field in ("size", "offset", "defect"):
        assert torch.equal(getattr(after, field), getattr(before, field))
    assert torch.allclose(head.heatmap[-1].bias[3:], torch.full((2,), -2.19))
    with pytest.raises(ValueError, match="shrink"):
        expand_classes(head, 2)


def test_expand_grading_head_keeps_old_logits():
    torch.manual_seed(0)
    model = _grading_model(3).eval()
    x = torch.randint(0, 256, (2, 1, 64, 64), dtype=torch.uint8)
    before = model(image=x).grade_logits
    expand_classes(model.grading_head, 5)
    after = model(image=x).grade_logits
    assert after.shape == (2, 5) and model.grading_head.num_grades == 5
    assert torch.allclose(after[:, :3], before, rtol=0, atol=1e-6)  # same weights; only the summation order may differ
    with pytest.raises(TypeError):
        expand_classes(nn.Linear(2, 2), 3)


def test_load_expanded_state_dict_copies_old_rows():
    old = _grading_model(3, seed=0).eval()
    new = _grading_model(5, seed=1).eval()
    grown = load_expanded_state_dict(new, old.state_dict())
    assert sorted(grown) == ["grading_head.fc.bias", "grading_head.fc.weight"]
    x = torch.randint(0, 256, (2, 1, 64, 64), dtype=torch.uint8)
    assert torch.allclose(new(image=x).grade_logits[:, :3], old(image=x).grade_logits, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="do not fit"):
        load_expanded_state_dict(_grading_model(2), new.state_dict())  # rows may grow, never shrink


# ----------------------------------------------------------------------------- replay


def _records(counts: dict[str, int]) -> list[DetectionRecord]:
    out = []
    for label, (cls, n) in enumerate(counts.items()):
        for i in range(n):
            out.append(DetectionRecord(f"{cls}_{i}.jpg", np.array([[1, 1, 5, 5]], np.float32), np.array([label]), 10, 10, image_class=cls))
    return out


def test_replay_buffer_share_and_strata():
    records = _records({"a": 100, "b": 60, "c": 40})
    picked = replay_buffer(records, 0.05, seed=0)
    assert len(picked) == 10
    by_class = {c: sum(r.image_class == c for r in picked) for c in "abc"}
    assert by_class == {"a": 5, "b": 3, "c": 2}
    assert len({r.path for r in picked}) == 10 and set(picked) <= set(records)
    assert [r.path for r in replay_buffer(records, 0.05, seed=0)] == [r.path for r in picked]  # seeded
    assert replay_buffer(records, 0.0) == []
    assert len(replay_buffer(records[:5], 0.05)) == 1  # at least one image
    with pytest.raises(ValueError):
        replay_buffer(records, 1.5)


def test_continual_datamodule_steps_and_replay(shared_data):
    root = shared_data / "neu_det"
    if not root.is_dir():
        pytest.skip(f"{root} absent")
    old, new = ["crazing", "inclusion", "patches"], ["pitted_surface", "rolled-in_scale", "scratches"]
    step1 = ContinualDetectionDataModule(root=str(root), classes=old)
    s1 = step1.prepare_splits()
    assert step1.class_names == old and step1.num_classes == 3
    assert all(r.num_boxes and set(r.labels.tolist()) <= {0, 1, 2} for r in s1["train"])
    kw = dict(root=str(root), classes=old + new, train_classes=new, replay_classes=old)
    plain = ContinualDetectionDataModule(**kw).prepare_splits()
    dm = ContinualDetectionDataModule(**kw, replay_fraction=0.05)
    s2 = dm.prepare_splits()
    assert all(set(r.labels.tolist()) <= {3, 4, 5} for r in plain["train"])
    assert len(dm.replayed) == round(0.05 * len(s1["train"]))
    assert len(s2["train"]) == len(plain["train"]) + len(dm.replayed)
    share = len(dm.replayed) / len(s2["train"])
    assert share == pytest.approx(len(dm.replayed) / (len(plain["train"]) + len(dm.replayed)))
    assert {r.path for r in dm.replayed} <= {r.path for r in s1["train"]}
    assert all(set(r.labels.tolist()) <= {0, 1, 2} for r in dm.replayed)
    assert len(s2["test"]) == len(s1["test"]) == 240  # every test image, in both steps
    assert sum(r.num_boxes for r in s2["test"]) > sum(r.num_boxes for r in s1["test"])
    with pytest.raises(ValueError, match="not classes"):
        ContinualDetectionDataModule(root=str(root), classes=["rust"]).prepare_splits()


# ----------------------------------------------------------------------------- the two steps through the CLI


def test_two_steps_through_the_cli(shared_data, tmp_path):
    """configs/neu_det_step{1,2}.yaml with a tiny model: step 1 writes fisher.pt, step 2 grows the head,
    replays and adds the EWC penalty (0 at the first step, where the weights are step 1's)."""
    import csv

    from lineside.fusion.training_cli import main

    root = shared_data / "neu_det"
    if not root.is_dir():
        pytest.skip(f"{root} absent")
    enc = "--model.model.init_args.image_encoder.init_args."
    tiny = [f"{enc}backbone=test_efficientnet", f"{enc}pretrained=false", f"{enc}embed_dim=32", f"{enc}frozen_levels=0",
            "--model.model.init_args.fusion.init_args.embed_dim=32", "--model.model.init_args.fusion.init_args.num_heads=2",
            "--model.model.init_args.localization_head.init_args.embed_dim=32",
            "--data.image_size=64", "--data.limit=16", "--data.batch_size=4", "--data.num_workers=0", f"--data.root={root}",
            "--trainer.accelerator=cpu", "--trainer.max_steps=2", "--trainer.limit_val_batches=1", "--trainer.log_every_n_steps=1",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
    step1, step2 = tmp_path / "step1", tmp_path / "step2"
    main(["fit", "--config", "configs/neu_det_step1.yaml", f"--trainer.default_root_dir={step1}",
          "--trainer.callbacks.init_args.fisher_batches=2", *tiny])
    assert (step1 / "fisher.pt").is_file()
    main(["fit", "--config", "configs/neu_det_step2.yaml", f"--trainer.default_root_dir={step2}",
          f"--trainer.callbacks.init_args.checkpoint={step1 / 'checkpoints' / 'last.ckpt'}",
          "--trainer.callbacks+=lineside.fusion.continual.ElasticWeightConsolidation",
          f"--trainer.callbacks.fisher={step1 / 'fisher.pt'}", "--trainer.callbacks.weight=5.0",
          "--data.replay_fraction=0.05", *tiny])
    rows = list(csv.DictReader(open(next(step2.rglob("metrics.csv")))))
    ewc = [float(r["train/loss_ewc"]) for r in rows if r.get("train/loss_ewc")]
    assert len(ewc) == 2 and ewc[0] == pytest.approx(0.0, abs=1e-9) and ewc[1] > 0
    state = torch.load(step2 / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert state["model.localization_head.heatmap.2.weight"].shape[0] == 6
