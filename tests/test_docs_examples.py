"""The docs as a contract, the cheap part: every command, flag (and value of a flag with choices), make
target, metric and label, route, `x-ponder-*` header and section pointer that README.md and docs/*.md
name is one the code (or the page pointed to) has, and the other way round for metrics, routes,
headers and error codes. Renaming any of them without the docs fails here; README's openai-SDK
example is run as written.

Commands and flags are checked against each program's own `--help` (argparse's, as a user sees it);
metrics, routes and headers against a real gateway (`ponder serve` in front of the mock upstream)
where one can answer, and against its route table and metric declarations otherwise."""

from __future__ import annotations

import functools
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from starlette.routing import Match

from tests.servers import ROOT, mock_backend, running, start_gateway, start_mock, write_policy

DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^ *```[^\n]*\n(.*?)^ *```", re.M | re.S)
INLINE = re.compile(r"`([^`\n]+)`")
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def doc_texts() -> dict[str, str]:
    return {path.relative_to(ROOT).as_posix(): path.read_text() for path in DOC_FILES}


def code_snippets() -> list[tuple[str, str]]:
    """(doc, text) for every line of a fenced block and every inline code span, where commands are shown."""
    out = []
    for doc, text in doc_texts().items():
        for block in FENCE.findall(text):
            out += [(doc, line.strip()) for line in block.splitlines() if line.strip()]
        out += [(doc, span.strip()) for span in INLINE.findall(FENCE.sub("", text))]
    return out


def shown_commands(prefix: str) -> list[tuple[str, str, str]]:
    """(doc, program, the rest of the line) for each snippet that runs `prefix` (comments cut off);
    `prefix` is a regex for the program, after optional `VAR=value` assignments."""
    pattern = re.compile(rf"^(?:[A-Z_]+=\S*\s+)*(?:\.venv/bin/)?({prefix})(?:\s+(.*))?$")
    out = []
    for doc, snippet in code_snippets():
        match = pattern.match(snippet)
        if match:
            out.append((doc, match.group(1), (match.group(2) or "").split(" #")[0]))
    return out


@functools.cache
def help_text(*argv: str) -> str:
    result = subprocess.run([*argv, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{' '.join(argv)} --help: exit {result.returncode}\n{result.stderr[-2000:]}"
    return result.stdout


PONDER = [sys.executable, "-m", "gateway.cli"]


def ponder_command(rest: str) -> tuple[list[str], str]:
    """The subcommand of `ponder REST` (`policy check` is two words) and what follows it."""
    words = rest.split()
    if not words or words[0].startswith("-"):
        return [], rest
    take = 2 if words[:2] == ["policy", "check"] else 1
    return words[:take], " ".join(words[take:])


def test_every_ponder_command_and_flag_in_the_docs_exists():
    shown = shown_commands("ponder")
    assert len(shown) >= 20, "the docs show fewer `ponder` commands than they did: is the parsing broken?"
    commands = help_text(*PONDER)
    problems = []
    for doc, _, rest in shown:
        sub, args = ponder_command(rest)
        if sub and not re.search(rf"^\s+ponder {' '.join(sub)}\b", commands, re.M):
            problems.append(f"{doc}: `ponder {rest}`: no subcommand `{' '.join(sub)}` in `ponder --help`")
            continue
        usage = help_text(*PONDER, *sub)
        problems += [f"{doc}: `ponder {rest}`: `{' '.join(['ponder', *sub])}` has no {flag}"
                     for flag in FLAG.findall(args) if not re.search(rf"(?<![\w-]){flag}\b", usage)]
        allowed = choices(usage)
        problems += [f"{doc}: `ponder {rest}`: {flag} does not take {sorted(set(values) - allowed[flag])}"
                     for flag, values in flag_values(args) if flag in allowed and not set(values) <= allowed[flag]]
    assert problems == []


def flag_values(args: str) -> list[tuple[str, list[str]]]:
    """`--suite all`, `[--format routellm|routerbench|jsonl]`: (flag, the values shown)."""
    return [(flag, values.split("|")) for flag, values in re.findall(r"(--[a-z][a-z0-9-]*) ([a-z][a-z0-9|-]*)", args)]


def choices(usage: str) -> dict[str, set[str]]:
    """argparse's `--flag {a,b,c}` in a help text."""
    return {flag: set(values.split(",")) for flag, values in re.findall(r"(--[a-z][a-z0-9-]*) \{([^}]*)\}", usage)}


def test_every_module_and_script_flag_in_the_docs_exists():
    """`python -m MODULE --flag`, `python bench/x.py --flag` and `make TARGET` as the docs show them."""
    shown = shown_commands(r"python -m [\w.]+|python [\w/]+\.py")
    assert len(shown) >= 10
    problems = []
    for doc, program, rest in shown:
        argv = [sys.executable, *program.split()[1:]]
        ours = (ROOT / argv[2].split(".")[0] / "__init__.py") if argv[1] == "-m" else ROOT / argv[1]
        if not ours.exists():  # pytest, a model server's: not ours to check
            continue
        usage = help_text(*argv)
        problems += [f"{doc}: `{program} {rest}`: no {flag}" for flag in FLAG.findall(rest)
                     if not re.search(rf"(?<![\w-]){flag}\b", usage)]
    makefile = (ROOT / "Makefile").read_text()
    for doc, _, rest in shown_commands("make"):
        target = rest.split()[0] if rest.split() else ""
        if target and not re.search(rf"^{re.escape(target)}:", makefile, re.M):
            problems.append(f"{doc}: `make {rest}`: no target `{target}` in the Makefile")
    assert problems == []


# --- a real gateway -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("docs-examples")
    with running(start_mock(tmp)) as mock:
        policy = write_policy(tmp, {
            "name": "docs",
            "arms": {"one": {"backend": "mock-a"},
                     "vote": {"backend": "mock-a", "strategy": "self_consistency", "n": 3}},
            "routes": [{"name": "all", "candidates": ["one", "vote"]}],
            "exploration": {"share": 0.0},
            "overrides": {"policy_header": True, "strategy_header": ["single", "self_consistency"],
                          "task_header": ["legal-qa"]},
        })
        with running(start_gateway(tmp, {"backends": [mock_backend("mock-a", mock)], "policy": policy})) as gateway:
            yield gateway, mock


def chat(gateway, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(gateway.url + "/v1/chat/completions", headers=headers or {}, timeout=30,
                      json={"model": "auto", "messages": [{"role": "user", "content": "What is 2 + 3?"}]})


def documented_metrics() -> dict[str, tuple[str, set[str]]]:
    """docs/dashboard.md's metric table: name -> (type, labels)."""
    rows = re.findall(r"^\| `(ponder_\w+)` \| (\w+) \|([^|]*)\|", (ROOT / "docs" / "dashboard.md").read_text(), re.M)
    return {name: (kind, set(re.findall(r"`(\w+)`", labels))) for name, kind, labels in rows}


def declared_labels() -> dict[str, set[str]]:
    """Each metric's label names as gateway/metrics.py declares them (prometheus-client keeps them on the
    metric; a labelled metric with no sample yet shows none in the exposition)."""
    from prometheus_client.metrics import MetricWrapperBase

    from gateway.metrics import Metrics

    out = {}
    for metric in vars(Metrics()).values():
        if isinstance(metric, MetricWrapperBase):
            name = metric._name + ("_total" if metric._type == "counter" else "")
            out[name] = set(metric._labelnames)
    return out


def test_the_metric_table_is_what_metrics_exports(stack):
    gateway, _ = stack
    assert chat(gateway).status_code == 200
    text = httpx.get(gateway.url + "/metrics", timeout=10).text
    exported = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))
    documented = documented_metrics()
    assert sorted(set(exported) - set(documented)) == [], "exported by /metrics, missing from docs/dashboard.md"
    assert sorted(set(documented) - set(exported)) == [], "in docs/dashboard.md's table, not exported by /metrics"
    labels = declared_labels()
    assert set(labels) == set(exported)
    for name, (kind, doc_labels) in documented.items():
        assert kind == exported[name], f"{name}: docs/dashboard.md says {kind}, /metrics says {exported[name]}"
        assert doc_labels == labels[name], f"{name}: docs/dashboard.md's labels {sorted(doc_labels)}, " \
                                           f"the gateway's {sorted(labels[name])}"


def test_every_metric_the_docs_name_is_exported_with_those_labels():
    """Prose and queries too: `ponder_errors_total{status="499"}`, `..._bucket`, `{key_id, limit}`."""
    labels = declared_labels()
    histograms = {name for name, (kind, _) in documented_metrics().items() if kind == "histogram"}
    problems = []
    for doc, text in doc_texts().items():
        for name, selector in re.findall(r"\b(ponder_[a-z_]+)(\{[^}]*\})?", text):
            base = next((h for h in histograms if name in (h, h + "_bucket", h + "_count", h + "_sum")), name)
            if base not in labels:
                if not (name.endswith("_gateway") and doc.startswith("deploy")):
                    problems.append(f"{doc}: {name} is no metric /metrics exports")
                continue
            used = set(re.findall(r"(\w+)\s*(?:[=!]~?|,|\}|$)", selector.strip("{}"))) - {"le"} if selector else set()
            if used - labels[base]:
                problems.append(f"{doc}: {name}{selector}: {base} has no label {sorted(used - labels[base])}")
    assert problems == []


# --- routes ------------------------------------------------------------------------------------------

METHODS = "GET|POST|DELETE|PUT|PATCH"
ROUTE_MENTION = re.compile(rf"(\b(?:{METHODS})(?:`?/`?(?:{METHODS}))*)?`?\s*"
                           rf"(?<![\w./#-])(/(?:v1/|healthz|readyz|metrics|dashboard)[^\s`\[?,;)\"#]*|\.\.\./[\w/]+)")


def documented_routes() -> list[tuple[str, str | None, str]]:
    """(doc, method or None, path) for every gateway path the docs name, `{x}` placeholders filled in."""
    out = []
    for doc, text in doc_texts().items():
        for line in text.splitlines():
            last = None
            for methods, path in ROUTE_MENTION.findall(line):
                if path.startswith("..."):  # `POST .../cancel`: relative to the path before it
                    if last is None:
                        continue
                    path = last.rstrip("/") + path[3:]
                path = re.sub(r"\{[^}/]*\}?", "x", path.rstrip("."))
                last = path
                for method in re.findall(METHODS, methods) or [None]:
                    out.append((doc, method, path))
    return out


def route_matches(route, method: str | None, path: str) -> bool:
    if path.endswith("/*"):  # `/v1/ponder/*`: any route under it
        return route.path.startswith(path[:-1])
    match, _ = route.matches({"type": "http", "path": path, "method": method or next(iter(route.methods))})
    return match == Match.FULL if method else match != Match.NONE


def test_every_route_the_docs_name_is_served_and_every_route_is_documented():
    from gateway.app import routes

    table = routes()
    mentioned = documented_routes()
    assert len(mentioned) >= 30
    unknown = [f"{doc}: {method or ''} {path}".replace(":  ", ": ") for doc, method, path in mentioned
               if not any(route_matches(route, method, path) for route in table)]
    assert unknown == [], "paths the docs name that the gateway does not serve (with that method)"
    undocumented = [f"{method} {route.path}" for route in table for method in sorted(route.methods - {"HEAD"})
                    if not any(route_matches(route, m, p) for _, m, p in mentioned if m in (method, None))]
    assert undocumented == [], "routes no doc names"


# --- headers -----------------------------------------------------------------------------------------

def documented_headers() -> set[str]:
    names = set()
    for text in doc_texts().values():
        names |= {name.lower() for name in re.findall(r"\b(x-ponder-[a-z-]*[a-z])\b", text, re.I)}
    return names


def test_every_ponder_header_the_docs_name_is_sent_or_read(stack):
    gateway, _ = stack
    documented = documented_headers()
    answer = chat(gateway)
    sent = {name for name in answer.headers if name.startswith("x-ponder-")}
    assert sent <= documented, f"sent, not documented: {sorted(sent - documented)}"
    read = documented - sent
    # A header the gateway reads is one whose bad value it refuses, naming it (a renamed one is ignored).
    for name in sorted(read):
        refused = chat(gateway, {name: "NOT A VALID VALUE"})
        assert refused.status_code == 400, f"{name} (docs): the gateway does not read it ({refused.status_code})"
        error = refused.json()["error"]
        assert name in error["message"] or error["param"] == name, error
    assert read == {"x-ponder-max-cost-usd", "x-ponder-max-latency-ms", "x-ponder-strategy", "x-ponder-policy",
                    "x-ponder-task"} - sent
    # and nothing the code names is missing from the docs
    in_code = set()
    for path in [*ROOT.glob("gateway/*.py"), *ROOT.glob("router/*.py")]:
        in_code |= set(re.findall(r"[\"'](x-ponder-[a-z-]*[a-z])[\"']", path.read_text()))
    assert in_code - documented == set(), "x-ponder-* headers in the code that no doc names"


def test_the_readme_python_example_runs_as_written(stack):
    """README.md's "Use it from the openai SDK", with base_url pointed at the test gateway."""
    gateway, _ = stack
    block = re.search(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    code = block.replace("http://127.0.0.1:8000", gateway.url)
    assert code != block
    code += ("\nassert raw.headers['x-ponder-request-id'] == completion.id"
             "\nassert httpx.post(" + repr(gateway.url + "/v1/feedback") + ", json={'request_id': completion.id, "
             "'correct': True}).json()['status'] == 'duplicate'\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    # the headers' line, the usage and the `ponder` object, as the example prints them
    assert re.search(r"^mock-a/\S+ \w+ \d+\.\d+$", result.stdout, re.M), result.stdout  # x-ponder-cost-usd: a plain decimal
    assert "CompletionUsage(completion_tokens=" in result.stdout and "'strategy': " in result.stdout



# --- cross-references ------------------------------------------------------------------------------

def test_every_section_a_doc_points_to_exists():
    """`docs/policies.md, "Budgets"`: the page has a heading that starts with that name, as written (or a
    paragraph led by it in bold or as code, as api.md's `usage` paragraph is), so a renamed section
    leaves no dangling pointer."""
    texts = {Path(doc).name: text for doc, text in doc_texts().items()}
    problems = []
    for doc, text in doc_texts().items():
        for page, section in re.findall(r"\b([a-z]+\.md),? \"([^\"]+)\"", text):
            target = texts.get(page)
            section = " ".join(section.split())  # a pointer may wrap across lines
            name = r"\s+".join(map(re.escape, section.split()))
            if target is None or not re.search(rf"^(#+ {name}\b|\*\*{name}\b|`{name}`)", target, re.M):
                problems.append(f"{doc}: {page}, \"{section}\"")
        for section in re.findall(r"\"([A-Z][^\"\n]{2,60})\" (?:below|above)", text):  # ("Logs" below)
            if not re.search(rf"^(#+ {re.escape(section)}\b|\*\*{re.escape(section)}\b)", text, re.M):
                problems.append(f"{doc}: \"{section}\" below/above")
    assert problems == []


# --- error codes ---------------------------------------------------------------------------------------

# Codes no client sees from a running gateway: the answer to a client already gone (499, never sent), and
# guards for states `ponder serve` never serves in (its store and metrics start before the first request;
# a planned arm's backend is kept until its requests finish, docs/policies.md "Hot reload").
UNSEEN_CODES = {"client_closed", "store_unavailable", "metrics_unavailable", "backend_missing"}


def error_codes_in(source: str) -> set[str]:
    """The codes a module's source gives an error: every snake_case string in a `code=` argument or a
    `code = ...` assignment, a computed one's too (`code = "upstream_timeout" if ... else ...`)."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.keyword) and node.arg == "code":
            value = node.value
        elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "code" for t in node.targets):
            value = node.value
        else:
            continue
        attribute_names = {id(n.args[1]) for n in ast.walk(value) if isinstance(n, ast.Call)
                           and isinstance(n.func, ast.Name) and n.func.id == "getattr" and len(n.args) > 1}
        found |= {n.value for n in ast.walk(value) if isinstance(n, ast.Constant) and id(n) not in attribute_names
                  and isinstance(n.value, str) and re.fullmatch(r"[a-z]+(?:_[a-z]+)*", n.value)}
    return found


def test_every_error_code_the_gateway_answers_with_is_documented():
    """Apps branch on `error.code`: each one the gateway's code raises is named (as `code`) in a doc.
    Read from the syntax tree: a regex for `code="..."` missed the computed ones (`upstream_timeout`,
    the feedback refusals' codes, which are the store's statuses)."""
    from gateway.app import _FEEDBACK_STATUS

    raised = {code for code, status in _FEEDBACK_STATUS.items() if status >= 400}
    for path in [*ROOT.glob("gateway/*.py"), *ROOT.glob("router/*.py"), *ROOT.glob("telemetry/*.py")]:
        raised |= error_codes_in(path.read_text())
    assert len(raised) >= 20 and {"upstream_timeout", "method_not_allowed", "expired"} <= raised
    documented = set()
    for text in doc_texts().values():
        documented |= set(re.findall(r"`([a-z_]+)`", text))
    assert sorted(raised - documented - UNSEEN_CODES) == []
    assert UNSEEN_CODES <= raised, "a code listed as unseen is no longer raised: take it off the list"


# --- files -------------------------------------------------------------------------------------------

TOP_FOLDERS = "gateway|router|policies|telemetry|evals|bench|deploy|docs|tests|scripts"
REPO_PATH = re.compile(rf"(?:^|(?<=[\s(`\[]))((?:{TOP_FOLDERS})/[\w./-]*\w)")
# made at run time, or not a path in the repository: the bench's own venv (git-ignored), the compose
# stack's secrets file, kubectl's `deploy/NAME` (a Deployment, not a folder)
NOT_IN_REPO = {"bench/.litellm-venv", "deploy/.env", "deploy/ponder-gateway"}


def test_every_repository_file_the_docs_name_exists():
    """`router/features.py`, `deploy/k8s/...`, `tests/test_reliability.py`: a moved or renamed file leaves
    no doc pointing at nothing."""
    named = [(doc, path) for doc, text in doc_texts().items() for path in REPO_PATH.findall(text)]
    assert len(named) >= 50
    missing = [f"{doc}: {path}" for doc, path in named
               if path not in NOT_IN_REPO and not (ROOT / path).exists()]
    assert missing == []


# --- Python snippets ---------------------------------------------------------------------------------

def python_blocks() -> list[tuple[str, str]]:
    out = []
    for doc, text in doc_texts().items():
        out += [(doc, block) for block in re.findall(r"^ *```python\n(.*?)^ *```", text, re.M | re.S)]
    return out


def defining_module(name: str):
    """The module of router/, telemetry/ or gateway/ that defines class `name`, imported; None if none does."""
    import importlib

    for package in ("router", "telemetry", "gateway"):
        for path in sorted((ROOT / package).glob("*.py")):
            if re.search(rf"^class {name}\b", path.read_text(), re.M):
                return importlib.import_module(f"{package}.{path.stem}")
    return None


def test_the_docs_python_imports_and_dataclasses_are_the_codes():
    """Every `from M import N` a doc's Python shows imports, and a dataclass a doc spells out
    (strategies.md's VoteResult) has the fields of the real one, in order."""
    import dataclasses
    import importlib

    blocks = python_blocks()
    assert len(blocks) >= 4
    problems = []
    for doc, block in blocks:
        for module, names in re.findall(r"^from ([\w.]+) import ([\w, ]+)$", block, re.M):
            problems += [f"{doc}: from {module} import {name}" for name in map(str.strip, names.split(","))
                         if not hasattr(importlib.import_module(module), name)]
        for name, body in re.findall(r"^class (\w+):\n((?:    .*\n)+)", block, re.M):
            shown = re.findall(r"^    (\w+):", body, re.M)
            module = defining_module(name)
            real = [f.name for f in dataclasses.fields(getattr(module, name))] if module else None
            if shown != real:
                problems.append(f"{doc}: class {name} shows fields {shown}; the code's: {real}")
    assert problems == []
