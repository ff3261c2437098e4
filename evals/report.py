"""Write one table's evaluation: DIR/report.json (every number), DIR/report.md (tables), PNG plots.

Plots (matplotlib, Agg backend, small files so docs/img can hold them):
- cost_accuracy.png: every single arm, their Pareto frontier, the best random mix at matched cost,
  the ponder curves (lambda sweeps), the score routers and the oracle;
- pgr.png: RouteLLM's performance gap recovered against the share of strong calls (weak/strong pair);
- tiers.png: accuracy per difficulty tier (leak-free difficulty) at the headline operating point;
- regret.png: the cold learner's cumulative utility against the best fixed arm per bucket in hindsight.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from evals.metrics import pareto_frontier, upper_hull  # noqa: E402

SIZE, DPI = (6.4, 4.2), 80
COLORS = {"ponder warm (recorded)": "tab:blue", "ponder warm (recorded, no exploration)": "navy",
          "ponder warm (recorded, no exploration) [group buckets]": "indigo", "ponder warm": "tab:cyan", "ponder cold": "tab:olive",
          "ponder warm (recorded) [group buckets]": "tab:purple", "ponder warm [group buckets]": "tab:pink",
          "ponder cold [group buckets]": "tab:brown", "difficulty router": "tab:green",
          "difficulty": "tab:green", "prompt length": "tab:orange", "random": "tab:gray",
          "oracle": "tab:red"}


def _pct(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{100 * value:.{digits}f}%"


def _ratio(value: float, of: float) -> float | None:
    """value / of; none where `of` is 0 (a free strongest arm: no share of its cost to speak of)."""
    return value / of if of else None


def _num(value: float | None, fmt: str = ".3f") -> str:
    return "n/a" if value is None else format(value, fmt)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _cost_grid(lo: float, hi: float, points: int = 200) -> np.ndarray:
    """Costs from lo to hi, evenly spaced on a log axis; a free arm (cost 0) starts the grid at 0."""
    if lo > 0:
        return np.geomspace(lo, hi, points)
    return np.r_[0.0, np.geomspace(hi / 1e3, hi, points)] if hi > 0 else np.array([0.0])


def plot_cost_accuracy(result: dict, path: Path) -> Path | None:
    arms = [a for a in result["arms"] if a["cost_usd"] is not None]
    if not arms or not result["methods"]:
        return None
    fig, ax = plt.subplots(figsize=(SIZE[0] * 1.45, SIZE[1]))
    cost = np.array([a["cost_usd"] for a in arms])
    acc = np.array([a["accuracy"] for a in arms])
    ax.scatter(cost, acc, s=12, color="0.6", label="single arms", zorder=2)
    front = pareto_frontier(cost, acc)  # the best single arm within a budget: a staircase
    ax.step(cost[front], acc[front], where="post", color="0.45", lw=1, label="single-arm Pareto frontier")
    hull = upper_hull(cost, acc)  # a random mix is linear in cost: curved on the log axis, so sample it densely
    dense = _cost_grid(cost[hull][0], cost[hull][-1])
    ax.plot(dense, np.interp(dense, cost[hull], acc[hull]), color="0.3", lw=1, ls="--",
            label="random mix at matched cost")
    table = result["table"]
    for key in ("cheapest", "strongest"):
        arm = next(a for a in arms if a["arm"] == table[key])
        ax.annotate(f"always-{key}\n{arm['arm']}", (arm["cost_usd"], arm["accuracy"]), fontsize=6,
                    xytext=(3, -14 if key == "strongest" else 4), textcoords="offset points")
    for name, curve in result["pair"]["routers"].items():
        if name in ("prompt length", "difficulty"):
            ax.plot(curve["cost_usd"], curve["accuracy"], color=COLORS[name], lw=1, alpha=0.8,
                    label=f"{name} threshold ({table['weak']} / {table['strong']})")
    for name, method in result["methods"].items():
        pts = sorted(method["points"], key=lambda p: p["cost_usd"])
        ax.plot([p["cost_usd"] for p in pts], [p["accuracy"] for p in pts], marker="o", ms=3, lw=1.2,
                color=COLORS.get(name), label=f"{name} (lambda sweep)")
    if result.get("oracle"):
        ax.scatter([result["oracle"]["cost_usd"]], [result["oracle"]["accuracy"]], marker="*", s=80,
                   color=COLORS["oracle"], label="oracle", zorder=3)
    if (cost > 0).all():
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:.0e}"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # minor labels collide on a short log axis
    else:  # a free arm (a self-hosted model priced 0) has no place on a log axis: linear up to the cheapest paid one
        ax.set_xscale("symlog", linthresh=float(cost[cost > 0].min()) if (cost > 0).any() else 1e-6)
    ax.set_xlabel("mean cost per request (USD, log)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{table['name']}: cost vs accuracy", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(fig, path)


def plot_pgr(result: dict, path: Path) -> Path | None:
    pair = result["pair"]
    if not pair["routers"] or pair["routers"]["random"]["apgr"] is None:
        return None  # no gap between the pair on their common prompts: no gap to recover
    fig, ax = plt.subplots(figsize=SIZE)
    gap = pair["strong_accuracy"] - pair["weak_accuracy"]
    for name, curve in pair["routers"].items():
        share = np.array(curve["share"])
        recovered = (np.array(curve["accuracy"]) - pair["weak_accuracy"]) / gap if gap else share * 0
        ax.plot(share, recovered, color=COLORS.get(name), lw=1.2,
                label=f"{name}: CPT50 {_pct(curve['cpt50'])}, APGR {_num(curve['apgr'], '.2f')}")
    for name in ("difficulty router", result.get("headline", "ponder warm (recorded)")):
        method = result["methods"].get(name)
        if method and gap:
            pts = sorted(method["points"], key=lambda p: p["strong_share"])
            ax.plot([p["strong_share"] for p in pts], [(p["accuracy"] - pair["weak_accuracy"]) / gap for p in pts],
                    "o", ms=3, color=COLORS.get(name), label=f"{name} via decide() (lambda sweep)")
    ax.axhline(0.5, color="0.7", lw=0.8, ls=":")
    ax.axhline(0.8, color="0.7", lw=0.8, ls=":")
    ax.set_xlabel(f"share of calls to the strong arm ({result['table']['strong']})")
    ax.set_ylabel("performance gap recovered")
    ax.set_title(f"{result['table']['name']}: {result['table']['weak']} vs {result['table']['strong']}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    return _save(fig, path)


def plot_tiers(result: dict, path: Path) -> Path | None:
    tiers = result.get("by_tier")
    if not tiers:
        return None
    names = [t for t in tiers if tiers[t]["n"]]
    methods = [m for m in next(iter(tiers.values())) if m != "n"]
    fig, ax = plt.subplots(figsize=SIZE)
    width = 0.8 / len(methods)
    for k, method in enumerate(methods):
        values = [tiers[t][method] or 0 for t in names]
        ax.bar(np.arange(len(names)) + k * width, values, width, label=method, color=COLORS.get(method))
    ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2, [f"{t}\n(n={tiers[t]['n']})" for t in names])
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(f"{result['table']['name']}: accuracy by difficulty tier (k={result['headline_k']:.3g})", fontsize=10)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_regret(regret: dict, title: str, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=SIZE)
    x = np.array(regret["requests"])
    ax.plot(x, regret["hindsight_utility"], color="0.3", label="best fixed arm per bucket (hindsight)")
    ax.plot(x, regret["learner_utility"], color=COLORS["ponder cold"], label="learner from cold priors (online)")
    ax.set_xlabel("requests")
    ax.set_ylabel("cumulative utility (correct - lambda x cost)")
    ratio = regret.get("final_ratio")
    ax.set_title(f"{title}: learner / hindsight = {_num(ratio)}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


# --- markdown ------------------------------------------------------------------------------------


def _point(p: dict | None, unit: str) -> str:
    if p is None:
        return "not reached"
    return f"acc {p['accuracy']:.3f}, {unit} {_pct(p['cost_ratio' if unit == 'cost' else 'tokens_ratio'])} (k={p['k']:.3g})"


def _cell(text: str) -> str:
    """Text for a markdown table cell: a `|` (RouterBench-style names such as `openai|gpt-4o`) would split it."""
    return text.replace("|", "\\|")


def render_markdown(result: dict, plots: dict[str, str]) -> str:
    t = result["table"]
    lines = [f"# Routing replay: {t['name']}", "", f"{t['description']}. {t['prompts']} prompts, {t['arms']} arms; "
             f"arrival order: {result['arrival_order']}.", "", f"Difficulty and task type: {result['classification']}.", ""]
    if result.get("note"):
        lines += [f"Note: {result['note']}.", ""]
    strongest = next(a for a in result["arms"] if a["arm"] == t["strongest"])
    cheapest = next(a for a in result["arms"] if a["arm"] == t["cheapest"])
    if result["methods"]:
        lines += ["## Operating points", "",
                  f"Relative to always-strongest ({t['strongest']}: acc {strongest['accuracy']:.3f}, "
                  f"${strongest['cost_usd']:.3g}/request, {strongest['output_tokens']:.0f} output tokens); "
                  "k = lambda x the strongest arm's mean cost.", "",
                  "| method | cheapest point within 1 pt | cheapest point >= strongest | best accuracy at <= its cost |",
                  "|---|---|---|---|"]
        for name, m in result["methods"].items():
            best = m["best_at_equal_cost"]
            lines.append(f"| {name} | {_point(m['within_1pt'], 'cost')} | {_point(m['at_least_strongest'], 'cost')} "
                         f"(output {_pct(m['at_least_strongest']['tokens_ratio']) if m['at_least_strongest'] else 'n/a'}) "
                         f"| {_point(best, 'cost')} |")
        ceiling = result.get("group_hindsight")
        if ceiling:
            lines += ["", "Ceiling of group buckets on these k values (not a router: per group, the arm best in "
                      "hindsight on the whole table): " f"within 1 pt {_point(ceiling['within_1pt'], 'cost')}; "
                      f">= strongest {_point(ceiling['at_least_strongest'], 'cost')} (output "
                      f"{_pct(ceiling['at_least_strongest']['tokens_ratio']) if ceiling['at_least_strongest'] else 'n/a'})."]
        oracle = result["oracle"]
        lines += ["", f"Always-cheapest ({t['cheapest']}): acc {cheapest['accuracy']:.3f} at "
                  f"{_pct(_ratio(cheapest['cost_usd'], strongest['cost_usd']))} of the strongest's cost. "
                  f"Oracle: acc {oracle['accuracy']:.3f} at {_pct(_ratio(oracle['cost_usd'], strongest['cost_usd']))}.", ""]
        lines += ["## Lambda sweeps", "", "| method | k | accuracy | cost/request (USD) | output tokens | strong share | "
                  "explored | failovers | random mix at this cost |", "|---|---|---|---|---|---|---|---|---|"]
        matched = {round(r["cost_usd"], 12): r["accuracy"] for r in result.get("random_matched", [])}
        headline = result.get("headline", "ponder warm (recorded)")
        for name, m in result["methods"].items():
            for p in m["points"]:
                rnd = matched.get(round(p["cost_usd"], 12)) if name == headline else None
                lines.append(f"| {name} | {p['k']:.3g} | {p['accuracy']:.3f} | {p['cost_usd']:.3g} | "
                             f"{p['output_tokens']:.0f} | {_pct(p['strong_share'])} | {p.get('explored', '-')} | "
                             f"{p.get('failovers', '-')} | {_num(rnd)} |")
        lines.append("")
    pair = result["pair"]
    lines += ["## Two-arm routing (RouteLLM metrics)", "",
              f"Weak {t['weak']} (acc {_num(pair['weak_accuracy'])}) vs strong {t['strong']} (acc "
              f"{_num(pair['strong_accuracy'])}) on the {pair['rows']} prompts both answered. CPT(x): share of strong "
              "calls needed to recover x of the gap; APGR: area under the recovered-gap curve (random = 0.5)."
              + ("" if pair["routers"] and pair["routers"]["random"]["apgr"] is not None else
                 " The two are equally accurate there (or share no prompt): no gap, so no CPT or APGR."), "",
              "| router (threshold on its score) | CPT(50%) | CPT(80%) | APGR |", "|---|---|---|---|"]
    for name, r in pair["routers"].items():
        lines.append(f"| {name} | {_pct(r['cpt50'])} | {_pct(r['cpt80'])} | {_num(r['apgr'])} |")
    lines.append("")
    if result.get("by_tier"):
        tiers = result["by_tier"]
        methods = [m for m in next(iter(tiers.values())) if m != "n"]
        lines += [f"## Accuracy by difficulty tier (at k={result['headline_k']:.3g})", "",
                  "| tier | n | " + " | ".join(methods) + " |", "|---" * (len(methods) + 2) + "|"]
        for tier, row in tiers.items():
            lines.append(f"| {tier} | {row['n']} | " + " | ".join(_num(row[m]) for m in methods) + " |")
        lines.append("")
    if result.get("regret"):
        r = result["regret"]
        lines += ["## Learner regret (cold start, online)", "",
                  f"After {r['requests'][-1]} requests at lambda {r['cost_weight']:.4g}: cumulative utility "
                  f"{r['learner_utility'][-1]:.1f} vs {r['hindsight_utility'][-1]:.1f} for the best fixed arm per bucket "
                  f"in hindsight (ratio {_num(r['final_ratio'])}).", ""]
    lines += ["## Single arms", "", "| arm | accuracy | cost/request (USD) | output tokens | coverage | price |",
              "|---|---|---|---|---|---|"]
    for a in sorted(result["arms"], key=lambda a: 1.0 if a["accuracy"] is None else -a["accuracy"]):
        lines.append(f"| {_cell(a['arm'])} | {_num(a['accuracy'])} | {_num(a['cost_usd'], '.3g')} | "
                     f"{_num(a['output_tokens'], '.0f')} | {_pct(a['coverage'])} | {_cell(a['price'][:60])} |")
    lines += [""] + [f"![{name}]({file})" for name, file in plots.items()] + [""]
    return "\n".join(lines)


def json_text(data: Any, indent: int = 1) -> str:
    """Strict JSON for a report: a NaN or an infinity (a metric with nothing to average) is null, which
    every JSON reader takes (the dashboard's, browsers'), unlike Python's bare NaN."""
    def clean(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    return json.dumps(clean(data), indent=indent, allow_nan=False, default=str) + "\n"


def write_report(result: dict, out_dir: str | Path) -> dict[str, str]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots: dict[str, str] = {}
    for name, maker in (("cost_accuracy", lambda p: plot_cost_accuracy(result, p)),
                        ("pgr", lambda p: plot_pgr(result, p)), ("tiers", lambda p: plot_tiers(result, p)),
                        ("regret", lambda p: plot_regret(result["regret"], result["table"]["name"], p)
                         if result.get("regret") else None)):
        if maker(out / f"{name}.png") is not None:
            plots[name] = f"{name}.png"
    result = {**result, "plots": plots}
    (out / "report.json").write_text(json_text(result), encoding="utf-8")
    (out / "report.md").write_text(render_markdown(result, plots), encoding="utf-8")
    return plots
