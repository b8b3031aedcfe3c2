"""PointEncoder: shapes, padding and permutation invariance, gradients, tiny clouds, ONNX parity and TensorRT ops."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lineside.pointcloud.point_encoder import EncoderOutput, PlainPointNet, PointEncoder, farthest_point_sample

P, G, K, D = 256, 16, 8, 32


def tiny(in_features: int = 0, levels: int = 2) -> PointEncoder:
    torch.manual_seed(0)
    cfg = dict(num_groups=(G, 8), group_sizes=(K, 4), widths=((16, 32), (32, 32)), local_scales=(0.02, 0.06))
    cfg = {k: v[:levels] for k, v in cfg.items()}
    return PointEncoder(embed_dim=D, in_features=in_features, **cfg).eval()


def cloud(n: int = P, seed: int = 0) -> torch.Tensor:
    """A 10 cm box part half a metre in front of the sensor."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, generator=g) * torch.tensor([0.1, 0.06, 0.02]) + torch.tensor([0.05, -0.03, 0.5])


def by_position(out: EncoderOutput, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens and positions of cloud b sorted by x (an order-free view of the set)."""
    order = out.positions[b, :, 0].argsort()
    return out.tokens[b, order], out.positions[b, order]


def test_output_is_the_encoder_contract_without_importing_vision() -> None:
    import subprocess
    import sys

    from lineside.vision.image_encoder import EncoderOutput as VisionEncoderOutput

    assert EncoderOutput._fields == VisionEncoderOutput._fields
    code = "import sys, lineside.pointcloud.point_encoder; print(sorted(m for m in sys.modules if m.startswith(('lineside.vision', 'lineside.fusion', 'lineside.export'))))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"


def test_shapes_and_positions_are_real_points() -> None:
    enc = tiny()
    pts = torch.stack([cloud(seed=0), cloud(seed=1)])
    out = enc(pts, torch.ones(2, P, dtype=torch.bool))
    assert isinstance(out, EncoderOutput) and enc.embed_dim == D and enc.num_tokens == 8
    assert out.tokens.shape == (2, 8, D) and out.positions.shape == (2, 8, 3) and out.padding_mask.shape == (2, 8)
    assert out.padding_mask.dtype == torch.bool and not out.padding_mask.any()
    # positions are group centres in metres: points of the input cloud, all distinct
    d = (out.positions[0, :, None] - pts[0, None]).norm(dim=-1).min(1).values
    assert d.max() < 1e-6
    assert torch.pdist(out.positions[0]).min() > 0


def test_fps_spreads_centres_and_never_picks_padding() -> None:
    pts = torch.rand(1, 64, 3)
    mask = torch.zeros(1, 64, dtype=torch.bool)
    mask[0, ::2] = True
    idx, rep = farthest_point_sample(pts, mask, 20)
    assert mask[0, idx[0]].all() and not rep.any() and len(set(idx[0].tolist())) == 20
    # every real point is within the covering radius of the chosen centres, which is below a random pick's
    real = pts[0, mask[0]]
    cover = torch.cdist(real, pts[0, idx[0]]).min(1).values.max()
    rand_cover = torch.cdist(real, real[:20]).min(1).values.max()
    assert cover < rand_cover


def test_padding_invariance_with_garbage_points() -> None:
    enc = tiny()
    pts = cloud(200).unsqueeze(0)
    ref = enc(pts, torch.ones(1, 200, dtype=torch.bool))
    # the same 200 points scattered among 56 garbage entries (huge values, NaN) under mask=False
    perm = torch.randperm(P, generator=torch.Generator().manual_seed(1))
    slots = perm[:200].sort().values
    padded = torch.full((1, P, 3), 1e6)
    padded[0, perm[200:210]] = float("nan")
    padded[0, perm[210:220]] = 0.0
    mask = torch.zeros(1, P, dtype=torch.bool)
    padded[0, slots] = pts[0]
    mask[0, slots] = True
    out = enc(padded, mask)
    assert torch.isfinite(out.tokens).all()
    torch.testing.assert_close(out.tokens, ref.tokens, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.positions, ref.positions, atol=1e-6, rtol=0)
    assert torch.equal(out.padding_mask, ref.padding_mask)


@pytest.mark.parametrize("levels", [1, 2])
def test_permutation_invariance_up_to_token_order(levels: int) -> None:
    enc = tiny(levels=levels)
    pts = cloud().unsqueeze(0)
    mask = torch.ones(1, P, dtype=torch.bool)
    shuffled = pts[:, torch.randperm(P, generator=torch.Generator().manual_seed(3))]
    a, b = enc(pts, mask), enc(shuffled, mask)
    ta, pa = by_position(a, 0)
    tb, pb = by_position(b, 0)
    torch.testing.assert_close(pa, pb, atol=1e-6, rtol=0)
    torch.testing.assert_close(ta, tb, atol=1e-5, rtol=1e-5)


def test_gradients_reach_every_parameter() -> None:
    enc = tiny(in_features=3).train()
    pts = torch.stack([cloud(seed=0), cloud(seed=1)])
    normals = torch.nn.functional.normalize(torch.randn(2, P, 3), dim=-1)
    mask = torch.ones(2, P, dtype=torch.bool)
    mask[1, 100:] = False
    out = enc(pts, mask, normals)
    (out.tokens * ~out.padding_mask.unsqueeze(-1)).pow(2).mean().backward()
    missing = [n for n, p in enc.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing


@pytest.mark.parametrize("n_real", [0, 1, 3, 10])
def test_few_real_points_give_finite_tokens_and_padding(n_real: int) -> None:
    enc = tiny()
    pts = torch.randn(2, P, 3) * 5
    mask = torch.zeros(2, P, dtype=torch.bool)
    mask[0, :n_real] = True
    mask[1] = True
    out = enc(pts, mask)
    assert torch.isfinite(out.tokens).all() and torch.isfinite(out.positions).all()
    # level 1 keeps min(n_real, 16) distinct centres, level 2 min(that, 8); the rest are padding
    assert int((~out.padding_mask[0]).sum()) == min(n_real, 8)
    assert not out.padding_mask[1].any()
    grads = torch.autograd.grad(out.tokens.sum(), list(enc.parameters()), allow_unused=True)
    assert all(g is None or torch.isfinite(g).all() for g in grads)


def test_features_are_required_iff_configured() -> None:
    with pytest.raises(ValueError, match="in_features"):
        tiny(in_features=3)(cloud().unsqueeze(0), torch.ones(1, P, dtype=torch.bool))
    with pytest.raises(ValueError, match="in_features"):
        tiny()(cloud().unsqueeze(0), torch.ones(1, P, dtype=torch.bool), torch.zeros(1, P, 3))


def test_plain_pointnet_baseline() -> None:
    torch.manual_seed(0)
    net = PlainPointNet(D, widths=(16, 32)).eval()
    pts = torch.stack([cloud(seed=0), cloud(seed=1)])
    mask = torch.ones(2, P, dtype=torch.bool)
    mask[1] = False
    out = net(pts, mask)
    assert out.tokens.shape == (2, 1, D) and out.positions.shape == (2, 1, 3)
    assert out.padding_mask.tolist() == [[False], [True]] and torch.isfinite(out.tokens).all()
    garbage = pts.clone()
    garbage[0, 200:] = 1e6
    m2 = mask.clone()
    m2[0, 200:] = False
    torch.testing.assert_close(net(garbage, m2).tokens[0], net(pts[:, :200], mask[:, :200]).tokens[0], atol=1e-5, rtol=1e-5)


class _Wrapped(torch.nn.Module):
    """EncoderOutput as a plain tuple of named graph outputs."""

    def __init__(self, enc: torch.nn.Module) -> None:
        super().__init__()
        self.enc = enc

    def forward(self, points, point_mask, normals):
        out = self.enc(points, point_mask, normals)
        return out.tokens, out.positions, out.padding_mask


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    enc = tiny(in_features=3)
    path = tmp_path_factory.mktemp("point_encoder") / "point_encoder.onnx"
    pts = torch.stack([cloud(seed=0), cloud(seed=1)])
    normals = torch.nn.functional.normalize(torch.randn(2, P, 3), dim=-1)
    mask = torch.ones(2, P, dtype=torch.bool)
    batch = torch.export.Dim("batch", min=1, max=64)
    torch.onnx.export(
        _Wrapped(enc).eval(),
        (pts, mask, normals),
        str(path),
        dynamo=True,
        opset_version=18,
        input_names=["points", "point_mask", "normals"],
        output_names=["tokens", "positions", "padding_mask"],
        dynamic_shapes={"points": {0: batch}, "point_mask": {0: batch}, "normals": {0: batch}},
        verbose=False,
    )
    return enc, path


def test_onnx_parity_with_dynamic_batch(exported) -> None:
    import onnxruntime as ort

    enc, path = exported
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for b in (1, 3):
        pts = torch.stack([cloud(seed=10 + i) for i in range(b)])
        normals = torch.nn.functional.normalize(torch.randn(b, P, 3), dim=-1)
        mask = torch.ones(b, P, dtype=torch.bool)
        mask[-1, 150:] = False  # a padded cloud
        if b == 3:
            mask[1, 5:] = False  # fewer real points than groups
        with torch.no_grad():
            ref = enc(pts, mask, normals)
        got = sess.run(None, {"points": pts.numpy(), "point_mask": mask.numpy(), "normals": normals.numpy()})
        assert got[0].shape == (b, 8, D)
        assert np.abs(got[0] - ref.tokens.numpy()).max() < 1e-4
        assert np.abs(got[1] - ref.positions.numpy()).max() < 1e-6
        assert np.array_equal(got[2], ref.padding_mask.numpy())


def test_onnx_graph_has_only_tensorrt_ops(exported) -> None:
    import onnx

    from lineside.export.trt_ops import unsupported_ops

    _, path = exported
    assert unsupported_ops(onnx.load(str(path))) == {}


def test_tensorrt_rtx_parses_and_builds(exported, tmp_path) -> None:
    from lineside.export.tensorrt import build_engine, import_tensorrt

    if import_tensorrt("tensorrt_rtx") is None:
        pytest.skip("TensorRT-RTX not installed: pip install '.[tensorrt]'")
    _, path = exported
    r = build_engine(path, tmp_path / "engine", "fp32", (1, 4), flavour="tensorrt_rtx")
    assert r.path.is_file() and r.path.stat().st_size > 1000 and r.layers > 0
