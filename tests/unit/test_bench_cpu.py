"""The benchmark's CPU accounting: a process tree's CPU from /proc stats, each second once."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from deploy.local import tools
from scripts.benchlib import (
    CLK,
    JVM_THREAD_KINDS,
    ProcStat,
    jvm_thread_cpu_seconds,
    jvm_thread_kind,
    parse_stat,
    process_table,
    threads,
    tree_cpu_seconds,
)


def stat(pid: int, ppid: int, own: float, reaped: float = 0.0) -> ProcStat:
    return ProcStat(pid=pid, ppid=ppid, own=own, reaped=reaped)


def test_parse_stat_counts_fields_after_the_last_parenthesis() -> None:
    # A command name with a space and a parenthesis of its own; utime 250, stime 50,
    # cutime 30, cstime 20 ticks.
    fields = ["S", "7", *["0"] * 9, "250", "50", "30", "20", *["0"] * 30]
    line = f"4242 (post (gres) x) {' '.join(fields)}\n"
    assert parse_stat(line) == stat(4242, 7, 300 / CLK, 50 / CLK)


def test_tree_sums_own_and_reaped_time_of_the_root_and_its_live_descendants() -> None:
    procs = {
        s.pid: s
        for s in (
            stat(1, 0, own=100),  # not in the tree
            stat(10, 1, own=5, reaped=2),  # the root: 2 s of children it has reaped
            stat(11, 10, own=3),  # a live child
            stat(12, 10, own=1, reaped=4),  # a live child that reaped a grandchild (4 s)
            stat(13, 12, own=0.5),  # a live grandchild
            stat(20, 1, own=7),  # a sibling of the root
        )
    }
    assert tree_cpu_seconds(10, procs) == 5 + 2 + 3 + 1 + 4 + 0.5
    assert tree_cpu_seconds(12, procs) == 1 + 4 + 0.5
    assert tree_cpu_seconds(99, procs) == 0.0
    assert tree_cpu_seconds(None, procs) == 0.0


def test_a_child_that_exits_moves_to_its_parents_reaped_time() -> None:
    # Before: the child alive with 3 s; after its parent waited for it: in the parent's
    # reaped time, once.
    alive = {10: stat(10, 1, own=5), 11: stat(11, 10, own=3)}
    reaped = {10: stat(10, 1, own=5, reaped=3)}
    assert tree_cpu_seconds(10, alive) == tree_cpu_seconds(10, reaped) == 8


def test_a_real_child_that_exits_is_still_counted() -> None:
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass"
    subprocess.run([sys.executable, "-c", burn], check=True)
    me = process_table()[os.getpid()]
    assert me.reaped >= 0.25
    assert tree_cpu_seconds(os.getpid()) >= me.own + me.reaped


def test_jvm_threads_are_told_apart_by_name() -> None:
    assert jvm_thread_kind("C2 CompilerThre") == jvm_thread_kind("C1 CompilerThre") == "JIT compilation"
    assert jvm_thread_kind("GC Thread#1") == jvm_thread_kind("G1 Refine#0") == "garbage collection"
    assert jvm_thread_kind("G1 Main Marker") == "garbage collection"
    for name in ("java", "kafka-request-h", "elasticsearch[", "VM Thread", "data-plane-kafk"):
        assert jvm_thread_kind(name) is None


def test_the_stacks_jvm_names_its_jit_and_gc_threads_as_expected(tmp_path: Path) -> None:
    # The names are HotSpot's, not an API: a JDK that renamed them would hide the JIT's and
    # the collector's CPU in the benchmark's table; this JDK is the one the stack runs.
    (tmp_path / "Sleep.java").write_text(
        "class Sleep { public static void main(String[] a) throws Exception { Thread.sleep(60000); } }"
    )
    jvm = subprocess.Popen([tools.java(), "-XX:+UseG1GC", str(tmp_path / "Sleep.java")], cwd=tmp_path)
    try:
        deadline, kinds = time.monotonic() + 60, set()
        while kinds != set(JVM_THREAD_KINDS) and time.monotonic() < deadline:
            names = [name for name, _ in threads(jvm.pid)]
            kinds = {jvm_thread_kind(n) for n in names} - {None}
            time.sleep(0.05)
        assert kinds == set(JVM_THREAD_KINDS), names
        seconds = jvm_thread_cpu_seconds(jvm.pid, process_table())
        assert set(seconds) == set(JVM_THREAD_KINDS) and seconds["JIT compilation"] >= 0
    finally:
        jvm.kill()
        jvm.wait()
