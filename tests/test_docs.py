"""The references in docs/ match the code; the scrape config and Grafana dashboard work; the
README stays a front page, and every relative link in it and in docs/ leads somewhere.

A failure here usually means the code changed: `uv run python -m tests.gen_docs` rewrites the
generated parts of the pages in docs/.
"""

from __future__ import annotations

import difflib
import json
import re
import shutil
from collections.abc import Iterator
from importlib.resources import files
from pathlib import Path
from typing import Any

import anyio
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from proxy.config import Settings, load_settings
from proxy.emulator import Emulator
from tests import doc_capture
from tests.gen_docs import (
    DOCS,
    EXAMPLES,
    PER_HOST,
    PER_KEY,
    PER_MODEL,
    PROMQL,
    REGENERATE,
    ROOT,
    Setting,
    config_reference,
    doc_block,
    doc_page,
    metric_docs,
    metrics_reference,
    pages,
    replace_section,
    section,
    settings_reference,
    show_value,
    update,
)
from tests.helpers import MESSAGES, QWEN, README, readme, running

STALE = f"docs/ is stale: run `{REGENERATE}`"
SETTINGS = settings_reference()
DASHBOARD = files("proxy") / "grafana" / "lmswitch.json"
# What the dashboard must show (base names, before _total/_bucket/_sum/_count).
DASHBOARD_MUST_SHOW = {
    "lmswitch_requests",
    "lmswitch_request_duration_seconds",
    "lmswitch_time_to_first_byte_seconds",
    "lmswitch_queue_wait_seconds",
    "lmswitch_model_loads",
    "lmswitch_model_load_duration_seconds",
    "lmswitch_model_unloads",
    "lmswitch_model_loaded",
}


# --- configuration ----------------------------------------------------------------------------


def test_config_reference_is_current() -> None:
    assert section(doc_page("configuration"), "config-reference") == config_reference(), STALE


def test_replace_section_rewrites_between_the_markers_only() -> None:
    text = "a\n<!-- x:start -->\nold\n<!-- x:end -->\nb\n"
    new = replace_section(text, "x", "new\n")
    assert new == "a\n<!-- x:start -->\nnew\n<!-- x:end -->\nb\n"
    assert section(new, "x") == "new\n"


def test_values_are_shown_as_config_yaml_would_hold_them() -> None:
    assert show_value(True, None) == "true"
    assert show_value(("a",), None) == '["a"]'
    assert show_value({"a": "b"}, None) == '{"a": "b"}'
    assert show_value(5400.0, "duration") == "90m"
    assert show_value(0.25, "duration") == "0.25s"
    assert show_value(1000, "size") == "1000"
    assert show_value(3 * 2**30, "size") == "3GiB"


@pytest.mark.parametrize("setting", SETTINGS, ids=[s.key for s in SETTINGS])
def test_every_setting_is_described(setting: Setting) -> None:
    assert setting.description, f"add Field(description=...) for {setting.key} in proxy/config.py"


def _yaml_for(key: str, example: str) -> str:
    """`key` (dotted; `*` a model key or a host's or named key's place) set to the example
    text, as config.yaml would hold it; a host's key in the first host of the `upstreams`
    example, a named key's in the first key of the `auth.keys` example."""
    if key.startswith(PER_HOST):
        first, *_ = yaml.safe_load(EXAMPLES["upstreams"])
        host = first | {key.removeprefix(f"{PER_HOST}."): yaml.safe_load(example)}
        return yaml.safe_dump({"upstreams": [host]})
    if key.startswith(PER_KEY):
        first, *_ = yaml.safe_load(EXAMPLES["auth.keys"])
        leaf = key.removeprefix(f"{PER_KEY}.")
        if leaf == "key":  # one of key and key_sha256, not both
            del first["key_sha256"]
        return yaml.safe_dump({"auth": {"keys": [first | {leaf: yaml.safe_load(example)}]}})
    *parents, leaf = key.replace("*", "some-model").split(".")
    lines = [f"{'  ' * depth}{name}:" for depth, name in enumerate(parents)]
    return "\n".join([*lines, f"{'  ' * len(parents)}{leaf}: {example}"]) + "\n"


def _env_text(value: Any) -> str:
    """A YAML value as an LMSWITCH_* variable holds it: strings as they are, the rest as JSON."""
    return value if isinstance(value, str) else json.dumps(value)


@pytest.mark.parametrize("setting", SETTINGS, ids=[s.key for s in SETTINGS])
def test_config_example_works_in_the_file_and_the_environment(
    setting: Setting, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each example is valid YAML for its key, changes a setting, and means the same as its
    environment variable."""
    config = tmp_path / "config.yaml"
    config.write_text(_yaml_for(setting.key, setting.example))
    from_file = load_settings(config)
    assert from_file != Settings()
    if setting.key.startswith((PER_MODEL, PER_HOST, PER_KEY)):
        assert setting.env is None  # set the whole mapping or list, as JSON, instead
        return
    assert setting.env is not None
    monkeypatch.setenv(setting.env, _env_text(yaml.safe_load(setting.example)))
    assert Settings() == from_file


# --- endpoints --------------------------------------------------------------------------------


def _joined(texts: dict[str, str]) -> list[str]:
    """Every page's lines, masked, each page after a line naming it."""
    return [
        line
        for page, text in texts.items()
        for line in [f"==> docs/{page}.md <==", *doc_capture.mask(text).splitlines()]
    ]


async def test_readme_matches_a_fresh_generation() -> None:
    """The docs' requests and answers (and every other generated part) are what the code
    gives today, ids and times aside."""
    texts = pages()
    with anyio.fail_after(20):
        fresh = await update(texts)
    old, new = _joined(texts), _joined(fresh)
    diff = "\n".join(list(difflib.unified_diff(old, new, "docs/", "generated", lineterm=""))[:40])
    assert old == new, f"{STALE}\n{diff}"


def test_mask_blanks_ids_and_times_only() -> None:
    text = '{"id": "chatcmpl-abc123", "created": 1795790504, "uptime_s": 0.5, "model": "m"}'
    assert (
        doc_capture.mask(text) == '{"id": "chatcmpl-…", "created": …, "uptime_s": …, "model": "m"}'
    )


# --- metrics ----------------------------------------------------------------------------------


def test_metrics_reference_is_current() -> None:
    assert section(doc_page("metrics"), "metrics-reference") == metrics_reference(), STALE


async def scrape_served() -> dict[str, frozenset[str]]:
    """Series name -> label names, from a real `/metrics` scrape after one chat request."""
    labels = {doc.name: frozenset(doc.labels) for doc in metric_docs()}
    async with running(Emulator()) as proxy:
        with anyio.fail_after(10):
            await proxy.sdk.chat.completions.create(model=QWEN, messages=MESSAGES)
            text = (await proxy.http.get("/metrics")).text
    served: dict[str, frozenset[str]] = {}
    for family in text_string_to_metric_families(text):
        if family.type == "counter":
            served[family.name + "_total"] = labels[family.name + "_total"]
        elif family.type == "histogram":
            for suffix in ("_bucket", "_sum", "_count"):
                extra = {"le"} if suffix == "_bucket" else set()
                served[family.name + suffix] = labels[family.name] | extra
        else:
            served[family.name] = labels[family.name]
    return served


_NAME = re.compile(r"\blmswitch_\w+")
_SELECTOR = re.compile(r"\b(lmswitch_\w+)\{([^}]*)\}")
_GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")


def promql_problems(expr: str, served: dict[str, frozenset[str]]) -> list[str]:
    """What in `expr` names a series or label that lmswitch does not serve."""
    names = set(_NAME.findall(expr))
    problems = [f"{name} is not served" for name in sorted(names - set(served))]
    known = set().union(*(served.get(name, frozenset()) for name in names))
    problems += [
        f"{name} has no label {label!r}"
        for name, matchers in _SELECTOR.findall(expr)
        for label in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers)
        if name in served and label not in served[name]
    ]
    problems += [
        f"no series in {expr!r} has the label {label!r}"
        for grouping in _GROUPING.findall(expr)
        for label in filter(None, (part.strip() for part in grouping.split(",")))
        if label not in known
    ]
    return problems


def test_promql_problems_finds_wrong_names_and_labels() -> None:
    served = {"lmswitch_a_total": frozenset({"model"})}
    assert promql_problems("sum by (model) (rate(lmswitch_a_total[5m]))", served) == []
    assert promql_problems('lmswitch_b{model="x"}', served) == ["lmswitch_b is not served"]
    assert promql_problems('sum by (kind) (lmswitch_a_total{mode="x"})', served) == [
        "lmswitch_a_total has no label 'mode'",
        "no series in 'sum by (kind) (lmswitch_a_total{mode=\"x\"})' has the label 'kind'",
    ]


async def test_promql_examples_name_only_served_series() -> None:
    served = await scrape_served()
    for doc in metric_docs():
        query, _ = PROMQL[doc.name]
        assert promql_problems(query, served) == [], query
        assert doc.name.removesuffix("_total") in query, f"{doc.name}'s example is about another"


def _queries(node: Any, keys: tuple[str, ...] = ("expr", "definition")) -> Iterator[str]:
    """Every query in a dashboard: panel targets (`expr`, PromQL) and template variables'
    (`definition`, Grafana's `label_values(...)`)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in keys and isinstance(value, str):
                yield value
            else:
                yield from _queries(value, keys)
    elif isinstance(node, list):
        for item in node:
            yield from _queries(item, keys)


async def test_grafana_dashboard_queries_name_only_served_series() -> None:
    """The dashboard is valid JSON, every query names real series and labels, and it shows
    requests, latency, time to first byte, queue wait, loads, load time, evictions and
    loaded models."""
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    panels = dashboard["panels"]
    assert len({panel["id"] for panel in panels}) == len(panels)
    assert all(panel["targets"] for panel in panels)
    queries = list(_queries(dashboard))
    served = await scrape_served()
    for query in queries:
        assert promql_problems(query, served) == [], query
    shown = {
        re.sub(r"_(total|bucket|sum|count)$", "", n) for q in queries for n in _NAME.findall(q)
    }
    assert shown >= DASHBOARD_MUST_SHOW


async def test_prometheus_scrape_config_points_at_metrics(tmp_path: Path) -> None:
    """The metrics reference's scrape config scrapes /metrics on lmswitch's port (and passes
    promtool)."""
    text = doc_block("metrics", "prometheus")
    job = yaml.safe_load(text)["scrape_configs"][0]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == [f"127.0.0.1:{Settings().server.port}"]
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    config = tmp_path / "prometheus.yml"
    config.write_text(text)
    with anyio.fail_after(20):
        result = await anyio.run_process([promtool, "check", "config", str(config)], check=False)
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
async def test_promql_parses(tmp_path: Path) -> None:
    """Prometheus' own parser (`promtool check rules`) accepts every PromQL expression: the
    reference's examples and the dashboard's panels (its variables filled in)."""
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    panels = [
        expr.replace("$__rate_interval", "5m").replace("$model", ".*")
        for expr in _queries(dashboard, ("expr",))
    ]
    exprs = [query for query, _ in PROMQL.values()] + panels
    rules = [{"record": f"lmswitch:docs_example_{i}", "expr": e} for i, e in enumerate(exprs)]
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "docs", "rules": rules}]}))
    promtool: Any = shutil.which("promtool")
    with anyio.fail_after(20):
        result = await anyio.run_process([promtool, "check", "rules", str(path)], check=False)
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


# --- the README as a front page, and links ----------------------------------------------------

README_MAX_LINES = 420
MARKDOWN = [README, *sorted(DOCS.glob("*.md"))]

_FENCE = re.compile(r"\s*(```|~~~)")
_HEADING = re.compile(r"#{1,6}\s+(.*?)[\s#]*$")
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_URL = re.compile(r"[a-z][a-z0-9+.-]*:")  # https:, mailto:, ...


def test_readme_stays_a_front_page() -> None:
    """The references live in docs/: the README stays short enough to read through."""
    lines = len(readme().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines: move detail to docs/"


def _unfenced(text: str) -> Iterator[str]:
    """`text`'s lines outside fenced code blocks."""
    fenced = False
    for line in text.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            yield line


def anchors(text: str) -> set[str]:
    """The anchors GitHub gives `text`'s headings: lower case, punctuation dropped, spaces as
    hyphens, and `-1`, `-2`, ... after a repeat."""
    found: set[str] = set()
    repeats: dict[str, int] = {}
    for line in _unfenced(text):
        if (match := _HEADING.match(line)) is None:
            continue
        plain = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", match[1]).replace("`", "")
        slug = re.sub(r"[^\w\- ]", "", plain.lower()).replace(" ", "-")
        seen = repeats.get(slug, 0)
        repeats[slug] = seen + 1
        found.add(f"{slug}-{seen}" if seen else slug)
    return found


def relative_links(text: str) -> list[str]:
    """The targets of `text`'s Markdown links that are not URLs (`page.md#anchor`, `#anchor`);
    code blocks and code spans hold none."""
    return [
        target
        for line in _unfenced(text)
        for target in _LINK.findall(re.sub(r"`[^`]*`", "", line))
        if not _URL.match(target)
    ]


def broken_links(path: Path, text: str) -> list[str]:
    """The relative links in `text`, the Markdown file at `path`, that lead nowhere, each with
    why."""
    problems = []
    for target in relative_links(text):
        file, _, anchor = target.partition("#")
        where = (path.parent / file).resolve()
        if not where.is_relative_to(ROOT):
            problems.append(f"{target}: outside the repository")
        elif file and not where.exists():
            problems.append(f"{target}: no such file")
        elif anchor:
            headings = where.read_text(encoding="utf-8") if file else text
            if anchor not in anchors(headings):
                problems.append(f"{target}: no heading with that anchor")
    return problems


def test_anchors_and_links_are_read_as_github_does() -> None:
    text = (
        "# A title\n## 2.4 The `swap_grace` rule (fair) ##\n## Notes\n## [Notes](x.md)\n"
        "```sh\n# not a heading [no](link.md)\n```\n"
        "See [here](#notes-1), [there](other.md#x), `[code](skip.md)`,\n"
        '[the web](https://example.com) and ![a picture](img.png "its title").\n'
    )
    assert anchors(text) == {"a-title", "24-the-swap_grace-rule-fair", "notes", "notes-1"}
    assert relative_links(text) == ["x.md", "#notes-1", "other.md#x", "img.png"]


def test_broken_links_names_each_problem() -> None:
    text = (
        "# Top\n[ok](#top) [gone](#nowhere) [missing](missing.md) [out](../../elsewhere.md)\n"
        "[readme](../README.md#lmswitch) [heading](../README.md#no-such-heading) [dir](../tests)\n"
    )
    assert broken_links(DOCS / "sample.md", text) == [
        "#nowhere: no heading with that anchor",
        "missing.md: no such file",
        "../../elsewhere.md: outside the repository",
        "../README.md#no-such-heading: no heading with that anchor",
    ]


@pytest.mark.parametrize("path", MARKDOWN, ids=[str(p.relative_to(ROOT)) for p in MARKDOWN])
def test_relative_links_lead_to_files_and_headings_that_exist(path: Path) -> None:
    """Every relative link in the README and docs/ names a file in the repository, and one of
    its headings when it names an anchor."""
    assert broken_links(path, path.read_text(encoding="utf-8")) == []


def test_every_yaml_block_of_the_readme_is_a_valid_config(tmp_path: Path) -> None:
    """A user copies the README's configuration examples as they are: each must load."""
    blocks = re.findall(r"```yaml\n(.*?)```", readme(), re.DOTALL)
    assert len(blocks) >= 2  # the minimal config and the pool's
    for n, block in enumerate(blocks):
        config = tmp_path / f"example-{n}.yaml"
        config.write_text(block, encoding="utf-8")
        load_settings(config)


def test_every_section_of_the_design_the_code_cites_exists() -> None:
    """`docs/design.md §N.M` in a docstring or comment names a heading that is there."""
    design = (ROOT / "docs" / "design.md").read_text(encoding="utf-8")
    headings = set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", design, flags=re.MULTILINE))
    cited: dict[str, set[str]] = {}
    for path in sorted((ROOT / "proxy").rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        for run in re.findall(r"docs/design\.md((?:[,\s]+(?:and\s+)?§\d+(?:\.\d+)?)+)", text):
            for number in re.findall(r"§(\d+(?:\.\d+)?)", run):
                cited.setdefault(number, set()).add(path.name)
    assert len(cited) >= 10  # the pattern finds the citations
    missing = {number: names for number, names in cited.items() if number not in headings}
    assert not missing, missing
