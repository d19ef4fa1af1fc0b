"""Where onnxruntime's threads run: placements on made-up CPU topologies (sysfs trees in a temp folder, as
the kernel lays them out), and real pinning of a real thread."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest

from worker.affinity import Placement, core_groups, held_on, physical_cores, place
from worker.model import Model

linux_only = pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="thread affinity is Linux-only")


def topology(root: Path, cpus: int, siblings: dict[int, str] | None = None) -> Path:
    """A /sys/devices/system/cpu tree of `cpus` logical CPUs, each with its thread_siblings_list (default:
    a core of its own)."""
    for cpu in range(cpus):
        folder = root / f"cpu{cpu}" / "topology"
        folder.mkdir(parents=True)
        (folder / "thread_siblings_list").write_text((siblings or {}).get(cpu, str(cpu)) + "\n")
    return root


@linux_only
def test_two_cores_pool_thread_on_the_second_caller_on_the_first(tmp_path):
    sysfs = topology(tmp_path, 2)
    assert place(0, [0, 1], sysfs) == Placement(2, "2", frozenset({0}))


@linux_only
def test_hyper_threads_count_once_and_the_caller_keeps_its_sibling(tmp_path):
    # 2 cores x 2 threads, numbered as Linux does on Intel: cpu2 is cpu0's sibling, cpu3 is cpu1's.
    sysfs = topology(tmp_path, 4, {0: "0,2", 2: "0,2", 1: "1,3", 3: "1,3"})
    assert physical_cores([0, 1, 2, 3], sysfs) == [0, 1]
    assert place(0, [0, 1, 2, 3], sysfs) == Placement(2, "2", frozenset({0, 2}))


@linux_only
def test_fewer_threads_than_cores_leave_the_caller_every_other_core(tmp_path):
    sysfs = topology(tmp_path, 8)
    placement = place(3, list(range(8)), sysfs)
    assert placement.threads == 3
    assert placement.pool_affinities == "2;3"  # cpu1 and cpu2, numbered from 1 as onnxruntime wants
    assert placement.caller_cpus == frozenset({0, 3, 4, 5, 6, 7})


@linux_only
def test_a_cpuset_restricts_the_cores_used(tmp_path):
    sysfs = topology(tmp_path, 8)
    assert place(0, [4, 6], sysfs) == Placement(2, "7", frozenset({4}))


def test_no_pinning_for_one_thread_or_more_threads_than_cores(tmp_path):
    sysfs = topology(tmp_path, 2)
    assert place(1, [0, 1], sysfs) == Placement(1, "", frozenset())
    assert place(4, [0, 1], sysfs) == Placement(4, "", frozenset())


def test_missing_topology_counts_every_cpu_as_a_core(tmp_path):
    assert physical_cores([0, 1, 2], tmp_path / "absent") == [0, 1, 2]


def test_core_groups_are_whole_cores_with_their_siblings(tmp_path):
    sysfs = topology(tmp_path / "ht", 4, {0: "0,2", 2: "0,2", 1: "1,3", 3: "1,3"})
    assert core_groups(2, 2, [0, 1, 2, 3], sysfs) == [[0, 2], [1, 3]]
    plain = topology(tmp_path / "plain", 5)
    assert core_groups(5, 2, list(range(5)), plain) == [[0, 1], [2, 3, 4]]
    assert core_groups(4, 2, list(range(5)), plain) == [[0, 1], [2, 3]]  # only the cores the model uses
    assert core_groups(1, 2, [0, 1], plain) == [[0]]  # fewer cores than groups: fewer groups


@linux_only
def test_held_on_pins_the_calling_thread_only_and_gives_its_cores_back():
    cpus = sorted(os.sched_getaffinity(0))
    seen: dict[str, set[int]] = {}

    def body() -> None:
        before = os.sched_getaffinity(0)
        with held_on(frozenset({cpus[-1]})):
            seen["inside"] = os.sched_getaffinity(0)
            seen["other thread"] = os.sched_getaffinity(threading.main_thread().native_id)
        seen["after"] = os.sched_getaffinity(0)
        seen["before"] = before

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    assert seen["inside"] == {cpus[-1]}
    assert seen["other thread"] == set(cpus)
    assert seen["after"] == seen["before"] == set(cpus)


def test_held_on_nothing_changes_nothing():
    before = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    with held_on(frozenset()):
        pass
    assert (os.sched_getaffinity(0) if before is not None else None) == before


@linux_only
def test_model_runs_with_its_threads_placed_and_leaves_the_caller_as_it_was(tiny_model):
    before = os.sched_getaffinity(0)
    threads_before = set(os.listdir("/proc/self/task"))
    model = Model(tiny_model, intra_op_threads=0)
    assert model.probabilities(np.zeros((2, 32, 32, 3), dtype=np.uint8)).shape == (2, 3)
    assert os.sched_getaffinity(0) == before
    assert model.placement == place(0)
    # What the kernel says of the threads onnxruntime started: each pool thread on its own core.
    pool = sorted(os.sched_getaffinity(int(task)) for task in set(os.listdir("/proc/self/task")) - threads_before)
    cores = physical_cores(sorted(before))
    assert pool == [{core} for core in cores[1:]]
