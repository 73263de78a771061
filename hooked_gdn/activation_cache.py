"""`GDNActivationCache`: TransformerLens' `ActivationCache` on a hybrid of GDN and attention layers.

The helpers that only need the residual stream work as in TransformerLens: ``cache["resid_post", L]``
keys, ``accumulated_resid``, ``decompose_resid`` (every block's mixer, GDN or attention, writes
``hook_attn_out``), ``apply_ln_to_stack`` (the norms' ``hook_scale``), ``logit_attrs`` (with the
model's ``tokens_to_residual_directions``) and the MLP neuron results. Added: a GDN hook point of a
GDN layer by its short name, ``cache["state", L]`` for ``blocks.L.linear_attn.hook_state`` (likewise
``"write_value"``, ``"beta"``, ``"q"``, … in a GDN layer). ``logit_lens`` is TransformerLens 4's own, run on
the model's ``ln_final`` and ``unembed``. The per-head results raise an error that
says why they do not apply. A default cache of an input longer than
``hooked_gdn.model.DEFAULT_CACHE_MAX_PATTERN_LENGTH`` has no ``hook_attn_scores`` / ``hook_pattern``;
asking for one raises a KeyError that says how to get it. TransformerLens 4's ``compute_ssm_state`` and
``compute_ssm_effective_attention`` return the cached state and the exact effective attention over the inputs;
``stack_neuron_results`` on a model without MLPs (Mamba-2) says so.
"""

from __future__ import annotations

import torch
from transformer_lens import ActivationCache

from .sites import act_name, gdn_hook_name


class GDNActivationCache(ActivationCache):
    def __getitem__(self, key):
        if isinstance(key, tuple) and len(key) > 1 and isinstance(key[1], int):
            layer = key[1] + self.model.cfg.n_layers if key[1] < 0 else key[1]
            key = act_name(key[0], layer, key[2] if len(key) > 2 else None, gdn_layers=self.model.cfg.gdn_layers)
        if isinstance(key, str) and key in self.model.hook_dict and key.endswith(("hook_attn_scores", "hook_pattern")) \
                and key not in self.cache_dict:
            from .model import pattern_left_out_message

            raise KeyError(f"{key} is not in this cache. {pattern_left_out_message()}")
        return super().__getitem__(key)

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

    def _no_head_results(self, *args, **kwargs):
        cfg = self.model.cfg
        family = self.model.family_of(cfg).name
        layers = (f"layers {cfg.gdn_layers} of this {family} hybrid are Gated DeltaNet layers" if cfg.attention_layers
                  else f"this {family} model has no attention layers: its {cfg.n_layers} layers are memory layers")
        raise NotImplementedError(
            f"per-head results are a layer × head grid of attention heads, each adding hook_z[h] @ W_O[h] to the "
            f"residual stream; {layers}, with {cfg.n_value_heads} value heads mixed by linear_attn.W_o. "
            "Decompose by layer with decompose_resid, or take a memory head's contribution from "
            "linear_attn.hook_gated_out and W_o"
        )

    compute_head_results = stack_head_results = get_full_resid_decomposition = _no_head_results

    def stack_neuron_results(self, *args, **kwargs):
        if getattr(self.model.cfg, "attn_only", False):
            raise NotImplementedError(f"this {self.model.family_of(self.model.cfg).name} model's blocks have no MLP, so no "
                                      "neurons: each block is its mixer alone (decompose_resid gives each block's output)")
        return super().stack_neuron_results(*args, **kwargs)

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
