r"""The JSON-friendly record of one measured iteration.

A :class:`Measurement` holds Python numbers only (never arrays): the step's bookkeeping (``k``,
``lr``, ``weight``, ``batch_size``, ``finite``) and, keyed by statistic, the fields each
statistic of the tracker recorded (``m.values["condition"]["c_k"]``). Field names are unique
across statistics, so they also read as attributes (``m.c_k``, ``m.C_bar``, ``m.L``) and
:meth:`Measurement.to_dict` writes one flat dict for :func:`json.dumps`. Quantities that do not
exist are ``None`` (JSON ``null``): :math:`c_k` of an all-zero Gram (no
:math:`\lambda_{\min}^{+}`), every value of a skipped non-finite Gram, and the running means
before the first defined :math:`c_k`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .stats.base import registered_fields

__all__ = ["Measurement"]

_STEP_FIELDS = ("k", "lr", "weight", "batch_size", "finite")


@dataclasses.dataclass(frozen=True)
class Measurement:
    r"""One measured iteration k and the running measures after it.

    Attributes:
        k: 1-based count of measurements (updates) so far, this one included.
        lr: :math:`\alpha_k`; weight: :math:`w_k`; batch_size: :math:`B_k`.
        finite: whether the Gram was finite.
        values: ``{statistic name: {field: value}}``. With the default statistics:
            ``condition`` — ``c_k`` (:math:`\lambda_{\max}/\lambda_{\min}^{+}`, None if
            undefined), ``c_k_jacobian`` (:math:`\sqrt{c_k}`), ``lambda_max``, ``rank`` (resolved
            rank), ``defined``, ``C_bar`` (:math:`\bar C_K` so far), ``C_bar_jacobian``,
            ``zero_rows`` (samples with an exactly zero gradient), ``c_limit`` (the largest
            :math:`c_k` this Gram could resolve), ``resolution_limited``
            (:math:`c_k \ge c_{\mathrm{limit}}/2`), ``c_k_legacy`` / ``C_bar_legacy`` (under the
            previous tolerance :math:`B\varepsilon\lambda_{\max}`, kept for one release);
            ``energy`` — ``I_k`` (:math:`(\alpha_k/B_k)\sqrt{\operatorname{Tr} G_k}`), ``trace``,
            ``L`` (:math:`L_K = \sum_k w_k I_k` so far).

    A field of a registered statistic that a record lacks (records of an earlier release)
    reads as None.
    """

    k: int
    lr: float
    weight: float
    batch_size: int
    finite: bool
    values: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "values":
            raise AttributeError(name)
        for fields in self.values.values():
            if name in fields:
                return fields[name]
        if name in registered_fields():
            return None
        raise AttributeError(f"Measurement has no field {name!r}")

    def to_dict(self) -> dict[str, Any]:
        """The record as one flat dict of plain Python values (JSON-serialisable).

        Example:
            >>> import json
            >>> m = Measurement(k=1, lr=0.1, weight=1.0, batch_size=4, finite=True,
            ...                 values={"condition": {"c_k": None}, "energy": {"L": 0.0}})
            >>> json.loads(json.dumps(m.to_dict()))["c_k"] is None
            True
        """
        flat = {name: getattr(self, name) for name in _STEP_FIELDS}
        for fields in self.values.values():
            flat.update(fields)
        return flat

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Measurement:
        """Rebuild a record from :meth:`to_dict` output (of this or an earlier release).

        Raises:
            ValueError: if a bookkeeping field is missing or a field belongs to no registered
                statistic.
        """
        missing = [f for f in _STEP_FIELDS if f not in data]
        owners = registered_fields()
        unknown = sorted(f for f in data if f not in _STEP_FIELDS and f not in owners)
        if missing or unknown:
            raise ValueError(
                f"a Measurement dict must have the fields {list(_STEP_FIELDS)} plus fields of "
                f"registered statistics; missing {missing}, unknown {unknown} (import the module "
                "of a custom statistic before loading its records).")
        values: dict[str, dict[str, Any]] = {}
        for name, value in data.items():
            if name not in _STEP_FIELDS:
                values.setdefault(owners[name], {})[name] = value
        return cls(**{f: data[f] for f in _STEP_FIELDS}, values=values)
