"""Offline what-if on saved bench_finder.py results: τ of a "top of the learning band" rule instead of the onset.

The rule: among the swept η that learn, take the largest whose window loss ratio is within ``k`` times the best
ratio of the sweep, and divide it by ``margin``. τ at that η is interpolated (log-linear in η) between the measured
grid τ around it: an estimate, not a measurement. The rule is evaluated on all eight tasks at once, so nothing here
is held out: it is a lead for the next benchmark, not evidence for a default.

    python benchmarks/analyze_learning_edge.py
"""

import json, gzip, math, statistics
data = {}
for f in ["benchmarks/results/finder_run3_cpu.json.gz", "benchmarks/results/finder_heldout_cpu.json.gz"]:
    d = json.load(gzip.open(f))
    data.update(d["tasks"])
def key(lr, seed): return f"{lr:.6g}@{seed}"
def tau_near(task, lr, seed):
    grid = task["grid"]
    # log-linear interpolation of tau between the grid points around lr (inf if either neighbour never)
    lo = max([g for g in grid if g <= lr * 1.0000001], default=None); hi = min([g for g in grid if g >= lr * 0.9999999], default=None)
    t = lambda g: task["runs"][[k for k in task["runs"] if k.endswith(f"|{seed}") and abs(float(k.split("|")[0]) - g) / g < 1e-4][0]]["tau"]
    if lo is None or hi is None: return math.inf
    a, b = t(lo), t(hi)
    if lo == hi: return a
    if math.isinf(a) or math.isinf(b): return max(a, b) if not (math.isinf(a) and math.isinf(b)) else math.inf
    w = (math.log(lr) - math.log(lo)) / (math.log(hi) - math.log(lo))
    return a * (1 - w) + b * w
def rule_top(chaos, k, margin):
    lrs, ratios, learning = chaos["lrs"], chaos["loss_ratio"], chaos["learning"]
    best = min(r for r, l in zip(ratios, learning) if l) if any(learning) else None
    if best is None: return None
    ok = [lr for lr, r, l in zip(lrs, ratios, learning) if l and r <= best * k]
    return max(ok) / margin
for k in (1.25, 1.5, 2.0, 3.0):
  for margin in (1.0, 1.25, 1.5, 2.0):
    worst = 0; rows = []
    for name, task in data.items():
        taus = []
        best_grid = min(statistics.median(task["runs"][[kk for kk in task["runs"] if kk.endswith(f"|{s}") and abs(float(kk.split("|")[0]) - g)/g < 1e-4][0]]["tau"] for s in task["seeds"]) for g in task["grid"])
        for f in task["finders"][:3]:
            lr = rule_top(f["chaos"], k, margin)
            taus.append(tau_near(task, lr, f["seed"]) if lr else math.inf)
        ratio = statistics.median(taus) / best_grid
        rows.append(f"{name}:{ratio:.2f}")
        worst = max(worst, ratio)
    print(f"k={k} m={margin} worst={worst:.2f} ", " ".join(rows))
