"""Which cores onnxruntime's CPU threads run on, so that they never share one.

onnxruntime splits each operator between the thread that called `run` and its pool threads, then waits for
the slowest. Left to the kernel, the calling thread was at times woken onto the core of a pool thread:
both then shared one core for the rest of the batch, and a single image took 12–17 ms instead of 6 in a
third of the drops (more with explicit thread counts, which drop onnxruntime's own pinning of the pool).
So the pool threads are pinned one per physical core, and the calling thread is held, for the length of
each `run` only, on the cores left to it; between runs it and the threads it starts may use every core.

Linux only (`os.sched_setaffinity`); elsewhere, or with more threads than cores, nothing is pinned.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

SYSFS_CPU = Path("/sys/devices/system/cpu")


@dataclass(frozen=True)
class Placement:
    """onnxruntime's thread count, its pool threads' affinity string, and the caller's cores."""

    threads: int
    pool_affinities: str  # for "session.intra_op_thread_affinities"; "" = leave the pool unpinned
    caller_cpus: frozenset[int]  # where the calling thread runs during `run`; empty = anywhere


def allowed_cpus() -> list[int]:
    """The logical CPUs this process may run on (its cpuset), in order."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def physical_cores(cpus: list[int], sysfs: Path = SYSFS_CPU) -> list[int]:
    """One logical CPU per physical core among `cpus` (hyper-threads share a core's arithmetic units, so
    two of onnxruntime's threads on one core would wait on each other). Without topology files every
    logical CPU counts as a core."""
    seen: set[frozenset[int]] = set()
    chosen = []
    for cpu in cpus:
        key = frozenset(_core_of(cpu, sysfs))
        if key not in seen:
            seen.add(key)
            chosen.append(cpu)
    return chosen


def place(requested: int, cpus: list[int] | None = None, sysfs: Path = SYSFS_CPU) -> Placement:
    """Placement for `requested` intra-op threads (0 = one per physical core) on `cpus` (default: the
    process's own). Thread 0 is the caller: it gets the first core; pool thread i is pinned to core i."""
    cpus = allowed_cpus() if cpus is None else cpus
    cores = physical_cores(cpus, sysfs)
    threads = requested or len(cores)
    if threads < 2 or threads > len(cores) or not hasattr(os, "sched_setaffinity"):
        return Placement(threads, "", frozenset())
    pool = cores[1:threads]
    caller = frozenset(cpus) - _siblings(pool, cpus, sysfs)
    # onnxruntime numbers logical processors from 1.
    return Placement(threads, ";".join(str(cpu + 1) for cpu in pool), caller)


def core_groups(threads: int, groups: int, cpus: list[int] | None = None,
                sysfs: Path = SYSFS_CPU) -> list[list[int]]:
    """The first `threads` physical cores of `cpus` (default: the process's own) split into `groups`
    groups of whole cores, as equal as can be, each with its cores' hyper-thread siblings; fewer groups
    when there are fewer cores."""
    cpus = allowed_cpus() if cpus is None else cpus
    cores = physical_cores(cpus, sysfs)[:threads]
    groups = min(groups, len(cores))
    out = []
    for index in range(groups):
        mine = cores[len(cores) * index // groups: len(cores) * (index + 1) // groups]
        out.append(sorted(_siblings(mine, cpus, sysfs)))
    return out


def _siblings(cores: list[int], cpus: list[int], sysfs: Path) -> set[int]:
    """`cores` and their hyper-thread siblings among `cpus`."""
    taken = set(cores)
    for cpu in cores:
        taken.update(c for c in _core_of(cpu, sysfs) if c in cpus)
    return taken


def _core_of(cpu: int, sysfs: Path) -> list[int]:
    """The logical CPUs sharing `cpu`'s physical core, itself included (just `cpu` without topology)."""
    try:
        return _parse_list((sysfs / f"cpu{cpu}" / "topology" / "thread_siblings_list").read_text())
    except (OSError, ValueError):
        return [cpu]


def _parse_list(text: str) -> list[int]:
    """A kernel CPU list such as "0-3,8" → [0, 1, 2, 3, 8]."""
    out: list[int] = []
    for part in text.strip().split(","):
        if "-" in part:
            first, last = part.split("-")
            out.extend(range(int(first), int(last) + 1))
        elif part:
            out.append(int(part))
    return out


@contextlib.contextmanager
def held_on(cpus: frozenset[int]) -> Iterator[None]:
    """Run the body with the calling thread on `cpus` only, then give it back its former cores (three
    system calls, 2 µs here). Empty `cpus` = no change."""
    if not cpus:
        yield
        return
    before = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, cpus)
    except OSError as exc:  # a cpuset changed under us: run unpinned rather than fail the batch
        log.debug("cannot pin the inference thread to %s: %s", sorted(cpus), exc)
        yield
        return
    try:
        yield
    finally:
        try:
            os.sched_setaffinity(0, before)
        except OSError:  # the cpuset changed during the run: every CPU, which the kernel cuts to the cpuset
            os.sched_setaffinity(0, range(os.cpu_count() or 1))
