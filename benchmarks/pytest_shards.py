"""Runs one pytest selection as K pytest processes at once, for JIT-bound GPU tests (gpu_check.sh).

Most of the cold time of ``tests/test_gpu_kernels.py`` is Triton compiling kernel variants, one at a
time on one core; K processes compile K at a time (Triton's on-disk cache is shared and written
atomically). The collected test ids are dealt round-robin to the K processes; each one's output is
printed after all finish (or, stopped by SIGTERM as ``timeout`` does, what they wrote so far), and
the exit status is the worst of theirs.

    python benchmarks/pytest_shards.py 4 -q -m gpu tests/test_gpu_kernels.py
"""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile


def main() -> int:
    k, args = int(sys.argv[1]), sys.argv[2:]
    selection = [a for a in args if a not in ("-q", "--quiet")]  # one -q lists the ids (-qq only counts)
    collect = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                              *selection], capture_output=True, text=True)
    ids = [line for line in collect.stdout.splitlines() if "::" in line]
    if collect.returncode != 0 or not ids:
        print(collect.stdout + collect.stderr)
        return collect.returncode or 5
    shards = [ids[i::k] for i in range(min(k, len(ids)))]
    logs = [tempfile.TemporaryFile(mode="w+") for _ in shards]
    # the ids are the selection: each shard runs its ids quietly, without the shared .pytest_cache
    procs = [subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *shard],
                              stdout=log, stderr=subprocess.STDOUT, text=True) for shard, log in zip(shards, logs)]

    def report(*_) -> None:
        for i, (p, log) in enumerate(zip(procs, logs)):
            log.seek(0)
            print(f"===== shard {i + 1}/{len(procs)}: {len(shards[i])} tests, exit {p.poll()}\n{log.read()}", flush=True)

    def stopped(signum, _frame) -> None:  # timeout(1) signals the whole process group: the shards stop too
        report()
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, stopped)
    for p in procs:
        p.wait()
    report()
    return max(p.returncode for p in procs)


if __name__ == "__main__":
    sys.exit(main())
