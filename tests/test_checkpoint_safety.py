"""Checkpoints load with weights_only=True: a crafted pickle never runs, every checkpoint lineside
writes still loads, ``--trust-checkpoint`` is the one way past a refusal; exported artefacts are
checked against the sha256 in their metadata before a runtime sees them."""

from __future__ import annotations

import builtins
import os
import pathlib
import shutil

import numpy as np
import pytest
import torch
import yaml

from conftest import REPO, write_image
from lineside.export.checkpoint import CheckpointError, load_inspection_model
from lineside.export.metadata import read_metadata, write_metadata
from lineside.fusion.checkpoint_file import CHECKPOINT_SAFE_GLOBALS, TRUST_CHECKPOINT_FLAG, read_checkpoint, unsafe_globals
from lineside.runtime import BackendError, load_backend

PRE_NAMESPACE_CKPT = REPO / "tests" / "data" / "pre_namespace_tiny.ckpt"


class _WritesAFile:
    """Unpickled, calls ``func(arg)``: code that writes ``marker`` (never reached when the load is safe)."""

    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return self.func, (self.arg,)


def _payloads(marker: pathlib.Path) -> dict[str, _WritesAFile]:
    return {
        "builtins.exec": _WritesAFile(builtins.exec, f"open({str(marker)!r}, 'w').write('ran')"),
        "os.system": _WritesAFile(os.system, f"touch {marker}"),
    }


def _evil_checkpoint(path: pathlib.Path, marker: pathlib.Path, kind: str) -> pathlib.Path:
    """A checkpoint shaped like lineside's, with a pickle that writes ``marker`` when it is unpickled."""
    base = torch.load(PRE_NAMESPACE_CKPT, map_location="cpu", weights_only=True)
    base["hyper_parameters"] = {"note": _payloads(marker)[kind]}
    torch.save(base, path)
    return path


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A checkpoint from `lineside fit` on configs/tiny.yaml (one step)."""
    from lineside.fusion.training_cli import main as train_main

    tmp = tmp_path_factory.mktemp("fit")
    cfg = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    cfg["trainer"]["default_root_dir"] = str(tmp)
    cfg["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp)
    cfg["trainer"]["callbacks"][0]["init_args"]["dirpath"] = str(tmp / "ck")
    cfg["trainer"]["max_steps"] = 1
    cfg["model"]["scheduler"] = {"class_path": "torch.optim.lr_scheduler.CosineAnnealingLR", "init_args": {"T_max": 3}}
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    train_main(["fit", "--config", str(path)])
    return tmp / "ck" / "last.ckpt"


# -- crafted pickles are refused ----------------------------------------------------------------
@pytest.mark.parametrize("kind", ["builtins.exec", "os.system"])
def test_crafted_pickle_is_refused_and_never_runs(tmp_path, kind):
    marker = tmp_path / "ran.txt"
    evil = _evil_checkpoint(tmp_path / "evil.ckpt", marker, kind)
    with pytest.raises(CheckpointError) as info:
        load_inspection_model(evil)
    msg = str(info.value)
    assert str(evil) in msg and TRUST_CHECKPOINT_FLAG in msg and "trusted source" in msg
    assert kind.split(".")[1] in msg  # the offending global is named (exec / system)
    assert not marker.exists(), "unpickling ran the crafted code"
    assert any(kind.split(".")[1] in g for g in unsafe_globals(evil))


def test_trusting_the_file_loads_it_as_a_full_pickle(tmp_path):
    """The payload is live: with trust (and only then) the full unpickler runs it."""
    marker = tmp_path / "ran.txt"
    evil = _evil_checkpoint(tmp_path / "evil.ckpt", marker, "builtins.exec")
    with pytest.raises(CheckpointError):
        read_checkpoint(evil)
    assert not marker.exists()
    read_checkpoint(evil, trust_checkpoint=True)
    assert marker.read_text() == "ran"


def test_score_cli_refuses_and_writes_nothing(tmp_path, capsys):
    from lineside.cli.score import main as score_main

    marker = tmp_path / "ran.txt"
    evil = _evil_checkpoint(tmp_path / "evil.ckpt", marker, "os.system")
    write_image(tmp_path / "in" / "a.png", size=(64, 64))
    out = tmp_path / "res.csv"
    rc = score_main(["--model", str(evil), "--input", str(tmp_path / "in"), "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc != 0
    assert str(evil) in err and TRUST_CHECKPOINT_FLAG in err
    assert not marker.exists() and not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.ckpt", "in"]


def test_station_cli_and_torch_backend_refuse(tmp_path, capsys):
    from lineside.cli.station import main as station_main

    marker = tmp_path / "ran.txt"
    evil = _evil_checkpoint(tmp_path / "evil.ckpt", marker, "builtins.exec")
    with pytest.raises(CheckpointError, match="--trust-checkpoint"):
        load_backend(evil)
    (tmp_path / "drop").mkdir()
    out = tmp_path / "r.jsonl"
    rc = station_main(["--model", str(evil), "--source", str(tmp_path / "drop"), "--out", str(out), "--once", "--no-warmup"])
    assert rc == 2 and TRUST_CHECKPOINT_FLAG in capsys.readouterr().err
    assert not marker.exists() and not out.exists()


def test_crossval_refuses_a_with_member_before_training(tmp_path, capsys):
    from lineside.cli.crossval import main as crossval_main

    marker = tmp_path / "ran.txt"
    other = tmp_path / "other_cv"
    for k in range(2):
        (other / f"fold{k}").mkdir(parents=True)
        _evil_checkpoint(other / f"fold{k}" / "fold.ckpt", marker, "builtins.exec")
    # the refusal comes before any fold trains: the config is never read
    rc = crossval_main(["--config", str(tmp_path / "absent.yaml"), "--folds", "2", "--out", str(tmp_path / "cv"), "--with", str(other)])
    err = capsys.readouterr().err
    assert rc == 2 and str(other / "fold0" / "fold.ckpt") in err and TRUST_CHECKPOINT_FLAG in err
    assert not marker.exists() and not (tmp_path / "cv").exists()


def test_an_unknown_class_is_refused_and_trust_loads_it(tiny_ckpt, tmp_path):
    """A checkpoint holding a class outside the allowlist (a Path in its hyper-parameters): refused by
    name, loaded when trusted, and the model it rebuilds is the same."""
    ckpt = torch.load(tiny_ckpt, map_location="cpu", weights_only=True)
    ckpt["hyper_parameters"]["data_root"] = pathlib.Path("/data/cells")
    odd = tmp_path / "odd.ckpt"
    torch.save(ckpt, odd)
    with pytest.raises(CheckpointError, match=r"PosixPath.*--trust-checkpoint"):
        load_inspection_model(odd)
    loaded = load_inspection_model(odd, trust_checkpoint=True)
    plain = load_inspection_model(tiny_ckpt)
    x = torch.randint(0, 255, (2, 1, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(loaded.model(x).grade_logits, plain.model(x).grade_logits)


def test_score_cli_trust_flag_scores_a_trusted_file(tiny_ckpt, tmp_path, capsys):
    from lineside.cli.score import main as score_main

    ckpt = torch.load(tiny_ckpt, map_location="cpu", weights_only=True)
    ckpt["hyper_parameters"]["data_root"] = pathlib.Path("/data/cells")
    odd = tmp_path / "odd.ckpt"
    torch.save(ckpt, odd)
    for i in range(2):
        write_image(tmp_path / "in" / f"c{i}.png", size=(64, 64), seed=i)
    args = ["--model", str(odd), "--input", str(tmp_path / "in"), "--out", str(tmp_path / "res.csv"), "--backend", "torch", "--no-progress"]
    assert score_main(args) == 2 and not (tmp_path / "res.csv").exists()
    assert "PosixPath" in capsys.readouterr().err
    assert score_main([*args, "--trust-checkpoint"]) == 0
    assert len((tmp_path / "res.csv").read_text().strip().splitlines()) == 3  # header + 2 rows


# -- every checkpoint lineside writes loads weights-only --------------------------------------
def test_fit_checkpoint_loads_weights_only(tiny_ckpt):
    assert CHECKPOINT_SAFE_GLOBALS == ()  # nothing beyond torch's own allowlist is needed
    assert unsafe_globals(tiny_ckpt) == []
    ckpt = torch.load(tiny_ckpt, map_location="cpu", weights_only=True)
    assert ckpt["hyper_parameters"]["model"]["class_path"] == "lineside.fusion.InspectionModel"
    loaded = load_inspection_model(tiny_ckpt)
    assert loaded.class_names == ["ok", "mild", "moderate", "severe"] and loaded.image_size == 64


def test_pre_namespace_checkpoint_loads_weights_only():
    assert unsafe_globals(PRE_NAMESPACE_CKPT) == []
    torch.load(PRE_NAMESPACE_CKPT, map_location="cpu", weights_only=True)
    loaded = load_inspection_model(PRE_NAMESPACE_CKPT)
    assert type(loaded.model).__module__ == "lineside.fusion.model" and loaded.image_size == 64


def test_crossval_ensemble_loads_weights_only(tiny_ckpt, tmp_path):
    from lineside.fusion.crossval import _write_ensemble
    from lineside.fusion.ensemble import InspectionEnsemble

    path = _write_ensemble(tmp_path, [tiny_ckpt, tiny_ckpt], np.array([0.0, 0.5, 0.0, 0.0]), "mean")
    assert unsafe_globals(path) == []
    torch.load(path, map_location="cpu", weights_only=True)
    loaded = load_inspection_model(path)
    assert isinstance(loaded.model, InspectionEnsemble) and loaded.model.grade_bias.tolist() == [0.0, 0.5, 0.0, 0.0]


def test_ensemble_with_a_crafted_member_is_refused(tiny_ckpt, tmp_path):
    from lineside.fusion.crossval import _write_ensemble

    marker = tmp_path / "ran.txt"
    evil = _evil_checkpoint(tmp_path / "fold.ckpt", marker, "os.system")
    with pytest.raises(CheckpointError, match="--trust-checkpoint"):
        _write_ensemble(tmp_path, [tiny_ckpt, evil], np.zeros(4), "mean")
    assert not marker.exists() and not (tmp_path / "ensemble.ckpt").exists()


# -- every loading command offers the flag ----------------------------------------------------
@pytest.mark.parametrize("target", [
    "lineside.cli.score:main", "lineside.cli.station:main", "lineside.cli.bench:main", "lineside.cli.crossval:main",
    "lineside.cli.export:onnx_main", "lineside.cli.export:tensorrt_main", "lineside.cli.export:int8_main",
    "lineside.cli.export:aoti_main", "lineside.cli.export:triton_main",
])
def test_every_loading_command_has_the_trust_flag(target, capsys):
    import importlib

    module, _, func = target.partition(":")
    with pytest.raises(SystemExit) as info:
        getattr(importlib.import_module(module), func)(["--help"])
    assert info.value.code == 0 and TRUST_CHECKPOINT_FLAG in capsys.readouterr().out


# -- exported artefacts are checked against their metadata's sha256 ----------------------------
@pytest.fixture(scope="module")
def onnx_export(tmp_path_factory):
    from lineside.export.onnx_export import export_onnx

    return export_onnx(PRE_NAMESPACE_CKPT, tmp_path_factory.mktemp("onnx"), batch_sizes=(1, 2), parity_images=0)


def test_onnx_changed_after_export_is_refused(onnx_export, tmp_path):
    folder = tmp_path / "export"
    shutil.copytree(onnx_export.path.parent, folder)
    backend = load_backend(folder / "model.onnx")  # untouched: loads and runs
    assert backend(np.zeros((1, 1, 64, 64), np.uint8))["grade_probs"].shape == (1, 4)
    with open(folder / "model.onnx", "ab") as fh:  # bytes changed after export (ONNX Runtime itself would still load it)
        fh.write(b"\0")
    for target in (folder / "model.onnx", folder):
        with pytest.raises(BackendError) as info:
            load_backend(target)
        msg = str(info.value)
        assert "sha256 mismatch" in msg and "model.onnx" in msg and "re-export" in msg.lower()
        assert "metadata" in msg and "together" in msg


def test_onnx_with_the_metadata_of_another_export_is_refused(onnx_export, tmp_path):
    folder = tmp_path / "export"
    shutil.copytree(onnx_export.path.parent, folder)
    meta = read_metadata(folder / "model.onnx")
    meta["artefact_sha256"] = "0" * 64
    (folder / "metadata.json").write_text(__import__("json").dumps(meta))
    with pytest.raises(BackendError, match="sha256 mismatch"):
        load_backend(folder / "model.onnx")


def test_aoti_package_changed_after_export_is_refused_before_loading(tmp_path, monkeypatch):
    """The check runs before the package's compiled code is loaded: a stand-in file is enough."""
    from lineside.runtime import aoti_backend

    pkg = tmp_path / "model.pt2"
    pkg.write_bytes(b"package bytes")
    write_metadata({"format": "aoti", "aoti": {"device": "cpu"}, "inputs": [], "outputs": []}, pkg)
    pkg.write_bytes(b"package bytes, changed")
    loads = []
    monkeypatch.setattr(torch._inductor, "aoti_load_package", lambda *a, **k: loads.append(a))
    with pytest.raises(BackendError, match=r"sha256 mismatch.*model\.pt2.*(?i:re-export)"):
        aoti_backend.AotiBackend(pkg)
    assert loads == [], "the package was handed to the loader"
