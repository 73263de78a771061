"""`GDNActivationCache`: TransformerLens' `ActivationCache` on a hybrid of GDN and attention layers.

The helpers that only need the residual stream work as in TransformerLens: ``cache["resid_post", L]``
keys, ``accumulated_resid``, ``decompose_resid`` (every block's mixer, GDN or attention, writes
``hook_attn_out``), ``apply_ln_to_stack`` (the norms' ``hook_scale``), ``logit_attrs`` (with the
model's ``tokens_to_residual_directions``) and the MLP neuron results. Added: a GDN hook point of a
GDN layer by its short name, ``cache["state", L]`` for ``blocks.L.linear_attn.hook_state`` (likewise
``"write_value"``, ``"beta"``, ``"q"``, … in a GDN layer). The per-head results raise an error that
says why they do not apply. A default cache of an input longer than
``hooked_gdn.model.DEFAULT_CACHE_MAX_PATTERN_LENGTH`` has no ``hook_attn_scores`` / ``hook_pattern``;
asking for one raises a KeyError that says how to get it.
"""

from __future__ import annotations

from transformer_lens import ActivationCache

from .sites import act_name


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
