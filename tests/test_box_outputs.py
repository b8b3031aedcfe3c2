"""Boxes and heatmaps out of every path: the grading head's class-activation map (exact, exported with
parity), box parity rules, ``lineside score`` boxes in original-image pixels (eager and ONNX), heatmap
PNGs and overlays, and the station's records."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lineside.export.checkpoint import LoadedModel
from lineside.export.deployable import build_deployable
from lineside.export.parity import TOLERANCES, compare_outputs, tolerance_for
from lineside.fusion.fusion_transformer import FusionTransformer
from lineside.fusion.grade_heatmap import GradeHeatmapDecoder
from lineside.fusion.grading_head import GradingHead
from lineside.fusion.localization_head import LocalizationHead
from lineside.fusion.model import InspectionModel
from lineside.vision.image_encoder import ImageEncoder
from lineside.runtime.verify import verify_artefact

SIZE = 64  # training size: stride 16 → 4×4 cells, stride 32 → 2×2
BOX_CLASSES = ["crazing", "inclusion", "patches"]


def tiny_model(grading: bool = True, localization: bool = True, seed: int = 0) -> InspectionModel:
    torch.manual_seed(seed)
    encoder = ImageEncoder(backbone="test_efficientnet", pretrained=False, feature_levels=[-2, -1], embed_dim=32, in_chans=1)
    fusion = FusionTransformer(embed_dim=32, depth=1, dropout=0.0)
    head = LocalizationHead(32, len(BOX_CLASSES), level_index=0, num_convs=1) if localization else None
    if head is not None:  # untrained heatmaps near 0.5 instead of the 0.1 prior: boxes above the 0.3 threshold
        torch.nn.init.constant_(head.heatmap[-1].bias, 0.0)
        torch.nn.init.normal_(head.heatmap[-1].weight, std=0.3)
    return InspectionModel(encoder, fusion, GradingHead(32, 4, dropout=0.0) if grading else None, localization_head=head).eval()


def loaded(grading: bool = True, localization: bool = True) -> LoadedModel:
    tasks = (["grading"] if grading else []) + (["localization"] if localization else [])
    return LoadedModel(tiny_model(grading, localization), ["ok", "mild", "moderate", "severe"] if grading else [], SIZE, 1,
                       box_class_names=BOX_CLASSES if localization else [], tasks=tasks)


def textured(seed: int, size=(SIZE, SIZE)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = rng.integers(60, 120, size=size).astype(np.uint8)
    y, x = rng.integers(8, size[0] - 24), rng.integers(8, size[1] - 24)
    img[y : y + 14, x : x + 6] = 250  # a bright "defect"
    return img


# --------------------------------------------------------------------------- the grading head's map


def test_token_contributions_add_up_to_the_logits() -> None:
    model = tiny_model(localization=False)
    x = torch.randint(0, 256, (3, 1, SIZE, SIZE), dtype=torch.uint8)
    with torch.no_grad():
        enc = model.encode(x)
        fused = model.fusion(enc)
        head = model.grading_head
        logits = head(fused)
        contrib = head.token_contributions(fused)
        # the part every token shares: query half of the LayerNorm'd input, biases
        pooled = fused.tokens.mean(1)
        v = torch.cat([fused.queries[:, 0], pooled], -1)
        mu, sigma = v.mean(-1, keepdim=True), (v.var(-1, unbiased=False, keepdim=True) + head.norm.eps).sqrt()
        d = pooled.shape[-1]
        yq = (fused.queries[:, 0] - mu) / sigma * head.norm.weight[:d] + head.norm.bias[:d]
        const = yq @ head.fc.weight[:, :d].T + head.norm.bias[d:] @ head.fc.weight[:, d:].T + head.fc.bias
        torch.testing.assert_close(const + contrib.sum(-1), logits, atol=1e-5, rtol=1e-5)
        # the image map: both levels (4×4 and 2×2) on the 4×4 grid, summing to the image tokens' share
        gmap = head.grade_map(fused, enc["image"])
        assert gmap.shape == (3, 4, 4, 4)
        start, end = fused.spans["image"]
        torch.testing.assert_close(gmap.sum((-2, -1)), contrib[:, :, start:end].sum(-1), atol=1e-5, rtol=1e-4)
        assert model(x).grade_map is None and model(x, grade_map=True).grade_map.shape == (3, 4, 4, 4)


def test_grade_heatmap_decoder_on_a_hand_made_map() -> None:
    dec = GradeHeatmapDecoder((4, 4))
    cam = torch.zeros(2, 4, 4, 4)
    cam[:, 3, 1, 2] = 2.0  # one cell pushes towards "severe"
    cam[:, 0, 3, 0] = 1.0  # another towards "ok"
    probs = torch.tensor([[0.1, 0.0, 0.0, 0.9], [0.95, 0.0, 0.0, 0.05]])
    heat = dec(cam, probs)
    assert heat.shape == (2, 1, 4, 4) and heat.dtype == torch.float32
    assert heat.min() >= 0 and heat.max() <= 1
    for i, p in enumerate(probs):
        assert heat[i, 0].flatten().argmax().item() == 1 * 4 + 2  # the severe cell is the hot one
        assert math.isclose(heat[i, 0, 1, 2].item(), 1 - p[0].item(), rel_tol=1e-5)  # its heat is P(defective)
        assert heat[i, 0, 3, 0] == 0  # the cell voting "ok" stays cold
    assert [s.name for s in dec.outputs()] == ["grade_heatmap"]


def test_deployable_outputs_and_onnx_parity_of_every_head(tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    from lineside.export.onnx_export import export_onnx

    lm = loaded()
    d = build_deployable(lm)
    assert d.output_names == ["grade_probs", "grade", "grade_heatmap", "boxes", "box_scores", "box_labels", "defect_heatmap"]
    out = d.run(torch.from_numpy(np.stack([textured(i)[None] for i in range(3)])))
    assert out["grade_heatmap"].shape == (3, 1, 4, 4) and float(out["grade_heatmap"].max()) <= 1.0
    assert out["boxes"].shape[-1] == 4 and out["box_labels"].dtype == torch.int64
    assert "grade_heatmap" not in build_deployable(loaded(grading=False)).output_names
    r = export_onnx(lm, tmp_path / "onnx", parity_images=8, verify=verify_artefact)
    rows = {row.output: row for row in r.parity.rows}
    assert r.ok, r.parity.table()
    assert set(rows) == set(d.output_names) and rows["boxes"].metric == "matched"
    assert "boxes ≥ 0.3" in rows["boxes"].detail and not rows["boxes"].detail.startswith("0 boxes")  # boxes were compared
    meta = json.loads((tmp_path / "onnx" / "metadata.json").read_text())
    assert [(o["name"], o["kind"]) for o in meta["outputs"]][2:6] == [
        ("grade_heatmap", "heatmap"), ("boxes", "box"), ("box_scores", "box_score"), ("box_labels", "box_label")]


def test_test_time_views_ensembles_and_peak_suppression() -> None:
    from lineside.export.deployable import DeployableModel
    from lineside.fusion.ensemble import InspectionEnsemble

    lm = loaded()
    x = torch.from_numpy(np.stack([textured(i)[None] for i in range(3)]))
    one, four = build_deployable(lm), build_deployable(lm, tta_views=4)
    assert one.box_decoder.pool_kernel == 3 and four.box_decoder.tta_views == 4  # 3×3 peak suppression in every artefact
    a, b = one.run(x), four.run(x)
    torch.testing.assert_close(a["boxes"], b["boxes"], atol=1e-4, rtol=0)  # boxes and maps: the identity view
    assert b["grade_heatmap"].shape == (3, 1, 4, 4)
    ens = InspectionEnsemble([tiny_model(localization=False, seed=s) for s in (1, 2)]).eval()
    heat = DeployableModel(ens, (SIZE, SIZE), class_names=lm.class_names).run(x)["grade_heatmap"]
    assert heat.shape == (3, 1, 4, 4) and 0 <= heat.min() and heat.max() <= 1


# --------------------------------------------------------------------------- parity rules for boxes


SPECS = [{"name": "boxes", "kind": "box"}, {"name": "box_scores", "kind": "box_score"}, {"name": "box_labels", "kind": "box_label"}]


def _dets():
    boxes = np.array([[[10, 10, 50, 40], [12, 11, 49, 41], [60, 60, 90, 80], [0, 0, 5, 5]]], np.float32)
    scores = np.array([[0.9, 0.6000001, 0.6, 0.1]], np.float32)
    labels = np.array([[1, 2, 0, 1]])
    return {"boxes": boxes, "box_scores": scores, "box_labels": labels}


def _rows(ref, cand):
    return {r.output: r for r in compare_outputs(ref, cand, SPECS, TOLERANCES["fp32"])}


def test_box_parity_forgives_near_tie_order_and_float_noise_but_not_moved_or_relabelled_boxes() -> None:
    ref = _dets()
    swapped = {k: v.copy() for k, v in ref.items()}
    for k in swapped:  # a near tie changes places in the top-K order, coordinates carry 0.3 px of noise
        swapped[k][0, [1, 2]] = swapped[k][0, [2, 1]]
    swapped["boxes"] += 0.3
    swapped["boxes"][0, 3] += 40  # a box below the threshold may differ
    rows = _rows(ref, swapped)
    assert rows["boxes"].ok and rows["boxes"].value == 1.0 and rows["box_labels"].ok
    moved = {k: v.copy() for k, v in ref.items()}
    moved["boxes"][0, 2, 0] += 0.6
    assert not _rows(ref, moved)["boxes"].ok
    relabelled = {k: v.copy() for k, v in ref.items()}
    relabelled["box_labels"][0, 0] = 0
    rows = _rows(ref, relabelled)
    assert not rows["boxes"].ok and not rows["box_labels"].ok
    extra = {k: v.copy() for k, v in ref.items()}
    extra["box_scores"][0, 3] = 0.5  # the candidate reports a box the reference scores below the threshold
    assert not _rows(ref, extra)["box_labels"].ok


def test_box_corner_limit_follows_precision_and_frame_scale() -> None:
    """Corners within max(0.5 px, 16·u·frame extent): 0.5 px at fp32, 0.70 px at fp16 for a 90-px extent."""
    ref = _dets()
    moved = {k: v.copy() for k, v in ref.items()}
    moved["boxes"][0, 2, 0] += 0.6
    fp16 = {r.output: r for r in compare_outputs(ref, moved, SPECS, "fp16")}
    assert fp16["boxes"].ok and "(limit 0.7)" in fp16["boxes"].detail
    assert not _rows(ref, moved)["boxes"].ok
    moved["boxes"][0, 2, 0] += 1.0  # 1.6 px: a moved box at fp16 too, unless the flag widens the corners
    assert not compare_outputs(ref, moved, SPECS, "fp16")[0].ok
    assert compare_outputs(ref, moved, SPECS, tolerance_for("fp16", "box_px=2"))[0].ok


# --------------------------------------------------------------------------- score and station


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Frames at the model's size and exact 2× / 3×2 nearest-neighbour enlargements of them: the model
    sees the same pixels (half-pixel bilinear resize of a repeated image), so boxes must scale exactly."""
    d = tmp_path_factory.mktemp("frames")
    for i in range(3):
        img = textured(i)
        Image.fromarray(img).save(d / f"f{i}.png")
        Image.fromarray(img.repeat(2, 0).repeat(2, 1)).save(d / f"f{i}_x2.png")
        Image.fromarray(img.repeat(2, 0).repeat(3, 1)).save(d / f"f{i}_w3h2.png")
    return d


def _read(path: Path) -> dict[str, dict]:
    with open(path, newline="") as fh:
        return {Path(r["path"]).name: r for r in csv.DictReader(fh)}


def _assert_scaled(small: list[dict], big: list[dict], sx: float, sy: float) -> None:
    assert small and len(small) == len(big)
    for a, b in zip(small, big):
        assert a["label"] == b["label"] and a["label"] in BOX_CLASSES and a["score"] == pytest.approx(b["score"], abs=1e-3)
        np.testing.assert_allclose(b["box"], np.array(a["box"]) * [sx, sy, sx, sy], atol=0.25)


@pytest.mark.parametrize("path", ["eager", "onnx"])
def test_score_gives_boxes_in_original_pixels_heatmaps_and_overlays(images, tmp_path, path) -> None:
    from lineside.runtime.score import score

    lm = loaded()
    model = lm
    if path == "onnx":
        pytest.importorskip("onnxruntime")
        from lineside.export.onnx_export import export_onnx

        model = str(export_onnx(lm, tmp_path / "onnx", parity_images=0).path)
    out = tmp_path / "res.csv"
    s = score(model, str(images), out, overlays=tmp_path / "ov", heatmaps=tmp_path / "hm", num_workers=0, progress=False)
    assert s.scored == 9 and s.errors == 0
    rows = _read(out)
    first = next(iter(rows.values()))
    assert list(first) == ["path", "grade", "grade_name", "confidence", "p_ok", "p_mild", "p_moderate", "p_severe", "boxes", "heatmap", "error"]
    for i in range(3):
        small = json.loads(rows[f"f{i}.png"]["boxes"])
        assert all(b["score"] >= 0.3 for b in small) and small == sorted(small, key=lambda b: -b["score"])
        _assert_scaled(small, json.loads(rows[f"f{i}_x2.png"]["boxes"]), 2, 2)
        _assert_scaled(small, json.loads(rows[f"f{i}_w3h2.png"]["boxes"]), 3, 2)
        for name, wh in ((f"f{i}.png", (SIZE, SIZE)), (f"f{i}_w3h2.png", (3 * SIZE, 2 * SIZE))):
            heat = Image.open(rows[name]["heatmap"])
            assert heat.size == wh and heat.mode == "L"
            overlay = Image.open(tmp_path / "ov" / name)
            f = -(-256 // min(wh))  # small images are enlarged by a whole factor for their overlays
            assert overlay.size == (wh[0] * f, wh[1] * f)
            original = np.asarray(Image.open(images / name).convert("RGB").resize(overlay.size, Image.NEAREST), np.int16)
            assert np.abs(np.asarray(overlay.convert("RGB"), np.int16) - original).max() > 50  # drawn on
    # a higher threshold keeps fewer boxes, none below it
    out2 = tmp_path / "res_hi.csv"
    score(model, str(images), out2, box_threshold=0.55, num_workers=0, progress=False)
    hi = [b for r in _read(out2).values() for b in json.loads(r["boxes"])]
    lo = [b for r in rows.values() for b in json.loads(r["boxes"])]
    assert all(b["score"] >= 0.55 for b in hi) and len(hi) < len(lo)


def test_outputs_written_inside_the_input_folder_are_not_inputs_next_time(tmp_path) -> None:
    from lineside.runtime.score import score

    for i in range(3):
        Image.fromarray(textured(i)).save(tmp_path / f"f{i}.png")
    kw = dict(overlays=tmp_path / "ov", heatmaps=tmp_path / "hm", num_workers=0, progress=False)
    first = score(loaded(grading=False), str(tmp_path), tmp_path / "r.csv", **kw)
    again = score(loaded(grading=False), str(tmp_path), tmp_path / "r.csv", **kw)
    assert (first.total, first.scored) == (3, 3) and (again.total, again.skipped, again.scored, again.errors) == (3, 3, 0, 0)


def test_localization_only_model_writes_no_grade_columns(images, tmp_path, capsys) -> None:
    from lineside.runtime.score import score

    out = tmp_path / "res.csv"
    score(loaded(grading=False), str(images), out, overlays=tmp_path / "ov", num_workers=0, progress=False)
    rows = _read(out)
    assert list(next(iter(rows.values()))) == ["path", "boxes", "error"]
    assert json.loads(rows["f0_x2.png"]["boxes"]) and (tmp_path / "ov" / "f0_x2.png").is_file()


def test_grading_only_model_heatmap_column_and_refusal_without_heatmap(images, tmp_path) -> None:
    from lineside.runtime.score import score
    from lineside.vision.io import InputError

    out = tmp_path / "res.csv"
    score(loaded(localization=False), str(images), out, heatmaps=tmp_path / "hm", num_workers=0, progress=False)
    row = _read(out)["f1.png"]
    assert "boxes" not in row and Path(row["heatmap"]).is_file()
    lm = loaded(localization=False)
    from lineside.runtime import TorchBackend
    from lineside.export.deployable import DeployableModel

    plain = TorchBackend(deployable=DeployableModel(lm.model, (SIZE, SIZE), class_names=lm.class_names, grade_heatmap=False), loaded=lm)
    with pytest.raises(InputError, match="gives no heatmap"):
        score(plain, str(images), tmp_path / "res2.csv", heatmaps=tmp_path / "hm2", num_workers=0, progress=False)


def test_station_records_carry_boxes_in_frame_pixels(images, tmp_path) -> None:
    from lineside.runtime import TorchBackend
    from lineside.runtime.sources import open_source
    from lineside.runtime.station import Station

    lm = loaded()
    backend = TorchBackend(deployable=build_deployable(lm), loaded=lm)
    out = tmp_path / "r.jsonl"
    Station(backend, open_source(str(images / "f0*.png")), out, batch_max=4, latency_budget_ms=50, report_every=0,
            log=io.StringIO(), warmup=False).run()
    recs = {Path(r["path"]).name: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(recs) == {"f0.png", "f0_x2.png", "f0_w3h2.png"}
    for r in recs.values():
        assert r["error"] is None and r["decision"] in lm.class_names
        assert not any(k in r.get("outputs", {}) for k in ("boxes", "box_scores", "grade_heatmap", "defect_heatmap"))
    _assert_scaled(recs["f0.png"]["boxes"], recs["f0_x2.png"]["boxes"], 2, 2)
    _assert_scaled(recs["f0.png"]["boxes"], recs["f0_w3h2.png"]["boxes"], 3, 2)
    # the same boxes as lineside score gives
    from lineside.runtime.score import score

    score(backend, [str(images / "f0.png")], tmp_path / "s.csv", num_workers=0, progress=False)
    assert json.loads(_read(tmp_path / "s.csv")["f0.png"]["boxes"]) == recs["f0.png"]["boxes"]


def test_query_head_models_deploy_with_their_own_decoder(tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    from lineside.export.onnx_export import export_onnx
    from lineside.fusion.query_localization_head import QueryBoxDecoder, QueryLocalizationHead

    torch.manual_seed(3)
    encoder = ImageEncoder(backbone="test_efficientnet", pretrained=False, feature_levels=[-2, -1], embed_dim=32, in_chans=1)
    model = InspectionModel(encoder, FusionTransformer(embed_dim=32, depth=1, dropout=0.0), GradingHead(32, 4, dropout=0.0),
                            localization_head=QueryLocalizationHead(32, len(BOX_CLASSES), num_queries=6, num_heads=2)).eval()
    lm = LoadedModel(model, ["ok", "mild", "moderate", "severe"], SIZE, 1, box_class_names=BOX_CLASSES, tasks=["grading", "localization"])
    d = build_deployable(lm)
    assert isinstance(d.box_decoder, QueryBoxDecoder) and d.box_decoder.top_k == 6 * len(BOX_CLASSES)
    r = export_onnx(lm, tmp_path / "onnx", parity_images=8, verify=verify_artefact)
    assert r.parity is not None and r.ok, r.parity.table()
    assert {row.output for row in r.parity.rows} >= {"boxes", "box_labels", "grade_heatmap"}
