"""lineside cross-validation: k models on block folds → out-of-fold decision offsets → one ensemble.

    lineside crossval --config configs/el_grading.yaml --folds 5 --out runs/el_grading_cv
    lineside crossval --config configs/el_grading.yaml --data.manifest cells.csv --out runs/my_cv
    lineside score --model runs/el_grading_cv/ensemble.ckpt --input cells/ --output grades.csv

Train + val of the config's data are pooled and cut into ``--folds`` folds (whole index blocks
with ``data.split: block``); the test split is never touched until the end. For each fold a model
is trained on the other folds (the config's recipe, last epoch, no selection on the held-out fold)
and predicts its held-out fold (out-of-fold, OOF) and the test split. The OOF predictions of all
folds give an honest cross-validated score and the per-grade decision offsets (fitted to
``--objective``); the k models averaged, with those offsets, are written as ``ensemble.ckpt``
(``score.py`` and ``export`` read it like any checkpoint) and scored once on the test split.

Finished folds are kept (``fold<k>/fold.ckpt`` + ``fold<k>/predictions.npz``): a re-run resumes.
Any other ``--section.key value`` argument overrides the config as in ``train.py``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

__all__ = ["OBJECTIVES", "run_crossval"]

log = logging.getLogger("lineside.crossval")


def _fold_cli(config_args: list[str], fold: int, folds: int, fold_dir: Path):
    from lineside.fusion.training_cli import InspectionCLI

    # the same CLI as `lineside fit`: class names linked from the data, the CSV log placed in the fold's folder
    logger = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"name": "logs"}}
    args = [
        *config_args,
        "--data.fold", str(fold), "--data.num_folds", str(folds),
        "--trainer.default_root_dir", str(fold_dir),
        "--trainer.logger", json.dumps(logger),
        "--trainer.callbacks", "[]",  # no best-on-held-out-fold selection, no prediction files
        "--trainer.enable_checkpointing", "false",
        "--trainer.limit_val_batches", "0",
        "--trainer.num_sanity_val_steps", "0",
    ]
    return InspectionCLI(run=False, args=args, save_config_callback=None)


def _predict(trainer, module, dm, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    records = dm.prepare_splits()[split]
    if not records:
        return np.zeros((0, module.model.num_grades)), np.zeros(0, dtype=int), []
    dm.predict_split = split
    out = trainer.predict(module, datamodule=dm)
    probs = torch.cat([o["probs"].float() for o in out]).numpy()
    return probs, np.array([r.label for r in records]), [str(r.path) for r in records]


def _finished_fold(out: Path, fold: int) -> dict | None:
    """The saved predictions of a fold whose checkpoint and predictions are both complete, else None."""
    fold_dir = out / f"fold{fold}"
    npz = fold_dir / "predictions.npz"
    if npz.is_file() and (fold_dir / "fold.ckpt").is_file():
        return dict(np.load(npz, allow_pickle=False))
    return None


def _run_fold(config_args: list[str], fold: int, folds: int, out: Path) -> dict:
    done = _finished_fold(out, fold)
    if done is not None:
        log.info("fold %d: done before, reusing %s", fold, out / f"fold{fold}")
        return done
    fold_dir = out / f"fold{fold}"
    npz = fold_dir / "predictions.npz"
    fold_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    cli = _fold_cli(config_args, fold, folds, fold_dir)
    trainer, module, dm = cli.trainer, cli.model, cli.datamodule
    trainer.fit(module, datamodule=dm)
    trainer.save_checkpoint(fold_dir / "fold.ckpt")
    oof = _predict(trainer, module, dm, "val")
    test = _predict(trainer, module, dm, "test")
    res = {
        "oof_probs": oof[0], "oof_labels": oof[1], "oof_paths": np.array(oof[2]),
        "test_probs": test[0], "test_labels": test[1], "test_paths": np.array(test[2]),
        "class_names": np.array(module.class_names), "seconds": np.array(time.time() - t0),
    }
    np.savez(fold_dir / "predictions.tmp.npz", **res)
    os.replace(fold_dir / "predictions.tmp.npz", npz)  # a fold counts as done only when complete
    log.info("fold %d: %d OOF / %d test predictions in %.0f s", fold, len(oof[1]), len(test[1]), time.time() - t0)
    return res


def _write_ensemble(out: Path, member_ckpts: list[Path], bias: np.ndarray, objective: str, trust_checkpoint: bool = False) -> Path:
    from lineside.fusion.checkpoint_file import read_checkpoint

    state, meta, configs = {}, None, []
    for k, path in enumerate(member_ckpts):
        ckpt = read_checkpoint(path, "cpu", trust_checkpoint)  # weights only, unless trusted
        m = ckpt["lineside"]
        if meta is None:
            meta = dict(m)
        elif (m["image_size"], m["channels"], m["class_names"]) != (meta["image_size"], meta["channels"], meta["class_names"]):
            raise ValueError(f"{path}: image size / channels / grades differ from {member_ckpts[0]}; members must share their input")
        configs.append(m["model_config"])
        for name, v in ckpt["state_dict"].items():
            if name.startswith("model."):
                state[f"model.members.{k}.{name[len('model.'):]}"] = v
    state["model.grade_bias"] = torch.tensor(bias, dtype=torch.float32)
    meta["ensemble"] = {"members": len(member_ckpts), "grade_bias": [float(b) for b in bias], "objective": objective}
    if any(c != configs[0] for c in configs):
        meta["ensemble"]["member_configs"] = configs
    path = out / "ensemble.ckpt"
    torch.save({"state_dict": state, "lineside": meta}, path)
    return path


def _load_run(run: Path, folds: int) -> list[dict]:
    """Fold predictions of another finished crossval folder (``--with``)."""
    missing = [k for k in range(folds) if not (run / f"fold{k}" / "predictions.npz").is_file()]
    if missing:
        raise FileNotFoundError(f"{run}: folds {missing} are not finished; run crossval.py there first")
    return [dict(np.load(run / f"fold{k}" / "predictions.npz")) for k in range(folds)]


def _average_runs(runs: list[list[dict]], names: list[Path]) -> list[dict]:
    """Per fold, average the OOF and test probabilities of several runs over the same cells."""
    merged = []
    for k, per_run in enumerate(zip(*runs)):
        first = per_run[0]
        for r, name in zip(per_run[1:], names[1:]):
            if list(r["oof_paths"]) != list(first["oof_paths"]) or list(r["test_paths"]) != list(first["test_paths"]):
                raise ValueError(f"{name}: fold {k} holds other cells than {names[0]}; --with runs need the same data, folds and seed")
        merged.append(first | {
            "oof_probs": np.mean([r["oof_probs"] for r in per_run], 0),
            "test_probs": np.mean([r["test_probs"] for r in per_run], 0),
            "seconds": np.array(sum(float(r["seconds"]) for r in per_run)),
        })
    return merged


def _fmt(name: str, m: dict) -> str:
    rec = " / ".join(f"{100 * r:.1f}" for r in m["recall"])
    return f"| {name} | {m['n']} | {100 * m['acc']:.1f} | {m['macro_f1']:.3f} | {m['auroc_defective']:.3f} | {rec} |"


OBJECTIVES = ("macro_f1", "mean", "acc")


def _nested_offsets(results: list[dict], objective: str) -> dict:
    """Honest CV estimate of the offset rule: each fold decided with offsets fitted on the other folds."""
    from lineside.fusion.ensemble import fit_grade_bias, grade_metrics

    logits, labels = [], []
    for k, r in enumerate(results):
        others = [j for j in range(len(results)) if j != k]
        b = fit_grade_bias(
            np.concatenate([results[j]["oof_probs"] for j in others]), np.concatenate([results[j]["oof_labels"] for j in others]), objective
        )
        logits.append(np.log(np.clip(r["oof_probs"], 1e-12, None)) + b)
        labels.append(r["oof_labels"])
    z = np.concatenate(logits)
    p = np.exp(z - z.max(1, keepdims=True))
    return grade_metrics(p / p.sum(1, keepdims=True), np.concatenate(labels))


def run_crossval(
    config_args: list[str], folds: int, out: Path, objective: str = "mean", run_folds: list[int] | None = None,
    with_runs: list[Path] | None = None, trust_checkpoint: bool = False,
) -> dict:
    """Run (or resume) the folds, fit the offsets, write ``ensemble.ckpt`` and ``report.{json,md}``.

    With ``run_folds`` only those folds are trained here (e.g. one per machine); the ensemble is
    assembled once every fold of ``out`` is done, else the OOF metrics of the finished folds are printed.
    ``with_runs``: other finished crossval folders on the same data and folds (another recipe);
    their members join the ensemble and their predictions are averaged in, fold by fold.
    Fold checkpoints are read with ``weights_only=True``; ``trust_checkpoint`` (``--trust-checkpoint``)
    lets a refused one (e.g. a ``--with`` folder from elsewhere) load as a full pickle.
    """
    from lineside.fusion.checkpoint_file import read_checkpoint
    from lineside.fusion.ensemble import fit_grade_bias, grade_metrics

    for run in with_runs or []:  # a refused --with member fails now, not after the folds have trained
        for k in range(folds):
            if (run / f"fold{k}" / "fold.ckpt").is_file():
                read_checkpoint(run / f"fold{k}" / "fold.ckpt", "cpu", trust_checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    found = {k: _run_fold(config_args, k, folds, out) for k in (run_folds if run_folds is not None else range(folds))}
    for k in range(folds):  # folds finished by earlier or other runs into the same folder
        if k not in found and (res := _finished_fold(out, k)) is not None:
            found[k] = res
    done = sorted(found)
    if len(done) < folds:
        part = [found[k] for k in done]
        m = grade_metrics(np.concatenate([r["oof_probs"] for r in part]), np.concatenate([r["oof_labels"] for r in part])) if part else None
        print(f"{len(done)} of {folds} folds done ({done}); the ensemble is assembled when all are.")
        if m:
            print(f"OOF so far: n {m['n']}, acc {100 * m['acc']:.1f}%, macro-F1 {m['macro_f1']:.3f}, AUROC {m['auroc_defective']:.3f}, "
                  "recall " + " / ".join(f"{100 * r:.1f}" for r in m["recall"]))
        return {"folds_done": done, "partial_oof": m}
    results = [found[k] for k in range(folds)]
    runs = [out, *(with_runs or [])]
    if with_runs:
        results = _average_runs([results] + [_load_run(r, folds) for r in with_runs], runs)
    member_ckpts = [run / f"fold{k}" / "fold.ckpt" for run in runs for k in range(folds)]
    names = [str(n) for n in results[0]["class_names"]]
    oof_p = np.concatenate([r["oof_probs"] for r in results])
    oof_y = np.concatenate([r["oof_labels"] for r in results])
    bias = fit_grade_bias(oof_p, oof_y, objective)
    rows = {"cv_oof": grade_metrics(oof_p, oof_y)}
    for obj in [objective] + [o for o in OBJECTIVES if o != objective]:
        rows[f"cv_oof_offsets_{obj}"] = _nested_offsets(results, obj) | {"auroc_defective": rows["cv_oof"]["auroc_defective"]}
    has_test = len(results[0]["test_labels"]) > 0 and (results[0]["test_labels"] >= 0).any()
    if has_test:
        test_y = results[0]["test_labels"]
        singles = [grade_metrics(r["test_probs"], test_y) for r in results]
        ens_p = np.mean([r["test_probs"] for r in results], axis=0)
        rows["test_single_mean"] = {
            key: float(np.mean([s[key] for s in singles])) for key in ("acc", "macro_f1", "auroc_defective")
        } | {"n": singles[0]["n"], "recall": np.mean([s["recall"] for s in singles], 0).tolist(),
             "acc_std": float(np.std([s["acc"] for s in singles])), "macro_f1_std": float(np.std([s["macro_f1"] for s in singles]))}
        rows["test_ensemble"] = grade_metrics(ens_p, test_y)
        rows["test_ensemble_offsets"] = grade_metrics(ens_p, test_y, bias)
    ckpt = _write_ensemble(out, member_ckpts, bias, objective, trust_checkpoint)
    report = {"folds": folds, "runs": [str(r) for r in runs], "objective": objective, "class_names": names, "grade_bias": bias.tolist(),
              "seconds": float(sum(float(r["seconds"]) for r in results)), "ensemble_ckpt": str(ckpt), "metrics": rows}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    labels = {
        "cv_oof": "cross-validated, out-of-fold, argmax",
        **{f"cv_oof_offsets_{o}": f"cross-validated, out-of-fold, offsets fitted for {o} (nested)" for o in OBJECTIVES},
        "test_single_mean": f"test, single fold {'model' if not with_runs else 'ensemble'} (mean of {folds})",
        "test_ensemble": f"test, {len(member_ckpts)}-model ensemble, argmax",
        "test_ensemble_offsets": f"test, {len(member_ckpts)}-model ensemble + offsets for {objective} (= ensemble.ckpt)",
    }
    lines = [
        f"decision offsets (log-prob, {objective} on OOF): " + ", ".join(f"{n} {b:+.2f}" for n, b in zip(names, bias)),
        "",
        f"| evaluation | n | acc % | macro-F1 | AUROC ok-vs-defective | recall {' / '.join(names)} % |",
        "|---|---|---|---|---|---|",
        *[_fmt(labels[k], m) for k, m in rows.items()],
    ]
    if has_test:
        cm = rows["test_ensemble_offsets"]["confusion"]
        lines += ["", "test confusion (ensemble.ckpt; rows = true, columns = predicted): " + "  ".join(f"{n}: {row}" for n, row in zip(names, cm))]
    text = "\n".join(lines)
    (out / "report.md").write_text(text + "\n")
    print(text)
    return report

