"""Policy files: the shipped examples pass, broken ones fail with a message naming the problem and line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from policies.backends import BackendSpec
from policies.loader import SCHEMA_PATH, check_cli, json_schema_text, load_policy, parse_policy
from policies.schema import EffortName, Policy, PolicyError, StrategyName, TaskName, TierName
from router.types import DIFFICULTY_TIERS, EFFORTS, STRATEGIES, TASK_TYPES

POLICY_DIR = Path(__file__).resolve().parents[1] / "policies"
SHIPPED = sorted(POLICY_DIR.glob("*.yaml"))

BASE = """\
name: t
backends:
  - name: cheap
    model: openai/gpt-4.1-mini
    prices: {input_per_mtok: 0.4, output_per_mtok: 1.6}
  - name: thinker
    model: openai/o4-mini
    reasoning: true
    efforts: [low, high]
arms:
  fast:
    backend: cheap
  deep:
    backend: thinker
    effort: high
routes:
  - name: all
    candidates: {fast: 0.8, deep: 0.9}
"""


def test_expected_examples_are_shipped():
    names = {path.name for path in SHIPPED}
    assert {"local.yaml", "openai-mix.yaml", "multi-provider.yaml", "vllm-local.yaml", "cost-saver.yaml",
            "quality-first.yaml"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_policy_passes_check(path, capsys):
    policy = load_policy(path)
    assert policy.routes and policy.arms
    assert check_cli([str(path)]) == 0
    out = capsys.readouterr().out
    assert f"{path}: OK" in out and "routes" in out and "budgets" in out


def test_schema_words_match_router_vocabulary():
    assert set(StrategyName.__args__) == set(STRATEGIES)
    assert set(EffortName.__args__) == set(EFFORTS)
    assert set(TaskName.__args__) == set(TASK_TYPES)
    assert set(TierName.__args__) == {name for name, _ in DIFFICULTY_TIERS}


def test_shipped_json_schema_is_in_sync():
    assert SCHEMA_PATH.read_text() == json_schema_text(), "run: python -c 'from policies.loader import " \
        "write_json_schema; write_json_schema()'"
    schema = json.loads(SCHEMA_PATH.read_text())
    assert schema["additionalProperties"] is False
    assert {"name", "arms", "routes"} <= set(schema["required"])


def test_base_policy_is_valid():
    policy = parse_policy(BASE, "base.yaml")
    assert isinstance(policy, Policy)
    assert list(policy.arms) == ["fast", "deep"]


def replace(old: str, new: str, text: str = BASE) -> str:
    assert old in text, old
    return text.replace(old, new, 1)


# (id, broken YAML, substring the message must contain, the marker text on the line it must name)
# The marker is a fragment unique to the line the error should point at; None skips the line check.
BROKEN = [
    ("wrong-type-int", replace("    effort: high\n", "    effort: high\n    n: five\n"), "valid integer", "n: five"),
    ("wrong-type-float", BASE + "objective:\n  cost_weight: cheap\n", "valid number", "cost_weight: cheap"),
    ("infinite-number", BASE + "objective:\n  cost_weight: .inf\n", "finite number", "cost_weight: .inf"),
    ("unknown-top-key", BASE + "colour: blue\n", "unknown key `colour`; expected one of: name", "colour: blue"),
    ("unknown-arm-key", replace("    backend: cheap\n", "    backend: cheap\n    strateg: cot\n"),
     "unknown key `strateg`; did you mean `strategy`? expected one of: backend, strategy", "strateg: cot"),
    ("misspelt-section", BASE + "objectve:\n  cost_weight: 5\n", "unknown key `objectve`; did you mean `objective`?",
     "objectve:"),
    ("unknown-backend-key", replace("    reasoning: true\n", "    reasoning: true\n    thinking: yes\n"),
     "unknown key `thinking`", "thinking: yes"),
    ("unknown-backend", replace("    backend: cheap\n", "    backend: nope\n"), "unknown backend `nope`",
     "backend: nope"),
    ("unsupported-effort", replace("    effort: high\n", "    effort: medium\n"),
     "does not support effort `medium`; expected one of: low, high", "effort: medium"),
    ("effort-on-plain-model", replace("    backend: cheap\n", "    backend: cheap\n    effort: low\n"),
     "does not support effort `low`", "effort: low"),
    ("invalid-effort-word", replace("    effort: high\n", "    effort: extreme\n"), "'minimal'", "effort: extreme"),
    ("bad-strategy", replace("    backend: cheap\n", "    backend: cheap\n    strategy: majority\n"),
     "'self_consistency'", "strategy: majority"),
    ("negative-budget", BASE + "budgets:\n  per_request_usd: -1\n", "greater than or equal to 0",
     "per_request_usd: -1"),
    ("negative-degrade", BASE + "budgets:\n  degrade:\n    below_usd: -5\n", "greater than or equal to 0",
     "below_usd: -5"),
    ("daily-over-monthly", BASE + "budgets:\n  per_key_daily_usd: 10\n  per_key_monthly_usd: 5\n",
     "daily budget exceeds the monthly", "per_key_daily_usd: 10"),
    ("empty-routes", BASE.split("routes:")[0] + "routes: []\n", "no routes", "routes: []"),
    ("degrade-without-threshold", BASE + "budgets:\n  per_key_daily_usd: 5\n  degrade: {max_cost_usd: 0.001}\n",
     "has no effect without `below_usd`", "degrade: {max_cost_usd"),
    ("route-without-candidates", replace("candidates: {fast: 0.8, deep: 0.9}", "candidates: {}"),
     "no candidate arms", "candidates: {}"),
    ("route-unknown-arm", replace("{fast: 0.8, deep: 0.9}", "{fast: 0.8, ghost: 0.9}"), "unknown arm `ghost`",
     "ghost: 0.9"),
    ("prior-out-of-range", replace("{fast: 0.8, deep: 0.9}", "{fast: 1.5, deep: 0.9}"), "less than or equal to 1",
     "fast: 1.5"),
    ("routes-leave-gap", replace("  - name: all\n", "  - name: all\n    when: {tasks: [math]}\n"),
     "no route matches code:easy", "routes:"),
    ("route-bad-task", replace("  - name: all\n", "  - name: all\n    when: {tasks: [poetry]}\n"), "'math'",
     "poetry"),
    ("route-bad-range", replace("  - name: all\n", "  - name: all\n    when: {difficulty: [0.8, 0.2]}\n"),
     "is not [low, high)", "difficulty: [0.8"),
    # first match wins: a route after a catch-all, or one whose `tasks` list is empty, is never used
    ("route-after-catch-all", BASE + "  - name: math-only\n    when: {tasks: [math]}\n    candidates: [deep]\n",
     "route `math-only` can never match: the routes before it match every request", "- name: math-only"),
    ("route-with-no-tasks", replace("routes:\n", "routes:\n  - name: nothing\n    when: {tasks: []}\n"
                                    "    candidates: [deep]\n"), "its `tasks` list is empty", "- name: nothing"),
    # a backend's name as `model` is that backend (or a 404): an alias of the same name is never used
    ("alias-named-like-a-backend", BASE + "aliases:\n  cheap: {arms: [deep]}\n", "alias `cheap` has the name of a "
     "backend", "cheap: {arms: [deep]}"),
    ("backend-named-auto", replace("  - name: cheap\n", "  - name: auto\n").replace("backend: cheap", "backend: auto"),
     "alias `auto` has the name of a backend", "- name: auto"),
    ("yaml-unclosed-bracket", replace("efforts: [low, high]", "efforts: [low, high"), "YAML syntax error", None),
    ("yaml-bad-indent", replace("    backend: cheap\n", "    backend: cheap\n   strategy: cot\n"),
     "YAML syntax error", "strategy: cot"),
    ("yaml-tab", replace("    backend: cheap\n", "\tbackend: cheap\n"), "(a tab: YAML takes spaces only)",
     "backend: cheap"),
    # a key that overrides one merged in from an anchor is the point of `<<`; a key written twice is not
    ("duplicate-key-beside-a-merge", replace("  deep:\n", "  deep: &deep\n") + "  - name: other\n"
     "    candidates: {fast: 0.5}\n    when: {tasks: [math]}\n    when: {tasks: [code]}\n", "appears twice",
     "when: {tasks: [code]}"),
    ("duplicate-key", replace("    effort: high\n", "    effort: high\n    effort: low\n"), "appears twice",
     "effort: low"),
    ("missing-backend", replace("  fast:\n    backend: cheap\n", "  fast:\n    strategy: cot\n"),
     "missing required key `backend`", "  fast:"),
    ("missing-name", BASE.replace("name: t\n", "", 1), "missing required key `name`", None),
    ("cascade-cycle",
     replace("  deep:\n", "  a:\n    backend: cheap\n    strategy: cascade\n    stages: [b]\n"
             "  b:\n    backend: thinker\n    effort: low\n    strategy: cascade\n    stages: [a]\n  deep:\n"),
     "cascade stages form a cycle: a -> b -> a", "stages: [a]"),
    ("cascade-without-stages", replace("    backend: cheap\n", "    backend: cheap\n    strategy: cascade\n"),
     "needs `stages`", "  fast:"),
    ("cascade-unknown-stage",
     replace("    backend: cheap\n", "    backend: cheap\n    strategy: cascade\n    stages: [nowhere]\n"),
     "unknown arm `nowhere`", "stages: [nowhere]"),
    ("vote-of-one", replace("    backend: cheap\n", "    backend: cheap\n    strategy: self_consistency\n"),
     "needs n >= 2", "  fast:"),
    ("single-with-n", replace("    backend: cheap\n", "    backend: cheap\n    n: 3\n"), "takes one sample", "n: 3"),
    ("knob-for-other-strategy", replace("    backend: cheap\n", "    backend: cheap\n    wave: 2\n"),
     "applies to strategy adaptive_consistency only", "wave: 2"),
    ("gate-for-other-strategy", replace("    backend: cheap\n", "    backend: cheap\n    sample_value: 0.0\n"),
     "applies to strategy adaptive_consistency only", "sample_value: 0.0"),
    ("unknown-verifier",
     replace("    backend: cheap\n", "    backend: cheap\n    strategy: best_of_n\n    n: 4\n    verifier: judge\n"),
     "unknown backend `judge`", "verifier: judge"),
    ("same-arm-twice", replace("  deep:\n", "  fast-again:\n    backend: cheap\n  deep:\n"),
     "same backend/effort/strategy/n as arm `fast`", "fast-again:"),
    ("alias-unknown-arm", BASE + "aliases:\n  auto-cheap:\n    arms: [fast, slowpoke]\n", "unknown arm `slowpoke`",
     "arms: [fast, slowpoke]"),
    ("exploration-share-over-1", BASE + "exploration:\n  share: 2\n", "less than or equal to 1", "share: 2"),
    ("bad-price", replace("output_per_mtok: 1.6", "output_per_mtok: lots"), "valid number", "output_per_mtok: lots"),
    ("backend-declared-twice",
     replace("arms:\n", "  - name: cheap\n    model: openai/gpt-4.1-nano\narms:\n"), "declared twice", None),
    # an outcome window was never kept by the store (decayed sums only): refused, not silently ignored
    ("learner-window", BASE + "learner:\n  half_life_hours: 24\n  window: 100\n", "unknown key `window`", "window:"),
    ("bad-override-strategy", BASE + "overrides:\n  strategy_header: [mcts]\n", "'cascade'", "mcts"),
    # a provider bills it, and it was counted as $0: budgets and cost caps never held
    ("unpriced-provider-model", replace("    model: openai/o4-mini\n", "    model: openai/o4-mini-2099\n"),
     "litellm's cost map has no price for `openai/o4-mini-2099`", "model: openai/o4-mini-2099"),
    # looked up as a variable named `$OPENAI_API_KEY`, never set: every call was unauthorised
    ("api-key-env-with-dollar", replace("    model: openai/o4-mini\n", "    model: openai/o4-mini\n    api_key_env: $OPENAI_KEY\n"),
     "the variable's name without `$`: `api_key_env: OPENAI_KEY`", "api_key_env: $OPENAI_KEY"),
    # YAML 1.1 reads on/off/yes/no as booleans: the message was `aliases[1].[key]: Input should be a valid string`
    ("key-read-as-boolean", BASE + "aliases:\n  auto: {}\n  on: {arms: [fast]}\n",
     "aliases.on: YAML reads the key `on` as a boolean, not a name: quote it", "  on: {arms"),
    ("empty-file", "", "empty policy", None),
    ("top-level-list", "- name: t\n", "expected a mapping", None),
]


@pytest.mark.parametrize("case_id,text,expected,marker", BROKEN, ids=[case[0] for case in BROKEN])
def test_broken_policy_names_problem_and_line(case_id, text, expected, marker):
    with pytest.raises(PolicyError) as caught:
        parse_policy(text, "broken.yaml")
    message = str(caught.value)
    assert expected in message, message
    assert message.startswith("broken.yaml:"), message
    lines = [problem[1] for problem in caught.value.problems]
    assert all(line is not None for line in lines), message
    if marker is not None:
        want = next(number for number, line in enumerate(text.splitlines(), 1) if marker in line)
        assert want in lines, f"expected line {want} ({marker!r}) in: {message}"
        assert f"broken.yaml:{want}:" in message


def test_a_model_without_a_price_is_served_where_its_price_is_known_or_its_server_is_our_own():
    """The unpriced refusal is for a provider's own endpoint only: declared prices, or an api_base (a
    self-hosted server: zero unless priced), load."""
    unknown = replace("    model: openai/o4-mini\n", "    model: openai/o4-mini-2099\n")
    priced = replace("    reasoning: true\n", "    reasoning: true\n    prices: {input_per_mtok: 1, output_per_mtok: 4}\n", unknown)
    assert parse_policy(priced, "p.yaml").backend("thinker").prices.output_per_mtok == 4
    hosted = replace("    reasoning: true\n", "    reasoning: true\n    api_base: http://127.0.0.1:8000/v1\n", unknown)
    assert parse_policy(hosted, "p.yaml").backend("thinker").prices is None
    # the gateway config's backend of that name wins, and is checked there
    assert parse_policy(unknown, "p.yaml", [BackendSpec(name="thinker", model="openai/o4-mini", reasoning=True,
                                                          efforts=["low", "high"])])


def test_a_local_providers_model_without_a_price_is_served():
    """Ollama, a llamafile, LM Studio and vLLM run on the operator's machine by litellm's default, with no
    api_base to declare: `ollama/llama3.2` (not in the cost map) was refused as a provider's unpriced
    model, though nobody bills its calls. It is served at zero, as a server behind an api_base is."""
    for model in ("ollama/llama3.2", "ollama_chat/llama3.1", "llamafile/mistral-7b", "lm_studio/qwen2.5-7b"):
        text = replace("    model: openai/gpt-4.1-mini\n    prices: {input_per_mtok: 0.4, output_per_mtok: 1.6}\n",
                       f"    model: {model}\n")
        assert parse_policy(text, "p.yaml").backend("cheap").model == model


@pytest.mark.parametrize("model,priced_as", [
    ("bedrock/converse/anthropic.claude-3-5-sonnet-20240620-v1:0", "anthropic.claude-3-5-sonnet-20240620-v1:0"),
    ("openrouter/openai/gpt-4.1-mini", "gpt-4.1-mini"),
])
def test_an_unpriced_model_the_map_prices_behind_a_prefix_is_told_the_line_to_add(model, priced_as):
    """A policy that loaded yesterday is refused on upgrade where its model is litellm's route or a
    reseller's spelling of one the map prices (`bedrock/converse/...`, `openrouter/openai/...`): the
    refusal said `prices: {input_per_mtok: ..., ...}`; it now gives the line, and that line loads."""
    from policies.loader import resolve_prices

    text = replace("    model: openai/gpt-4.1-mini\n    prices: {input_per_mtok: 0.4, output_per_mtok: 1.6}\n",
                   f"    model: {model}\n")
    with pytest.raises(PolicyError) as refused:
        parse_policy(text, "p.yaml")
    known = resolve_prices(BackendSpec(name="x", model=priced_as))
    assert known[1] == "litellm cost map"
    line = (f"prices: {{input_per_mtok: {round(known[0].input_per_mtok, 6):g}, "
            f"output_per_mtok: {round(known[0].output_per_mtok, 6):g}}}")
    assert f"the map prices `{priced_as}` so; if that is what this model costs you, add `{line}`" in str(refused.value)
    fixed = parse_policy(replace(f"    model: {model}\n", f"    model: {model}\n    {line}\n", text), "p.yaml")
    assert fixed.backend("cheap").prices.input_per_mtok == pytest.approx(known[0].input_per_mtok)


def test_yaml_anchors_and_merge_keys_may_share_settings_between_arms():
    """`<<: *anchor` with a key of its own overriding the merged one is how YAML shares settings; the
    duplicate-key check ran on the node tree after merging, so every override was refused as a key
    written twice. A misspelt key beside a merge is still refused, on its own line."""
    text = replace("  deep:\n    backend: thinker\n    effort: high\n",
                   "  deep: &deep\n    backend: thinker\n    effort: high\n    tokens: 3000\n"
                   "  shallow:\n    <<: *deep\n    effort: low\n")
    policy = parse_policy(text, "anchors.yaml")
    assert policy.arms["shallow"].effort == "low" and policy.arms["shallow"].tokens == 3000
    misspelt = text.replace("    effort: low\n", "    efort: low\n")
    line = misspelt.splitlines().index("    efort: low") + 1
    with pytest.raises(PolicyError) as caught:
        parse_policy(misspelt, "anchors.yaml")
    assert str(caught.value).startswith(f"anchors.yaml:{line}: arms.shallow.efort: unknown key `efort`; did you mean `effort`?")


def test_a_route_shadowed_in_the_policy_order_may_serve_an_alias_or_a_task_label():
    """A route is dead only where no alias's `routes` order and no client task label can reach it."""
    shadowed = BASE + "  - name: math-only\n    when: {tasks: [math]}\n    candidates: [deep]\n"
    with pytest.raises(PolicyError, match="`math-only` can never match"):
        parse_policy(shadowed, "p.yaml")
    parse_policy(shadowed + "aliases:\n  auto-math:\n    routes: [math-only, all]\n", "p.yaml")
    # after routes for every task type, a route without `tasks` still serves the labels of x-ponder-task
    tasks = ", ".join(TASK_TYPES)
    labelled = replace("  - name: all\n", f"  - name: typed\n    when: {{tasks: [{tasks}]}}\n    candidates: [fast]\n"
                                           "  - name: all\n")
    tiered = labelled.replace("  - name: all\n", "  - name: hard\n    when: {tiers: [hard]}\n    candidates: [deep]\n"
                                                 "  - name: all\n")
    with pytest.raises(PolicyError, match="`hard` can never match"):
        parse_policy(tiered, "p.yaml")
    parse_policy(tiered + "overrides:\n  task_header: [legal-qa]\n", "p.yaml")
    # a catch-all after routes that cover everything is a safety net, not a mistake
    assert parse_policy(labelled, "p.yaml").routes[-1].name == "all"
    # difficulty ranges are compared exactly, not on a grid: a narrow window that is reachable passes
    narrow = replace("  - name: all\n", "  - name: sliver\n    when: {difficulty: [0.305, 0.309]}\n"
                                         "    candidates: [deep]\n  - name: all\n")
    assert parse_policy(narrow, "p.yaml").routes[0].name == "sliver"


def test_enough_broken_cases():
    assert len(BROKEN) >= 20


def test_error_names_key_path():
    with pytest.raises(PolicyError) as caught:
        parse_policy(replace("    effort: high\n", "    effort: medium\n"), "p.yaml")
    assert "p.yaml:15: arms.deep.effort:" in str(caught.value)
    with pytest.raises(PolicyError) as caught:
        parse_policy(replace("{fast: 0.8, deep: 0.9}", "{fast: 0.8, ghost: 0.9}"), "p.yaml")
    assert "routes[0].candidates.ghost" in str(caught.value)


def test_several_mistakes_are_reported_together():
    text = replace("    backend: cheap\n", "    backend: nope\n", replace("    effort: high\n", "    effort: medium\n"))
    with pytest.raises(PolicyError) as caught:
        parse_policy(text, "p.yaml")
    assert len(caught.value.problems) == 2


def test_gateway_backends_resolve_and_override_inline():
    text = replace("    backend: cheap\n", "    backend: gateway-only\n")
    with pytest.raises(PolicyError, match="unknown backend `gateway-only`"):
        parse_policy(text, "p.yaml")
    extra = [
        BackendSpec(name="gateway-only", model="openai/gpt-4.1-nano"),
        BackendSpec(name="thinker", model="openai/o4-mini", api_base="http://10.0.0.1/v1", reasoning=True,
                    efforts=["low", "high"]),
    ]
    policy = parse_policy(text, "p.yaml", extra)
    assert policy.backend("gateway-only") is not None
    assert policy.backend("thinker").api_base == "http://10.0.0.1/v1"  # the deployment's declaration wins
    # ... and the effort check runs against the winning declaration
    narrow = [BackendSpec(name="thinker", model="openai/o4-mini", reasoning=True, efforts=["low"])]
    with pytest.raises(PolicyError, match="does not support effort `high`"):
        parse_policy(BASE, "p.yaml", narrow)


def test_local_policy_uses_the_gateway_local_backend():
    gateway_local = BackendSpec(name="local", model="openai/smollm2", api_base="http://127.0.0.1:45678/v1")
    policy = load_policy(POLICY_DIR / "local.yaml", [gateway_local])
    assert policy.backend("local").api_base == "http://127.0.0.1:45678/v1"
    strategies = {arm.strategy for arm in policy.arms.values()}
    assert {"single", "self_consistency", "adaptive_consistency"} <= strategies


def test_route_candidates_may_be_a_list_of_names():
    policy = parse_policy(replace("candidates: {fast: 0.8, deep: 0.9}", "candidates: [fast, deep]"), "p.yaml")
    assert policy.routes[0].candidates == {"fast": None, "deep": None}


def test_adaptive_gate_knobs_reach_the_strategy():
    """`min_gain` and a fixed `sample_value` are arm knobs: compiled into the arm's params, which the
    adaptive strategy reads (gateway/strategies.py), and absent when the policy does not set them."""
    from router.estimates import compile_policy

    text = BASE.replace("  deep:\n", "  vote:\n    backend: cheap\n    strategy: adaptive_consistency\n    n: 8\n"
                                       "    min_gain: 0.03\n    sample_value: 0.0\n"
                                       "  vote-learned:\n    backend: cheap\n    strategy: adaptive_consistency\n"
                                       "    n: 6\n  deep:\n")
    compiled = compile_policy(parse_policy(text, "gate.yaml"))
    params = {c.arm.n: dict(c.arm.params) for c in compiled.arms.values() if c.strategy == "adaptive_consistency"}
    assert params[8] == {"min_gain": 0.03, "sample_value": 0.0}
    assert "sample_value" not in params[6] and "min_gain" not in params[6]


def test_check_cli_reports_failures(tmp_path, capsys):
    good = tmp_path / "good.yaml"
    good.write_text(BASE)
    bad = tmp_path / "bad.yaml"
    bad.write_text(replace("    backend: cheap\n", "    backend: nope\n"))
    assert check_cli([str(good)]) == 0
    assert check_cli([str(good), str(bad)]) == 1
    captured = capsys.readouterr()
    assert f"{bad}:12: arms.fast.backend: unknown backend `nope`" in captured.err
    assert "FAILED (1 problem)" in captured.err
    assert check_cli([str(tmp_path / "missing.yaml")]) == 1
    assert "cannot read" in capsys.readouterr().err


def test_check_cli_reads_gateway_config_backends(tmp_path, capsys):
    policy = tmp_path / "p.yaml"
    policy.write_text(replace("    backend: cheap\n", "    backend: gateway-only\n"))
    config = tmp_path / "gateway.yaml"
    config.write_text("backends:\n  - name: gateway-only\n    model: openai/gpt-4.1-nano\n")
    assert check_cli([str(policy)]) == 1
    assert check_cli(["--config", str(config), str(policy)]) == 0
    assert "gateway-only" in capsys.readouterr().out


def test_ponder_policy_check_config_offers_the_managed_local_model_as_serving_does(tmp_path, capsys):
    """The gateway serves its managed local model as backend `local` (unless the config disables it):
    a policy naming it without declaring it passes `ponder policy check --config` as it serves, and a
    `local` declared inline is replaced by the gateway's, as in serving (it failed the check, and the
    inline one was shown)."""
    from gateway.cli import main

    policy = tmp_path / "p.yaml"
    policy.write_text(replace("    backend: cheap\n", "    backend: local\n"))
    config = tmp_path / "gateway.yaml"
    config.write_text("policy: p.yaml\nlocal_model: {n_ctx: 4096}\n")
    assert main(["policy", "check", "--config", str(config), str(policy)]) == 0
    assert "max output 4096 tokens (declared)" in capsys.readouterr().out  # the gateway's n_ctx
    shipped = main(["policy", "check", "--config", str(config), str(POLICY_DIR / "local.yaml")])
    assert shipped == 0 and "@ http://127.0.0.1:8080/v1" not in capsys.readouterr().out
    config.write_text("policy: p.yaml\nlocal_model: {enabled: false}\n")
    assert main(["policy", "check", "--config", str(config), str(policy)]) == 1
    assert "unknown backend `local`" in capsys.readouterr().err
    config.write_text("policy: p.yaml\nlocal_model: {n_ctx: -1}\n")
    assert main(["policy", "check", "--config", str(config), str(policy)]) == 1
    assert f"{config}:2: local_model.n_ctx: Input should be greater than 0 (got -1)" in capsys.readouterr().err


def test_policy_check_with_a_config_alone_checks_the_policies_it_serves_together(tmp_path, capsys):
    """`ponder policy check a.yaml b.yaml` checks each file alone, so a CI passed two policies that
    `ponder serve` then refused to serve together (an inline backend declared differently, two files of
    one name). `--config GW.yaml` alone loads its `policy` and `extra_policies` as the gateway does: what
    serve refuses fails the check (every file's problems, file:line: key), what serve only logs is a
    warning. The plain form still checks unrelated files each alone."""
    from gateway.cli import main
    from gateway.config import ConfigError, load_config
    from gateway.service import Gateway

    text = ("name: {name}\nbackends: [{{name: fast, model: openai/{model}, prices: {{input_per_mtok: 1, output_per_mtok: 2}}}}]\n"
            "arms: {{one: {{backend: fast}}}}\nroutes: [{{name: all, candidates: [one]}}]\n{extra}")
    a, b, c = tmp_path / "a.yaml", tmp_path / "b.yaml", tmp_path / "c.yaml"
    a.write_text(text.format(name="a", model="gpt-4.1-mini", extra=""))
    b.write_text(text.format(name="b", model="gpt-4.1-nano", extra=""))
    c.write_text(text.format(name="a", model="gpt-4.1-mini", extra=""))
    config = tmp_path / "gateway.yaml"
    config.write_text(f"policy: a.yaml\nextra_policies: {{b: b.yaml, c: {c}}}\nextra_policy: {{d: d.yaml}}\n")
    assert main(["policy", "check", "--quiet", "--config", str(config)]) == 1
    assert f"{config}:3: extra_policy: unknown key `extra_policy`; did you mean `extra_policies`?" in capsys.readouterr().err
    config.write_text(f"policy: a.yaml\nextra_policies: {{b: b.yaml, c: {c}}}\nlocal_model: {{enabled: false}}\n")

    assert main(["policy", "check", "--quiet", str(a), str(b), str(c)]) == 0  # unrelated files: each alone
    capsys.readouterr()
    with pytest.raises(ConfigError) as refused:  # what `ponder serve` says before it starts
        Gateway.check(load_config(config))
    assert main(["policy", "check", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert f"{config}: FAILED (2 problems)" in err
    assert f"{b}:2: backends[0]: backend `fast` differs from the one policy `a` ({a}) declares" in err
    assert f"{c}: name: 'a' is already the name of the policy in {a}" in err
    assert str(refused.value) in err  # the same problems, all of them, in serve's refusal too

    b.write_text(text.format(name="b", model="gpt-4.1-mini", extra=""))
    c.write_text(text.format(name="c", model="gpt-4.1-mini", extra=""))
    assert main(["policy", "check", "--config", str(config)]) == 0
    out, err = capsys.readouterr()
    assert f"{a}: OK\npolicy `a`" in out and f"{b}: OK" in out and f"{c}: OK" in out
    assert err == f"{config}: warning: policies b, c cannot be picked: the default policy 'a' does not honour " \
                  "x-ponder-policy (overrides.policy_header: false), so every request gets 'a'\n"
    a.write_text(text.format(name="a", model="gpt-4.1-mini", extra="overrides: {policy_header: true}\n"))
    assert main(["policy", "check", "--quiet", "--config", str(config)]) == 0
    assert capsys.readouterr() == (f"{a}: OK\n{b}: OK\n{c}: OK\n", "")
    with pytest.raises(SystemExit) as usage:  # neither a FILE nor a config: what to give is said
        main(["policy", "check"])
    assert usage.value.code == 2 and "or --config GW.yaml for the policies it serves" in capsys.readouterr().err


def test_bare_policy_check_checks_the_config_in_ponder_config_as_serve_does(tmp_path, monkeypatch, capsys):
    """In the image ($PONDER_CONFIG=/etc/ponder/gateway.yaml) `ponder serve` and `ponder stats` read that
    config; a bare `ponder policy check` was a usage error. With no FILE it now checks what that config
    serves; FILEs given are still checked alone (the env does not bring in a config's backends)."""
    from gateway.cli import main

    policy = tmp_path / "mine.yaml"
    policy.write_text("name: mine\nbackends: [{name: fast, model: openai/gpt-4.1-mini}]\n"
                      "arms: {one: {backend: fast}}\nroutes: [{name: all, candidates: [one]}]\n")
    config = tmp_path / "gateway.yaml"
    config.write_text("policy: mine.yaml\nlocal_model: {enabled: false}\n")
    monkeypatch.delenv("PONDER_CONFIG", raising=False)
    with pytest.raises(SystemExit) as usage:
        main(["policy", "check", "--quiet"])
    assert usage.value.code == 2 and "$PONDER_CONFIG, unset" in capsys.readouterr().err
    monkeypatch.setenv("PONDER_CONFIG", str(config))
    assert main(["policy", "check", "--quiet"]) == 0
    assert capsys.readouterr() == (f"{policy}: OK\n", "")
    config.write_text("policy: mine.yaml\nlocal_model: {enabled: false}\npolicyy: x\n")
    assert main(["policy", "check", "--quiet"]) == 1
    assert f"{config}: FAILED" in capsys.readouterr().err
    assert main(["policy", "check", "--quiet", str(policy)]) == 0  # a FILE: checked alone, env unread


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_check_summary_shows_the_cost_the_decision_checks_caps_against(path):
    """The summary's cost per arm is the cost model's (a vote's every sample paying the prompt, a
    best-of-N judge, a cascade's stages): an operator sets max_cost_usd from it. Its own rough formula
    was off by up to 35% (a best-of-4 shown at $0.045 was estimated at $0.060 by decide())."""
    from policies.loader import SUMMARY_PROMPT_TOKENS, summarize
    from router.estimates import compile_policy

    policy = load_policy(path)
    compiled = compile_policy(policy)
    shown = {line.split()[0]: line.rsplit("~$", 1)[1] for line in summarize(policy).splitlines()
             if line.startswith("  ") and "out tokens/sample" in line}
    assert shown.keys() == policy.arms.keys()
    for name, arm in compiled.arms.items():
        assert shown[name] == f"{compiled.estimated_cost_usd(arm.key, SUMMARY_PROMPT_TOKENS, None):.5f}", name


def test_prices_default_to_litellm_cost_map():
    from policies.loader import resolve_prices

    prices, origin = resolve_prices(BackendSpec(name="x", model="openai/gpt-4.1-mini"))
    assert origin == "litellm cost map"
    assert prices.input_per_mtok == pytest.approx(0.4) and prices.output_per_mtok == pytest.approx(1.6)
    prices, origin = resolve_prices(BackendSpec(name="x", model="openai/smollm2"))
    assert (prices.input_per_mtok, origin) == (0.0, "unknown: zero")
    # Anthropic's prompt cache: reads at 0.1x the input price, writes at 1.25x
    prices, _ = resolve_prices(BackendSpec(name="x", model="anthropic/claude-sonnet-4-5"))
    assert (prices.cached_input_per_mtok, prices.cache_write_input_per_mtok) == (pytest.approx(0.3), pytest.approx(3.75))


def test_context_windows_default_to_litellms_model_map_for_a_providers_own_endpoint():
    from policies.loader import resolve_max_context

    assert resolve_max_context(BackendSpec(name="x", model="openai/gpt-4.1-mini")) == (1047576, "litellm model map")
    assert resolve_max_context(BackendSpec(name="x", model="anthropic/claude-sonnet-4-5"))[0] == 200000
    # a server of one's own (an api_base) is as its operator set it up: no limit unless declared
    assert resolve_max_context(BackendSpec(name="x", model="openai/gpt-4.1-mini", api_base="http://127.0.0.1:1/v1")) \
        == (None, "unknown: no limit")
    assert resolve_max_context(BackendSpec(name="x", model="openai/smollm2")) == (None, "unknown: no limit")
    assert resolve_max_context(BackendSpec(name="x", model="openai/smollm2", max_context=2048)) == (2048, "declared")


def test_maximum_output_defaults_to_litellms_model_map_for_a_providers_own_endpoint():
    """What a key with a budget holds per call without max_tokens (docs/policies.md, Budgets)."""
    from pydantic import ValidationError

    from policies.loader import resolve_max_output

    assert resolve_max_output(BackendSpec(name="x", model="openai/gpt-4.1-mini")) == (32768, "litellm model map")
    assert resolve_max_output(BackendSpec(name="x", model="anthropic/claude-sonnet-4-5"))[0] == 64000
    assert resolve_max_output(BackendSpec(name="x", model="openai/gpt-4.1-mini", api_base="http://127.0.0.1:1/v1")) \
        == (None, "unknown")
    assert resolve_max_output(BackendSpec(name="x", model="openai/smollm2", max_output_tokens=512)) == (512, "declared")
    with pytest.raises(ValidationError):
        BackendSpec(name="x", model="openai/smollm2", max_output_tokens=0)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_policies_validate_against_the_json_schema(path):
    """What editors check (the JSON Schema) agrees with what the loader accepts."""
    import jsonschema
    import yaml

    schema = json.loads(SCHEMA_PATH.read_text())
    jsonschema.validate(yaml.safe_load(path.read_text()), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(yaml.safe_load(BASE + "colour: blue\n"), schema)


@pytest.mark.parametrize("old,new", [
    ("  fast:\n", "  fast arm:\n"),  # an arm name with a space
    ("aliases:\n  auto: {}\n", "aliases:\n  -auto: {}\n"),  # an alias name the check refuses
    ("candidates: {fast: 0.8, deep: 0.9}", "candidates: {fast: 0.8, deep: 0.9, 'ghost arm': 0.5}"),
])
def test_the_json_schema_refuses_names_the_check_refuses(old, new):
    """Arms, aliases and route candidates are mappings whose names have a pattern: a name outside it
    must fail in the editor too (the schema let any such key through, with any value under it)."""
    import jsonschema
    import yaml

    text = replace(old, new, BASE + "aliases:\n  auto: {}\n")
    with pytest.raises(PolicyError):
        parse_policy(text, "p.yaml")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(yaml.safe_load(text), json.loads(SCHEMA_PATH.read_text()))


def test_two_policy_files_may_not_share_a_name(tmp_path):
    """Policies are picked by name: an extra policy named like the default would replace it."""
    from gateway.policy_watch import PolicySet

    backend = [BackendSpec(name="b", model="openai/b")]
    text = "name: {name}\narms: {{one: {{backend: b}}}}\nroutes: [{{name: all, candidates: [one]}}]\n"
    main, alt, other = tmp_path / "main.yaml", tmp_path / "alt.yaml", tmp_path / "other.yaml"
    main.write_text(text.format(name="main"))
    alt.write_text(text.format(name="main"))
    other.write_text(text.format(name="other"))
    with pytest.raises(PolicyError) as clash:
        PolicySet(str(main), {"alt": str(alt)}, backend)
    assert "'main' is already the name of the policy in" in str(clash.value) and str(alt) in str(clash.value)
    # a hot reload renaming one policy to another's name is rejected; both keep serving
    policies = PolicySet(str(main), {"other": str(other)}, backend)
    other.write_text(text.format(name="main") + "# renamed\n")
    assert policies.reload_changed(force=True) == ["main"]  # main itself reloads; the rename does not
    assert sorted(policies.names()) == ["main", "other"] and "already the name" in (policies.last_error or "")


def test_a_policy_file_that_fails_or_vanishes_is_rejected_until_it_loads_again(tmp_path):
    """`rejected` (the gateway's ponder_policy_reload_rejected) says the file on disk is not what serves:
    a broken edit, or a file gone; a file put back is loaded even with the mtime it had (a restore)."""
    import os

    from gateway.policy_watch import PolicySet

    backend = [BackendSpec(name="b", model="openai/b")]
    path = tmp_path / "main.yaml"
    path.write_text("name: main\narms: {one: {backend: b}}\nroutes: [{name: all, candidates: [one]}]\n")
    good, stamp = path.read_text(), os.stat(path).st_mtime_ns
    policies = PolicySet(str(path), {}, backend)
    assert policies.rejected == {}
    path.write_text("name: main\nroutes: [")
    assert policies.reload_changed(force=True) == [] and "YAML" in policies.rejected["main"]
    path.unlink()
    assert policies.reload_changed() == [] and "No such file" in policies.rejected["main"]
    path.write_text(good)
    os.utime(path, ns=(stamp, stamp))
    assert policies.reload_changed() == ["main"] and policies.rejected == {}


def test_a_broken_file_served_as_two_policies_is_reported_once(tmp_path):
    """A config naming one file as `policy` and in `extra_policies` listed each of its problems twice."""
    from gateway.policy_watch import PolicySet

    path = tmp_path / "main.yaml"
    path.write_text("name: main\narms: {one: {backend: nowhere}}\nroutes: [{name: all, candidates: [one]}]\n")
    with pytest.raises(PolicyError) as refused:
        PolicySet(str(path), {"again": str(path)}, [])
    assert len(refused.value.problems) == 1 and "unknown backend `nowhere`" in str(refused.value)


def test_a_policy_file_that_vanishes_says_so_once_in_the_log(tmp_path, caplog):
    """The metric says a file gone is not what serves; the log says why, once, not every poll."""
    from gateway.policy_watch import PolicySet

    path = tmp_path / "main.yaml"
    path.write_text("name: main\narms: {one: {backend: b}}\nroutes: [{name: all, candidates: [one]}]\n")
    policies = PolicySet(str(path), {}, [BackendSpec(name="b", model="openai/b")])
    path.unlink()
    with caplog.at_level("ERROR", logger="ponder.policy"):
        for _ in range(3):
            policies.reload_changed()
    lines = [r.getMessage() for r in caplog.records if r.name == "ponder.policy"]
    assert len(lines) == 1 and "'main' keeps serving" in lines[0] and str(path) in lines[0], lines


def test_an_edit_that_keeps_the_files_mtime_is_reloaded(tmp_path):
    """Two saves within one tick of the kernel's file clock (a few ms) leave one mtime, as do a restore
    with `cp -p` and an atomic save's rename of a file written in the same tick: the poll compared
    mtimes, so the second save never served until a restart. It compares what the file holds."""
    import os

    from gateway.policy_watch import PolicySet

    text = "name: main\narms: {{one: {{backend: b}}, two: {{backend: c}}}}\nroutes: [{{name: all, candidates: [{arm}]}}]\n"
    backends = [BackendSpec(name="b", model="openai/b"), BackendSpec(name="c", model="openai/c")]
    path = tmp_path / "main.yaml"
    path.write_text(text.format(arm="one"))
    stamp = os.stat(path).st_mtime_ns
    policies = PolicySet(str(path), {}, backends)
    path.write_text(text.format(arm="two"))  # the same size, the same mtime: only the content differs
    os.utime(path, ns=(stamp, stamp))
    assert policies.reload_changed() == ["main"]
    assert list(policies.default.policy.routes[0].candidates) == ["two"]
    saved = tmp_path / ".main.yaml.swp"  # an editor's atomic save: a new file renamed over the old one
    saved.write_text(text.format(arm="one"))
    os.utime(saved, ns=(stamp, stamp))
    os.replace(saved, path)
    assert policies.reload_changed() == ["main"]
    assert list(policies.default.policy.routes[0].candidates) == ["one"]
    assert policies.reload_changed() == []  # nothing changed: nothing reloaded, nothing logged


def test_the_poll_reads_an_unchanged_policy_file_only_while_its_stat_may_hide_a_save(tmp_path, monkeypatch):
    """The poll runs on the event loop every second. It read and hashed every file each time: a 10 MB
    policy held the loop ~50 ms a second (a file on a slow network mount, longer). Once a file's stat
    has settled, an unchanged stat means an unchanged file; an edit, even one that restores the old
    mtime (`cp -p`, same size), changes the ctime and is read."""
    import os
    import statistics
    import time

    from gateway import policy_watch
    from gateway.policy_watch import PolicySet

    monkeypatch.setattr(policy_watch, "SETTLE_S", 0.0, raising=False)  # the stat is trusted at once
    text = "name: main\narms: {{one: {{backend: b}}, two: {{backend: c}}}}\nroutes: [{{name: all, candidates: [{arm}]}}]\n"
    padding = ("# " + "x" * 97 + "\n") * 20_000  # 2 MB of comments (reading and parsing more takes seconds)
    backends = [BackendSpec(name="b", model="openai/b"), BackendSpec(name="c", model="openai/c")]
    path = tmp_path / "main.yaml"
    path.write_text(text.format(arm="one") + padding)
    stamp = os.stat(path).st_mtime_ns
    policies = PolicySet(str(path), {}, backends)
    polls = []
    for _ in range(15):
        start = time.perf_counter()
        assert policies.reload_changed() == []
        polls.append(time.perf_counter() - start)
    assert statistics.median(polls) < 0.0005, f"a poll of an unchanged 2 MB file took {statistics.median(polls):.4f} s"
    time.sleep(0.01)  # a later ctime, whatever the file clock's tick
    path.write_text(text.format(arm="two") + padding)  # the same size, the old mtime put back
    os.utime(path, ns=(stamp, stamp))
    assert policies.reload_changed() == ["main"]
    assert list(policies.default.policy.routes[0].candidates) == ["two"]


def test_a_reload_is_read_apart_and_served_only_when_swapped_in(tmp_path):
    """The gateway reads and compiles an edit in a thread (read_changed), then serves it on the event
    loop (swap_in): reading changes nothing a request can see, a broken edit included, so requests
    go on with the policy serving until the swap, which serves every file's result at once."""
    from gateway.policy_watch import PolicySet

    text = "name: {name}\narms: {{one: {{backend: b}}, two: {{backend: c}}}}\nroutes: [{{name: all, candidates: [{arm}]}}]\n"
    backends = [BackendSpec(name="b", model="openai/b"), BackendSpec(name="c", model="openai/c")]
    main, other = tmp_path / "main.yaml", tmp_path / "other.yaml"
    main.write_text(text.format(name="main", arm="one"))
    other.write_text(text.format(name="other", arm="one"))
    policies = PolicySet(str(main), {"other": str(other)}, backends)
    serving = policies.default
    main.write_text(text.format(name="main", arm="two"))
    other.write_text("name: other\narms: [")  # broken
    pending = policies.read_changed()
    assert list(pending.due) == ["main", "other"] and set(pending.refused) == {"other"}
    assert policies.default is serving and policies.rejected == {} and policies.last_error is None
    assert policies.read_changed().due == pending.due  # nothing was marked read: the next poll sees the same
    assert policies.swap_in(pending) == ["main"]
    assert list(policies.default.policy.routes[0].candidates) == ["two"] and list(serving.policy.routes[0].candidates) == ["one"]
    assert set(policies.rejected) == {"other"} and policies.get("other") is not None  # the old one serves
    assert policies.read_changed().due == {}  # read once: a broken file is reported once, not every poll


def test_two_policies_may_not_declare_one_inline_backend_differently(tmp_path):
    """The gateway serves one backend per name: a backend two policies declared inline differently was
    served as whichever came last, so the other policy's arms called its model at its prices. Refused at
    start and on a reload (the previous version keeps serving); the same declaration twice is fine, and
    a gateway config's backend of that name replaces both."""
    from gateway.policy_watch import PolicySet

    text = ("name: {name}\nbackends: [{{name: fast, model: openai/{model}, prices: {{input_per_mtok: 1, output_per_mtok: 2}}}}]\n"
            "arms: {{one: {{backend: fast}}}}\nroutes: [{{name: all, candidates: [one]}}]\n")
    main, alt = tmp_path / "main.yaml", tmp_path / "alt.yaml"
    main.write_text(text.format(name="main", model="m"))
    alt.write_text(text.format(name="alt", model="other"))
    with pytest.raises(PolicyError) as clash:
        PolicySet(str(main), {"alt": str(alt)}, [])
    assert f"{alt}:2: backends[0]: backend `fast` differs from the one policy `main` ({main}) declares" \
        in str(clash.value)
    assert PolicySet(str(main), {"alt": str(alt)}, [BackendSpec(name="fast", model="openai/cfg")])  # config's wins
    alt.write_text(text.format(name="alt", model="m"))
    policies = PolicySet(str(main), {"alt": str(alt)}, [])
    alt.write_text(text.format(name="alt", model="other") + "# edited\n")
    assert policies.reload_changed(force=True) == ["main"] and "differs from the one policy `main`" in \
        policies.rejected["alt"]
    assert [spec.model for p in policies.all() for spec in p.policy.backends] == ["openai/m", "openai/m"]


def test_a_shared_inline_backend_edited_in_every_policy_reloads(tmp_path):
    """Two policies may declare one inline backend alike. An edit of it in both files was refused in
    each, checked against the other's version still serving, on every reload (SIGHUP too) until a
    restart; one file at a time fared no better. Each is now checked against the other's new version."""
    import os

    from gateway.policy_watch import PolicySet

    text = ("name: {name}\nbackends: [{{name: fast, model: openai/{model}, prices: {{input_per_mtok: 1, output_per_mtok: 2}}}}]\n"
            "arms: {{one: {{backend: fast}}}}\nroutes: [{{name: all, candidates: [one]}}]\n")
    main, alt = tmp_path / "main.yaml", tmp_path / "alt.yaml"

    def edit(path, model, mtime):
        path.write_text(text.format(name=path.stem, model=model))
        os.utime(path, (mtime, mtime))

    edit(main, "m", 1000), edit(alt, "m", 1000)
    policies = PolicySet(str(main), {"alt": str(alt)}, [])
    edit(main, "n", 2000), edit(alt, "n", 2000)  # both at once (a deploy, a SIGHUP)
    assert sorted(policies.reload_changed(force=True)) == ["alt", "main"] and not policies.rejected
    edit(main, "o", 3000)  # one file at a time (the gateway polls in between)
    assert policies.reload_changed() == [] and "differs from the one policy `alt`" in policies.rejected["main"]
    assert [spec.model for p in policies.all() for spec in p.policy.backends] == ["openai/n", "openai/n"]
    edit(alt, "o", 4000)
    assert sorted(policies.reload_changed()) == ["alt", "main"] and not policies.rejected
    assert [spec.model for p in policies.all() for spec in p.policy.backends] == ["openai/o", "openai/o"]
    edit(alt, "p", 5000)  # still refused where the other does not follow
    assert policies.reload_changed() == [] and "differs from the one policy `main`" in policies.rejected["alt"]
    assert [spec.model for p in policies.all() for spec in p.policy.backends] == ["openai/o", "openai/o"]


def test_two_files_renamed_to_one_name_in_one_reload_keep_one(tmp_path):
    """A reload reads every changed file before serving any: two renamed to one name in the same reload
    are told apart as they were one after another (the second is refused, the first serves)."""
    from gateway.policy_watch import PolicySet

    text = ("name: {name}\nbackends: [{{name: fast, model: openai/m, prices: {{input_per_mtok: 1, output_per_mtok: 2}}}}]\n"
            "arms: {{one: {{backend: fast}}}}\nroutes: [{{name: all, candidates: [one]}}]\n")
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text(text.format(name="a")), b.write_text(text.format(name="b"))
    policies = PolicySet(str(a), {"b": str(b)}, [])
    a.write_text(text.format(name="same")), b.write_text(text.format(name="same"))
    assert policies.reload_changed(force=True) == ["same"] and sorted(policies.names()) == ["b", "same"]
    assert "'same' is already the name of the policy in" in policies.rejected["b"]


def test_efforts_on_an_openai_model_that_does_not_reason_are_refused():
    """OpenAI answers `reasoning_effort` with a 400 on its chat models (gpt-4.1, gpt-4o): a backend
    declaring efforts (or `reasoning: true`) on one failed every call its arms made. A reasoning model,
    and a server behind an api_base, are left as declared."""
    text = ("name: p\nbackends:\n  - {{name: m, model: {model}, {extra}}}\n"
            "arms: {{a: {{backend: m, effort: high}}}}\nroutes: [{{name: all, candidates: [a]}}]\n")
    for model in ("openai/gpt-4.1-mini", "gpt-4o"):
        with pytest.raises(PolicyError) as refused:
            parse_policy(text.format(model=model, extra="efforts: [low, high]"), "p.yaml")
        assert f"p.yaml:3: backends[0].efforts: `{model}` is not a reasoning model" in str(refused.value)
    with pytest.raises(PolicyError, match=r"backends\[0\]\.reasoning: `openai/gpt-4.1` is not a reasoning model"):
        parse_policy(text.format(model="openai/gpt-4.1", extra="reasoning: true").replace(", effort: high", ""),
                     "p.yaml")
    parse_policy(text.format(model="openai/o4-mini", extra="efforts: [low, high]"), "p.yaml")
    parse_policy(text.format(model="openai/gpt-4.1-mini", extra="efforts: [high], api_base: 'http://h/v1'"), "p.yaml")


def test_efforts_on_an_openai_model_that_does_not_reason_are_refused_in_the_gateway_config_too(tmp_path, capsys):
    """The README declares its backends in the gateway config, where the check above did not look: a
    config backend with efforts on gpt-4o passed `ponder policy check --config` and `ponder serve`, and
    every call on its arms was OpenAI's 400. The config is refused, saying which backend and why."""
    from gateway.cli import main
    from gateway.config import ConfigError, load_config

    policy = tmp_path / "p.yaml"
    policy.write_text("name: p\narms: {a: {backend: m, effort: low}}\nroutes: [{name: all, candidates: [a]}]\n")
    config = tmp_path / "gw.yaml"
    backend = {"name": "m", "model": "openai/gpt-4o", "efforts": ["low", "high"], "api_key_env": "OPENAI_API_KEY"}
    config.write_text(json.dumps({"backends": [backend], "local_model": {"enabled": False}, "policy": "p.yaml"}))
    assert main(["policy", "check", "--config", str(config)]) == 1
    assert "`m`: `openai/gpt-4o` is not a reasoning model" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="is not a reasoning model"):
        load_config(config)
    backend.update(model="openai/o4-mini")  # a reasoning model takes them
    config.write_text(json.dumps({"backends": [backend], "local_model": {"enabled": False}, "policy": "p.yaml"}))
    assert main(["policy", "check", "--config", str(config)]) == 0


def test_cli_help_goes_to_stdout_and_policy_help_is_policy_checks(capsys):
    from gateway.cli import main

    assert main(["--help"]) == 0
    out = capsys.readouterr()
    assert "ponder serve" in out.out and not out.err  # `ponder --help | less` shows it
    with pytest.raises(SystemExit) as done:
        main(["policy", "--help"])
    assert done.value.code == 0 and "usage: ponder policy check" in capsys.readouterr().out
    assert main(["nonsense"]) == 2
    err = capsys.readouterr().err
    assert "ponder: unknown command 'nonsense'" in err and "ponder serve" in err
    assert main(["policy", "chek", "p.yaml"]) == 2  # a typo is named, not answered with the bare usage
    assert "ponder policy: unknown subcommand 'chek'; the one there is: ponder policy check" in capsys.readouterr().err
    assert main(["policy"]) == 2 and "ponder policy: no subcommand" in capsys.readouterr().err


def test_policy_check_takes_a_shipped_policys_name_as_the_config_does(tmp_path, monkeypatch, capsys):
    """`policy: cost-saver.yaml` in a gateway config names the shipped policy, but `ponder policy check
    cost-saver.yaml` outside a checkout said "No such file"; a name that is none says which are shipped."""
    from gateway.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["policy", "check", "cost-saver.yaml", "--quiet"]) == 0
    assert capsys.readouterr().out.strip() == "cost-saver.yaml: OK"
    assert main(["policy", "check", "cost-saver"]) == 1
    err = capsys.readouterr().err
    assert "cost-saver: cannot read the file" in err
    assert "a bare name picks a shipped policy: cost-saver.yaml, local.yaml, multi-provider.yaml" in err
    (tmp_path / "cost-saver.yaml").write_text("name: mine\n")  # a file of that name here wins, as in a config
    assert main(["policy", "check", "cost-saver.yaml"]) == 1
    assert "cost-saver.yaml:1: arms: missing required key `arms`" in capsys.readouterr().err


def test_cli_tells_its_version(capsys):
    """`ponder --version` (and `ponder version`), asked for in bug reports, said "unknown command"."""
    from importlib.metadata import version

    from gateway.cli import main

    for argv in (["--version"], ["version"]):
        assert main(argv) == 0
        assert capsys.readouterr().out == f"ponder {version('ponder')}\n"


def test_cli_output_piped_into_a_reader_that_stops_early_ends_quietly():
    """`ponder policy check ... | head -1`: the reader gone, the next print raised BrokenPipeError and
    the command ended in a traceback."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    command = subprocess.Popen([sys.executable, "-m", "gateway.cli", "policy", "check", "cost-saver.yaml",
                                "quality-first.yaml"], cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    command.stdout.close()  # as `head` does once it has its lines: before anything is written here
    _, err = command.communicate(timeout=60)
    assert command.returncode == 1 and err.decode() == ""


def test_every_shipped_policy_can_be_served_beside_every_other(tmp_path):
    """Shipped policies that declare one backend inline declare it alike: openai-mix wrote out the model
    map's max_context that quality-first and multi-provider leave to it, so a gateway serving openai-mix
    with either as an extra policy refused to start ("backend `gpt-4.1-mini` differs")."""
    from gateway.config import load_config
    from gateway.service import configured_policies

    config = tmp_path / "gateway.yaml"
    config.write_text("policy: local.yaml\nextra_policies:\n"
                      + "".join(f"  {path.stem}: {path.name}\n" for path in SHIPPED if path.stem != "local"))
    policies = configured_policies(load_config(config))
    assert sorted(policies.names()) == sorted(path.stem for path in SHIPPED)


@pytest.mark.parametrize("text", ["name: bad\x00name\n", "name: x\nzz: " + "9" * 5000 + "\n", "[" * 5000 + "]" * 5000],
                         ids=["nul-character", "integer-past-python-limit", "nested-past-the-stack"])
def test_yaml_that_python_itself_refuses_is_a_policy_error_naming_the_file(tmp_path, text):
    """A NUL (a binary file saved over the policy), an integer of over 4300 digits, lists nested past
    Python's stack escaped load_policy as ReaderError / ValueError / RecursionError: a traceback from
    `ponder policy check`, and in the gateway the end of its policy watcher (no reload after)."""
    path = tmp_path / "odd.yaml"
    path.write_text(text)
    with pytest.raises(PolicyError) as caught:
        load_policy(path)
    assert str(path) in str(caught.value) and "YAML syntax error" in str(caught.value)


def test_a_reload_read_but_never_swapped_in_is_read_again(tmp_path, monkeypatch):
    """read_changed runs in a thread and changes nothing: the new stat it saw is kept by swap_in. It
    kept the stat itself, so a reload that failed or was dropped between the two (an unexpected error
    in the thread, logged by the gateway's watcher) left the edit unread for good once SETTLE_S passed:
    the stat matched, and the old policy served until a restart."""
    from gateway import policy_watch
    from gateway.policy_watch import PolicySet

    text = "name: main\narms: {{one: {{backend: b}}, two: {{backend: c}}}}\nroutes: [{{name: all, candidates: [{arm}]}}]\n"
    path = tmp_path / "main.yaml"
    path.write_text(text.format(arm="one"))
    backends = [BackendSpec(name=name, model=f"openai/{name}") for name in ("b", "c")]
    policies = PolicySet(str(path), {}, backends)
    monkeypatch.setattr(policy_watch, "SETTLE_S", 0.0)  # past the settling time at once
    path.write_text(text.format(arm="two") + "# longer\n")
    assert list(policies.read_changed().due) == ["main"]  # read, then dropped: never swapped in
    assert policies.reload_changed() == ["main"]
    assert list(policies.default.policy.routes[0].candidates) == ["two"]
