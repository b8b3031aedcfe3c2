import numpy as np
import pytest
import torch

from lineside.fusion.datamodule import InspectionDataModule
from lineside.vision.elpv import ELPV_GRADE_NAMES, elpv_block_folds, elpv_records
from lineside.vision.image_dataset import InspectionImageDataset
from lineside.vision.io import ImageReadError
from lineside.vision.records import DatasetFormatError, records_from_image_folder, records_from_manifest
from lineside.vision.splits import block_split, fold_split, stratified_split
from lineside.vision.transforms import build_eval_transform, build_train_transform


def test_elpv_records_from_the_installed_package():
    recs = elpv_records()
    assert len(recs) == 2624
    assert np.bincount([r.label for r in recs]).tolist() == [1508, 295, 106, 715]
    assert {r.text for r in recs} == {"monocrystalline", "polycrystalline"}
    ds = InspectionImageDataset(recs[:2], build_eval_transform(64), channels=1)
    s = ds[0]
    assert s["image"].shape == (1, 64, 64) and s["image"].dtype == torch.uint8
    assert s["grade"].item() == recs[0].label and s["path"].endswith("cell0001.png")


def test_block_split_keeps_blocks_whole_and_labels_balanced():
    labels = [r.label for r in elpv_records()]
    s = block_split(labels, block_size=60, val_fraction=0.1, test_fraction=0.2, seed=0)
    all_idx = s["train"] + s["val"] + s["test"]
    assert sorted(all_idx) == list(range(len(labels)))
    blocks = {k: {i // 60 for i in v} for k, v in s.items()}
    assert not (blocks["train"] & blocks["test"]) and not (blocks["train"] & blocks["val"]) and not (blocks["val"] & blocks["test"])
    assert 0.15 < len(s["test"]) / len(labels) < 0.25
    y = np.array(labels)
    for k in ("train", "test"):  # every grade is present on both sides
        assert (np.bincount(y[s[k]], minlength=4) > 0).all()
    assert block_split(labels, seed=0) == s and block_split(labels, seed=1) != s


def test_stratified_split_keeps_class_shares():
    labels = [0] * 80 + [1] * 20
    s = stratified_split(labels, 0.1, 0.2, seed=3)
    y = np.array(labels)
    assert np.bincount(y[s["test"]]).tolist() == [16, 4]
    assert np.bincount(y[s["val"]]).tolist() == [8, 2]


def test_image_folder_records_and_samples(image_folder):
    recs, classes = records_from_image_folder(image_folder)
    assert classes == ["crack", "ok"]
    assert {r.split for r in recs} == {"train", "val", "test"} and len(recs) == 20
    recs2, classes2 = records_from_image_folder(image_folder, ["ok", "crack"])
    assert classes2 == ["ok", "crack"] and recs2[0].label in (0, 1)
    ds = InspectionImageDataset(recs, build_train_transform(32), channels=3)
    for i in range(len(ds)):  # mixed sizes and grayscale/RGB all come out the same shape
        assert ds[i]["image"].shape == (3, 32, 32)
    with pytest.raises(DatasetFormatError, match="not in class_names"):
        records_from_image_folder(image_folder, ["ok"])


def test_manifest_relative_paths_missing_labels_and_errors(image_folder, tmp_path):
    m = image_folder / "list.csv"
    m.write_text("path,label,split,text\ntrain/ok/ok_0.png,ok,train,mono\ntrain/crack/crack_1.png,,,\ntest/ok/ok_1.png,crack,test,\n")
    recs, classes = records_from_manifest(m)
    assert classes == ["crack", "ok"]
    assert recs[0].path == str(image_folder / "train/ok/ok_0.png") and recs[0].label == 1 and recs[0].text == "mono"
    assert recs[1].label == -1 and recs[1].split is None
    bad = tmp_path / "bad.csv"
    bad.write_text("path,label\na.png,ok\nb.png,weird\n")
    with pytest.raises(DatasetFormatError, match=r"bad.csv:3: label 'weird'"):
        records_from_manifest(bad, ["ok", "crack"])
    nohead = tmp_path / "nohead.csv"
    nohead.write_text("file,label\na.png,ok\n")
    with pytest.raises(DatasetFormatError, match="'path' column"):
        records_from_manifest(nohead)


def test_bad_image_in_dataset_names_the_file(image_folder):
    bad = image_folder / "train" / "ok" / "broken.png"
    bad.write_bytes(b"\x89PNG broken")
    recs, _ = records_from_image_folder(image_folder)
    ds = InspectionImageDataset(recs, build_eval_transform(32))
    i = [r.path for r in recs].index(str(bad))
    with pytest.raises(ImageReadError, match="broken.png"):
        ds[i]


def test_datamodule_splits_user_data_and_counts(image_folder):
    dm = InspectionDataModule(root=str(image_folder), image_size=32, batch_size=4, num_workers=0, split="stratified")
    dm.setup("fit")
    assert dm.class_names == ["crack", "ok"] and dm.class_counts == [6, 6]
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 1, 32, 32) and batch["grade"].shape == (4,)
    assert len(dm.splits["val"]) == 4 and len(dm.splits["test"]) == 4


def test_datamodule_builtin_elpv_block_split():
    dm = InspectionDataModule(image_size=32, num_workers=0)
    dm.setup("fit")
    assert dm.class_names == ELPV_GRADE_NAMES
    sizes = {k: len(v) for k, v in dm.splits.items()}
    assert sum(sizes.values()) == 2624 and sizes["test"] > 400


def test_fold_split_partitions_blocks_and_strata():
    labels = [r.label for r in elpv_records()][:2100]
    folds = [fold_split(labels, 5, k, block_size=60, seed=0) for k in range(5)]
    vals = [f["val"] for f in folds]
    assert sorted(i for v in vals for i in v) == list(range(2100))  # every item held out exactly once
    for f in folds:
        assert sorted(f["train"] + f["val"]) == list(range(2100))
        assert not ({i // 60 for i in f["train"]} & {i // 60 for i in f["val"]})  # no block straddles
    y = np.array(labels)
    for v in vals:  # blocks dealt by defect rate: every fold sees every grade
        assert (np.bincount(y[v], minlength=4) > 0).all()
    strat = [fold_split([0] * 50 + [1] * 10, 5, k) for k in range(5)]
    assert [sum(1 for i in f["val"] if i >= 50) for f in strat] == [2] * 5
    with pytest.raises(ValueError, match="fold must be"):
        fold_split(labels, 5, 5)
    with pytest.raises(ValueError, match="too few"):
        fold_split(labels[:120], 5, 0, block_size=60)


def test_datamodule_fold_pools_train_and_val_and_keeps_test():
    base = InspectionDataModule(image_size=32, num_workers=0).prepare_splits()
    pool = {r.path for s in ("train", "val") for r in base[s]}
    held = []
    for k in range(3):
        s = InspectionDataModule(image_size=32, num_workers=0, fold=k, num_folds=3).prepare_splits()
        assert [r.path for r in s["test"]] == [r.path for r in base["test"]]
        assert {r.path for r in s["train"]} | {r.path for r in s["val"]} == pool
        assert not ({r.path for r in s["train"]} & {r.path for r in s["val"]})
        held += [r.path for r in s["val"]]
    assert sorted(held) == sorted(pool)


def test_elpv_block_folds_are_the_datamodule_folds():
    # tools that score ELPV out-of-fold (PatchMemory crossval, frozen probe) must hold out the
    # very cells the crossval.py fold models never saw
    records, order, group = elpv_block_folds(folds=3)
    paths = np.array([records[i].path for i in order])
    assert sorted(order) == list(range(2624)) and set(group) == {-1, 0, 1, 2}
    for k in range(3):
        s = InspectionDataModule(image_size=32, num_workers=0, fold=k, num_folds=3).prepare_splits()
        assert sorted(r.path for r in s["val"]) == sorted(paths[group == k])
    assert sorted(r.path for r in s["test"]) == sorted(paths[group == -1])


@pytest.mark.needs_shared
def test_real_xray_castings_only_train_split_is_split_here(shared_data):
    root = shared_data / "xray_castings" / "castings"
    dm = InspectionDataModule(root=str(root), image_size=32, num_workers=0, split="stratified", batch_size=8)
    dm.setup("fit")
    assert dm.class_names == ["class_0", "class_1"]
    assert all(len(v) > 100 for v in dm.splits.values())
    batch = next(iter(dm.val_dataloader()))
    assert batch["image"].shape == (8, 1, 32, 32)


def test_elpv_manifest_cli_writes_the_test_split(tmp_path):
    from lineside.cli.elpv import main as _main

    out = tmp_path / "test.csv"
    assert _main(["manifest", "--split", "test", "--out", str(out)]) == 0
    recs, classes = records_from_manifest(out, ELPV_GRADE_NAMES)
    expected = block_split([r.label for r in elpv_records()])["test"]
    assert len(recs) == len(expected) and recs[0].path == elpv_records()[expected[0]].path
    assert recs[0].label == elpv_records()[expected[0]].label and recs[0].text
