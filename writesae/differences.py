"""Naming the settings that differ between two records of a run (a checkpoint and a rerun, a cache and a rerun,
two ranks), so that a refusal says which fields to change instead of printing both records whole."""

from __future__ import annotations

_ABSENT = "(absent)"


def differences(first: dict, second: dict, first_label: str, second_label: str) -> list[str]:
    """One ``"key: <first_label> <value>, <second_label> <value>"`` per key whose values differ, sorted;
    nested dicts are compared key by key under dotted names (``store_config.layer``)."""
    found = []
    for key in sorted(set(first) | set(second), key=str):
        a, b = first.get(key, _ABSENT), second.get(key, _ABSENT)
        if isinstance(a, dict) and isinstance(b, dict):
            found += [f"{key}.{line}" for line in differences(a, b, first_label, second_label)]
        elif a != b:
            shown = lambda value: value if value is _ABSENT else repr(value)
            found.append(f"{key}: {first_label} {shown(a)}, {second_label} {shown(b)}")
    return found
