"""The capability matrix (`hooked_gdn.capabilities`) as tests: every tool on every family.

One cell per (family, tool) of ``MATRIX``. Each family is a tiny random checkpoint saved by transformers
(``save_pretrained``) and loaded with ``from_pretrained``, as users load theirs: the configs of
``tests/conftest.py`` (Qwen3.5 "grouped", Qwen3.5-MoE, Qwen3-Next, OLMo-Hybrid) and ``tests/test_mamba2.py``
(Mamba-2 "groups"), every one with more value heads than key heads, every parameter off its initialisation
(``randomize_``, ``perturb_``), and the GDN families' decays slowed (median half-lives from 2 tokens to
hundreds, as Mamba-2's are at its initialisation), so that the past, the erase and an edit's carry are all
visible in a sequence of 23 positions (odd, three chunks of 8). A cell declared as holding runs its tool's check; a cell declared with a reason must be
refused by the tool with a ValueError naming the family and the capability.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import Mamba2ForCausalLM

from hooked_gdn import DeltaRuleEdits, GDNCache, HookedGatedDeltaNet, gated_delta_rule_reference
from hooked_gdn.dplr import DPLREdits, dplr_reference
from hooked_gdn.memory import DPLRMemory
from hooked_gdn.architectures import BY_KEY, FAMILIES
from hooked_gdn.capabilities import MATRIX, TOOLS, capability_table, lacking, require
from hooked_gdn.census import memory_census
from hooked_gdn.effective_attention import DECOMPOSITIONS, effective_attention
from hooked_gdn.patching import Patch, generic_activation_patch, run_with_patches
from hooked_gdn.sites import edit_at_positions, gdn_hook_name, site_name
from writesae import BilinearMatrixSAE
from writesae.dashboard import build_dashboard
from writesae.dashboard_html import feature_page_name, write_site
from writesae.disk_cache import CachedActivations, read_manifest, write_cache
from writesae.splice import HookedSAEGatedDeltaNet
from writesae.store import ActivationStore, StoreConfig
from writesae.train import TrainConfig, train

from .conftest import FAMILY_CONFIGS, randomize_, tiny_hf_config
from .rwkv7_models import random_blinkdl_state, save_fla
from .test_mamba2 import perturb_, tiny_config as tiny_mamba2_config

T, CHUNK = 23, 8  # positions: odd, and three chunks of the chunked recurrence (the last one padded)


def _gdn(name: str):
    """A random tiny transformers model of conftest's config ``name``, norms, gates and decays randomized, saved."""
    def save(folder: Path) -> None:
        hf = FAMILY_CONFIGS[name][1](tiny_hf_config(name))
        randomize_(hf)
        _slow_decays_(hf.eval())
        hf.save_pretrained(folder)
    return save


def _mamba2(folder: Path) -> None:
    perturb_(Mamba2ForCausalLM(tiny_mamba2_config("groups"))).eval().save_pretrained(folder)


def _rwkv7(folder: Path) -> None:
    """flash-linear-attention's format, every weight random; w_0 lowered so most channels keep tens of tokens."""
    save_fla(random_blinkdl_state(decay_bias=-3.0), folder)


# family key -> what saves a random tiny checkpoint of it into a folder (seeded by the caller); a new family needs one here
TINY_MODELS = {
    "qwen3_5": _gdn("grouped"),
    "qwen3_5_moe": _gdn("qwen3_5_moe"),
    "qwen3_next": _gdn("qwen3_next"),
    "olmo_hybrid": _gdn("olmo_hybrid"),
    "mamba2": _mamba2,
    "rwkv7": _rwkv7,
}


def _slow_decays_(hf, seed: int = 0) -> None:
    """A GDN head's g = −exp(A_log)·softplus(a + dt_bias); at transformers' A ∈ (0, 16) most heads forget within a
    token. A ∈ (0.02, 0.3) gives median half-lives of 2 to 20 tokens (Qwen's), 30 to thousands (OLMo-Hybrid's).
    Mamba-2's Δ A is small at its initialisation already."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("linear_attn.A_log"):
                p.copy_(torch.empty(p.shape).uniform_(0.02, 0.3, generator=g).log())


@pytest.fixture(name="checkpoints", scope="session")
def checkpoints_fixture(tmp_path_factory):
    """``checkpoints(family)``: the folder of the family's tiny random checkpoint, saved once a session."""
    folders = {}

    def folder(family: str) -> Path:
        if family not in folders:
            torch.manual_seed(0)
            folders[family] = tmp_path_factory.mktemp(f"capabilities-{family}")
            TINY_MODELS[family](folders[family])
        return folders[family]

    return folder


@dataclass
class Cell:
    """What a check gets: the family, its checkpoint and a folder of its own."""

    family: str
    folder: Path
    tmp: Path

    def model(self, cls=HookedGatedDeltaNet):
        return cls.from_pretrained(self.folder)


def random_tokens(model, b: int, p: int, seed: int) -> torch.Tensor:
    """Tokens 2 … d_vocab − 1 (0 and 1 are the configs' pad and EOS)."""
    return torch.randint(2, model.cfg.d_vocab, (b, p), generator=torch.Generator().manual_seed(seed))


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    assert actual.shape == expected.shape, (tuple(actual.shape), tuple(expected.shape))
    return float((actual - expected).abs().amax() / expected.abs().amax().clamp_min(1e-30))


def max_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().amax())


def hook(layer: int, short: str) -> str:
    return gdn_hook_name(layer, f"hook_{short}")


def sizes(model) -> tuple[int, int, int]:
    return model.cfg.n_value_heads, model.cfg.d_key, model.cfg.d_value


def erases_apart(model, layer: int) -> bool:
    """Whether the layer's erase is a term of its own (RWKV-7's DPLR memory) rather than folded into its write."""
    return isinstance(model.blocks[layer].linear_attn, DPLRMemory)


def reference_inputs(model, layer: int) -> tuple[str, ...]:
    """The hook short names whose cached values are the layer's plain reference recurrence's inputs, in its order."""
    if erases_apart(model, layer):
        return ("read_query", "log_decay", "erase_key", "erase_rate", "write_key", "write_value")
    return ("read_query", "write_key", "v", "log_decay", "beta")


def reference(model, layer: int, c: dict, edits: dict | None = None):
    """The layer's plain sequential recurrence (`dplr_reference` or `gated_delta_rule_reference`) on the cached inputs
    ``c`` (by short name), with edits given as the fields the two edit classes share."""
    inputs = [c[name] for name in reference_inputs(model, layer)]
    if erases_apart(model, layer):
        return dplr_reference(*inputs, edits=None if edits is None else DPLREdits(**edits))
    return gated_delta_rule_reference(*inputs, edits=None if edits is None else DeltaRuleEdits(**edits),
                                      transition=model.blocks[layer].linear_attn.transition)


# ---------------------------------------------------------------- the cells


def check_hooks(cell: Cell) -> None:
    """hook_state at chosen positions (one counted from the end) is the full run's, the sequential run's and the
    plain reference recurrence's on the cached inputs; the hooks agree with S_t = A_t S_{t−1} + write_t (GDN: α_t and
    k̂_t δ_tᵀ, δ holding the erase; RWKV-7: diag(w_t), its erase (a_t ⊙ κ̂_t) e_tᵀ, and k̃_t v_tᵀ) and o_t = S_tᵀ q̂_t."""
    model = cell.model()
    H, d_k, d_v = sizes(model)
    tokens = random_tokens(model, 2, T, 0)
    chosen, at = [0, 5, 8, 16, -1], torch.tensor([0, 5, 8, 16, T - 1])
    layers = model.cfg.gdn_layers
    shorts = {"state", "final_state", "recurrence_out", "erase_value" if erases_apart(model, layers[0]) else "write_value",
              *reference_inputs(model, layers[0])}
    states = [hook(layer, "state") for layer in layers]
    with torch.no_grad():
        _, full = model.run_with_cache(tokens, names_filter=[hook(layer, s) for layer in layers for s in shorts],
                                       chunk_size=CHUNK)
        _, some = model.run_with_cache(tokens, names_filter=states, state_positions=chosen, chunk_size=CHUNK)
        _, sequential = model.run_with_cache(tokens, names_filter=states, state_positions=chosen, recurrence="sequential")
    for layer in layers:
        c = {s: full[hook(layer, s)] for s in shorts}
        assert c["state"].shape == (2, T, H, d_k, d_v)
        assert some[hook(layer, "state")].shape == (2, len(chosen), H, d_k, d_v)
        assert relative_error(some[hook(layer, "state")], c["state"][:, at]) <= 1e-5
        assert relative_error(sequential[hook(layer, "state")], c["state"][:, at]) <= 1e-5
        expected = reference(model, layer, c)
        assert relative_error(c["state"], expected.states) <= 1e-5
        assert relative_error(c["recurrence_out"], expected.out) <= 1e-5
        assert relative_error(c["final_state"], c["state"][:, -1]) <= 1e-6
        before = torch.cat([torch.zeros_like(c["state"][:, :1]), c["state"][:, :-1]], 1)
        if erases_apart(model, layer):
            assert relative_error(c["erase_value"], expected.erase_value) <= 1e-5
            erase = torch.einsum("bthk,bthv->bthkv", c["erase_rate"] * c["erase_key"], c["erase_value"])
            assert relative_error(c["erase_value"], -torch.einsum("bthkv,bthk->bthv", before, c["erase_key"])) <= 1e-5
            written = c["state"] - c["log_decay"].exp()[..., None] * before - erase
        else:
            assert relative_error(c["write_value"], expected.write_value) <= 1e-5
            written = c["state"] - c["log_decay"].exp()[..., None, None] * before
        assert relative_error(written, torch.einsum("bthk,bthv->bthkv", c["write_key"], c["write_value"])) <= 1e-5
        assert relative_error(torch.einsum("bthkv,bthk->bthv", c["state"], c["read_query"]), c["recurrence_out"]) <= 1e-5
        assert relative_error(written, c["state"]) > 1e-2  # the past is a real part of the state


def check_edits(cell: Cell) -> None:
    """State edits (a difference added at two positions), write edits (a write replaced, one deleted), for a memory
    whose erase is its own term an erase edit (one deleted) too, and all at once, in the default parallel mode:
    equal to the sequential mode in the logits, to the reference recurrence with the same edits (`DeltaRuleEdits`,
    `DPLREdits`) in the layer's reads and final state; the logits change from the first edited position to the
    end, not before it."""
    model = cell.model()
    H, d_k, d_v = sizes(model)
    layer = model.cfg.gdn_layers[-1]  # hybrids: an attention layer follows; Mamba-2: the last block
    tokens = random_tokens(model, 2, T, 1)
    g = torch.Generator().manual_seed(2)
    diffs = {4: torch.randn(H, d_k, d_v, generator=g), 15: torch.randn(H, d_k, d_v, generator=g)}
    new_key, new_value = torch.nn.functional.normalize(torch.randn(d_k, generator=g), dim=0), torch.randn(d_v, generator=g)

    def add_diff(rows, pos):
        return rows + diffs[pos]

    def set_key(rows, pos):
        rows[:, 1] = new_key
        return rows

    def set_value(rows, pos):
        if pos == 6:
            rows[:, 1] = new_value
        else:
            rows[:, 0] = 0.0  # deleted
        return rows

    state_hooks = [(hook(layer, "state"), edit_at_positions(add_diff, list(diffs)))]
    write_hooks = [(hook(layer, "write_key"), edit_at_positions(set_key, [6])),
                   (hook(layer, "write_value"), edit_at_positions(set_value, [6, 11]))]
    inputs = reference_inputs(model, layer)
    with torch.no_grad():
        clean, cache = model.run_with_cache(tokens, names_filter=[hook(layer, s) for s in inputs], chunk_size=CHUNK)
    c = {s: cache[hook(layer, s)] for s in inputs}
    mask = torch.zeros(2, T, H, dtype=torch.bool)
    mask[:, 6, 1] = mask[:, 11, 0] = True
    write_key, write_value = c["write_key"].clone(), torch.zeros(2, T, H, d_v)
    write_key[:, 6, 1], write_value[:, 6, 1] = new_key, new_value
    write_edits = dict(write_mask=mask, write_key=write_key, write_value=write_value)
    state_edits = dict(diff_positions=torch.tensor(list(diffs)),
                       state_diff=torch.stack(list(diffs.values()))[None].expand(2, -1, -1, -1, -1))
    cases = {"state": (state_hooks, state_edits, 4), "write": (write_hooks, write_edits, 6),
             "both": (write_hooks + state_hooks, write_edits | state_edits, 4)}
    if erases_apart(model, layer):
        def delete_erase(rows, pos):
            rows[:, 1] = 0.0
            return rows

        erase_mask = torch.zeros(2, T, H, dtype=torch.bool)
        erase_mask[:, 9, 1] = True
        erase_hooks = [(hook(layer, "erase_value"), edit_at_positions(delete_erase, [9]))]
        erase_edits = dict(erase_mask=erase_mask, erase_value=torch.zeros(2, T, H, d_v))
        cases |= {"erase": (erase_hooks, erase_edits, 9),
                  "all": (write_hooks + erase_hooks + state_hooks, write_edits | erase_edits | state_edits, 4)}
    for case, (hooks, edits, first) in cases.items():
        with torch.no_grad(), model.hooks(fwd_hooks=hooks):
            parallel, edited = model.run_with_cache(
                tokens, names_filter=[hook(layer, "recurrence_out"), hook(layer, "final_state")], chunk_size=CHUNK)
            sequential = model(tokens, recurrence="sequential")
        expected = reference(model, layer, c, edits)
        assert relative_error(edited[hook(layer, "recurrence_out")], expected.out) <= 1e-5, case
        assert relative_error(edited[hook(layer, "final_state")], expected.final_state) <= 1e-5, case
        assert max_gap(parallel, sequential) <= 1e-4, case
        assert max_gap(parallel[:, :first], clean[:, :first]) <= 1e-5, case
        assert max_gap(parallel[:, first], clean[:, first]) > 1e-4, case
        assert max_gap(parallel[:, -1], clean[:, -1]) > 1e-4, case  # carried to the end


def check_generation(cell: Cell) -> None:
    """`generate` with a state edit and a write edit at generation steps (left-padded batch) changes the
    continuation, equals the loop by hand (prefill, then one position at a time from the cache), and that loop's
    logits equal one forward over the whole generated sequence with the same hooks."""
    model = cell.model()
    H, d_k, d_v = sizes(model)
    layer = model.cfg.gdn_layers[-1]
    p, new = 7, 6
    prompt = random_tokens(model, 2, p, 3)
    mask = torch.ones_like(prompt)
    mask[1, :2] = 0
    g = torch.Generator().manual_seed(4)
    diff, value = 30 * torch.randn(H, d_k, d_v, generator=g), 30 * torch.randn(d_v, generator=g)

    def add_diff(rows, pos):
        return rows + diff

    def set_value(rows, pos):
        rows[:, 0] = value
        return rows

    hooks = [(hook(layer, "state"), edit_at_positions(add_diff, [p + 1])),
             (hook(layer, "write_value"), edit_at_positions(set_value, [p + 3]))]
    with torch.no_grad():
        clean = model.generate(prompt, max_new_tokens=new, stop_at_eos=False, attention_mask=mask)
        with model.hooks(fwd_hooks=hooks):
            edited = model.generate(prompt, max_new_tokens=new, stop_at_eos=False, attention_mask=mask)
            cache = GDNCache()
            steps = [model(prompt, attention_mask=mask, cache=cache)[:, -1]]
            chosen = [prompt]
            for _ in range(new):
                chosen.append(steps[-1].argmax(-1)[:, None])
                if len(chosen) <= new:
                    steps.append(model(chosen[-1], cache=cache)[:, -1])
            by_hand = torch.cat(chosen, 1)
            whole = model(by_hand, attention_mask=torch.cat([mask, torch.ones(2, new, dtype=mask.dtype)], 1))
    assert torch.equal(edited, by_hand)
    assert torch.equal(edited[:, : p + 2], clean[:, : p + 2])  # chosen before the state edit at p + 1 acts
    assert not torch.equal(edited, clean)
    assert max_gap(torch.stack(steps, 1), whole[:, p - 1 : -1]) <= 1e-4


def check_effective_attention(cell: Cell) -> None:
    """Over the writes and over the inputs the decomposition rebuilds every memory layer's read to 1e-5, from a zero
    state and continuing a prefix (its state as the initial term); the past matters in both; the two differ
    below the diagonal where the layer's transition erases and coincide where it does not."""
    model = cell.model()
    tokens, prefix = random_tokens(model, 2, T, 5), random_tokens(model, 2, 9, 6)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, chunk_size=CHUNK)
        prefix_cache = model.prefill(prefix)
        initial = dict(prefix_cache.recurrent_states)  # the run below replaces these entries
        _, continued = model.run_with_cache(tokens, cache=prefix_cache, chunk_size=CHUNK)
    for layer in model.cfg.gdn_layers:
        o, o_continued = cache[hook(layer, "recurrence_out")], continued[hook(layer, "recurrence_out")]
        found = {}
        for over in DECOMPOSITIONS:
            found[over] = ea = effective_attention(cache, layer, over)
            assert relative_error(ea.out(), o) <= 1e-5, over
            assert bool((ea.pattern.triu(1) == 0).all())
            diagonal = torch.einsum("bht,bthv->bthv", ea.pattern.diagonal(dim1=-2, dim2=-1), ea.values)
            assert relative_error(diagonal, o) > 1e-2, over  # earlier positions carry a real part of the read
            after_prefix = effective_attention(continued, layer, over, initial_state=initial[layer])
            assert relative_error(after_prefix.out(), o_continued) <= 1e-5, over
            assert relative_error(after_prefix.out() - after_prefix.initial, o_continued) > 1e-3, over
        gap = relative_error(found["inputs"].pattern, found["writes"].pattern)
        assert gap > 1e-3 if model.blocks[layer].linear_attn.transition.erases else gap <= 1e-5


def check_patching(cell: Cell) -> None:
    """Patching the corrupted run's own states changes nothing; patching every clean state, or every clean write
    (both sides) with its decay (and, where the erase is its own term, its removal key and rate), into the corrupted
    run gives the clean final states; a clean state patched at one
    position and head equals that state edit by hand in the sequential mode, downstream logits included."""
    model = cell.model()
    layers = model.cfg.gdn_layers
    clean = random_tokens(model, 1, 13, 7)
    corrupted = clean.clone()
    corrupted[0, 2] = 2 + (clean[0, 2] - 1) % (model.cfg.d_vocab - 2)  # another token of 2 … d_vocab − 1
    # the state, and what makes each position's step: its write (both sides) and decay, and an erase's own key and rate
    sites = ("state", "write_key", "write_value", "log_decay") + (("erase_key", "erase_rate") if erases_apart(model, layers[0])
                                                                  else ())
    names = [hook(layer, s) for layer in layers for s in sites]
    with torch.no_grad():
        clean_logits, clean_cache = model.run_with_cache(clean, names_filter=names)
        corrupted_logits, own_cache = model.run_with_cache(corrupted, names_filter=names)
        clean_final, corrupted_final = model.prefill(clean).recurrent_states, model.prefill(corrupted).recurrent_states

    def metric(logits):
        return logits[0, -1, 3] - logits[0, -1, 5]

    grid = generic_activation_patch(model, corrupted, own_cache, metric, "state", ("layer", "pos"), positions=[1, 6, 12],
                                    show_progress=False)
    assert grid.shape == (len(layers), 3)
    torch.testing.assert_close(grid, torch.full_like(grid, float(metric(corrupted_logits))), atol=2e-5, rtol=0)

    def final_states(patches):
        prefix = GDNCache()
        with torch.no_grad():
            run_with_patches(model, corrupted, patches, cache=prefix)
        return prefix.recurrent_states

    every_state = [Patch(hook(layer, "state"), clean_cache[hook(layer, "state")]) for layer in layers]
    every_write = [Patch(hook(layer, s), clean_cache[hook(layer, s)]) for layer in layers for s in sites[1:]]
    for patches in (every_state, every_write):
        patched = final_states(patches)
        for layer in layers:
            assert relative_error(corrupted_final[layer], clean_final[layer]) > 1e-3  # the corruption reaches it
            assert relative_error(patched[layer], clean_final[layer]) <= 1e-5

    layer, t, head = layers[-1], 7, 1
    clean_states = clean_cache[hook(layer, "state")]

    def put_clean(rows, pos):
        rows[:, head] = clean_states[:, pos, head]
        return rows

    with torch.no_grad():
        patched_logits = run_with_patches(model, corrupted, [Patch(hook(layer, "state"), clean_states, (t,), (head,))])
        by_hand = model.run_with_hooks(corrupted, fwd_hooks=[(hook(layer, "state"), edit_at_positions(put_clean, [t]))],
                                       recurrence="sequential")
    assert max_gap(patched_logits, by_hand) <= 1e-5
    assert max_gap(patched_logits[:, :t], corrupted_logits[:, :t]) <= 1e-5
    assert max_gap(patched_logits[:, -1], corrupted_logits[:, -1]) > 1e-5


def check_census(cell: Cell) -> None:
    """One record per memory layer and value head, every number finite and in its range, the half-life
    percentiles ordered; the median half-life and the mean β are those of the cached hooks."""
    model = cell.model()
    H, d_k, d_v = sizes(model)
    layers = model.cfg.gdn_layers
    windows = random_tokens(model, 3, 21, 8)
    census = memory_census(model, windows, state_every=2)
    assert [(r.layer, r.head) for r in census.heads] == [(layer, h) for layer in layers for h in range(H)]
    rate = {layer: model.blocks[layer].linear_attn.RATE_HOOK for layer in layers}  # β, or RWKV-7's a_t
    with torch.no_grad():
        _, cache = model.run_with_cache(windows, names_filter=[hook(layer, "log_decay") for layer in layers]
                                        + [gdn_hook_name(layer, rate[layer]) for layer in layers])
    for r in census.heads:
        numbers = [*r.alpha, *r.half_life, r.mean_beta, r.effective_rank, r.top_share, r.write_share, r.read_rms_over_sqrt_eps]
        assert all(math.isfinite(x) for x in numbers), r
        assert 0 < r.alpha[0] <= r.alpha[1] <= r.alpha[2] < 1 and 0 < r.half_life[0] <= r.half_life[1] <= r.half_life[2]
        assert 1 - 1e-4 <= r.effective_rank <= min(d_k, d_v) + 1e-4 and 0 < r.top_share <= 1 + 1e-6
        assert 0 <= r.write_share <= 1 + 1e-6 and r.read_rms_over_sqrt_eps > 0 and r.mean_beta > 0
        of_head = lambda x: x[:, :, r.head].double().flatten()  # per head [b, p, H], or per channel [b, p, H, N]
        g = of_head(cache[hook(r.layer, "log_decay")])
        assert r.half_life[1] == pytest.approx(math.log(0.5) / float(torch.quantile(g, 0.5)), rel=1e-6)
        assert r.mean_beta == pytest.approx(float(of_head(cache[gdn_hook_name(r.layer, rate[r.layer])]).mean()), rel=1e-5)


def assert_learnt(result, out: Path) -> None:
    """Every training loss finite, and the batches' FVU (normalised per batch, so less noisy than the loss) lower
    over the last four steps than over the first two."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["split"] == "train"]
    assert steps and all(math.isfinite(r["loss"]) for r in steps) and math.isfinite(result.heldout_metrics["fvu"])
    fvu = [r["fvu"] for r in steps]
    assert sum(fvu[-4:]) / 4 < sum(fvu[:2]) / 2, fvu


def check_sae_training(cell: Cell) -> None:
    """The streaming store's state samples, and the disk cache's write samples, are the model's at their origins;
    a WriteSAE trains a few steps from each, its losses finite, its FVU decreasing."""
    model = cell.model()
    H, d_k, d_v = sizes(model)
    layer, heads = model.cfg.gdn_layers[-1], [0, H - 1]
    documents = [random_tokens(model, 1, 29, 10 + i)[0] for i in range(24)]
    settings = dict(layer=layer, heads=heads, context=11, model_batch_size=8, heldout_fraction=0.25)
    run = dict(steps=16, batch_size=32, lr=1e-2, warmup_steps=2, log_every=1, eval_every=16, eval_samples=48,
               checkpoint_every=0, progress=False, input_scale_samples=48)

    store = ActivationStore(model, documents, StoreConfig(positions="all", buffer_size=128, **settings))
    x, origin = store.next_batch(16, with_origin=True)
    contexts = torch.stack([store.context_tokens(int(i)) for i in origin[:, 0]])
    with torch.no_grad():
        _, cache = model.run_with_cache(contexts, names_filter=site_name(layer, "state"))
    assert relative_error(x, cache[site_name(layer, "state")][torch.arange(16), origin[:, 1]][:, heads]) <= 1e-5
    sae = BilinearMatrixSAE(d_k=d_k, d_v=d_v, n_features=32, k=4, heads=heads, n_heads=H, seed=0)
    result = train(sae, store, TrainConfig(out_dir=str(cell.tmp / "store"), **run))
    assert result.sae.cfg.site == site_name(layer, "state")
    assert_learnt(result, cell.tmp / "store")

    source = ActivationStore(model, documents, StoreConfig(kind="write", positions=[0, 4, -1], **settings))
    write_cache(source, cell.tmp / "cache", model_name=cell.family, corpus="random tokens", shard_samples=24,
                progress=False, log=None)
    manifest = read_manifest(cell.tmp / "cache")
    assert manifest["site"] == site_name(layer, "write") and manifest["heads"] == heads
    shard = load_file(cell.tmp / "cache" / manifest["shards"]["train"][0]["file"])
    contexts, positions = shard["origins"].T
    with torch.no_grad():
        _, cache = model.run_with_cache(torch.stack([source.context_tokens(int(i)) for i in contexts]),
                                        names_filter=[hook(layer, "write_key"), hook(layer, "write_value")])
    rows = torch.arange(len(contexts))
    key, delta = (cache[hook(layer, s)][rows, positions][:, heads] for s in ("write_key", "write_value"))
    assert relative_error(shard["x"], torch.einsum("nhk,nhv->nhkv", key, delta)) <= 1e-5
    sae = BilinearMatrixSAE(d_k=d_k, d_v=d_v, n_features=32, k=4, heads=heads, n_heads=H, seed=0)
    result = train(sae, CachedActivations(cell.tmp / "cache", buffer_size=64, seed=1),
                   TrainConfig(out_dir=str(cell.tmp / "from-cache"), **run))
    assert result.sae.cfg.site == site_name(layer, "write")
    assert_learnt(result, cell.tmp / "from-cache")


def check_splicing(cell: Cell) -> None:
    """A state SAE and a write SAE spliced in with the error term leave the logits as they were (parallel and
    sequential), without it change them; spliced at one position, each equals the state edit by hand (the state
    replaced by its reconstruction, or the write's reconstruction error added), in the loop too."""
    model = cell.model(HookedSAEGatedDeltaNet)
    H, d_k, d_v = sizes(model)
    layer, heads, t = model.cfg.gdn_layers[-1], [0, H - 1], 9
    tokens = random_tokens(model, 2, T, 11)
    saes = {kind: BilinearMatrixSAE(d_k=d_k, d_v=d_v, n_features=16, k=3, sparsity="topk", site=site_name(layer, kind),
                                    heads=heads, n_heads=H, seed=i) for i, kind in enumerate(("state", "write"))}
    with torch.no_grad():
        clean, cache = model.run_with_cache(tokens, names_filter=[hook(layer, s) for s in ("state", "write_key", "write_value")],
                                            chunk_size=CHUNK)
        state = cache[hook(layer, "state")][:, t, heads]
        key, delta = (cache[hook(layer, s)][:, t, heads] for s in ("write_key", "write_value"))
        write = torch.einsum("bhk,bhv->bhkv", key, delta)
        by_hand_change = {"state": saes["state"](state) - state, "write": saes["write"](write) - write}
    for kind, sae in saes.items():
        with torch.no_grad():
            for recurrence in ("parallel", "sequential"):
                exact = model.run_with_saes(tokens, saes=[sae], use_error_term=True, recurrence=recurrence)
                assert max_gap(exact, clean) <= 1e-5, (kind, recurrence)
            assert max_gap(model.run_with_saes(tokens, saes=[sae], use_error_term=False), clean) > 1e-4, kind

            def add(rows, pos, change=by_hand_change[kind]):
                rows[:, heads] += change
                return rows

            # the chunking of the cached states the changes were computed from, so both runs start from those states
            by_hand = model.run_with_hooks(tokens, fwd_hooks=[(hook(layer, "state"), edit_at_positions(add, [t]))],
                                           chunk_size=CHUNK)
            spliced = model.run_with_saes(tokens, saes=[sae], state_positions=[t], chunk_size=CHUNK)
            in_the_loop = model.run_with_saes(tokens, saes=[sae], state_positions=[t], recurrence="sequential")
        assert max_gap(spliced, by_hand) <= 1e-5, kind
        assert max_gap(in_the_loop, by_hand) <= 1e-4, kind
        assert max_gap(spliced[:, :t], clean[:, :t]) <= 1e-6, kind
        assert max_gap(spliced[:, -1], clean[:, -1]) > 1e-5, kind
    assert not model.acts_to_saes


def check_dashboard(cell: Cell) -> None:
    """The dashboard of one feature (the most frequent of a one-head state SAE) builds and writes its site; the
    card's frequency is that of the SAE's codes on the cached states, its ablation KL finite, the head's
    half-life the census's."""
    model = cell.model()
    H, d_k, d_v = sizes(model)
    layer = model.cfg.gdn_layers[-1]
    sae = BilinearMatrixSAE(d_k=d_k, d_v=d_v, n_features=6, k=2, site=site_name(layer, "state"), heads=[1], n_heads=H, seed=1)
    with torch.no_grad():
        sae.b_enc.fill_(0.2)  # codes large enough that the feature fires
    windows = random_tokens(model, 4, 13, 12)
    dashboard = build_dashboard(model, sae, windows, features_per_head=1, bins=6, horizon=4, n_contexts=3, left=3, right=2,
                                n_keys=3, n_logits=3, ablation_firings=1, batch_size=2, progress=False)
    write_site(dashboard, cell.tmp / "site", progress=False)
    assert len(dashboard.features) == 1
    card = dashboard.features[0]
    assert (cell.tmp / "site" / "index.html").is_file()
    assert (cell.tmp / "site" / feature_page_name(card.head, card.feature)).is_file()
    with torch.no_grad():
        _, cache = model.run_with_cache(windows, names_filter=site_name(layer, "state"))
        codes = sae.eval().encode(cache[site_name(layer, "state")][:, :, [1]])[..., 0, card.feature]
    assert card.head == 1 and card.n_firings == int((codes > 0).sum()) > 0
    assert card.frequency == pytest.approx(float((codes > 0).double().mean()), abs=1e-12)
    assert card.kl_carried is not None and math.isfinite(card.kl_carried) and card.kl_carried >= 0
    assert dashboard.heads[0].half_life == pytest.approx(memory_census(model, windows).head(layer, 1).half_life, rel=1e-6)


CHECKS = {
    "hooks": check_hooks,
    "edits": check_edits,
    "generation": check_generation,
    "effective_attention": check_effective_attention,
    "patching": check_patching,
    "census": check_census,
    "sae_training": check_sae_training,
    "splicing": check_splicing,
    "dashboard": check_dashboard,
}


# ---------------------------------------------------------------- the matrix


@pytest.mark.filterwarnings("ignore:step .* held-out FVU above 1:RuntimeWarning")  # SAEs trained for 16 steps
@pytest.mark.parametrize("family, tool", [pytest.param(family, tool.key, id=f"{family}-{tool.key}")
                                          for family in MATRIX for tool in TOOLS])
def test_capability(family, tool, checkpoints, tmp_path):
    """A cell that holds passes its check; a cell declared lacking is refused by the tool, by name."""
    cell = Cell(family, checkpoints(family), tmp_path)
    reason = lacking(family, tool)
    if reason is None:
        CHECKS[tool](cell)
        return
    with pytest.raises(ValueError) as error:
        CHECKS[tool](cell)
    name = next(t.name for t in TOOLS if t.key == tool)
    assert BY_KEY[family].name in str(error.value) and name in str(error.value) and reason in str(error.value)


def test_every_family_has_a_row_and_every_tool_a_check():
    keys = [tool.key for tool in TOOLS]
    assert len(set(keys)) == len(keys)
    assert list(MATRIX) == [family.key for family in FAMILIES]  # every registered family, in the registry's order
    assert set(TINY_MODELS) == set(BY_KEY)  # and a tiny checkpoint for each
    assert set(CHECKS) == set(keys)
    for family, row in MATRIX.items():
        assert list(row) == keys, family
        # a reason is a table cell: one line, no column separator
        assert all(reason is None or (isinstance(reason, str) and reason and not set(reason) & set("|\n"))
                   for reason in row.values()), family


def test_the_table_shows_every_cell(monkeypatch):
    """One row per tool, one column per family: ✓ where the cell holds, its reason where it does not; and the
    refusal a tool raises for a cell declared lacking names the capability, the family and the reason."""
    monkeypatch.setitem(MATRIX["mamba2"], "dashboard", "no reason, for this test")
    lines = capability_table().splitlines()
    assert lines[0].split(" | ")[1:-1] == [family.name for family in FAMILIES]
    assert len(lines) == 2 + len(TOOLS)
    for tool, line in zip(TOOLS, lines[2:]):
        cells = line.strip("| ").split(" | ")
        assert cells[0] == tool.name and cells[-1] == tool.checks
        assert cells[1:-1] == [MATRIX[family.key][tool.key] or "✓" for family in FAMILIES]
    assert lines[-1].split(" | ")[5] == "no reason, for this test"
    refusal = r"^Feature dashboard is not available for Mamba-2 models \(mamba2\): no reason, for this test$"
    with pytest.raises(ValueError, match=refusal):
        require("mamba2", "dashboard")
    require("qwen3_5", "dashboard")
    with pytest.raises(ValueError, match="no row for family 'mamba'"):
        lacking("mamba", "hooks")
