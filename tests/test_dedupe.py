"""``data.dedupe: md5``: byte-identical images are dropped before the split, so no copy straddles splits."""

import hashlib
import shutil

import pytest

from conftest import write_image
from lineside.fusion.datamodule import InspectionDataModule
from lineside.vision.records import DatasetFormatError, ImageRecord, dedupe_records


def _md5(path: str) -> str:
    return hashlib.md5(open(path, "rb").read()).hexdigest()


@pytest.fixture
def folder_with_copies(tmp_path):
    """root/<class>/*.png, 40 distinct images per class and 20 byte-identical copies of some of them."""
    root = tmp_path / "patches"
    for c, cls in enumerate(("ok", "defect")):
        for i in range(40):
            write_image(root / cls / f"{i:03d}.png", size=(16, 16), seed=100 * c + i)
        for i in range(20):  # copies interleaved in file order (as repeated saturated patches are)
            shutil.copy(root / cls / f"{2 * i:03d}.png", root / cls / f"{2 * i:03d}_copy.png")
    return root


def test_dedupe_drops_repeats_before_splitting(folder_with_copies, caplog):
    kwargs = dict(root=str(folder_with_copies), split="stratified", val_fraction=0.2, test_fraction=0.2, num_workers=0)
    plain = InspectionDataModule(**kwargs).prepare_splits()
    digests = {s: [_md5(r.path) for r in v] for s, v in plain.items()}
    assert set(digests["train"]) & (set(digests["val"]) | set(digests["test"])), "without dedupe copies straddle the split"

    caplog.set_level("INFO")
    dm = InspectionDataModule(**kwargs, dedupe="md5")
    splits = dm.prepare_splits()
    assert dm.dropped_duplicates == 40
    assert sum(len(v) for v in splits.values()) == 80
    assert "dropped 40 of 120" in caplog.text
    digests = {s: [_md5(r.path) for r in v] for s, v in splits.items()}
    all_digests = [d for v in digests.values() for d in v]
    assert len(all_digests) == len(set(all_digests)), "each distinct image appears once, in one split"
    assert not any(r.path.endswith("_copy.png") for v in splits.values() for r in v), "the first copy in file order is kept"


def test_dedupe_keeps_the_first_label_of_conflicting_copies(tmp_path, caplog):
    a = write_image(tmp_path / "a.png", seed=1)
    b = tmp_path / "b.png"
    shutil.copy(a, b)
    c = write_image(tmp_path / "c.png", seed=2)
    records = [ImageRecord(str(a), 0), ImageRecord(str(b), 1), ImageRecord(str(c), 1)]
    kept, dropped = dedupe_records(records, "manifest.csv")
    assert dropped == 1 and [r.path for r in kept] == [str(a), str(c)] and kept[0].label == 0
    assert "1 duplicate images carry another label" in caplog.text


def test_dedupe_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="dedupe must be 'none' or 'md5'"):
        InspectionDataModule(root=str(tmp_path), dedupe="sha1")
    with pytest.raises(DatasetFormatError, match="missing.png: cannot read image"):
        dedupe_records([ImageRecord(str(tmp_path / "missing.png"), 0)])
