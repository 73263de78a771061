"""Experiments at the write site (DESIGN §5): write ablation, the atom substitution test, and the
intervals they report."""

from .ablation import write_ablation
from .edits import edit_at_positions, gdn_hook_name, kl_from_clean
from .stats import clustered_bootstrap, wilson_interval
from .substitution import CONDITIONS, Firing, find_firings, install_matrix, substitution_test, summarize

__all__ = [
    "CONDITIONS", "Firing", "clustered_bootstrap", "edit_at_positions", "find_firings", "gdn_hook_name",
    "install_matrix", "kl_from_clean", "substitution_test", "summarize", "wilson_interval", "write_ablation",
]
