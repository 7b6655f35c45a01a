"""Run folders: the same records in every process, resumed bit for bit after SIGKILL, corrupt files refused.

The experiment is ``equal_loss.py`` on a tiny Table 7 config (2 optimizers, checkpoints
every 2 of 12 steps, snapshots and Hessians, then the equal-loss pairs and the SGD+M
restarts of Figure 1(a)): every resumable stage of the drivers. Each run is a
subprocess with one thread, so runs compare bit for bit.
"""

from __future__ import annotations

import doctest
import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

import fasthess

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

import checkpoint  # noqa: E402
import equal_loss  # noqa: E402
import seeding  # noqa: E402



def _config(folder: Path) -> Path:
    config = json.loads((ROOT / "experiments/configs/table7.json").read_text())
    q = config["quick"]
    q.update(steps=12, checkpoint_every=2, repeats=1, num_samples=5, eval_steps=[6, 12],
             snapshot_steps=list(range(0, 13, 2)))
    q["model"].update(vocab=12, d_model=8, heads=2, enc_layers=1, dec_layers=1, ff=8)
    q["data"] = {"train_examples": 32, "src_len": 4, "tgt_len": 4, "batch": 8, "hessian_examples": 16,
                 "hessian_micro_batch": 8}  # random integer targets: no data files
    q["equal_loss"]["other_steps"] = [4]
    q["restart"]["steps"] = 6
    path = folder / "cfg.json"
    path.write_text(json.dumps(config))
    return path


def _start(cfg: Path, out: Path, hash_seed: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONHASHSEED": str(hash_seed), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "experiments/equal_loss.py"), "table7", "--config", str(cfg), "--out", str(out)]
    with open(out.parent / f"{out.name}.log", "ab") as log:  # the child keeps its own handle
        return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)


def _finish(proc: subprocess.Popen, out: Path) -> None:
    code = proc.wait(timeout=300)
    assert code == 0, (out.parent / f"{out.name}.log").read_text()[-3000:]


def _files(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if p.is_file() and not p.name.endswith(".tmp")] if out.exists() else []


def _outputs(out: Path) -> dict:
    """What a run leaves: records (losses, R_med of the Hessian entries, pairs, restarts), table, snapshot weights."""
    result = json.loads((out / "equal_loss.json").read_text())
    del result["meta"]  # versions, git commit
    for run in result["runs"]:
        del run["seconds"]  # of the process that finished it
    snapshots = {p.name: torch.load(p, weights_only=True)["model"] for p in (out / "snapshots").glob("*.pt")}
    return {"records": result, "table": (out / "table.md").read_text(), "snapshots": snapshots}


def _assert_identical(got: dict, want: dict) -> None:
    assert got["records"] == want["records"]
    assert got["table"] == want["table"]
    assert sorted(got["snapshots"]) == sorted(want["snapshots"])
    for name, state in want["snapshots"].items():
        for key, tensor in state.items():
            assert torch.equal(got["snapshots"][name][key], tensor), f"{name} {key}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One uninterrupted run: its config and run folder."""
    folder = tmp_path_factory.mktemp("reference")
    cfg, out = _config(folder), folder / "out"
    _finish(_start(cfg, out, hash_seed=1), out)
    assert json.loads((out / "equal_loss.json").read_text())["restarts"], "no pair matched: the restarts did not run"
    return cfg, out


@pytest.mark.parametrize("module", [checkpoint, seeding], ids=lambda m: m.__name__)
def test_docstring_examples(module) -> None:  # noqa: ANN001
    result = doctest.testmod(module, verbose=False)
    assert result.attempted > 0 and result.failed == 0


# ----------------------------------------------------------------------------- seeds
def test_derived_seeds_are_stable_and_typed() -> None:
    seeds = {seeding.derive_seed(*p) for p in [(0,), (1,), ("0",), (0, 1), (0, "run", 0, 1), (0, "run", 1, 0)]}
    assert len(seeds) == 6 and all(0 <= s < 2**63 for s in seeds)
    with pytest.raises(TypeError, match="ints and strings"):
        seeding.derive_seed(0, 1.5)
    g1, g2 = seeding.seed_step(3, "run", 0, 5), seeding.seed_step(3, "run", 0, 5)
    assert torch.equal(torch.randint(100, (8,), generator=g1), torch.randint(100, (8,), generator=g2))


def test_two_processes_with_different_hash_seeds_write_identical_records(
    reference: tuple[Path, Path], tmp_path: Path
) -> None:
    cfg, want = reference
    out = tmp_path / "out"
    _finish(_start(cfg, out, hash_seed=2), out)
    _assert_identical(_outputs(out), _outputs(want))


# ----------------------------------------------------------------------------- SIGKILL and resume
def test_runs_killed_at_random_points_resume_to_the_uninterrupted_records(
    reference: tuple[Path, Path], tmp_path: Path
) -> None:
    """SIGKILL one run at seeded random points, resume it to the end: the records are the uninterrupted run's."""
    cfg, want = reference
    total, kills = len(_files(want)), 5  # 26 files: more kills would land between the same two files
    rng = random.Random(14)
    # kill once the run folder holds this many files: one random point in each of `kills` equal stretches of the run
    thresholds = [1 + int((k + rng.random()) * (total - 3) / kills) for k in range(kills)]
    out, done = tmp_path / "out", []
    for n, threshold in enumerate(thresholds):
        threshold = max(threshold, len(_files(out)) + 1)  # each run gets further than the last
        proc = _start(cfg, out, hash_seed=100 + n)
        while proc.poll() is None and len(_files(out)) < threshold:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.3))  # land anywhere in a step, a Hessian or a save
        if proc.poll() is not None:
            _finish(proc, out)
            break
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
        files = _files(out)
        newest = max(files, key=lambda p: p.stat().st_mtime_ns).relative_to(out) if files else None
        done.append({"files": len(files), "newest": str(newest), "records": len(list(out.glob("runs/*.json"))),
                      "mid_save": [str(p.relative_to(out)) for p in out.rglob("*.tmp")]})
    _finish(_start(cfg, out, hash_seed=999), out)  # resume until done
    for k in done:
        print(f"killed at {k['files']}/{total} files, newest {k['newest']}, mid-save {k['mid_save']}")
    assert len(done) >= kills - 1, f"the run finished before most kill points: {done}"
    assert {k["records"] < 2 for k in done} == {True, False}, "kills in training and after it"
    _assert_identical(_outputs(out), _outputs(want))


# ----------------------------------------------------------------------------- corrupt and foreign files
def _snapshot_of_folder(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}


def _driver(cfg: Path, out: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["equal_loss.py", "table7", "--config", str(cfg), "--out", str(out)])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the reference run
    try:
        equal_loss.main()
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("damage", ["truncated", "zero bytes"])
def test_a_corrupt_checkpoint_is_named_and_the_finished_results_survive(
    damage: str, reference: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg, want = reference
    out = tmp_path / "out"
    shutil.copytree(want, out)
    (out / "runs/adam-r0.json").unlink()  # adam was killed after its last checkpoint, before its record
    ckpt = out / "checkpoints/adam-r0.pt"
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2] if damage == "truncated" else b"")
    before = _snapshot_of_folder(out)
    with pytest.raises(checkpoint.CheckpointError) as err:
        _driver(cfg, out, monkeypatch)
    print(f"{damage}: {err.value}")
    assert str(ckpt) in str(err.value) and "cannot be read" in str(err.value)
    assert "delete it" in str(err.value) and "--out" in str(err.value)
    assert _snapshot_of_folder(out) == before  # nothing deleted or overwritten, the corrupt file included
    ckpt.unlink()  # the fix the error names: that repeat trains again, the rest is kept
    _driver(cfg, out, monkeypatch)
    _assert_identical(_outputs(out), _outputs(want))


def test_a_corrupt_snapshot_names_the_snapshot_and_its_record(
    reference: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg, want = reference
    out = tmp_path / "out"
    shutil.copytree(want, out)
    (out / "equal_loss/losses-r0.json").unlink()  # the snapshots' losses are measured again
    snap = out / "snapshots/sgdm-r0-s2.pt"
    snap.write_bytes(snap.read_bytes()[:100])
    before = _snapshot_of_folder(out)
    with pytest.raises(checkpoint.CheckpointError, match="sgdm-r0-s2.pt cannot be read") as err:
        _driver(cfg, out, monkeypatch)
    assert str(out / "runs/sgdm-r0.json") in str(err.value)
    assert _snapshot_of_folder(out) == before


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204 - what a malicious checkpoint does when unpickled
        return (os.mkdir, (str(self.marker),))


def test_a_checkpoint_that_would_run_code_is_refused_without_running_it(tmp_path: Path) -> None:
    path, marker = tmp_path / "sgdm-r0.pt", tmp_path / "marker"
    torch.save({"model": _RunsCode(marker), "format": checkpoint.FORMAT}, path)
    with pytest.raises(checkpoint.CheckpointError, match=r"sgdm-r0.pt cannot be read .*holds objects that loading"):
        checkpoint.load(path, "any")
    assert not marker.exists()
    with zipfile.ZipFile(path) as z:  # unpickled in full (what torch.load used to do), it runs code
        pickle.loads(z.read(next(n for n in z.namelist() if n.endswith("data.pkl"))))
    assert marker.is_dir()


def test_a_checkpoint_of_another_config_or_version_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c.pt"
    checkpoint.save(path, {"x": torch.ones(2)}, "abc")
    with pytest.raises(checkpoint.CheckpointError, match=r"c.pt was written by another config .*pass a new --out"):
        checkpoint.load(path, "abd")
    monkeypatch.setattr(fasthess, "__version__", "9.9")
    with pytest.raises(checkpoint.CheckpointError, match=r"c.pt was written by fasthess .* this is fasthess 9.9"):
        checkpoint.load(path, "abc")


def test_a_record_of_another_config_is_refused_and_kept(
    reference: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg_path, want = reference
    out = tmp_path / "out"
    shutil.copytree(want, out)
    config = json.loads(cfg_path.read_text())
    config["quick"]["optimizers"]["adam"]["lr"] = 0.5
    other = tmp_path / "other.json"
    other.write_text(json.dumps(config))
    before = _snapshot_of_folder(out)
    with pytest.raises(checkpoint.CheckpointError, match="adam-r0.json was written by another config"):
        _driver(other, out, monkeypatch)
    assert _snapshot_of_folder(out) == before
