"""Wafer maps: the WM-811K reader (LSWMD.pkl layout, without pandas), the pattern generator, the
dataset and the data module.

The reader is checked on
- a pickle built here with WM-811K's own layout (pandas 0.19-era classes: ``pandas.indexes.base``,
  the block manager's 0.14.1 state), written through stand-in modules so no pandas is needed;
- two small pickles written by real pandas (2.3.3 and 3.1.1, whose strings are pyarrow arrays),
  shipped in tests/data/wafer: ``pd.DataFrame({...}).to_pickle(path)`` with the five rows read below.
"""

from __future__ import annotations

import copyreg
import os
import pickle
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO
from lineside.vision.wafer_dataset import WAFER_LEVELS, WaferMapDataset, wafer_map_image
from lineside.vision.wafer_io import (
    WM811K_CLASSES,
    WaferMapFormatError,
    lswmd_columns,
    map_shapes,
    read_lswmd,
)
from lineside.vision.wafer_synth import (
    WAFER_8INCH,
    WAFER_12INCH,
    die_layout,
    generate_wafer_map,
    generate_wafer_maps,
)

FIXTURES = REPO / "tests" / "data" / "wafer"
EMPTY = np.zeros((0, 0))


# -- a WM-811K-layout pickle, written without pandas ------------------------------------------

def _legacy_modules() -> dict[str, types.ModuleType]:
    """Stand-ins for the pandas 0.19 classes that LSWMD.pkl names, pickling as pandas 0.19 did."""
    mods = {n: types.ModuleType(n) for n in ("pandas", "pandas.core", "pandas.core.frame", "pandas.core.internals",
                                            "pandas.indexes", "pandas.indexes.base", "pandas.indexes.range")}

    def _new_Index(cls, d):
        raise AssertionError("only pickled here, never called")

    class Index:
        def __init__(self, data):
            self.data = np.asarray(data, dtype=object)

        def __reduce__(self):
            return _new_Index, (type(self), {"data": self.data, "name": None}), None

    class RangeIndex(Index):
        def __init__(self, n):
            self.n = n

        def __reduce__(self):
            return _new_Index, (type(self), {"name": None, "start": 0, "stop": self.n, "step": 1}), None

    class BlockManager:
        def __init__(self, axes, blocks):
            self.axes, self.blocks = axes, blocks  # blocks: [(values (k, n), locs)]

        def __getstate__(self):
            items = [Index(self.axes[0].data[locs]) for _, locs in self.blocks]
            extra = {"0.14.1": {"axes": self.axes, "blocks": [{"values": v, "mgr_locs": locs} for v, locs in self.blocks]}}
            return self.axes, [v for v, _ in self.blocks], items, extra

    class DataFrame:
        def __init__(self, mgr):
            self.mgr = mgr

        def __reduce_ex__(self, protocol):
            return copyreg.__newobj__, (DataFrame,), {"_data": self.mgr, "_typ": "dataframe", "_metadata": []}

    for obj, mod in ((_new_Index, "pandas.indexes.base"), (Index, "pandas.indexes.base"), (RangeIndex, "pandas.indexes.range"),
                     (BlockManager, "pandas.core.internals"), (DataFrame, "pandas.core.frame")):
        obj.__module__, obj.__qualname__ = mod, obj.__name__
        setattr(mods[mod], obj.__name__, obj)
    return mods


def write_legacy_lswmd(path: Path, rows: list[dict], monkeypatch, protocol: int = 4) -> Path:
    """A DataFrame pickle laid out as WM-811K's LSWMD.pkl: columns waferMap, dieSize, lotName,
    waferIndex, trianTestLabel, failureType in an object block and a float block."""
    with monkeypatch.context() as mp:
        mods = _legacy_modules()
        for name, mod in mods.items():
            mp.setitem(sys.modules, name, mod)
        Index, RangeIndex = mods["pandas.indexes.base"].Index, mods["pandas.indexes.range"].RangeIndex
        names = ["waferMap", "dieSize", "lotName", "waferIndex", "trianTestLabel", "failureType"]
        n = len(rows)
        obj_cols, float_cols = [0, 2, 4, 5], [1, 3]
        obj = np.empty((len(obj_cols), n), dtype=object)
        for k, c in enumerate(obj_cols):
            for i, r in enumerate(rows):
                obj[k, i] = r[names[c]]
        flt = np.array([[float(r[names[c]]) for r in rows] for c in float_cols])
        mgr = mods["pandas.core.internals"].BlockManager([Index(names), RangeIndex(n)], [(obj, np.array(obj_cols)), (flt, np.array(float_cols))])
        frame = mods["pandas.core.frame"].DataFrame(mgr)
        path.write_bytes(pickle.dumps(frame, protocol=protocol))
    return path


def _row(wmap, failure, split, lot="lot1", index=1.0, die_size=1683.0) -> dict:
    return {"waferMap": wmap, "failureType": failure, "trianTestLabel": split, "lotName": lot, "waferIndex": index, "dieSize": die_size}


def _map(h, w, seed=0) -> np.ndarray:
    m = np.random.default_rng(seed).integers(1, 3, (h, w)).astype(np.uint8)
    m[0, 0] = m[-1, -1] = 0
    return m


@pytest.fixture
def legacy_rows():
    return [
        _row(_map(26, 27, 1), np.array([["none"]]), np.array([["Training"]])),
        _row(_map(45, 48, 2), np.array([["Edge-Ring"]]), np.array([["Test"]]), index=2.0),
        _row(_map(30, 31, 3), EMPTY, EMPTY, lot="lot2"),  # unlabelled, no split (most of WM-811K)
        _row(_map(13, 9, 4), np.array([["Scratch"]]), np.array([["Training"]]), lot="lot2", index=2.0),
        _row(_map(52, 25, 5), np.array([["Near-full"]]), np.array([["Test"]]), lot="lot3", index=25.0),
    ]


@pytest.mark.parametrize("protocol", [2, 4])  # 2: what pandas wrote under Python 2
def test_reader_reads_the_wm811k_layout_without_pandas(tmp_path, legacy_rows, monkeypatch, protocol):
    path = write_legacy_lswmd(tmp_path / "LSWMD.pkl", legacy_rows, monkeypatch, protocol)
    pandas_before = sys.modules.get("pandas")
    records = read_lswmd(path)
    assert sys.modules.get("pandas") is pandas_before, "the reader must not import pandas"
    assert [r.label for r in records] == [0, WM811K_CLASSES.index("Edge-Ring"), -1, WM811K_CLASSES.index("Scratch"),
                                          WM811K_CLASSES.index("Near-full")]
    assert [r.split for r in records] == ["train", "test", None, "train", "test"]
    assert [r.lot for r in records] == ["lot1", "lot1", "lot2", "lot2", "lot3"]
    assert [r.index for r in records] == [1, 2, 1, 2, 25]
    for rec, row in zip(records, legacy_rows):
        assert rec.wafer_map.dtype == np.uint8 and np.array_equal(rec.wafer_map, row["waferMap"])
    assert map_shapes(records) == {(26, 27), (45, 48), (30, 31), (13, 9), (52, 25)}
    assert records[2].source == f"{path}#2"
    assert [r.label for r in read_lswmd(path, labelled_only=True)] == [0, 4, 8, 6]
    cols = lswmd_columns(path)
    assert list(cols) == ["waferMap", "dieSize", "lotName", "waferIndex", "trianTestLabel", "failureType"]
    assert cols["dieSize"][1] == 1683.0


@pytest.mark.parametrize("name", ["lswmd_pandas2.pkl", "lswmd_pandas3.pkl"])
def test_reader_reads_pickles_written_by_current_pandas(name):
    records = read_lswmd(FIXTURES / name)
    assert [r.label for r in records] == [0, 4, -1, 8, 1]
    assert [r.split for r in records] == ["train", "test", None, "train", "test"]
    assert [r.lot for r in records] == ["lot1", "lot1", "lot2", "lot2", "lot3"]
    assert [r.wafer_map.shape for r in records] == [(26, 27), (45, 48), (30, 31), (13, 9), (52, 25)]
    assert all(set(np.unique(r.wafer_map)) <= {0, 1, 2} and r.wafer_map[0, 0] == 0 for r in records)


def test_reader_refuses_code_in_the_pickle_and_names_the_file(tmp_path):
    class Exploit:
        def __reduce__(self):
            return os.system, ("echo owned > " + str(tmp_path / "owned"),)

    bad = tmp_path / "evil.pkl"
    bad.write_bytes(pickle.dumps({"waferMap": [Exploit()]}))
    with pytest.raises(WaferMapFormatError, match=r"evil\.pkl.*(posix|os)\.system"):
        read_lswmd(bad)
    assert not (tmp_path / "owned").exists()


@pytest.mark.parametrize("payload, message", [
    (b"not a pickle at all", "not a readable"),
    (pickle.dumps([1, 2, 3]), "expected a pickled pandas DataFrame"),
    (pickle.dumps({"waferMap": [np.ones((3, 3), np.uint8)], "label": ["none"]}), "no 'failureType' column"),
    (pickle.dumps({"failureType": [[["none"]]]}), "no 'waferMap' column"),
])
def test_malformed_files_are_clear_errors_naming_the_file(tmp_path, payload, message):
    path = tmp_path / "odd.pkl"
    path.write_bytes(payload)
    with pytest.raises(WaferMapFormatError, match=rf"odd\.pkl.*{message}"):
        read_lswmd(path)


@pytest.mark.parametrize("wmap, failure, message", [
    (np.ones((2, 3, 4), np.uint8), np.array([["none"]]), "row 1: waferMap must be a non-empty 2-D array"),
    (np.full((4, 4), 7, np.uint8), np.array([["none"]]), "row 1: waferMap values must be 0"),
    (np.ones((4, 4), np.uint8), np.array([["Crater"]]), "row 1: failureType 'Crater' is not one of"),
])
def test_a_bad_row_names_the_file_and_the_row(tmp_path, legacy_rows, monkeypatch, wmap, failure, message):
    rows = [legacy_rows[0], _row(wmap, failure, np.array([["Training"]]))]
    path = write_legacy_lswmd(tmp_path / "LSWMD.pkl", rows, monkeypatch)
    with pytest.raises(WaferMapFormatError, match=rf"LSWMD\.pkl: {message}"):
        read_lswmd(path)


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_lswmd(tmp_path / "LSWMD.pkl")


# -- generator ---------------------------------------------------------------------------------

def _radius(m: np.ndarray) -> np.ndarray:
    """Each die's distance from the wafer centre, 1 = the outermost die."""
    rows, cols = np.nonzero(m)
    cy, cx = (rows.min() + rows.max()) / 2, (cols.min() + cols.max()) / 2
    yy, xx = np.indices(m.shape)
    r = np.hypot(yy - cy, xx - cx)
    return r / r[m > 0].max()


def _zone_fail(maps, lo, hi) -> float:
    """Share of fail dies among the dies at radius lo..hi, over all maps."""
    fail = total = 0
    for m in maps:
        r = _radius(m)
        zone = (m > 0) & (r >= lo) & (r < hi)
        fail += np.sum(m[zone] == 2)
        total += np.sum(zone)
    return fail / total


def _largest_cluster(m: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    lab, n = ndimage.label(m == 2, structure=np.ones((3, 3)))
    if n == 0:
        return np.zeros((0, 2))
    k = np.argmax(np.bincount(lab.ravel())[1:]) + 1
    return np.argwhere(lab == k).astype(float)


def _maps(cls: str, spec, n=40, seed=0):
    return generate_wafer_maps(0, spec, seed, labels=[WM811K_CLASSES.index(cls)] * n)[0]


@pytest.mark.parametrize("spec", [WAFER_8INCH, WAFER_12INCH])
def test_generated_maps_are_cropped_die_grids_of_their_wafer(spec):
    maps, labels = generate_wafer_maps(180, spec, seed=3)
    assert len(maps) == 180 and set(labels.tolist()) == set(range(9))
    for m in maps:
        assert m.dtype == np.uint8 and set(np.unique(m)) <= {0, 1, 2} and np.any(m == 1)
        assert m[0].any() and m[-1].any() and m[:, 0].any() and m[:, -1].any()  # cropped to the dies
        assert m[0, 0] == 0 and m[-1, -1] == 0  # round wafer: corners off
    dies = [int(np.count_nonzero(m)) for m in maps]
    lo, hi = (350, 1300) if spec is WAFER_8INCH else (800, 3000)
    assert lo <= min(dies) and max(dies) <= hi
    assert len({m.shape for m in maps}) >= 8  # products and grid offsets: many shapes


def test_die_counts_follow_wafer_area_and_die_size():
    for w, h in WAFER_8INCH.die_sizes_mm[:3]:
        small, large = die_layout(WAFER_8INCH, w, h), die_layout(WAFER_12INCH, w, h)
        for lay, spec in ((small, WAFER_8INCH), (large, WAFER_12INCH)):
            expected = np.pi * spec.usable_radius_mm ** 2 / (w * h)
            assert 0.8 * expected < lay.num_dies < expected  # dies cut by the rim are left out
        assert large.num_dies > 2 * small.num_dies and large.shape[0] > small.shape[0] + 8


def test_each_pattern_has_its_signature():
    spec = WAFER_8INCH
    inner, outer = (0.0, 0.25), (0.88, 1.01)
    center = _maps("Center", spec)
    assert _zone_fail(center, *inner) > 0.5 and _zone_fail(center, *outer) < 0.12
    ring = _maps("Edge-Ring", spec)
    assert _zone_fail(ring, *outer) > 0.4 and _zone_fail(ring, *inner) < 0.1
    donut = _maps("Donut", spec)
    assert _zone_fail(donut, 0.35, 0.6) > 2 * _zone_fail(donut, 0.0, 0.12)
    assert _zone_fail(donut, 0.35, 0.6) > 2 * _zone_fail(donut, *outer)
    none = _maps("none", spec)
    assert _zone_fail(none, 0.0, 1.01) < 0.1
    near_full = _maps("Near-full", spec)
    assert _zone_fail(near_full, 0.0, 1.01) > 0.7
    rand = _maps("Random", spec)
    overall = _zone_fail(rand, 0.0, 1.01)
    assert 0.15 < overall < 0.5 and abs(_zone_fail(rand, *inner) - _zone_fail(rand, 0.3, 0.8)) < 0.1  # no structure
    # Scratch: the largest cluster of fail dies is a long thin track
    elongation = []
    for m in _maps("Scratch", spec):
        pts = _largest_cluster(m)
        if len(pts) >= 6:
            ev = np.linalg.eigvalsh(np.cov(pts.T))
            elongation.append(np.sqrt(ev[1] / max(ev[0], 1e-3)))
    assert len(elongation) > 20 and np.median(elongation) > 3.0
    # Edge-Loc at the rim, Loc inside: where the largest cluster's centre lies
    for cls, lo, hi in (("Edge-Loc", 0.6, 1.01), ("Loc", 0.0, 0.8)):
        radii = []
        for m in _maps(cls, spec):
            pts = _largest_cluster(m)
            if len(pts) >= 4:
                cy, cx = pts.mean(0).astype(int)
                radii.append(_radius(np.where(m > 0, m, 0))[cy, cx] if m[cy, cx] else 1.0)
        assert np.mean([lo <= r < hi for r in radii]) > 0.8, (cls, radii)


def test_generator_is_deterministic_by_seed():
    a, ya = generate_wafer_maps(30, "12inch", seed=5)
    b, yb = generate_wafer_maps(30, "12inch", seed=5)
    c, _ = generate_wafer_maps(30, "12inch", seed=6)
    assert np.array_equal(ya, yb) and all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(x.shape == y.shape and np.array_equal(x, y) for x, y in zip(a, c))


def test_class_probs_and_unknown_patterns():
    _, y = generate_wafer_maps(400, "8inch", seed=0, class_probs=[0.85] + [0.15 / 8] * 8)
    assert 0.78 < np.mean(y == 0) < 0.92
    with pytest.raises(ValueError, match="unknown wafer pattern"):
        generate_wafer_map("Crater", "8inch", np.random.default_rng(0))
    with pytest.raises(ValueError, match="9 non-negative shares"):
        generate_wafer_maps(10, "8inch", class_probs=[0.5, 0.5])


# -- dataset and data module ---------------------------------------------------------------------

def test_map_to_image_levels_size_and_channels():
    m = np.array([[0, 1, 2], [2, 1, 0], [1, 1, 1]], np.uint8)
    same = wafer_map_image(m, 3)
    assert same.shape == (3, 3, 1) and np.array_equal(same[:, :, 0], WAFER_LEVELS[m])
    big = wafer_map_image(_map(45, 48), 64)
    assert big.shape == (64, 64, 1) and big.dtype == np.uint8
    three = wafer_map_image(m, 3, channels=3)
    assert np.array_equal(three.argmax(-1), m) and set(np.unique(three)) == {0, 255}
    with pytest.raises(ValueError, match="0/1/2"):
        wafer_map_image(np.full((3, 3), 5, np.uint8), 8)


def test_dataset_samples(legacy_rows):
    from lineside.vision.wafer_io import WaferMapRecord

    recs = [WaferMapRecord(r["waferMap"], k, None, source=f"s#{k}") for k, r in enumerate(legacy_rows)]
    ds = WaferMapDataset(recs, image_size=32)
    s = ds[1]
    assert s["image"].shape == (1, 32, 32) and s["image"].dtype == torch.uint8
    assert int(s["grade"]) == 1 and s["path"] == "s#1" and s["text"] == ""
    sq = WaferMapRecord(_map(32, 32, 9), 0)
    aug = WaferMapDataset([sq], image_size=32, augment=True)
    torch.manual_seed(0)
    views = {aug[0]["image"].numpy().tobytes() for _ in range(24)}
    assert len(views) > 2  # rotations / flips
    assert all(np.array_equal(np.sort(np.frombuffer(v, np.uint8)), np.sort(WAFER_LEVELS[sq.wafer_map].ravel())) for v in views)


def test_data_module_on_generated_maps():
    from lineside.fusion.wafer_datamodule import WaferMapDataModule

    dm = WaferMapDataModule(num_train=45, num_val=18, num_test=27, image_size=32, batch_size=9, wafer="12inch")
    splits = dm.prepare_splits()
    assert {s: len(v) for s, v in splits.items()} == {"train": 45, "val": 18, "test": 27}
    assert dm.class_names == list(WM811K_CLASSES) and dm.num_classes == 9 and sum(dm.class_counts) == 45
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (9, 1, 32, 32) and batch["grade"].min() >= 0
    # splits are independent draws
    assert not any(np.array_equal(a.wafer_map, b.wafer_map) for a in splits["train"] for b in splits["test"] if a.wafer_map.shape == b.wafer_map.shape)


def test_data_module_on_a_wm811k_pickle(tmp_path, legacy_rows, monkeypatch):
    from lineside.fusion.wafer_datamodule import WaferMapDataModule

    rows = legacy_rows * 6  # 12 Training rows, 12 Test rows, 6 unlabelled
    path = write_legacy_lswmd(tmp_path / "LSWMD.pkl", rows, monkeypatch)
    dm = WaferMapDataModule(source=str(path), val_fraction=0.25, image_size=32, batch_size=4)
    splits = dm.prepare_splits()
    assert len(splits["test"]) == 12 and len(splits["train"]) + len(splits["val"]) == 12 and len(splits["val"]) >= 2
    assert all(r.label >= 0 for s in splits.values() for r in s)  # unlabelled rows dropped
    assert dm.class_counts[0] + dm.class_counts[8] == len(splits["train"])
    with pytest.raises(FileNotFoundError, match="nowhere.pkl"):
        WaferMapDataModule(source=str(tmp_path / "nowhere.pkl")).prepare_splits()
