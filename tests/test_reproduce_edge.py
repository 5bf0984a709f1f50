"""The quick version of examples/reproduce_edge_of_chaos.py (seed 004): scaled-down checks of the papers' claims.

Fashion-MNIST comes from Debian's ``dataset-fashion-mnist`` (/usr/share/datasets/fashion-mnist); without it these
tests skip. The full run and its numbers are in docs/reproducing.md ("Seed 004: the edge of chaos").
"""

import math
import os
import sys

import pytest
import torch

pytest.importorskip("sklearn")

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
sys.path.insert(0, EXAMPLES)

import reproduce_edge_of_chaos as eoc  # noqa: E402

from lightning_chaos.functional import order_parameters  # noqa: E402

pytestmark = pytest.mark.skipif(
    not eoc.fashion_mnist_available(),
    reason=f"Fashion-MNIST is not installed in {eoc.FASHION_DIR} (Debian: apt install dataset-fashion-mnist)",
)


pytestmark = pytest.mark.usefixtures("one_thread")  # a 784 × 784 model: one thread, as the script uses


@pytest.fixture(scope="module")
def quick():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    eoc.quiet_lightning()
    fashion = eoc.load_fashion_mnist()
    results = eoc.run_protocol(eoc.QUICK, fashion, eoc.load_digits_split(), verbose=False)
    torch.set_num_threads(threads)
    return fashion, results, eoc.analyse(results)


def by_config(runs, lr, batch, momentum, weight_decay=0.0):
    found = [r for r in runs if (r.lr, r.batch_size, r.momentum, r.weight_decay) == (lr, batch, momentum, weight_decay)]
    assert found, f"no run with {(lr, batch, momentum, weight_decay)}"
    return found[0]


def test_data_and_model_follow_the_paper(quick):
    (x_train, y_train, x_test, _), _, _ = quick
    assert x_train.shape == (60_000, 784) and x_test.shape == (10_000, 784)
    assert 0.0 <= float(x_train.min()) and float(x_train.max()) == 1.0
    assert sorted(y_train.unique().tolist()) == list(range(10))
    model = eoc.EdgeMLP(lr=0.02, momentum=0.5, weight_decay=9e-5)
    j0, j = order_parameters(model.hidden.weight)
    assert model.hidden.bias is None and abs(j0) < 0.1 and j == pytest.approx(0.5, abs=0.005)
    optimizer = model.configure_optimizers()
    decays = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    assert decays[id(model.hidden.weight)] == decays[id(model.out.weight)] == pytest.approx(2 * 9e-5)  # Keras L2
    assert decays[id(model.out.bias)] == 0.0
    assert optimizer.param_groups[0]["momentum"] == 0.5


def test_j2_grows_linearly_with_the_papers_coefficient(quick):
    _, results, analysis = quick
    for row in analysis["slope_rows"]:
        assert row.r2 > 0.98, row  # linear in τ over the window
        assert eoc.PAPER_K / 2 < row.k < eoc.PAPER_K * 2, row  # k = A(1 − α)B/η within a factor 2 of the paper's 11
    for run in results.long_runs + results.short_runs:
        assert run.j2[0] == pytest.approx(0.25, abs=0.005)
        assert run.j2[-1] < 1.0  # still ordered: J < 1 at the end of these short runs


def test_the_slope_per_epoch_tracks_eta_over_one_minus_alpha_times_b(quick):
    _, results, analysis = quick
    fast = by_config(results.long_runs, 0.064, 128, 0.9)  # η/((1 − α)B) = 0.005
    slow = by_config(results.short_runs, 0.16, 128, 0.5)  # 0.0025
    rows = {(r.lr, r.batch_size, r.momentum): r for r in analysis["slope_rows"]}
    ratio = rows[(0.064, 128, 0.9)].slope_per_epoch / rows[(0.16, 128, 0.5)].slope_per_epoch
    assert fast.scale / slow.scale == pytest.approx(2.0)
    assert ratio == pytest.approx(2.0, rel=0.3)
    # and J² is one function of τ = Σ η/(1 − α): the two curves collapse
    assert analysis["collapse_short"] < 0.1


def test_weight_decay_pushes_toward_order(quick):
    _, results, analysis = quick
    plain = by_config(results.decay_runs, 0.064, 128, 0.9, 0.0)
    decayed = by_config(results.decay_runs, 0.064, 128, 0.9, 1e-3)
    assert decayed.j2[-1] < plain.j2[-1] - 0.05
    assert decayed.j2[-1] < decayed.j2[0]  # λ = 1e-3 is past the balance: J² shrinks below its start
    row = next(r for r in analysis["decay_rows"] if r.weight_decay == 1e-3)
    assert row.growth_late > 0 and math.isfinite(row.j2_balance) and row.j2_balance < 0.25


def test_the_guideline_holds_j_near_the_edge_on_digits(quick):
    _, results, analysis = quick
    probe, guided = results.digits_runs[0], results.digits_runs[1]
    assert probe.weight_decay == 0 and probe.j[-1] > 1.0  # left alone, the digits network turns chaotic
    assert 1e-4 < guided.weight_decay < 1e-2
    assert analysis["digits"][1]["j_late"] == pytest.approx(1.0, abs=0.15)


def test_paper1_jacobian_norm_is_recorded(quick):
    _, results, _ = quick
    run = results.paper1_runs[0]
    assert len(run.rows) == 1 + len(eoc.QUICK.paper1_at)
    assert all(math.isfinite(r["jacobian_norm"]) and r["jacobian_norm"] > 0 for r in run.rows)
    assert run.rows[-1]["test_loss"] < run.rows[0]["test_loss"] - 1.0  # Adam learns within a fifth of an epoch


def test_report_figures_and_raw_round_trip(quick, tmp_path):
    _, results, analysis = quick
    eoc.write_report(results, analysis, str(tmp_path), "(quick)")
    eoc.make_figures(results, analysis, str(tmp_path))
    for name in ("edge_of_chaos_summary.md", "edge_of_chaos_runs.csv", "edge_of_chaos_collapse.png",
                 "edge_of_chaos_phase.png", "edge_of_chaos_jacobian.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    summary = (tmp_path / "edge_of_chaos_summary.md").read_text()
    assert "k (exponents fixed at 1)" in summary and "Weight decay" in summary
    eoc.save_raw(results, str(tmp_path / "raw.json"))
    loaded = eoc.load_raw(str(tmp_path / "raw.json"))
    again = eoc.analyse(loaded)
    assert [r.k for r in again["slope_rows"]] == [r.k for r in analysis["slope_rows"]]
