"""TransformerLens' Mamba-2 bridge names on `HookedMamba2` (`hooked_gdn.mamba2`): every hook point of the bridge
(TransformerLens 4.3's ``TransformerBridge`` on transformers' ``Mamba2ForCausalLM``) is either an alias of ours
holding the bridge's value in the bridge's layout, or listed as not provided; a TransformerLens Mamba-2 notebook
runs unchanged; edits through the aliases are edits of ours (carried through the recurrence where ours are)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import Mamba2Config, Mamba2ForCausalLM

from hooked_gdn.mamba2 import HookedMamba2
from hooked_gdn.sites import edit_at_positions, hook_positions

N_LAYERS = 2
CONFIG = dict(vocab_size=61, hidden_size=16, num_hidden_layers=N_LAYERS, num_heads=4, head_dim=8, state_size=6, n_groups=2,
              expand=2, conv_kernel=4, chunk_size=8, use_bias=True, pad_token_id=0, eos_token_id=1, bos_token_id=None,
              tie_word_embeddings=False)
TOKENS = torch.randint(2, 61, (2, 11), generator=torch.Generator().manual_seed(0))


def _heads_flat(x):
    return x.flatten(-2)


def native_values(c, model, layer: int) -> dict[str, torch.Tensor]:
    """Each of layer ``layer``'s bridge names (under blocks.L.) -> its value computed from our native hooks' cache ``c``."""
    n = lambda name: c[f"blocks.{layer}.{name}"]
    la = lambda name: n(f"linear_attn.{name}")
    pre_conv = [_heads_flat(la(f"hook_{x}_pre_conv")) for x in "vkq"]
    in_proj = torch.cat([_heads_flat(la("hook_gate_input")), *pre_conv, la("hook_beta_logit")], -1)
    gated = _heads_flat(la("hook_gated_out"))
    mixer = model.blocks[layer].linear_attn
    D = mixer.D.float()
    conv_in = torch.cat(pre_conv, -1).transpose(1, 2)
    # as torch's nn.Conv1d(padding=K−1), the bridge's conv1d: p + K − 1 positions
    conv_out = F.conv1d(conv_in, mixer.conv_weight, mixer.conv_bias, padding=mixer.cfg.conv_kernel - 1, groups=mixer.conv_dim)
    return {
        "hook_in": n("hook_resid_pre"), "hook_out": n("hook_resid_post"),
        "hook_mixer_in": la("hook_in"), "hook_mixer_out": la("hook_out"),
        "norm.hook_in": n("hook_resid_pre"), "norm.hook_out": la("hook_in"), "norm.hook_scale": n("ln1.hook_scale"),
        "norm.hook_normalized": n("hook_resid_pre") / n("ln1.hook_scale"),
        "mixer.hook_in": la("hook_in"), "mixer.in_proj.hook_in": la("hook_in"),
        "mixer.in_proj.hook_out": in_proj, "mixer.hook_in_proj": in_proj,
        "mixer.conv1d.hook_in": conv_in, "mixer.conv1d.hook_out": conv_out, "mixer.hook_conv": conv_out,
        "mixer.hook_ssm_write": torch.einsum("bthp,bthn->bthpn", la("hook_write_value"), la("hook_write_key")),
        "mixer.hook_ssm_state": la("hook_state").transpose(-1, -2),
        "mixer.inner_norm.hook_in": _heads_flat(la("hook_recurrence_out") + D[:, None] * la("hook_v")),
        "mixer.inner_norm.hook_gate": _heads_flat(la("hook_gate_input")),
        "mixer.inner_norm.hook_out": gated, "mixer.hook_inner_norm": gated, "mixer.out_proj.hook_in": gated,
        "mixer.out_proj.hook_out": la("hook_out"), "mixer.hook_out": la("hook_out"), "mixer.hook_ssm_out": la("hook_out"),
    }


def native_model_values(c, model) -> dict[str, torch.Tensor]:
    """Every bridge name we provide -> its value from our native hooks (including the names we share with the bridge)."""
    values = {f"blocks.{layer}.{name}": v for layer in range(N_LAYERS) for name, v in native_values(c, model, layer).items()}
    for layer in range(N_LAYERS):
        values |= {f"blocks.{layer}.{n}": c[f"blocks.{layer}.{n}"] for n in ("hook_resid_pre", "hook_resid_post")}
    last = c[f"blocks.{N_LAYERS - 1}.hook_resid_post"]
    normed = last / c["ln_final.hook_scale"] * model.ln_final.w
    return values | {"hook_embed": c["hook_embed"], "embed.hook_out": c["hook_embed"], "ln_final.hook_in": last,
                     "ln_final.hook_scale": c["ln_final.hook_scale"], "ln_final.hook_out": normed,
                     "ln_final.hook_normalized": last / c["ln_final.hook_scale"]}


#: the bridge's names we do not provide, and why (the same reasons as the docs' table)
NOT_PROVIDED = {
    "embed.hook_in": "the token ids: our hook_embed holds their embeddings",
    "unembed.hook_in": "the model's unembed is TransformerLens' method (logits from a normalised residual); ln_final.hook_out holds it",
    "unembed.hook_out": "the logits are what forward returns",
    "hook_unembed": "the logits are what forward returns",
}


#: names the bridge shares with ours (TransformerLens' own names): the same hook point
SHARED = {"hook_embed", "ln_final.hook_scale", "ln_final.hook_normalized", *(f"blocks.{i}.hook_resid_{w}" for i in range(N_LAYERS) for w in ("pre", "post"))}
#: aliases whose values are our native values moved, not recomputed (the others: a concatenation, an outer product,
#: D x added, the norm or the conv recomputed; equal to 1e-6)
EXACT = {"hook_embed", "embed.hook_out", "ln_final.hook_in", "ln_final.hook_scale", "hook_in", "hook_out", "hook_mixer_in",
         "hook_mixer_out", "hook_resid_pre", "hook_resid_post", "norm.hook_in", "norm.hook_out", "norm.hook_scale",
         "mixer.hook_in", "mixer.in_proj.hook_in", "mixer.in_proj.hook_out", "mixer.hook_in_proj", "mixer.conv1d.hook_in",
         "mixer.hook_ssm_state", "mixer.inner_norm.hook_gate", "mixer.inner_norm.hook_out", "mixer.hook_inner_norm",
         "mixer.out_proj.hook_in", "mixer.out_proj.hook_out", "mixer.hook_out", "mixer.hook_ssm_out"}


def is_not_provided(name: str) -> bool:
    return any(name == n or name.endswith("." + n) and name.startswith("blocks.") for n in NOT_PROVIDED)


@pytest.fixture(name="folder", scope="module")
def folder_fixture(tmp_path_factory):
    """A random transformers Mamba-2 with grouped heads (4 heads in 2 groups), weights moved off their initialisation."""
    torch.manual_seed(0)
    hf = Mamba2ForCausalLM(Mamba2Config(**CONFIG)).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    folder = tmp_path_factory.mktemp("mamba2-bridge-names")
    hf.save_pretrained(folder)
    return folder


@pytest.fixture(name="model", scope="module")
def model_fixture(folder):
    return HookedMamba2.from_pretrained(folder).eval()


@pytest.fixture(name="bridge", scope="module")
def bridge_fixture(folder):
    from benchmarks.tl_bridge import boot_bridge

    try:
        return boot_bridge(str(folder))
    except RuntimeError as err:
        pytest.skip(f"no TransformerLens bridge with Mamba-2's eager scan in this environment: {err}")


def assert_close(a, b, tol, what=""):
    assert a.shape == b.shape, f"{what}: shapes {tuple(a.shape)} vs {tuple(b.shape)}"
    assert (a.float() - b.float()).abs().max().item() <= tol, f"{what}: differ by {(a.float() - b.float()).abs().max().item()}"


def ours_cache(model, names):
    with torch.no_grad():
        return model.run_with_cache(TOKENS, names_filter=names)[1]


def test_every_bridge_name_is_provided_with_the_bridges_value_or_listed(model, bridge):
    with torch.no_grad():
        bridge_logits, theirs = bridge.run_with_cache(TOKENS, use_cache=False)
    provided = [name for name in bridge.hook_dict if not is_not_provided(name)]
    left_out = [name for name in bridge.hook_dict if is_not_provided(name)]
    assert {n for n in NOT_PROVIDED if any(name == n or name.endswith("." + n) for name in left_out)} == set(NOT_PROVIDED)
    assert not set(left_out) & set(model.hook_dict)
    assert set(provided) <= set(model.hook_dict), sorted(set(provided) - set(model.hook_dict))
    ours = ours_cache(model, provided)
    assert set(ours.keys()) == set(provided)
    for name in provided:
        assert_close(ours[name], theirs[name], 1e-4, name)
    ours_native = ours_cache(model, [name for name in model.hook_dict if name not in bridge.hook_dict or name in SHARED])
    native = native_model_values(ours_native, model)
    assert set(native) == set(provided)
    for name in provided:  # the alias is our native value in the bridge's layout (exactly, where no arithmetic forms it)
        assert_close(ours[name], native[name], 0 if (name.split(".", 2)[-1] if name.startswith("blocks.") else name) in EXACT else 1e-6, name)
    assert_close(model(TOKENS), bridge_logits, 1e-4, "logits")


NOTEBOOK_NAMES = ["blocks.1.mixer.hook_ssm_state", "blocks.1.mixer.in_proj.hook_out", "blocks.1.mixer.inner_norm.hook_in",
                  "blocks.1.mixer.hook_inner_norm", "blocks.0.hook_mixer_out", "hook_embed"]


def notebook(model, tokens) -> dict:
    """Cells of a TransformerLens Mamba-2 notebook, written for the bridge: cache by name, index the cache,
    ablate the gate at one position, read the state through a hook, and hook through ``hook_dict``."""
    logits, cache = model.run_with_cache(tokens, names_filter=lambda name: name in NOTEBOOK_NAMES)
    state = cache["blocks.1.mixer.hook_ssm_state"]  # [batch, pos, heads, head_dim, d_state]
    n_heads = state.shape[2]
    dt = cache["blocks.1.mixer.in_proj.hook_out"][..., -n_heads:]  # the dt rows of in_proj

    def zero_gate(gate, hook):
        gate[:, 5] = 0.0
        return gate

    ablated = model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.mixer.inner_norm.hook_gate", zero_gate)])
    seen = []
    with model.hooks(fwd_hooks=[("blocks.1.mixer.hook_ssm_state", lambda s, hook: seen.append(s.norm(dim=(-2, -1))))]):
        model(tokens)
    model.hook_dict["blocks.0.mixer.out_proj.hook_in"].add_hook(lambda x, hook: x * 0.5)
    halved = model(tokens)
    model.reset_hooks()
    return {"logits": logits, "state norms": state.norm(dim=(-2, -1)), "dt": dt, "keys": sorted(cache.keys()),
            "norm in": cache["blocks.1.mixer.inner_norm.hook_in"], "gate ablated": ablated, "hooked state norms": seen[0],
            "out_proj input halved": halved, "after reset": model(tokens)}


def test_a_transformer_lens_notebook_runs_unchanged(model, bridge):
    with torch.no_grad():
        theirs, ours = notebook(bridge, TOKENS), notebook(model, TOKENS)
    assert ours["keys"] == theirs["keys"] == sorted(NOTEBOOK_NAMES)
    for key in ours.keys() - {"keys"}:
        assert_close(ours[key], theirs[key], 1e-4, key)
    assert (ours["gate ablated"] - ours["logits"]).abs().max().item() > 1e-3  # the edits did something
    assert (ours["out_proj input halved"] - ours["logits"]).abs().max().item() > 1e-3


def test_a_state_edit_through_the_alias_is_carried_as_the_bridges_write_edit(model, bridge):
    """The bridge carries an edit of its write (hook_ssm_write) and not of its state trajectory; ours carries state
    edits. Adding 2 W_5 to the state at 5 through our hook_ssm_state is the bridge's tripling of W_5."""
    t = 5

    def triple_write(write, hook):
        write[:, t] *= 3.0
        return write

    with torch.no_grad():
        theirs = bridge.run_with_hooks(TOKENS, fwd_hooks=[("blocks.0.mixer.hook_ssm_write", triple_write)])
        write = model.run_with_cache(TOKENS, names_filter="blocks.0.mixer.hook_ssm_write")[1]["blocks.0.mixer.hook_ssm_write"]
        add = edit_at_positions(lambda rows, p: rows + 2 * write[:, p], [t])
        ours = model.run_with_hooks(TOKENS, fwd_hooks=[("blocks.0.mixer.hook_ssm_state", add)])
        clean = model(TOKENS)
    assert_close(ours, theirs, 1e-4, "carried edit")
    assert (ours[:, -1] - clean[:, -1]).abs().max().item() > 1e-3  # reached the last position
    assert_close(ours[:, :t], clean[:, :t], 1e-6, "before the edit")


def conv_edit(edit, positions):
    """A hook on the conv's output [b, conv_dim, p + K − 1] applying ``edit`` to the given positions (dim 2)."""
    def hook(c, hook):
        c = c.clone()
        c[:, :, positions] = edit(c[:, :, positions])
        return c
    return hook


def test_an_edit_of_the_conv_output_is_the_bridges_and_the_same_edit_after_the_silu(model, bridge):
    """An edit of the conv before its SiLU at one position, through hook_conv, gives the bridge's logits under the same
    edit of its hook_conv, and ours under that edit made by hand after the SiLU (hook_v, hook_k, hook_q set to SiLU of
    the edited conv). Edits of the K−1 trailing positions change nothing, ours or the bridge's."""
    t, edit = 4, lambda c: c * 0.5 + 0.3
    name = "blocks.0.mixer.hook_conv"
    with torch.no_grad():
        clean = model(TOKENS)
        ours = model.run_with_hooks(TOKENS, fwd_hooks=[(name, conv_edit(edit, [t]))])
        theirs = bridge.run_with_hooks(TOKENS, fwd_hooks=[(name, conv_edit(edit, [t]))], use_cache=False)
        conv = ours_cache(model, [name])[name]
    assert_close(ours, theirs, 1e-4, "the bridge's edit")
    assert (ours[:, -1] - clean[:, -1]).abs().max().item() > 1e-3  # carried by the state to the last position

    cfg = model.cfg
    after_silu = F.silu(edit(conv[:, :, t])).split([cfg.n_value_heads * cfg.d_value, cfg.n_key_heads * cfg.d_key,
                                                    cfg.n_key_heads * cfg.d_key], -1)

    def set_row(value):
        def hook(x, hook):
            x = x.clone()
            x[:, t] = value.view(x[:, t].shape)
            return x
        return hook

    by_hand = [(f"blocks.0.linear_attn.hook_{which}", set_row(value)) for which, value in zip("vkq", after_silu)]
    with torch.no_grad():
        assert_close(ours, model.run_with_hooks(TOKENS, fwd_hooks=by_hand), 1e-6, "the edit by hand after the SiLU")

    trailing = list(range(TOKENS.shape[1], conv.shape[-1]))
    assert len(trailing) == CONFIG["conv_kernel"] - 1
    with torch.no_grad():
        assert torch.equal(model.run_with_hooks(TOKENS, fwd_hooks=[(name, conv_edit(lambda c: c + 100.0, trailing))]), clean)
        assert_close(bridge.run_with_hooks(TOKENS, fwd_hooks=[(name, conv_edit(lambda c: c + 100.0, trailing))], use_cache=False),
                     bridge(TOKENS, use_cache=False), 0, "the bridge's trailing edit")


# ---------------------------------------------------------------- on ours alone (TransformerLens 3.x and 4.x)

ALIAS_EDITS = {  # alias (under blocks.0.), its positions' dim, edit in its layout, native and the same edit in ours
    "state": ("mixer.hook_ssm_state", 1, lambda s: s + torch.linspace(0, 1, s.shape[-1]),
              "linear_attn.hook_state", lambda s: s + torch.linspace(0, 1, s.shape[-2])[:, None]),
    "gate": ("mixer.inner_norm.hook_gate", 1, lambda z: z * torch.linspace(0, 1, z.shape[-1]),
             "linear_attn.hook_gate_input", lambda z: z * torch.linspace(0, 1, z.shape[-1] * z.shape[-2]).view(z.shape[-2:])),
    "conv input": ("mixer.conv1d.hook_in", 2, lambda x: x * 0.5, None, None),
    "conv output": ("mixer.hook_conv", 2, lambda c: c * 0.5 + 0.3, None, None),
    "norm input": ("mixer.inner_norm.hook_in", 1, lambda x: x.flip(-1), None, None),
}
T_EDIT = 4


def edit_rows(edit, dim: int, in_place: bool = False):
    """A hook applying ``edit`` to position ``T_EDIT`` along ``dim`` (returned, or in place), whether the hook point
    fires once with every position or once per position (the state: `hook_positions`)."""
    def hook(x, hook):
        if hook.name.endswith("state"):
            rows = (hook_positions(hook) == T_EDIT).nonzero().flatten().tolist()
            i = rows[0] if rows else None
        else:
            i = T_EDIT if x.shape[dim] > T_EDIT else None
        if i is None:
            return None
        row = x.narrow(dim, i, 1)
        if in_place:
            row.copy_(edit(row.clone()))
            return None
        return torch.cat([x.narrow(dim, 0, i), edit(row), x.narrow(dim, i + 1, x.shape[dim] - i - 1)], dim)
    return hook


@pytest.mark.parametrize("case", list(ALIAS_EDITS))
@pytest.mark.parametrize("in_place", [False, True])
def test_edits_through_an_alias_are_edits_of_ours(model, case, in_place):
    """Returned and in-place edits through an alias change the model as the same edit of our native hook does,
    from the edited position on, carried where ours are (the state), in both recurrence modes."""
    alias, dim, in_alias, native, in_native = ALIAS_EDITS[case]
    hooks = [(f"blocks.0.{alias}", edit_rows(in_alias, dim, in_place))]
    with torch.no_grad():
        clean = model(TOKENS)
        edited = model.run_with_hooks(TOKENS, fwd_hooks=hooks)
        sequential = model.run_with_hooks(TOKENS, fwd_hooks=hooks, recurrence="sequential")
    assert_close(edited[:, :T_EDIT], clean[:, :T_EDIT], 1e-6, "before the edit")
    assert (edited[:, T_EDIT] - clean[:, T_EDIT]).abs().max().item() > 1e-4
    assert (edited[:, -1] - clean[:, -1]).abs().max().item() > 1e-4  # carried (the state, the conv's inputs) or not
    assert_close(edited, sequential, 1e-4, "parallel vs sequential")
    if native is not None:
        with torch.no_grad():
            direct = model.run_with_hooks(TOKENS, fwd_hooks=[(f"blocks.0.{native}", edit_rows(in_native, 1))])
        assert_close(edited, direct, 1e-6, "alias vs native")


def test_the_conv_output_continues_a_cache(model):
    """With a cache (a prefix, then one token, then the rest), the conv output's first p positions are those of one
    forward over the whole sequence, and an edit at a decode step is the same edit in that one forward."""
    name, t = "blocks.1.mixer.conv1d.hook_out", 6
    seen = []
    with torch.no_grad():
        whole = ours_cache(model, [name])[name]
        cache = model.prefill(TOKENS[:, :t])
        with model.hooks(fwd_hooks=[(name, lambda c, hook: seen.append(c[:, :, :c.shape[-1] - CONFIG["conv_kernel"] + 1]))]):
            model(TOKENS[:, t:t + 1], cache=cache)
            model(TOKENS[:, t + 1:], cache=cache)
    assert_close(torch.cat(seen, -1), whole[:, :, t:TOKENS.shape[1]], 1e-6, "continued")

    edit = lambda c: c * -2.0
    with torch.no_grad():
        one_forward = model.run_with_hooks(TOKENS, fwd_hooks=[(name, conv_edit(edit, [t]))])
        cache = model.prefill(TOKENS[:, :t])
        with model.hooks(fwd_hooks=[(name, conv_edit(edit, [0]))]):
            step = model(TOKENS[:, t:t + 1], cache=cache)
        rest = model(TOKENS[:, t + 1:], cache=cache)
    assert_close(torch.cat([step, rest], 1), one_forward[:, t:], 1e-5, "an edit at a decode step")


def test_the_write_is_for_reading(model):
    def double_in_place(write, hook):
        write.mul_(2)

    for edit in (lambda write, hook: write * 2, double_in_place):
        with torch.no_grad(), pytest.raises(ValueError, match="hook_ssm_write is for reading only.*hook_write_key.*"
                                                               "blocks.1.mixer.hook_ssm_state"):
            model.run_with_hooks(TOKENS, fwd_hooks=[("blocks.1.mixer.hook_ssm_write", edit)])


def test_the_default_cache_leaves_out_the_state_sized_names(model):
    """As our own hook_state: a state (or a whole write) per position and head is asked for by name."""
    with torch.no_grad():
        _, cache = model.run_with_cache(TOKENS)
    left_out = {name for name in model.hook_dict if name not in cache.keys()}
    assert left_out == {f"blocks.{i}.{name}" for i in range(N_LAYERS)
                        for name in ("linear_attn.hook_state", "mixer.hook_ssm_state", "mixer.hook_ssm_write")}


def test_aliases_hold_no_weights_and_change_nothing_unhooked(model):
    """No parameter or buffer under a bridge name; unhooked, the aliases' extra firing points change no output bit
    (every alias hooked with an observer gives the same logits exactly)."""
    assert not [k for k in model.state_dict() if ".mixer." in k or ".norm.hook" in k or k.startswith("embed.")]
    assert len(model.state_dict()) == len(dict(model.named_parameters())) + len(list(model.buffers(recurse=True))) \
        - len([b for b in model.named_buffers() if b[0] == "rotary_inv_freq"])
    names = [n for n in model.hook_dict if ".mixer." in n or ".norm." in n or n.startswith(("embed.", "ln_final.hook_"))
             or n.split(".")[-1] in ("hook_in", "hook_out", "hook_mixer_in", "hook_mixer_out")]
    with torch.no_grad():
        clean = model(TOKENS)
        observed = model.run_with_hooks(TOKENS, fwd_hooks=[(n, lambda x, hook: None) for n in names])
    assert torch.equal(clean, observed)
