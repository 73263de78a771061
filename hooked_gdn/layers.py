"""The components of a Gated DeltaNet hybrid: norms, the Gated DeltaNet layer, full attention, the block.

Weights are stored as [out, in] matrices, as transformers stores them, so that every ``F.linear``
computes exactly what transformers computes. The GDN layer's carry docs/design.md §2's symbols (W_qkv x).
The quantities TransformerLens also has are stored under transformers' names (``q_proj``,
``up_proj``, …) and read under TransformerLens' names and orientation, as views: per-head
``W_Q``/``W_K``/``W_V`` [head, d_model, d_head] and ``W_O`` [head, d_head, d_model], and the MLP's
``W_gate``/``W_in`` [d_model, d_mlp] and ``W_out`` [d_mlp, d_model]. Each hook point is declared
on its own line with its shape and sits where its quantity is computed (docs/design.md §7). The MLPs (SwiGLU
and the sparse MoE block) are in `hooked_gdn.mlp`. The families' variants (`HookedGDNConfig`'s
options, set by `hooked_gdn.architectures`) are branches here, each named by its option.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from einops import rearrange
from jaxtyping import Float
from torch import Tensor, nn

from .cache import GDNCache
from .config import HookedGDNConfig
from .delta_rule import DEFAULT_CHUNK_SIZE, DELTA_RULE
from .hook_points import CheckedHookPoint, any_hooked
from .memory import MatrixMemory
from .mlp import GatedMLP, SparseMoE


@dataclass
class ForwardContext:
    """What every layer of one forward pass needs besides its input."""

    attention_mask: Tensor | None  # [b, past + p], 1 for real tokens; None: no padding anywhere
    position_ids: Tensor  # [b, p]
    cache: GDNCache | None
    state_positions: Tensor | None  # [P] positions of the current input at which hook_state fires
    sequential: bool
    past_length: int = 0  # positions already in the cache
    chunk_size: int = DEFAULT_CHUNK_SIZE
    # what one layer hands to later ones in the same forward (RWKV-7's "v_first"); shared by the copies `to` makes
    shared: dict = field(default_factory=dict)

    @property
    def current_mask(self) -> Tensor | None:
        return None if self.attention_mask is None else self.attention_mask[:, -self.position_ids.shape[1]:]

    def to(self, device, non_blocking: bool = False) -> "ForwardContext":
        """This context with its tensors on ``device``: what accelerate's hooks call to move a block's
        inputs to the block's device. The cache is shared, not moved: each layer's entries live
        on that layer's device."""
        move = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)
        return replace(self, attention_mask=move(self.attention_mask), position_ids=move(self.position_ids),
                       state_positions=move(self.state_positions))


def _matrix(out_features: int, in_features: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(out_features, in_features))


class RMSNorm(nn.Module):
    """RMSNorm x / scale · (1 + w) (Qwen's zero-centred weight) or x / scale · w (``zero_centred=False``,
    OLMo-Hybrid), scale = sqrt(mean(x²) + ε), computed in fp32.

    ``hook_scale`` is TransformerLens' scale, what ``ActivationCache.apply_ln_to_stack`` divides a
    residual stack by, and ``hook_normalized`` TransformerLens' x / scale, before the weight. The norm
    multiplies by rsqrt(mean(x²) + ε), as transformers does, so the scale is formed only for hooks, and
    used only where a hook edited it; the product with the weight is the same operation, in the same
    order, whether x / scale fires or not.
    """

    def __init__(self, d: int, eps: float, zero_centred: bool = True):
        super().__init__()
        self.zero_centred = zero_centred
        self.w = nn.Parameter(torch.zeros(d) if zero_centred else torch.ones(d))
        self.eps = eps
        self.hook_scale = CheckedHookPoint()  # [..., 1], fp32
        self.hook_normalized = CheckedHookPoint()  # [..., d], fp32

    @property
    def weight(self) -> Float[Tensor, " d"]:
        """What the normalised input is multiplied by: 1 + w, or w."""
        return 1.0 + self.w if self.zero_centred else self.w

    def forward(self, x: Float[Tensor, "... d"]) -> Float[Tensor, "... d"]:
        x32 = x.float()
        inverse_scale = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if any_hooked(self.hook_scale):
            scale, edited, _ = self.hook_scale.fire_and_diff(inverse_scale.reciprocal(), 1)
            if edited is not None:
                inverse_scale = scale.reciprocal()
        return (self.hook_normalized(x32 * inverse_scale) * self.weight.float()).type_as(x)


class GatedRMSNorm(nn.Module):
    """The GDN output norm: y = RMSNorm(o) · w ⊙ SiLU(z), over d_v.

    As transformers' ``Qwen3_5RMSNormGated``: the normalisation and SiLU(z) are computed in fp32,
    but the normalised o is rounded to o's dtype before the multiply by w (so in bf16 it is rounded
    twice), and the result is in o's dtype.
    """

    def __init__(self, d: int, eps: float):
        super().__init__()
        self.w = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, o: Float[Tensor, "... d_v"], z: Float[Tensor, "... d_v"]) -> Float[Tensor, "... d_v"]:
        o32 = o.float()
        normed = (o32 * torch.rsqrt(o32.pow(2).mean(-1, keepdim=True) + self.eps)).to(o.dtype)
        return (self.w * normed * F.silu(z.float())).to(o.dtype)


def l2norm(x: Tensor, eps: float = 1e-6) -> Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def split_heads(x: Float[Tensor, "b p hd"], d: int) -> Float[Tensor, "b p h d"]:
    return rearrange(x, "b p (h d) -> b p h d", d=d)


def causal_conv(
    x: Float[Tensor, "b p c"], weight: Float[Tensor, "c 1 K"], bias: Float[Tensor, " c"] | None, ctx: ForwardContext, layer: int,
    hook_pre_activation: CheckedHookPoint | None = None,
) -> Float[Tensor, "b p c"]:
    """SiLU of the causal depthwise conv (kernel K) over positions, continuing the cache's last K−1 inputs
    of ``layer`` and leaving its own there: the short conv before the GDN and Mamba-2 recurrences.

    ``hook_pre_activation``, where given and hooked, fires with the conv before its SiLU, channels-first
    [b, c, p + K − 1], as torch's ``nn.Conv1d(padding=K−1)`` gives it (transformers' Mamba-2 ``conv1d`` module,
    which TransformerLens' bridge hooks): the p positions of the input, then K−1 past its end (its last inputs
    against zeros), formed only when hooked. Edits of the first p are carried into the SiLU; the trailing K−1
    are dropped, as transformers drops them. Unhooked, the computation is the same as without the argument."""
    kernel = weight.shape[-1]
    x = rearrange(x, "b p c -> b c p")
    past = None if ctx.cache is None else ctx.cache.conv_states.get(layer)
    if past is None:
        past = x.new_zeros(x.shape[0], x.shape[1], kernel - 1)
    padded = torch.cat([past.to(x.dtype), x], -1)
    if ctx.cache is not None:
        ctx.cache.update_conv_state(layer, padded, kernel)
    weight, bias = weight.to(x.dtype), None if bias is None else bias.to(x.dtype)
    conv = F.conv1d(padded, weight, bias, groups=x.shape[1])
    if hook_pre_activation is not None and hook_pre_activation.is_hooked():
        # the K−1 outputs past the end: the conv over the last K−1 inputs followed by K−1 zeros
        tail = F.pad(padded[..., x.shape[-1]:], (0, kernel - 1))
        past_the_end = F.conv1d(tail, weight, bias, groups=x.shape[1]) if kernel > 1 else conv[..., :0]
        # contiguous: the SiLU then runs on the layout it runs on unhooked, so hooks that only read change no bit
        conv = hook_pre_activation(torch.cat([conv, past_the_end], -1))[..., :x.shape[-1]].contiguous()
    return rearrange(F.silu(conv), "b c p -> b p c")


class GatedDeltaNet(MatrixMemory):
    """The GDN layer of docs/design.md §2: a `MatrixMemory` with the delta rule's transition, whose state
    and rank-1 write are editable hook points; this class holds the projections, conv, gates and output norm."""

    def __init__(self, cfg: HookedGDNConfig, layer: int):
        super().__init__(layer, DELTA_RULE)
        self.cfg = cfg
        self.key_dim = cfg.n_key_heads * cfg.d_key
        self.value_dim = cfg.n_value_heads * cfg.d_value
        self.conv_dim = 2 * self.key_dim + self.value_dim
        self.W_qkv = _matrix(self.conv_dim, cfg.d_model)
        self.W_z = _matrix(self.value_dim, cfg.d_model)
        self.W_b = _matrix(cfg.n_value_heads, cfg.d_model)
        self.W_a = _matrix(cfg.n_value_heads, cfg.d_model)
        self.conv_weight = nn.Parameter(torch.empty(self.conv_dim, 1, cfg.conv_kernel))
        self.A_log = nn.Parameter(torch.empty(cfg.n_value_heads))
        self.dt_bias = nn.Parameter(torch.ones(cfg.n_value_heads))
        self.norm = GatedRMSNorm(cfg.d_value, cfg.gdn_norm_eps)
        self.W_o = _matrix(cfg.d_model, self.value_dim)
        # b batch, p positions; the recurrence's hook points are fp32
        self.hook_in = CheckedHookPoint()  # [b, p, d_model], after ln1
        self.hook_q_pre_conv = CheckedHookPoint()  # [b, p, H_k, d_k]
        self.hook_k_pre_conv = CheckedHookPoint()  # [b, p, H_k, d_k]
        self.hook_v_pre_conv = CheckedHookPoint()  # [b, p, H_v, d_v]
        self.hook_q = CheckedHookPoint()  # [b, p, H_k, d_k], after conv and SiLU
        self.hook_k = CheckedHookPoint()  # [b, p, H_k, d_k]
        self.hook_v = CheckedHookPoint()  # [b, p, H_v, d_v]
        self.hook_gate_input = CheckedHookPoint()  # [b, p, H_v, d_v]: z
        self.hook_beta_logit = CheckedHookPoint()  # [b, p, H_v]: b
        self.hook_beta = CheckedHookPoint()  # [b, p, H_v]: β = σ(b), or 2σ(b) with allow_neg_eigval
        self.hook_log_decay = CheckedHookPoint()  # [b, p, H_v]: g, α = e^g
        # the memory's own (`MatrixMemory`): hook_read_query, hook_write_key, hook_write_value, hook_state,
        # hook_final_state, hook_recurrence_out, with H = H_v
        self.hook_gated_out = CheckedHookPoint()  # [b, p, H_v, d_v]: y, each head's input to W_o
        self.hook_out = CheckedHookPoint()  # [b, p, d_model]

    def forward(self, x: Float[Tensor, "b p d_model"], ctx: ForwardContext) -> Float[Tensor, "b p d_model"]:
        cfg = self.cfg
        if ctx.current_mask is not None:  # padding contributes nothing: k̂ = 0 there, so no write
            x = x * ctx.current_mask[..., None].to(x.dtype)
        x = self.hook_in(x)
        q, k, v = F.linear(x, self.W_qkv).split([self.key_dim, self.key_dim, self.value_dim], -1)
        q = self.hook_q_pre_conv(split_heads(q, cfg.d_key))
        k = self.hook_k_pre_conv(split_heads(k, cfg.d_key))
        v = self.hook_v_pre_conv(split_heads(v, cfg.d_value))
        mixed = causal_conv(torch.cat([q.flatten(2), k.flatten(2), v.flatten(2)], -1), self.conv_weight, None, ctx, self.layer)
        q, k, v = mixed.split([self.key_dim, self.key_dim, self.value_dim], -1)
        q = self.hook_q(split_heads(q, cfg.d_key))
        k = self.hook_k(split_heads(k, cfg.d_key))
        v = self.hook_v(split_heads(v, cfg.d_value))
        z = self.hook_gate_input(split_heads(F.linear(x, self.W_z), cfg.d_value))
        b = self.hook_beta_logit(F.linear(x, self.W_b))
        beta = self.hook_beta(2.0 * b.sigmoid() if cfg.allow_neg_eigval else b.sigmoid())
        a = F.linear(x, self.W_a)
        g = self.hook_log_decay(-self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias))

        group = cfg.n_value_heads // cfg.n_key_heads
        q_hat = l2norm(q.float().repeat_interleave(group, 2)) * cfg.d_key**-0.5
        k_hat = l2norm(k.float().repeat_interleave(group, 2))
        o = self.recur(q_hat, k_hat, v.float(), g, beta.float(), ctx, out_dtype=x.dtype)
        return self.hook_out(self.output_from_read(o, {"gate_input": z}))

    #: what `output_from_read` needs besides the read, by hook short name
    OUTPUT_INPUTS = ("gate_input",)

    def output_from_read(self, o: Float[Tensor, "... H d_v"], inputs: dict[str, Tensor]) -> Float[Tensor, "... d_model"]:
        """Everything the mixer does after the recurrence: the gated norm of the reads o_t (all heads), with
        ``inputs`` the `OUTPUT_INPUTS` at the same positions, then W_o. Its JVP in o is the exact first-order
        effect of a change of the read on the residual stream (the dashboards' direct effect)."""
        y = self.hook_gated_out(self.norm(o, inputs["gate_input"]))
        return F.linear(y.flatten(-2).to(self.W_o.dtype), self.W_o)


def rotary_inv_freq(rotary_dim: int, base: float) -> Float[Tensor, " half_rotary_dim"]:
    """The rotary embedding's inverse frequencies base^(−2i/r) (empty without rotary features)."""
    return 1.0 / base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float) / rotary_dim)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the first ``cos.shape[-1]`` features of x [b, p, heads, d] (halves convention)."""
    r = cos.shape[-1]
    x_rot, x_pass = x[..., :r], x[..., r:]
    x1, x2 = x_rot.chunk(2, -1)
    rotated = x_rot * cos[:, :, None] + torch.cat([-x2, x1], -1) * sin[:, :, None]
    return torch.cat([rotated, x_pass], -1)


class GatedAttention(nn.Module):
    """Full attention with q/k RMSNorm, partial rotary, grouped KV heads and (Qwen) a sigmoid output gate.

    Without ``attention_output_gate`` there are no gate rows and no ``hook_gate``; without
    ``qk_norm_per_head`` the q/k norms run over all heads' features at once (OLMo-Hybrid).
    """

    def __init__(self, cfg: HookedGDNConfig, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        self.gated = cfg.attention_output_gate
        # with the gate, per head: d_head query rows, then d_head gate rows
        self.q_proj = _matrix((2 if self.gated else 1) * cfg.n_heads * cfg.d_head, cfg.d_model)
        self.k_proj = _matrix(cfg.n_key_value_heads * cfg.d_head, cfg.d_model)
        self.v_proj = _matrix(cfg.n_key_value_heads * cfg.d_head, cfg.d_model)
        self.o_proj = _matrix(cfg.d_model, cfg.n_heads * cfg.d_head)
        norm_width = lambda heads: cfg.d_head if cfg.qk_norm_per_head else heads * cfg.d_head
        self.q_norm = RMSNorm(norm_width(cfg.n_heads), cfg.eps, cfg.zero_centred_norms)
        self.k_norm = RMSNorm(norm_width(cfg.n_key_value_heads), cfg.eps, cfg.zero_centred_norms)
        self.hook_q = CheckedHookPoint()  # [b, p, n_heads, d_head], after q_norm, before rotary
        self.hook_k = CheckedHookPoint()  # [b, p, n_kv, d_head], after k_norm, before rotary
        self.hook_v = CheckedHookPoint()  # [b, p, n_kv, d_head]
        self.hook_rot_q = CheckedHookPoint()  # [b, p, n_heads, d_head]
        self.hook_rot_k = CheckedHookPoint()  # [b, p, n_kv, d_head]
        self.hook_attn_scores = CheckedHookPoint(position_axis=2)  # [b, n_heads, p, past + p], fires only when hooked
        self.hook_pattern = CheckedHookPoint(position_axis=2)  # [b, n_heads, p, past + p], fires only when hooked
        self.hook_z = CheckedHookPoint()  # [b, p, n_heads, d_head]
        if self.gated:
            self.hook_gate = CheckedHookPoint()  # [b, p, n_heads, d_head]: the sigmoid output gate

    # TransformerLens' per-head weights: x @ W_Q[h] is head h's query before q_norm; W_K and W_V
    # repeat each KV head for the query heads it serves; head h adds (z ⊙ gate)[h] @ W_O[h].
    @property
    def W_Q(self) -> Float[Tensor, "n_heads d_model d_head"]:
        return rearrange(self.q_proj, "(h qg d) m -> qg h m d", qg=2 if self.gated else 1, d=self.cfg.d_head)[0]  # qg: query, gate

    @property
    def W_K(self) -> Float[Tensor, "n_heads d_model d_head"]:
        return self._per_query_head(self.k_proj)

    @property
    def W_V(self) -> Float[Tensor, "n_heads d_model d_head"]:
        return self._per_query_head(self.v_proj)

    @property
    def W_O(self) -> Float[Tensor, "n_heads d_head d_model"]:
        return rearrange(self.o_proj, "m (h d) -> h d m", d=self.cfg.d_head)

    def _per_query_head(self, kv_proj: Tensor) -> Tensor:
        per_kv_head = rearrange(kv_proj, "(h d) m -> h m d", d=self.cfg.d_head)
        return per_kv_head.repeat_interleave(self.cfg.n_heads // self.cfg.n_key_value_heads, 0)

    def forward(
        self, x: Float[Tensor, "b p d_model"], ctx: ForwardContext, cos: Float[Tensor, "b p r"], sin: Float[Tensor, "b p r"]
    ) -> Float[Tensor, "b p d_model"]:
        cfg = self.cfg
        b, p, _ = x.shape
        q = F.linear(x, self.q_proj)
        if self.gated:
            q, gate_logits = q.view(b, p, cfg.n_heads, 2 * cfg.d_head).chunk(2, -1)
        q = self.hook_q(self._qk_norm(self.q_norm, q, cfg.n_heads))
        k = self.hook_k(self._qk_norm(self.k_norm, F.linear(x, self.k_proj), cfg.n_key_value_heads))
        v = self.hook_v(F.linear(x, self.v_proj).view(b, p, cfg.n_key_value_heads, cfg.d_head))
        q = self.hook_rot_q(apply_rotary(q, cos, sin))
        k = self.hook_rot_k(apply_rotary(k, cos, sin))
        if ctx.cache is not None:
            k, v = ctx.cache.append_kv(self.layer, k, v)
        group = cfg.n_heads // cfg.n_key_value_heads
        q_, k_, v_ = q.transpose(1, 2), k.transpose(1, 2).repeat_interleave(group, 1), v.transpose(1, 2).repeat_interleave(group, 1)
        total = k.shape[1]
        if any_hooked(self.hook_attn_scores, self.hook_pattern):  # the pattern is [p, total] per head anyway
            mask = self._mask(ctx, p, total, q_.dtype, x.device)
            scores = self.hook_attn_scores((q_ @ k_.transpose(-1, -2)) * cfg.d_head**-0.5 + mask)
            pattern = self.hook_pattern(scores.softmax(-1, dtype=torch.float32).to(q_.dtype))
            z = pattern @ v_
        elif ctx.attention_mask is None and p == total:  # prefill without padding: the causal kernel, no [p, p] mask
            z = F.scaled_dot_product_attention(q_, k_, v_, is_causal=True)
        elif ctx.attention_mask is None and p == 1:  # one new token after a cached prefix sees every key
            z = F.scaled_dot_product_attention(q_, k_, v_)
        else:  # padding, or several tokens after a cached prefix (is_causal would align them to the top left)
            z = F.scaled_dot_product_attention(q_, k_, v_, attn_mask=self._mask(ctx, p, total, q_.dtype, x.device))
        z = self.hook_z(z.transpose(1, 2))
        if self.gated:
            z = z * self.hook_gate(gate_logits.sigmoid())
        return F.linear(z.flatten(2), self.o_proj)

    def _qk_norm(self, norm: RMSNorm, x: Tensor, heads: int) -> Float[Tensor, "b p heads d_head"]:
        """q or k [b, p, heads, d_head] (or [b, p, heads · d_head]), normalised per head or across heads."""
        b, p = x.shape[:2]
        if self.cfg.qk_norm_per_head:
            return norm(x.reshape(b, p, heads, self.cfg.d_head))
        return norm(x.reshape(b, p, heads * self.cfg.d_head)).view(b, p, heads, self.cfg.d_head)

    def _mask(self, ctx: ForwardContext, p: int, total: int, dtype: torch.dtype, device) -> Tensor:
        """Additive mask [b or 1, 1, p, total]: causal, and pad keys masked (a finite minimum, so no NaN)."""
        past = total - p
        allowed = torch.ones(p, total, dtype=torch.bool, device=device).tril(past)[None, None]
        if ctx.attention_mask is not None:
            allowed = allowed & ctx.attention_mask[:, None, None, -total:].bool()
        return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)


class Block(nn.Module):
    """Residual block; the mixer is ``linear_attn`` (GDN) or ``attn`` (full attention), the MLP dense or MoE.

    Pre-norm (``ln1``, ``ln2``): x + mixer(ln1(x)), then + mlp(ln2(·)). Post-norm (attention blocks
    with ``attention_block_norm="post"``, OLMo-Hybrid; TransformerLens' Gemma-2 names ``ln1_post``,
    ``ln2_post``): x + ln1_post(attn(x)), then + ln2_post(mlp(·)). Either way ``hook_attn_out`` and
    ``hook_mlp_out`` are what is added to the residual stream, so ``decompose_resid`` still sums.
    """

    def __init__(self, cfg: HookedGDNConfig, layer: int):
        super().__init__()
        self.is_gdn = cfg.layer_types[layer] == "linear_attention"
        self.post_norm = not self.is_gdn and cfg.attention_block_norm == "post"
        norm = lambda: RMSNorm(cfg.d_model, cfg.eps, cfg.zero_centred_norms)
        if self.post_norm:
            self.ln1_post, self.ln2_post = norm(), norm()
        else:
            self.ln1, self.ln2 = norm(), norm()
        if self.is_gdn:
            self.linear_attn = GatedDeltaNet(cfg, layer)
        else:
            self.attn = GatedAttention(cfg, layer)
        if cfg.mlp_types[layer] == "moe":
            self.mlp = SparseMoE(cfg.d_model, cfg.n_experts, cfg.n_experts_per_token, cfg.d_expert, cfg.d_shared_expert,
                                 cfg.norm_topk_prob)
        else:
            self.mlp = GatedMLP(cfg.d_model, cfg.d_mlp)
        self.hook_resid_pre = CheckedHookPoint()  # [b, p, d_model]
        self.hook_attn_out = CheckedHookPoint()  # [b, p, d_model]: the mixer's output, GDN or attention
        self.hook_resid_mid = CheckedHookPoint()  # [b, p, d_model]
        self.hook_mlp_out = CheckedHookPoint()  # [b, p, d_model]: the MLP's (or MoE block's) output
        self.hook_resid_post = CheckedHookPoint()  # [b, p, d_model]

    def forward(
        self, x: Float[Tensor, "b p d_model"], ctx: ForwardContext, cos: Float[Tensor, "b p r"], sin: Float[Tensor, "b p r"]
    ) -> Float[Tensor, "b p d_model"]:
        resid_pre = self.hook_resid_pre(x)
        if self.post_norm:
            mixed = self.ln1_post(self.attn(resid_pre, ctx, cos, sin))
        else:
            h = self.ln1(resid_pre)
            mixed = self.linear_attn(h, ctx) if self.is_gdn else self.attn(h, ctx, cos, sin)
        resid_mid = self.hook_resid_mid(resid_pre + self.hook_attn_out(mixed))
        mlp_out = self.ln2_post(self.mlp(resid_mid)) if self.post_norm else self.mlp(self.ln2(resid_mid))
        return self.hook_resid_post(resid_mid + self.hook_mlp_out(mlp_out))


def init_hybrid_weights(model: nn.Module, std: float = 0.02) -> None:
    """Qwen3.5's initialisation of a GDN hybrid: normal(0, std) matrices, A = U(0.01, 16), dt_bias = 1, norms
    at identity."""
    for name, p in model.named_parameters():
        if name.endswith("A_log"):
            p.copy_(torch.empty_like(p).uniform_(0.01, 16).log())
        elif name.endswith("dt_bias") or name.endswith("norm.w"):  # GatedRMSNorm multiplies by w
            p.fill_(1.0)
        elif name.endswith(".w"):  # RMSNorm: 1 + w, or w
            p.fill_(0.0 if model.cfg.zero_centred_norms else 1.0)
        elif name.endswith("conv_weight"):
            nn.init.uniform_(p, -p.shape[-1] ** -0.5, p.shape[-1] ** -0.5)
        else:
            nn.init.normal_(p, std=std)
