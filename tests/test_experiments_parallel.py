"""Experiment repeats shared between torchrun ranks give the single-process records."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from test_experiments import ROOT, _tiny_table2b

import compare_optimizers  # noqa: E402 - on sys.path through test_experiments
from parallel import run_jobs


def test_run_jobs_in_one_process_runs_every_job_in_order() -> None:
    seen = []
    assert run_jobs([(1,), (2,), (3,)], lambda a: seen.append(a) or a * 10) == [10, 20, 30]
    assert seen == [1, 2, 3]


def test_torchrun_two_ranks_give_the_single_process_records(tmp_path: Path) -> None:
    cfg = _tiny_table2b(tmp_path)
    config = json.loads(cfg.read_text())
    config["quick"]["repeats"] = 1  # two jobs: one per rank
    cfg.write_text(json.dumps(config))
    out = tmp_path / "out"
    # torchrun gives each of its processes one thread (OMP_NUM_THREADS=1): so does the reference below,
    # because float32 sums over several threads may differ in the last bit
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "experiments/compare_optimizers.py"), "table2b", "--config", str(cfg), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    runs = {(r["optimizer"], r["repeat"]): r for r in results["runs"]}
    assert list(runs) == [("sgdm", 0), ("adam", 0)]  # the single-process order
    assert len(results["table"]) > 0 and (out / "table.md").exists()
    # rank 1 ran job 1; recompute it here, in one process with one thread
    c = json.loads(cfg.read_text())["quick"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        want = compare_optimizers.run_repeat(c, "adam", 0, compare_optimizers.make_data(c, c["seed"]), tmp_path / "ref")
    finally:
        torch.set_num_threads(threads)
    assert runs[("adam", 0)]["losses"] == want["losses"]
    assert runs[("adam", 0)]["hessians"] == want["hessians"]
