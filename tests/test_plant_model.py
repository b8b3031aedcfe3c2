"""The plant model: named grading tasks (``grading/el`` 4 grades, ``grading/xray`` 2 grades) beside
localization and segmentation in one model; each data set's batches train only its own heads, its
text prompt reaches the text encoder, and the export carries every task's named outputs with parity.
Runs configs/tiny_plant.yaml on synthetic stand-ins of the four data sets."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from lineside.export.checkpoint import instantiate_config
from lineside.fusion.lightning_module import InspectionModule
from lineside.fusion.multitask_datamodule import MemberLabels, MultiTaskDataModule
from lineside.vision.box_formats import NEU_DET_CLASSES

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "tiny_plant.yaml"
MEMBER_HEADS = {"elpv": "grading/el", "castings": "grading/xray", "el_cracks": "segmentation/el", "neu_det": "localization"}


# --------------------------------------------------------------------------- synthetic stand-ins of the four data sets


def _cells(root: Path, n: int = 32) -> Path:
    """ELPV-like manifest: ``path,label,text`` of grey cells, four grades, cell type as text."""
    rng = np.random.default_rng(1)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "cells.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "text"])
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8)).save(root / f"c{i}.png")
            w.writerow([f"c{i}.png", ("ok", "mild", "moderate", "severe")[i % 4], ("mono", "poly")[i % 2]])
    return root / "cells.csv"


def _castings(root: Path, per_class: int = 16) -> Path:
    """The castings layout: ``root/train/class_{0,1}/*.png``, 32×32 grey patches."""
    rng = np.random.default_rng(2)
    for c in (0, 1):
        folder = root / "train" / f"class_{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(folder / f"p{i}.png")
    return root


def _el_cracks(root: Path, modules: int = 8, per_module: int = 4) -> Path:
    """The el_cracks layout: ``manifest.csv`` (path, mask, module, classes_present), class-index masks."""
    rng = np.random.default_rng(3)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    with open(root / "manifest.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "mask", "module", "classes_present"])
        for m in range(modules):
            for i in range(per_module):
                stem = f"M{m}_{i}"
                mask = np.zeros((48, 48), dtype=np.uint8)
                mask[:, 20:22] = 4  # busbar
                mask[5 + i:40, 8 + m] = 3  # crack
                mask[30:40, 30:44] = 1  # dark area
                Image.fromarray(rng.integers(0, 255, (48, 48), dtype=np.uint8)).save(root / "images" / f"{stem}.png")
                Image.fromarray(mask).save(root / "masks" / f"{stem}.png")
                w.writerow([f"images/{stem}.png", f"masks/{stem}.png", f"M{m}", "1;3;4"])
    return root


def _neu_det(root: Path, per_class: int = 4) -> Path:
    """The NEU-DET layout: IMAGES/<class>_<n>.jpg + ANNOTATIONS/<class>_<n>.xml, one box each."""
    rng = np.random.default_rng(0)
    (root / "IMAGES").mkdir(parents=True, exist_ok=True)
    (root / "ANNOTATIONS").mkdir(parents=True, exist_ok=True)
    for c, name in enumerate(NEU_DET_CLASSES):
        for n in range(per_class):
            stem = f"{name}_{n}"
            Image.fromarray(rng.integers(0, 255, (48, 48), dtype=np.uint8)).save(root / "IMAGES" / f"{stem}.jpg")
            x, y = 4 + 2 * n, 6 + c
            (root / "ANNOTATIONS" / f"{stem}.xml").write_text(
                f"<annotation><filename>{stem}</filename><size><width>48</width><height>48</height></size>"
                f"<object><name>{name}</name><bndbox><xmin>{x}</xmin><ymin>{y}</ymin><xmax>{x + 20}</xmax>"
                f"<ymax>{y + 16}</ymax></bndbox></object></annotation>")
    return root


def _config(tmp_path: Path) -> dict:
    """configs/tiny_plant.yaml with its members on synthetic data and its run folder in ``tmp_path``."""
    cfg = yaml.safe_load(CONFIG.read_text())
    members = cfg["data"]["init_args"]["datasets"]
    members["elpv"]["init_args"]["manifest"] = str(_cells(tmp_path / "cells"))
    members["castings"]["init_args"]["root"] = str(_castings(tmp_path / "castings"))
    members["el_cracks"]["init_args"]["root"] = str(_el_cracks(tmp_path / "el_cracks"))
    members["neu_det"]["init_args"]["root"] = str(_neu_det(tmp_path / "neu_det"))
    cfg["trainer"]["default_root_dir"] = str(tmp_path / "run")
    return cfg


def _data(cfg: dict) -> MultiTaskDataModule:
    args = dict(cfg["data"]["init_args"])
    members = {n: instantiate_config(spec, offline_weights=False) for n, spec in args.pop("datasets").items()}
    return MultiTaskDataModule(members, **args)


def _heads(model) -> dict[str, torch.nn.Module]:
    return {"grading/el": model.heads["grading/el"], "grading/xray": model.heads["grading/xray"],
            "segmentation/el": model.heads["segmentation/el"], "localization": model.localization_head}


# --------------------------------------------------------------------------- labels and prompts per data set


def test_a_members_labels_move_under_its_named_task_and_its_prompt_becomes_the_text() -> None:
    batch = {"image": torch.zeros(2, 1, 8, 8, dtype=torch.uint8), "grade": torch.tensor([1, 0]), "text": ["mono", ""]}
    out = MemberLabels("grading/xray", "EL cell, {text}")(batch)
    assert "grade" not in out and torch.equal(out["grade/xray"], batch["grade"])
    assert out["text"] == ["EL cell, mono", "EL cell"]
    assert "grade" in batch  # the loader's own batch is left alone
    plain = MemberLabels("grading")(batch)
    assert torch.equal(plain["grade"], batch["grade"]) and plain["text"] == ["mono", ""]
    boxes = MemberLabels("localization/pcb", "circuit board")({"image": batch["image"], "boxes": torch.zeros(2, 1, 4),
                                                               "labels": torch.zeros(2, 1), "has_boxes": torch.ones(2)})
    assert {"boxes/pcb", "labels/pcb", "has_boxes/pcb"} <= set(boxes) and boxes["text"] == ["circuit board"] * 2
    with pytest.raises(ValueError, match="member 'x' names task 'gradeing'"):
        MultiTaskDataModule({"x": object()}, tasks={"x": "gradeing"})
    with pytest.raises(ValueError, match="data.prompts names"):
        MultiTaskDataModule({"x": object()}, prompts={"y": "casting radiograph"})


def test_each_batch_trains_only_the_heads_of_its_data_set(tmp_path: Path) -> None:
    """One batch per data set through the plant model: the heads of the batch's data set get a
    gradient, the heads of the other data sets get none (None or all zero); the prompt of each data set
    is the text the model reads."""
    cfg = _config(tmp_path)
    torch.manual_seed(0)
    model = instantiate_config(cfg["model"]["model"], offline_weights=False)
    assert model.task_names == ["localization", "grading/el", "grading/xray", "segmentation/el"]
    module = InspectionModule(model)
    dm = _data(cfg)
    dm.setup("fit")
    loader = dm.train_dataloader()
    seen: dict[str, dict] = {}
    for name, batch in zip(loader.order(0), loader):
        seen.setdefault(name, batch)
    assert set(seen) == set(MEMBER_HEADS)
    assert seen["castings"]["text"] == ["casting radiograph"] * 4 and "grade/xray" in seen["castings"]
    assert {t.split(", ")[0] for t in seen["elpv"]["text"]} == {"EL cell"} and "grade/el" in seen["elpv"]
    heads = _heads(model)
    model.train()
    for name, batch in seen.items():
        model.zero_grad(set_to_none=True)
        losses = module._losses(model(**model.batch_inputs(batch)), batch)
        own = MEMBER_HEADS[name]
        assert f"loss_{own}" in losses and torch.isfinite(losses["loss"])
        assert not {f"loss_{t}" for t in heads if t != own} & set(losses), sorted(losses)
        losses["loss"].backward()
        for task, head in heads.items():
            grads = [p.grad for p in head.parameters()]
            if task == own:
                assert any(g is not None and g.abs().sum() > 0 for g in grads), f"{name}: its own head {task} got no gradient"
            else:
                assert all(g is None or not g.any() for g in grads), f"a {name} batch reached the {task} head"
        assert model.text_encoder.proj.weight.grad is not None  # the prompt went through the text encoder


def test_tiny_plant_fits_logs_every_task_and_exports_named_outputs_with_parity(tmp_path: Path) -> None:
    from lineside.export.checkpoint import load_inspection_model
    from lineside.export.deployable import build_deployable
    from lineside.export.onnx_export import export_onnx
    from lineside.fusion.training_cli import main
    from lineside.runtime.onnxruntime_backend import OnnxRuntimeBackend
    from lineside.runtime.verify import verify_artefact

    cfg = _config(tmp_path)
    path = tmp_path / "tiny_plant.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cli = main(["fit", "--config", str(path)])
    assert cli.trainer.global_step == cfg["trainer"]["max_steps"]
    lines = (tmp_path / "run" / "logs" / "version_0" / "metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    want = {"train/loss_grading/el", "train/loss_grading/xray", "train/loss_segmentation/el", "train/loss_localization",
            "val/grading/el/acc", "val/grading/el/macro_f1", "val/grading/xray/acc", "val/map_50", "val/segmentation/el/miou"}
    assert want <= set(header), sorted(want - set(header))
    assert cli.model.label_names["grading/el"] == ["ok", "mild", "moderate", "severe"]
    assert cli.model.label_names["grading/xray"] == ["class_0", "class_1"]
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    meta = torch.load(ckpt, map_location="cpu", weights_only=False)["lineside"]
    assert meta["class_names_el"] == ["ok", "mild", "moderate", "severe"] and meta["class_names_xray"] == ["class_0", "class_1"]

    loaded = load_inspection_model(ckpt)
    r = export_onnx(loaded, tmp_path / "onnx", batch_sizes=(1, 4), parity_images=4, verify=verify_artefact,
                    text_prompt="casting radiograph")
    assert r.ok, r.parity.table() if r.parity else None
    names = [o["name"] for o in r.metadata["outputs"]]
    assert names == ["boxes", "box_scores", "box_labels", "defect_heatmap", "grade_probs_el", "grade_el", "grade_probs_xray",
                     "grade_xray", "defect_masks_el", "defect_heatmap_el"], names
    frames = torch.randint(0, 256, (3, 1, *r.metadata["preprocessing"]["input_size"]), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(5))
    got = OnnxRuntimeBackend(r.path)(frames.numpy())
    ref = build_deployable(loaded, text_prompt="casting radiograph").run(frames)
    assert got["grade_probs_xray"].shape == (3, 2) and got["grade_probs_el"].shape == (3, 4)
    for name in names:  # top-K boxes of near-tied scores may swap places: the parity check above matches those
        if not name.startswith("box"):
            np.testing.assert_allclose(got[name], ref[name].numpy(), atol=1e-4, err_msg=name)
    json.dumps(r.metadata)  # the metadata stays plain JSON


def test_records_carry_each_named_grading_tasks_grade() -> None:
    """A plant model's records: one entry per named grading task under ``grades``, its grade names from
    the metadata's ``class_names_<q>`` (indices where none are recorded); nothing lands in ``outputs``."""
    from lineside.runtime.records import RecordBuilder

    class Backend:
        output_specs = [{"name": "grade_probs_el", "dtype": "float32", "shape": ["N", 4], "kind": "float"},
                        {"name": "grade_el", "dtype": "int64", "shape": ["N"], "kind": "decoded"},
                        {"name": "grade_probs_xray", "dtype": "float32", "shape": ["N", 2], "kind": "float"},
                        {"name": "grade_xray", "dtype": "int64", "shape": ["N"], "kind": "decoded"}]
        metadata = {"class_names_xray": ["class_0", "class_1"]}
        class_names: list[str] = []

    outputs = {"grade_probs_el": np.array([[0.1, 0.2, 0.6, 0.1]]), "grade_el": np.array([2]),
               "grade_probs_xray": np.array([[0.3, 0.7]]), "grade_xray": np.array([1])}
    builder = RecordBuilder(Backend())
    (record,) = builder(outputs, 1)
    assert "grades" in builder.has and "outputs" not in record and record["grade"] is None
    assert record["grades"]["xray"] == {"grade": 1, "decision": "class_1", "confidence": 0.7,
                                        "probabilities": {"class_0": 0.3, "class_1": 0.7}}
    assert record["grades"]["el"]["decision"] == "2" and record["grades"]["el"]["confidence"] == 0.6


def test_side_by_side_throughput_interleaves_the_models_and_gives_ratios_to_the_first() -> None:
    """``lineside bench --compare`` / bench/el_dual_throughput.py: every model on the same frames, in
    interleaved rounds (a load that drifts weighs on each alike), medians and ratios to the first model."""
    from lineside.runtime.bench import compare_throughput, format_compare

    calls: list[str] = []

    class Fake:
        def __init__(self, name: str, outputs: list[str]) -> None:
            self.name, self.output_specs = name, [{"name": n} for n in outputs]

        def __call__(self, frames):
            calls.append(self.name)
            return {}

    frames = np.zeros((4, 1, 8, 8), dtype=np.uint8)
    rows = compare_throughput({"grading": Fake("a", ["grade_probs", "grade"]),
                               "el dual": Fake("b", ["grade_probs", "grade", "defect_masks"])}, frames, rounds=3, min_seconds=0.0)
    assert [r.model for r in rows] == ["grading", "el dual"] and rows[1].outputs == ["grade_probs", "grade", "defect_masks"]
    assert all(len(r.rounds) == 3 for r in rows) and rows[0].ratio == 1.0
    assert rows[1].ratio == pytest.approx(rows[1].throughput / rows[0].throughput)
    timed = calls[4:]  # after one warm-up pair per model
    switches = sum(1 for x, y in zip(timed, timed[1:]) if x != y)
    assert timed[0] == "a" and switches == 5  # a…a b…b a…a b…b a…a b…b: three interleaved rounds
    table = format_compare(rows, {"date": "d", "gpu": None, "cpu": "cpu", "cores": 2, "torch": "t", "input_size": [8, 8],
                                  "frames": "ELPV test blocks", "batch": 4, "rounds": 3})
    assert "| el dual | grade_probs, grade, defect_masks |" in table


# --------------------------------------------------------------------------- grade names of named tasks in artefacts and results

EL_GRADES = ["ok", "mild", "moderate", "severe"]
XRAY_GRADES = ["class_0", "class_1"]


@pytest.fixture(scope="module")
def plant_export(tmp_path_factory) -> dict:
    """The tiny plant model (untrained, seed 0) in a checkpoint with the record a fit writes (named
    tasks' ``class_names_<q>``, as the fit test above checks), its ONNX export and a few images."""
    from lineside.export.checkpoint import load_inspection_model
    from lineside.export.onnx_export import export_onnx
    from lineside.runtime.verify import verify_artefact

    tmp = tmp_path_factory.mktemp("plant_export")
    cfg = yaml.safe_load(CONFIG.read_text())
    torch.manual_seed(0)
    model = instantiate_config(cfg["model"]["model"], offline_weights=False)
    record = {"class_names": [], "image_size": 64, "channels": 1, "tta_views": 1, "box_class_names": list(NEU_DET_CLASSES),
              "tasks": model.task_names, "model_config": cfg["model"]["model"],
              "class_names_el": EL_GRADES, "class_names_xray": XRAY_GRADES}
    ckpt = tmp / "plant.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "lineside": record}, ckpt)
    loaded = load_inspection_model(ckpt)
    r = export_onnx(loaded, tmp / "onnx", batch_sizes=(1, 4), parity_images=2, verify=verify_artefact, text_prompt="EL cell")
    assert r.ok, r.parity.table() if r.parity else None
    images = tmp / "images"
    rng = np.random.default_rng(7)
    for i in range(3):
        images.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40 + 8 * i, 48), dtype=np.uint8)).save(images / f"cell{i}.png")
    return {"ckpt": ckpt, "loaded": loaded, "onnx": Path(r.path), "metadata": r.metadata, "images": images}


def _csv(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or []), list(reader)


def _check_named_rows(header: list[str], rows: list[dict], names: dict[str, list[str]]) -> None:
    """Each named task's columns, in order, filled from the records: the grade, its name, its probability as the confidence."""
    for q, grades in names.items():
        cols = [f"grade_{q}", f"grade_name_{q}", f"confidence_{q}", *[f"p_{q}_{n}" for n in grades]]
        at = header.index(cols[0])
        assert header[at:at + len(cols)] == cols, header
    assert "grade" not in header and not any(c.startswith("p_") and not c.startswith(("p_el_", "p_xray_")) for c in header), header
    for row in rows:
        assert not row["error"], row["error"]
        for q, grades in names.items():
            probs = [float(row[f"p_{q}_{n}"]) for n in grades]
            grade = int(row[f"grade_{q}"])
            assert abs(sum(probs) - 1) < 1e-4 and row[f"grade_name_{q}"] == grades[grade]
            assert float(row[f"confidence_{q}"]) == pytest.approx(probs[grade], abs=1e-6)


def test_an_export_records_each_named_tasks_grade_names_and_records_use_them(plant_export) -> None:
    from lineside.export.metadata import read_metadata
    from lineside.runtime.onnxruntime_backend import OnnxRuntimeBackend
    from lineside.runtime.records import RecordBuilder

    assert plant_export["loaded"].grade_class_names == {"el": EL_GRADES, "xray": XRAY_GRADES}
    on_disk = read_metadata(plant_export["onnx"])
    assert on_disk["grade_class_names"] == {"el": EL_GRADES, "xray": XRAY_GRADES} == plant_export["metadata"]["grade_class_names"]
    backend = OnnxRuntimeBackend(plant_export["onnx"])
    builder = RecordBuilder(backend)
    assert builder.named_grades == {"el": EL_GRADES, "xray": XRAY_GRADES}
    frames = np.random.default_rng(3).integers(0, 256, (2, 1, *backend.input_size), dtype=np.uint8)
    for record in builder(backend(frames), 2):
        assert list(record["grades"]["el"]["probabilities"]) == EL_GRADES
        assert record["grades"]["xray"]["decision"] in XRAY_GRADES and list(record["grades"]["xray"]["probabilities"]) == XRAY_GRADES


def test_score_writes_each_named_tasks_columns_with_grade_names_through_onnx_and_torch(plant_export, tmp_path: Path) -> None:
    from lineside.cli.score import main as score_main

    names = {"el": EL_GRADES, "xray": XRAY_GRADES}
    out = tmp_path / "onnx.csv"
    assert score_main(["--model", str(plant_export["onnx"]), "--input", str(plant_export["images"]), "--out", str(out),
                       "--num-workers", "0", "--no-progress"]) == 0
    header, rows = _csv(out)
    assert len(rows) == 3 and "boxes" in header
    _check_named_rows(header, rows, names)
    torch_out = tmp_path / "torch.csv"
    assert score_main(["--model", str(plant_export["ckpt"]), "--backend", "torch", "--text", "EL cell", "--input",
                       str(plant_export["images"]), "--out", str(torch_out), "--num-workers", "0", "--no-progress"]) == 0
    torch_header, torch_rows = _csv(torch_out)
    assert torch_header == header  # the same columns through every backend
    _check_named_rows(torch_header, torch_rows, names)
    for a, b in zip(rows, torch_rows):
        for q, grades in names.items():
            np.testing.assert_allclose([float(a[f"p_{q}_{n}"]) for n in grades], [float(b[f"p_{q}_{n}"]) for n in grades], atol=1e-3)


def test_an_artefact_without_grade_names_still_scores_with_grade_indices(plant_export, tmp_path: Path) -> None:
    """An export from before ``grade_class_names`` (and a checkpoint without ``class_names_<q>``): the
    named tasks' grades are their indices, in the records and in the columns."""
    import shutil

    from lineside.export.checkpoint import load_inspection_model
    from lineside.runtime.score import score

    old = tmp_path / "old"
    shutil.copytree(plant_export["onnx"].parent, old)
    meta = json.loads((old / "metadata.json").read_text())
    del meta["grade_class_names"]
    (old / "metadata.json").write_text(json.dumps(meta))
    out = tmp_path / "old.parquet"
    s = score(old / plant_export["onnx"].name, str(plant_export["images"]), out, num_workers=0, progress=False)
    assert s.scored == 3 and s.errors == 0
    import pyarrow.parquet as pq

    table = pq.read_table(out)
    rows = [{k: "" if v is None else str(v) for k, v in r.items()} for r in table.to_pylist()]
    _check_named_rows(table.column_names, rows, {"el": ["0", "1", "2", "3"], "xray": ["0", "1"]})
    assert all(r["grade_name_el"] == r["grade_el"] for r in rows)

    ckpt = torch.load(plant_export["ckpt"], map_location="cpu", weights_only=False)
    for key in ("class_names_el", "class_names_xray"):
        del ckpt["lineside"][key]
    torch.save(ckpt, tmp_path / "old.ckpt")
    assert load_inspection_model(tmp_path / "old.ckpt").grade_class_names == {}


def test_per_task_columns_leave_the_plain_grading_columns_and_their_evaluation_alone(tmp_path: Path) -> None:
    """A model with the plain ``grading`` task and a named one: the plain task's columns and
    ``evaluate_scores`` (read from its ``p_<grade>`` columns only) are those of a grading-only model."""
    from lineside.runtime.records import RecordBuilder, score_row
    from lineside.runtime.score import _columns, evaluate_scores

    class Backend:
        output_specs = [{"name": "grade_probs", "dtype": "float32", "shape": ["N", 3], "kind": "float"},
                        {"name": "grade", "dtype": "int64", "shape": ["N"], "kind": "decoded"},
                        {"name": "grade_probs_xray", "dtype": "float32", "shape": ["N", 2], "kind": "float"},
                        {"name": "grade_xray", "dtype": "int64", "shape": ["N"], "kind": "decoded"}]
        metadata = {"grade_class_names": {"xray": ["sound", "porous"]}}
        class_names = ["ok", "crack", "broken"]

    builder = RecordBuilder(Backend())
    assert builder.has == {"grade", "grades"} and builder.named_grades == {"xray": ["sound", "porous"]}
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.3, 0.5], [0.6, 0.3, 0.1]])
    outputs = {"grade_probs": probs, "grade": probs.argmax(1), "grade_probs_xray": np.array([[0.9, 0.1], [0.2, 0.8]] * 2),
               "grade_xray": np.array([0, 1, 0, 1])}
    columns = _columns(Backend.class_names, True, False, named=builder.named_grades)
    assert columns == ["path", "grade", "grade_name", "confidence", "p_ok", "p_crack", "p_broken", "grade_xray", "grade_name_xray",
                       "confidence_xray", "p_xray_sound", "p_xray_porous", "error"]
    out = tmp_path / "scores.csv"
    with open(out, "w", newline="") as fh:
        w = csv.DictWriter(fh, columns)
        w.writeheader()
        for i, record in enumerate(builder(outputs, 4)):
            w.writerow({"path": str(tmp_path / f"c{i}.png"), "error": ""} | score_row(record, Backend.class_names))
    _, rows = _csv(out)
    assert [r["grade_name_xray"] for r in rows] == ["sound", "porous"] * 2 and rows[1]["p_xray_porous"] == "0.800000"
    assert [r["grade_name"] for r in rows] == ["ok", "crack", "broken", "ok"]
    manifest = tmp_path / "labels.csv"
    manifest.write_text("path,label\n" + "".join(f"c{i}.png,{n}\n" for i, n in enumerate(["ok", "crack", "broken", "crack"])))
    metrics = evaluate_scores(out, manifest, Backend.class_names)
    assert metrics is not None and metrics["class_names"] == Backend.class_names and metrics["n"] == 4
    assert metrics["acc"] == pytest.approx(0.75)
