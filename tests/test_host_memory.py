"""writesae.host_memory: training keeps the memory it frees for its next step, and gives the allocator
back as it found it."""

from __future__ import annotations

import resource

import pytest
import torch

from writesae import host_memory
from writesae.host_memory import (DEFAULT_MMAP_MAX, DEFAULT_TRIM_THRESHOLD, M_MMAP_MAX, M_TRIM_THRESHOLD, NEVER_TRIM,
                                  freed_memory_kept)


class RecordingLibc:
    def __init__(self):
        self.calls = []

    def mallopt(self, parameter, value):
        self.calls.append(("mallopt", parameter, value))
        return 1

    def malloc_trim(self, pad):
        self.calls.append(("malloc_trim", pad))
        return 1


KEEP = [("mallopt", M_MMAP_MAX, 0), ("mallopt", M_TRIM_THRESHOLD, NEVER_TRIM)]
RESTORE = [("mallopt", M_MMAP_MAX, DEFAULT_MMAP_MAX), ("mallopt", M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD),
           ("malloc_trim", 0)]


@pytest.fixture(name="libc")
def libc_fixture(monkeypatch):
    libc = RecordingLibc()
    monkeypatch.setattr(host_memory, "_glibc", lambda: libc)
    return libc


def test_the_block_keeps_freed_memory_and_restores_the_defaults_after_it(libc):
    with freed_memory_kept():
        assert libc.calls == KEEP
    assert libc.calls == KEEP + RESTORE


def test_the_defaults_come_back_when_the_block_raises(libc):
    with pytest.raises(KeyError), freed_memory_kept():
        raise KeyError("a step failed")
    assert libc.calls == KEEP + RESTORE
    with freed_memory_kept():  # and a later block sets them again
        pass
    assert libc.calls == 2 * (KEEP + RESTORE)


def test_a_nested_block_leaves_the_options_to_the_outermost(libc):
    with freed_memory_kept():
        with freed_memory_kept():
            pass
        assert libc.calls == KEEP, "the inner block gave the memory back while the outer one still trains"
    assert libc.calls == KEEP + RESTORE


@pytest.mark.parametrize("variable", ["GLIBC_TUNABLES", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_"])
def test_an_environment_that_tunes_the_allocator_is_left_alone(monkeypatch, variable):
    monkeypatch.setenv(variable, "1")
    assert host_memory._glibc() is None


def _faults_of_a_repeated_allocation(nbytes: int, times: int = 8) -> int:
    """Page faults of the last of ``times`` allocations of ``nbytes``, each filled and freed. (glibc needs
    a few rounds before a freed block lies where the next request fits: its alignment padding.)"""
    for _ in range(times):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.empty(nbytes // 4).fill_(1.0)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@pytest.mark.skipif(host_memory._glibc() is None, reason="the allocator is not glibc's, or the environment tunes it")
def test_inside_the_block_a_freed_buffer_is_reused_without_faulting_its_pages_in_again():
    """What the block is for, on the real allocator: outside, each 64 MiB buffer is faulted in afresh."""
    nbytes = 64 * 2**20  # above glibc's largest mmap threshold: served by mmap and unmapped on free outside the block
    outside = _faults_of_a_repeated_allocation(nbytes)
    if outside < nbytes // 4096 // 4:
        pytest.skip(f"{outside} page faults for a fresh 64 MiB block: this kernel backs it with huge pages")
    with freed_memory_kept():
        inside = _faults_of_a_repeated_allocation(nbytes)
    assert inside < outside / 8, (inside, outside)
