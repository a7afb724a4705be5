"""``PolicyBatches``: index batches whose size a batch-size policy sets between steps.

Framework-free (NumPy indices): the PyTorch adapter wraps it as a DataLoader batch sampler,
JAX and other host loops index their arrays with it directly.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Iterator

import numpy as np

__all__ = ["PolicyBatches"]

_FORMAT = "fimcore.PolicyBatches/1"


class PolicyBatches:
    """Batches of sample indices whose size a :class:`fimcore.policy.BatchSizePolicy` sets.

    Iterate it once per epoch (each iteration yields NumPy ``int64`` index arrays). Each epoch walks one
    permutation of ``range(num_samples)`` (seeded by ``seed`` and the epoch, so a resumed run
    sees the same order) and cuts it into batches of the size in force when each batch is drawn;
    the last batch of an epoch is kept even when shorter unless ``drop_last``. Call
    :meth:`step` once per training step, with that step's measurement when there is one: it
    feeds the policy and counts the batch as trained. A size change applies from the next batch
    drawn (batches drawn ahead, e.g. by a prefetching loader, keep the size they were cut with).

    Checkpoints: :meth:`state_dict` holds the epoch, how many samples of it were trained (batches
    counted by :meth:`step`) and the policy's state. A resumed iteration starts right after the
    last trained sample, so no sample of the epoch is skipped or repeated; when batches are drawn
    one step at a time the resumed run draws exactly the batches of the uninterrupted one.

    Under ``jax.jit`` every new batch size compiles the step once more: the sizes a policy can
    reach are bounded by its :class:`~fimcore.policy.Constraints` (``min_size``, ``max_size``,
    ``multiple_of``: at most ``(max − min)/multiple_of + 1`` sizes, plus the shorter last batch
    of an epoch unless ``drop_last``), and so is the number of compilations.

    Args:
        num_samples: length of the dataset.
        policy: a :class:`fimcore.policy.BatchSizePolicy` (its ``batch_size`` is read at every
            batch; its ``update`` is called by :meth:`step`).
        shuffle: draw a new permutation each epoch (else the natural order).
        seed: seed of the permutations.
        drop_last: drop an epoch's last batch when it is shorter than the size in force.

    Example:
        >>> from fimcore.policy import BatchSizePolicy, Constraints, NormTestRule, PolicyBatches
        >>> policy = BatchSizePolicy(NormTestRule(theta=0.5), 2, Constraints(patience=1, max_size=4))
        >>> batches = PolicyBatches(10, policy, shuffle=False)
        >>> sizes = []
        >>> for idx in batches:
        ...     sizes.append(len(idx))
        ...     _ = batches.step({"norm_test": 1.0})   # the test fails: grow
        >>> sizes
        [2, 4, 4]
    """

    def __init__(self, num_samples: int, policy: Any, *, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False):
        if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive int (the dataset's length); "
                             f"received {num_samples!r}")
        for name in ("batch_size", "update", "state_dict", "load_state_dict"):
            if not hasattr(policy, name):
                raise TypeError(f"policy must be a fimcore.policy.BatchSizePolicy (it needs .{name}); "
                                f"received {type(policy).__name__}")
        if not isinstance(seed, int):
            raise ValueError(f"seed must be an int; received {seed!r}")
        self.num_samples = num_samples
        self.policy = policy
        self.shuffle = bool(shuffle)
        self.seed = seed
        self.drop_last = bool(drop_last)
        self.epoch = 0
        self._trained = 0            # samples of this epoch trained (counted by step())
        self._drawn: deque[int] = deque()   # sizes of batches drawn but not yet trained
        self._resume_from: int | None = None

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` (its permutation) from its first sample, unless resuming into it."""
        if epoch != self.epoch:
            self.epoch, self._trained, self._resume_from = int(epoch), 0, None
            self._drawn.clear()

    def _order(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_samples, dtype=np.int64)
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.num_samples)

    def __iter__(self) -> Iterator[np.ndarray]:
        order = self._order()
        start = self._resume_from if self._resume_from is not None else 0
        self._resume_from = None
        self._trained, position = start, start
        self._drawn.clear()
        while position < self.num_samples:
            size = int(self.policy.batch_size)
            if size < 1:
                raise ValueError(f"the policy asks for batch size {size}; it must be ≥ 1")
            batch = order[position:position + size]
            if len(batch) < size and self.drop_last:
                break
            position += len(batch)
            self._drawn.append(len(batch))
            yield batch
        self.epoch += 1
        self._drawn.clear()
        self._trained = 0

    def __len__(self) -> int:
        """Batches of this epoch at the size now in force (an estimate when the size changes)."""
        size = int(self.policy.batch_size)
        left = self.num_samples - (self._resume_from or 0)
        return left // size if self.drop_last else -(-left // size)

    def step(self, measurement: Any = None) -> int:
        """One batch was trained; feed ``measurement`` (a ``Measurement`` or dict) to the policy.

        Returns:
            The batch size in force for the batches drawn from now on.

        Raises:
            RuntimeError: more steps reported than batches drawn in this epoch.
        """
        if not self._drawn:
            raise RuntimeError("step() was called more often than the loader drew batches in this "
                               "epoch: call it once per training step, after the step")
        self._trained += self._drawn.popleft()
        if measurement is not None:
            return self.policy.update(measurement)
        return int(self.policy.batch_size)

    def state_dict(self) -> dict[str, Any]:
        """Epoch, samples of it trained, the policy's state (JSON-serialisable)."""
        epoch, trained = self.epoch, self._trained
        if not self._drawn and trained == 0 and self._resume_from is not None:
            trained = self._resume_from
        return {"format": _FORMAT, "epoch": epoch, "trained": trained, "seed": self.seed,
                "shuffle": self.shuffle, "num_samples": self.num_samples,
                "policy": self.policy.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`: the next iteration resumes after the last trained sample.

        Raises:
            ValueError: not a sampler snapshot, or one of another dataset length, seed or order.
        """
        if not isinstance(state, dict) or state.get("format") != _FORMAT:
            raise ValueError(f"state must come from PolicyBatches.state_dict() (format {_FORMAT!r})")
        for key in ("num_samples", "seed", "shuffle"):
            if state[key] != getattr(self, key):
                raise ValueError(f"the snapshot was taken with {key}={state[key]!r}; this sampler has "
                                 f"{key}={getattr(self, key)!r}. Build it with the same settings")
        self.policy.load_state_dict(state["policy"])
        self.epoch, self._trained = int(state["epoch"]), 0
        self._resume_from = int(state["trained"])
        self._drawn.clear()
