"""The report of replays, side by side: a table, DESIGN §11.4's JSON, and a self-contained
HTML page with one lane per run (which models were loaded over time, and the queue length)."""

from __future__ import annotations

import html
import statistics
from typing import Any

from proxy.simulate.replay import Run

GiB = 2**30


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _budget(run: Run) -> str:
    budget = run.policy.memory_budget
    if budget is None:
        return "none"
    if budget % GiB == 0:
        return f"{budget // GiB}GiB"
    return f"{budget / 10**9:.3g}GB"


def summary(run: Run) -> dict[str, Any]:
    """A run's figures, as `--json` prints them (DESIGN §11.4, and `requests`, `failed`,
    `evictions`, `wall_s`)."""
    policy = run.policy
    hours = run.total_s / 3600 if run.total_s > 0 else 0.0
    waits = run.waits
    return {
        "policy": str(policy.eviction),
        "memory_budget": policy.memory_budget,
        "max_loaded": policy.max_loaded,
        "swap_grace": policy.swap_grace_s,
        "loads": run.loads,
        "load_seconds": round(run.load_seconds, 3),
        "waited_on_load_share": round(run.waited_on_load / run.requests, 4)
        if run.requests
        else 0.0,
        "wait_p50_s": round(statistics.median(waits), 3) if waits else 0.0,
        "wait_p95_s": round(_percentile(waits, 0.95), 3),
        "wait_max_s": round(max(waits, default=0.0), 3),
        "swaps_per_hour": round(run.evictions / hours, 3) if hours else 0.0,
        "total_s": round(run.total_s, 3),
        "requests": run.requests,
        "failed": sum(run.failed.values()),
        "failed_by_reason": dict(run.failed),
        "evictions": run.evictions,
        "wall_s": round(run.wall_s, 3),
    }


_COLUMNS = (
    ("policy", "policy"),
    ("budget", "memory_budget"),
    ("max_loaded", "max_loaded"),
    ("swap_grace", "swap_grace"),
    ("loads", "loads"),
    ("load s", "load_seconds"),
    ("waited on load", "waited_on_load_share"),
    ("wait p50 s", "wait_p50_s"),
    ("wait p95 s", "wait_p95_s"),
    ("wait max s", "wait_max_s"),
    ("swaps/h", "swaps_per_hour"),
    ("total s", "total_s"),
    ("failed", "failed"),
)


def _cell(key: str, value: Any, run: Run) -> str:
    if key == "memory_budget":
        return _budget(run)
    if key == "waited_on_load_share":
        return f"{100 * value:.1f}%"
    if key == "swap_grace":
        return f"{value:g}s"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def rows(runs: list[Run]) -> list[list[str]]:
    """The table's header row, then one row per run."""
    table = [[title for title, _ in _COLUMNS]]
    for run in runs:
        figures = summary(run)
        table.append([_cell(key, figures[key], run) for _, key in _COLUMNS])
    return table


def table(runs: list[Run]) -> str:
    """The runs side by side, one row each, as fixed-width text."""
    grid = rows(runs)
    widths = [max(len(row[c]) for row in grid) for c in range(len(grid[0]))]
    lines = []
    for n, row in enumerate(grid):
        cells = [
            cell.ljust(w) if c == 0 else cell.rjust(w)
            for c, (cell, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines) + "\n"


def as_json(runs: list[Run]) -> dict[str, Any]:
    return {"runs": [summary(run) for run in runs]}


# -- the page -----------------------------------------------------------------------------------

_PALETTE = (
    "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7",
    "#9c755f", "#bab0ac",
)  # fmt: skip
_WIDTH = 1100  # the lanes' drawing width, in SVG units
_ROW = 14  # a model's row in a lane
_QUEUE_H = 40  # the queue's strip under a lane
_MAX_POINTS = 2000  # queue samples per lane, at most (the largest of each bucket is kept)

_STYLE = """
body { font: 14px system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin-bottom: 1.5em; }
th, td { padding: 0.25em 0.6em; border-bottom: 1px solid #ddd; text-align: right; }
th:first-child, td:first-child { text-align: left; }
h2 { font-size: 1em; margin: 1.2em 0 0.3em; }
.lane { margin-bottom: 1em; }
.legend span { display: inline-block; margin-right: 1em; }
.legend i { display: inline-block; width: 0.9em; height: 0.9em; margin-right: 0.3em; }
svg text { font: 10px system-ui, sans-serif; fill: #555; }
"""


def _downsample(points: list[tuple[float, int]]) -> list[tuple[float, int]]:
    if len(points) <= _MAX_POINTS:
        return points
    step = len(points) / _MAX_POINTS
    kept = []
    for b in range(_MAX_POINTS):
        bucket = points[int(b * step) : int((b + 1) * step)]
        if bucket:
            kept.append(max(bucket, key=lambda p: p[1]))
    return kept


def _lane(run: Run, keys: list[str], colours: dict[str, str], end_s: float) -> str:
    scale = _WIDTH / end_s if end_s > 0 else 1.0
    height = len(keys) * _ROW + _QUEUE_H + 20
    parts = [f'<svg class="timeline" width="{_WIDTH + 160}" height="{height}" role="img">']
    for n, key in enumerate(keys):
        y = n * _ROW
        parts.append(f'<text x="0" y="{y + 10}">{html.escape(key[:24])}</text>')
    for span in run.spans:
        y = keys.index(span.model) * _ROW
        x = 160 + span.start * scale
        w = max(0.5, (span.end - span.start) * scale)
        opacity = "1" if span.phase == "loaded" else "0.45"
        title = f"{span.model} {span.phase} {span.start:.1f}-{span.end:.1f} s"
        parts.append(
            f'<rect x="{x:.2f}" y="{y + 1}" width="{w:.2f}" height="{_ROW - 2}" '
            f'fill="{colours[span.model]}" fill-opacity="{opacity}">'
            f"<title>{html.escape(title)}</title></rect>"
        )
    top = len(keys) * _ROW + 4
    peak = max((n for _, n in run.queue), default=0)
    points = [f"160,{top + _QUEUE_H}"]
    level = 0
    for t, n in _downsample(run.queue):
        x = 160 + t * scale
        points.append(f"{x:.2f},{top + _QUEUE_H - level * _QUEUE_H / max(peak, 1):.2f}")
        level = n
        points.append(f"{x:.2f},{top + _QUEUE_H - level * _QUEUE_H / max(peak, 1):.2f}")
    points.append(
        f"{160 + end_s * scale:.2f},{top + _QUEUE_H - level * _QUEUE_H / max(peak, 1):.2f}"
    )
    parts.append(f'<text x="0" y="{top + _QUEUE_H - 4}">queue (max {peak})</text>')
    parts.append(
        f'<polyline points="{" ".join(points)}" fill="none" stroke="#333" stroke-width="1"/>'
    )
    parts.append(
        f'<text x="160" y="{height - 2}">0 s</text>'
        f'<text x="{160 + _WIDTH - 60}" y="{height - 2}">{end_s:.0f} s</text></svg>'
    )
    return "".join(parts)


def page(runs: list[Run], source: str, models: list[str]) -> str:
    """One self-contained HTML page: the table, then one lane per run."""
    colours = {key: _PALETTE[n % len(_PALETTE)] for n, key in enumerate(models)}
    end_s = max((run.total_s for run in runs), default=0.0)
    grid = rows(runs)
    head = "".join(f"<th>{html.escape(cell)}</th>" for cell in grid[0])
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>"
        for row in grid[1:]
    )
    legend = "".join(
        f'<span><i style="background:{colours[key]}"></i>{html.escape(key)}</span>'
        for key in models
    )
    lanes = []
    for run, row in zip(runs, grid[1:], strict=True):
        title = f"{row[0]}, budget {row[1]}, max_loaded {row[2]}, swap_grace {row[3]}"
        lane = _lane(run, models, colours, end_s)
        lanes.append(f'<div class="lane"><h2>{html.escape(title)}</h2>{lane}</div>')
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<link rel="icon" href="data:,">'
        f"<title>lmswitch simulate</title><style>{_STYLE}</style></head><body>"
        f"<h1>lmswitch simulate</h1><p>{html.escape(source)}</p>"
        f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
        f'<p class="legend">{legend} (pale: loading or unloading)</p>'
        f"{''.join(lanes)}</body></html>\n"
    )
