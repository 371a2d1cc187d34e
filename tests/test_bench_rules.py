"""The bench's reading of its own numbers (scripts/bench.py): the verdict rule of issue 17 and the
job filter. Not a speed test: no fio runs here."""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "bench.py")


@pytest.fixture(scope="module")
def bench():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("pmemfs_bench", BENCH)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["pmemfs_bench"] = module  # dataclasses look their module up by name
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules["pmemfs_bench"]


def test_a_ratio_is_met_only_when_our_worst_pass_beats_the_reference_median(bench) -> None:  # type: ignore[no-untyped-def]
    reference = [100.0, 120.0, 140.0]  # median 120
    assert bench.verdict([121.0, 130.0, 200.0], reference) == "met"
    assert bench.verdict([119.0, 130.0, 200.0], reference) == "cannot tell"  # the worst pass is below the median
    assert bench.verdict([90.0, 100.0, 119.0], reference) == "not met"  # even the best pass is below it
    assert bench.verdict([90.0, 100.0, 120.0], reference) == "cannot tell"  # the best pass ties it


def test_fewer_passes_than_three_never_give_a_verdict(bench) -> None:  # type: ignore[no-untyped-def]
    assert bench.verdict([500.0, 500.0], [1.0, 1.0, 1.0]) == "cannot tell"
    assert bench.verdict([1.0, 1.0, 1.0], [500.0, 500.0]) == "cannot tell"


def test_jobs_and_columns_are_picked_by_part_of_their_name(bench) -> None:  # type: ignore[no-untyped-def]
    names = [job.name for job in bench.JOBS]
    assert all(bench._chosen(name, None) for name in names)
    picked = [name for name in names if bench._chosen(name, ["4k randread Q", "1M write"])]
    assert picked == ["4k randread QD1 psync", "4k randread QD16 libaio", "1M write QD1 psync", "1M write QD4 libaio"]
