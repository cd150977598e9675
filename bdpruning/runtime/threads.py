"""CPU threads: every core this process is given, and no more.

torch starts with one intra-op thread per physical core of the *machine*, which is more than a
process restricted to fewer cores (a container's CPU set, ``taskset``) may use, and DDP's CPU
processes each start that many again. :func:`configure_threads` sets the count to the cores
this process may run on (its CPU affinity), shared among ``processes`` processes on this
machine. The usual environment variables win (``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``,
``BDPRUNE_NUM_THREADS``); library functions never change the count, so a caller's
``torch.set_num_threads`` stands. The ``bdprune`` commands call it once at start.
"""

from __future__ import annotations

import logging
import os

import torch

__all__ = ["available_cores", "configure_threads"]

log = logging.getLogger(__name__)

_ENVIRONMENT = ("BDPRUNE_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def available_cores() -> int:
    """How many CPUs this process may run on (its affinity mask; all CPUs where there is none)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def _from_environment() -> int | None:
    for name in _ENVIRONMENT:
        value = os.environ.get(name, "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    return None


def configure_threads(processes: int = 1) -> int:
    """Set torch's intra-op threads to this process's share of the available cores (or to
    ``BDPRUNE_NUM_THREADS``/``OMP_NUM_THREADS``/``MKL_NUM_THREADS``); return the count."""
    count = _from_environment() or max(1, available_cores() // max(1, processes))
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)
    log.debug("%d CPU threads (%d cores available, %d process(es))", count, available_cores(), processes)
    return count
