"""``PolicyBatchSampler``: a DataLoader batch sampler whose batch size a policy sets between steps."""

from __future__ import annotations

from typing import Iterator

from torch.utils.data import Sampler

from fimcore.policy.batches import PolicyBatches

__all__ = ["PolicyBatchSampler"]


class PolicyBatchSampler(PolicyBatches, Sampler):
    """:class:`fimcore.policy.PolicyBatches` as a ``torch.utils.data`` batch sampler.

    Pass it as ``batch_sampler=`` of a ``DataLoader`` and call :meth:`step` after each training
    step (with the step's measurement when there is one). A size change applies from the next
    batch the loader draws: the very next step with ``num_workers=0``; with worker processes the
    loader has already drawn ``prefetch_factor × num_workers`` batches, which keep the old size,
    and a resumed run cuts those again with the size in force (no sample is skipped or repeated;
    with ``num_workers=0`` the resumed run draws exactly the uninterrupted run's batches).

    Args: as :class:`fimcore.policy.PolicyBatches`.

    Example:
        >>> import torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> from fimcore.policy import BatchSizePolicy, Constraints, NormTestRule
        >>> data = TensorDataset(torch.arange(10.0))
        >>> policy = BatchSizePolicy(NormTestRule(theta=0.5), 2, Constraints(patience=1, max_size=4))
        >>> sampler = PolicyBatchSampler(len(data), policy, shuffle=False)
        >>> sizes = []
        >>> for (x,) in DataLoader(data, batch_sampler=sampler):
        ...     sizes.append(len(x))
        ...     _ = sampler.step({"norm_test": 1.0})   # the test fails: grow
        >>> sizes
        [2, 4, 4]
    """

    def __iter__(self) -> Iterator[list[int]]:
        for batch in PolicyBatches.__iter__(self):
            yield batch.tolist()
