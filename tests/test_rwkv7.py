"""RWKV-7 (`hooked_gdn.rwkv7`) on tiny random models in BlinkDL's format (`tests.rwkv7_models`: head size 64, 2 layers,
every weight random): logits, states and one-token steps against BlinkDL's reference implementation (the ``rwkv``
package), loaded both from the ``.pth`` and from the flash-linear-attention folder; generation against the full forward
(left-padded batches too); the sequential mode, ``state_positions`` and carried edits of the write, erase and state hook
points against the parallel mode and `hooked_gdn.dplr.dplr_reference`; v_first's coupling of the layers; the hook
table of the module docstring and the quantities it names, recomputed from the weights; refusals; and the fla format's
names, shapes and round trip."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil

import pytest
import torch

from hooked_gdn import HookedGatedDeltaNet
from hooked_gdn.architectures.rwkv7 import fla_state_dict, save_fla_checkpoint
from hooked_gdn.dplr import DPLREdits, dplr_reference
from hooked_gdn.rwkv7 import HookedRWKV7
from hooked_gdn.sites import edit_at_positions, gdn_hook_name

from .rwkv7_models import TINY, random_blinkdl_state, save_fla, save_pth

H, N = TINY["d_model"] // TINY["head_size"], TINY["head_size"]
LAYERS = TINY["n_layers"]
TOKENS = torch.randint(0, TINY["d_vocab"], (2, 80), generator=torch.Generator().manual_seed(0))
T = 37  # positions of the tests below the parity ones: odd, a last chunk padded at every chunk size


def max_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.fixture(name="weights", scope="module")
def weights_fixture(tmp_path_factory):
    """The random model saved both ways: ``{"pth": path of the .pth, "fla": the fla checkpoint folder}``."""
    folder = tmp_path_factory.mktemp("rwkv7")
    state = random_blinkdl_state(decay_bias=-3.0)  # most channels keep tens of tokens: edits reach the end
    return {"pth": save_pth(state, folder), "fla": save_fla(state, folder / "fla")}


@pytest.fixture(name="reference", scope="module")
def reference_fixture(weights):
    """BlinkDL's ``RWKV`` on the .pth (``RWKV_V7_ON`` is read when ``rwkv.model`` is first imported)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RWKV_V7_ON", "1")
        from rwkv.model import RWKV

        return RWKV(str(weights["pth"].with_suffix("")), strategy="cpu fp32")


@pytest.fixture(name="models", scope="module")
def models_fixture(weights):
    return {source: HookedRWKV7.from_pretrained(str(path)).eval() for source, path in weights.items()}


@pytest.fixture(name="model")
def model_fixture(models):
    return models["fla"]


def blinkdl_state(state: list, layer: int) -> torch.Tensor:
    """BlinkDL's matrix state of a layer, [H, N_v, N_k], key-major as ours: [H, N_k, N_v]."""
    return state[3 * layer + 1].transpose(-1, -2)


def test_gradients_of_the_chunked_recurrence_equal_the_sequential_loops(model):
    """BlinkDL's forward is inference only, so the chunked recurrence's backward is checked against the plain loop's
    (``recurrence="sequential"``): the loss's gradient in every parameter."""
    tokens = torch.randint(0, 256, (2, T), generator=torch.Generator().manual_seed(3))
    found = {}
    for mode in ("parallel", "sequential"):
        model.zero_grad()
        model(tokens, "loss", recurrence=mode).backward()
        found[mode] = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    for n, loop in found["sequential"].items():
        assert loop.abs().max() > 0, n
        assert max_gap(found["parallel"][n], loop) <= 1e-4 * loop.abs().max().item(), n


# ---------------------------------------------------------------- against BlinkDL's reference


@pytest.mark.parametrize("source", ["pth", "fla"])
@pytest.mark.parametrize("length", [37, 80])
@pytest.mark.parametrize("chunk_size", [8, 16, 64])
def test_logits_and_states_equal_blinkdls(models, reference, source, length, chunk_size):
    """Logits (of size ~5) within 1e-4; each layer's state at three positions (BlinkDL's final state of that prefix)
    and its final state within 1e-5 of the state's size."""
    tokens = TOKENS[0, :length]
    positions = [0, 20, length - 1]
    names = [gdn_hook_name(layer, hook) for layer in range(LAYERS) for hook in ("hook_state", "hook_final_state")]
    with torch.no_grad():
        logits, cache = models[source].run_with_cache(tokens[None], names_filter=names, chunk_size=chunk_size,
                                                      state_positions=positions)
    theirs, final = reference.forward(tokens.tolist(), None, full_output=True)
    assert 2 <= theirs.abs().max().item() <= 10
    assert max_gap(logits[0], theirs) <= 1e-4
    for i, t in enumerate(positions):
        _, state = reference.forward(tokens[: t + 1].tolist(), None)
        for layer in range(LAYERS):
            want = blinkdl_state(state, layer)
            assert max_gap(cache[gdn_hook_name(layer, "hook_state")][0, i], want) <= 1e-5 * want.abs().max().item()
    for layer in range(LAYERS):
        want = blinkdl_state(final, layer)
        assert max_gap(cache[gdn_hook_name(layer, "hook_final_state")][0], want) <= 1e-5 * want.abs().max().item()


def test_one_token_steps_equal_blinkdls(model, reference):
    """Our generation loop (``prefill``, then one token at a time from the `GDNCache`) against BlinkDL's one-token
    forward from its state: the logits of each step, and at the end every layer's matrix state and both token
    shifts (BlinkDL's state list holds, per layer, the time mix's last input, the matrix, the channel mix's)."""
    tokens, prefix = TOKENS[0, :T], 21
    with torch.no_grad():
        cache = model.prefill(tokens[None, :prefix])
        _, state = reference.forward(tokens[:prefix].tolist(), None)
        for t in range(prefix, len(tokens)):
            ours = model(tokens[None, t : t + 1], cache=cache)[0, -1]
            theirs, state = reference.forward([tokens[t].item()], state)
            assert max_gap(ours, theirs) <= 1e-4, t
    for layer in range(LAYERS):
        want = blinkdl_state(state, layer)
        assert max_gap(cache.recurrent_states[layer][0], want) <= 1e-5 * want.abs().max().item()
        assert max_gap(cache.shift_states[f"{layer}.time_mix"][0], state[3 * layer]) <= 1e-5
        assert max_gap(cache.shift_states[f"{layer}.channel_mix"][0], state[3 * layer + 2]) <= 1e-5


# ---------------------------------------------------------------- generation, modes and state positions


def test_cached_steps_equal_the_full_forward(model):
    with torch.no_grad():
        full = model(TOKENS[:, :T])
        cache = model.prefill(TOKENS[:, :30])
        steps = torch.cat([model(TOKENS[:, t : t + 1], cache=cache) for t in range(30, T)], 1)
    assert max_gap(steps, full[:, 30:]) <= 1e-4


def test_left_padded_rows_equal_their_unpadded_runs(model):
    """Row 1 padded by 6 on the left (its first tokens are junk that the mask hides): its logits at real positions,
    and those of its continuation from the cache, equal the run of its real tokens alone."""
    tokens, pad = TOKENS[:, :30].clone(), 6
    mask = torch.ones_like(tokens)
    mask[1, :pad] = 0
    with torch.no_grad():
        padded = model(tokens, attention_mask=mask)
        alone = [model(tokens[:1]), model(tokens[1:, pad:])]
        cache = model.prefill(tokens[:, :20], attention_mask=mask[:, :20])
        steps = torch.cat([model(tokens[:, t : t + 1], cache=cache) for t in range(20, 30)], 1)
    assert max_gap(padded[0], alone[0][0]) <= 1e-4
    assert max_gap(padded[1, pad:], alone[1][0]) <= 1e-4
    assert max_gap(steps[0], alone[0][0, 20:]) <= 1e-4
    assert max_gap(steps[1], alone[1][0, 20 - pad :]) <= 1e-4


def test_sequential_equals_parallel_and_state_positions_pick_states(model):
    names = [gdn_hook_name(layer, "hook_state") for layer in range(LAYERS)]
    positions = [3, 16, -2]  # -2 is position 35 of 37
    with torch.no_grad():
        parallel, every = model.run_with_cache(TOKENS[:, :T], names_filter=names)
        sequential, some = model.run_with_cache(TOKENS[:, :T], names_filter=names, recurrence="sequential",
                                                state_positions=positions)
        _, some_parallel = model.run_with_cache(TOKENS[:, :T], names_filter=names, state_positions=positions)
    assert max_gap(parallel, sequential) <= 1e-4
    for name in names:
        assert every[name].shape == (2, T, H, N, N)
        scale = every[name].abs().max().item()
        assert max_gap(some[name], every[name][:, [3, 16, 35]]) <= 1e-5 * scale
        assert max_gap(some_parallel[name], every[name][:, [3, 16, 35]]) <= 1e-5 * scale


# ---------------------------------------------------------------- carried edits

INPUTS = ("hook_read_query", "hook_log_decay", "hook_erase_key", "hook_erase_rate", "hook_write_key", "hook_write_value")
_g = torch.Generator().manual_seed(3)
NEW_KEY, NEW_VALUE = torch.randn(N, generator=_g), torch.randn(N, generator=_g)
DIFFS = {4: torch.randn(H, N, N, generator=_g), 15: torch.randn(H, N, N, generator=_g)}


def force_key(rows, pos):
    rows[:, 1] = NEW_KEY
    return rows


def force_value(rows, pos):
    rows[:, 1] = NEW_VALUE
    return rows


def delete_erase(rows, pos):
    rows[:, 0] = 0.0
    return rows


def add_diff(rows, pos):
    return rows + DIFFS[pos]


def edit_cases(layer: int, clean: dict) -> dict:
    """case -> (hooks, the `DPLREdits` they amount to on the clean inputs ``clean``, the first edited position): a
    write forced at 6 (head 1), an erase deleted at 9 (head 0), state differences at 4 and 15, and all of them."""
    name = lambda hook: gdn_hook_name(layer, hook)
    write_mask = torch.zeros(2, T, H, dtype=torch.bool)
    write_mask[:, 6, 1] = True
    write_key, write_value = clean["hook_write_key"].clone(), clean["hook_write_value"].clone()
    write_key[:, 6, 1], write_value[:, 6, 1] = NEW_KEY, NEW_VALUE
    erase_mask = torch.zeros(2, T, H, dtype=torch.bool)
    erase_mask[:, 9, 0] = True
    write = ([(name("hook_write_key"), edit_at_positions(force_key, [6])),
              (name("hook_write_value"), edit_at_positions(force_value, [6]))],
             dict(write_mask=write_mask, write_key=write_key, write_value=write_value), 6)
    erase = ([(name("hook_erase_value"), edit_at_positions(delete_erase, [9]))],
             dict(erase_mask=erase_mask, erase_value=torch.zeros(2, T, H, N)), 9)
    state = ([(name("hook_state"), edit_at_positions(add_diff, list(DIFFS)))],
             dict(diff_positions=torch.tensor(list(DIFFS)), state_diff=torch.stack(list(DIFFS.values()))[None].expand(2, -1, -1, -1, -1)),
             4)
    every = (write[0] + erase[0] + state[0], write[1] | erase[1] | state[1], 4)
    return {"write": write, "erase": erase, "state": state, "all": every}


@pytest.mark.parametrize("layer", range(LAYERS))
@pytest.mark.parametrize("case", ["write", "erase", "state", "all"])
def test_parallel_edits_equal_sequential_and_the_reference(model, layer, case):
    """In parallel mode (chunks of 8) the layer's reads and final state equal `dplr_reference` with the same
    `DPLREdits` on the layer's cached inputs, and the logits those of the sequential mode; the logits change from
    the first edited position on, not before it."""
    tokens = TOKENS[:, :T]
    with torch.no_grad():
        clean, cache = model.run_with_cache(tokens, names_filter=[gdn_hook_name(layer, hook) for hook in INPUTS])
    inputs = {hook: cache[gdn_hook_name(layer, hook)] for hook in INPUTS}
    hooks, edits, first = edit_cases(layer, inputs)[case]
    outputs = [gdn_hook_name(layer, "hook_recurrence_out"), gdn_hook_name(layer, "hook_final_state")]
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        parallel, edited = model.run_with_cache(tokens, names_filter=outputs, chunk_size=8)
        sequential = model(tokens, recurrence="sequential")
    expected = dplr_reference(*(inputs[hook] for hook in INPUTS), edits=DPLREdits(**edits))
    assert max_gap(edited[outputs[0]], expected.out) <= 1e-5 * expected.out.abs().max().item()
    assert max_gap(edited[outputs[1]], expected.final_state) <= 1e-5 * expected.final_state.abs().max().item()
    assert max_gap(parallel, sequential) <= 1e-4
    assert max_gap(parallel[:, :first], clean[:, :first]) <= 1e-5
    assert max_gap(parallel[:, first], clean[:, first]) > 1e-3
    assert max_gap(parallel[:, -1], clean[:, -1]) > 1e-3  # carried to the end


def test_v_first_couples_layer_0_to_later_layers(model):
    """Layer 1's value is mixed with layer 0's (hook_v_first, layer 0 only; its share is layer 1's hook_v_mix): an
    edit of layer 0's v_first changes layer 1's written value as v_1 + (v_first − v_1) ⊙ share predicts, and not
    layer 0's own written value."""
    mixer0, mixer1 = model.blocks[0].linear_attn, model.blocks[1].linear_attn
    assert hasattr(mixer0, "hook_v_first") and not hasattr(mixer0, "hook_v_mix")
    assert hasattr(mixer1, "hook_v_mix") and not hasattr(mixer1, "hook_v_first")
    names = [gdn_hook_name(0, "hook_write_value"), gdn_hook_name(1, "hook_write_value"), gdn_hook_name(1, "hook_v"),
             gdn_hook_name(1, "hook_v_mix"), gdn_hook_name(0, "hook_v_first")]
    shift = torch.randn(2, T, H, N, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        _, clean = model.run_with_cache(TOKENS[:, :T], names_filter=names)
        with model.hooks(fwd_hooks=[(gdn_hook_name(0, "hook_v_first"), lambda x, hook: x + shift)]):
            _, edited = model.run_with_cache(TOKENS[:, :T], names_filter=names)
    assert torch.equal(edited[names[0]], clean[names[0]])
    assert max_gap(edited[names[1]], clean[names[1]]) > 1e-2
    v1, share = clean[names[2]], clean[names[3]]
    assert max_gap(clean[names[1]], v1 + (clean[names[4]] - v1) * share) <= 1e-5
    assert max_gap(edited[names[1]] - clean[names[1]], shift * share) <= 1e-5


# ---------------------------------------------------------------- the hook table


def test_hook_shapes_are_the_docstrings_and_quantities_are_recomputed(model):
    """The shapes of the module docstring's table; k̃ = k ⊙ (1 + (a − 1) ⊙ k_a) from hook_k, hook_erase_rate and the
    weights; unit removal keys; log w ∈ (−e^{−1/2}, 0); and, position by position, e_t = −S_{t−1}ᵀ κ̂_t (the
    undecayed state), S_t = diag(w_t) S_{t−1} + (a_t ⊙ κ̂_t) e_tᵀ + k̃_t v_tᵀ, the read S_tᵀ r_t and the bonus
    (r_t · (r_k ⊙ k̃_t)) v_t."""
    rows = ["hook_read_query", "hook_k", "hook_v", "hook_log_decay", "hook_erase_rate", "hook_erase_key", "hook_write_key",
            "hook_write_value", "hook_erase_value", "hook_recurrence_out", "hook_bonus", "hook_gate", "hook_gated_out"]
    expected = {gdn_hook_name(layer, hook): (2, T, H, N) for layer in range(LAYERS) for hook in rows}
    expected |= {gdn_hook_name(layer, "hook_state"): (2, T, H, N, N) for layer in range(LAYERS)}
    expected |= {gdn_hook_name(layer, "hook_final_state"): (2, H, N, N) for layer in range(LAYERS)}
    expected |= {gdn_hook_name(layer, hook): (2, T, H * N) for layer in range(LAYERS) for hook in ("hook_in", "hook_out")}
    expected |= {gdn_hook_name(0, "hook_v_first"): (2, T, H, N), gdn_hook_name(1, "hook_v_mix"): (2, T, H, N)}
    expected |= {f"blocks.{layer}.mlp.{hook}": (2, T, TINY["d_mlp"]) for layer in range(LAYERS) for hook in ("hook_pre", "hook_post")}
    with torch.no_grad():
        _, cache = model.run_with_cache(TOKENS[:, :T], names_filter=list(expected))
    assert {name: tuple(cache[name].shape) for name in expected} == expected
    for layer in range(LAYERS):
        c = lambda hook: cache[gdn_hook_name(layer, hook)]
        mixer = model.blocks[layer].linear_attn
        k_a = mixer.k_a.view(H, N)
        assert max_gap(c("hook_write_key"), c("hook_k") * (1 + (c("hook_erase_rate") - 1) * k_a)) <= 1e-6
        assert max_gap(c("hook_erase_key").norm(dim=-1), torch.ones(2, T, H)) <= 1e-5
        assert bool((c("hook_log_decay") < 0).all()) and bool((c("hook_log_decay") > -math.exp(-0.5)).all())
        S, kappa = c("hook_state"), c("hook_erase_key")
        before = torch.cat([torch.zeros_like(S[:, :1]), S[:, :-1]], 1)
        erase = -torch.einsum("bthkv,bthk->bthv", before, kappa)
        assert max_gap(c("hook_erase_value"), erase) <= 1e-5 * erase.abs().max().item()
        rebuilt = (before * c("hook_log_decay").exp()[..., None] + (c("hook_erase_rate") * kappa)[..., None] * erase[..., None, :]
                   + c("hook_write_key")[..., None] * c("hook_write_value")[..., None, :])
        assert max_gap(S, rebuilt) <= 1e-5 * S.abs().max().item()
        read = torch.einsum("bthkv,bthk->bthv", S, c("hook_read_query"))
        assert max_gap(c("hook_recurrence_out"), read) <= 1e-5 * read.abs().max().item()
        bonus = (c("hook_read_query") * c("hook_write_key") * mixer.r_k).sum(-1, keepdim=True) * c("hook_write_value")
        assert max_gap(c("hook_bonus"), bonus) <= 1e-5


# ---------------------------------------------------------------- refusals


class NotATensor:
    """Something torch.load(weights_only=True) will not unpickle."""


@pytest.mark.parametrize("content, message", [
    ({"emb.weight": torch.zeros(2, 2), "version": 7}, r"holds only tensors named by strings; this one also holds \['version'\]"),
    ({"emb.weight": NotATensor()}, r"not a state dict of tensors that torch\.load\(weights_only=True\) reads"),
    ({"blocks.0.att.time_first": torch.zeros(4)}, r"is RWKV-4 \(it has 'att\.time_first' weights\), not RWKV-7"),
    ({"blocks.0.att.time_faaaa": torch.zeros(4)}, r"is RWKV-5 \(it has 'att\.time_faaaa' weights\), not RWKV-7"),
    ({"blocks.0.att.time_maa_x": torch.zeros(4)}, r"is RWKV-6 .* \(it has 'att\.time_maa_x' weights\), not RWKV-7"),
])
def test_pth_that_is_not_rwkv7_is_refused(tmp_path, content, message):
    path = tmp_path / "other.pth"
    torch.save(content, path)
    with pytest.raises(ValueError, match=message) as refused:
        HookedGatedDeltaNet.from_pretrained(str(path))
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("change, message", [
    (dict(model_type="rwkv6"), r"unsupported model type 'rwkv6': .*the supported families are .*RWKV-7 \(rwkv7"),
    (dict(head_dim=48, num_heads=None), r"unsupported head size 48: it must divide hidden_size \(128\)"),
    (dict(hidden_act="swish"), r"unsupported hidden_act='swish': the RWKV-7 model implements only hidden_act='sqrelu'"),
    (dict(attn={"layers": [1], "num_heads": 2}), r"unsupported attn=.*implements only attn=None"),
    (dict(value_dim=256), r"unsupported value_dim=256: .*value_dim = hidden_size = 128"),
])
def test_fla_config_the_model_does_not_implement_is_refused(weights, tmp_path, change, message):
    folder = tmp_path / "changed"
    shutil.copytree(weights["fla"], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | change))
    for cls in (HookedGatedDeltaNet, HookedRWKV7):
        with pytest.raises(ValueError, match=message) as refused:
            cls.from_pretrained(folder)
        assert "\n" not in str(refused.value)


# ---------------------------------------------------------------- the fla format


def expected_fla_shapes() -> dict[str, tuple]:
    """flash-linear-attention's names and shapes for the tiny model (C = 128, H = 2, N = 64, ranks w/a/v/g = 8/8/8/16)."""
    C, ranks = TINY["d_model"], TINY["ranks"]
    shapes = {"model.embeddings.weight": (TINY["d_vocab"], C), "model.norm.weight": (C,), "model.norm.bias": (C,),
              "lm_head.weight": (TINY["d_vocab"], C), "model.layers.0.pre_norm.weight": (C,), "model.layers.0.pre_norm.bias": (C,)}
    for layer in range(LAYERS):
        p = f"model.layers.{layer}."
        shapes |= {f"{p}attn.x_{c}": (1, 1, C) for c in "rwkvag"}
        shapes |= {f"{p}attn.k_k": (C,), f"{p}attn.k_a": (C,), f"{p}attn.r_k": (H, N)}
        shapes |= {f"{p}attn.{m}_proj.weight": (C, C) for m in "rkvo"}
        for lora in "wavg" if layer else "wag":
            shapes |= {f"{p}attn.{lora}_lora.lora.0.weight": (ranks[lora], C), f"{p}attn.{lora}_lora.lora.2.weight": (C, ranks[lora])}
            if lora != "g":
                shapes[f"{p}attn.{lora}_lora.lora.2.bias"] = (C,)
        shapes |= {f"{p}{norm}.{part}": (C,) for norm in ("attn.g_norm", "attn_norm", "ffn_norm") for part in ("weight", "bias")}
        shapes |= {f"{p}ffn.x_k": (C,), f"{p}ffn.key.weight": (TINY["d_mlp"], C), f"{p}ffn.value.weight": (C, TINY["d_mlp"])}
    return shapes


def test_fla_state_dict_has_flash_linear_attentions_names_and_shapes(model):
    assert {key: tuple(tensor.shape) for key, tensor in fla_state_dict(model).items()} == expected_fla_shapes()


def test_saved_and_reloaded_model_is_identical(model, tmp_path):
    save_fla_checkpoint(model, tmp_path)
    again = HookedRWKV7.from_pretrained(tmp_path).eval()
    assert dataclasses.replace(again.cfg, model_name=model.cfg.model_name) == model.cfg
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values(), strict=True))
    with torch.no_grad():
        assert torch.equal(again(TOKENS[:, :T]), model(TOKENS[:, :T]))
