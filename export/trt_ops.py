"""Which ONNX operators TensorRT's ONNX parser accepts (onnx-tensorrt ``docs/operators.md``, TensorRT 10).

The list is a first check before a build; the real proof is TensorRT's own parser
(``lineside export tensorrt``, run in CI with TensorRT-RTX). Integer-arithmetic operators of
ONNX Runtime's QOperator format (``QLinearConv``, ``MatMulInteger`` …) are deliberately absent:
TensorRT takes INT8 as explicit ``QuantizeLinear``/``DequantizeLinear`` pairs.
"""

from __future__ import annotations

from collections import Counter

__all__ = ["TENSORRT_ONNX_OPS", "unsupported_ops"]

TENSORRT_ONNX_OPS = frozenset("""
Abs Acos Acosh Add AffineGrid And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization
BitwiseAnd BitwiseNot BitwiseOr BitwiseXor BlackmanWindow Cast CastLike Ceil Celu Clip Compress Concat Constant
ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DFT DeformConv DepthToSpace DequantizeLinear Div Dropout
Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements GatherND Gelu Gemm GlobalAveragePool
GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample GroupNormalization GRU HammingWindow HannWindow
HardSigmoid HardSwish Hardmax Identity If ImageScaler InstanceNormalization IsInf IsNaN LayerNormalization
LeakyRelu Less LessOrEqual Log LogSoftmax Loop LpNormalization LpPool LRN LSTM MatMul Max MaxPool Mean
MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad ParametricSoftplus
Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform RandomUniformLike Range Reciprocal ReduceL1
ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu
Reshape Resize ReverseSequence RNN RoiAlign Round ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape
Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze STFT Sub Sum
Tan Tanh ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
""".split())


def unsupported_ops(model) -> dict[str, int]:
    """``{op_type: count}`` of nodes (in the main graph and subgraphs) outside :data:`TENSORRT_ONNX_OPS`.

    Args:
        model: an ``onnx.ModelProto`` or a path to one.
    """
    import onnx

    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    counts: Counter = Counter()

    def walk(graph) -> None:
        for node in graph.node:
            if node.domain not in ("", "ai.onnx") or node.op_type not in TENSORRT_ONNX_OPS:
                counts[f"{node.domain + '::' if node.domain not in ('', 'ai.onnx') else ''}{node.op_type}"] += 1
            for attr in node.attribute:
                if attr.g is not None and attr.g.node:
                    walk(attr.g)
                for g in attr.graphs:
                    walk(g)

    walk(model.graph)
    return dict(counts)
