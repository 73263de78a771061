"""benchmarks.timing: what the benchmarks' medians time."""

from __future__ import annotations

import pytest

from benchmarks import timing


@pytest.mark.parametrize("settle, faults, expected_warm_ups", [
    (False, [500, 500, 0, 0], 1),  # one warm-up call, whatever it faulted
    (True, [500, 300, 3, 0], 3),  # until a call faults in fewer than SETTLED_PAGE_FAULTS pages
    (True, [500] * 20, timing.MAX_WARM_UP_ROUNDS),  # never settled: capped
])
def test_the_warm_up_goes_on_until_a_call_faults_in_no_new_memory(monkeypatch, settle, faults, expected_warm_ups):
    calls, pages = [], [0]

    def fn():
        calls.append(None)
        pages[0] += faults[len(calls) - 1] if len(calls) <= len(faults) else 0

    monkeypatch.setattr(timing, "_page_faults", lambda: pages[0])
    timing.median_seconds(fn, repeats=2, settle=settle)
    assert len(calls) == expected_warm_ups + 2


def test_interleaved_functions_run_in_turn_after_warm_up_rounds_until_every_one_settles(monkeypatch):
    """Each round calls every function once; the rounds go on until every call of one faults in few pages (here
    "a" settles in round 2 and "b" in round 3); then the timed repeats alternate."""
    faults = {"a": [500, 3], "b": [500, 300, 3]}
    order, pages = [], [0]

    def fn(name):
        def call():
            calls = order.count(name)
            order.append(name)
            pages[0] += faults[name][calls] if calls < len(faults[name]) else 0
        return call

    monkeypatch.setattr(timing, "_page_faults", lambda: pages[0])
    medians = timing.interleaved_medians({"a": fn("a"), "b": fn("b")}, repeats=2, settle=True)
    assert order == ["a", "b"] * (3 + 2)
    assert set(medians) == {"a", "b"} and all(seconds >= 0 for seconds in medians.values())
