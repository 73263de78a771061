"""benchmarks.timing: what the benchmarks' medians time."""

from __future__ import annotations

import pytest

from benchmarks import timing


@pytest.mark.parametrize("settle, faults, expected_warm_ups", [
    (False, [500, 500, 0, 0], 1),  # one warm-up call, whatever it faulted
    (True, [500, 300, 3, 0], 3),  # until a call faults in fewer than SETTLED_PAGE_FAULTS pages
    (True, [500] * 20, timing.MAX_WARM_UP_CALLS),  # never settled: capped
])
def test_the_warm_up_goes_on_until_a_call_faults_in_no_new_memory(monkeypatch, settle, faults, expected_warm_ups):
    calls, pages = [], [0]

    def fn():
        calls.append(None)
        pages[0] += faults[len(calls) - 1] if len(calls) <= len(faults) else 0

    monkeypatch.setattr(timing, "_page_faults", lambda: pages[0])
    timing.median_seconds(fn, repeats=2, settle=settle)
    assert len(calls) == expected_warm_ups + 2
