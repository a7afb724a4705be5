"""How accurate a float32 per-sample Gram is, and what the zero threshold of c_k must model.

Run as ``python -m benchmarks.resolution_check`` (from the repository root; ~3 min on 2 cores).
A CIFAR-style ResNet-20 (BatchNorm in train mode) is trained ``--iterations`` steps on the real
MNIST-5k digits in float32 (SGD Nesterov 0.9, LR 0.05, batch 64); then for batches of 64 and 128
the Gram is formed three ways with ``GramRecorder``:

* ``G32``: float32 model, float32 accumulation (the default for a float32 model);
* ``G32/64``: the same float32 per-sample gradients accumulated in float64 (``dtype=float64``);
* ``G64``: a float64 copy of the same weights (the reference).

For each it reports, against ``G64``: the largest relative error of any eigenvalue, c_k under the
resolved rank (``fimcore.resolution``) and under the legacy tolerance ``B·eps32·λ_max``; and on the
diagonally scaled Gram C = D⁻¹GD⁻¹: its smallest eigenvalue, the rank threshold τ, and the two
error sources τ must cover — accumulation (``C(G32) − C(G32/64)``, same gradients, different sums)
and the float32 model itself (``C(G32) − C(G64)``), entrywise in units of eps32 and in spectral
norm. A batch that repeats 8 samples adds exact null directions. Nothing is asserted; the table
is written to ``benchmarks/results/resolution.md``.
"""

from __future__ import annotations

import argparse
import copy

import numpy as np

from benchmarks._harness import (command_line, key_value_table, machine_info, markdown_table,
                                 package_versions, write_report)

EPS32 = float(np.finfo(np.float32).eps)


def _train(iterations: int, seed: int):
    import torch
    import torch.nn.functional as F

    from reference_training.data import load_dataset, normalise
    from reference_training.models import build_model

    torch.manual_seed(seed)
    ds = load_dataset("mnist5k")
    model = build_model("resnet20", in_channels=1, num_classes=10, image_size=28)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True,
                          weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed + 1)
    for _ in range(iterations):
        idx = torch.randint(0, len(ds.train_y), (64,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(normalise(ds.train_x[idx], ds.mean, ds.std)), ds.train_y[idx]).backward()
        opt.step()
    return ds, model


def _gram(model, x, y, dtype=None) -> np.ndarray:
    import torch.nn.functional as F

    from fimcore_adapters.torch import GramRecorder

    rec = GramRecorder(model, conv_method="grouped", dtype=dtype)
    with rec:
        F.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)
    return rec.gram().detach().numpy()


def _scaled(G: np.ndarray) -> np.ndarray:
    d = np.sqrt(np.diag(G).astype(np.float64))
    return G.astype(np.float64) / np.outer(d, d)


def _rows(ds, model, batches: int, seed: int) -> list[list[str]]:
    import torch

    import fimcore
    from reference_training.data import normalise

    model64 = copy.deepcopy(model).double()
    rng = np.random.default_rng(seed)
    rows = []
    for batch in (64, 128):
        for trial in range(batches + 1):
            repeat = trial == batches        # the last batch repeats 8 samples
            idx = rng.choice(len(ds.train_y), batch - 8 * repeat, replace=False)
            idx = torch.as_tensor(np.concatenate([idx, idx[:8]]) if repeat else idx)
            x, y = normalise(ds.train_x[idx], ds.mean, ds.std), ds.train_y[idx]
            g32 = _gram(model, x, y)
            g3264 = _gram(model, x, y, torch.float64)
            g64 = _gram(model64, x.double(), y)
            e64 = np.linalg.eigvalsh(g64)
            c32, c3264, c64 = _scaled(g32), _scaled(g3264), _scaled(g64)
            mu = np.linalg.eigvalsh((c64 + c64.T) / 2)
            r32 = fimcore.resolution(g32, grad_dtype=np.float32)
            r3264 = fimcore.resolution(g3264, grad_dtype=np.float32)
            r64 = fimcore.resolution(g64)
            legacy = fimcore.resolution(g32, rtol=fimcore.default_rtol(batch, np.float32))
            nz = slice(8, None) if repeat else slice(None)
            eig_err = np.max(np.abs(np.linalg.eigvalsh(g32.astype(np.float64))[nz] - e64[nz])
                             / e64[nz])
            acc, model_err = c32 - c3264, c32 - c64
            rows.append([
                batch, "yes" if repeat else "no", f"{e64[-1]:.4g}", f"{float(r64.c):.4g}",
                f"{float(r32.c):.4g}", f"{float(r3264.c):.4g}", f"{float(legacy.c):.4g}",
                f"{int(r32.rank)}/{int(r64.rank)}", f"{eig_err:.1e}" if not repeat else f"{eig_err:.1e} (non-null)",
                f"{mu[8 if repeat else 0]:.2e}", f"{fimcore.rank_tolerance(batch, np.float32):.1e}",
                f"{np.abs(acc).max() / EPS32:.1f}", f"{np.linalg.norm(acc, 2) / (batch * EPS32):.2f}",
                f"{np.abs(model_err).max() / EPS32:.0f}",
                f"{np.linalg.norm(model_err, 2) / (batch * EPS32):.1f}",
                f"{float(r32.limit):.2e}", "yes" if bool(r32.limited) else "no",
            ])
    return rows


HEADERS = ["B", "8 repeated samples", "λ_max", "c_k G64", "c_k G32", "c_k G32/64",
           "c_k G32, legacy B·eps32", "rank G32/G64", "max rel. eigenvalue error G32",
           "μ_min⁺(C) G64", "τ (float32)", "max |δC| accumulation / eps32",
           "‖δC‖₂ accumulation / (B·eps32)", "max |δC| float32 model / eps32",
           "‖δC‖₂ float32 model / (B·eps32)", "c_limit G32", "resolution-limited"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--batches", type=int, default=3, help="random batches per size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/resolution.md")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    ds, model = _train(args.iterations, args.seed)
    rows = _rows(ds, model, args.batches, args.seed)
    text = "\n".join([
        "# Accuracy of a float32 per-sample Gram, and the zero threshold of c_k", "",
        (__doc__ or "").split("\n\n", 1)[1].strip(), "",
        "Units: entrywise errors of C in eps32 = 1.19e-7; spectral norms in B·eps32 (the "
        "threshold τ = 8·B·(eps_acc + eps_grad²) is 8 of these units for a float32 Gram).", "",
        markdown_table(HEADERS, rows), "",
        f"Command: `{command_line()}`", "",
        key_value_table({**machine_info(), **package_versions(["torch", "numpy"])}),
    ])
    print(text)
    write_report(args.out, text)


if __name__ == "__main__":
    main()
