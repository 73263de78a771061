"""`HookedMamba2`: Mamba-2 (transformers' ``Mamba2ForCausalLM``) with its SSD state and write as hook points.

Per layer and head, Mamba-2's SSD mixer keeps a state h_t ∈ R^{d_state × head_dim} and runs

    h_t = exp(Δ_t A) h_{t−1} + B_t (Δ_t x_t)ᵀ,    y_t = h_tᵀ C_t + D x_t,

then a gated RMSNorm (y ⊙ SiLU(z), normalised per group of heads) and the output projection. That is
the gated delta rule of docs/design.md §2 without its erase term (§4), with the write strength Δ_t in place of β:
a `hooked_gdn.memory.MatrixMemory` with the ``SCALAR_DECAY`` transition, whose state and write hook points
and carried edits, parallel and sequential, are the same component's as GDN's. Its hook points keep the
GDN names wherever the quantity is the same, with d_k = d_state and d_v = head_dim:

=====================  =====================================  ==========================
GDN                    Mamba-2                                hook (under linear_attn.)
=====================  =====================================  ==========================
q̂_t (read query)       C_t, its group's, per head             hook_read_query [b,p,H,N]
k̂_t (write key)        B_t, its group's, per head             hook_write_key [b,p,H,N]
v_t                    x_t (after conv and SiLU)              hook_v [b,p,H,P]
β_t, its logit b_t     Δ_t = softplus(dt_t + dt_bias), dt_t   hook_beta, hook_beta_logit [b,p,H]
g_t (log decay)        Δ_t A (A = −exp(A_log))                hook_log_decay [b,p,H]
δ_t (write value)      Δ_t x_t                                hook_write_value [b,p,H,P]
S_t                    h_t                                    hook_state [b,P,H,N,P]
o_t = S_tᵀ q̂_t          h_tᵀ C_t (before the D x_t skip)       hook_recurrence_out [b,p,H,P]
=====================  =====================================  ==========================

Also ``hook_q/k_pre_conv`` and ``hook_q/k`` (C and B per group, [b,p,G,N]), ``hook_v_pre_conv``,
``hook_gate_input`` (z), ``hook_gated_out`` (each head's slice of the gated norm's output) and
``hook_final_state``. The model keeps TransformerLens' block names (``ln1``, ``hook_attn_out`` for the
mixer's output, ``ln_final``) and the mixer sits at ``blocks.L.linear_attn``, so `hooked_gdn.sites`,
the census and `writesae` address it as they address a GDN layer. TransformerLens' Mamba-2 bridge's names
(``blocks.L.mixer.hook_ssm_state``, ``…in_proj.hook_out``, …) work too, as aliases: `HookedMamba2`. The model is `HookedGatedDeltaNet`
(tokens, caching activations, loss, prefill and generation), which builds its blocks through the
family's entry in `hooked_gdn.architectures`; `HookedMamba2` is that class restricted to Mamba-2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from einops import rearrange
from jaxtyping import Float
from torch import Tensor, nn

from .config import AttentionFreeHeads, HookedModelConfig
from .delta_rule import SCALAR_DECAY
from .hook_points import CheckedHookPoint, fire_in_layout
from .layers import ForwardContext, RMSNorm, _matrix, causal_conv, split_heads
from .memory import MatrixMemory
from .model import HookedGatedDeltaNet
from .sites import tell_positions


@dataclass(kw_only=True)
class HookedMamba2Config(HookedModelConfig, AttentionFreeHeads):
    """A Mamba-2 language model: `HookedModelConfig`'s sizes, in the names GDN gives the same quantities.

    Each layer has ``n_value_heads`` (H) SSD heads of size ``d_value`` (head_dim, P) with states of
    ``d_key`` (d_state, N) rows; B and C come in ``n_key_heads`` (n_groups, G) groups, each shared by
    H / G consecutive heads, as GDN's key heads are. Every layer is a memory layer; there is no
    attention, MLP or rotary embedding (TransformerLens' ``n_heads``, ``d_head``: H and P).
    """

    architecture: str = "mamba2"
    use_bias: bool = False  # biases of the input and output projections
    use_conv_bias: bool = True
    residual_in_fp32: bool = True
    attn_only: bool = True  # for TransformerLens: no MLPs, every block is its mixer

    @property
    def layer_types(self) -> list[str]:
        return ["linear_attention"] * self.n_layers

    @property
    def d_inner(self) -> int:
        return self.n_value_heads * self.d_value


class GroupedGatedRMSNorm(nn.Module):
    """Mamba-2's output norm: w ⊙ RMSNorm(y ⊙ SiLU(z)), the RMS over each group of H / G heads, in fp32
    (transformers' ``MambaRMSNormGated``, gate before norm)."""

    def __init__(self, cfg: HookedMamba2Config):
        super().__init__()
        self.w = nn.Parameter(torch.ones(cfg.d_inner))
        self.eps, self.groups = cfg.eps, cfg.n_key_heads

    def forward(self, y: Float[Tensor, "... H P"], z: Float[Tensor, "... H P"]) -> Float[Tensor, "... H P"]:
        gated = rearrange(y.float() * F.silu(z.float()), "... (g h) d -> ... g (h d)", g=self.groups)
        normed = gated * torch.rsqrt(gated.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.w.view(y.shape[-2], y.shape[-1]) * rearrange(normed, "... g (h d) -> ... (g h) d", g=self.groups, d=y.shape[-1])


def _folder(**hook_points: CheckedHookPoint) -> nn.Module:
    """A module holding hook points (no weights), so that they are named under it in ``hook_dict``."""
    folder = nn.Module()
    for name, hook_point in hook_points.items():
        setattr(folder, name, hook_point)
    return folder


# the layouts of TransformerLens' bridge where they differ from ours (module-level, so that a model pickles)
def _heads_flat(x: Float[Tensor, "... H P"]) -> Float[Tensor, "... HP"]:
    return x.flatten(-2)


def _heads_split(x: Float[Tensor, "... HP"], d: int) -> Float[Tensor, "... H P"]:
    return x.unflatten(-1, (-1, d))


def _swap_last_two(x: Tensor) -> Tensor:  # a state [..., N, P] <-> [..., P, N]; channels-last <-> channels-first
    return x.transpose(-1, -2)


def _channels_first(x: Float[Tensor, "b p c"]) -> Float[Tensor, "b c p"]:
    return x.transpose(1, 2)


class Mamba2Mixer(MatrixMemory):
    """Mamba-2's SSD mixer: a `MatrixMemory` with the scalar-decay transition (no erase), whose state and
    write hook points and carried edits are the memory's. This class holds its own weights, as
    transformers stores them: ``W_in`` (in_proj: z, x, B, C, dt rows), ``conv_weight``/``conv_bias``,
    ``dt_bias``, ``A_log``, ``D``, ``norm.w``, ``W_o`` (out_proj)."""

    def __init__(self, cfg: HookedMamba2Config, layer: int):
        super().__init__(layer, SCALAR_DECAY)
        self.cfg = cfg
        H, N = cfg.n_value_heads, cfg.d_key
        self.group_dim = cfg.n_key_heads * N
        self.conv_dim = cfg.d_inner + 2 * self.group_dim  # x, B, C
        self.W_in = _matrix(cfg.d_inner + self.conv_dim + H, cfg.d_model)
        self.b_in = nn.Parameter(torch.zeros(self.W_in.shape[0])) if cfg.use_bias else None
        self.conv_weight = nn.Parameter(torch.empty(self.conv_dim, 1, cfg.conv_kernel))
        self.conv_bias = nn.Parameter(torch.zeros(self.conv_dim)) if cfg.use_conv_bias else None
        self.dt_bias = nn.Parameter(torch.empty(H))
        self.A_log = nn.Parameter(torch.empty(H))
        self.D = nn.Parameter(torch.ones(H))
        self.norm = GroupedGatedRMSNorm(cfg)
        self.W_o = _matrix(cfg.d_model, cfg.d_inner)
        self.b_o = nn.Parameter(torch.zeros(cfg.d_model)) if cfg.use_bias else None
        # b batch, p positions, H heads, G groups, N d_state, P head_dim; the recurrence's hook points are fp32
        self.hook_in = CheckedHookPoint()  # [b, p, d_model], after ln1
        self.hook_gate_input = CheckedHookPoint()  # [b, p, H, P]: z
        self.hook_v_pre_conv = CheckedHookPoint()  # [b, p, H, P]: x before the conv
        self.hook_k_pre_conv = CheckedHookPoint()  # [b, p, G, N]: B before the conv
        self.hook_q_pre_conv = CheckedHookPoint()  # [b, p, G, N]: C before the conv
        self.hook_v = CheckedHookPoint()  # [b, p, H, P]: x, after conv and SiLU
        self.hook_k = CheckedHookPoint()  # [b, p, G, N]: B
        self.hook_q = CheckedHookPoint()  # [b, p, G, N]: C
        self.hook_beta_logit = CheckedHookPoint()  # [b, p, H]: dt, before dt_bias and softplus
        self.hook_beta = CheckedHookPoint()  # [b, p, H]: Δ, the write strength
        self.hook_log_decay = CheckedHookPoint()  # [b, p, H]: g = Δ A
        # the memory's own (`MatrixMemory`): hook_read_query (C per head), hook_write_key (B per head),
        # hook_write_value (Δ x), hook_state (h_t), hook_final_state, hook_recurrence_out (h_tᵀ C_t)
        self.hook_gated_out = CheckedHookPoint()  # [b, p, H, P]: the gated norm's output, each head's input to W_o
        self.hook_out = CheckedHookPoint()  # [b, p, d_model]
        # TransformerLens' names for this mixer (registered by the block at blocks.L.mixer, not here, so that each
        # hook point has one name)
        object.__setattr__(self, "transformer_lens_names", self._transformer_lens_names())

    def _transformer_lens_names(self) -> nn.Module:
        """The hook points of TransformerLens' Mamba-2 bridge under ``blocks.L.mixer`` (the table in
        `HookedMamba2`'s docstring): aliases of ours, and five points of their own where the bridge's tensor
        is none of ours: the whole in_proj output, the conv's input and output (before its SiLU), the gated norm's
        input and the write."""
        P = self.cfg.d_value
        flat = dict(to_alias=_heads_flat, from_alias=partial(_heads_split, d=P))
        in_proj_out = CheckedHookPoint()  # [b, p, 2 H P + 2 G N + H]: z, x, B, C, dt, as transformers' in_proj
        conv_out = CheckedHookPoint(position_axis=None)  # [b, conv_dim, p + K − 1]: the conv before its SiLU (`causal_conv`)
        gated_out = self.hook_gated_out
        return _folder(
            hook_in=self.hook_in.alias(),
            in_proj=_folder(hook_in=self.hook_in.alias(), hook_out=in_proj_out),
            hook_in_proj=in_proj_out.alias(),
            conv1d=_folder(hook_in=CheckedHookPoint(position_axis=2),  # [b, conv_dim, p]: x, B, C channels-first
                           hook_out=conv_out),
            hook_conv=conv_out.alias(position_axis=None),
            hook_ssm_write=CheckedHookPoint(),  # [b, p, H, P, N]: Δ_t x_t B_tᵀ, for reading
            hook_ssm_state=self.hook_state.alias(_swap_last_two, _swap_last_two),  # [b, p, H, P, N]
            inner_norm=_folder(hook_in=CheckedHookPoint(),  # [b, p, H P]: y = h_tᵀ C_t + D x_t
                               hook_gate=self.hook_gate_input.alias(**flat), hook_out=gated_out.alias(**flat)),
            hook_inner_norm=gated_out.alias(**flat),
            out_proj=_folder(hook_in=gated_out.alias(**flat), hook_out=self.hook_out.alias()),
            hook_out=self.hook_out.alias(),
            hook_ssm_out=self.hook_out.alias(),
        )

    def forward(self, x: Float[Tensor, "b p d_model"], ctx: ForwardContext) -> Float[Tensor, "b p d_model"]:
        cfg = self.cfg
        mask = None if ctx.current_mask is None else ctx.current_mask[..., None].to(x.dtype)
        if mask is not None:  # as transformers: padding's input and conv output are zero, so B = 0 there: no write
            x = x * mask
        x = self.hook_in(x)
        tl = self.transformer_lens_names
        z, xBC, dt = tl.in_proj.hook_out(F.linear(x, self.W_in, self.b_in)).split([cfg.d_inner, self.conv_dim, cfg.n_value_heads], -1)
        z = self.hook_gate_input(split_heads(z, cfg.d_value))
        xs, B, C = xBC.split([cfg.d_inner, self.group_dim, self.group_dim], -1)
        xs = self.hook_v_pre_conv(split_heads(xs, cfg.d_value))
        B = self.hook_k_pre_conv(split_heads(B, cfg.d_key))
        C = self.hook_q_pre_conv(split_heads(C, cfg.d_key))
        conv_in = fire_in_layout(tl.conv1d.hook_in, torch.cat([xs.flatten(2), B.flatten(2), C.flatten(2)], -1),
                                 _channels_first, _channels_first)
        mixed = causal_conv(conv_in, self.conv_weight, self.conv_bias, ctx, self.layer, tl.conv1d.hook_out)
        if mask is not None:
            mixed = mixed * mask
        xs, B, C = mixed.split([cfg.d_inner, self.group_dim, self.group_dim], -1)
        xs = self.hook_v(split_heads(xs, cfg.d_value))
        B = self.hook_k(split_heads(B, cfg.d_key))
        C = self.hook_q(split_heads(C, cfg.d_key))
        dt = self.hook_beta_logit(dt)
        strength = self.hook_beta(F.softplus(dt.float() + self.dt_bias.float()))  # Δ
        g = self.hook_log_decay(-self.A_log.float().exp() * strength)

        group = cfg.n_value_heads // cfg.n_key_heads
        B = B.float().repeat_interleave(group, 2)
        if tl.hook_ssm_write.is_hooked():
            self._fire_write_for_reading(B, xs.float(), strength, ctx)
        o = self.recur(C.float().repeat_interleave(group, 2), B, xs.float(), g, strength, ctx)
        return self.hook_out(self.output_from_read(o, {"gate_input": z, "v": xs}))

    def _fire_write_for_reading(self, B: Float[Tensor, "b p H N"], xs: Float[Tensor, "b p H P"], strength: Float[Tensor, "b p H"],
                                ctx: ForwardContext) -> None:
        """Fire ``blocks.L.mixer.hook_ssm_write`` with the bridge's write Δ_t x_t B_tᵀ [b, p, H, P, N] (before our
        write hooks' edits), refusing an edit: an edit of a whole write matrix is not one of the recurrence's
        carried edits (a rank-1 write, hook_write_key/hook_write_value, or a state, hook_state)."""
        hook_point = self.transformer_lens_names.hook_ssm_write
        tell_positions(ctx.past_length + torch.arange(B.shape[1]), hook_point)
        written = lambda: torch.einsum("bth,bthp,bthn->bthpn", strength, xs, B)
        _, edited, _ = hook_point.fire_and_diff(written(), 2, written)
        if edited is not None:
            raise ValueError(f"{hook_point.name} is for reading only: to edit the write and carry it through the recurrence, "
                             f"edit linear_attn.hook_write_key / hook_write_value (B_t and Δ_t x_t) or the state after it, "
                             f"{hook_point.name.replace('hook_ssm_write', 'hook_ssm_state')} (our edits of states are carried "
                             f"to later positions)")

    OUTPUT_INPUTS = ("gate_input", "v")  # z, and x for the D skip

    def output_from_read(self, o: Float[Tensor, "... H P"], inputs: dict[str, Tensor]) -> Float[Tensor, "... d_model"]:
        """After the recurrence: the D skip, the group-wise gated norm (gate before norm) and W_o (as
        `hooked_gdn.layers.GatedDeltaNet.output_from_read`: its JVP in o is the read's direct effect)."""
        y = fire_in_layout(self.transformer_lens_names.inner_norm.hook_in, o + self.D.float()[:, None] * inputs["v"].float(),
                           _heads_flat, partial(_heads_split, d=o.shape[-1]))
        y = self.hook_gated_out(self.norm(y, inputs["gate_input"]))
        return F.linear(y.flatten(-2).to(self.W_o.dtype), self.W_o, self.b_o)


class Mamba2Block(nn.Module):
    """x + mixer(ln1(x)), the residual kept in fp32 with ``residual_in_fp32`` (as transformers)."""

    is_gdn = True  # a matrix-memory layer at linear_attn, addressed as a GDN layer is

    def __init__(self, cfg: HookedMamba2Config, layer: int):
        super().__init__()
        self.residual_in_fp32 = cfg.residual_in_fp32
        self.ln1 = RMSNorm(cfg.d_model, cfg.eps, zero_centred=False)
        self.linear_attn = Mamba2Mixer(cfg, layer)
        self.hook_resid_pre = CheckedHookPoint()  # [b, p, d_model]
        self.hook_attn_out = CheckedHookPoint()  # [b, p, d_model]: the mixer's output
        self.hook_resid_post = CheckedHookPoint()  # [b, p, d_model]
        # TransformerLens' bridge's names (`HookedMamba2`'s docstring): aliases, and the norm's input of its own
        self.hook_in = self.hook_resid_pre.alias()
        self.hook_out = self.hook_resid_post.alias()
        self.hook_mixer_in = self.linear_attn.hook_in.alias()
        self.hook_mixer_out = self.linear_attn.hook_out.alias()
        self.norm = _folder(hook_in=CheckedHookPoint(), hook_out=self.linear_attn.hook_in.alias(), hook_scale=self.ln1.hook_scale.alias(),
                            hook_normalized=self.ln1.hook_normalized.alias())
        self.mixer = self.linear_attn.transformer_lens_names

    def forward(self, x: Float[Tensor, "b p d_model"], ctx: ForwardContext, cos=None, sin=None) -> Float[Tensor, "b p d_model"]:
        resid_pre = self.hook_resid_pre(x)
        mixed = self.hook_attn_out(self.linear_attn(self.ln1(self.norm.hook_in(resid_pre.to(self.ln1.w.dtype))), ctx))
        residual = resid_pre.float() if self.residual_in_fp32 else resid_pre
        return self.hook_resid_post(residual + mixed)


class FinalNorm(RMSNorm):
    """The final RMSNorm, its output in the weights' dtype (transformers casts it for lm_head), with TransformerLens'
    bridge's ``ln_final.hook_in`` and ``ln_final.hook_out``."""

    def __init__(self, d: int, eps: float, zero_centred: bool = False):
        super().__init__(d, eps, zero_centred)
        self.hook_in = CheckedHookPoint()  # [b, p, d_model]: the residual stream after the last block
        self.hook_out = CheckedHookPoint()  # [b, p, d_model]: what the unembedding multiplies

    def forward(self, x: Float[Tensor, "... d"]) -> Float[Tensor, "... d"]:
        return self.hook_out(super().forward(self.hook_in(x)).to(self.w.dtype))


def init_mamba2_weights(model: nn.Module, std: float = 0.02, dt_range: tuple[float, float] = (1e-3, 1e-1)) -> None:
    """transformers' Mamba-2 initialisation: A = 1 … H, D = 1, dt log-uniform in ``dt_range``
    (dt_bias = softplus⁻¹(dt)), norms at identity, zero biases, normal(0, std) matrices."""
    for name, p in model.named_parameters():
        if name.endswith("A_log"):
            p.copy_(torch.arange(1, p.numel() + 1, dtype=p.dtype).log())
        elif name.endswith("dt_bias"):
            lo, hi = math.log(dt_range[0]), math.log(dt_range[1])
            dt = torch.empty_like(p).uniform_(lo, hi).exp()
            p.copy_(dt + torch.log(-torch.expm1(-dt)))
        elif name.endswith((".D", ".w")):
            p.fill_(1.0)
        elif name.endswith(("b_in", "b_o", "conv_bias")):
            p.zero_()
        elif name.endswith("conv_weight"):
            nn.init.uniform_(p, -p.shape[-1] ** -0.5, p.shape[-1] ** -0.5)
        else:
            nn.init.normal_(p, std=std)


class HookedMamba2(HookedGatedDeltaNet):
    """`HookedGatedDeltaNet` restricted to Mamba-2 checkpoints and configs, the name Mamba-2 users call; see
    the module docstring for the hook table. ``HookedGatedDeltaNet.from_pretrained("mamba2-austen")``
    builds the same model (with the bridge's names below except ``embed.hook_out``). Write and state edits
    carry through the recurrence exactly as for GDN (docs/design.md §8).

    TransformerLens' Mamba-2 bridge (``TransformerBridge`` on transformers' ``Mamba2ForCausalLM``) names its
    hook points otherwise; they are hook points here too, so that caching, indexing the cache, hooking,
    ``names_filter`` and ``hook_dict`` work with either name. Each is an alias of ours (a hook point that fires
    inside ours with its value, in the bridge's layout where that differs, and whose edits are edits of ours),
    or, where the bridge's tensor is none of ours, a point of its own at the same place in the computation.
    Under ``blocks.L.`` (b batch, p positions, H heads, P head_dim, N d_state, G groups, C = H P + 2 G N):

    ===============================================  ==========================================  ==================
    bridge name                                      ours                                        layout
    ===============================================  ==========================================  ==================
    hook_in, hook_resid_pre / hook_out, hook_resid_post  hook_resid_pre / hook_resid_post         same
    norm.hook_in                                     ln1's input (= hook_resid_pre; own point)   same
    norm.hook_scale                                  ln1.hook_scale                              same
    norm.hook_normalized                             ln1.hook_normalized                         same
    norm.hook_out, hook_mixer_in, mixer.hook_in,     linear_attn.hook_in                         same
    mixer.in_proj.hook_in
    mixer.in_proj.hook_out, mixer.hook_in_proj       z, x, B, C, dt before the split (own point)  [b, p, 2HP+2GN+H]
    mixer.conv1d.hook_in                             x, B, C before the conv (own point)          [b, C, p]
    mixer.conv1d.hook_out, mixer.hook_conv           the conv before its SiLU (own point)         [b, C, p + K − 1]
    mixer.hook_ssm_write                             Δ_t x_t B_tᵀ (own point; reading only)       [b, p, H, P, N]
    mixer.hook_ssm_state                             linear_attn.hook_state, transposed          [b, p, H, P, N]
    mixer.inner_norm.hook_in                         h_tᵀ C_t + D x_t (own point)                [b, p, H P]
    mixer.inner_norm.hook_gate                       linear_attn.hook_gate_input, flattened      [b, p, H P]
    mixer.inner_norm.hook_out, mixer.hook_inner_norm,  linear_attn.hook_gated_out, flattened     [b, p, H P]
    mixer.out_proj.hook_in
    mixer.out_proj.hook_out, mixer.hook_out,         linear_attn.hook_out (= hook_attn_out)      same
    mixer.hook_ssm_out, hook_mixer_out
    ===============================================  ==========================================  ==================

    and ``hook_embed``/``embed.hook_out`` (hook_embed), ``ln_final.hook_in``, ``ln_final.hook_scale`` and
    ``ln_final.hook_out`` (the last block's output, the final norm's scale and output). Where they differ:

    - ``hook_ssm_state`` is [d_v, d_k] = [P, N] per head, as the bridge's, the transpose of our [d_k, d_v]; a
      transposed view, so in-place edits reach our state. It fires where ours does (every position, or
      ``state_positions``), and as ours it is left out of a cache unless named. Its edits are carried through
      the recurrence to later positions, as ours are; the bridge's change only that position's read, and it
      carries edits of ``hook_ssm_write`` instead. Editing ``hook_ssm_write`` here raises an error that says so:
      a whole write matrix is not one of the recurrence's carried edits (add the change to the state at that
      position through ``hook_ssm_state``, or edit B_t and Δ_t x_t at hook_write_key / hook_write_value).
    - The mixer's input (``hook_mixer_in``, ``mixer.hook_in``, ``norm.hook_out``) is taken after padding is
      zeroed, as the bridge's ``in_proj.hook_in`` is; the bridge's first three are before. Without padding
      they are equal.
    - The recurrence's points are fp32 (``inner_norm.*``, ``out_proj.hook_in``), as ours; the bridge's are in
      the model's dtype.
    - ``conv1d.hook_out`` (``hook_conv``) is the depthwise conv before its SiLU, channels-first, as torch's
      ``nn.Conv1d(padding=K−1)`` gives it to the bridge: the p positions of the input, then K−1 past its end (the
      last inputs against zeros), which transformers and the bridge drop. hook_v, hook_k and hook_q hold SiLU of
      its first p positions (zeroed at padding). Edits of those p are carried into the SiLU and on; edits of the
      trailing K−1 change nothing, as in the bridge. The K−1 are computed only while the point is hooked. It
      fires at every forward, generation's decode steps included (the conv continuing the cached inputs); the
      bridge's fires on prefill only.
    - Not provided: ``embed.hook_in`` (token ids; hook_embed holds their embeddings), ``unembed.hook_in``
      (``unembed`` is TransformerLens' method here; ln_final.hook_out holds it), ``unembed.hook_out`` and
      ``hook_unembed`` (the logits are what forward returns).
    """

    FAMILIES = ("mamba2",)

    def __init__(self, cfg: HookedMamba2Config, tokenizer=None):
        super().__init__(cfg, tokenizer)
        self.embed = _folder(hook_out=self.hook_embed.alias())  # the bridge's embed.hook_out
        self.setup()
