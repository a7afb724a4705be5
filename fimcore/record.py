r"""The JSON-friendly record of one measured iteration.

A :class:`Measurement` holds Python numbers only (never arrays), so a list of them can be
written with :func:`json.dumps` after :meth:`Measurement.to_dict`. Quantities that do not
exist are ``None`` (JSON ``null``): :math:`c_k` of an all-zero Gram (no
:math:`\lambda_{\min}^{+}`), every value of a skipped non-finite Gram, and the running
means before the first defined :math:`c_k`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["Measurement"]


@dataclasses.dataclass(frozen=True)
class Measurement:
    r"""One measured iteration k and the running measures after it.

    Attributes:
        k: 1-based count of measurements (updates) so far, this one included.
        c_k: :math:`\lambda_{\max}/\lambda_{\min}^{+}` of :math:`G_k`; None if undefined.
        c_k_jacobian: :math:`\sqrt{c_k}` (singular values of :math:`J_k`); None if undefined.
        I_k: :math:`(\alpha_k/B_k)\sqrt{\operatorname{Tr} G_k}`; None if non-finite.
        trace: :math:`\operatorname{Tr} G_k`; None if non-finite.
        lambda_max: :math:`\lambda_{\max}(G_k)`; None if non-finite.
        rank: resolved rank of :math:`G_k` (see :mod:`fimcore.rank`); None if non-finite.
        defined: whether :math:`c_k` exists (finite Gram with :math:`\lambda_{\max} > 0`).
        finite: whether the Gram was finite.
        C_bar: :math:`\bar C_K = \frac{1}{|\mathcal M|}\sum_{k\in\mathcal M} c_k` so far
            (None before the first defined :math:`c_k`).
        C_bar_jacobian: mean of :math:`\sqrt{c_k}` so far.
        L: :math:`L_K = \sum_k w_k I_k` so far.
        lr: :math:`\alpha_k`.
        weight: :math:`w_k`.
        batch_size: :math:`B_k`.
        zero_rows: samples with an exactly zero gradient (excluded from the rank).
        c_limit: :math:`c_{\mathrm{limit}}`, the largest :math:`c_k` this Gram could have
            resolved; None if undefined.
        resolution_limited: :math:`c_k \ge c_{\mathrm{limit}}/2` (the value says more about
            the arithmetic than about training).
        c_k_legacy: :math:`c_k` under the previous default tolerance
            :math:`B\varepsilon_{\mathrm{grad}}\lambda_{\max}` (kept for one release, for
            comparison); None if undefined.

    Records written before these four fields existed load with them as None / False.
    """

    k: int
    c_k: float | None
    c_k_jacobian: float | None
    I_k: float | None
    trace: float | None
    lambda_max: float | None
    rank: int | None
    defined: bool
    finite: bool
    C_bar: float | None
    C_bar_jacobian: float | None
    L: float
    lr: float
    weight: float
    batch_size: int
    zero_rows: int | None = None
    c_limit: float | None = None
    resolution_limited: bool = False
    c_k_legacy: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """The record as a dict of plain Python values (JSON-serialisable).

        Example:
            >>> import json
            >>> m = Measurement(k=1, c_k=None, c_k_jacobian=None, I_k=0.0, trace=0.0,
            ...                 lambda_max=0.0, rank=0, defined=False, finite=True,
            ...                 C_bar=None, C_bar_jacobian=None, L=0.0, lr=0.1, weight=1.0,
            ...                 batch_size=4)
            >>> json.loads(json.dumps(m.to_dict()))["c_k"] is None
            True
        """
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Measurement:
        """Rebuild a record from :meth:`to_dict` output.

        Raises:
            ValueError: if fields are missing or unknown (the four added in this release,
                ``zero_rows``, ``c_limit``, ``resolution_limited``, ``c_k_legacy``, may be
                missing).
        """
        fields = dataclasses.fields(cls)
        names = {f.name for f in fields}
        optional = {f.name for f in fields if f.default is not dataclasses.MISSING}
        if not names - optional <= set(data) <= names:
            raise ValueError(
                f"a Measurement dict must have the fields {sorted(names - optional)} (and "
                f"optionally {sorted(optional)}); missing {sorted(names - optional - set(data))}, "
                f"unknown {sorted(set(data) - names)}."
            )
        return cls(**data)
