"""The chaos finder against the learning-rate-free optimizers, side by side on the same seeds (issue #15).

For every task of the README's table of record (its 20 rows, in its order) it prints, on the seeds that both the
finder's runs and the anchors' runs hold:

* the finder's median τ, the task's own optimizer at the finder's default suggestion, by ``--default``:

  - ``r6`` (the default, the finder's rule now): the lower of the end-of-window band's top and the speed band's top
    (``analyze_speed_rule.r6_min_level90``), over margin 2 under adaptive optimizers, else 1.5;
  - ``r0`` (the old default, the README table's runs of record): the end-of-window band's top over margin 2.5 under
    adaptive optimizers, else 1.5;
* the anchors' median τ: Prodigy, D-Adapt Adam, DoG (averaged), schedule-free AdamW at its default LR, and
  schedule-free AdamW at the finder's suggestion (re-measured with the fixed harness; the ``sf_adamw_chaos`` rows of
  ``anchors_cpu.json.gz`` were made with a harness bug and are not read);
* the finder's total cost, median over seeds of (the sweep's model steps + τ), next to Prodigy's τ;
* whether the finder's median τ is below Prodigy's, and on how many seeds its τ is below Prodigy's (ties apart).

Where the finder's τ comes from under ``--default r6``: the re-run sweeps of ``analyze_speed_rule.RECORD_SWEEPS_FILES``
(``speed_record_sweeps*_cpu``, seeds 0–9 of every task, loss curves saved); per seed, top = ``r6_min_level90`` of the
sweep, suggestion = top / margin (none where top is None or at least the sweep's max_lr: τ never), and τ the run
measured at that η for that seed (the oracle grids of ``RECORD_GRID_FILES`` and ``speed_measured_cpu``, read by
``analyze_speed_rule.load_record``; never interpolated: a seed without a measured run is reported and left out of the
finder's column). The sweep's cost is its own ``model_steps``.

Where the finder's τ comes from under ``--default r0`` (the same runs and the same rule as
``bench_finder.readme_table`` when it was made):

* the 13 tasks under SGD: runs 4 and 5 (``finder_run4_cpu``, ``finder_run4_fashion_cnn_cpu``, ``finder_run5a/b_cpu``),
  τ at edge/1.5 of each seed's trainability-anchored sweep;
* ``digits_adam`` and ``digits_cnn_adam``: ``finder_run45_adam_resuggest_cpu`` (re-measured at edge/2.5, the margin
  ``"auto"`` adopted after held-out set 4);
* held-out set 4: ``finder_heldout4a/b_cpu`` and ``finder_heldout4_fashion_cnn_adam_h100`` (τ at edge/2.5).

With ``--default r0``, ``--current`` reads the 13 SGD tasks from the ``--resuggest`` files instead (the finder with its stacked optimizer
step, as it is now; the suggestion moved on 12 of 300 seeds).

The sweep's cost under ``r0``: ``model_steps`` of the default (trainability-anchored) sweep where the saved run has
it; none of the finder's saved runs of record does, so it is estimated as ``len(lrs) × 2 × steps_per_lr`` (one reference and one shadow per
swept η), an upper bound: the finder drops candidates that diverged (``anchors_*.json.gz`` recorded the real count
for schedule-free AdamW sweeps: 2460–3000 of the 3000 this estimate gives).

τ = "never" counts as ∞ (a median is never when at least half the seeds fail). Tasks that share one network, one
dataset and one target (``bench_anchors``' fingerprint; marked ``= X``) share the anchors' runs: only the finder's
runs differ between them. The seeds are those of the runs of record and the anchors' (0–9 on the MLPs, the anchors'
seeds on the CNNs) under either rule.

    python benchmarks/anchors_table.py                         # markdown to stdout, the finder at R6
    python benchmarks/anchors_table.py --default r0            # the old default (the README table's runs)
    python benchmarks/anchors_table.py --default r0 --current  # its SGD rows from the --resuggest files
"""

import argparse
import contextlib
import gzip
import io
import json
import logging
import math
import os
import statistics
import sys
import warnings
from typing import Any, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import analyze_speed_rule
import tasks
from bench_finder import (
    NEVER,
    _key,
    anchored_sweep,
    default_margin,
    load_run,
    merge_runs,
)

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

# The README's table (docs/benchmarks/README.md), row by row.
TABLE_ORDER = (
    "digits_mlp", "digits_cnn", "mnist_mlp", "digits_raw", "digits_mom",
    "fashion_mlp", "fashion_cnn", "digits_relu",  # set 1
    "digits_deep", "fashion_relu", "digits_b16",  # set 2
    "digits_adam", "digits_dropout", "mnist_relu_mom", "digits_cnn_adam",  # set 3
    "mnist_adam", "digits_rmsprop", "fashion_relu_adamw", "digits_deep_adam", "fashion_cnn_adam",  # set 4
)
ADAPTIVE = ("digits_adam", "digits_cnn_adam", "mnist_adam", "digits_deep_adam", "fashion_relu_adamw",
            "digits_rmsprop", "fashion_cnn_adam")
ADAM_RESUGGEST = ("digits_adam", "digits_cnn_adam")
SET4 = ("mnist_adam", "digits_rmsprop", "fashion_relu_adamw", "digits_deep_adam", "fashion_cnn_adam")
SGD = tuple(t for t in TABLE_ORDER if t not in ADAM_RESUGGEST and t not in SET4)

RECORD_FILES = {  # files -> the tasks taken from them
    ("finder_run4_cpu.json.gz", "finder_run4_fashion_cnn_cpu.json.gz", "finder_run5a_cpu.json.gz",
     "finder_run5b_cpu.json.gz"): SGD,
    ("finder_run45_adam_resuggest_cpu.json.gz",): ADAM_RESUGGEST,
    ("finder_heldout4a_cpu.json.gz", "finder_heldout4b_cpu.json.gz",
     "finder_heldout4_fashion_cnn_adam_h100.json.gz"): SET4,
}
CURRENT_SGD_FILES = ("finder_run4_resuggest_cpu.json.gz", "finder_run5_resuggest1_cpu.json.gz",
                     "finder_run5_resuggest2_cpu.json.gz", "finder_run5_resuggest3_cpu.json.gz")

# The rule behind the finder's column: its margins (under SGD, under an adaptive optimizer).
MARGINS = {"r6": {"sgd": 1.5, "adaptive": 2.0}, "r0": {"sgd": 1.5, "adaptive": 2.5}}
RULE_TEXT = {
    "r6": "R6, the finder's default now: the lower of the end band's and the speed band's tops / 1.5 (SGD) or 2 "
          "(adaptive), replayed on the re-run sweeps (speed_record_sweeps*_cpu) with τ measured at that η",
    "r0": "R0, the old default: the top of the end-of-window band / 1.5 (SGD) or 2.5 (adaptive), the runs of record",
}

ANCHORS_FILE = "anchors_cpu.json.gz"
SF_CHAOS_FILE = "anchors_sf_chaos_cpu.json.gz"  # schedule-free AdamW at the finder's suggestion, harness fixed
COLUMNS = (("prodigy", "Prodigy"), ("dadapt_adam", "D-Adapt Adam"), ("dog", "DoG (avg.)"),
           ("sf_adamw", "SF-AdamW (default LR)"), ("sf_adamw_chaos", "SF-AdamW @ finder"))


def _path(name: str) -> str:
    return name if os.path.exists(name) else os.path.join(RESULTS, name)


def _load_gz(name: str) -> dict:
    with gzip.open(_path(name), "rt") as fh:
        return json.load(fh)


def _margin(name: str, rule: str) -> float:
    """The rule's margin on task ``name``; the table's adaptive tasks must be the ones ``margin="auto"`` counts."""
    adaptive = name in ADAPTIVE
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        auto = default_margin(tasks.TASKS[name])
    if adaptive != (auto > MARGINS["r6"]["sgd"]):
        raise ValueError(f"{name}: ADAPTIVE says {adaptive}, margin='auto' gives {auto}")
    return MARGINS[rule]["adaptive" if adaptive else "sgd"]


def finder_runs_r6() -> tuple[dict[str, dict], list[str]]:
    """(per task of the table: {seed: {"tau", "lr", "sweep_steps", "estimated", "margin"}} at R6's suggestion,
    the seeds whose τ at that suggestion was never measured: left out, listed as "task seed s: η")."""
    record = analyze_speed_rule.load_record(
        [_path(f) for f in analyze_speed_rule.RECORD_SWEEPS_FILES if os.path.exists(_path(f))])
    out: dict[str, dict] = {}
    missing: list[str] = []
    for name in TABLE_ORDER:
        if name not in record:
            raise ValueError(f"{name}: no re-run sweeps in {analyze_speed_rule.RECORD_SWEEPS_FILES}")
        task, finders = record[name]
        margin = _margin(name, "r6")
        per_seed: dict[int, dict] = {}
        for finder in finders:
            seed, sweep = finder["seed"], finder["chaos"]
            if seed in per_seed:
                raise ValueError(f"{name} seed {seed}: two re-run sweeps")
            top = analyze_speed_rule.r6_min_level90(sweep)
            lr = None if top is None or top >= max(sweep["lrs"]) else top / margin
            tau = NEVER if lr is None else analyze_speed_rule._measured(task["runs"], lr, seed)
            if tau is None:
                missing.append(f"{name} seed {seed}: {lr:.4g}")
                continue
            steps: Optional[int] = sweep.get("model_steps")
            estimated = steps is None
            if estimated:
                steps = len(sweep["lrs"]) * 2 * sweep["steps_per_lr"]
            per_seed[seed] = {"tau": tau, "lr": lr, "sweep_steps": steps, "estimated": estimated, "margin": margin}
        out[name] = per_seed
    return out, missing


def finder_runs(current: bool = False) -> dict[str, dict]:
    """Per task of the table: {seed: {"tau", "lr", "sweep_steps", "estimated", "margin"}} at R0's suggestion (the old
    default: the end band's top / 1.5, or 2.5 under adaptive optimizers), from the runs of record."""
    sources = dict(RECORD_FILES)
    if current:
        sources[CURRENT_SGD_FILES] = SGD
        del sources[next(files for files, names in RECORD_FILES.items() if names == SGD)]
    out: dict[str, dict] = {}
    for files, names in sources.items():
        merged = merge_runs([load_run(_path(f)) for f in files])
        for name in names:
            data = merged["tasks"][name]
            margin = _margin(name, "r0")
            per_seed: dict[int, dict] = {}
            for finder in data["finders"]:
                seed = finder["seed"]
                if seed not in data["seeds"]:  # timing-only finder runs
                    continue
                sweep = anchored_sweep(finder, "trainability_edge")
                if sweep is None:
                    raise ValueError(f"{name} seed {seed}: no trainability-anchored sweep saved")
                edge = sweep.get("trainability_edge")
                lr = None if edge is None else edge / margin
                tau = NEVER if lr is None else data["runs"][_key(lr, seed)]["tau"]
                steps: Optional[int] = sweep.get("model_steps")
                estimated = steps is None
                if estimated:
                    steps = len(sweep["lrs"]) * 2 * sweep["steps_per_lr"]
                per_seed[seed] = {"tau": tau, "lr": lr, "sweep_steps": steps, "estimated": estimated,
                                  "margin": margin}
            out[name] = per_seed
    return out


def anchor_runs() -> tuple[dict[tuple[str, str], dict[int, dict]], dict[str, str], dict[str, int]]:
    """({(task, anchor): {seed: run}}, {task: the task whose anchor runs it shares}, SF@finder sweeps' model steps).

    ``sf_adamw_chaos`` is read from the re-measured file only; a task that file has not reached yet takes the runs of
    the task it shares them with (``shared_from`` in ``anchors_cpu.json.gz``), as ``bench_anchors`` would copy them.
    """
    runs: dict[tuple[str, str], dict[int, dict]] = {}
    shared: dict[str, str] = {}
    for run in _load_gz(ANCHORS_FILE)["runs"].values():
        if run["anchor"] == "sf_adamw_chaos" or "@" in run["anchor"]:
            continue
        runs.setdefault((run["task"], run["anchor"]), {})[run["seed"]] = run
        if run.get("shared_from"):
            shared[run["task"]] = run["shared_from"]
    sf_steps: dict[tuple[str, int], int] = {}
    if os.path.exists(_path(SF_CHAOS_FILE)):
        saved = _load_gz(SF_CHAOS_FILE)
        for run in saved["runs"].values():
            if run["anchor"] == "sf_adamw_chaos":
                runs.setdefault((run["task"], "sf_adamw_chaos"), {})[run["seed"]] = run
        for finder in saved["finders"].values():
            sf_steps[(finder["task"], finder["seed"])] = finder["model_steps"]
    for name, source in shared.items():
        if (name, "sf_adamw_chaos") not in runs and (source, "sf_adamw_chaos") in runs:
            runs[(name, "sf_adamw_chaos")] = {s: {**r, "shared_from": source}
                                              for s, r in runs[(source, "sf_adamw_chaos")].items()}
            for (task, seed), steps in list(sf_steps.items()):
                if task == source:
                    sf_steps.setdefault((name, seed), steps)
    return runs, shared, sf_steps


def sign_test(wins: int, decided: int) -> float:
    """Two-sided sign test: the chance of a split at least this uneven among ``decided`` non-tied seeds if either
    side were equally likely to be faster."""
    if decided == 0:
        return 1.0
    k = min(wins, decided - wins)
    return min(1.0, 2 * sum(math.comb(decided, i) for i in range(k + 1)) / 2**decided)


def med(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


def fmt(value: float) -> str:
    if math.isnan(value):
        return "—"
    return "never" if math.isinf(value) else f"{value:g}"


def build(current: bool = False, rule: str = "r6") -> tuple[list[dict[str, Any]], dict[str, Any]]:
    record = finder_runs(current)  # the seeds of the table are the runs of record's (and the anchors') under any rule
    missing: list[str] = []
    if rule == "r6":
        finders, missing = finder_runs_r6()
    elif rule == "r0":
        finders = record
    else:
        raise ValueError(f"rule must be 'r6' or 'r0', got {rule!r}")
    anchors, shared, sf_steps = anchor_runs()
    rows = []
    for name in TABLE_ORDER:
        if name in tasks.HELD_OUT_SET5 or name in tasks.SPEED_DESIGN:
            continue
        mine = finders[name]
        prodigy = anchors.get((name, "prodigy"), {})
        seeds = sorted(set(record[name]) & set(prodigy))
        absent = [s for s in seeds if s not in mine]
        if absent and rule == "r6":
            missing += [f"{name} seed {s}: no re-run sweep" for s in absent
                        if not any(m.startswith(f"{name} seed {s}:") for m in missing)]
        seeds = [s for s in seeds if s in mine]
        row: dict[str, Any] = {"task": name, "target": tasks.TASKS[name].target, "seeds": seeds,
                               "shared_from": shared.get(name), "margin": mine[seeds[0]]["margin"]}
        f_taus = [mine[s]["tau"] for s in seeds]
        row["finder"] = (med(f_taus), sum(not math.isinf(t) for t in f_taus), len(seeds))
        row["finder_lr"] = med([mine[s]["lr"] for s in seeds if mine[s]["lr"] is not None])
        row["sweep"] = med([mine[s]["sweep_steps"] for s in seeds])
        row["sweep_estimated"] = any(mine[s]["estimated"] for s in seeds)
        row["total"] = med([mine[s]["sweep_steps"] + mine[s]["tau"] for s in seeds])
        for anchor, _ in COLUMNS:
            got = anchors.get((name, anchor), {})
            taus = [got[s]["tau"] for s in seeds if s in got]
            row[anchor] = (med(taus), sum(not math.isinf(t) for t in taus), len(taus))
        row["sf_chaos_shared"] = any(r.get("shared_from") for r in anchors.get((name, "sf_adamw_chaos"), {}).values())
        sf = anchors.get((name, "sf_adamw_chaos"), {})
        row["sf_chaos_total"] = med([sf_steps[(name, s)] + sf[s]["tau"] for s in seeds
                                     if s in sf and (name, s) in sf_steps])
        p_taus = [prodigy[s]["tau"] for s in seeds]
        row["seed_wins"] = sum(f < p for f, p in zip(f_taus, p_taus))
        row["seed_ties"] = sum(f == p for f, p in zip(f_taus, p_taus))
        row["sign_p"] = sign_test(row["seed_wins"], len(seeds) - row["seed_ties"])
        sf_taus = [sf[s]["tau"] for s in seeds if s in sf]
        row["sf_chaos_beats_prodigy"] = bool(sf_taus) and len(sf_taus) == len(seeds) and \
            med(sf_taus) < row["prodigy"][0]
        row["beats_prodigy"] = row["finder"][0] < row["prodigy"][0]
        row["ties_prodigy"] = row["finder"][0] == row["prodigy"][0]
        row["beats_sf"] = row["finder"][0] < row["sf_adamw"][0]
        row["total_beats_prodigy"] = row["total"] < row["prodigy"][0]
        rows.append(row)

    def count(selected: list[dict], key: str) -> int:
        return sum(r[key] for r in selected)

    adaptive = [r for r in rows if r["task"] in ADAPTIVE]
    summary = {
        "rule": rule,
        "missing": missing,
        "tasks": len(rows),
        "beats_prodigy": count(rows, "beats_prodigy"),
        "ties_prodigy": count(rows, "ties_prodigy"),
        "adaptive": len(adaptive),
        "adaptive_beats_prodigy": count(adaptive, "beats_prodigy"),
        "adaptive_ties_prodigy": count(adaptive, "ties_prodigy"),
        "adaptive_beats_sf": count(adaptive, "beats_sf"),
        "adaptive_ties_sf": sum(r["finder"][0] == r["sf_adamw"][0] for r in adaptive),
        "seed_wins": count(rows, "seed_wins"),
        "seed_ties": count(rows, "seed_ties"),
        "seed_runs": sum(len(r["seeds"]) for r in rows),
        "adaptive_seed_wins": count(adaptive, "seed_wins"),
        "adaptive_seed_ties": count(adaptive, "seed_ties"),
        "adaptive_seed_runs": sum(len(r["seeds"]) for r in adaptive),
        "total_beats_prodigy": count(rows, "total_beats_prodigy"),
        "distinct_anchor_experiments": len({r["shared_from"] or r["task"] for r in rows}),
        "beats_prodigy_tasks": [r["task"] for r in rows if r["beats_prodigy"]],
        "ties_prodigy_tasks": [r["task"] for r in rows if r["ties_prodigy"]],
        "loses_prodigy_tasks": [r["task"] for r in rows if not r["beats_prodigy"] and not r["ties_prodigy"]],
        "adaptive_loses_sf_tasks": [r["task"] for r in adaptive if not r["beats_sf"]],
        "total_beats_prodigy_tasks": [r["task"] for r in rows if r["total_beats_prodigy"]],
        "sf_chaos_missing": [r["task"] for r in rows if r["sf_adamw_chaos"][2] < len(r["seeds"])],
        "sf_chaos_complete": sum(r["sf_adamw_chaos"][2] == len(r["seeds"]) for r in rows),
        "sf_chaos_beats_prodigy": count(rows, "sf_chaos_beats_prodigy"),
        "sf_chaos_sweep_steps": sorted(set(sf_steps.values())),
        "significant_wins": [r["task"] for r in rows if r["beats_prodigy"] and r["sign_p"] < 0.05],
        "significant_losses": [r["task"] for r in rows if not r["beats_prodigy"] and r["sign_p"] < 0.05],
    }
    return rows, summary


def _cell(value: tuple[float, int, int], seeds: int) -> str:
    tau, reached, n = value
    if n == 0:
        return "—"
    return f"{fmt(tau)} ({reached}/{n})" if n == seeds else f"{fmt(tau)} ({reached}/{n} of {seeds} seeds)"


def markdown(rows: list[dict[str, Any]], summary: dict[str, Any], current: bool = False) -> str:
    rule = summary["rule"]
    estimated = any(r["sweep_estimated"] for r in rows)
    source = RULE_TEXT[rule] + ("; the SGD rows from the --resuggest files" if rule == "r0" and current else "")
    cost = ("the sweep's model steps are len(lrs) × 2 × steps_per_lr (an upper bound: not recorded in these runs)"
            if estimated else "the sweep's model steps as recorded")
    lines = [
        "Median τ over the seeds both hold (optimizer steps to the target; never = ∞; in brackets the seeds that "
        "reached it). Finder: each task's own optimizer at its suggestion by "
        f"{source}. Finder total = median over seeds of (the sweep's model steps + τ); {cost}. \"= X\": the anchors' "
        "runs are X's (same network, data and target; only the optimizer differs).",
        "",
        "| task | target | seeds | finder η (median) | **finder τ** | finder sweep | **finder total** | **Prodigy τ** | "
        "D-Adapt Adam | DoG (avg.) | SF-AdamW (default LR) | SF-AdamW @ finder | its total | "
        "finder < Prodigy (median) | seeds finder < Prodigy (ties) | sign test p |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|---:|---:|",
    ]
    for r in rows:
        n = len(r["seeds"])
        seeds = f"{r['seeds'][0]}–{r['seeds'][-1]}" if r["seeds"] == list(range(r["seeds"][0], r["seeds"][-1] + 1)) \
            else ",".join(map(str, r["seeds"]))
        name = r["task"] + (f" (= {r['shared_from']})" if r["shared_from"] else "")
        if r["task"] in ADAPTIVE:
            name = f"**{name}**"
        verdict = "yes" if r["beats_prodigy"] else ("tie" if r["ties_prodigy"] else "no")
        sf_chaos = _cell(r["sf_adamw_chaos"], n)
        lines.append(
            f"| {name} | {r['target']:.0%} | {seeds} | {r['finder_lr']:.2g} | {_cell(r['finder'], n)} |"
            f" {fmt(r['sweep'])}{'*' if r['sweep_estimated'] else ''} | {fmt(r['total'])} |"
            f" {_cell(r['prodigy'], n)} | {_cell(r['dadapt_adam'], n)} | {_cell(r['dog'], n)} |"
            f" {_cell(r['sf_adamw'], n)} | {sf_chaos} | {fmt(r['sf_chaos_total'])} | {verdict} |"
            f" {r['seed_wins']}/{n} ({r['seed_ties']}) | {r['sign_p']:.2g} |"
        )
    s = summary
    lines += [
        "",
        ("\\* estimated, len(lrs) × 2 × steps_per_lr (upper bound). " if estimated else "")
        + f"**Bold** tasks: adaptive optimizer (margin {MARGINS[rule]['adaptive']:g}).",
        "",
        "Summary:",
        "",
        f"* Finder's median τ below Prodigy's on **{s['beats_prodigy']} of {s['tasks']}** tasks "
        f"(tied on {s['ties_prodigy']}; {s['distinct_anchor_experiments']} distinct anchor experiments). "
        f"Beat: {', '.join(s['beats_prodigy_tasks']) or '—'}. Tied: {', '.join(s['ties_prodigy_tasks']) or '—'}. "
        f"Lost: {', '.join(s['loses_prodigy_tasks']) or '—'}.",
        f"* Adaptive-optimizer tasks: below Prodigy on **{s['adaptive_beats_prodigy']} of {s['adaptive']}** "
        f"(tied {s['adaptive_ties_prodigy']}); below SF-AdamW at its default LR on **{s['adaptive_beats_sf']} of "
        f"{s['adaptive']}** (tied {s['adaptive_ties_sf']}; not below on: "
        f"{', '.join(s['adaptive_loses_sf_tasks']) or '—'}).",
        f"* Per seed: finder τ < Prodigy τ on **{s['seed_wins']} of {s['seed_runs']}** seed runs "
        f"({s['seed_ties']} ties); on the adaptive tasks {s['adaptive_seed_wins']} of {s['adaptive_seed_runs']} "
        f"({s['adaptive_seed_ties']} ties). Tasks that share anchor runs count Prodigy's runs more than once.",
        f"* Sign test per task (two-sided, ties dropped) below 0.05: finder faster on "
        f"{', '.join(s['significant_wins']) or '—'}; Prodigy faster on {', '.join(s['significant_losses']) or '—'}."
        " The other tasks' medians differ within seed noise.",
        f"* Total cost (sweep + τ) below Prodigy's τ on **{s['total_beats_prodigy']} of {s['tasks']}** tasks"
        f" ({', '.join(s['total_beats_prodigy_tasks']) or '—'}).",
    ]
    lines.append(f"* SF-AdamW @ finder (its sweep's model steps recorded: {s['sf_chaos_sweep_steps']}): median τ "
                 f"below Prodigy's on {s['sf_chaos_beats_prodigy']} of the {s['sf_chaos_complete']} tasks it is "
                 "complete on. (Its finder resolved `margin=\"auto\"` to 1.5: AdamWScheduleFree is not one of the "
                 "optimizers `auto_margin` counts as adaptive.)")
    if s["missing"]:
        lines.append(f"* **Not measured** (τ at the suggestion never run; those seeds are left out of the finder's "
                     f"column, not interpolated): {'; '.join(s['missing'])}.")
    if s["sf_chaos_missing"]:
        lines.append(f"* SF-AdamW @ finder (re-measured) incomplete or absent on: {', '.join(s['sf_chaos_missing'])} "
                     "(the CNNs were not re-measured with the fixed harness).")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--default", choices=("r6", "r0"), default="r6", dest="rule",
                        help="the finder's default rule behind its column: r6 (now) or r0 (the runs of record)")
    parser.add_argument("--current", action="store_true",
                        help="with --default r0: the SGD rows from the --resuggest files (the finder with its "
                             "stacked step)")
    parser.add_argument("--json", default="", help="also write the rows and the summary here")
    args = parser.parse_args()
    if args.current and args.rule != "r0":
        parser.error("--current reads the R0 runs' --resuggest files: use it with --default r0")
    for name in ("lightning.pytorch", "lightning.fabric", "lightning_chaos"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    rows, summary = build(args.current, args.rule)
    print(markdown(rows, summary, args.current))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"rows": rows, "summary": summary}, fh, default=str, indent=1)


if __name__ == "__main__":
    main()
