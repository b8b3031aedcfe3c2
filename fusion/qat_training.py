"""The QAT Lightning callback: ``trainer.callbacks`` entry of ``configs/quickstart_qat.yaml``.

    lineside fit --config configs/quickstart_qat.yaml

The fake quantization itself (scheme, class swap, freezing for export) is :mod:`lineside.fusion.qat`,
which imports no Lightning (the exporters use it).
"""

from __future__ import annotations

import logging
import os

from lightning.pytorch.callbacks import Callback
from lineside.fusion.qat import (
    FLOAT_CONVS,
    QAT_KEY,
    calibrate_qat,
    is_qat,
    prepare_qat,
    set_observers,
)
from torch import nn

__all__ = ["QuantizationAwareTraining"]

log = logging.getLogger(__name__)


class QuantizationAwareTraining(Callback):
    """Lightning callback: fine-tune a trained checkpoint with fake INT8 quantization.

    On fit start it loads ``init_from``'s model weights (a float ``lineside fit`` checkpoint), fake-quantizes
    the model (:func:`prepare_qat`) and calibrates the ranges on ``calibration_batches`` training
    batches. Observers follow the weights and activations until epoch ``freeze_observers_epoch``; from
    epoch ``freeze_bn_epoch`` batch-norm statistics are frozen too (the usual end of QAT). Validation
    runs with observers frozen, so the monitored metric is the fake-quantized model's.

    Args:
        init_from: float checkpoint to start from (model weights only; optimizer and epoch start fresh).
            None: start from the model as configured (e.g. its pretrained backbone).
        float_convs / linear / averaging_constant: see :func:`prepare_qat`.
        calibration_batches: training batches for the initial ranges.
        freeze_observers_epoch: epoch from which the quantization ranges stay fixed.
        freeze_bn_epoch: epoch from which batch-norm layers use (and keep) their running statistics.
    """

    def __init__(
        self, init_from: str | None = None, float_convs: int = FLOAT_CONVS, linear: bool = True,
                 averaging_constant: float = 0.01, calibration_batches: int = 8, freeze_observers_epoch: int = 1,
                 freeze_bn_epoch: int = 1,
    ) -> None:
        super().__init__()
        self.init_from = init_from
        self.spec = {"float_convs": int(float_convs), "linear": bool(linear), "averaging_constant": float(averaging_constant)}
        self.calibration_batches = int(calibration_batches)
        self.freeze_observers_epoch, self.freeze_bn_epoch = int(freeze_observers_epoch), int(freeze_bn_epoch)

    # -- lifecycle -------------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        model = pl_module.model
        if is_qat(model):
            return
        if self.init_from and stage == "fit":  # a resumed run's checkpoint overwrites these afterwards
            _load_float_weights(model, self.init_from)
        names = prepare_qat(model, **self.spec)
        log.info("QAT: %d layers fake-quantized (first %d convolutions float)", len(names), self.spec["float_convs"])

    def on_fit_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch > 0 or not self.calibration_batches:
            return
        loader = trainer.datamodule.train_dataloader() if trainer.datamodule is not None else trainer.train_dataloader
        module = pl_module.model

        def batches():
            for i, batch in enumerate(loader):
                if i >= self.calibration_batches:
                    return
                yield pl_module.transfer_batch_to_device(batch, pl_module.device, 0)

        n = calibrate_qat(module, batches(), lambda m, b: m(**m.batch_inputs(b)))
        log.info("QAT: ranges calibrated on %d training batches", n)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        epoch = trainer.current_epoch
        set_observers(pl_module.model, epoch < self.freeze_observers_epoch)
        if epoch >= self.freeze_bn_epoch:
            for m in pl_module.model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if trainer.current_epoch >= self.freeze_bn_epoch:  # Lightning puts the model in train mode each epoch
            for m in pl_module.model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
                    m.eval()

    def on_validation_start(self, trainer, pl_module) -> None:
        set_observers(pl_module.model, False)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.training:
            set_observers(pl_module.model, trainer.current_epoch < self.freeze_observers_epoch)

    def on_test_start(self, trainer, pl_module) -> None:
        set_observers(pl_module.model, False)

    def on_predict_start(self, trainer, pl_module) -> None:
        set_observers(pl_module.model, False)

    # -- checkpoints: quantizers beside the float weights (InspectionModule.on_load_checkpoint puts them back)
    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        state = checkpoint.get("state_dict") or {}
        quant = {k: state.pop(k) for k in [k for k in state if ".weight_quant." in k or ".input_quant." in k]}
        prefix = "model."
        checkpoint[QAT_KEY] = {"spec": dict(self.spec), "state": {k.removeprefix(prefix): v for k, v in quant.items()},
                               "scheme": "int8 symmetric; weights per output channel, inputs of Conv/Linear per tensor"}



def _load_float_weights(model: nn.Module, path: str | os.PathLike) -> None:
    from lineside.fusion.checkpoint_file import read_checkpoint

    if not os.path.isfile(path):
        raise FileNotFoundError(f"QAT init_from: {path}: no such checkpoint (train the float model first, e.g. "
                                "`lineside fit --config configs/quickstart.yaml`)")
    ckpt = read_checkpoint(os.fspath(path), "cpu", False)
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"QAT init_from: {path}: weights do not fit the configured model "
                         f"(missing {missing[:5]}, unexpected {unexpected[:5]}); use the same model config as that run")
    log.info("QAT: model weights from %s", path)
