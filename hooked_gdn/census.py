"""The memory census: how long each GDN head remembers and how much its state holds (docs/design.md §11).

Per GDN layer and value head, over the positions of some text:

- decay α_t = e^{g_t} and half-life ln ½ / g_t (tokens): 10th, 50th and 90th percentiles;
- mean write strength β_t;
- effective rank of S_t, (Σσ)² / Σσ² (1 for a rank-1 state, d for d equal singular values), and
  the top direction's share σ₁² / ‖S_t‖²_F;
- cos²(S_t, k̂_t δ_tᵀ) = (k̂_tᵀ S_t δ_t)² / (‖S_t‖²_F ‖k̂_t‖² ‖δ_t‖²): how much of the state is the
  write just made (1 when the past has decayed away);
- ‖o_t‖_rms / √ε of the read, against the gated RMSNorm's ε: near or below 1, ε rather than the read
  sets the head's output scale.

The same census runs on Mamba-2, whose SSD heads have GDN's hook names (`hooked_gdn.mamba2`):
there α_t = exp(Δ_t A), the β column is the write strength Δ_t, S_t is h_t (d_state × head_dim), the
write is B_t (Δ_t x_t)ᵀ, and o_t = h_tᵀ C_t before the D x_t skip (ε: the gated norm's, over a group of heads).

And on RWKV-7 (`hooked_gdn.rwkv7`, docs/design.md §17), S_t = diag(w_t) S_{t−1} + (a_t ⊙ κ̂_t) e_tᵀ + k̃_t v_tᵀ,
o_t = S_tᵀ r_t:

- the decay is per channel, log w_t [b, p, H, N], so a head's α and half-life percentiles are over all its
  N channels and all positions together (a per-head decay is the one-channel case);
- the β column is the mean in-context rate a_t (``hook_erase_rate``), over channels and positions: the
  share of the old value along κ̂_t that the erase removes;
- the write is k̃_t v_tᵀ (``hook_write_key``, ``hook_write_value``), so ``write_share`` is
  cos²(S_t, k̃_t v_tᵀ) and the rest of the state is the past carried by G_t = diag(w_t) − (a_t ⊙ κ̂_t) κ̂_tᵀ,
  the decay *and* the erase: unlike GDN's δ_t, the erase (a_t ⊙ κ̂_t) e_tᵀ is a rank-1 term along its own
  key κ̂_t, which does not fold into the write, and it removes the past rather than adding anything new.
  From a zero state the first write is still the whole state (share 1);
- the read goes into a per-head GroupNorm, which centres it before dividing by √(var + ε): its column is
  ‖o_t − mean(o_t)‖_rms / √ε, with ε the GroupNorm's ``cfg.group_norm_eps``.

Each family's few facts the shared hook names do not say (its rate's hook point, its read norm's ε and
whether that norm centres) are declared once, by the memory layer (`MatrixMemory.RATE_HOOK`, ``read_norm_eps``,
``READ_NORM_CENTRES``, overridden by RWKV-7's time mix).

The state statistics are medians over the positions where states are formed (``state_every``);
the decay and β statistics use every position. Windows start from a zero state, so the first
positions of each window see a short past: use windows (``context``) several times longer than
the half-lives of interest.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .files import atomic_file
from .sites import gdn_hook_name

PERCENTILES = (0.1, 0.5, 0.9)
# tokens: a head whose median half-life reaches this "remembers": half of a write is still in its state 16 tokens
# on, far beyond the half-lives below a token that transformers' initial decays give; the first gdn-austen, trained
# from them, had no such head (results/census/gdn-austen-v1: 20 of 24 heads below 1 token, the longest 11)
LONG_MEMORY = 16
# tokens: the census's second bar, 4 × LONG_MEMORY, for the heads that remember longest, whose states are sums of the
# most past writes; the model cards count the heads above both, and the studies of SAEs on long memory take their
# heads above this one (scripts/sae_limits.py, demos/compare_architectures.py)
VERY_LONG_MEMORY = 64
# relative spread of a head's decay below which the census calls it fixed: float32 rounding of one constant decay
FIXED_DECAY_RTOL = 1e-6
#: the two decay kinds a head's census can report (`HeadCensus.decay_kind`)
DECAY_KINDS = ("fixed", "learned")


def _per_head(x: Float[Tensor, "b p H *channels"]) -> Float[Tensor, "samples H"]:
    """A per-position statistic, per head or per channel, as samples of each head: [b · p · channels, H]."""
    return x.float().movedim(2, -1).reshape(-1, x.shape[2])


@dataclass(frozen=True)
class HeadCensus:
    layer: int
    head: int
    alpha: tuple[float, float, float]  # 10th, 50th, 90th percentile (over positions, and channels where per channel)
    half_life: tuple[float, float, float]  # tokens; inf where α = 1
    mean_beta: float
    effective_rank: float  # median over positions of (Σσ)² / Σσ²
    top_share: float  # median of σ₁² / ‖S‖²_F
    write_share: float  # median of cos²(S_t, k̂_t δ_tᵀ)
    read_rms_over_sqrt_eps: float  # median of ‖o_t‖_rms / √ε

    @property
    def decay_is_fixed(self) -> bool:
        """Whether the decay took one value at every sampled position (its 10th and 90th percentiles agree): an
        input-independent decay, such as gdn-austen's heads 1 and 3 of every GDN layer were trained with, rather
        than one the head computes from its input. The two are different mechanisms, so the studies report them
        apart. (A per-channel decay that is fixed but differs between channels reads as not fixed.)"""
        return math.isclose(self.alpha[0], self.alpha[2], rel_tol=FIXED_DECAY_RTOL)

    @property
    def decay_kind(self) -> str:
        """One of `DECAY_KINDS`: "fixed" where `decay_is_fixed`, else "learned"."""
        return DECAY_KINDS[0] if self.decay_is_fixed else DECAY_KINDS[1]


@dataclass(frozen=True)
class MemoryCensus:
    model_name: str
    n_tokens: int
    context: int
    state_every: int
    heads: list[HeadCensus]

    def head(self, layer: int, head: int) -> HeadCensus:
        for record in self.heads:
            if (record.layer, record.head) == (layer, head):
                return record
        raise KeyError(f"no GDN head ({layer}, {head}) in this census")

    def layers(self) -> list[int]:
        return sorted({record.layer for record in self.heads})

    def count(self, min_half_life: float = LONG_MEMORY) -> int:
        """How many heads have a median half-life of at least ``min_half_life`` tokens."""
        return sum(record.half_life[1] >= min_half_life for record in self.heads)

    def long_memory_layer(self, min_half_life: float = LONG_MEMORY) -> int:
        """The GDN layer with the most heads of median half-life ≥ ``min_half_life`` (ties: the
        larger summed log half-life)."""
        def score(layer: int) -> tuple[int, float]:
            heads = [r for r in self.heads if r.layer == layer]
            return (sum(r.half_life[1] >= min_half_life for r in heads),
                    sum(math.log(max(min(r.half_life[1], 1e9), 1e-9)) for r in heads))
        return max(self.layers(), key=score)

    def table(self) -> str:
        """A Markdown table, one row per head."""
        lines = [
            "| layer | head | α p10 / p50 / p90 | half-life p10 / p50 / p90 (tokens) | mean β | eff. rank | σ₁²/‖S‖² | cos²(S, k̂δᵀ) | ‖o‖rms/√ε |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in self.heads:
            lines.append(
                f"| {r.layer} | {r.head} | {' / '.join(f'{a:.3f}' for a in r.alpha)} | "
                f"{' / '.join(_tokens(h) for h in r.half_life)} | {r.mean_beta:.2f} | {r.effective_rank:.2f} | "
                f"{r.top_share:.2f} | {r.write_share:.2f} | {r.read_rms_over_sqrt_eps:.3g} |"
            )
        return "\n".join(lines)

    def summary(self) -> str:
        n = len(self.heads)
        return (f"{n} recurrent heads on {self.n_tokens} tokens: median half-life ≥ {LONG_MEMORY} tokens in "
                f"{self.count(LONG_MEMORY)}, ≥ {VERY_LONG_MEMORY} in {self.count(VERY_LONG_MEMORY)}; effective rank ≥ 4 "
                f"in {sum(r.effective_rank >= 4 for r in self.heads)}")

    def to_dict(self) -> dict:
        return asdict(self)

    def save_json(self, path: str | Path) -> None:
        """Write the census as JSON, atomically (a temporary file renamed into place)."""
        with atomic_file(path) as f:
            f.write(json.dumps(_finite(self.to_dict()), indent=2) + "\n")

    @classmethod
    def load_json(cls, path: str | Path) -> "MemoryCensus":
        raw = json.loads(Path(path).read_text())
        field = lambda v: tuple(map(_infinite, v)) if isinstance(v, list) else _infinite(v)
        heads = [HeadCensus(**{k: field(v) for k, v in h.items()}) for h in raw.pop("heads")]
        return cls(heads=heads, **raw)

    def plot_half_lives(self, path: str | Path) -> None:
        """A heatmap of the median half-life, GDN layer by head, on a log colour scale (drawn without
        pyplot, so the caller's matplotlib backend is left as it is)."""
        from matplotlib.colors import LogNorm
        from matplotlib.figure import Figure

        layers = self.layers()
        n_heads = 1 + max(r.head for r in self.heads)
        grid = torch.full((len(layers), n_heads), float("nan"))
        for r in self.heads:
            grid[layers.index(r.layer), r.head] = min(max(r.half_life[1], 0.1), 1e5)
        fig = Figure(figsize=(1.2 + 0.9 * n_heads, 1.0 + 0.5 * len(layers)))
        ax = fig.subplots()
        image = ax.imshow(grid.numpy(), cmap="viridis", norm=LogNorm(vmin=0.1, vmax=max(1e3, float(grid.nan_to_num(0).max()))), aspect="auto")
        for i, layer in enumerate(layers):
            for h in range(n_heads):
                value = self.head(layer, h).half_life[1]
                ax.text(h, i, _tokens(value), ha="center", va="center", color="white" if value < 30 else "black", fontsize=8)
        ax.set_xticks(range(n_heads))
        ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
        ax.set_xlabel("value head")
        ax.set_ylabel("layer")
        ax.set_title(f"{self.model_name}: median decay half-life (tokens)")
        fig.colorbar(image, ax=ax, label="tokens")
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path, "wb") as f:
            fig.savefig(f, format=path.suffix.lstrip(".") or "png", dpi=120)


def census_tokens(model, text: str | Sequence[str], context: int = 512, max_tokens: int | None = None) -> Int[Tensor, "window pos"]:
    """Documents (one string or several) tokenised, joined with EOS and cut into windows of
    ``context`` tokens; with fewer than ``context`` tokens in all, one shorter window."""
    documents = [text] if isinstance(text, str) else list(text)
    tokenizer = model._require_tokenizer()
    ids: list[int] = []
    for document in documents:
        ids += tokenizer(document, add_special_tokens=False)["input_ids"] + [model.cfg.eos_token_id]
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    ids = ids[:-1] if ids else ids  # no EOS after the last document
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise ValueError("the census needs text of at least two tokens; got none or one")
    n = max(1, len(ids) // context)
    width = min(context, len(ids))
    return torch.tensor(ids[: n * width]).view(n, width)


@torch.no_grad()
def memory_census(
    model,
    input: str | Sequence[str] | Int[Tensor, "window pos"],
    context: int = 512,
    max_tokens: int | None = None,
    state_every: int = 1,
    batch_size: int = 4,
) -> MemoryCensus:
    """The memory census of every GDN head of ``model`` (a `HookedGatedDeltaNet`) on ``input``:
    text (cut into windows of ``context`` tokens, see `census_tokens`) or token windows [n, pos].

    States are formed at every ``state_every``-th position only (each is d_k × d_v floats per head;
    on a large model a stride of 8–32 keeps the census cheap).
    """
    gdn_layers = model.cfg.gdn_layers
    if not gdn_layers:
        raise ValueError(f"{model.cfg.model_name} has no Gated DeltaNet layers (layer_types {model.cfg.layer_types}); "
                         "the memory census needs at least one")
    if state_every < 1:
        raise ValueError(f"state_every must be ≥ 1, got {state_every}")
    windows = input if isinstance(input, Tensor) else census_tokens(model, input, context, max_tokens)
    if windows.dim() != 2 or windows.numel() == 0:
        raise ValueError(f"the census needs token windows of shape [n, pos] with n, pos ≥ 1, got {tuple(windows.shape)}")
    positions = torch.arange(0, windows.shape[1], state_every)
    stats = {layer: _LayerStats() for layer in gdn_layers}

    def hooks_for(layer: int) -> list:
        acc, hook_name = stats[layer], lambda hook: gdn_hook_name(layer, hook)
        mixer = model.blocks[layer].linear_attn
        sqrt_eps = math.sqrt(mixer.read_norm_eps())  # the ε of the norm the read goes into
        writes: dict[str, Tensor] = {}

        def log_decay(g, hook):
            acc.log_decay.append(_per_head(g))
        def beta(b, hook):
            acc.beta.append(_per_head(b))
        def write_key(k, hook):
            writes["key"] = k[:, positions].float()
        def write_value(d, hook):
            writes["value"] = d[:, positions].float()
        def state(s, hook):
            acc.add_states(s.float(), writes["key"], writes["value"])
        def read(o, hook):
            o = o.float()
            if mixer.READ_NORM_CENTRES:
                o = o - o.mean(-1, keepdim=True)
            acc.read_rms.append(o.pow(2).mean(-1).sqrt().flatten(0, 1) / sqrt_eps)

        return [(hook_name("hook_log_decay"), log_decay), (hook_name(mixer.RATE_HOOK), beta),
                (hook_name("hook_write_key"), write_key), (hook_name("hook_write_value"), write_value),
                (hook_name("hook_state"), state), (hook_name("hook_recurrence_out"), read)]

    fwd_hooks = [hook for layer in gdn_layers for hook in hooks_for(layer)]
    last_gdn = gdn_layers[-1] + 1
    device = model.W_E.device
    with model.hooks(fwd_hooks=fwd_hooks):
        for batch in windows.split(batch_size):
            model(batch.to(device), stop_at_layer=last_gdn, state_positions=positions)
    heads = [record for layer in gdn_layers for record in stats[layer].summarise(layer)]
    return MemoryCensus(model.cfg.model_name, windows.numel(), windows.shape[1], state_every, heads)


class _LayerStats:
    """Per-position statistics of one GDN layer, [N, H_v] each (N: positions, times channels for a per-channel
    decay or rate), gathered while the model runs."""

    def __init__(self):
        self.log_decay: list[Tensor] = []
        self.beta: list[Tensor] = []
        self.read_rms: list[Tensor] = []
        self.effective_rank: list[Tensor] = []
        self.top_share: list[Tensor] = []
        self.write_share: list[Tensor] = []

    def add_states(self, S: Float[Tensor, "b p h d_k d_v"], k_hat: Float[Tensor, "b p h d_k"],
                   delta: Float[Tensor, "b p h d_v"]) -> None:
        sigma = torch.linalg.svdvals(S)  # [b, p, h, min(d_k, d_v)]
        energy = sigma.pow(2).sum(-1)
        nonzero = energy > 0  # a state with nothing written yet has no rank
        safe = energy.clamp_min(torch.finfo(energy.dtype).tiny)
        self.effective_rank.append(torch.where(nonzero, sigma.sum(-1).pow(2) / safe, torch.nan).flatten(0, 1))
        self.top_share.append(torch.where(nonzero, sigma[..., 0].pow(2) / safe, torch.nan).flatten(0, 1))
        overlap = torch.einsum("bphk,bphkv,bphv->bph", k_hat, S, delta)
        write_energy = k_hat.pow(2).sum(-1) * delta.pow(2).sum(-1)
        defined = nonzero & (write_energy > 0)
        share = overlap.pow(2) / (safe * write_energy.clamp_min(torch.finfo(energy.dtype).tiny))
        self.write_share.append(torch.where(defined, share, torch.nan).flatten(0, 1))

    def summarise(self, layer: int) -> list[HeadCensus]:
        g = torch.cat(self.log_decay).double()
        q = torch.tensor(PERCENTILES, dtype=torch.float64)
        # α and the half-life ln ½ / g both grow with g, so their percentiles are g's mapped through
        g_quantiles = torch.quantile(g, q, dim=0)  # [3, H_v]
        alpha, half_life = g_quantiles.exp(), math.log(0.5) / g_quantiles
        median = lambda parts: torch.nanmedian(torch.cat(parts), dim=0).values
        beta = torch.cat(self.beta).mean(0)
        rank, top, write_share, read = (median(x) for x in (self.effective_rank, self.top_share, self.write_share, self.read_rms))
        return [
            HeadCensus(layer=layer, head=h, alpha=tuple(alpha[:, h].tolist()), half_life=tuple(half_life[:, h].tolist()),
                       mean_beta=beta[h].item(), effective_rank=rank[h].item(), top_share=top[h].item(),
                       write_share=write_share[h].item(), read_rms_over_sqrt_eps=read[h].item())
            for h in range(g.shape[1])
        ]


def _tokens(half_life: float) -> str:
    return "∞" if math.isinf(half_life) else f"{half_life:.3g}" if half_life < 1000 else f"{half_life:.0f}"


def _finite(value):
    """JSON has no infinity: an infinite half-life (α = 1) is written as a very large number."""
    if isinstance(value, float) and math.isinf(value):
        return math.copysign(1e308, value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _infinite(value):
    return math.copysign(math.inf, value) if isinstance(value, float) and abs(value) >= 1e308 else value
