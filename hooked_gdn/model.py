"""`HookedGatedDeltaNet`: a TransformerLens-style language model whose layers keep a matrix memory (the Gated
DeltaNet hybrids Qwen3.5, Qwen3.5-MoE, Qwen3-Next, OLMo-Hybrid, Mamba-2 and RWKV-7), with the memory's state and
write as hook points."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformer_lens import HookedRootModule
from transformer_lens.utilities import Slice, SliceInput
from transformers.generation.logits_process import LogitsProcessorList, TopKLogitsWarper, TopPLogitsWarper

from .activation_cache import GDNActivationCache, head_label
from .cache import GDNCache
from .config import HookedModelConfig
from .delta_rule import DEFAULT_CHUNK_SIZE
from .hook_points import CheckedHookPoint, position_axis
from .layers import ForwardContext, rotary_inv_freq
from .memory import MatrixMemory
from .mlp import SparseMoE

RETURN_TYPES = ("logits", "loss", "both", None)
GENERATE_RETURN_TYPES = ("input", "str", "tokens")
RECURRENCES = ("parallel", "sequential")
PADDING_SIDES = ("left", "right")
#: Where strings of different lengths are padded when no ``padding_side`` is given, until
#: ``set_tokenizer(..., default_padding_side=...)`` says otherwise (``cfg.default_padding_side``; the tokenizer's
#: own ``padding_side`` is not read): on the left, so every row's last position is its last token, which is
#: where its final state, a cache and generation continue from (TransformerLens' default is the right).
DEFAULT_PADDING_SIDE = "left"


def _require_tokens(tokens: Tensor) -> None:
    if not tokens.numel():
        raise ValueError(f"the input has no tokens (shape {tuple(tokens.shape)}): give at least one token per sequence")


def _checked_mask(attention_mask: Tensor | None, like: Tensor) -> Tensor | None:
    """``attention_mask`` ([b, p] or [p]) checked against an input ``like`` [b, p] and put on its device as int64."""
    if attention_mask is None:
        return None
    attention_mask = attention_mask[None] if attention_mask.dim() == 1 else attention_mask
    if attention_mask.shape != like.shape:
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, the input {tuple(like.shape)} positions")
    if not ((attention_mask == 0) | (attention_mask == 1)).all():  # other values would scale the GDN input
        odd = attention_mask[(attention_mask != 0) & (attention_mask != 1)].unique()[:5].tolist()
        raise ValueError(f"attention_mask must hold only 0 (padding) and 1 (tokens), got {odd}")
    return attention_mask.to(like.device).long()


#: The most key positions (a cached prefix included) at which a default ``run_with_cache`` still holds
#: ``hook_attn_scores`` and ``hook_pattern``. They are [b, n_heads, p, past + p]: quadratic in the length
#: (at 32k tokens 4 GiB per head and layer in fp32), and hooking them also replaces the fused causal kernel by
#: the materialised scores, so beyond this a default cache would grow as T² while all else it holds grows as T.
#: 2048 keeps TransformerLens' ``cache["pattern", L]`` for the inputs people inspect by eye (16 MiB per
#: head and layer); longer inputs leave both out with a warning saying how to get them (name them).
DEFAULT_CACHE_MAX_PATTERN_LENGTH = 2048
_PATTERN_HOOKS = ("hook_attn_scores", "hook_pattern")


#: the hook points holding a [d_k, d_v] matrix per head and position: ours, and TransformerLens' Mamba-2 names for the
#: state and the write (`hooked_gdn.mamba2`)
STATE_SIZED_HOOKS = ("hook_state", "hook_ssm_state", "hook_ssm_write")


def sampling_warpers(d_vocab: int, temperature: float, top_k: int | None, top_p: float | None) -> LogitsProcessorList:
    """The filters `HookedGatedDeltaNet.generate` samples through, transformers' own top-k then top-p warpers (the
    order transformers applies them in), after checking every sampling argument."""
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"sampling needs temperature > 0, got {temperature!r} (greedy decoding is do_sample=False)")
    if top_k is not None and not (isinstance(top_k, int) and 1 <= top_k <= d_vocab):
        raise ValueError(f"top_k must be an int in [1, d_vocab={d_vocab}] or None, got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be a number in (0, 1] or None, got {top_p!r}")
    return LogitsProcessorList([*([TopKLogitsWarper(top_k)] if top_k is not None else []),
                                *([TopPLogitsWarper(float(top_p))] if top_p is not None else [])])


def _default_cache_filter(name: str) -> bool:
    # Every state at every position is large (18 MiB a token on Qwen3.5-0.8B): it must be asked for.
    return not name.endswith(STATE_SIZED_HOOKS)


def _is_pattern_hook(name: str) -> bool:
    return name.endswith(_PATTERN_HOOKS)


def pattern_left_out_message() -> str:
    """What a default cache of a long input says about its missing attention patterns (one text, so Python's
    warning filter shows it once)."""
    return (f"run_with_cache without names_filter leaves out hook_attn_scores and hook_pattern for inputs longer than "
            f"hooked_gdn.model.DEFAULT_CACHE_MAX_PATTERN_LENGTH = {DEFAULT_CACHE_MAX_PATTERN_LENGTH} positions (a cached "
            f"prefix counted): they are [b, n_heads, T, T] per attention layer. To get them, name them, e.g. "
            f"names_filter=lambda name: name.endswith('hook_pattern') or <the other hooks you want>")


#: TransformerLens' per-layer weights that ``model.W_Q`` etc. stack over every layer: the attention's (no family here
#: has attention in every layer, so each is refused, naming where the layers' own are) and the MLP's
#: (`HookedGatedDeltaNet._stacked_weight`)
STACKED_ATTENTION_WEIGHTS = ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O", "QK", "OV")
STACKED_WEIGHTS = (*STACKED_ATTENTION_WEIGHTS, "W_gate", "W_in", "W_out", "b_in", "b_out")
#: TransformerLens' from_pretrained weight processing, which these models never do: taken as False, refused as True
WEIGHT_PROCESSING = ("fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases",
                     "refactor_factored_attn_matrices")


def _refuse_weight_processing(flags: dict[str, bool]) -> None:
    unknown = sorted(set(flags) - set(WEIGHT_PROCESSING))
    if unknown:
        raise TypeError(f"from_pretrained got unexpected keyword arguments {unknown}")
    asked = sorted(name for name, value in flags.items() if value)
    if asked:
        raise ValueError(f"{', '.join(f'{name}=True' for name in asked)}: these models' weights are used as the checkpoint "
                         "has them (no norm folding, centring or refactoring); leave them out or pass False")


class HookedGatedDeltaNet(HookedRootModule):
    """A matrix-memory language model's text model, re-implemented with hook points: one class for every
    family of `hooked_gdn.architectures` (Qwen3.5, Qwen3.5-MoE, Qwen3-Next, OLMo-Hybrid, Mamba-2, RWKV-7).
    The family's registry entry builds the blocks and the final norm from the config; everything else
    (tokens, forward, caching, prefill, generation) is this class's, the same for all.

    Strings are tokenized as TransformerLens tokenizes them: ``forward``, ``to_tokens``, ``to_str_tokens``
    and ``generate`` (and ``run_with_cache`` / ``run_with_hooks``, which pass them on) take ``prepend_bos``
    (None: ``cfg.default_prepend_bos``, which is whether the tokenizer adds a BOS itself, so by default a
    string gets the tokenizer's own special tokens; True puts the tokenizer's BOS first, or its EOS where it
    has no BOS, as TransformerLens does) and ``padding_side`` ("left" or "right"; None: left,
    `DEFAULT_PADDING_SIDE`), and a string input's padding is masked in ``forward`` whichever its side. Token
    tensors are taken as given: pass their ``attention_mask``. ``cfg`` has what TransformerLens' tools read
    (``device``, ``n_ctx``, ``n_params``, ``n_heads``, …; see `hooked_gdn.config.HookedModelConfig`), so
    ``transformer_lens.utilities.test_prompt`` and ``transformer_lens.patching``'s per-layer patching run on
    every family (but a Mamba-2 block has no MLP, so no ``hook_mlp_out`` to patch).

    Forward keywords beyond TransformerLens':

    - ``state_positions``: positions (int, sequence or tensor; negative counts from the end) at
      which ``hook_state`` fires, as [b, P, H_v, d_k, d_v]. Default: all positions, but only when
      something hooks ``hook_state``; otherwise states are never formed.
    - ``recurrence``: "parallel" (chunked, edits carried exactly) or "sequential" (one position at
      a time; write and state hooks fire per position, so in-the-loop edits see their own past).
    - ``cache``: a `GDNCache` to continue from (see ``prefill``); it is updated in place.

    Hooks on ``hook_write_key`` / ``hook_write_value`` / ``hook_state`` that return changed rows
    (or change them in place) edit the recurrence, and the edit carries through every later
    position (docs/design.md §8); an edit of ``hook_final_state`` is what a cache continues from. These
    hooks find the sequence positions of their tensor's dim 1 with ``hooked_gdn.sites.hook_positions``
    (counting a cached prefix), so one hook function works in parallel mode, sequential mode and
    generation. The recurrence and its hook points run in fp32 whatever the model dtype.

    Weights in TransformerLens' names and orientation: ``W_E`` [d_vocab, d_model], ``W_U``
    [d_model, d_vocab] (logits = ln_final(resid) @ W_U; W_Eᵀ when tied), and per block the
    attention's and MLP's (see `hooked_gdn.layers`).
    """

    #: the families (keys of `hooked_gdn.architectures.BY_KEY`) this class builds; None: every one
    FAMILIES: tuple[str, ...] | None = None

    def __init__(self, cfg: HookedModelConfig, tokenizer=None):
        super().__init__()
        family = self.family_of(cfg)
        self.cfg = cfg
        cfg.default_padding_side = DEFAULT_PADDING_SIDE
        self.tokenizer = tokenizer
        self._forwards = 0  # forwards run: what tells `get_caching_hooks` a firing of the same forward from a new one
        self.W_E = nn.Parameter(torch.empty(cfg.d_vocab, cfg.d_model))
        cfg.device = self.W_E.device
        self.hook_embed = CheckedHookPoint()  # [b, p, d_model]
        # a norm of the embeddings (RWKV-7's), applied before hook_embed: the residual stream starts after it
        self.ln_embed = family.embedding_norm(cfg) if family.embedding_norm is not None else None
        # the pad token's row, which takes no gradient where the reference's embedding says so (its padding_idx)
        pads = family.embedding_pad_row_frozen and cfg.pad_token_id is not None and 0 <= cfg.pad_token_id < cfg.d_vocab
        self.embedding_padding_idx = cfg.pad_token_id if pads else None
        self.blocks = nn.ModuleList(family.block(cfg, i) for i in range(cfg.n_layers))
        self.ln_final = family.final_norm(cfg)
        # [d_vocab, d_model] as transformers stores it, so F.linear computes what transformers computes
        self.lm_head = None if cfg.tie_word_embeddings else nn.Parameter(torch.empty(cfg.d_vocab, cfg.d_model))
        self.register_buffer("rotary_inv_freq", rotary_inv_freq(cfg.rotary_dim, cfg.rotary_base), persistent=False)
        cfg.n_params = sum(p.numel() for name, p in self.named_parameters() if name not in ("W_E", "lm_head"))
        for block in self.blocks:
            # every block's output is the one residual stream that ln_final reads (no stack of streams), which
            # TransformerLens 4's logit lens asks each block before reading hook_resid_post through ln_final
            block.hook_out_is_single_residual_stream = True
        self.setup()

    @property
    def tokenizer(self):
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, tokenizer) -> None:
        self._tokenizer = tokenizer
        # whether the tokenizer puts a BOS first by itself, as TransformerLens detects it (on "a"); by default
        # strings keep the tokenizer's own special tokens, so prepend_bos=None means the same
        bos = None if tokenizer is None else tokenizer.bos_token_id
        prepends = bos is not None and tokenizer("a")["input_ids"][:1] == [bos]
        self.cfg.tokenizer_prepends_bos = self.cfg.default_prepend_bos = prepends

    def set_tokenizer(self, tokenizer, default_padding_side: str | None = None) -> None:
        """TransformerLens' ``set_tokenizer``: use ``tokenizer`` from now on (``prepend_bos=None`` then means what it
        does itself), and pad strings on ``default_padding_side`` when no ``padding_side`` is given (None: as
        before; `DEFAULT_PADDING_SIDE` at first). A cache, ``prefill`` and ``generate`` refuse rows that end in
        padding, which right padding gives strings of different lengths."""
        if default_padding_side is not None and default_padding_side not in PADDING_SIDES:
            raise ValueError(f"default_padding_side must be one of {PADDING_SIDES} or None, got {default_padding_side!r}")
        self.tokenizer = tokenizer
        if default_padding_side is not None:
            self.cfg.default_padding_side = default_padding_side

    def input_to_embed(self, input, prepend_bos: bool | None = None, padding_side: str | None = None,
                       attention_mask: Tensor | None = None, past_kv_cache=None):
        """TransformerLens' ``input_to_embed``: (the residual stream entering block 0 [b, p, d_model], the tokens,
        None for the positional embedding these models do not have, the attention mask or None where nothing is
        padded), for ``model(residual, start_at_layer=0, tokens=tokens, attention_mask=mask)``. A cache is
        continued by ``model(tokens, cache=cache)``, not here."""
        if past_kv_cache is not None:
            raise ValueError("input_to_embed does not take a cache here: continue one with model(tokens, cache=cache) "
                             "(the embedding does not depend on the position)")
        tokens, mask = self._tokens_and_mask(input, attention_mask, prepend_bos, padding_side)
        return self(tokens, attention_mask=mask, stop_at_layer=0), tokens, None, mask

    def _apply(self, fn, recurse=True):
        # .to, .cuda, .cpu and the dtype casts move the weights through here: cfg.device follows the embedding
        moved = super()._apply(fn, recurse)
        self.cfg.device = self.W_E.device
        return moved

    @classmethod
    def family_of(cls, cfg: HookedModelConfig):
        """The registry entry (`hooked_gdn.architectures.Architecture`) that builds ``cfg``'s model; a config of
        a family this class does not build is refused, naming the class that does."""
        from .architectures import BY_KEY

        if cfg.architecture not in BY_KEY:
            raise ValueError(f"unknown architecture {cfg.architecture!r}; the families are {sorted(BY_KEY)}")
        family = BY_KEY[cfg.architecture]
        if cls.FAMILIES is not None and family.key not in cls.FAMILIES:
            raise ValueError(f"{cls.__name__} builds {', '.join(BY_KEY[k].name for k in cls.FAMILIES)} models; this is a "
                             f"{family.name} config ({family.key}): use HookedGatedDeltaNet, which builds every family")
        return family

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_config(cls, hf_config, device=None, dtype=None, tokenizer=None) -> "HookedGatedDeltaNet":
        """A randomly initialised model (the family's initialisation) for a transformers config of any supported family."""
        model = cls(HookedModelConfig.from_hf_config(hf_config), tokenizer)
        model.init_weights()
        model.cfg.dtype = dtype or torch.float32
        return model.to(device=device, dtype=model.cfg.dtype)

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | Path, device=None, dtype=None, device_map=None, max_memory=None,
        **weight_processing: bool,
    ) -> "HookedGatedDeltaNet":
        """Load a checkpoint of any supported family: a shipped short name (``gdn-austen``), a local folder or a hub id.

        The model is built on the meta device and the weights streamed in one tensor at a time, so
        loading needs about the weights' size in memory, not twice it. ``device_map``:
        ``{block_index: device}`` or ``"auto"`` (within ``max_memory``, accelerate's form) spreads
        the blocks over several devices (`hooked_gdn.placement`); otherwise all goes on ``device``.
        The model comes in eval mode, as transformers' ``from_pretrained`` gives it.

        The weights are the checkpoint's, unprocessed: TransformerLens' ``fold_ln``, ``center_writing_weights``,
        ``center_unembed``, ``fold_value_biases`` and ``refactor_factored_attn_matrices`` are taken as False (its
        ``from_pretrained_no_processing``) and refused as True (`WEIGHT_PROCESSING`).
        """
        from .loading import load_pretrained

        _refuse_weight_processing(weight_processing)
        model = load_pretrained(cls, name_or_path, device=device, dtype=dtype, device_map=device_map, max_memory=max_memory)
        model.cfg.device = model.W_E.device  # the weights were streamed onto their devices, not moved by .to
        return model

    @classmethod
    def from_pretrained_no_processing(cls, name_or_path: str | Path, device=None, dtype=None, **kwargs) -> "HookedGatedDeltaNet":
        """TransformerLens' name for loading the checkpoint's weights as they are: ``from_pretrained`` (which never
        processes them)."""
        return cls.from_pretrained(name_or_path, device=device, dtype=dtype, **kwargs)

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """The family's initialisation (as transformers initialises it), matrices normal(0, std)."""
        self.family_of(self.cfg).init_weights(self, std)

    @property
    def W_U(self) -> Float[Tensor, "d_model d_vocab"]:
        """The unembedding: logits = ln_final(resid) @ W_U (W_Eᵀ when the embeddings are tied)."""
        return (self.W_E if self.lm_head is None else self.lm_head).T

    @property
    def b_U(self) -> Float[Tensor, " d_vocab"]:
        """TransformerLens' unembedding bias: zeros, as these models have none (logits = ln_final(resid) @ W_U + b_U)."""
        return torch.zeros(self.cfg.d_vocab, dtype=self.W_E.dtype, device=self.W_U.device)

    def accumulated_bias(self, layer: int, mlp_input: bool = False, include_mlp_biases: bool = True) -> Float[Tensor, " d_model"]:
        """TransformerLens' accumulated bias: the sum of the biases that the blocks before ``layer`` (and its mixer,
        with ``mlp_input``) add to the residual stream themselves, the residual share ``get_full_resid_decomposition``
        labels "bias". Of these families only Mamba-2's ``W_o`` has one (``b_o``, with ``use_bias``); no MLP has a
        bias, so ``include_mlp_biases`` changes nothing here."""
        mixers = [self.mixer(i) for i in range(layer + (1 if mlp_input else 0))]
        total = torch.zeros(self.cfg.d_model, dtype=self.W_E.dtype, device=self.W_E.device)
        return sum((mixer.b_o.to(total.device) for mixer in mixers if getattr(mixer, "b_o", None) is not None), total)

    def mixer(self, layer: int) -> nn.Module:
        """Block ``layer``'s mixer: its memory (``linear_attn``) or its attention (``attn``)."""
        block = self.blocks[layer]
        return block.linear_attn if block.is_gdn else block.attn

    def all_head_labels(self) -> list[str]:
        """TransformerLens' labels of every head, ``L{layer}H{head}`` (`head_label`), in the order
        ``cache.stack_head_results`` stacks them: a memory layer's value heads, an attention layer's query heads."""
        return [head_label(layer, h) for layer in range(self.cfg.n_layers) for h in range(self.mixer(layer).W_O.shape[0])]

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name not in STACKED_WEIGHTS:
                raise
        return self._stacked_weight(name)

    def _stacked_weight(self, name: str) -> Tensor:
        """TransformerLens' weight ``name`` of every layer stacked, [n_layers, ...] (`STACKED_WEIGHTS`), or an
        AttributeError saying why this model has none and where the layers' own are."""
        refused = f"{type(self).__name__} has no model.{name}: TransformerLens stacks it over every layer, and "
        if name in STACKED_ATTENTION_WEIGHTS:
            memory = [i for i, block in enumerate(self.blocks) if block.is_gdn]
            attention = [i for i in range(self.cfg.n_layers) if i not in memory]
            if not attention:
                where = "it has no attention layer"
            elif hasattr(self.blocks[attention[0]].attn, name):
                where = f"its attention layers' are model.blocks[L].attn.{name}, L in {attention}"
            else:
                where = f"its attention layers ({attention}) have none either"
            raise AttributeError(f"{refused}layers {memory} are memory layers ({where}; a memory layer's output weight is "
                                 "model.blocks[L].linear_attn.W_O)")
        mlps = [getattr(block, "mlp", None) for block in self.blocks]
        without = [i for i, mlp in enumerate(mlps) if mlp is None]
        experts = [i for i, mlp in enumerate(mlps) if isinstance(mlp, SparseMoE)]
        if without or experts:
            reasons = ([f"layers {without} have no MLP"] if without else []) + (
                [f"layers {experts} are mixtures of experts, whose weights are per expert (model.blocks[L].mlp."
                 f"{name if name.startswith('W_') else 'W_in'} [n_experts, ...])"] if experts else [])
            raise AttributeError(refused + " and ".join(reasons))
        if name in ("b_in", "b_out"):  # no MLP here has a bias: zeros, as b_U
            return torch.zeros(len(mlps), mlps[0].W_in.shape[-1] if name == "b_in" else self.cfg.d_model,
                               dtype=self.W_E.dtype, device=self.W_E.device)
        if not hasattr(mlps[0], name):
            raise AttributeError(f"{refused}its MLPs ({type(mlps[0]).__name__}) have no {name}")
        return torch.stack([getattr(mlp, name).to(self.W_E.device) for mlp in mlps])

    def unembed(self, normalized_resid: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_vocab"]:
        """The logits of a residual stream already through ``ln_final``, as TransformerLens' ``model.unembed``:
        what ``forward`` computes last, and what TransformerLens' logit lens reads intermediate layers through."""
        return F.linear(normalized_resid, self.W_U.T)

    def tokens_to_residual_directions(
        self, tokens: str | int | Int[Tensor, "..."]
    ) -> Float[Tensor, "... d_model"]:
        """The residual-stream direction of each token's logit, after ln_final's scale: (1 + w) ⊙ W_U[:, token]
        (w ⊙ W_U[:, token] where the norms are not zero-centred).

        The final norm's weight is folded in, as TransformerLens folds it into W_U, so that
        ``cache.logit_attrs`` of a stack from ``apply_ln_to_stack(..., layer=-1)`` sums to the logits.
        """
        if isinstance(tokens, str):
            tokens = self.to_single_token(tokens)
        tokens = torch.as_tensor(tokens, device=self.W_E.device)
        return self.ln_final.weight * self.W_U.T[tokens]

    # ------------------------------------------------------------------ tokens

    def _require_tokenizer(self):
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer: pass token tensors, or load a folder that has tokenizer files")
        return self.tokenizer

    def to_tokens(
        self, input: str | list[str], prepend_bos: bool | None = None, padding_side: str | None = None,
        move_to_device: bool = True, truncate: bool = True,
    ) -> Int[Tensor, "batch pos"]:
        """Token ids [b, p], padded with the pad token on ``padding_side`` (None: left) when the strings differ
        in length. ``prepend_bos`` (None: ``cfg.default_prepend_bos``): True puts the tokenizer's BOS first, or
        its EOS where it has no BOS (as TransformerLens, which makes the EOS the BOS of such a tokenizer);
        False leaves it out, also where the tokenizer puts one first by itself. As in TransformerLens,
        ``move_to_device`` puts the ids on ``cfg.device`` (False: they stay on the CPU, where the tokenizer
        made them) and ``truncate`` keeps at most ``cfg.n_ctx`` tokens of each string (a BOS counted, on the
        tokenizer's ``truncation_side``), which changes nothing while ``n_ctx`` is unlimited, as it is here."""
        return self._tokenize(input, prepend_bos, padding_side, move_to_device, truncate)[0]

    def _tokenize(self, input: str | list[str], prepend_bos: bool | None = None, padding_side: str | None = None,
                  move_to_device: bool = True, truncate: bool = True) -> tuple[Tensor, Tensor]:
        """Token ids and their attention mask, both [b, p]: the mask is the tokenizer's (1 at each string's
        tokens, a prepended BOS included), whichever id the padding has."""
        tok = self._require_tokenizer()
        prepend_bos = self.cfg.default_prepend_bos if prepend_bos is None else prepend_bos
        padding_side = self.cfg.default_padding_side if padding_side is None else padding_side
        if padding_side not in PADDING_SIDES:
            raise ValueError(f"padding_side must be one of {PADDING_SIDES} or None, got {padding_side!r}")
        rows = tok([input] if isinstance(input, str) else list(input))["input_ids"]
        if prepend_bos and not self.cfg.tokenizer_prepends_bos:
            bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
            if bos is None:
                raise ValueError("prepend_bos=True needs a BOS token, or an EOS token to stand for it; the tokenizer has "
                                 "neither")
            rows = [[bos, *row] for row in rows]
        if truncate:  # before a BOS of the tokenizer's own is dropped, as TransformerLens truncates
            rows = [self._truncated(row, tok) for row in rows]
        if not prepend_bos and self.cfg.tokenizer_prepends_bos:
            rows = [row[1:] if row[:1] == [tok.bos_token_id] else row for row in rows]
        enc = tok.pad({"input_ids": rows}, padding=True, padding_side=padding_side, return_tensors="pt")
        if not move_to_device:
            return enc["input_ids"], enc["attention_mask"]
        device = self.W_E.device
        return enc["input_ids"].to(device), enc["attention_mask"].to(device)

    def _truncated(self, row: list[int], tok) -> list[int]:
        """``row`` cut to ``cfg.n_ctx`` tokens on the tokenizer's ``truncation_side`` (as its ``truncation=True``
        would cut it)."""
        n_ctx = self.cfg.n_ctx
        if isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or n_ctx < 1:
            raise ValueError(f"cfg.n_ctx must be an int >= 1 to truncate to, got {n_ctx!r}")
        if len(row) <= n_ctx:
            return row
        return row[-n_ctx:] if getattr(tok, "truncation_side", "right") == "left" else row[:n_ctx]

    def to_string(self, tokens: Tensor | Sequence[int]) -> str | list[str]:
        tok = self._require_tokenizer()
        tokens = torch.as_tensor(tokens)
        if tokens.dim() == 2:
            return [tok.decode(row) for row in tokens.tolist()]
        return tok.decode(tokens.tolist())

    def to_str_tokens(
        self, input: str | Tensor | Sequence[int], prepend_bos: bool | None = None, padding_side: str | None = None
    ) -> list[str]:
        """Each token of one sequence as text; a string is tokenized as ``to_tokens`` tokenizes it."""
        tok = self._require_tokenizer()
        ids = self.to_tokens(input, prepend_bos, padding_side)[0] if isinstance(input, str) else torch.as_tensor(input)
        if ids.dim() != 1:
            raise ValueError(f"to_str_tokens takes one sequence, got a tensor of shape {tuple(ids.shape)}")
        return [tok.decode([i]) for i in ids.tolist()]

    def to_single_token(self, string: str) -> int:
        """The id of a string that is exactly one token."""
        ids = self._require_tokenizer()(string, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(f"{string!r} is {len(ids)} tokens, not one: {[self.tokenizer.decode([i]) for i in ids]}")
        return ids[0]

    def to_single_str_token(self, int_token: int) -> str:
        """The text of one token id (TransformerLens')."""
        if isinstance(int_token, bool) or not isinstance(int_token, int):
            raise TypeError(f"to_single_str_token takes one token id (an int), got {type(int_token).__name__}")
        return self.to_str_tokens(torch.tensor([int_token]))[0]

    def get_token_position(self, single_token: str | int | Tensor, input: str | Tensor, mode: str = "first",
                           prepend_bos: bool | None = None, padding_side: str | None = None) -> int:
        """The position of ``single_token`` (a one-token string or an id) in ``input`` (a string, tokenized as
        ``to_tokens`` tokenizes it, or the tokens of one sequence): its first occurrence, or its last with
        ``mode="last"``, as TransformerLens' ``get_token_position``."""
        if mode not in ("first", "last"):
            raise ValueError(f"mode must be 'first' or 'last', got {mode!r}")
        tokens = self.to_tokens(input, prepend_bos, padding_side) if isinstance(input, str) else torch.as_tensor(input)
        if tokens.dim() == 2 and len(tokens) == 1:
            tokens = tokens[0]
        if tokens.dim() != 1:
            raise ValueError(f"get_token_position takes one sequence, got tokens of shape {tuple(tokens.shape)}")
        token = self.to_single_token(single_token) if isinstance(single_token, str) else int(single_token)
        found = (tokens == token).nonzero().flatten()
        if not len(found):
            raise ValueError(f"token {token} ({self.to_single_str_token(token)!r}) does not occur in the input")
        return int(found[0] if mode == "first" else found[-1])

    def _tokens_and_mask(
        self, input, attention_mask: Tensor | None, prepend_bos: bool | None = None, padding_side: str | None = None
    ) -> tuple[Tensor, Tensor | None]:
        if isinstance(input, (str, list)) and (isinstance(input, str) or all(isinstance(s, str) for s in input)):
            if attention_mask is not None:
                raise ValueError("attention_mask goes with token input; strings are padded and masked for you")
            tokens, mask = self._tokenize(input, prepend_bos, padding_side)
            _require_tokens(tokens)
            return tokens, (None if bool(mask.all()) else mask)
        if not isinstance(input, Tensor):
            raise TypeError(f"input must be a string, a list of strings or a token tensor, got {type(input).__name__}")
        if input.dtype.is_floating_point or input.dtype.is_complex or input.dtype == torch.bool:
            raise TypeError(f"token input must be an integer tensor, got dtype {input.dtype}")
        tokens = input[None] if input.dim() == 1 else input
        if tokens.dim() != 2:
            raise ValueError(f"token input must have shape [batch, pos] or [pos], got {tuple(input.shape)}")
        _require_tokens(tokens)
        if int(tokens.min()) < 0 or int(tokens.max()) >= self.cfg.d_vocab:
            raise ValueError(f"token ids must lie in [0, {self.cfg.d_vocab}), got {int(tokens.min())}..{int(tokens.max())}")
        # any integer dtype is accepted; indexing needs int64 (a uint8 index would act as a mask)
        return tokens.to(self.W_E.device, torch.long), _checked_mask(attention_mask, tokens)

    def can_start_at(self, layer: int) -> bool:
        """Whether ``forward(resid, start_at_layer=layer)`` computes what the full forward computes from block
        ``layer`` on: at layer 0 always; later only where no layer reads what layer 0 computes besides the
        residual stream (RWKV-7's layers do: `Architecture.later_layers_read_layer_0`)."""
        return layer == 0 or not self.family_of(self.cfg).later_layers_read_layer_0

    def _residual_input(self, input, start_at_layer, tokens: Tensor | None, attention_mask: Tensor | None,
                        cache: GDNCache | None) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """The residual stream ``input`` that block ``start_at_layer`` reads, its tokens and mask, checked."""
        n = self.cfg.n_layers
        if isinstance(start_at_layer, bool) or not isinstance(start_at_layer, int) or not 0 <= start_at_layer <= n:
            raise ValueError(f"start_at_layer must be an int in [0, {n}], got {start_at_layer!r}")
        if not self.can_start_at(start_at_layer):
            raise ValueError(f"{self.family_of(self.cfg).name}'s layers after the first read what layer 0 computes besides "
                             f"the residual stream (RWKV-7: its value, v_first), which a forward starting at layer "
                             f"{start_at_layer} does not compute: start at layer 0")
        if not (isinstance(input, Tensor) and input.is_floating_point() and input.dim() == 3
                and input.shape[-1] == self.cfg.d_model):
            got = tuple(input.shape) if isinstance(input, Tensor) else type(input).__name__
            raise ValueError(f"with start_at_layer the input is the residual stream [batch, pos, d_model="
                             f"{self.cfg.d_model}] entering that block (a float tensor), got {got}")
        _require_tokens(input[..., 0])
        if tokens is not None:
            tokens, attention_mask = self._tokens_and_mask(tokens, attention_mask)
            if tokens.shape != input.shape[:2]:
                raise ValueError(f"tokens have shape {tuple(tokens.shape)}, the residual stream {tuple(input.shape[:2])} "
                                 "positions")
        else:
            attention_mask = _checked_mask(attention_mask, input[..., 0])
        return input, tokens, attention_mask

    def _state_positions(self, state_positions, p: int) -> Tensor | None:
        """The positions as an increasing int64 tensor. ``cache[site][:, i]`` is the i-th position
        given, so anything that would have to be reordered, deduplicated, rounded or read as a mask
        is refused rather than reinterpreted."""
        if state_positions is None:
            return None
        positions = torch.as_tensor(state_positions)
        if positions.numel() == 0 and not positions.dtype.is_complex and positions.dtype != torch.bool:
            positions = positions.long()  # [] reads as float32: no positions is no dtype question
        if positions.dtype == torch.bool or positions.dtype.is_floating_point or positions.dtype.is_complex:
            raise TypeError(f"state_positions must be integer positions, got dtype {positions.dtype} "
                            f"(for a boolean mask pass mask.nonzero().flatten())")
        if positions.dim() > 1:
            raise ValueError(f"state_positions must be an int or a 1-D sequence, got shape {tuple(positions.shape)}")
        given = positions.flatten().long()
        positions = torch.where(given < 0, given + p, given)
        if positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= p):
            raise ValueError(f"state_positions {given.tolist()} out of range for an input of {p} positions")
        if len(positions.unique()) != len(positions):
            raise ValueError(f"state_positions {given.tolist()} repeat a position (as {positions.tolist()} of {p})")
        if bool((positions[1:] < positions[:-1]).any()):
            raise ValueError(f"state_positions {given.tolist()} must be increasing (as {positions.tolist()} of {p}, "
                             f"negative ones counting from the end): hook_state fires in sequence order")
        return positions.to(self.W_E.device)

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        input: str | list[str] | Int[Tensor, "batch pos"] | Int[Tensor, " pos"],
        return_type: str | None = "logits",
        attention_mask: Int[Tensor, "batch pos"] | None = None,
        *,
        loss_per_token: bool = False,
        cache: GDNCache | None = None,
        state_positions: int | Sequence[int] | Int[Tensor, " P"] | None = None,
        recurrence: str = "parallel",
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        stop_at_layer: int | None = None,
        start_at_layer: int | None = None,
        tokens: Int[Tensor, "batch pos"] | None = None,
        prepend_bos: bool | None = None,
        padding_side: str | None = None,
    ) -> Float[Tensor, "batch pos d_vocab"] | Float[Tensor, "*loss"] | tuple[Tensor, Tensor] | None:
        """Logits [b, p, d_vocab], the mean next-token loss (or [b, p − 1] with ``loss_per_token``), both, or None.

        ``stop_at_layer=i`` runs only the embedding and blocks 0 … i − 1 and returns the residual
        stream there (as in TransformerLens): what reading one layer's activations needs. ``start_at_layer=i``
        takes ``input`` as the residual stream [b, p, d_model] entering block i and runs blocks i, …; ``tokens``
        (needed only for a loss) and ``attention_mask`` are then the input's. Each memory starts empty at the
        input's first position (or continues a ``cache``) either way, so blocks i, … compute what they compute in a
        full forward whose residual stream reaches block i as ``input``. A cache continued so holds blocks before i
        as they were, and continues only from i on after it.
        ``prepend_bos`` and ``padding_side`` tokenize string input as ``to_tokens`` does (token input
        ignores them, as TransformerLens does). Padding writes nothing to the memories, so each row's
        logits at its tokens are its own on either side; but on the right a row's last positions are
        padding, through which its state still decays, so its ``hook_final_state`` is not its last
        token's, and a ``cache`` (``prefill``, ``generate``) refuses such rows.
        """
        self._forwards += 1
        if return_type not in RETURN_TYPES:
            raise ValueError(f"return_type must be one of {RETURN_TYPES}, got {return_type!r}")
        if recurrence not in RECURRENCES:
            raise ValueError(f"recurrence must be one of {RECURRENCES}, got {recurrence!r}")
        if start_at_layer is None:
            if tokens is not None:
                raise ValueError("tokens= goes with start_at_layer (the input then being the residual stream); "
                                 "without it the input is the tokens")
            tokens, mask = self._tokens_and_mask(input, attention_mask, prepend_bos, padding_side)
            x = None
        else:
            x, tokens, mask = self._residual_input(input, start_at_layer, tokens, attention_mask, cache)
        if cache is not None and cache.skipped_blocks_before > (start_at_layer or 0):
            raise ValueError(f"this cache's blocks before {cache.skipped_blocks_before} were left behind by a forward that "
                             f"started there (start_at_layer): it continues only with start_at_layer >= "
                             f"{cache.skipped_blocks_before}")
        if cache is not None and start_at_layer:
            cache.skipped_blocks_before = start_at_layer
        if cache is not None and mask is not None and not bool(mask[:, -1].all()):
            raise ValueError("a cache continues each row from its last position, and some rows end in padding (right "
                             "padding): pad on the left (padding_side='left', the default)")
        b, p = (tokens if x is None else x).shape[:2]
        device = (tokens if x is None else x).device
        full_mask = mask
        past_length = cache.length if cache is not None else 0
        if cache is not None:
            full_mask = cache.extend_mask(mask if mask is not None else torch.ones(b, p, dtype=torch.long, device=device))
        if full_mask is None:
            position_ids = torch.arange(p, device=device).expand(b, p)
        else:
            position_ids = (full_mask.cumsum(-1) - 1).clamp(min=0)[:, -p:]
        ctx = ForwardContext(
            attention_mask=None if full_mask is None or bool(full_mask.all()) else full_mask,
            position_ids=position_ids,
            cache=cache,
            state_positions=self._state_positions(state_positions, p),
            sequential=recurrence == "sequential",
            past_length=past_length,
            chunk_size=chunk_size,
        )
        if x is None:
            x = F.embedding(tokens, self.W_E, self.embedding_padding_idx)
            x = self.hook_embed(x if self.ln_embed is None else self.ln_embed(x))
        angles = position_ids[..., None].float() * self.rotary_inv_freq
        angles = torch.cat([angles, angles], -1)
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        for block in self.blocks[start_at_layer:stop_at_layer]:
            x = block(x, ctx, cos, sin)
        if stop_at_layer is not None:
            return x
        logits = self.unembed(self.ln_final(x))
        if return_type == "logits":
            return logits
        if return_type is None:
            return None
        if tokens is None:
            raise ValueError(f"return_type={return_type!r} from start_at_layer needs the input's tokens: pass tokens=")
        loss = self.loss_fn(logits, tokens, mask, per_token=loss_per_token)
        return loss if return_type == "loss" else (logits, loss)

    @staticmethod
    def loss_fn(
        logits: Float[Tensor, "batch pos d_vocab"], tokens: Int[Tensor, "batch pos"],
        attention_mask: Int[Tensor, "batch pos"] | None = None, per_token: bool = False,
    ) -> Float[Tensor, ""] | Float[Tensor, "batch pos-1"]:
        """Next-token cross-entropy; positions whose input or target is padding are left out."""
        if tokens.shape[-1] < 2:
            raise ValueError(f"the loss needs at least 2 positions (a next token to predict), got {tokens.shape[-1]}")
        losses = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), tokens[:, 1:], reduction="none")
        if per_token:
            return losses
        if attention_mask is None:
            return losses.mean()
        keep = (attention_mask[:, :-1] * attention_mask[:, 1:]).to(losses.dtype)
        if not keep.any():
            raise ValueError("the loss has no position whose token and next token are both unmasked")
        return (losses * keep).sum() / keep.sum()

    # ------------------------------------------------------------------ caching activations

    def run_with_cache(
        self,
        *model_args,
        names_filter: str | list[str] | Callable[[str], bool] | None = None,
        device=None,
        remove_batch_dim: bool = False,
        incl_bwd: bool = False,
        pos_slice: Slice | SliceInput = None,
        return_cache_object: bool = True,
        **model_kwargs,
    ) -> tuple[object, GDNActivationCache | dict[str, Tensor]]:
        """Run and cache activations, as TransformerLens does, with these differences.

        - With no ``names_filter``, everything except ``hook_state`` is cached: name the states'
          site(s) to get them (and pass ``state_positions`` to keep only some positions). Above
          ``DEFAULT_CACHE_MAX_PATTERN_LENGTH`` positions (a cached prefix counted) ``hook_attn_scores``
          and ``hook_pattern`` (T² per head) are left out too, with a warning: name them to get them.
        - A hook that fires once per position (the write and state hooks in sequential mode) is
          cached as the concatenation of its firings along positions.
        - ``incl_bwd`` (the output must be one number: ``return_type="loss"``) also caches each point's gradient
          as ``name + "_grad"``, as TransformerLens does; the memory's writes have gradients only with
          ``recurrence="sequential"`` (`hooked_gdn.memory.MatrixMemory._carry_edits`): named, they are refused in
          parallel mode with that reason, and left out of a default filter's gradients.
        - ``pos_slice`` (TransformerLens': an int, a list of positions or a slice) keeps those positions of each
          activation, along its ``position_axis`` (after the batch; an attention pattern's query axis); a value with
          none (``hook_final_state``, Mamba-2's padded conv output), or whose axis holds other than one entry per
          position (states at chosen ``state_positions``: a selection already), is kept whole. A firing that holds
          every position is sliced as it is saved, so that the rest is never held; per-position firings
          (sequential mode) are sliced once joined.
        """
        if names_filter is None:
            keep = _default_cache_filter
            length = self._key_length(model_args, model_kwargs)
            if length > DEFAULT_CACHE_MAX_PATTERN_LENGTH and any(_is_pattern_hook(name) for name in self.hook_dict):
                warnings.warn(pattern_left_out_message(), stacklevel=2)
                keep = lambda name: _default_cache_filter(name) and not _is_pattern_hook(name)
        else:
            keep = self._names_kept(names_filter)
        names = [name for name in self.hook_dict if keep(name)]
        if remove_batch_dim and isinstance(model_args[0], Tensor) and model_args[0].dim() == 2 and model_args[0].shape[0] != 1:
            raise ValueError("remove_batch_dim needs a batch of one")
        firings: dict[str, list[Tensor]] = {}
        pos_slice = Slice.unwrap(pos_slice)
        axis_of = lambda name: position_axis(self.hook_dict[name])
        positions = self._key_length(model_args, model_kwargs, count_cache=False) if pos_slice.slice is not None else 0
        sliced_when_saved = set()

        def save(tensor: Tensor, hook, suffix: str = "") -> None:
            tensor = tensor.detach()
            axis = axis_of(hook.name)
            if pos_slice.slice is not None and axis is not None and tensor.shape[axis] == positions:
                tensor = pos_slice.apply(tensor, dim=axis)
                sliced_when_saved.add(hook.name + suffix)
            # contiguous, as TransformerLens' are: many of ours are views (a head split, a transpose) that .view
            # refuses (SAELens' activation store takes .view first); copied as each fires, a view does not keep its
            # whole base alive past its layer
            tensor = tensor.to(device) if device is not None else tensor
            firings.setdefault(hook.name + suffix, []).append(tensor.contiguous())

        bwd_names = []
        if incl_bwd:
            sequential = model_kwargs.get("recurrence") == "sequential"
            writes = set() if sequential or names_filter is not None else set(self._write_hook_names())
            bwd_names = [name for name in names if name not in writes]
        with self.hooks(fwd_hooks=[(name, save) for name in names],
                        bwd_hooks=[(name, partial(save, suffix="_grad")) for name in bwd_names]):
            out = self(*model_args, **model_kwargs)
            if incl_bwd:
                if not isinstance(out, Tensor) or out.numel() != 1:
                    got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                    raise ValueError(f"incl_bwd differentiates the output, which must be one number (return_type='loss'), "
                                     f"got {got}")
                if not out.requires_grad:
                    raise ValueError("incl_bwd differentiates the output, which carries no gradient here: run it outside "
                                     "torch.no_grad() and torch.inference_mode(), with the weights requiring gradients")
                out.backward()
        for name in bwd_names:  # a backward pass fires per-position hooks last position first
            firings.get(name + "_grad", []).reverse()
        store = {}
        for name, fired in firings.items():
            if len(fired) > 1 and name in sliced_when_saved:
                raise RuntimeError(f"{name} fired {len(fired)} times with every position in one forward, so its "
                                   f"pos_slice cannot be taken firing by firing: run without pos_slice")
            axis = axis_of(name.removesuffix("_grad"))
            store[name] = fired[0] if len(fired) == 1 else torch.cat(fired, axis)
            if pos_slice.slice is not None and axis is not None and name not in sliced_when_saved \
                    and store[name].shape[axis] == positions:
                store[name] = pos_slice.apply(store[name], dim=axis).contiguous()
        if remove_batch_dim:
            store = {k: v[0] for k, v in store.items()}
        if not return_cache_object:
            return out, store
        cache = GDNActivationCache(store, self, has_batch_dim=not remove_batch_dim)
        if self.cfg.use_attn_result:
            cache.compute_head_results(only_cached=True)
        return out, cache

    def set_use_attn_result(self, use_attn_result: bool) -> None:
        """TransformerLens' switch: with it on, ``run_with_cache`` also keeps each head's result, ``cache["result",
        L]``, for every layer whose head inputs it cached (`GDNActivationCache.compute_head_results`; memory layers'
        heads included). The results are formed from the cache, not fired by a hook point: to edit a head's
        result, edit its input (``attn.hook_z``, ``linear_attn.hook_gated_out``)."""
        self.cfg.use_attn_result = bool(use_attn_result)

    def _names_kept(self, names_filter: str | list[str] | Callable[[str], bool] | None) -> Callable[[str], bool]:
        """A ``names_filter`` as a predicate (None: `_default_cache_filter`, every point but the states), the names it
        lists checked."""
        for name in [names_filter] if isinstance(names_filter, str) else names_filter if isinstance(names_filter, list) else []:
            self._check_hook_name(name)
        if names_filter is None:
            return _default_cache_filter
        if isinstance(names_filter, str):
            return lambda name: name == names_filter
        if isinstance(names_filter, list):
            return set(names_filter).__contains__
        return names_filter

    def _caching_hook(self, cache: dict, device=None, remove_batch_dim: bool = False) -> Callable:
        """The hook TransformerLens' caching hooks write ``cache`` with (`get_caching_hooks`, `add_caching_hooks`),
        with what this model's points need: a point that fires again in the same forward (once per position in
        sequential mode) is joined along its ``position_axis``, where TransformerLens' would keep the last firing; a
        new forward replaces it, as there."""
        forward_of = {}

        def save(tensor: Tensor, hook, is_backward: bool = False) -> None:
            name = hook.name + ("_grad" if is_backward else "")
            tensor = (tensor.detach().to(device) if device is not None else tensor.detach()).contiguous()  # as run_with_cache's
            tensor = tensor[0] if remove_batch_dim else tensor
            axis = position_axis(hook)
            if forward_of.get(name) == self._forwards and axis is not None:  # a backward pass fires last position first
                axis -= remove_batch_dim
                tensor = torch.cat([tensor, cache[name]] if is_backward else [cache[name], tensor], axis)
            cache[name], forward_of[name] = tensor, self._forwards

        return save

    def get_caching_hooks(self, names_filter=None, incl_bwd: bool = False, device=None, remove_batch_dim: bool = False,
                          cache: dict | None = None, pos_slice=None) -> tuple[dict, list, list]:
        """TransformerLens' ``get_caching_hooks`` through `_caching_hook`; ``names_filter=None`` leaves the states out,
        as `run_with_cache` does. ``pos_slice`` is refused: the hooks cannot tell here which firings hold every
        position; ``run_with_cache(pos_slice=...)`` takes it."""
        if pos_slice is not None:
            raise NotImplementedError("get_caching_hooks cannot take pos_slice here: run_with_cache(tokens, "
                                      "pos_slice=...) takes it")
        cache = {} if cache is None else cache
        save, keep = self._caching_hook(cache, device, remove_batch_dim), self._names_kept(names_filter)
        names = [name for name in self.hook_dict if keep(name)]
        return cache, [(name, save) for name in names], [(name, partial(save, is_backward=True)) for name in names] if incl_bwd else []

    def add_caching_hooks(self, names_filter=None, incl_bwd: bool = False, device=None, remove_batch_dim: bool = False,
                          cache: dict | None = None) -> dict:
        """TransformerLens' ``add_caching_hooks`` (behind ``cache_all`` and ``cache_some``) through `_caching_hook`;
        ``names_filter=None`` leaves the states out, as `run_with_cache` does."""
        cache, fwd_hooks, bwd_hooks = self.get_caching_hooks(names_filter, incl_bwd, device, remove_batch_dim, cache)
        self.is_caching = True
        for (name, hook), direction in [*((h, "fwd") for h in fwd_hooks), *((h, "bwd") for h in bwd_hooks)]:
            self.hook_dict[name].add_hook(hook, direction)
        return cache

    def _write_hook_names(self) -> list[str]:
        """The hook names, aliases included, of every memory's `write_hooks`."""
        return [name for memory in self.modules() if isinstance(memory, MatrixMemory)
                for point in memory.write_hooks() for name in (hp.name for hp in point.with_aliases())]

    def _key_length(self, model_args: tuple, model_kwargs: dict, count_cache: bool = True) -> int:
        """The number of key positions a forward with these arguments attends over: the input's length plus a
        cached prefix (strings are tokenized once more here, to count them); the input's alone without
        ``count_cache``."""
        input = model_args[0] if model_args else model_kwargs.get("input")
        if isinstance(input, Tensor):
            length = input.shape[1 if model_kwargs.get("start_at_layer") is not None else -1]
        elif (isinstance(input, str) or isinstance(input, list) and all(isinstance(s, str) for s in input)) and self.tokenizer:
            length = self.to_tokens(input, model_kwargs.get("prepend_bos"), model_kwargs.get("padding_side")).shape[-1]
        else:
            length = 0  # forward will refuse it with its own message
        cache = model_kwargs.get("cache")
        return length + (cache.length if cache is not None and count_cache else 0)

    def _check_hook_name(self, name) -> None:
        if isinstance(name, str) and name not in self.hook_dict:
            if name.endswith("hook_result"):
                raise ValueError(f"{name} is not a hook point here: a head's result is formed from the cache "
                                 "(cache['result', L], cache.stack_head_results); to edit it, edit the head's input, "
                                 "attn.hook_z (or linear_attn.hook_gated_out in a memory layer), which W_O maps to it")
            raise ValueError(f"unknown hook name {name!r}; see model.hook_dict for the available ones")

    def add_hook(self, name, hook, *args, **kwargs) -> None:
        self._check_hook_name(name)
        super().add_hook(name, hook, *args, **kwargs)

    def _enable_hook_with_name(self, name, hook, dir) -> None:
        self._check_hook_name(name)
        super()._enable_hook_with_name(name, hook, dir)

    # ------------------------------------------------------------------ caches and generation

    @torch.no_grad()
    def prefill(
        self, input: str | list[str] | Int[Tensor, "batch pos"], attention_mask: Int[Tensor, "batch pos"] | None = None,
        **forward_kwargs,
    ) -> GDNCache:
        """Run a prefix and return the `GDNCache` that ``model(tokens, cache=cache)`` continues from."""
        cache = GDNCache()
        self(input, None, attention_mask, cache=cache, **forward_kwargs)
        return cache

    @torch.no_grad()
    def generate(
        self,
        input: str | list[str] | Int[Tensor, "batch pos"],
        max_new_tokens: int = 10,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        freq_penalty: float = 0.0,
        stop_at_eos: bool = True,
        eos_token_id: int | None = None,
        attention_mask: Int[Tensor, "batch pos"] | None = None,
        prepend_bos: bool | None = None,
        padding_side: str | None = None,
        use_past_kv_cache: bool = True,
        return_type: str = "input",
        verbose: bool = False,
        **forward_kwargs,
    ) -> Int[Tensor, "batch pos_plus_new"] | str | list[str]:
        """Continue the input; hooks fire at every step and their edits apply. TransformerLens' arguments.

        Greedy by default (TransformerLens samples by default); ``do_sample`` samples from the last logits after
        ``temperature``, ``freq_penalty`` (TransformerLens': minus ``freq_penalty`` times each token's count in the
        row so far, padding not counted), ``top_k`` and ``top_p``, in that order (`sampling_warpers`: transformers'
        own filters), so that a seeded run draws the tokens transformers' ``generate`` draws. With
        ``use_past_kv_cache`` (default) each step runs only the new token (p = 1) from the memories' and attention's
        cache; without it each step reruns the whole sequence, and hooks fire on all of it. ``return_type``:
        "input" (tokens for token input, text for string input), "str" (one string for one row, else a list) or
        "tokens". Sequences that reached EOS are continued with EOS. Strings are tokenized as ``to_tokens`` does
        (``prepend_bos``, ``padding_side``); strings of different lengths padded on the right are refused (each row
        continues from its last position). ``verbose`` shows a progress bar over the new tokens (off by default,
        where TransformerLens' is on).
        """
        if return_type not in GENERATE_RETURN_TYPES:
            raise ValueError(f"return_type must be one of {GENERATE_RETURN_TYPES}, got {return_type!r}")
        for out in self._generation(input, max_new_tokens, do_sample, temperature, top_k, top_p, freq_penalty,
                                    stop_at_eos, eos_token_id, attention_mask, prepend_bos, padding_side,
                                    use_past_kv_cache, verbose, **forward_kwargs):
            pass  # to the last step
        if return_type == "tokens" or return_type == "input" and not isinstance(input, (str, list)):
            return out
        if return_type == "input" and isinstance(input, str):
            return self.to_string(out[0])
        rows = [self.tokenizer.decode(row, skip_special_tokens=True) for row in out.tolist()]
        return rows[0] if return_type == "str" and len(rows) == 1 else rows

    @torch.no_grad()
    def generate_stream(self, input: str | list[str] | Int[Tensor, "batch pos"], max_new_tokens: int = 10,
                        max_tokens_per_yield: int = 25, **generate_kwargs) -> Iterator[Int[Tensor, "batch chunk"]]:
        """`generate` (its arguments but ``return_type``), yielding the tokens as they come, as TransformerLens'
        ``generate_stream`` does: the input and the first new tokens once there are ``max_tokens_per_yield`` of them
        together, then each ``max_tokens_per_yield`` new tokens, and the rest at the end; put together they are
        ``generate``'s tokens."""
        if isinstance(max_tokens_per_yield, bool) or not isinstance(max_tokens_per_yield, int) or max_tokens_per_yield < 1:
            raise ValueError(f"max_tokens_per_yield must be an int >= 1, got {max_tokens_per_yield!r}")
        start = 0  # the first position not yet yielded
        for step, out in enumerate(self._generation(input, max_new_tokens, **generate_kwargs)):
            if step and out.shape[1] - start >= max_tokens_per_yield:
                yield out[:, start:]
                start = out.shape[1]
        if step and start < out.shape[1]:
            yield out[:, start:]

    def _generation(self, input, max_new_tokens: int, do_sample: bool = False, temperature: float = 1.0,
                    top_k: int | None = None, top_p: float | None = None, freq_penalty: float = 0.0,
                    stop_at_eos: bool = True, eos_token_id: int | None = None, attention_mask: Tensor | None = None,
                    prepend_bos: bool | None = None, padding_side: str | None = None, use_past_kv_cache: bool = True,
                    verbose: bool = False, **forward_kwargs) -> Iterator[Int[Tensor, "batch pos"]]:
        """`generate`'s steps (its arguments, with its defaults): the input's tokens, then after each new token the
        tokens so far."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        sampling = sampling_warpers(self.cfg.d_vocab, temperature, top_k, top_p) if do_sample else None
        if not (isinstance(freq_penalty, (int, float)) and freq_penalty >= 0):
            raise ValueError(f"freq_penalty must be a number >= 0, got {freq_penalty!r}")
        tokens, mask = self._tokens_and_mask(input, attention_mask, prepend_bos, padding_side)
        eos = eos_token_id if eos_token_id is not None else self.cfg.eos_token_id
        if stop_at_eos and eos is None:
            raise ValueError("stop_at_eos needs an eos_token_id (the config has none)")
        cache = GDNCache() if use_past_kv_cache else None
        logits = self(tokens, "logits", mask, cache=cache, **forward_kwargs)
        finished = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
        out, mask = tokens, torch.ones_like(tokens) if mask is None else mask
        yield out
        progress = tqdm(total=max_new_tokens, disable=not verbose)
        for step in range(max_new_tokens):
            last = logits[:, -1].float()
            if do_sample:
                last = last / temperature
                if freq_penalty:
                    counts = torch.zeros_like(last).scatter_add_(1, out, mask.to(last.dtype))
                    last = last - freq_penalty * counts
                next_token = torch.multinomial(sampling(out, last).softmax(-1), 1)[:, 0]
            else:
                next_token = last.argmax(-1)
            if stop_at_eos:
                next_token = torch.where(finished, torch.full_like(next_token, eos), next_token)
                finished |= next_token == eos
            out, mask = torch.cat([out, next_token[:, None]], 1), torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            progress.update()
            yield out
            if (stop_at_eos and bool(finished.all())) or step == max_new_tokens - 1:
                break
            logits = self(next_token[:, None], "logits", cache=cache, **forward_kwargs) if use_past_kv_cache \
                else self(out, "logits", mask, **forward_kwargs)
        progress.close()
