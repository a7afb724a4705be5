r"""The global Gram of a data-parallel step under ``tf.distribute.MirroredStrategy``.

With R replicas, replica r holds the rows :math:`J_r` (:math:`b_r \times P`) of its own
:math:`b_r` samples. The Gram of the global batch (:math:`B = \sum_r b_r` samples, rows in
replica order, then in each replica's local order) is the block matrix

.. math:: G = \begin{pmatrix} J_1 J_1^\top & \cdots & J_1 J_R^\top \\ \vdots & & \vdots \\
          J_R J_1^\top & \cdots & J_R J_R^\top \end{pmatrix},

whose off-diagonal blocks need the other replicas' samples. :class:`MirroredSink` is the
distributed sink of :mod:`fimcore.layers.sink`: before any product, it gathers what a layer
rule hands over with ``ReplicaContext.all_gather(x, axis=0)`` — the factors ``a`` (b, T, d_a)
and ``g`` (b, T, d_g) of a factored layer, or the materialised rows (b, P_l) of any other layer,
whichever the rule finds smaller per sample — and multiplies the gathered (B, …) operands. Every
replica then holds the same exact (B, B) global Gram; each replica's own work is its local
factors or rows, the products are repeated on every replica (B² per layer, P-free for factored
layers).

Gathered bytes per step (reported by ``GramTape.report().gathered_bytes``): per layer, B × the
per-sample size of the gathered operands × their item size, i.e. what each replica holds after
the all-gather.
"""

from __future__ import annotations

import math

import tensorflow as tf

from fimcore.layers import Sink

from . import kernels

__all__ = ["MirroredSink", "replica_context"]


def replica_context():
    """The current ``tf.distribute.ReplicaContext`` when the step runs on more than one replica
    (inside ``strategy.run`` of a multi-replica strategy), else None."""
    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync <= 1:
        return None
    return ctx


class MirroredSink(Sink):
    """Gathers each layer's factors or rows across replicas, then forms its global block.

    Args:
        context: the ``tf.distribute.ReplicaContext`` of the step.

    ``add_factors`` / ``add_rows`` / ``add_matched`` return the layer's global (B, B) block (also
    summed into :meth:`gram`); :attr:`bytes_per_sample` records, per layer, the bytes gathered
    per sample of the global batch (None where a shape is only known at run time).
    """

    def __init__(self, context) -> None:
        self.context = context
        self.replicas = context.num_replicas_in_sync
        self.bytes_per_sample: dict[str, int | None] = {}
        self._total = None

    def gather(self, layer: str, *tensors):
        """``all_gather`` of each tensor along the batch axis (counted for ``layer``)."""
        sizes = [None if None in t.shape[1:] else math.prod(t.shape[1:]) * t.dtype.size
                 for t in tensors]
        old = self.bytes_per_sample.get(layer, 0)
        self.bytes_per_sample[layer] = (None if old is None or None in sizes
                                        else old + sum(sizes))
        return [self.context.all_gather(t, axis=0) for t in tensors]

    def add_block(self, layer: str, block):
        self._total = block if self._total is None else self._total + block
        return block

    def add_factors(self, layer: str, a, g, *, bias: bool):
        r""":math:`G_{ij} = \sum_{t,s}(a_{it}\cdot a_{js} + \beta)(g_{it}\cdot g_{js})` over the
        gathered global factors."""
        a_all, g_all = self.gather(layer, a, g)
        return self.add_block(layer, kernels.factored_gram(a_all, g_all, bias=bias))

    def add_rows(self, layer: str, rows):
        r""":math:`J_l J_l^\top` of the gathered global rows (B, P_l)."""
        (rows_all,) = self.gather(layer, rows)
        return self.add_block(layer, kernels.gram_of_rows(rows_all))

    def add_matched(self, layer: str, ids, g):
        r"""Embedding form :math:`G_{ij} = \sum_{t,s}[id_{it} = id_{js}]\, g_{it}\cdot g_{js}` over
        the gathered ids (b, T) and output gradients (b, T, d)."""
        ids_all, g_all = self.gather(layer, ids, g)
        same = tf.cast(tf.equal(ids_all[:, None, :, None], ids_all[None, :, None, :]), g_all.dtype)
        return self.add_block(layer, tf.reduce_sum(same * tf.einsum("itd,jsd->ijts", g_all, g_all),
                                                   axis=[2, 3]))

    def gram(self):
        return self._total
