"""Reports: machine and package description, Markdown tables, number formats, writing files.

Part of the benchmark harness; the protocol is described in :mod:`benchmarks._harness`.
"""

from __future__ import annotations

import datetime as _dt
import importlib
import importlib.metadata
import os
import platform
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence


def machine_info() -> dict[str, str]:
    """CPU model, cores, memory, OS, Python, load average and UTC date of this machine."""
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = "unknown"
    try:
        mem = f"{_meminfo_kb('MemTotal') / 1024 ** 2:.1f} GiB"
    except (OSError, RuntimeError):
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    return {
        "CPU": cpu,
        "cores": f"{os.cpu_count()} logical, {usable} usable by this process",
        "memory": mem,
        "OS": f"{platform.system()} {platform.release()}",
        "Python": platform.python_version(),
        "load average (1/5/15 min) at start": load_average(),
        "date (UTC)": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M"),
    }


def load_average() -> str:
    """The 1, 5 and 15 minute load averages (a busy shared machine shows here)."""
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def _meminfo_kb(name: str) -> int:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith(name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/meminfo has no {name} line.")


def package_versions(names: Iterable[str]) -> dict[str, str]:
    """Installed distribution versions (``"not installed"`` when absent), without importing them."""
    out = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub Markdown table; ``|`` inside cells is escaped.

    Example:
        >>> print(markdown_table(["a", "b"], [[1, "x|y"]]))
        | a | b |
        | --- | --- |
        | 1 | x\\|y |
    """
    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in headers) + " |",
             "| " + " | ".join("---" for _ in headers) + " |"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def key_value_table(items: dict[str, str]) -> str:
    """A two-column Markdown table (item, value) of ``items``."""
    return markdown_table(["item", "value"], items.items())


def command_line() -> str:
    """The command that started this process, as one would type it from the repository root."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    args = " ".join(sys.argv[1:])
    if spec is not None and spec.name:
        name = spec.name.removesuffix(".__main__")
        return f"python -m {name} {args}".strip()
    return f"python {' '.join(sys.argv)}".strip()


def write_report(path: str | os.PathLike, text: str) -> Path:
    """Writes ``text`` to ``path`` (parents created) and returns the path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text if text.endswith("\n") else text + "\n", encoding="utf-8")
    return p


def fmt_ratio(x: float | None, digits: int = 2) -> str:
    """``1.42×``; ``–`` for None or nan."""
    if x is None or x != x:
        return "–"
    if x >= 100:
        return f"{x:.0f}×"
    if x >= 10:
        return f"{x:.1f}×"
    return f"{x:.{digits}f}×"


def fmt_ms(seconds: float | None) -> str:
    """Milliseconds with sensible precision; ``–`` for None or nan."""
    if seconds is None or seconds != seconds:
        return "–"
    ms = seconds * 1e3
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.1f}" if ms >= 1 else f"{ms:.2f}"
