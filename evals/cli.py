"""`ponder eval`: replay recorded outcomes through the router and write reports.

    ponder eval --suite mmlu-pro --out DIR          # or bbh-effort, gsm8k-2, mmlu-2, learner, all
    ponder eval --suite sc-math --out DIR           # sc-cruxeval, gsm8k-verifier: evals.sampling
    ponder eval --table runs/*.csv --out DIR [--strong M --weak M] [--format routellm|routerbench|jsonl]

Each routing report is DIR/report.json, DIR/report.md and PNG plots (evals/report.py); `--suite all`
writes one folder per suite and DIR/summary.md with the headline numbers. The first run fits the
leak-free classifiers (a few minutes each on two cores); their scores are cached (evals/classification.py).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from router.classifier import positive_int  # the same argparse type as `ponder classify --batch-size`

ROUTING_SUITES = ("mmlu-pro", "mmlu-2", "gsm8k-2", "bbh-effort")
SAMPLING_SUITES = ("sc-math", "sc-cruxeval", "gsm8k-verifier")
ALL_SUITES = (*ROUTING_SUITES, "learner", *SAMPLING_SUITES)
GROUP_BUCKETS = {"mmlu-pro": "MMLU-Pro category", "bbh-effort": "BBH task"}


class RefusedInput(Exception):
    """The user's files or arguments, refused before any work: exit status 2, as for argparse's own
    refusals (1 is for a run that failed: an --out that cannot be written, no datasets folder)."""


def _scores(args, name: str | None, table, log):
    """Leak-free scores for a table (a suite is scored whole, then cut to --limit, so caches are shared)."""
    from evals.classification import SUITE_SOURCES, Scores, leak_free_scores, length_scores
    from evals.suites import SUITE_LOADERS, load_mmlu_pro

    if args.no_classifier:
        return length_scores(table.prompts)
    kwargs = dict(mode=args.leak_free, limit_per_source=args.train_subsample, log=log)
    if name is None:
        return leak_free_scores(table.prompts, source=None, **kwargs)
    full = load_mmlu_pro() if name == "mmlu-2" else SUITE_LOADERS[name]()
    scores = leak_free_scores(full.prompts, source=SUITE_SOURCES[name], **kwargs)
    row = {pid: i for i, pid in enumerate(full.ids)}
    rows = np.array([row[pid] for pid in table.ids])
    return Scores(scores.task_probs[rows], scores.difficulty[rows], scores.how)


def _check_pair(args, table) -> None:
    """--strong and --weak must name arms of the table: said before the scoring and the replay, not after."""
    for flag, arm in (("--strong", args.strong), ("--weak", args.weak)):
        if arm is not None and arm not in table.arm_names:
            raise RefusedInput(f"{flag} {arm}: the table has no such arm (its arms: {', '.join(table.arm_names)})")
    if args.strong is not None and args.strong == args.weak:
        raise RefusedInput(f"--strong and --weak both name {args.strong}: the pair needs two arms")


def _say_unused_prices(path: str, table, log) -> None:
    """A --prices entry that prices no arm (a typo, `gpt-4o-typo` for `gpt-4o`) was dropped without a
    word, and the arm kept litellm's price. A warning, not a refusal: one price file may serve many tables."""
    from evals.prices import find_price, price_table, read_price_file

    if table.price_origins and all(origin == "recorded in the table" for origin in table.price_origins.values()):
        log(f"{path}: not used: the table's costs are taken as recorded")
        return
    prices = price_table(path)
    used = {found.model for info in table.arms if (found := find_price(info.model, prices)) is not None}
    unused = [model for model in read_price_file(path) if model not in used]
    if unused:
        log(f"{path}: no arm of the table is priced by {', '.join(unused[:8])}{' ...' if len(unused) > 8 else ''} "
            f"(its arms: {', '.join(table.arm_names)})")


def _limited(table, limit: int | None):
    if limit is None or limit >= len(table):
        return table
    rows = np.sort(np.random.default_rng(0).permutation(len(table))[:limit])  # a spread sample, not the first rows
    return table.subset(rows)


def _bar(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="decision", smoothing=0.05, file=sys.stderr)


def _routing_steps(n: int, modes: int, lambdas: int) -> int:
    return n * lambdas * (modes * 5 + 1)  # per mode: cold 1 pass, online warm 2, recorded warm 2 x 1; router 1


def run_routing(args, name: str | None, out: Path, log) -> dict:
    from evals.report import write_report
    from evals.routing import LAMBDA_STEPS, evaluate
    from evals.suites import SUITE_LOADERS
    from evals.tables import load_table

    if name is None:
        try:
            table = load_table(args.table, args.format, args.models, args.prices)
        except (OSError, ValueError) as exc:  # the user's files: missing, unreadable or not in a table format
            raise RefusedInput(str(exc)) from None
    else:
        table = SUITE_LOADERS[name]()
    _check_pair(args, table)
    if name is None:  # what was read from the user's files, before minutes of scoring
        log(f"{table.description}: {len(table)} prompts, arms {', '.join(table.arm_names)}")
        unpriced = [info for info, costs, scores in zip(table.arms, table.cost_usd.T, table.scores.T)
                    if np.isnan(costs[np.isfinite(scores)]).any()]  # what table.has_costs will find
        costless = [info.name for info in unpriced if table.price_origins.get(info.model, "").startswith("recorded")]
        unlisted = [info.name for info in unpriced if info.name not in costless]
        reasons = []
        if unlisted:
            reasons.append(f"no price for {', '.join(unlisted)} (give prices with --prices FILE)")
        if costless:  # RouterBench-style costs are taken as recorded: --prices does not fill them
            reasons.append(f"a recorded score without its cost for {', '.join(costless)}")
        if reasons:
            log("; ".join(reasons) + ": only the two-arm call-share metrics (CPT/APGR) will be computed")
        if args.prices:
            _say_unused_prices(args.prices, table, log)
    table = _limited(table, args.limit)
    scores = _scores(args, name, table, log)
    modes = ["classifier"]
    if args.buckets in ("group", "both") or (args.buckets == "auto" and name in GROUP_BUCKETS):
        modes = ["group"] if args.buckets == "group" else ["classifier", "group"]
    lambdas = LAMBDA_STEPS if args.steps is None else tuple(np.geomspace(LAMBDA_STEPS[0], LAMBDA_STEPS[-1], args.steps))
    bar = _bar(_routing_steps(len(table), len(modes), len(lambdas)), name or "table")
    result = evaluate(table, scores, bucket_modes=modes, lambdas=lambdas, strong=args.strong, weak=args.weak,
                      progress=bar.update)
    bar.update(bar.total - bar.n)  # without prices the replays are skipped: done all the same
    bar.close()
    if "group" in modes:
        result["group_buckets"] = GROUP_BUCKETS.get(name or "", "the table's group column")
    write_report(result, out)
    return result


def run_learner(args, out: Path, log) -> dict:
    from evals.learner_replay import COST_WEIGHTS, REQUESTS, SWEEP_SEEDS, learner_replay
    from evals.suites import load_bbh_effort, load_mmlu_pro

    streams = {}
    for name, loader in (("mmlu-pro", load_mmlu_pro), ("bbh-effort", load_bbh_effort)):
        table = loader()
        streams[name] = (table, _scores(args, name, table, log))
    requests = min(args.limit or REQUESTS, REQUESTS)
    bar = _bar(requests * len(streams) * len(COST_WEIGHTS), "learner")
    result = learner_replay(streams, out, requests=requests, progress=bar.update, sweep_seeds=SWEEP_SEEDS)
    bar.close()
    return result


def headline(name: str, result: dict) -> list[str]:
    """One summary row per target (docs/eval.md's results table)."""
    rows = []
    if name in ("gsm8k-2", "mmlu-2", "bbh-effort"):
        pair = result["pair"]["routers"]
        rows.append(f"| {name} | CPT(50%), threshold on the leak-free difficulty (<= 25%) | {100 * pair['difficulty']['cpt50']:.1f}% "
                    f"(prompt length {100 * pair['prompt length']['cpt50']:.1f}%, oracle {100 * pair['oracle']['cpt50']:.1f}%) "
                    f"| APGR {pair['difficulty']['apgr']:.3f} (length {pair['prompt length']['apgr']:.3f}) |")
    for method, m in result.get("methods", {}).items():
        if not method.startswith("ponder warm (recorded"):
            continue
        if name == "bbh-effort":
            p = m["at_least_strongest"]
            got = f"acc {p['accuracy']:.3f} at {100 * p['tokens_ratio']:.1f}% of CoT length" if p else "not reached"
            rows.append(f"| {name} | {method}: acc >= always-CoT at <= 60% of its output length | {got} | |")
        elif name == "mmlu-pro":
            p, q = m["within_1pt"], m["best_at_equal_cost"]
            got = f"acc {p['accuracy']:.3f} at {100 * p['cost_ratio']:.1f}% of its cost" if p else "not reached"
            rows.append(f"| {name} | {method}: within 1 pt of the best model at <= 30% of its cost | {got} | "
                        f"best at <= its cost: acc {q['accuracy']:.3f} ({100 * q['cost_ratio']:.1f}%) |")
    ceiling = result.get("group_hindsight")
    if ceiling and name == "bbh-effort":
        p = ceiling["at_least_strongest"]
        got = f"acc {p['accuracy']:.3f} at {100 * p['tokens_ratio']:.1f}% of CoT length" if p else "not reached"
        rows.append(f"| {name} | ceiling, not a router: per-task arm best in hindsight on the same k values | {got} | |")
    return rows


def sampling_headline(name: str, result: dict) -> list[str]:
    """The issue-8 bar per sampling table: the cheapest method (random orders) within 0.5 point of
    fixed-N majority, next to that majority (evals.sampling computed every number)."""
    rows = []
    parts = [(f"{name} {k}", result[k]) for k in ("input", "output") if k in result] or [(name, result)]
    for label, part in parts:
        methods = {m: v["random_orders"] for m, v in part.get("methods", {}).items()}
        majority = next((m for m in methods if m.startswith("majority of") and "expected" not in m), None)
        if majority is None:
            continue
        bar = methods[majority]["accuracy"] - 0.005
        ok = [m for m, v in methods.items()
              if v["accuracy"] >= bar and v.get("mean_samples") is not None and "oracle" not in m]
        if not ok:
            continue
        best = min(ok, key=lambda m: methods[m]["mean_samples"])
        rows.append(f"| {label} | fewest samples within 0.5 pt of {majority} | {best}: acc "
                    f"{methods[best]['accuracy']:.3f} with {methods[best]['mean_samples']:.2f} samples | "
                    f"{majority}: acc {methods[majority]['accuracy']:.3f} |")
    return rows or [f"| {name} | see {name}/report.md (evals.sampling) | | |"]


def write_summary(out: Path, results: dict[str, dict]) -> None:
    from evals.report import json_text

    lines = ["# Ponder eval summary", "", "| suite | target | measured | also |", "|---|---|---|---|"]
    for name, result in results.items():
        if name in ROUTING_SUITES:
            lines += headline(name, result)
        elif name == "learner":
            for key, s in result["streams"].items():
                measured = f"{s['ratio']:.3f}"
                if "sweep_mean" in s:  # the bar is judged on the mean over arrival orders
                    seeds = result["sweep_seeds"]
                    measured = (f"mean {s['sweep_mean']:.3f} over orders {seeds[0]}-{seeds[-1]} (min {s['sweep_min']:.3f}); "
                                f"order {result['seed']}: {s['ratio']:.3f}")
                lines.append(f"| learner | {key}: utility >= 95% of hindsight after {s['requests']} requests | "
                             f"{measured} ({'met' if s['meets_bar'] else 'not met'}) | acc {s['accuracy']:.3f} |")
        else:
            lines += sampling_headline(name, result)
    lines.append("")
    (out / "summary.md").write_text("\n".join(lines), encoding="utf-8")
    slim = {k: {kk: vv for kk, vv in v.items() if kk not in ("pair", "regret", "random_matched")}
            for k, v in results.items()}
    (out / "summary.json").write_text(json_text(slim), encoding="utf-8")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ponder eval", description=__doc__.split("\n\n")[0])
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--suite", choices=[*ALL_SUITES, "all"])
    what.add_argument("--table", nargs="+", metavar="FILE", help="CSV/JSONL files or globs, read as one table")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--format", choices=["routellm", "routerbench", "jsonl"], help="default: guessed")
    p.add_argument("--models", nargs="+", help="RouteLLM CSV: the model columns (default: every 0/1 or score column)")
    p.add_argument("--strong", help="the strong model of the two-arm metrics (default: the most accurate)")
    p.add_argument("--weak", help="the weak model (default: the most accurate arm costing <= 1/5 of the strong)")
    p.add_argument("--prices", help="a price file like evals/price_table.yaml, merged over the shipped one")
    p.add_argument("--buckets", choices=["auto", "classifier", "group", "both"], default="auto",
                   help="learner buckets: the classifier's task x tier, the table's groups x tier, or both "
                        "(auto: both for mmlu-pro and bbh-effort)")
    p.add_argument("--leak-free", choices=["source-out", "cross-fit"], default="source-out",
                   help="how the classifier scores are kept from seeing the table (see docs/eval.md)")
    p.add_argument("--train-subsample", type=positive_int,
                   help="fit the classifier on ~N prompts per source (quick looks)")
    p.add_argument("--no-classifier", action="store_true", help="score by prompt length only (plumbing tests)")
    p.add_argument("--limit", type=positive_int, help="replay a seeded sample of N prompts (quick looks)")
    p.add_argument("--steps", type=positive_int, help="points in each lambda sweep (default 10)")
    p.add_argument("--docs", type=Path, help="with --suite all: copy the headline plots to DOCS/img and the summary "
                   "table into DOCS/eval.md (between its results markers)")
    return p


DOC_PLOTS = {"mmlu-pro": ("cost_accuracy", "tiers"), "bbh-effort": ("cost_accuracy",), "gsm8k-2": ("pgr",),
             "mmlu-2": ("pgr",)}
START, END = "<!-- results:start -->", "<!-- results:end -->"


def update_docs(docs: Path, out: Path, results: dict[str, dict]) -> None:
    """Refresh docs/eval.md's results block and docs/img/eval-*.png from a `--suite all` run."""
    import shutil

    images = docs / "img"
    images.mkdir(parents=True, exist_ok=True)
    shown = []
    for suite, plots in DOC_PLOTS.items():
        for plot in plots:
            if (out / suite / f"{plot}.png").exists():
                shutil.copyfile(out / suite / f"{plot}.png", images / f"eval-{suite}-{plot}.png")
                shown.append(f"![{suite} {plot}](img/eval-{suite}-{plot}.png)")
    learner = results.get("learner", {}).get("streams", {})
    for key, stream in learner.items():
        if stream.get("plot") and key.endswith("lambda=100"):
            target = f"eval-learner-{stream['plot']}"
            shutil.copyfile(out / "learner" / stream["plot"], images / target)
            shown.append(f"![learner {key}](img/{target})")
    summary = (out / "summary.md").read_text(encoding="utf-8").split("\n", 2)[2]
    block = f"{START}\n{summary.strip()}\n\n" + "\n".join(shown) + f"\n{END}"
    page = docs / "eval.md"
    text = page.read_text(encoding="utf-8") if page.exists() else f"# Evaluation\n\n{START}\n{END}\n"
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    page.write_text(head + block + tail, encoding="utf-8")


def cli(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    def log(message: str) -> None:
        print(f"ponder eval: {message}", file=sys.stderr, flush=True)

    try:
        args.out.mkdir(parents=True, exist_ok=True)  # a file there, or no permission: said, not a traceback
        if args.table:
            if args.leak_free == "cross-fit" and not args.no_classifier:
                # cross-fitting holds out folds of the classifier's own training data; a user's prompts
                # are not in it, so the "in-distribution" scores would be the zero-shot fit, mislabelled
                raise RefusedInput("--leak-free cross-fit is for the built-in suites, whose prompts the classifier "
                                 "is trained on; a --table's prompts are not, so their scores are zero-shot "
                                 "whatever the mode: use --leak-free source-out (the default)")
            result = run_routing(args, None, args.out, log)
            log(f"wrote {args.out / 'report.md'}")
            print("\n".join(headline("table", result)) or f"see {args.out / 'report.md'}")
            return 0
        names = ALL_SUITES if args.suite == "all" else (args.suite,)
        results: dict[str, dict] = {}
        for name in names:
            out = args.out / name if args.suite == "all" else args.out
            started = time.time()
            if name in SAMPLING_SUITES:
                from evals.sampling import run_suite

                results[name] = run_suite(name, out)
            elif name == "learner":
                results[name] = run_learner(args, out, log)
            else:
                results[name] = run_routing(args, name, out, log)
            log(f"{name}: wrote {out / 'report.md'} ({time.time() - started:.0f} s)")
        if args.suite == "all":
            write_summary(args.out, results)
            log(f"wrote {args.out / 'summary.md'}")
            if args.docs:
                update_docs(args.docs, args.out, results)
                log(f"updated {args.docs / 'eval.md'} and {args.docs / 'img'}")
        for name, result in results.items():
            rows = headline(name, result) if name in ROUTING_SUITES else []
            print("\n".join(rows) or f"{name}: see its report.md")
    except RefusedInput as exc:
        log(f"error: {exc}")
        return 2
    except (OSError, ValueError, KeyError) as exc:
        log(f"error: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())
