"""PyTorch Lightning integration: the Fisher measures of every (or every n-th) training step.

Importing this module imports ``lightning`` (an optional extra: ``pip install fimcore[lightning]``).

:class:`FisherCallback` wraps each measured step's forward and backward in a
:class:`fimcore_adapters.torch.GramRecorder`, feeds the Gram to a :class:`fimcore.MeasureTracker`
and logs every field of the measurement with ``pl_module.log`` under ``fim/`` (c_k, C̄_K, I_k,
L_K and whatever statistics the tracker holds, e.g. the gradient noise scale). Given a
:class:`fimcore_adapters.torch.PolicyBatchSampler`, it also reports each trained step to it, so a
:mod:`fimcore.policy` rule sets the batch size of the next batches, and logs the size in force.
Its state (tracker, sampler and policy) is saved in Lightning checkpoints.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

import fimcore

from ._torch.policy import PolicyBatchSampler
from ._torch.recorder import GramRecorder

__all__ = ["FisherCallback"]


class FisherCallback(pl.Callback):
    r"""Measure :math:`c_k`, :math:`\bar C_K`, :math:`I_k`, :math:`L_K` (and more) in ``Trainer.fit``.

    :math:`c_k = \lambda_{\max}(G_k)/\lambda_{\min}^{+}(G_k)` and
    :math:`I_k = (\alpha_k/B_k)\sqrt{\operatorname{Tr} G_k}` of the per-sample Gram
    :math:`G_k = J_kJ_k^\top` of step k; :math:`\bar C_K` is the mean of the measured
    :math:`c_k` and :math:`L_K = \sum_k w_k I_k` (each measured step stands for the ``every``
    steps up to the next one). :math:`\alpha_k` is the learning rate of the first optimizer's
    first parameter group when the step's gradient is applied.

    Args:
        every: measure every ``every``-th training step (1: all).
        statistics: the tracker's statistics (default: C̄_K and L_K; add e.g.
            ``fimcore.stats.NoiseScale()`` or ``BatchTests()`` for a policy that reads them).
        sampler: a :class:`PolicyBatchSampler` used as the training DataLoader's
            ``batch_sampler``; each trained step is reported to it (with the measurement when
            there is one), so its policy sets the size of the following batches.
        prefix: prefix of the logged names.
        loss_reduction: how the LightningModule's loss reduces over the batch (``"mean"`` or
            ``"sum"``).
        **recorder_options: passed to :class:`GramRecorder` (``params``, ``strategy``, ``dtype``,
            ``memory_budget``, ``conv_method``, ``check_uses``, ``keep_blocks``).

    Raises:
        ValueError: bad ``every``, or (at fit start) gradient accumulation over several batches
            or manual optimization, which put more than one backward into one optimizer step:
            one recorded step needs exactly one forward and one backward.
        TypeError: ``sampler`` is not a :class:`PolicyBatchSampler`.

    Example (not run here)::

        callback = FisherCallback(every=10, statistics=(*fimcore.stats.DEFAULT, NoiseScale()))
        pl.Trainer(max_epochs=5, callbacks=[callback]).fit(module, loader)
        callback.tracker.C_bar, callback.tracker.L
    """

    def __init__(self, *, every: int = 1, statistics: Any = None, sampler: PolicyBatchSampler | None = None,
                 prefix: str = "fim/", loss_reduction: str = "mean", **recorder_options: Any):
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"every must be a positive int; received {every!r}")
        if sampler is not None and not isinstance(sampler, PolicyBatchSampler):
            raise TypeError("sampler must be a fimcore_adapters.torch.PolicyBatchSampler; received "
                            f"{type(sampler).__name__}")
        self.every = every
        self.sampler = sampler
        self.prefix = prefix
        self.loss_reduction = loss_reduction
        self.recorder_options = recorder_options
        self.tracker = fimcore.MeasureTracker(statistics=statistics)
        self.recorder: GramRecorder | None = None
        self.last_result: fimcore.GramResult | None = None
        self._open = False
        self._measurement: Any = None

    # ----------------------------------------------------------------- fit boundaries
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not pl_module.automatic_optimization:
            raise ValueError(
                f"FisherCallback needs automatic optimization; {type(pl_module).__name__} sets "
                "automatic_optimization = False. With manual optimization, wrap your own forward "
                "and backward in `with GramRecorder(model):` instead")
        if trainer.accumulate_grad_batches != 1:
            raise ValueError(
                f"FisherCallback needs one batch per optimizer step; the Trainer accumulates "
                f"{trainer.accumulate_grad_batches} batches (accumulate_grad_batches). The Gram of an "
                "accumulated step would mix several backward passes: set accumulate_grad_batches=1")
        if self.recorder is None:
            self.recorder = GramRecorder(pl_module, loss_reduction=self.loss_reduction,
                                         **self.recorder_options)

    # ----------------------------------------------------------------- one step
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._measurement = None
        if trainer.global_step % self.every == 0:
            self.recorder.__enter__()
            self._open = True

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if not self._open:
            return
        self._open = False
        self.recorder.__exit__(None, None, None)
        if not self.recorder.measured:
            return
        lr = float(optimizer.param_groups[0]["lr"])
        self.last_result = self.recorder.result()
        self._measurement = self.tracker.update(self.last_result, lr=lr, weight=self.every)
        values = {self.prefix + k: float(v) for k, v in self._measurement.to_dict().items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool)}
        pl_module.log_dict(values, on_step=True, on_epoch=False, prog_bar=False,
                           batch_size=self.last_result.batch_size)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._open:                    # the step skipped its optimizer step (loss None)
            self._open = False
            self.recorder.__exit__(None, None, None)
        if self.sampler is not None:
            size = self.sampler.step(self._measurement)
            pl_module.log(self.prefix + "batch_size", float(size), on_step=True, on_epoch=False)

    def on_exception(self, trainer, pl_module, exception) -> None:
        if self._open:
            self._open = False
            self.recorder.__exit__(type(exception), exception, None)

    # ----------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        state = {"tracker": self.tracker.state_dict(), "every": self.every}
        if self.sampler is not None:
            state["sampler"] = self.sampler.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.tracker.load_state_dict(state_dict["tracker"])
        if self.sampler is not None and "sampler" in state_dict:
            self.sampler.load_state_dict(state_dict["sampler"])
