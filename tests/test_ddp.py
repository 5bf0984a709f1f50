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


def test_ddp_finder_gives_every_rank_the_same_suggestion(tmp_path):
    run(tmp_path, 2, "finder")
    rank0 = torch.load(tmp_path / "finder_rank0.pt")
    rank1 = torch.load(tmp_path / "finder_rank1.pt")
    assert rank0["suggestion"] is not None
    assert rank0 == rank1
    assert rank0["lr"] == rank0["suggestion"]


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
