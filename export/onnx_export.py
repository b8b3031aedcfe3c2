"""ONNX export with pre/post-processing in the graph, metadata beside it and a parity check after it.

    lineside export onnx --ckpt runs/quickstart/checkpoints/best.ckpt --out export/quickstart
    lineside export onnx --ckpt ensemble.ckpt --out export/ens --input-size 300x300 --batch-sizes 1,8,32
    lineside export onnx --ckpt best.ckpt --out export/fp16 --fp16

The graph takes ``image`` uint8 (N, C, H, W) at a fixed H×W (``--input-size``, default the
training size; resized to the training size inside) with a dynamic batch, and returns the
named outputs of :class:`export.deployable.DeployableModel` (``grade_probs`` float32 (N, K),
``grade`` int64 (N,)). torch.onnx's dynamo exporter at a fixed opset, simplified with
onnxslim. After every export the graph is run by ONNX Runtime on real images (ELPV cells from
the installed package, or ``--calib DIR``) against the eager model: max |Δ| of every float
output and agreement of every decoded output; a failing check exits non-zero. The graph is
also checked for operators TensorRT's ONNX parser lacks.

A model with a point encoder and a grasp head takes ``points`` float32 (N, P, 3) in sensor metres,
``point_mask`` bool (N, P) (and ``point_normals`` float32 (N, P, 3) when its encoder takes normals)
and returns ``grasp_position`` / ``grasp_approach`` / ``grasp_closing`` (N, K, 3), ``grasp_width`` /
``grasp_score`` (N, K) in sensor metres; centring, scaling and top-K decoding are in the graph.
Its parity check runs on real clouds (the workshop tools' scans in ``../shared/data/workshop_tools``,
or ``--calib DIR`` of .ply/.pcd/.npy clouds in metres), prepared as in training
(:mod:`export.point_inputs`): grasp positions within 1 mm, the other outputs to float noise.

    lineside export onnx --ckpt runs/parts_grasp/checkpoints/best.ckpt --out export/grasp
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from lineside.export.calibration import real_images
from lineside.export.checkpoint import LoadedModel, load_inspection_model
from lineside.export.deployable import DeployableModel, build_deployable, parse_size
from lineside.export.metadata import build_metadata, write_metadata
from lineside.export.parity import ParityReference, ParityReport, Verifier, tolerance_for
from lineside.export.trt_ops import unsupported_ops

__all__ = ["OPSET", "ExportResult", "export_onnx", "onnx_graph", "parse_batch_sizes"]

log = logging.getLogger("lineside.export")

OPSET = 18  # TensorRT 10 parses opsets 9–20; 18 has Resize antialias and the reduce ops with axes inputs


@dataclass
class ExportResult:
    """What an export wrote and how its parity check went."""

    path: Path
    metadata: dict
    parity: ParityReport | None = None
    unsupported: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.parity is None or self.parity.ok


def parse_batch_sizes(text: str | Sequence[int]) -> list[int]:
    vals = [int(v) for v in (text.split(",") if isinstance(text, str) else text) if str(v).strip()]
    if not vals or min(vals) < 1:
        raise ValueError(f"batch sizes {text!r}: give positive integers, e.g. 1,8,32")
    return sorted(set(vals))


def _to_half(module, args):
    return tuple(a.half() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


class _HalfCompute(torch.nn.Module):
    """fp16 graph: uint8 in → preprocessing in fp32 → model in fp16 → decoded outputs in fp32."""

    def __init__(self, deployable: DeployableModel) -> None:
        import copy

        super().__init__()
        self.d = copy.deepcopy(deployable)  # the caller's (and the checkpoint's) model stays fp32
        self.d.model.half()
        for m in self.d.model.modules():  # encoders normalise in fp32; their backbones take fp16
            if hasattr(m, "normalize") and isinstance(getattr(m, "backbone", None), torch.nn.Module):
                m.backbone.register_forward_pre_hook(_to_half)

    def forward(self, *inputs: torch.Tensor):  # positional, like DeployableModel (image models only: fp16 point graphs are refused)
        from lineside.fusion.postprocess import dihedral_views

        d = self.d
        x = d.preprocess(inputs[0])
        if d.tta_views > 1:
            x = dihedral_views(x, d.tta_views)
        kwargs = {}
        if d.prompt is not None:
            text = d.prompt(x)
            if hasattr(text, "tokens"):  # an encoded prompt enters the fp16 fusion in fp16
                text = type(text)(text.tokens.half(), text.positions.half(), text.padding_mask)
            kwargs["text"] = text
        if getattr(d, "grade_heatmap_decoder", None) is not None:
            kwargs["grade_map"] = True
        return d.decode(_to_float(d.model(x.half(), **kwargs)))


def _to_float(obj):
    """fp16 tensors (inside NamedTuples) → fp32, for the decoders."""
    if isinstance(obj, torch.Tensor):
        return obj.float() if obj.is_floating_point() else obj
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(_to_float(v) for v in obj))
    return obj


def example_inputs(deployable: DeployableModel, n: int = 2) -> tuple[torch.Tensor, ...]:
    """Random inputs in :meth:`DeployableModel.input_specs` order (frames; clouds with some padding)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for spec in deployable.input_specs():
        shape = (n, *spec.shape[1:])
        if spec.name == "image":
            out.append(torch.randint(0, 256, shape, dtype=torch.uint8, generator=g))
        elif spec.name == "point_mask":
            mask = torch.ones(shape, dtype=torch.bool)
            mask[0, shape[1] // 2 :] = False
            out.append(mask)
        elif spec.name == "point_normals":
            out.append(torch.nn.functional.normalize(torch.randn(shape, generator=g), dim=-1))
        else:
            out.append(torch.rand(shape, generator=g) * 0.1 + torch.tensor([0.0, 0.0, 0.4]))
    return tuple(out)


def onnx_graph(deployable: DeployableModel, path: str | os.PathLike, opset: int = OPSET, fp16: bool = False, simplify: bool = True) -> Path:
    """Export ``deployable`` to ``path`` (dynamo exporter, dynamic batch ``N``), simplified with onnxslim."""
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fp16 and deployable.num_points is not None:
        raise ValueError("fp16 graphs of point models are not supported (farthest-point sampling and grasp positions need "
                         "fp32 distances); export fp32 (and build TensorRT engines with --precision fp32)")
    module = _HalfCompute(deployable) if fp16 else deployable
    example = example_inputs(deployable)
    names = deployable.input_names
    batch = torch.export.Dim("N", min=1, max=4096)
    tmp = path.with_name(path.name + ".raw.onnx")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, example, str(tmp), dynamo=True, opset_version=opset, input_names=names,
            output_names=deployable.output_names, dynamic_shapes=(tuple({0: batch} for _ in names),), external_data=False,
            optimize=True, verbose=False,
        )
    model = onnx.load(str(tmp))
    tmp.unlink(missing_ok=True)
    if simplify:
        import onnxslim

        model = onnxslim.slim(model)
    _name_batch_axis(model, deployable.output_names)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _name_batch_axis(model, output_names: Sequence[str]) -> None:
    """Call the dynamic batch axis ``N`` on the input and every output (Triton and TensorRT read it)."""
    for vi in [*model.graph.input, *[o for o in model.graph.output if o.name in output_names]]:
        dims = vi.type.tensor_type.shape.dim
        if dims:
            dims[0].ClearField("dim_value")
            dims[0].dim_param = "N"


def export_onnx(
    source: str | os.PathLike | LoadedModel,
    out_dir: str | os.PathLike,
    input_size: Sequence[int] | str | None = None,
    batch_sizes: Sequence[int] = (1, 8, 32),
    fp16: bool = False,
    opset: int = OPSET,
    calib: str | os.PathLike | None = None,
    parity_images: int = 32,
    tta_views: int | None = None,
    simplify: bool = True,
    text_prompt: str | None = None,
    verify: Verifier | None = None,
    trust_checkpoint: bool = False,
    tolerance=None,
) -> ExportResult:
    """Export a checkpoint to ``out_dir/model.onnx`` + ``metadata.json`` and check parity on real images.

    Returns an :class:`ExportResult`; ``result.ok`` is False when parity failed (the files stay,
    for inspection). ``parity_images=0`` skips the check (tests of the exporter itself).
    ``trust_checkpoint``: see :func:`export.checkpoint.load_inspection_model`. ``tolerance``: parity
    overrides (``--parity-tolerance`` text, a mapping or a :class:`export.parity.Tolerance`) on top of
    the precision's limits (:func:`export.parity.tolerance_for`).
    """
    start = time.perf_counter()
    loaded = source if isinstance(source, LoadedModel) else load_inspection_model(source, trust_checkpoint=trust_checkpoint)
    deployable = build_deployable(loaded, parse_size(input_size) if isinstance(input_size, str) else input_size, tta_views, text_prompt)
    out = Path(out_dir)
    path = onnx_graph(deployable, out / "model.onnx", opset, fp16, simplify)
    deployable = build_deployable(loaded, deployable.input_size, tta_views, text_prompt)  # fresh fp32 reference (fp16 casts in place)
    bad_ops = unsupported_ops(path)
    precision = "fp16" if fp16 else "fp32"
    meta = build_metadata(
        deployable, loaded, "onnx", precision=precision, opset=opset, batch_sizes=parse_batch_sizes(batch_sizes),
        exporter=f"torch.onnx (dynamo), torch {torch.__version__}" + (", onnxslim" if simplify else ""),
        tensorrt_unsupported_ops=bad_ops,
    )
    write_metadata(meta, path)
    result = ExportResult(path, meta, None, bad_ops)
    if parity_images and verify is not None:
        images = parity_inputs(deployable, loaded, calib, parity_images)
        result.parity = verify(path, ParityReference(deployable, loaded), images, tolerance_for(precision, tolerance),
                               batch_size=max(1, min(8, len(images))))
        meta["parity"] = result.parity.to_dict()
        write_metadata(meta, path)
    result.metadata = meta
    result.seconds = time.perf_counter() - start
    return result


def parity_inputs(deployable: DeployableModel, loaded: LoadedModel, calib: str | os.PathLike | None, n: int):
    """Real inputs for a parity check: frames (``real_images``), or for a point model real clouds
    prepared as in training (:func:`export.point_inputs.real_clouds`), with frames beside them for an
    image + point model."""
    if deployable.num_points is None:
        return real_images(calib, deployable.input_size, deployable.channels, n)[0]
    from lineside.export.point_inputs import PointPreprocessing, real_clouds

    clouds, _ = real_clouds(calib, PointPreprocessing.from_loaded(loaded, deployable), n)
    if deployable.has_image:  # no registered real RGB-D set ships: ELPV frames stand beside the clouds
        frames, _ = real_images(None, deployable.input_size, deployable.channels, len(clouds["points"]))
        m = min(len(frames), len(clouds["points"]))
        clouds = {"image": frames[:m], **{k: v[:m] for k, v in clouds.items()}}
    return clouds
