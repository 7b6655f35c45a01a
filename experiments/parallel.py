"""Share an experiment's independent jobs (optimizer × repeat) between the ranks of ``torchrun``.

Under ``torchrun --nproc_per_node=N driver.py ...`` (anything that sets ``RANK`` and
``WORLD_SIZE``), rank ``r`` runs jobs ``r, r + N, r + 2N, ...``. Each job writes its
finished record into the run folder (the drivers' resume mechanism), so once every
rank has passed a barrier, rank 0 collects all records by calling each job again:
a finished job just reads its record back. Every job seeds itself from the config
and its own (optimizer, repeat), so its record is the one a single-process run
writes; only which process computes it changes.

A rank that dies makes the barrier fail on the others (and torchrun stops them
all); a rank still working is waited for up to ``timeout_hours``, as jobs can be
uneven by hours.

Example (one process: the jobs run in order):
    >>> run_jobs([(1, 2), (3, 4)], lambda a, b: a + b)
    [3, 7]
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import TypeVar

T = TypeVar("T")


def run_jobs(jobs: Sequence[tuple], fn: Callable[..., T], timeout_hours: float = 48.0) -> list[T] | None:
    """Run ``fn(*job)`` for every job, shared between the ranks; every result on rank 0, ``None`` elsewhere.

    Args:
        jobs: argument tuples, in the order of the returned list.
        fn: runs one job and saves its result so that calling it again returns the saved result.
        timeout_hours: how long a rank that finished waits for the others.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return [fn(*job) for job in jobs]
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    created = not dist.is_initialized()
    if created:  # a barrier is all the ranks share: gloo, whatever the device
        dist.init_process_group("gloo", timeout=timedelta(hours=timeout_hours))
    try:
        for job in jobs[rank::world]:
            fn(*job)
        dist.barrier()  # every record is in the run folder
        return [fn(*job) for job in jobs] if rank == 0 else None
    finally:
        if created:
            dist.destroy_process_group()
