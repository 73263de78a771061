"""hooked_gdn beside TransformerLens 4.3's ``TransformerBridge``, measured on the same tiny checkpoints.

    python -m benchmarks.bridge_comparison            # writes benchmarks/results/bridge_comparison.json

Two tiny random checkpoints written by transformers' own classes (weights moved off their initialisation,
so that every weight shows): a Qwen3.5 text model (``Qwen3_5ForCausalLM``: three Gated DeltaNet layers with
grouped heads, d_k != d_v, then one attention layer) and a Mamba-2 (``Mamba2ForCausalLM``). Each is loaded
by transformers (the reference, which neither tool wrote), by ``HookedGatedDeltaNet.from_pretrained``, by
``TransformerBridge.boot_transformers`` as its users boot it ("bridge") and by `benchmarks.tl_bridge.boot_bridge`
("bridge, eager_scan": the same with the per-token scan that makes its state hook fire). Measured:

1. generation: each tool's greedy ``generate`` (``do_sample=False``, the bridge's default being to sample;
   ``stop_at_eos=False``; otherwise its defaults, the bridge's KV cache included), N_NEW tokens from
   each prompt, against transformers' greedy ``generate``; the number of equal tokens. The bridge is also run
   with ``use_past_kv_cache=False``, which recomputes the whole prefix at every step. And for the bridge's
   default, how many tokens after the first are what transformers predicts from the previous token alone.
2. logit parity: one forward of every prompt, max |logits - transformers' logits|.
3. TransformerLens' cache helpers (``HELPERS``) on each tool's ``run_with_cache`` (the bridge's with ``use_cache=False``,
   as TransformerLens advises for GDN internals): ran, or the exception's class
   and first line; where a result has a simple value it must equal, the largest difference (`helper_check`).
4. state edit carried: through each tool's state hook, add to every head's state of the last memory layer at
   position t a rank-1 matrix orthogonal to that head's read query at t (`state_edit_matrices`: the read at t is
   unchanged, so it does not matter whether a tool's hook edits the state before or after that read), and
   compare the logits after t with transformers' own run continued from the edited state: a prefill of
   positions 0..t, the matrices added to its cache's recurrent state, then one step per later token. That
   reference uses neither tool's forward. A tool carries the edit when its logits after t equal the reference's
   (within CARRY_TOLERANCE). (The read queries come from hooked_gdn's ``hook_read_query``; were they wrong, the
   logits up to t would change in every tool, ``change_up_to_t``, and no tool would match the reference.)
5. the state hooks each tool has on that memory layer, with the shapes they fire with (or that they do
   not fire).

RWKV-7 is not compared: transformers has no RWKV-7 class (the file records the check), and the bridge boots
only what transformers loads.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import CONFIG_MAPPING, AutoModelForCausalLM, Mamba2Config, Mamba2ForCausalLM, Qwen3_5ForCausalLM, Qwen3_5TextConfig

from benchmarks.provenance import provenance, write_results
from benchmarks.tl_bridge import boot_bridge, bridge_state_hook_name
from hooked_gdn import HookedGatedDeltaNet
from hooked_gdn.sites import edit_at_positions, gdn_hook_name, site_name

ROOT = Path(__file__).resolve().parents[1]
RESULTS_JSON = ROOT / "benchmarks" / "results" / "bridge_comparison.json"
SEED = 0
N_NEW = 12  # greedy tokens generated from each prompt
PROMPT_LENGTHS = (5, 8, 11)
EDIT_LENGTH, EDIT_POSITION, EDIT_SCALE = 12, 4, 10.0  # the state-edit input's length, edited position, edit's norm
TRANSPOSED_STATES = {"mamba2"}  # families whose state transformers (and the bridge) lay out [d_v, d_k]
CARRY_TOLERANCE = 1e-4  # logits after t within this of the reference: the edit was carried
TOOLS = ("hooked_gdn", "bridge", "bridge_eager_scan")
TOOL_TITLES = {"hooked_gdn": "hooked_gdn", "bridge": "TransformerLens 4.3 bridge",
               "bridge_eager_scan": "TransformerLens 4.3 bridge, eager_scan"}
FAMILY_TITLES = {"qwen3_5": "Qwen3.5 (GDN)", "mamba2": "Mamba-2"}

# TransformerLens' ActivationCache helpers, each called as a user would on a cache of `tokens`
HELPERS: dict[str, Callable] = {
    "accumulated_resid": lambda cache, tokens: cache.accumulated_resid(),
    "decompose_resid": lambda cache, tokens: cache.decompose_resid(),
    "logit_attrs": lambda cache, tokens: cache.logit_attrs(cache.accumulated_resid(apply_ln=True), tokens=tokens),
    "logit_lens": lambda cache, tokens: cache.logit_lens(),
    "apply_ln_to_stack": lambda cache, tokens: cache.apply_ln_to_stack(cache.accumulated_resid(), layer=None),
    "stack_head_results": lambda cache, tokens: cache.stack_head_results(),
    "get_full_resid_decomposition": lambda cache, tokens: cache.get_full_resid_decomposition(),
    "stack_neuron_results": lambda cache, tokens: cache.stack_neuron_results(layer=-1),
    "compute_ssm_state": lambda cache, tokens: cache.compute_ssm_state(),
    "compute_ssm_effective_attention": lambda cache, tokens: cache.compute_ssm_effective_attention(),
}


def qwen3_5_config() -> Qwen3_5TextConfig:
    """Three GDN layers (2 key heads serving 4 value heads, d_k 12, d_v 8), then gated attention."""
    return Qwen3_5TextConfig(
        vocab_size=101, hidden_size=48, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=12,
        linear_value_head_dim=8, tie_word_embeddings=False, eos_token_id=0, pad_token_id=0,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})


def mamba2_config() -> Mamba2Config:
    """Two layers of 4 heads (head_dim 8, state 6) in 2 groups."""
    return Mamba2Config(vocab_size=61, hidden_size=16, num_hidden_layers=2, num_heads=4, head_dim=8, state_size=6,
                        n_groups=2, expand=2, chunk_size=8, use_bias=True, tie_word_embeddings=False,
                        pad_token_id=0, eos_token_id=1, bos_token_id=None)


FAMILIES = {"qwen3_5": (Qwen3_5ForCausalLM, qwen3_5_config), "mamba2": (Mamba2ForCausalLM, mamba2_config)}


def write_checkpoint(family: str, folder: Path) -> None:
    """transformers' random model of ``family``, every weight moved by 0.2 N(0, 1) (seeded), saved to ``folder``."""
    cls, config = FAMILIES[family]
    torch.manual_seed(SEED)
    model = cls(config()).eval()
    g = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    model.save_pretrained(folder)


def prompts(vocab: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(SEED)
    return [torch.randint(2, vocab, (1, n), generator=g) for n in PROMPT_LENGTHS]


def error_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"[:300]


def load_tools(folder: Path) -> dict:
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers(str(folder), device="cpu", dtype=torch.float32)
    return {"hooked_gdn": HookedGatedDeltaNet.from_pretrained(folder).eval(), "bridge": bridge.eval(),
            "bridge_eager_scan": boot_bridge(str(folder))}


def greedy(tool, name: str, tokens: torch.Tensor, **kwargs) -> torch.Tensor:
    if name == "hooked_gdn":
        return tool.generate(tokens, max_new_tokens=N_NEW, do_sample=False, stop_at_eos=False)
    return tool.generate(tokens, max_new_tokens=N_NEW, do_sample=False, stop_at_eos=False, verbose=False, **kwargs)


def generation(hf, tools: dict, inputs: list[torch.Tensor]) -> dict:
    """Tokens equal to transformers' greedy continuation, per prompt, for each tool (and the bridge without its cache)."""
    hf.generation_config.eos_token_id = None  # never stop early: N_NEW tokens from every prompt
    references = [hf.generate(x, max_new_tokens=N_NEW, do_sample=False, pad_token_id=0)[0, x.shape[1]:] for x in inputs]
    runs = {name: lambda x, name=name: greedy(tools[name], name, x) for name in TOOLS}
    runs["bridge_no_kv_cache"] = lambda x: greedy(tools["bridge"], "bridge", x, use_past_kv_cache=False)
    out = {"n_new": N_NEW, "prompt_lengths": list(PROMPT_LENGTHS), "transformers": [r.tolist() for r in references]}
    for name, run in runs.items():
        continuations = [run(x)[0, x.shape[1]:] for x in inputs]
        out[name] = {"tokens": [c.tolist() for c in continuations],
                     "equal": [int((c == r).sum()) for c, r in zip(continuations, references)],
                     "first_difference": [next((i for i, (a, b) in enumerate(zip(c.tolist(), r.tolist())) if a != b), None)
                                          for c, r in zip(continuations, references)]}
        out[name]["equal_total"] = sum(out[name]["equal"])
    out["total"] = N_NEW * len(inputs)
    # the bridge's default: is each token after the first what transformers predicts from the previous token alone
    # (a fresh run, zero state, no context)?
    with torch.no_grad():
        alone = [[hf(torch.tensor([[token]])).logits[0, -1].argmax().item() for token in c[:-1]] for c in out["bridge"]["tokens"]]
    out["bridge"]["equal_to_previous_token_alone"] = sum(
        sum(a == b for a, b in zip(guess, c[1:])) for guess, c in zip(alone, out["bridge"]["tokens"]))
    out["bridge"]["of_after_the_first"] = (N_NEW - 1) * len(inputs)
    return out


def forward(tool, name: str, tokens: torch.Tensor) -> torch.Tensor:
    # the bridge reads GDN internals (its eager scan) only without transformers' generation cache
    return tool(tokens) if name == "hooked_gdn" else tool(tokens, use_cache=False)


def logit_parity(hf, tools: dict, inputs: list[torch.Tensor]) -> dict:
    with torch.no_grad():
        references = [hf(x).logits for x in inputs]
        return {name: max((forward(tools[name], name, x) - r).abs().max().item() for x, r in zip(inputs, references))
                for name in TOOLS}


def helper_check(name: str, value, cache, n_layers: int, reference: torch.Tensor) -> dict | None:
    """The largest difference between a helper's result and what it must equal, where that is simple: the last
    entry of ``logit_lens`` is transformers' logits at the last position; the last entry of ``accumulated_resid``
    and the sum of ``decompose_resid``'s and ``get_full_resid_decomposition``'s components are the tool's own final
    residual stream (a consistency check)."""
    final = f"blocks.{n_layers - 1}.hook_resid_post"
    if name == "logit_lens":
        return {"against": "transformers' logits", "max_abs_diff": (value.readout.values[-1] - reference[:, -1]).abs().max().item()}
    if name == "accumulated_resid":
        return {"against": f"its {final}", "max_abs_diff": (value[-1] - cache[final]).abs().max().item()}
    if name in ("decompose_resid", "get_full_resid_decomposition"):
        return {"against": f"its {final}", "max_abs_diff": (value.sum(0) - cache[final]).abs().max().item()}
    return None


def cache_helpers(hf, tools: dict, tokens: torch.Tensor) -> dict:
    with torch.no_grad():
        reference = hf(tokens).logits
        out = {}
        for name in TOOLS:
            tool = tools[name]
            _, cache = tool.run_with_cache(tokens) if name == "hooked_gdn" else tool.run_with_cache(tokens, use_cache=False)
            rows = {}
            for helper, call in HELPERS.items():
                try:
                    value = call(cache, tokens)
                except Exception as err:  # what each tool raises is the measurement
                    rows[helper] = {"ran": False, "error": error_line(err)}
                    continue
                rows[helper] = {"ran": True}
                check = helper_check(helper, value, cache, hf.config.num_hidden_layers, reference)
                if check is not None:
                    rows[helper]["check"] = check
            out[name] = rows
    return out


def memory_layer(tools: dict) -> int:
    """The last memory layer: the one edited and listed. (In the Qwen3.5 checkpoint the first GDN layer's heads
    forget within a token or two, so an edit there barely reaches the logits.)"""
    return tools["hooked_gdn"].cfg.gdn_layers[-1]


def state_edit_matrices(ours, tokens: torch.Tensor, layer: int, t: int) -> torch.Tensor:
    """For every head of ``layer``, a rank-1 matrix u vᵀ ([H, d_k, d_v], hooked_gdn's layout) with unit u orthogonal
    to that head's read query at position t and unit v: added to S_t it leaves the read at t unchanged, so the
    edit is the same whether a tool applies it before or after the read at t, and all of its effect is carried."""
    with torch.no_grad():
        _, cache = ours.run_with_cache(tokens, names_filter=gdn_hook_name(layer, "hook_read_query"))
    query = cache[gdn_hook_name(layer, "hook_read_query")][0, t]  # [H, d_k]
    g = torch.Generator().manual_seed(SEED + 3)
    u = torch.randn(query.shape, generator=g)
    u = u - (u * query).sum(-1, keepdim=True) / (query * query).sum(-1, keepdim=True) * query
    u = u / u.norm(dim=-1, keepdim=True)
    v = torch.randn(query.shape[0], ours.cfg.d_value, generator=g)
    v = v / v.norm(dim=-1, keepdim=True)
    return EDIT_SCALE * u[:, :, None] * v[:, None, :]


def edited_reference(hf, tokens: torch.Tensor, layer: int, t: int, delta: torch.Tensor | None) -> torch.Tensor:
    """transformers' logits at positions t+1.. : a prefill of positions 0..t, then ``delta`` (in transformers'
    layout, [H, ...]) added to layer ``layer``'s recurrent state in transformers' cache, then one step per later token."""
    with torch.no_grad():
        cache = hf(tokens[:, :t + 1], use_cache=True).past_key_values
        if delta is not None:
            cache.get_recurrent_state(layer).add_(delta)  # the cache's own tensor: [b, H, ...]
        steps = [hf(tokens[:, s:s + 1], cache=cache, use_cache=True).logits for s in range(t + 1, tokens.shape[1])]
    return torch.cat(steps, dim=1)


def state_edit(hf, tools: dict, tokens: torch.Tensor, family: str) -> dict:
    layer, t = memory_layer(tools), EDIT_POSITION
    delta = state_edit_matrices(tools["hooked_gdn"], tokens, layer, t)
    # transformers' and the bridge's Mamba-2 states are [head_dim, d_state], the transpose of hooked_gdn's (and GDN's)
    theirs = delta.transpose(-1, -2) if family in TRANSPOSED_STATES else delta
    with torch.no_grad():
        clean_full = hf(tokens).logits
        clean_split = edited_reference(hf, tokens, layer, t, None)
        reference = edited_reference(hf, tokens, layer, t, theirs)
        out = {"layer": layer, "position": t, "length": tokens.shape[1],
               "edit": f"every head's state at t plus a rank-1 matrix of norm {EDIT_SCALE} orthogonal to its read query at t",
               "reference": "transformers: prefill 0..t, the edit added to its cache's recurrent state, then one token at a time",
               "reference_split_vs_full_forward": (clean_split - clean_full[:, t + 1:]).abs().max().item(),
               "reference_change": (reference - clean_full[:, t + 1:]).abs().max().item(), "tools": {}}
        for name in TOOLS:
            tool, fired = tools[name], []
            if name == "hooked_gdn":
                hook_name, add = site_name(layer, "state"), edit_at_positions(lambda rows, _: rows + delta, [t])
                hook = lambda x, hook: (fired.append(tuple(x.shape)), add(x, hook))[1]
                run = lambda: tool.run_with_hooks(tokens, fwd_hooks=[(hook_name, hook)])
            else:
                hook_name = bridge_state_hook_name(tool, layer)

                def hook(x, hook):  # [b, pos, H, ...]: the trajectory of states
                    fired.append(tuple(x.shape))
                    x = x.clone()
                    x[:, t] += theirs
                    return x

                run = lambda: tool.run_with_hooks(tokens, fwd_hooks=[(hook_name, hook)], use_cache=False)
            try:
                edited = run()
            except Exception as err:
                out["tools"][name] = {"hook": hook_name, "error": error_line(err)}
                continue
            gap = (edited[:, t + 1:] - reference).abs().max().item()
            out["tools"][name] = {"hook": hook_name, "hook_fired": bool(fired),
                                  "change_up_to_t": (edited[:, :t + 1] - clean_full[:, :t + 1]).abs().max().item(),
                                  "change_after_t": (edited[:, t + 1:] - clean_full[:, t + 1:]).abs().max().item(),
                                  "max_abs_diff_to_reference": gap, "carried": bool(fired) and gap <= CARRY_TOLERANCE}
    return out


def state_hooks(tools: dict, tokens: torch.Tensor) -> dict:
    """The memory layer's hooks whose name says state (or write), with the shapes they fire with on ``tokens``."""
    layer = memory_layer(tools)
    out = {}
    for name in TOOLS:
        tool = tools[name]
        prefix = f"blocks.{layer}."
        names = sorted(n for n in tool.hook_dict if n.startswith(prefix) and ("state" in n or "write" in n))
        kwargs = {} if name == "hooked_gdn" else {"use_cache": False}
        with torch.no_grad():
            _, cache = tool.run_with_cache(tokens, names_filter=names, **kwargs)
        out[name] = {n.replace(prefix, "blocks.L.", 1): list(cache[n].shape) if n in cache.cache_dict else None for n in names}
    return out


def compare(family: str, folder: Path) -> dict:
    write_checkpoint(family, folder)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tools = load_tools(folder)
    inputs = prompts(hf.config.vocab_size)
    edit_tokens = torch.randint(2, hf.config.vocab_size, (1, EDIT_LENGTH), generator=torch.Generator().manual_seed(SEED + 2))
    return {"transformers_class": type(hf).__name__, "generation": generation(hf, tools, inputs),
            "logit_max_abs_diff": logit_parity(hf, tools, inputs), "cache_helpers": cache_helpers(hf, tools, inputs[-1]),
            "state_edit": state_edit(hf, tools, edit_tokens, family), "state_hooks": state_hooks(tools, inputs[0])}


def rwkv7_check() -> dict:
    return {"transformers_has_rwkv7": "rwkv7" in CONFIG_MAPPING,
            "note": "transformers has no RWKV-7 model class, and TransformerBridge.boot_transformers loads only what "
                    "transformers loads; not compared"}


# ---------------------------------------------------------------- tables


def _generation_cell(results: dict, tool: str) -> str:
    return " · ".join(f"{f['generation'][tool]['equal_total']}/{f['generation']['total']}" for f in results["families"].values())


def _previous_token_cell(results: dict) -> str:
    return " · ".join(f"{g['equal_to_previous_token_alone']}/{g['of_after_the_first']}"
                      for g in (f["generation"]["bridge"] for f in results["families"].values()))


def _helpers_cell(results: dict, tool: str) -> str:
    cells = []
    for f in results["families"].values():
        rows = f["cache_helpers"][tool]
        cells.append(f"{sum(r['ran'] for r in rows.values())}/{len(rows)}")
    return " · ".join(cells)


def _carry_cell(results: dict, tool: str) -> str:
    cells = []
    for f in results["families"].values():
        row = f["state_edit"]["tools"][tool]
        cells.append("error" if "error" in row else "hook does not fire" if not row["hook_fired"]
                     else f"{'yes' if row['carried'] else 'no'} ({row['max_abs_diff_to_reference']:.0e})")
    return " · ".join(cells)


def _parity_cell(results: dict, tool: str) -> str:
    return " · ".join(f"{f['logit_max_abs_diff'][tool]:.0e}" for f in results["families"].values())


def comparison_table(results: dict) -> str:
    """The README's table: one column per tool, each cell "Qwen3.5 · Mamba-2"."""
    families = " · ".join(FAMILY_TITLES[f] for f in results["families"])
    g = results["families"][next(iter(results["families"]))]["generation"]
    edit = next(iter(results["families"].values()))["state_edit"]
    helpers = ", ".join(f"`{h}`" for h in HELPERS)
    lines = [f"| measured on tiny random checkpoints ({families}) | {TOOL_TITLES['bridge']} | {TOOL_TITLES['hooked_gdn']} |",
             "|---|---|---|",
             f"| greedy `generate`, tokens equal to transformers' ({len(g['prompt_lengths'])} prompts × {g['n_new']}) "
             f"| {_generation_cell(results, 'bridge')} | {_generation_cell(results, 'hooked_gdn')} |",
             f"| bridge's tokens after the first that are transformers' prediction from the previous token alone "
             f"| {_previous_token_cell(results)} | |",
             f"| same as the first row, bridge with `use_past_kv_cache=False` (recomputes the prefix every step) "
             f"| {_generation_cell(results, 'bridge_no_kv_cache')} | |",
             f"| logits, max abs diff to transformers | {_parity_cell(results, 'bridge')} (`eager_scan`: "
             f"{_parity_cell(results, 'bridge_eager_scan')}) | {_parity_cell(results, 'hooked_gdn')} |",
             f"| TransformerLens cache helpers that run (of {helpers}) "
             f"| {_helpers_cell(results, 'bridge')} (`eager_scan`: {_helpers_cell(results, 'bridge_eager_scan')}) "
             f"| {_helpers_cell(results, 'hooked_gdn')} |",
             f"| state edit at t = {edit['position']} carried to later logits (max abs diff to transformers continued "
             f"from the edited state) | {_carry_cell(results, 'bridge_eager_scan')} (`eager_scan`; without it "
             f"{_carry_cell(results, 'bridge').replace('hook does not fire', 'the hook does not fire')}) "
             f"| {_carry_cell(results, 'hooked_gdn')} |",
             "| RWKV-7 | cannot boot it: transformers has no RWKV-7 class | not compared (no transformers reference) |"]
    return "\n".join(lines) + "\n"


def results_block(results: dict | None) -> str:
    """benchmarks/RESULTS.md's section: the README's table, then each helper's outcome and the state hooks."""
    if results is None:
        return "Not yet run: `python -m benchmarks.bridge_comparison`.\n"
    p = results["provenance"]
    lines = [f"`{p['command']}` on {p['date']} (torch {p['torch']}, transformers {p['transformers']}, "
             f"transformer_lens {p['transformer_lens']}, {p['cpu_threads']} CPU thread(s), seed {p['seed']}, "
             f"{p['wall_s']:.0f} s), `benchmarks/results/bridge_comparison.json`. Cells: Qwen3.5 · Mamba-2.", "",
             comparison_table(results).rstrip("\n"), "",
             "Cache helpers (`ran`, or what was raised):", "",
             "| family | helper | " + " | ".join(TOOL_TITLES[t] for t in TOOLS) + " |", "|---|---|" + "---|" * len(TOOLS)]
    for family, f in results["families"].items():
        for helper in HELPERS:
            cells = []
            for tool in TOOLS:
                row = f["cache_helpers"][tool][helper]
                cell = "ran" if row["ran"] else f"`{row['error'].split(':')[0]}`: {row['error'].partition(': ')[2][:90]}"
                if row.get("check"):
                    cell += f" (vs {row['check']['against']}: {row['check']['max_abs_diff']:.0e})"
                cells.append(cell.replace("|", "\\|"))
            lines.append(f"| {FAMILY_TITLES[family]} | `{helper}` | " + " | ".join(cells) + " |")
    lines += ["", "State hooks of the last memory layer (shape fired with on a prompt, or *does not fire*):", "",
              "| family | tool | hooks |", "|---|---|---|"]
    for family, f in results["families"].items():
        for tool in TOOLS:
            hooks = ", ".join(f"`{n}` {tuple(s) if s is not None else '*does not fire*'}" for n, s in f["state_hooks"][tool].items())
            lines.append(f"| {FAMILY_TITLES[family]} | {TOOL_TITLES[tool]} | {hooks} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=RESULTS_JSON)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    record, start = provenance("bridge_comparison", seed=SEED), time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        families = {family: compare(family, Path(tmp) / family) for family in FAMILIES}
    results = {"provenance": record | {"wall_s": time.perf_counter() - start}, "families": families, "rwkv7": rwkv7_check()}
    write_results(args.json, results)
    print(results_block(results))


if __name__ == "__main__":
    main()
