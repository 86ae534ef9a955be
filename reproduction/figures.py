"""A table's figure (``plot:`` in its spec): the measured column per row, mean ± sample std over the seeds with
every seed as a dot, beside the paper's figure, and, for a table with a FLOPs column (the operator's cost, measured
by the cost code), the FLOPs per row on a second y-axis of the paper's panel; written to
``results/figures/table-<name>.png``."""

from __future__ import annotations

import io
import textwrap
from pathlib import Path
from typing import Any

from reproduction.render import figure_caption, paper_value
from reproduction.seeds import seed_summary
from reproduction.spec import TableSpec
from tasks.common.io import write_bytes_atomic


def _ours(spec: TableSpec, column_key: str) -> list[tuple[list[float], float | None, float | None, int]]:
    """Per row: the seeds' values, their mean, sample std (None below two) and how many seeds the row has."""
    column = next(c for c in spec.columns if c.key == column_key)
    points = []
    for row in spec.rows:
        if column.measured_at_render:
            value = row.measured.get(column.metric)
            points.append(([] if value is None else [value], value, None, 1))
            continue
        summary = seed_summary(row, column, paper_value(spec, row, column))
        values = [] if summary is None else list(summary.values.values())
        points.append((values, None if summary is None else summary.mean, None if summary is None else summary.std,
                       len(row.runs)))
    return points


def flops_per_row(spec: TableSpec) -> list[float | None] | None:
    """The rows' measured ``cost.flops`` (None where a row has none), or None for a table without a FLOPs column."""
    if not any(c.metric == "cost.flops" for c in spec.columns):
        return None
    return [row.measured.get("cost.flops") for row in spec.rows]


def write_table_figure(spec: TableSpec, provenance: dict[str, Any], path: str | Path) -> None:
    """Plot ``spec.plot.column`` of the rendered rows to ``path`` (PNG, replaced atomically). At scale=paper the
    paper's figures and ours share one y-axis; at any other scale they are two panels, ours labelled as not the
    paper's."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    plot = spec.plot
    column = next(c for c in spec.columns if c.key == plot.column)
    ticks = plot.x_ticks or [row.label for row in spec.rows]
    x = list(range(len(spec.rows)))
    paper = [paper_value(spec, row, column) for row in spec.rows]
    paper_points = [(i, float(v)) for i, v in zip(x, paper) if isinstance(v, (int, float))]
    ours = _ours(spec, plot.column)
    scale = str(provenance.get("scale", "?"))
    together = scale == "paper"

    figure, axes = plt.subplots(1 if together else 2, 1, sharex=True, squeeze=False,
                                figsize=(max(6.0, 0.9 * len(x) + 2), 4.5 if together else 6.5))
    paper_axis, ours_axis = (axes[0, 0], axes[0, 0]) if together else (axes[0, 0], axes[1, 0])
    if paper_points:
        paper_axis.plot(*zip(*paper_points), "s", color="tab:gray", label="paper")
    paper_axis.set_ylabel(f"{column.header} (paper)")
    flops = flops_per_row(spec)
    if flops is not None and any(v is not None for v in flops):
        cost_axis = paper_axis.twinx()
        cost_axis.plot(*zip(*[(i, v) for i, v in zip(x, flops) if v is not None]), "^--", color="tab:orange",
                       alpha=0.8, label="FLOPs (right axis)")
        cost_axis.set_ylabel("FLOPs per input pixel", color="tab:orange")
        cost_axis.tick_params(axis="y", colors="tab:orange")
        cost_axis.legend(fontsize=8, loc="lower right")
    labelled = False
    for i, (values, mean, std, _) in enumerate(ours):
        ours_axis.plot([i] * len(values), values, ".", color="tab:blue", alpha=0.4)
        if mean is not None:
            ours_axis.errorbar([i], [mean], yerr=None if std is None else [std], fmt="o", color="tab:blue",
                               capsize=4, label=None if labelled else "ours")
            labelled = True
    ours_axis.set_ylabel(f"{column.header} (ours, scale={scale})")
    if not together:
        paper_axis.set_title("paper (published)", fontsize=9)
        ours_axis.set_title(f"ours at scale={scale}: not comparable with the paper's numbers", fontsize=9)
    labels = []
    for tick, (values, _, _, seeds) in zip(ticks, ours):
        missing = seeds - len(values)
        labels.append(tick if not missing else f"{tick}\n({len(values)}/{seeds} seeds)")
    ours_axis.set_xticks(x, labels, rotation=30 if max(map(len, ticks)) > 6 else 0, ha="center")
    ours_axis.set_xlabel(plot.x_title)
    for axis in {paper_axis, ours_axis}:
        axis.grid(axis="y", alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=8)
    figure.suptitle("\n".join(textwrap.wrap(spec.title, 70)), fontsize=10)
    figure.text(0.01, 0.005, "\n".join(textwrap.wrap(figure_caption(spec, provenance), 110)), fontsize=7,
                va="bottom")
    figure.tight_layout(rect=(0, 0.06, 1, 1))
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    write_bytes_atomic(path, buffer.getvalue())
