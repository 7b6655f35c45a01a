"""Runs one pytest selection as K pytest processes at once, for JIT-bound GPU tests (gpu_check.sh).

Most of the cold time of ``tests/test_gpu_kernels.py`` is Triton compiling kernel variants, one at a
time on one core; K processes compile K at a time (Triton's on-disk cache is shared and written
atomically). The collected test ids are dealt round-robin to the K processes; each one's output is
printed after all finish, and the exit status is the worst of theirs.

    python benchmarks/pytest_shards.py 4 -q -m gpu tests/test_gpu_kernels.py
"""

from __future__ import annotations

import subprocess
import sys


def main() -> int:
    k, args = int(sys.argv[1]), sys.argv[2:]
    selection = [a for a in args if a not in ("-q", "--quiet")]  # one -q lists the ids (-qq only counts)
    collect = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                              *selection], capture_output=True, text=True)
    ids = [line for line in collect.stdout.splitlines() if "::" in line]
    if collect.returncode != 0 or not ids:
        print(collect.stdout + collect.stderr)
        return collect.returncode or 5
    # the ids are the selection: each shard runs its ids quietly, without the shared .pytest_cache
    procs = [subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *ids[i::k]],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(min(k, len(ids)))]
    outs = [p.communicate()[0] for p in procs]
    for i, out in enumerate(outs):
        print(f"===== shard {i + 1}/{len(procs)}: {len(ids[i::k])} tests, exit {procs[i].returncode}\n{out}", flush=True)
    return max(p.returncode for p in procs)


if __name__ == "__main__":
    sys.exit(main())
