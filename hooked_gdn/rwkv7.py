"""`HookedRWKV7`: RWKV-7 ("Goose") with its matrix memory, write and erase as hook points.

Per layer and head (head size N, key-major state S ∈ R^{N×N}), with the token shift
x_c = x_t + (x_{t−1} − x_t) ⊙ μ_c for each c ∈ {r, w, k, v, a, g}:

    log w_t = −e^{−1/2} σ(w_0 + tanh(x_w W_1) W_2)     (per channel, so w_t ∈ (0.545, 1))
    a_t = σ(a_0 + x_a A_1 A_2),   κ̂_t = normalise_head(k_t ⊙ k_k),   k̃_t = k_t ⊙ (1 + (a_t − 1) ⊙ k_a)
    v_t = v_t + (v_first − v_t) ⊙ σ(v_0 + x_v V_1 V_2)  (layers > 0; v_first is layer 0's value)
    S_t = diag(w_t) S_{t−1} + (a_t ⊙ κ̂_t) e_tᵀ + k̃_t v_tᵀ,   e_t = −S_{t−1}ᵀ κ̂_t
    o_t = GroupNorm_head(S_tᵀ r_t) + (r_t · (r_k ⊙ k̃_t)) v_t,   out = W_o (o_t ⊙ g_t),  g_t = σ(x_g G_1) G_2

and a channel mix W_v relu(W_k x_k)². The memory is a `hooked_gdn.memory.DPLRMemory` (the engine of
`hooked_gdn.dplr`, docs/design.md §17), so its state, write and erase hook points carry edits forward
exactly in parallel mode, sequential mode and generation, as GDN's do. Hook points under
``blocks.L.linear_attn.``, named as GDN's wherever the quantity is the same:

=========================  ==========================================  ======================
quantity                   RWKV-7                                      hook
=========================  ==========================================  ======================
read query                 r_t (receptance)                            hook_read_query [b,p,H,N]
raw key, value             k_t, v_t (the projections)                  hook_k, hook_v [b,p,H,N]
log decay, per channel     log w_t                                     hook_log_decay [b,p,H,N]
in-context rate            a_t                                         hook_erase_rate [b,p,H,N]
removal key                κ̂_t                                         hook_erase_key [b,p,H,N]
written key                k̃_t                                         hook_write_key [b,p,H,N]
written value              v_t after the v_first mix                   hook_write_value [b,p,H,N]
erase value                e_t = −S_{t−1}ᵀ κ̂_t                         hook_erase_value [b,p,H,N]
state, final state         S_t (state_positions), S_T                  hook_state, hook_final_state
read                       S_tᵀ r_t                                    hook_recurrence_out [b,p,H,N]
bonus                      (r_t · (r_k ⊙ k̃_t)) v_t                     hook_bonus [b,p,H,N]
gate                       g_t                                         hook_gate [b,p,H,N]
=========================  ==========================================  ======================

Also ``hook_in`` (the normed input), ``hook_v_first`` (layer 0 only: the value every later layer mixes in),
``hook_v_mix`` (layers > 0: the mixing gate), ``hook_gated_out`` ((GroupNorm read + bonus) ⊙ g, each
head's input to W_o) and ``hook_out``; the channel mix has ``hook_pre`` and ``hook_post`` (relu²). The
block keeps TransformerLens' names (``ln1``, ``ln2``, ``hook_attn_out``, ``hook_mlp_out``, …); the extra
LayerNorm of the embeddings is the model's ``ln_embed``, so ``hook_embed`` is where the residual stream
starts and ``decompose_resid`` sums to it. Weights in transformers' [out, in] layout (flash-linear-
attention's names in `hooked_gdn.architectures.rwkv7`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from .config import AttentionFreeHeads, HookedModelConfig
from .hook_points import CheckedHookPoint, any_hooked
from .layers import ForwardContext, _matrix, split_heads
from .memory import DPLRMemory
from .model import HookedGatedDeltaNet

#: e^{−1/2}: the largest per-step decay exponent, so w_t = exp(−e^{−1/2} σ(·)) ∈ (0.545, 1)
DECAY_SCALE = math.exp(-0.5)
#: the head size BlinkDL's reference (and every released RWKV-7) uses; its CPU path hard-codes it
HEAD_SIZE = 64


@dataclass(kw_only=True)
class HookedRWKV7Config(HookedModelConfig, AttentionFreeHeads):
    """An RWKV-7 language model: `HookedModelConfig`'s sizes (H = ``n_key_heads`` = ``n_value_heads`` heads of
    size N = ``d_key`` = ``d_value``, H · N = ``d_model``; TransformerLens' ``n_heads``, ``d_head``: H and N),
    the channel mix's width ``d_mlp`` and the ranks of the four low-rank maps (decay, in-context rate, value
    mix, gate). ``eps`` is the LayerNorms'; ``group_norm_eps`` the read's per-head GroupNorm's
    (flash-linear-attention: N · norm_eps; BlinkDL: 64e-5)."""

    architecture: str = "rwkv7"
    d_mlp: int
    d_decay_lora: int
    d_a_lora: int
    d_v_lora: int
    d_gate_lora: int
    eps: float = 1e-5
    group_norm_eps: float = 64e-5
    conv_kernel: int = 2  # the token shift: each position also reads the previous one's input
    normalization_type: str = "LN"
    act_fn: str = "relu_squared"

    SIZES = (*HookedModelConfig.SIZES, "d_mlp", "d_decay_lora", "d_a_lora", "d_v_lora", "d_gate_lora")

    def __post_init__(self):
        super().__post_init__()
        if self.n_key_heads != self.n_value_heads or self.d_key != self.d_value:
            raise ValueError(f"an RWKV-7 head has one key per value head and square states: got n_key_heads="
                             f"{self.n_key_heads}, n_value_heads={self.n_value_heads}, d_key={self.d_key}, d_value={self.d_value}")
        if self.n_value_heads * self.d_value != self.d_model:
            raise ValueError(f"RWKV-7's heads span d_model: n_heads ({self.n_value_heads}) x head size ({self.d_value}) "
                             f"must be d_model ({self.d_model})")

    @property
    def layer_types(self) -> list[str]:
        return ["linear_attention"] * self.n_layers

    @property
    def original_architecture(self) -> str:
        return "RWKV7ForCausalLM"  # flash-linear-attention's class: transformers has no RWKV-7


class LayerNorm(nn.Module):
    """LayerNorm with bias, in fp32: (x − mean) / scale · w + b, scale = sqrt(var + ε). ``hook_scale`` is
    TransformerLens' scale (what ``apply_ln_to_stack`` divides a centred stack by) and ``hook_normalized`` its
    (x − mean) / scale, before the weight and bias; unhooked, the norm is torch's ``layer_norm``."""

    def __init__(self, d: int, eps: float):
        super().__init__()
        self.w = nn.Parameter(torch.ones(d))
        self.b = nn.Parameter(torch.zeros(d))
        self.eps = eps
        self.hook_scale = CheckedHookPoint()  # [..., 1], fp32
        self.hook_normalized = CheckedHookPoint()  # [..., d], fp32

    @property
    def weight(self) -> Float[Tensor, " d"]:
        return self.w

    def forward(self, x: Float[Tensor, "... d"]) -> Float[Tensor, "... d"]:
        x32 = x.float()
        if not any_hooked(self.hook_scale, self.hook_normalized):
            return F.layer_norm(x32, x.shape[-1:], self.w.float(), self.b.float(), self.eps).type_as(x)
        centred = x32 - x32.mean(-1, keepdim=True)
        scale = self.hook_scale(torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + self.eps))
        return (self.hook_normalized(centred / scale) * self.w.float() + self.b.float()).type_as(x)


def token_shift(x: Float[Tensor, "b p d"], ctx: ForwardContext, key: str) -> Float[Tensor, "b p d"]:
    """x_{t−1} − x_t for each position, x_{−1} the cache's last input under ``key`` (zero without one), leaving
    this input's last position there."""
    past = None if ctx.cache is None else ctx.cache.shift_states.get(key)
    previous = torch.cat([x.new_zeros(x[:, :1].shape) if past is None else past[:, None].to(x.dtype), x[:, :-1]], 1)
    if ctx.cache is not None:
        ctx.cache.shift_states[key] = x[:, -1].clone()
    return previous - x


class LowRank(nn.Module):
    """x ↦ bias + act(x A) B with A [d_in, r], B [r, d_out], stored as transformers stores them ([out, in])."""

    def __init__(self, d_in: int, rank: int, d_out: int, bias: bool):
        super().__init__()
        self.A = _matrix(rank, d_in)
        self.B = _matrix(d_out, rank)
        self.bias = nn.Parameter(torch.zeros(d_out)) if bias else None

    def forward(self, x: Tensor, act=None) -> Tensor:
        h = F.linear(x, self.A)
        return F.linear(h if act is None else act(h), self.B, self.bias)


class RWKV7TimeMix(DPLRMemory):
    """RWKV-7's time mix: a `DPLRMemory` (its state, write and erase hook points and carried edits) plus its own
    weights: the token-shift mixes ``x_r`` … ``x_g``, the projections ``W_r``, ``W_k``, ``W_v``, ``W_o``, the
    low-rank maps ``decay``, ``rate``, ``value_mix`` (layers > 0) and ``gate``, ``k_k``, ``k_a``, ``r_k`` and the
    read's GroupNorm ``norm``."""

    MIXES = ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g")
    RATE_HOOK = "hook_erase_rate"  # the census's β column: the in-context rate a_t
    READ_NORM_CENTRES = True  # the read's per-head GroupNorm centres it

    def __init__(self, cfg: HookedRWKV7Config, layer: int):
        super().__init__(layer)
        self.cfg = cfg
        C, H, N = cfg.d_model, cfg.n_value_heads, cfg.d_value
        for name in self.MIXES:
            setattr(self, name, nn.Parameter(torch.zeros(C)))
        self.k_k = nn.Parameter(torch.zeros(C))
        self.k_a = nn.Parameter(torch.zeros(C))
        self.r_k = nn.Parameter(torch.zeros(H, N))
        self.W_r, self.W_k, self.W_v, self.W_o = (_matrix(C, C) for _ in range(4))
        self.decay = LowRank(C, cfg.d_decay_lora, C, bias=True)
        self.rate = LowRank(C, cfg.d_a_lora, C, bias=True)
        self.value_mix = LowRank(C, cfg.d_v_lora, C, bias=True) if layer > 0 else None
        self.gate = LowRank(C, cfg.d_gate_lora, C, bias=False)
        self.norm_w = nn.Parameter(torch.ones(C))
        self.norm_b = nn.Parameter(torch.zeros(C))
        # b batch, p positions, H heads, N head size; the recurrence's hook points are fp32
        self.hook_in = CheckedHookPoint()  # [b, p, d_model], after ln1
        self.hook_k = CheckedHookPoint()  # [b, p, H, N]: k_t, the key projection
        self.hook_v = CheckedHookPoint()  # [b, p, H, N]: the value projection, before the v_first mix
        if layer == 0:
            self.hook_v_first = CheckedHookPoint()  # [b, p, H, N]: this layer's value as every later layer mixes it in
        else:
            self.hook_v_mix = CheckedHookPoint()  # [b, p, H, N]: σ(v_0 + x_v V_1 V_2), the share of v_first
        self.hook_log_decay = CheckedHookPoint()  # [b, p, H, N]: log w_t, per channel
        self.hook_erase_rate = CheckedHookPoint()  # [b, p, H, N]: a_t
        self.hook_erase_key = CheckedHookPoint()  # [b, p, H, N]: κ̂_t
        # the memory's own (`DPLRMemory`): hook_read_query (r), hook_write_key (k̃), hook_write_value (v),
        # hook_erase_value (e), hook_state, hook_final_state, hook_recurrence_out (S_tᵀ r_t)
        self.hook_bonus = CheckedHookPoint()  # [b, p, H, N]: (r_t · (r_k ⊙ k̃_t)) v_t
        self.hook_gate = CheckedHookPoint()  # [b, p, H, N]: g_t
        self.hook_gated_out = CheckedHookPoint()  # [b, p, H, N]: (GroupNorm(read) + bonus) ⊙ g, each head's input to W_o
        self.hook_out = CheckedHookPoint()  # [b, p, d_model]

    def forward(self, x: Float[Tensor, "b p d_model"], ctx: ForwardContext) -> Float[Tensor, "b p d_model"]:
        N = self.cfg.d_value
        mask = None if ctx.current_mask is None else ctx.current_mask[..., None].to(x.dtype)
        if mask is not None:  # padding writes nothing: its key, value and removal key are zero
            x = x * mask
        x = self.hook_in(x)
        shift = token_shift(x, ctx, f"{self.layer}.time_mix")
        xr, xw, xk, xv, xa, xg = (x + shift * getattr(self, name) for name in self.MIXES)
        r = split_heads(F.linear(xr, self.W_r), N).float()
        k = self.hook_k(split_heads(F.linear(xk, self.W_k), N))
        v = self.hook_v(split_heads(F.linear(xv, self.W_v), N))
        log_w = self.hook_log_decay(split_heads(-DECAY_SCALE * torch.sigmoid(self.decay(xw, torch.tanh).float()), N))
        a = self.hook_erase_rate(split_heads(torch.sigmoid(self.rate(xa).float()), N))
        if self.layer == 0:
            ctx.shared["v_first"] = self.hook_v_first(v)  # later layers' copy: an edit here leaves layer 0's own value
        else:
            share = self.hook_v_mix(split_heads(torch.sigmoid(self.value_mix(xv)), N))
            v = v + (ctx.shared["v_first"].to(v.device) - v) * share
        if mask is not None:
            v = v * mask[..., None]
        g = self.hook_gate(split_heads(self.gate(xg, torch.sigmoid), N))
        kappa = self.hook_erase_key(F.normalize(k.float() * self.k_k.float().view(-1, N), dim=-1))
        k_tilde = k.float() * (1 + (a - 1) * self.k_a.float().view(-1, N))
        o = self.recur_dplr(r, log_w.float(), kappa, a, k_tilde, v.float(), ctx)
        return self.hook_out(self.output_from_read(o, {"read_query": r, "write_key": k_tilde, "write_value": v, "gate": g}))

    def read_norm_eps(self) -> float:
        return self.cfg.group_norm_eps

    OUTPUT_INPUTS = ("read_query", "write_key", "write_value", "gate")  # r, k̃ and v for the bonus; g

    def output_from_read(self, o: Float[Tensor, "... H N"], inputs: dict[str, Tensor]) -> Float[Tensor, "... d_model"]:
        """After the recurrence: the per-head GroupNorm of the read, the bonus term, the gate and W_o (its JVP in o is
        the read's direct effect)."""
        H = self.cfg.n_value_heads
        centred = o - o.mean(-1, keepdim=True)
        normed = centred * torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + self.cfg.group_norm_eps)
        normed = normed * self.norm_w.float().view(H, -1) + self.norm_b.float().view(H, -1)
        r, k_tilde, v = (inputs[name].float() for name in ("read_query", "write_key", "write_value"))
        bonus = self.hook_bonus((r * k_tilde * self.r_k.float()).sum(-1, keepdim=True) * v)
        y = self.hook_gated_out((normed + bonus) * inputs["gate"].float())
        return F.linear(y.flatten(-2).to(self.W_o.dtype), self.W_o)


class RWKV7ChannelMix(nn.Module):
    """RWKV-7's channel mix: W_out relu(W_in x_k)², x_k = x + (x_{t−1} − x_t) ⊙ μ_k (TransformerLens' W_in, W_out)."""

    def __init__(self, cfg: HookedRWKV7Config, layer: int):
        super().__init__()
        self.layer = layer
        self.x_k = nn.Parameter(torch.zeros(cfg.d_model))
        self.up_proj = _matrix(cfg.d_mlp, cfg.d_model)
        self.down_proj = _matrix(cfg.d_model, cfg.d_mlp)
        self.hook_pre = CheckedHookPoint()  # [b, p, d_mlp]: W_in x_k
        self.hook_post = CheckedHookPoint()  # [b, p, d_mlp]: relu(·)², the neurons' activations

    @property
    def W_in(self) -> Float[Tensor, "d_model d_mlp"]:
        return self.up_proj.T

    @property
    def W_out(self) -> Float[Tensor, "d_mlp d_model"]:
        return self.down_proj.T

    def forward(self, x: Float[Tensor, "b p d_model"], ctx: ForwardContext) -> Float[Tensor, "b p d_model"]:
        if ctx.current_mask is not None:
            x = x * ctx.current_mask[..., None].to(x.dtype)
        x_k = x + token_shift(x, ctx, f"{self.layer}.channel_mix") * self.x_k
        post = self.hook_post(F.relu(self.hook_pre(F.linear(x_k, self.up_proj))).square())
        return F.linear(post, self.down_proj)


class RWKV7Block(nn.Module):
    """x + time_mix(ln1(x)), then + channel_mix(ln2(·)): pre-norm, LayerNorms with bias."""

    is_gdn = True  # a matrix-memory layer at linear_attn, addressed as a GDN layer is

    def __init__(self, cfg: HookedRWKV7Config, layer: int):
        super().__init__()
        self.ln1 = LayerNorm(cfg.d_model, cfg.eps)
        self.linear_attn = RWKV7TimeMix(cfg, layer)
        self.ln2 = LayerNorm(cfg.d_model, cfg.eps)
        self.mlp = RWKV7ChannelMix(cfg, layer)
        self.hook_resid_pre = CheckedHookPoint()  # [b, p, d_model]
        self.hook_attn_out = CheckedHookPoint()  # [b, p, d_model]: the time mix's output
        self.hook_resid_mid = CheckedHookPoint()  # [b, p, d_model]
        self.hook_mlp_out = CheckedHookPoint()  # [b, p, d_model]: the channel mix's output
        self.hook_resid_post = CheckedHookPoint()  # [b, p, d_model]

    def forward(self, x: Float[Tensor, "b p d_model"], ctx: ForwardContext, cos=None, sin=None) -> Float[Tensor, "b p d_model"]:
        resid_pre = self.hook_resid_pre(x)
        resid_mid = self.hook_resid_mid(resid_pre + self.hook_attn_out(self.linear_attn(self.ln1(resid_pre), ctx)))
        return self.hook_resid_post(resid_mid + self.hook_mlp_out(self.mlp(self.ln2(resid_mid), ctx)))


def layer_norm(cfg: HookedRWKV7Config) -> LayerNorm:
    return LayerNorm(cfg.d_model, cfg.eps)


@torch.no_grad()
def init_rwkv7_weights(model: nn.Module, std: float = 0.02) -> None:
    """RWKV-7's own initialisation (BlinkDL's, as flash-linear-attention writes it): token-shift mixes that fall
    with the channel index and the depth; decays spread per channel from fast to slow; orthogonal r, k (gain 0.1)
    and v; zero output projections and first low-rank factors (so each starts as its bias); embeddings ±1e-4.
    ``std`` scales the remaining matrices (the second low-rank factors, gain 0.1 · std / 0.02)."""
    cfg = model.cfg
    L, C, N = cfg.n_layers, cfg.d_model, cfg.d_value
    n = torch.arange(C, dtype=torch.float32)
    linear = n / (C - 1) - 0.5
    zigzag = ((n % N) - (N - 1) / 2) / ((N - 1) / 2)
    zigzag = zigzag * zigzag.abs()
    ddd = n / C
    nn.init.uniform_(model.W_E, -1e-4, 1e-4)
    if model.lm_head is not None:
        nn.init.orthogonal_(model.lm_head, gain=0.5 * math.sqrt(max(cfg.d_vocab / C, 1.0)))
    for layer, block in enumerate(model.blocks):
        mix, ffn = block.linear_attn, block.mlp
        to_0_1, to_1_0 = layer / max(L - 1, 1), 1.0 - layer / L
        for name, power in zip(RWKV7TimeMix.MIXES, (0.2, 0.9, 0.7, 0.7, 0.9, 0.2)):
            getattr(mix, name).copy_(1.0 - ddd.pow(power * to_1_0))
        mix.decay.bias.copy_(-6 + 6 * (n / (C - 1)).pow(1 + to_0_1**0.3) + 0.5 + 2.5 * zigzag)
        mix.rate.bias.copy_(-0.19 + 0.3 * zigzag + 0.4 * linear)
        mix.k_k.copy_(0.71 - 0.1 * linear)
        mix.k_a.fill_(1.02)
        mix.r_k.fill_(-0.04)
        mix.norm_w.fill_(((layer + 1) / L) ** 0.7)
        mix.norm_b.zero_()
        for low_rank in (mix.decay, mix.rate, mix.value_mix, mix.gate):
            if low_rank is not None:
                low_rank.A.zero_()
                nn.init.orthogonal_(low_rank.B, gain=0.1 * std / 0.02)
        if mix.value_mix is not None:
            mix.value_mix.bias.copy_(0.73 - 0.4 * linear)
        nn.init.orthogonal_(mix.W_r)
        nn.init.orthogonal_(mix.W_k, gain=0.1)
        nn.init.orthogonal_(mix.W_v)
        mix.W_o.zero_()
        ffn.x_k.copy_(1.0 - ddd.pow(to_1_0**4))
        nn.init.orthogonal_(ffn.up_proj)
        ffn.down_proj.zero_()
    for norm in [model.ln_embed, model.ln_final] + [m for block in model.blocks for m in (block.ln1, block.ln2)]:
        norm.w.fill_(1.0)
        norm.b.zero_()


class HookedRWKV7(HookedGatedDeltaNet):
    """`HookedGatedDeltaNet` restricted to RWKV-7 checkpoints and configs (see the module docstring for the hook
    table). ``HookedGatedDeltaNet.from_pretrained("rwkv7-austen")`` builds the same model; a BlinkDL ``.pth``
    loads with `hooked_gdn.architectures.rwkv7.load_blinkdl`."""

    FAMILIES = ("rwkv7",)
