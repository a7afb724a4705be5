"""FisherCallback: the measures of every Lightning training step, and a policy-set batch size."""

from __future__ import annotations

import math

import pytest

from tests.conftest import import_backend

torch = import_backend("torch")
pl = import_backend("lightning").pytorch
nn = torch.nn
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import fimcore  # noqa: E402
from fimcore.policy import BatchSizePolicy, Constraints, NormTestRule  # noqa: E402
from fimcore.stats import BatchTests  # noqa: E402
from fimcore_adapters.lightning import FisherCallback  # noqa: E402
from fimcore_adapters.torch import PolicyBatchSampler  # noqa: E402


class _Module(pl.LightningModule):
    def __init__(self, lr=0.1):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3)).double()
        self.lr = lr

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class _Grads(pl.Callback):
    """Keeps ‖∇L‖² and B of each step, read after the backward (independently of FisherCallback)."""

    def __init__(self):
        self.steps = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        g = torch.cat([p.grad.flatten() for p in pl_module.parameters()])
        self.steps.append(float(g @ g))


def _data(n=48):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 6, generator=gen, dtype=torch.float64)
    return TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long())


def _trainer(callbacks, steps):
    return pl.Trainer(max_steps=steps, callbacks=callbacks, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")


def test_every_step_is_measured_and_logged_with_the_exact_gram():
    torch.manual_seed(0)
    fisher, grads = FisherCallback(), _Grads()
    trainer = _trainer([fisher, grads], 6)
    trainer.fit(_Module(), DataLoader(_data(), batch_size=8))
    assert fisher.tracker.measured == 6
    G = fisher.last_result.gram
    assert float(G.sum()) == pytest.approx(8**2 * grads.steps[-1], rel=1e-10)   # 1ᵀG1 = B²‖∇L‖²
    logged = trainer.callback_metrics
    for name in ("c_k", "C_bar", "I_k", "L"):
        assert "fim/" + name in logged, sorted(logged)
    # Lightning stores logged values as float32 tensors
    assert float(logged["fim/C_bar"]) == pytest.approx(fisher.tracker.C_bar, rel=1e-6)
    assert float(logged["fim/I_k"]) == pytest.approx(0.1 / 8 * math.sqrt(float(torch.trace(G))), rel=1e-6)


def test_a_policy_sets_the_batch_size_through_the_sampler():
    torch.manual_seed(1)
    data = _data(96)
    policy = BatchSizePolicy(NormTestRule(theta=0.2), 4, Constraints(patience=1, max_size=32))
    sampler = PolicyBatchSampler(len(data), policy, seed=2)
    fisher = FisherCallback(statistics=(*fimcore.stats.DEFAULT, BatchTests()), sampler=sampler)
    sizes = []

    class _Sizes(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            sizes.append((len(batch[0]), policy.batch_size))

    _trainer([fisher, _Sizes()], 12).fit(_Module(), DataLoader(data, batch_sampler=sampler))
    assert sizes[0][0] == 4 and max(s for s, _ in sizes) > 4, sizes
    position = 0
    for drawn, in_force in sizes:        # each batch has the size in force, or ends the epoch
        assert drawn == min(in_force, len(data) - position), sizes
        position = (position + drawn) % len(data)
    assert policy.decisions and fisher.state_dict()["sampler"]["policy"]["decisions"]


def test_accumulation_and_manual_optimization_are_refused():
    with pytest.raises(ValueError, match="accumulate_grad_batches=1"):
        pl.Trainer(max_steps=2, callbacks=[FisherCallback()], logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, accumulate_grad_batches=2).fit(
            _Module(), DataLoader(_data(), batch_size=8))

    class _Manual(_Module):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

    with pytest.raises(ValueError, match="automatic optimization"):
        _trainer([FisherCallback()], 2).fit(_Manual(), DataLoader(_data(), batch_size=8))
    with pytest.raises(ValueError, match="every must be a positive int"):
        FisherCallback(every=0)
