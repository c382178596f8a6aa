"""The training task: a net, its optimizer and schedule, cross-entropy and torchmetrics metrics in one LightningModule.

Its hyperparameters are plain dicts (the net's and the optimizer's Hydra configs), so a
checkpoint holds no pickled code: it loads with ``torch.load(weights_only=True)`` and the
network is rebuilt from its config (cifarkit/nets/saved.py). Every option comes from
configs/model/ (``common/classifier.yaml`` holds their defaults).
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import asdict
from functools import cached_property
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.func import functional_call
from torchmetrics import MaxMetric, MeanMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassCalibrationError, MulticlassConfusionMatrix
from torchmetrics.wrappers import ClasswiseWrapper

from cifarkit.core.errors import UserError, existing
from cifarkit.core.untrusted.compiled_cache import inductor_cache_fault
from cifarkit.data.augment import tta_logits
from cifarkit.fit import allocator, bf16_copy, optim
from cifarkit.nets import start

log = logging.getLogger(__name__)
WHITENING_IMAGES = 5000  # training images a data-initialised net (AirbenchNet) learns its first layer from


def _plain(cfg: Any) -> Any:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg


class ImageClassifier(L.LightningModule):
    def __init__(
        self,
        net: dict | nn.Module,
        classes: list[str],
        *,
        optimizer: dict | None,
        scheduler: dict | None,
        param_groups: dict | None,
        label_smoothing: float,
        tta: str,
        channels_last: bool,
        compile: bool | str,
        init_from: str | None = None,
        reuse_memory: bool = False,
        bf16_weight_copy: bool = False,
        consistency: float = 0.0,
    ) -> None:
        """``net``: a Hydra config of an ``nn.Module`` taking ``num_classes`` (or a net already
        rebuilt from a checkpoint, for testing); ``optimizer`` and ``scheduler``: ``_partial_``
        Hydra configs completed with the parameters / optimizer (and ``total_steps``, the run's
        optimizer steps, for a scheduler that takes it: it then steps every step);
        ``param_groups``: options of ``cifarkit.fit.optim.param_groups`` (none: one group);
        ``tta``: test-time augmentation of the test step, one of ``TTA``; ``channels_last``:
        the memory format of the net and its inputs; ``compile``: ``torch.compile`` the net
        (true: inductor's default mode; or a mode's name, e.g. ``reduce-overhead``); ``init_from``:
        a checkpoint whose weights the net starts from (cifarkit/nets/start.py; none for a net rebuilt
        from its own checkpoint); ``reuse_memory``: on the CPU, malloc keeps the step's large freed
        blocks for the next step (cifarkit/fit/allocator.py; a classifier built by hand leaves it alone);
        ``bf16_weight_copy``: in a bf16-mixed CPU fit with Adam, the optimizer keeps the bf16 weights the
        training forward pass runs on instead of autocast casting them every step (cifarkit/fit/bf16_copy.py).
        ``consistency``: the weight of AugMix's Jensen-Shannon consistency loss on batches with views
        (``data.augment.augmix.views``; AugMix's 12). A timm net's ``pretrained``/``weights`` are taken out of its
        config here: they say where its first weights come from, which ``setup`` loads."""
        super().__init__()
        net, optimizer, scheduler, classes = _plain(net), _plain(optimizer), _plain(scheduler), list(classes)
        param_groups = _plain(param_groups)
        built = isinstance(net, nn.Module)
        self.timm_weights = None
        if not built:
            net, self.timm_weights = start.split_timm_start(net)
        if init_from is not None:  # with timm's weights too: the schema refuses
            existing("model.init_from", init_from, "a .ckpt written by train.py")
        self.save_hyperparameters(ignore=["net"] if built else None)
        self.net: nn.Module = net if built else instantiate(net, num_classes=len(classes))
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.net.to(memory_format=self.memory_format)
        # Kept out of the module tree so the state dict stays the plain net's.
        self.__dict__["_forward"] = compiled(self.net, compile)
        self._keeper: bf16_copy.Bf16CopyAdam | None = None  # the optimizer keeping the net's bf16 weights
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        n = len(classes)
        # Training loss and accuracy: sums on the device (loss x images, correct, images) with one
        # in-place add per step, read and logged once per epoch. No per-step metric object or
        # self.log: each costs host time at every step. Persistent: a run resumed mid-epoch keeps
        # the epoch's first part.
        self.register_buffer("train_sums", torch.zeros(3))
        self.val_loss, self.test_loss = MeanMetric(), MeanMetric()
        self.val_acc, self.test_acc = (MulticlassAccuracy(n, average="micro") for _ in range(2))
        self.test_class_acc = ClasswiseWrapper(
            MulticlassAccuracy(n, average=None), labels=classes, prefix="test/acc_class/"
        )
        self.test_confusion = MulticlassConfusionMatrix(n)
        self.test_calibration = MulticlassCalibrationError(n, n_bins=15, norm="l1")  # expected calibration error
        self.val_acc_best = MaxMetric()
        self.val_acc_best.persistent(True)  # survives a resume from checkpoint

    def setup(self, stage: str) -> None:
        # When a fit begins: the data is normalized as the start's net was fed (unless data.mean/std
        # are given); a net that starts from statistics of the training images (airbench's
        # whitening) gets them; then the start's weights, and a resumed run's are loaded over all.
        if stage != "fit":
            return
        dm = self._datamodule()
        first = self._start()
        if first is not None and first.mean is not None and dm is not None and dm.normalize_as(first.mean, first.std):
            log.info("normalizing as %s was trained: mean %s, std %s", first.source, first.mean, first.std)
        if hasattr(self.net, "init_from_images") and dm is not None:
            self.net.init_from_images(dm.sample_train_images(WHITENING_IMAGES))
        if first is not None:
            start.load_start(self.net, first, self.head_names)

    def on_fit_start(self) -> None:
        if self.hparams.get("reuse_memory") and self.device.type == "cpu":
            allocator.keep_freed_memory()

    def teardown(self, stage: str) -> None:
        self._keeper = None  # evaluation and anything after the fit use the fp32 weights

    def _start(self) -> start.Start | None:
        if self.timm_weights is not None:
            return start.timm_start(self.timm_weights, self.net, len(self.hparams.classes))
        if self.hparams.get("init_from"):
            return start.checkpoint_start(self.hparams.init_from, self.hparams.net, self.hparams.classes)
        return None

    @cached_property
    def head_names(self) -> set[str]:
        """The net's tensors (state dict keys) sized by the class count: its head."""
        net_config = self.hparams.get("net")
        if net_config is None:  # a net rebuilt from a checkpoint: no config to build another from
            raise TypeError("the head of a net given as a module is not known; build the classifier from a net config")
        return start.head_names(lambda n: instantiate(net_config, num_classes=n), len(self.hparams.classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=self.memory_format)
        if self.training and self._keeper is not None:
            return functional_call(self.net, self._keeper.synced(), (x,))
        return self._forward(x)

    def _step(
        self, batch: tuple[torch.Tensor, torch.Tensor], tta: str = "none"
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, y = batch
        logits = tta_logits(self, x, tta)
        return self.criterion(logits, y), logits, y

    def on_train_epoch_start(self) -> None:
        # Not called when resuming mid-epoch: then the restored sums of the epoch's first part stay.
        self.train_sums.zero_()

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if batch[0].dim() == 5:  # AugMix's views: the clean image first
            loss, logits, y = self._consistency_step(batch)
        else:
            loss, logits, y = self._step(batch)
        with torch.no_grad():
            n = loss.new_full((), len(y), dtype=torch.float32)
            self.train_sums += torch.stack((loss.float() * n, (logits.argmax(dim=1) == y).sum().float(), n))
        return loss

    def _consistency_step(
        self, batch: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Cross-entropy on the clean views plus ``consistency`` times the Jensen-Shannon divergence
        between the predictions on every view of each image (AugMix's loss); the clean logits."""
        x, y = batch
        b, v = x.shape[:2]
        all_logits = self(x.transpose(0, 1).flatten(0, 1)).float().view(v, b, -1)
        logits = all_logits[0]
        loss = self.criterion(logits, y)
        if self.hparams.consistency:
            probs = all_logits.softmax(-1)
            log_mixture = probs.mean(0).clamp(1e-7, 1).log()
            js = sum(nn.functional.kl_div(log_mixture, p, reduction="batchmean") for p in probs) / v
            loss = loss + self.hparams.consistency * js
        return loss, logits, y

    def on_train_epoch_end(self) -> None:
        # Every rank is here at once (unlike rank 0's progress bar), so the sum over ranks is safe.
        loss_sum, correct, images = self.trainer.strategy.reduce(self.train_sums.clone(), reduce_op="sum")
        if images > 0:
            self.log_dict(
                {"train/loss": loss_sum / images, "train/acc": correct / images}, prog_bar=True, sync_dist=True
            )

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        loss, logits, y = self._step(batch)
        self.val_loss(loss, len(y))
        self.val_acc(logits, y)
        self.log("val/loss", self.val_loss, on_step=False, on_epoch=True, prog_bar=True)
        self.log("val/acc", self.val_acc, on_step=False, on_epoch=True, prog_bar=True)

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:  # the sanity check's two batches are not an epoch
            self.val_acc_best(self.val_acc.compute())
        if self.val_acc_best.update_count:
            self.log("val/acc_best", self.val_acc_best.compute(), prog_bar=True)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        loss, logits, y = self._step(batch, self.hparams.tta)
        self.test_loss(loss, len(y))
        self.test_acc(logits, y)
        self.test_class_acc.update(logits, y)
        self.test_confusion.update(logits, y)
        self.test_calibration.update(logits.float().softmax(dim=1), y)  # probabilities, never guessed from logits
        self.log("test/loss", self.test_loss, on_step=False, on_epoch=True)
        self.log("test/acc", self.test_acc, on_step=False, on_epoch=True)
        self.log("test/calibration_error", self.test_calibration, on_step=False, on_epoch=True)

    def on_test_epoch_start(self) -> None:
        self.test_class_acc.reset()
        self.test_confusion.reset()

    def on_test_epoch_end(self) -> None:
        self.log_dict(self.test_class_acc.compute(), sync_dist=True)  # equal on every rank already; says so

    def configure_optimizers(self) -> Any:
        make_optimizer = instantiate(self.hparams.optimizer)
        params: Any = self.parameters()
        if self.hparams.param_groups:
            settings = make_optimizer.keywords
            groups = self.hparams.param_groups
            head = self.head_names if groups.get("body_lr_scale", 1.0) != 1.0 else ()
            params = optim.param_groups(
                self.net, settings["lr"], settings.get("weight_decay", 0.0), head=head, **groups
            )
        optimizer = make_optimizer(params=params)
        trainer = self._attached_trainer()
        if self.hparams.get("bf16_weight_copy") and trainer is not None:
            optimizer = bf16_copy.adopt(trainer, self.net, optimizer, bool(self.hparams.compile))
            self._keeper = optimizer if isinstance(optimizer, bf16_copy.Bf16CopyAdam) else None
        if not self.hparams.scheduler:
            return optimizer
        make_scheduler = instantiate(self.hparams.scheduler)
        takes = inspect.signature(make_scheduler.func).parameters
        if "total_steps" in takes:  # sized from this run
            fixed = optim.fixed_steps(self.trainer)
            if "fixed_steps" in takes:  # read as the run goes: a time budget fixes the count after its fixed steps
                sized = {"total_steps": lambda: optim.run_steps(self.trainer, "model.scheduler"), "fixed_steps": fixed}
            elif fixed:
                raise UserError(
                    f"model.scheduler ({self.hparams.scheduler.get('_target_')}) is sized once, before a time budget "
                    "has fixed the run's steps; use cifarkit.fit.optim.warmup_then_decay or set trainer.max_steps"
                )
            else:
                sized = {"total_steps": optim.run_steps(self.trainer, "model.scheduler")}
            scheduler = make_scheduler(optimizer=optimizer, **sized)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
        scheduler = make_scheduler(optimizer=optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "monitor": "val/loss"}}

    def _attached_trainer(self) -> L.Trainer | None:
        """The Trainer this module is attached to; None for a net rebuilt or set up by hand."""
        try:
            return self.trainer
        except RuntimeError:  # Lightning's "not attached to a `Trainer`"
            return None

    def _datamodule(self) -> Any:
        """The attached Trainer's datamodule; None without a Trainer."""
        return getattr(self._attached_trainer(), "datamodule", None)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # What predict.py needs to preprocess new images: class names, mean/std, image size.
        dm = self._datamodule()
        if dm is not None and hasattr(dm, "data_info"):
            checkpoint["data_info"] = asdict(dm.data_info())

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Resuming: refused before any weight is loaded when the data's classes are not the checkpoint's.
        check_same_classes(checkpoint.get("hyper_parameters", {}).get("classes"), self.hparams.classes)
        state = checkpoint["state_dict"]
        if "train_sums" not in state:  # written before the sums replaced torchmetrics objects: their epoch restarts
            state["train_sums"] = torch.zeros(3)
            for key in [k for k in state if k.startswith(("train_loss.", "train_acc."))]:
                del state[key]


def compiled(net: nn.Module, setting: bool | str) -> nn.Module:
    """``net`` under ``torch.compile`` (``model.compile``: false, true, or one of its modes), or as it is."""
    if not setting:
        return net
    if why := inductor_cache_fault():
        raise UserError(f"model.compile: {why}")
    return torch.compile(net, mode=None if setting is True else str(setting))


def check_same_classes(saved: list[str] | None, data: list[str]) -> None:
    """A net's outputs mean its checkpoint's classes: data with other names, or another order, is refused."""
    if saved and list(saved) != list(data):
        raise UserError(
            f"the checkpoint's classes {list(saved)} differ from the data's {list(data)} (same names, same order); "
            "pick matching data or another checkpoint"
        )
