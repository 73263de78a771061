"""`GDNActivationCache`: TransformerLens' `ActivationCache` on a hybrid of GDN and attention layers.

The helpers that only need the residual stream work as in TransformerLens: ``cache["resid_post", L]``
keys, ``accumulated_resid``, ``decompose_resid`` (every block's mixer, GDN or attention, writes
``hook_attn_out``), ``apply_ln_to_stack`` (the norms' ``hook_scale``), ``logit_attrs`` (with the
model's ``tokens_to_residual_directions``) and the MLP neuron results. Added: a GDN hook point of a
GDN layer by its short name, ``cache["state", L]`` for ``blocks.L.linear_attn.hook_state`` (likewise
``"write_value"``, ``"beta"``, ``"q"``, … in a GDN layer). ``logit_lens`` is TransformerLens 4's own, run on
the model's ``ln_final`` and ``unembed``. The per-head results (``stack_head_results``,
``compute_head_results``, ``get_full_resid_decomposition``) take every mixer's heads, a memory layer's value heads
beside an attention layer's query heads, and the neuron results a norm after the MLP (OLMo-Hybrid) at its cached
scale, so that each decomposition sums to the residual stream; a mixture-of-experts block's neurons are refused,
saying why. A default cache of an input longer than
``hooked_gdn.model.DEFAULT_CACHE_MAX_PATTERN_LENGTH`` has no ``hook_attn_scores`` / ``hook_pattern``;
asking for one raises a KeyError that says how to get it. TransformerLens 4's ``compute_ssm_state`` and
``compute_ssm_effective_attention`` return the cached state and the exact effective attention over the inputs;
``stack_neuron_results`` on a model without MLPs (Mamba-2) says so.
"""

from __future__ import annotations

import re

import torch
from einops import einsum
from torch import Tensor
from transformer_lens import ActivationCache
from transformer_lens.utilities import Slice, SliceInput

from .mlp import SparseMoE
from .sites import act_name, block_name, gdn_hook_name


def head_label(layer: int, head: int) -> str:
    """A head's label, as TransformerLens writes it: ``L{layer}H{head}`` (a memory layer's value head, an attention
    layer's query head)."""
    return f"L{layer}H{head}"


class GDNActivationCache(ActivationCache):
    def __getitem__(self, key):
        if isinstance(key, tuple) and len(key) > 1 and isinstance(key[1], int):
            layer = key[1] + self.model.cfg.n_layers if key[1] < 0 else key[1]
            key = self._head_result_name(layer) if key[0] == "result" else act_name(
                key[0], layer, key[2] if len(key) > 2 else None, gdn_layers=self.model.cfg.gdn_layers)
        if isinstance(key, str) and key in self.model.hook_dict and key.endswith(("hook_attn_scores", "hook_pattern")) \
                and key not in self.cache_dict:
            from .model import pattern_left_out_message

            raise KeyError(f"{key} is not in this cache. {pattern_left_out_message()}")
        if isinstance(key, str) and key not in self.cache_dict and (why := self._not_in_this_model(key)):
            raise KeyError(f"{key} is not a hook point of this model: {why}")
        return super().__getitem__(key)

    def _not_in_this_model(self, name: str) -> str | None:
        """Why a TransformerLens name that every block of a transformer has names nothing in this model's block (an
        attention point in a memory layer; an MLP's in a block without one), for the KeyError that TransformerLens'
        tools (``patching.get_act_patch_attn_head_out_all_pos``, …) would otherwise meet bare; None for any other."""
        match = re.fullmatch(r"blocks\.(\d+)\.(attn\.hook_\w+|mlp\.hook_\w+|hook_mlp_out|hook_resid_mid)", name)
        if match is None or name in self.model.hook_dict or int(match[1]) >= self.model.cfg.n_layers:
            return None
        layer, point = int(match[1]), match[2]
        family = self.model.family_of(self.model.cfg).name
        if point.startswith("attn."):
            if not self.model.blocks[layer].is_gdn:
                return None
            return (f"block {layer} of this {family} model is a memory layer, without attention (TransformerLens' per-head "
                    f"tools take every block for one). Each head's input to W_O, the counterpart of hook_z, is "
                    f"{gdn_hook_name(layer, 'hook_gated_out')}; hooked_gdn.patching patches it (\"gated_out\"), the memory's "
                    f"reads, writes and states by layer, position and head, and cache.stack_head_results takes every "
                    f"block's heads")
        if hasattr(self.model.blocks[layer], "mlp"):
            return None
        return (f"this {family} model's blocks have no MLP (and no middle of the block): each is its mixer alone, "
                f"whose output is blocks.{layer}.hook_attn_out")

    def apply_slice_to_batch_dim(self, batch_slice) -> GDNActivationCache:
        sliced = super().apply_slice_to_batch_dim(batch_slice)
        return GDNActivationCache(sliced.cache_dict, self.model, has_batch_dim=sliced.has_batch_dim)

    def logit_lens(self, **kwargs):
        """TransformerLens 4's logit lens over this cache: its ``transformer_lens.tools.analysis.logit_lens`` with
        this cache (keywords ``layers``, ``incl_mid``, ``positions``, ``targets``, ``top_k``, ``vocab``,
        ``return_type``, …), returning its ``LogitLensResult``. Each entry of the accumulated residual stream
        goes through ``model.ln_final`` (statistics recomputed per entry) and ``model.unembed``, so the last
        entry is the model's logits. TransformerLens 3 has no logit lens: there this says what computes the same."""
        try:
            from transformer_lens.tools.analysis.logit_lens import logit_lens
        except ImportError:
            from importlib.metadata import version

            raise NotImplementedError(
                f"cache.logit_lens is TransformerLens 4's (transformer_lens.tools.analysis.logit_lens), and "
                f"TransformerLens {version('transformer-lens')} is installed. The same numbers: "
                "model.unembed(model.ln_final(cache.accumulated_resid(pos_slice=-1))), one row of logits per layer"
            ) from None
        model = self.model
        without_mid = [i for i in range(model.cfg.n_layers) if f"blocks.{i}.hook_resid_mid" not in model.hook_dict]
        if kwargs.get("incl_mid") and without_mid:
            raise ValueError(f"incl_mid=True reads every block's hook_resid_mid, and blocks {without_mid} of this "
                             f"{model.family_of(model.cfg).name} model have none (one mixer and no MLP: no middle); "
                             "use incl_mid=False")
        return logit_lens(model, cache=self, **kwargs)

    # ------------------------------------------------------------------ per-head and per-neuron results

    def _head_result_name(self, layer: int) -> str:
        """Where `compute_head_results` keeps layer ``layer``'s head results: TransformerLens' ``attn.hook_result``
        in an attention layer, ``linear_attn.hook_result`` in a memory layer (a cache entry, not a hook point)."""
        return gdn_hook_name(layer, "hook_result") if self.model.blocks[layer].is_gdn else act_name("result", layer)

    def _layer_head_results(self, layer: int) -> Tensor:
        """Each head's share of block ``layer``'s mixer output [..., heads, d_model], summing to ``hook_attn_out``
        less the mixer's bias (`model.accumulated_bias`). A memory head adds ``hook_gated_out``[h] @ W_O[h] (its
        value heads: H_v of them, or Mamba-2's and RWKV-7's heads); an attention head (z ⊙ gate)[h] @ W_O[h]. Where a
        norm follows the mixer (OLMo-Hybrid's ``ln1_post``), each share goes through it at its cached scale
        (`_through_post_norm`). docs/design.md §7.4.1."""
        name = self._head_result_name(layer)
        if name in self.cache_dict:
            return self.cache_dict[name]
        mixer = self.model.mixer(layer)
        per_head, *gate = (self[name] for name in self._head_factors(layer))
        if gate:
            per_head = per_head * gate[0]
        results = einsum(per_head.to(mixer.W_O.dtype), mixer.W_O, "... h d, h d m -> ... h m")
        return self._through_post_norm(layer, "ln1_post", results)

    def _post_normed(self, layer: int) -> bool:
        """Whether a norm follows block ``layer``'s mixer and MLP (OLMo-Hybrid's attention blocks)."""
        return getattr(self.model.blocks[layer], "post_norm", False)

    def _through_post_norm(self, layer: int, norm: str, shares: Tensor, pos_slice: Slice | None = None,
                           weighted: bool = True) -> Tensor:
        """``shares`` [..., p, components, width] of what block ``layer``'s ``norm`` (``ln1_post`` or ``ln2_post``)
        normalises, each taken through it at the norm's cached scale: share / scale ⊙ weight (RMSNorm is linear once
        its scale is fixed), so that they sum to the norm's output, as `apply_ln_to_stack` treats a residual stack.
        Unchanged where the block has no such norm. The cached scale [..., p, 1] is sliced by ``pos_slice`` as the
        shares were; ``weighted=False`` leaves the weight out (a projection already holds it: `get_neuron_results`)."""
        if not self._post_normed(layer):
            return shares
        scale = self[self._post_norm_scale(layer, norm)]
        if pos_slice is not None:
            scale = pos_slice.apply(scale, dim=-2)
        normed = shares.float() / scale[..., None]
        if weighted:
            normed = normed * getattr(self.model.blocks[layer], norm).weight.float()
        return normed.to(shares.dtype)

    def compute_head_results(self, only_cached: bool = False) -> None:
        """TransformerLens' ``compute_head_results``: every layer's head results (`_layer_head_results`) kept in
        this cache, as ``cache["result", L]`` (``blocks.L.attn.hook_result``, or ``blocks.L.linear_attn.hook_result``
        in a memory layer). ``only_cached``: only the layers whose head inputs this cache holds (what
        ``run_with_cache`` does after ``model.set_use_attn_result(True)``)."""
        for layer in range(self.model.cfg.n_layers):
            inputs = self._head_factors(layer) + ([self._post_norm_scale(layer, "ln1_post")] if self._post_normed(layer) else [])
            if not only_cached or all(name in self.cache_dict for name in inputs):
                self.cache_dict[self._head_result_name(layer)] = self._layer_head_results(layer)

    def _head_factors(self, layer: int) -> list[str]:
        """The cached activations whose product is each head's input to W_O in block ``layer``
        (`_layer_head_results`): ``hook_gated_out`` in a memory layer, ``hook_z`` (and ``hook_gate``) in attention."""
        if self.model.blocks[layer].is_gdn:
            return [gdn_hook_name(layer, "hook_gated_out")]
        return [act_name("z", layer), *([block_name(layer, "attn.hook_gate")] if self.model.mixer(layer).gated else [])]

    @staticmethod
    def _post_norm_scale(layer: int, norm: str) -> str:
        """The cached scale of block ``layer``'s post-norm ``norm`` (``ln1_post``, ``ln2_post``)."""
        return block_name(layer, f"{norm}.hook_scale")

    def stack_head_results(self, layer: int | None = -1, return_labels: bool = False, incl_remainder: bool = False,
                           pos_slice: Slice | SliceInput = None, apply_ln: bool = False):
        """TransformerLens' ``stack_head_results`` on every family: the residual-stream share of each head of the
        blocks before ``layer`` (-1 or None: all), [components, ..., d_model], labelled ``L{layer}H{head}``. A memory
        layer's heads are its value heads, an attention layer's its query heads, so the count can differ by layer (in
        a hybrid ``cfg.n_heads`` counts the attention layers'): `_layer_head_results`. A block's heads and its mixer's
        bias (Mamba-2's ``b_o``) sum to its ``hook_attn_out``. ``incl_remainder`` and ``apply_ln`` as in
        TransformerLens."""
        pos_slice = pos_slice if isinstance(pos_slice, Slice) else Slice(pos_slice)
        layer = self.model.cfg.n_layers if layer is None or layer == -1 else layer
        components, labels = [], []
        for i in range(layer):
            results = pos_slice.apply(self._layer_head_results(i), dim=-3)
            components.append(results.movedim(-2, 0))
            labels += [head_label(i, h) for h in range(results.shape[-2])]
        if incl_remainder:
            whole = pos_slice.apply(self[("resid_post", layer - 1)] if layer else self["hook_embed"], dim=-2)
            components.append((whole - sum(c.sum(0) for c in components))[None])
            labels.append("remainder")
        if components:
            stack = torch.cat(components)
        else:
            empty_like = pos_slice.apply(self["hook_embed"], dim=-2)
            stack = empty_like.new_zeros(0, *empty_like.shape)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    def get_neuron_results(self, layer: int, neuron_slice: Slice | SliceInput = None, pos_slice: Slice | SliceInput = None,
                           project_output_onto: Tensor | None = None) -> Tensor:
        """TransformerLens' ``get_neuron_results``, each neuron's share taken through a norm that follows the MLP
        (OLMo-Hybrid's ``ln2_post``) at its cached scale (`_through_post_norm`), so that a block's neurons sum to its
        ``hook_mlp_out``; there the norm's weight is folded into ``project_output_onto``. A mixture-of-experts block
        is refused, saying why."""
        self._refuse_neurons(layer)
        if not self._post_normed(layer):
            return super().get_neuron_results(layer, neuron_slice, pos_slice, project_output_onto)
        pos_slice = pos_slice if isinstance(pos_slice, Slice) else Slice(pos_slice)
        if project_output_onto is None:
            return self._through_post_norm(layer, "ln2_post", super().get_neuron_results(layer, neuron_slice, pos_slice),
                                           pos_slice)
        weight = self.model.blocks[layer].ln2_post.weight.to(project_output_onto.dtype)
        folded = weight[:, None] * project_output_onto if project_output_onto.dim() == 2 else weight * project_output_onto
        shares = super().get_neuron_results(layer, neuron_slice, pos_slice, folded)
        if project_output_onto.dim() == 1:  # [..., neurons]: the projection took the last axis away
            return self._through_post_norm(layer, "ln2_post", shares[..., None], pos_slice, weighted=False)[..., 0]
        return self._through_post_norm(layer, "ln2_post", shares, pos_slice, weighted=False)

    def _refuse_neurons(self, layer: int) -> None:
        """Neuron results need block ``layer`` to have one dense MLP: a model without MLPs (Mamba-2) and a
        mixture-of-experts block are refused, saying why."""
        if getattr(self.model.cfg, "attn_only", False):
            raise NotImplementedError(f"this {self.model.family_of(self.model.cfg).name} model's blocks have no MLP, so no "
                                      "neurons: each block is its mixer alone (decompose_resid gives each block's output)")
        if isinstance(self.model.blocks[layer].mlp, SparseMoE):
            raise NotImplementedError(
                f"block {layer}'s MLP is a mixture of experts: its neurons are each expert's, weighted per token by the "
                "router, where neuron results are one dense MLP's. Take the block's MLP output whole (decompose_resid, or "
                "get_full_resid_decomposition(expand_neurons=False)); mlp.hook_experts_out + mlp.hook_shared_expert_gate "
                "* mlp.hook_shared_expert_out splits it into the routed experts' share and the shared expert's")

    def stack_neuron_results(self, layer: int, pos_slice: Slice | SliceInput = None, neuron_slice: Slice | SliceInput = None,
                             return_labels: bool = False, incl_remainder: bool = False, apply_ln: bool = False,
                             project_output_onto: Tensor | None = None, **kwargs):
        """TransformerLens' ``stack_neuron_results``, through `get_neuron_results`. A model without MLPs (Mamba-2)
        and one with mixture-of-experts blocks are refused, saying why. With ``apply_ln`` and ``project_output_onto``
        together, TransformerLens 4 forms the projected stack without `get_neuron_results`; where a norm follows an
        MLP, it is formed here as the stack with ``apply_ln``, then projected."""
        last = self.model.cfg.n_layers if layer is None or layer == -1 else layer
        for i in range(last):
            self._refuse_neurons(i)
        options = dict(pos_slice=pos_slice, neuron_slice=neuron_slice, return_labels=return_labels,
                       incl_remainder=incl_remainder, apply_ln=apply_ln, **kwargs)  # kwargs: TransformerLens 4's mlp_input
        if apply_ln and project_output_onto is not None and any(self._post_normed(i) for i in range(last)):
            stacked = super().stack_neuron_results(layer, **options)
            stack, labels = stacked if return_labels else (stacked, None)
            stack = stack @ project_output_onto.to(stack.dtype)
            return stack if labels is None else (stack, labels)
        return super().stack_neuron_results(layer, project_output_onto=project_output_onto, **options)

    def _memory_layers(self, layer: int | None) -> list[int]:
        gdn_layers = list(self.model.cfg.gdn_layers)
        if layer is None:
            return gdn_layers
        if layer not in gdn_layers:
            raise TypeError(f"layer {layer} has no matrix memory; this model's memory layers are {gdn_layers}")
        return [layer]

    def _per_memory_layer(self, layer: int | None, compute):
        """TransformerLens' convention: one layer's tensor; for every layer, a stack (dim 0 = layer) where every
        block is a memory layer, else a dict by layer."""
        layers = self._memory_layers(layer)
        found = {i: compute(i) for i in layers}
        if layer is not None:
            return found[layer]
        return torch.stack(list(found.values())) if len(layers) == self.model.cfg.n_layers else found

    def compute_ssm_state(self, layer: int | None = None, time_step: int | None = None):
        """The memory state S_t [b, p, H_v, d_k, d_v] (key-major, as every state here: the transpose of TransformerLens'
        Mamba-2 ``hook_ssm_state``), at every cached position or at ``time_step``: the cached
        ``blocks.L.linear_attn.hook_state``, which the model formed exactly in its forward (not rebuilt from other
        hooks). Per TransformerLens' ``compute_ssm_state``: one layer's, or every memory layer's (stacked, or a dict
        in a hybrid)."""
        def state(i: int):
            name = gdn_hook_name(i, "hook_state")
            if name not in self.cache_dict:
                raise KeyError(f"{name} is not in this cache: states are cached only when asked for (they are large). "
                               f"Run model.run_with_cache(tokens, names_filter=[{name!r}]) (state_positions=… to keep some)")
            states = self.cache_dict[name]
            return states if time_step is None else states[:, time_step]

        return self._per_memory_layer(layer, state)

    def compute_ssm_effective_attention(self, layer: int | None = None, include_dt_scaling: bool = False,
                                        per_state_coord: bool = False):
        """The exact effective attention over the inputs, c[t, j] [b, H_v, query, key], of one memory layer or of each
        (`hooked_gdn.effective_attention`, whose ``EffectiveAttention`` also has the values and the erase terms).
        TransformerLens' Mamba-1 options have no meaning here and are refused."""
        from .effective_attention import effective_attention

        for option, value in (("include_dt_scaling", include_dt_scaling), ("per_state_coord", per_state_coord)):
            if value:
                raise ValueError(f"{option} is an option of TransformerLens' Mamba mixers; here c[t, j] multiplies "
                                 "the inputs β_j v_j (Δ_j x_j on Mamba-2) exactly, so there is nothing to rescale")
        return self._per_memory_layer(layer, lambda i: effective_attention(self, i, over="inputs").pattern)
