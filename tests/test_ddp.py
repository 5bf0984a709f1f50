"""DDP on CPU (gloo, 2 processes): the shadows average their gradients across ranks exactly as the real model."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")

SCRIPT = Path(__file__).parent / "ddp_probe_run.py"


def run(out, processes, *mode):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    subprocess.run([sys.executable, str(SCRIPT), str(out), str(processes), *mode], check=True, env=env, timeout=600,
                   capture_output=True)


def test_ddp_halves_match_a_single_process_on_whole_batches(tmp_path):
    run(tmp_path, 1)
    run(tmp_path, 2)
    single = torch.load(tmp_path / "procs1_rank0.pt")
    rank0 = torch.load(tmp_path / "procs2_rank0.pt")
    rank1 = torch.load(tmp_path / "procs2_rank1.pt")
    # The shadows start from the same perturbation and stay identical on both ranks.
    for a, b in zip(rank0["shadows"], rank1["shadows"]):
        assert torch.equal(a, b)
    assert torch.equal(rank0["distances"], rank1["distances"])
    # d(t) under DDP equals the single-process run to float tolerance (only the order of the sums differs).
    assert rank0["distances"].shape == single["distances"].shape == (10, 2)
    torch.testing.assert_close(rank0["distances"], single["distances"], rtol=1e-9, atol=0)
    torch.testing.assert_close(rank0["real"], single["real"], rtol=1e-12, atol=1e-14)


def test_ddp_splits_the_finders_candidates_and_every_rank_gets_one_process_result(tmp_path):
    """Two processes each train about half of every grid (coarse and refined), on rank 0's batches, and gather: both
    ranks hold the same result, the one a single process makes on those batches, stacked or one at a time."""
    run(tmp_path, 2, "finder")
    run(tmp_path, 1, "finder")
    rank0, rank1, single = (torch.load(tmp_path / name, weights_only=False)  # our own results, not a checkpoint
                            for name in ("finder2_rank0.pt", "finder2_rank1.pt", "finder1_rank0.pt"))
    for vectorize in (True, False):
        a, b, one = rank0[vectorize], rank1[vectorize], single[vectorize]
        assert a["result"].suggestion is not None and a["lr"] == b["lr"] == a["result"].suggestion
        for name in ("lrs", "exponents", "loss_ratio", "losses", "learning"):
            torch.testing.assert_close(getattr(a["result"], name), getattr(b["result"], name), rtol=0, atol=0,
                                       equal_nan=True)
        # the split: disjoint shares that cover the grid, about half each
        assert not set(a["trained"]) & set(b["trained"])
        assert sorted(a["trained"] + b["trained"]) == sorted(one["trained"]) or not vectorize
        assert abs(len(a["trained"]) - len(b["trained"])) <= 2 and len(a["trained"]) >= 4
        # the result is one process's on rank 0's batches
        assert torch.equal(a["result"].lrs, one["result"].lrs)
        assert a["result"].suggestion == pytest.approx(one["result"].suggestion, rel=1e-12)
        for name in ("exponents", "loss_ratio", "losses"):
            torch.testing.assert_close(getattr(a["result"], name), getattr(one["result"], name), rtol=1e-9,
                                       atol=1e-12, equal_nan=True)
        assert a["result"].model_steps == one["result"].model_steps


def test_ddp_tangents_are_reduced_like_the_gradients(tmp_path):
    """Each rank's Hessian-vector products are averaged as DDP averages the gradients: the spectrum and the sharpness
    equal one process's on whole batches, and every rank holds the same."""
    run(tmp_path, 1, "tangent")
    run(tmp_path, 2, "tangent")
    single = torch.load(tmp_path / "tangent1_rank0.pt")
    rank0 = torch.load(tmp_path / "tangent2_rank0.pt")
    rank1 = torch.load(tmp_path / "tangent2_rank1.pt")
    assert single["trusted"] and rank0["trusted"] and rank1["trusted"]  # the replayed gradients matched the real ones
    assert torch.equal(rank0["spectrum"], rank1["spectrum"]) and torch.equal(rank0["sharpness"], rank1["sharpness"])
    assert rank0["spectrum"].shape == single["spectrum"].shape == (8, 3)  # 9 steps; momentum: from the second
    torch.testing.assert_close(rank0["spectrum"], single["spectrum"], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(rank0["sharpness"], single["sharpness"], rtol=1e-7, atol=0)
