"""score.py: one row per input, errors as rows, resume, parquet, overlays."""

import csv
import shutil

import pytest

from conftest import write_image
from lineside.cli.score import main
from lineside.runtime.score import collect_inputs, score


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    import yaml

    from conftest import REPO
    from lineside.fusion.training_cli import main as train_main

    tmp = tmp_path_factory.mktemp("train")
    cfg = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    cfg["trainer"]["default_root_dir"] = str(tmp)
    cfg["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp)
    cfg["trainer"]["callbacks"][0]["init_args"]["dirpath"] = str(tmp / "ck")
    cfg["trainer"]["max_steps"] = 1
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    train_main(["fit", "--config", str(path)])
    return tmp / "ck" / "last.ckpt"


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "in"
    for i in range(7):
        write_image(d / f"cell{i}.png", size=(50, 50), mode="L" if i % 2 else "RGB", seed=i)
    (d / "sub").mkdir()
    write_image(d / "sub" / "deep.jpg", size=(30, 60), seed=9)
    (d / "corrupt.png").write_bytes(b"garbage bytes")
    (d / "empty.png").write_bytes(b"")
    (d / "readme.txt").write_text("not an image")
    (d / ".hidden.png").write_bytes(b"x")
    return d


def _rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_folder_with_bad_files(tiny_ckpt, folder, tmp_path):
    out = tmp_path / "res.csv"
    s = score(tiny_ckpt, str(folder), out, overlays=tmp_path / "ov", batch_size=3, num_workers=0, progress=False)
    rows = _rows(out)
    assert len(rows) == 11 and s.scored == 8 and s.errors == 3
    by = {r["path"]: r for r in rows}
    assert "empty" in by[str(folder / "empty.png")]["error"]
    assert "corrupt" in by[str(folder / "corrupt.png")]["error"] and str(folder / "corrupt.png") in by[str(folder / "corrupt.png")]["error"]
    assert "unsupported" in by[str(folder / "readme.txt")]["error"]
    good = [r for r in rows if not r["error"]]
    for r in good:
        probs = [float(r[f"p_{n}"]) for n in ("ok", "mild", "moderate", "severe")]
        assert abs(sum(probs) - 1) < 1e-4 and r["grade_name"] == ["ok", "mild", "moderate", "severe"][int(r["grade"])]
        assert float(r["confidence"]) == pytest.approx(max(probs), abs=1e-6)
    assert len(list((tmp_path / "ov").rglob("*.png"))) == 8
    assert (tmp_path / "ov" / "sub" / "deep.png").is_file()


def test_resume_skips_done_rows_and_survives_a_torn_line(tiny_ckpt, folder, tmp_path):
    out = tmp_path / "res.csv"
    first = sorted(collect_inputs(str(folder)))[:4]
    score(tiny_ckpt, first, out, batch_size=2, num_workers=0, progress=False)
    with open(out, "a") as fh:  # a crash in the middle of a write
        fh.write(str(folder / "cell6.png") + ",3,sev")
    s = score(tiny_ckpt, str(folder), out, batch_size=4, num_workers=0, progress=False)
    assert s.skipped == 4 and s.scored + s.errors == 7
    rows = _rows(out)
    assert len(rows) == 11 and len({r["path"] for r in rows}) == 11
    again = score(tiny_ckpt, str(folder), out, batch_size=4, num_workers=0, progress=False)
    assert again.skipped == 11 and again.scored == 0 and len(_rows(out)) == 11
    # a fixed file is re-scored with --retry-errors
    shutil.copy(folder / "cell1.png", folder / "corrupt.png")
    fixed = score(tiny_ckpt, str(folder), out, batch_size=4, num_workers=0, progress=False, retry_errors=True)
    assert fixed.scored == 1 and fixed.errors == 2
    assert not next(r for r in _rows(out) if r["path"].endswith("corrupt.png"))["error"]


def test_parquet_output_and_cli(tiny_ckpt, folder, tmp_path, capsys):
    import pyarrow.parquet as pq

    out = tmp_path / "res.parquet"
    assert main(["--ckpt", str(tiny_ckpt), "--input", str(folder / "*.png"), "--output", str(out), "--num-workers", "0", "--no-progress"]) == 0
    table = pq.read_table(out).to_pylist()
    assert len(table) == 9 and not (tmp_path / "res.parquet.partial.csv").exists()
    assert sum(1 for r in table if r["error"]) == 2
    assert "scored 7, errors 2" in capsys.readouterr().out
    assert main(["--ckpt", str(tiny_ckpt), "--input", str(folder / "*.png"), "--output", str(out), "--num-workers", "0", "--no-progress"]) == 0
    assert len(pq.read_table(out)) == 9


def test_cli_errors_are_clear(tiny_ckpt, tmp_path, capsys):
    assert main(["--ckpt", str(tiny_ckpt), "--input", str(tmp_path / "nothing*"), "--output", str(tmp_path / "r.csv")]) == 2
    assert "no input files" in capsys.readouterr().err
    assert main(["--ckpt", str(tmp_path / "missing.ckpt"), "--input", str(tmp_path), "--output", str(tmp_path / "r.csv")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err


def test_labelled_manifest_is_evaluated(tiny_ckpt, folder, tmp_path, capsys):
    import json

    names = ["ok", "mild", "moderate", "severe"]
    manifest = tmp_path / "labelled.csv"
    files = [f"in/cell{i}.png" for i in range(7)] + ["in/corrupt.png"]
    manifest.write_text("path,label\n" + "".join(f"{f},{names[i % 4]}\n" for i, f in enumerate(files)))
    out = tmp_path / "eval.csv"
    assert main(["--ckpt", str(tiny_ckpt), "--input", str(manifest), "--output", str(out), "--num-workers", "0", "--no-progress"]) == 0
    rows = _rows(out)
    good = [r for r in rows if not r["error"]]
    assert len(rows) == 8 and len(good) == 7
    truth = {str(tmp_path / f): i % 4 for i, f in enumerate(files)}
    metrics = json.loads((tmp_path / "eval.csv.metrics.json").read_text())
    assert metrics["n"] == 7 and metrics["missing_or_failed"] == 1
    assert metrics["acc"] == pytest.approx(sum(int(r["grade"]) == truth[r["path"]] for r in good) / 7)
    assert sum(map(sum, metrics["confusion"])) == 7
    text = capsys.readouterr().out
    assert "labelled 7: acc" in text and "confusion" in text

    manifest.write_text("path,label\nin/cell0.png,cracked\n")
    assert main(["--ckpt", str(tiny_ckpt), "--input", str(manifest), "--output", str(tmp_path / "e2.csv"), "--num-workers", "0", "--no-progress"]) == 2
    assert "'cracked' is not one of" in capsys.readouterr().err


def test_every_backend_gives_the_same_grades(tiny_ckpt, folder, tmp_path):
    """A checkpoint scores through its cached ONNX export by default; eager torch and the exported
    graph (given directly) give the same grades and probabilities row for row."""
    from lineside.runtime import OnnxRuntimeBackend, TorchBackend
    from lineside.runtime.score import open_model

    auto = open_model(tiny_ckpt)
    assert isinstance(auto, OnnxRuntimeBackend) and auto.metadata["parity"]["ok"]
    assert isinstance(open_model(tiny_ckpt, backend="torch"), TorchBackend)
    results = {}
    for name, model in (("torch", tiny_ckpt), ("auto", tiny_ckpt), ("onnx", auto.path)):
        out = tmp_path / f"{name}.csv"
        s = score(model, str(folder), out, batch_size=3, num_workers=0, progress=False, backend="torch" if name == "torch" else "auto")
        assert s.scored == 8 and s.errors == 3
        results[name] = {r["path"]: r for r in _rows(out)}
    for path, row in results["torch"].items():
        for other in ("auto", "onnx"):
            assert results[other][path]["grade"] == row["grade"]
            if not row["error"]:
                assert abs(float(results[other][path]["confidence"]) - float(row["confidence"])) < 1e-4


def test_exported_artefact_refuses_a_new_input_size(tiny_ckpt, tmp_path):
    from lineside.runtime.score import open_model
    from lineside.vision.io import InputError

    onnx_path = open_model(tiny_ckpt).path
    with pytest.raises(InputError, match="fixed in an exported artefact"):
        open_model(onnx_path, input_size="128")
