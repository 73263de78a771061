"""Experiments at the write site (docs/design.md §15): write ablation, the atom substitution test, the
logit-shift prediction and installs in generation, the SAE features they use, and the intervals
they report."""

from hooked_gdn.sites import edit_at_positions

from .ablation import write_ablation
from .edits import kl_from_clean
from .features import Direction, atom_and_random_directions, atom_direction, frequent_features, site_codes
from .install import (
    aimed_atom, aimed_direction, install_directions, install_gradient, install_gradients, install_in_generation, install_study, pick_targets,
    summarize_installs,
)
from .logit_shift import (
    PooledR2, exact_read_change, logit_shift_study, measured_change, paper_read_change, read_gradient, read_gradients, state_gradient,
)
from .stats import clustered_bootstrap, wilson_interval
from .substitution import (
    COMPARISONS, CONDITIONS, NATIVE_WRITES, Firing, find_firings, install_matrix, native_writes, substitution_test,
    summarize,
)

__all__ = [
    "COMPARISONS", "CONDITIONS", "Direction", "NATIVE_WRITES", "Firing", "PooledR2", "atom_and_random_directions", "atom_direction",
    "clustered_bootstrap", "edit_at_positions", "exact_read_change", "find_firings", "frequent_features",
    "aimed_atom", "aimed_direction", "install_directions", "install_gradient", "install_gradients", "install_in_generation", "install_matrix", "install_study", "kl_from_clean", "logit_shift_study",
    "measured_change", "native_writes", "paper_read_change", "pick_targets", "read_gradient", "read_gradients", "site_codes", "state_gradient", "substitution_test", "summarize", "summarize_installs",
    "wilson_interval", "write_ablation",
]
