"""Refusals name the settings that differ (writesae.differences), nested ones by their dotted names."""

from __future__ import annotations

from writesae.differences import differences


def test_only_the_differing_fields_are_named_with_both_values():
    before = {"lr": 0.1, "steps": 10, "sae": {"n_features": 64, "k": 8, "heads": [0, 1]}, "gone": 1}
    after = {"lr": 0.1, "steps": 10, "sae": {"n_features": 32, "k": 8, "heads": [0, 1]}, "new": "x"}
    assert differences(before, after, "the checkpoint has", "this run") == [
        "gone: the checkpoint has 1, this run (absent)",
        "new: the checkpoint has (absent), this run 'x'",
        "sae.n_features: the checkpoint has 64, this run 32",
    ]
    assert differences(before, dict(before), "a", "b") == []
