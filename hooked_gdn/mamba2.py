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
the census and `writesae` address it as they address a GDN layer. The model is `HookedGatedDeltaNet`
(tokens, caching activations, loss, prefill and generation), which builds its blocks through the
family's entry in `hooked_gdn.architectures`; `HookedMamba2` is that class restricted to Mamba-2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from jaxtyping import Float
from torch import Tensor, nn

from .config import AttentionFreeHeads, HookedModelConfig
from .delta_rule import SCALAR_DECAY
from .hook_points import CheckedHookPoint
from .layers import ForwardContext, RMSNorm, _matrix, causal_conv, split_heads
from .memory import MatrixMemory
from .model import HookedGatedDeltaNet


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

    def forward(self, x: Float[Tensor, "b p d_model"], ctx: ForwardContext) -> Float[Tensor, "b p d_model"]:
        cfg = self.cfg
        mask = None if ctx.current_mask is None else ctx.current_mask[..., None].to(x.dtype)
        if mask is not None:  # as transformers: padding's input and conv output are zero, so B = 0 there: no write
            x = x * mask
        x = self.hook_in(x)
        z, xBC, dt = F.linear(x, self.W_in, self.b_in).split([cfg.d_inner, self.conv_dim, cfg.n_value_heads], -1)
        z = self.hook_gate_input(split_heads(z, cfg.d_value))
        xs, B, C = xBC.split([cfg.d_inner, self.group_dim, self.group_dim], -1)
        xs = self.hook_v_pre_conv(split_heads(xs, cfg.d_value))
        B = self.hook_k_pre_conv(split_heads(B, cfg.d_key))
        C = self.hook_q_pre_conv(split_heads(C, cfg.d_key))
        mixed = causal_conv(torch.cat([xs.flatten(2), B.flatten(2), C.flatten(2)], -1), self.conv_weight, self.conv_bias, ctx,
                            self.layer)
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
        o = self.recur(C.float().repeat_interleave(group, 2), B.float().repeat_interleave(group, 2), xs.float(), g, strength, ctx)
        return self.hook_out(self.output_from_read(o, {"gate_input": z, "v": xs}))

    OUTPUT_INPUTS = ("gate_input", "v")  # z, and x for the D skip

    def output_from_read(self, o: Float[Tensor, "... H P"], inputs: dict[str, Tensor]) -> Float[Tensor, "... d_model"]:
        """After the recurrence: the D skip, the group-wise gated norm (gate before norm) and W_o (as
        `hooked_gdn.layers.GatedDeltaNet.output_from_read`: its JVP in o is the read's direct effect)."""
        y = self.hook_gated_out(self.norm(o + self.D.float()[:, None] * inputs["v"].float(), inputs["gate_input"]))
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

    def forward(self, x: Float[Tensor, "b p d_model"], ctx: ForwardContext, cos=None, sin=None) -> Float[Tensor, "b p d_model"]:
        resid_pre = self.hook_resid_pre(x)
        mixed = self.hook_attn_out(self.linear_attn(self.ln1(resid_pre.to(self.ln1.w.dtype)), ctx))
        residual = resid_pre.float() if self.residual_in_fp32 else resid_pre
        return self.hook_resid_post(residual + mixed)


class FinalNorm(RMSNorm):
    """The final RMSNorm, its output in the weights' dtype (transformers casts it for lm_head)."""

    def forward(self, x: Float[Tensor, "... d"]) -> Float[Tensor, "... d"]:
        return super().forward(x).to(self.w.dtype)


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
    builds the same model. Write and state edits carry through the recurrence exactly as for GDN
    (docs/design.md §8)."""

    FAMILIES = ("mamba2",)
