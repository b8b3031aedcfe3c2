"""Per-region overlap (PRO, MVTec AD) on hand-made heatmaps and masks, against a brute-force reference."""

import numpy as np
import pytest
import torch

from lineside.fusion.detection_metrics import PerRegionOverlap, PixelAUROC


def _reference_pro(heat: np.ndarray, mask: np.ndarray, regions: list[np.ndarray], max_fpr: float = 0.3) -> float:
    """Exact PRO: every distinct heatmap value as a threshold, curve from (0, 0), trapezoids up to max_fpr."""
    neg = heat[mask == 0]
    xs, ys = [0.0], [0.0]
    for t in np.unique(heat)[::-1]:
        xs.append(float((neg >= t).mean()))
        ys.append(float(np.mean([(heat[r] >= t).mean() for r in regions])))
    xs, ys = np.array(xs), np.array(ys)
    return float(np.trapezoid(np.interp(np.linspace(0, max_fpr, 30001), xs, ys), np.linspace(0, max_fpr, 30001)) / max_fpr)


def _two_regions():
    """A 20x20 defect the heatmap finds (0.9) and a 2x2 defect it misses (0.1), background 0.2."""
    mask = torch.zeros(1, 64, 64)
    mask[0, 5:25, 5:25] = 1
    mask[0, 50:52, 50:52] = 1
    heat = torch.full((1, 64, 64), 0.2)
    heat[0, 5:25, 5:25] = 0.9
    heat[0, 50:52, 50:52] = 0.1
    return heat, mask


def test_a_missed_small_region_halves_pro_while_pixel_auroc_stays_high():
    heat, mask = _two_regions()
    pro = PerRegionOverlap()
    pro.update(heat, mask)
    assert pro.compute() == pytest.approx(0.5, abs=1e-6)  # one region of two found before any false positive
    auroc = PixelAUROC(thresholds=None)
    auroc.update(heat[:, None], mask)
    assert auroc.compute() > 0.98  # 400 of 404 defect pixels rank above the background
    assert auroc.compute_pro() == pytest.approx(0.5, abs=1e-6)


def test_perfect_and_constant_heatmaps():
    _, mask = _two_regions()
    pro = PerRegionOverlap()
    pro.update(mask.clone(), mask)
    assert pro.compute() == pytest.approx(1.0)
    pro.reset()
    pro.update(torch.full_like(mask, 0.5), mask)
    assert pro.compute() == pytest.approx(0.15)  # chance: max_fpr / 2


def test_matches_the_exact_reference_on_random_heatmaps():
    rng = np.random.default_rng(0)
    mask = torch.zeros(2, 32, 32)
    mask[0, 3:9, 3:12] = 1
    mask[0, 20:22, 25:31] = 1
    mask[1, 10:25, 10:14] = 1
    mask[1, 10:12, 14:20] = 1  # touches the region before: one L-shaped region
    heat = (rng.integers(0, 1000, (2, 32, 32)) + 0.5) / 1000  # bin centres: binned thresholds are exact
    heat = torch.tensor(heat, dtype=torch.float32) + 0.3 * mask
    heat = heat.clamp(max=0.9995)
    pro = PerRegionOverlap()
    pro.update(heat[:1], mask[:1])
    pro.update(heat[1:], mask[1:])  # accumulates over calls
    m, h = mask.numpy(), heat.numpy()
    regions = [m[0].astype(bool) & (np.arange(32)[:, None] < 15), m[0].astype(bool) & (np.arange(32)[:, None] >= 15)]
    flat_regions = [np.concatenate([r.ravel(), np.zeros(32 * 32, bool)]) for r in regions]
    flat_regions.append(np.concatenate([np.zeros(32 * 32, bool), m[1].astype(bool).ravel()]))
    expected = _reference_pro(h.ravel(), m.ravel(), flat_regions)
    assert pro._regions == 3
    assert pro.compute() == pytest.approx(expected, abs=2e-3)
    assert 0.15 < expected < 1.0


def test_undefined_without_regions_or_background_and_shape_errors():
    pro = PerRegionOverlap()
    pro.update(torch.rand(1, 8, 8), torch.zeros(1, 8, 8))
    assert np.isnan(pro.compute())
    with pytest.raises(ValueError, match="same \\(B, H, W\\) shape"):
        pro.update(torch.rand(1, 8, 8), torch.zeros(1, 4, 4))
    with pytest.raises(ValueError, match="max_fpr"):
        PerRegionOverlap(max_fpr=0)
