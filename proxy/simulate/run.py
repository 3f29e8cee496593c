"""`lmswitch simulate`: read or make the trace, replay it under every combination of the
settings given, print the report (and write the trace or the page if asked)."""

from __future__ import annotations

import itertools
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from proxy.config import ModelsSettings, SchedulerSettings
from proxy.scheduling import Eviction, Policy
from proxy.simulate import report
from proxy.simulate.fromlog import from_log
from proxy.simulate.generate import DEFAULT_DURATION_S, generate
from proxy.simulate.replay import replay
from proxy.simulate.trace import Trace, TraceError, read_trace, write_trace


@dataclass(frozen=True)
class SimulateOptions:
    """The command line of `lmswitch simulate`, parsed."""

    trace: str | None = None
    from_log: str | None = None
    generate: str | None = None
    seed: int = 1
    duration_s: float = DEFAULT_DURATION_S
    requests: int | None = None
    policies: tuple[str, ...] = ("lru", "cost")
    memory_budgets: tuple[int | None, ...] = (None,)
    max_loaded: tuple[int, ...] = (ModelsSettings().max_loaded,)
    swap_graces: tuple[float, ...] = (SchedulerSettings().swap_grace,)
    json: bool = False
    html: str | None = None
    write_trace: str | None = None


def load(options: SimulateOptions) -> Trace:
    """The trace the options name; `TraceError` (or `OSError`) if it cannot be read."""
    if options.generate is not None:
        return generate(
            options.generate, options.seed, duration_s=options.duration_s, requests=options.requests
        )
    path = options.from_log if options.from_log is not None else options.trace
    if path is None:
        raise TraceError("give a TRACE file, --from-log FILE or --generate KIND")
    with Path(path).open(encoding="utf-8", errors="replace") as lines:
        return from_log(lines) if options.from_log is not None else read_trace(lines)


def policies(options: SimulateOptions) -> list[Policy]:
    """One policy per combination of the settings, the others as the config's defaults."""
    defaults = SchedulerSettings()
    return [
        Policy(
            max_loaded=max_loaded,
            memory_budget=budget,
            swap_grace_s=grace,
            max_queue=defaults.max_queue,
            queue_timeout_s=defaults.queue_timeout,
            priority_aging_s=defaults.priority_aging,
            eviction=Eviction(policy),
        )
        for budget, max_loaded, grace, policy in itertools.product(
            options.memory_budgets, options.max_loaded, options.swap_graces, options.policies
        )
    ]


def run(options: SimulateOptions) -> int:
    """Run the command; 2 (with one line on stderr) if the trace cannot be read."""
    try:
        trace = load(options)
    except (TraceError, OSError) as exc:
        print(f"lmswitch simulate: {exc}", file=sys.stderr)  # noqa: T201 - the command's error
        return 2
    if options.write_trace is not None:
        with Path(options.write_trace).open("w", encoding="utf-8") as out:
            write_trace(trace, out)
    runs = [
        replay(trace, policy, timeline=options.html is not None) for policy in policies(options)
    ]
    if options.json:
        print(json.dumps(report.as_json(runs), indent=2))  # noqa: T201 - the command's output
    else:
        hours = sum(run.total_s for run in runs) / 3600
        wall = sum(run.wall_s for run in runs)
        print(  # noqa: T201 - the command's output
            f"{trace.source or 'trace'}: {len(trace.requests)} requests, {len(trace.models)} "
            f"models; {hours:.1f} simulated hours in {wall:.2f} s\n"
        )
        print(report.table(runs), end="")  # noqa: T201 - the command's output
    if options.html is not None:
        page = report.page(runs, trace.source, list(trace.models))
        Path(options.html).write_text(page, encoding="utf-8")
    return 0
