"""`inspect --plot`: a store's summary as a PNG, bits/param and zero fraction per layer and
per expert tensor, and a histogram of the experts' bits/param.

matplotlib is an optional dependency (the `plot` extra) and is imported only when a plot
is drawn. The figure is a bare matplotlib.figure.Figure on the Agg canvas, so no pyplot
state (current figure, backend selection) leaks into the caller's process."""
from __future__ import annotations

from pathlib import Path

from ..errors import MissingExtraError

INSTALL_HINT = "pip install 'qmoefmt[plot]'"


def require_matplotlib(feature: str):
    """matplotlib's Figure and Agg canvas classes, or a MissingExtraError naming the
    feature and the extra."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        missing = isinstance(e, ModuleNotFoundError) and (e.name or "").split(".")[0] == "matplotlib"
        first = (str(e).splitlines() or [type(e).__name__])[0]
        why = "which is not installed" if missing else f"which failed to import ({first})"
        raise MissingExtraError(f"{feature} needs matplotlib, {why}; {INSTALL_HINT}") from None
    return Figure, FigureCanvasAgg


def _short(name: str | None, width: int = 28) -> str:
    name = name or "(no layer)"
    return name if len(name) <= width else "…" + name[-(width - 1):]


def _bits_and_zeros(ax, labels, bpp, abpp, zeros, title):
    """Bars of bits/param (files and arrays only) on `ax`, zero fraction on a twin axis."""
    xs = range(len(labels))
    w = 0.4
    ax.bar([x - w / 2 for x in xs], [b if b is not None else 0 for b in bpp], w,
           label="bits/param (with metadata files)", color="#4c72b0")
    ax.bar([x + w / 2 for x in xs], [b if b is not None else 0 for b in abpp], w,
           label="bits/param (arrays only)", color="#55a868")
    top = max([b for b in list(bpp) + list(abpp) if b is not None] or [1.0])
    ax.set_ylim(0, top * 1.3)          # headroom for the legend
    ax.set_ylabel("bits / param")
    ax.set_title(title)
    ax.set_xticks(list(xs))
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    handles, names = ax.get_legend_handles_labels()
    known = [(x, z) for x, z in zip(xs, zeros) if z is not None]
    if known:
        tw = ax.twinx()
        line, = tw.plot([x for x, _ in known], [z for _, z in known], "o-", color="#c44e52",
                        label="zero fraction")
        tw.set_ylim(0, 1.3)
        tw.set_ylabel("zero fraction")
        handles.append(line)
        names.append("zero fraction")
    ax.legend(handles, names, fontsize=7, loc="upper right", ncol=3)


def plot_summary(summary: dict, path) -> Path:
    """Write `summary` (qmoefmt.store.summary.summarize's result) as a PNG to `path`;
    returns the path. Raises MissingExtraError without matplotlib."""
    Figure, FigureCanvasAgg = require_matplotlib("inspect --plot")
    layers = summary["layers"]
    experts = [t for t in summary["tensors"] if t["expert"]]
    panels = 1 + (2 if experts else 0)
    fig = Figure(figsize=(max(8.0, 0.35 * max(len(layers), len(experts), 1) + 3), 4.5 * panels),
                 layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(panels, 1, squeeze=False)[:, 0]
    fig.suptitle(f"{summary['path']} (format {summary['format_version']})"
                 + (f", filter {summary['filter']!r}" if summary.get("filter") else ""),
                 fontsize=9)
    _bits_and_zeros(axes[0], [_short(g["layer"]) for g in layers],
                    [g["bits_per_param"] for g in layers],
                    [g["array_bits_per_param"] for g in layers],
                    [g["zero_fraction"] for g in layers], "per layer")
    if experts:
        _bits_and_zeros(axes[1], [_short(t["name"].removesuffix(".weight"), 52) for t in experts],
                        [t["bits_per_param"] for t in experts],
                        [t["array_bits_per_param"] for t in experts],
                        [t["zero_fraction"] for t in experts], "per expert tensor")
        ax = axes[2]
        for key, label, color in (("bits_per_param", "with metadata files", "#4c72b0"),
                                  ("array_bits_per_param", "arrays only", "#55a868")):
            vals = [t[key] for t in experts if t[key] is not None]
            if vals:
                ax.hist(vals, bins=min(30, max(5, len(vals))), alpha=0.6, label=label,
                        color=color)
        ax.set_xlabel("bits / param")
        ax.set_ylabel("expert tensors")
        ax.set_title(f"histogram of per-expert bits/param ({len(experts)} expert tensors)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    path = Path(path)
    fig.savefig(path, format="png", dpi=110)
    return path
