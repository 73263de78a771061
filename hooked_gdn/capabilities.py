"""The capability matrix: which of the library's tools work on which family, declared once, as data.

`TOOLS` lists the tools in the order the README shows them; `MATRIX` says, per family (the keys of
`hooked_gdn.architectures.BY_KEY`), whether each tool holds on it or, where it cannot, why. The test suite
``tests/test_capabilities.py`` is parametrised over this declaration: it runs every cell on a tiny random
checkpoint of the family saved by transformers, so a cell declared as holding fails the suite if the tool
breaks on that family, and a cell declared with a reason must be refused by the tool with a ValueError
naming the family and the capability. A family added to the registry without a row here, or a tool
without a check in the suite, fails it too. `capability_table` renders the matrix for the README.
"""

from __future__ import annotations

from dataclasses import dataclass

from .architectures import BY_KEY, FAMILIES


@dataclass(frozen=True)
class Tool:
    key: str  # short, for test ids and the matrix
    name: str  # as the README shows it
    checks: str  # what tests/test_capabilities.py asserts, in one line


TOOLS: tuple[Tool, ...] = (
    Tool("hooks", "Hooks and `state_positions`",
         "`hook_state` at chosen positions [b, P, H, d_k, d_v] equals the full run's, the sequential run's and the "
         "reference recurrence's states; S_t − α_t S_{t−1} = k̂_t δ_tᵀ (RWKV-7: S_t − diag(w_t) S_{t−1} − (a_t ⊙ κ̂_t) e_tᵀ = "
         "k̃_t v_tᵀ) and o_t = S_tᵀ q̂_t from the hooks"),
    Tool("edits", "Carried state and write edits",
         "state and write edits (RWKV-7: and a deleted erase) in parallel mode equal the sequential mode's and the "
         "reference recurrence's with the same edits (`DeltaRuleEdits`, `DPLREdits`), in the layer's reads, its final "
         "state and the logits downstream"),
    Tool("generation", "Generation with hooks",
         "`generate` with a state and a write edit changes the continuation and equals a prefill + step loop, whose "
         "logits equal one forward over the whole sequence with the same hooks (left padding)"),
    Tool("effective_attention", "Effective attention (over writes, over inputs)",
         "both decompositions rebuild `hook_recurrence_out` to 1e-5, from a zero state and from a prefix's; they "
         "differ where the layer erases and coincide where it does not"),
    Tool("patching", "Activation patching",
         "patching the corrupted run's own activations changes nothing; patching every clean state, or every clean "
         "write and decay, restores the clean final states; a one-position state patch equals the edit by hand"),
    Tool("census", "Memory census",
         "every memory layer and head, finite and in range; half-lives and mean β equal those of the cached "
         "`hook_log_decay` (RWKV-7: over each head's channels) and `hook_beta` (RWKV-7: `hook_erase_rate`)"),
    Tool("sae_training", "SAE training (streaming store, disk cache)",
         "the store's and the cache's samples are the model's states and writes at their origins; a WriteSAE "
         "trains from each, with finite losses and a decreasing FVU"),
    Tool("splicing", "SAE splicing",
         "with the error term the logits are the clean ones; without it they change; a state or write splice at one "
         "position equals the state edit by hand, in parallel and sequential mode"),
    Tool("dashboard", "Feature dashboard",
         "builds a feature's page and the index; its frequency is the SAE's codes' on the cached states"),
)

HOLDS = None  # a cell that holds; any other value is the reason the tool cannot work on the family


def _all_hold() -> dict[str, str | None]:
    return {tool.key: HOLDS for tool in TOOLS}


# family key -> tool key -> HOLDS or the reason the tool refuses that family
MATRIX: dict[str, dict[str, str | None]] = {
    "qwen3_5": _all_hold(),
    "qwen3_5_moe": _all_hold(),
    "qwen3_next": _all_hold(),
    "olmo_hybrid": _all_hold(),
    "mamba2": _all_hold(),
    "rwkv7": _all_hold(),
}


def lacking(family: str, tool: str) -> str | None:
    """Why ``tool`` cannot work on ``family`` (keys of `BY_KEY` and `TOOLS`), or None where it holds."""
    if family not in MATRIX:
        raise ValueError(f"the capability matrix has no row for family {family!r}; its families are {sorted(MATRIX)}")
    row = MATRIX[family]
    if tool not in row:
        raise ValueError(f"the capability matrix has no tool {tool!r}; its tools are {[t.key for t in TOOLS]}")
    return row[tool]


def require(family: str, tool: str) -> None:
    """Refuse, naming the family and the capability, a tool the matrix declares it cannot run on ``family``:
    for a tool's own check before it starts (no traceback from deep inside, no silent fallback)."""
    reason = lacking(family, tool)
    if reason is not None:
        name = next(t.name for t in TOOLS if t.key == tool)
        raise ValueError(f"{name} is not available for {BY_KEY[family].name} models ({family}): {reason}")


def capability_table() -> str:
    """The matrix as a Markdown table: one row per tool, one column per family (by its name), ✓ where the tool
    holds and the reason where it does not, and what the suite checks in the last column."""
    families = list(FAMILIES)
    lines = ["| tool | " + " | ".join(f.name for f in families) + " | what `tests/test_capabilities.py` checks |",
             "|---" * (len(families) + 2) + "|"]
    for tool in TOOLS:
        cells = [("✓" if MATRIX[f.key][tool.key] is HOLDS else MATRIX[f.key][tool.key]) for f in families]
        lines.append(f"| {tool.name} | " + " | ".join(cells) + f" | {tool.checks} |")
    return "\n".join(lines) + "\n"


__all__ = ["HOLDS", "MATRIX", "TOOLS", "Tool", "capability_table", "lacking", "require"]
