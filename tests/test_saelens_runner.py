"""SAELens' own training runner on our model, with no shim: ``LanguageModelSAETrainingRunner`` given a tiny
`HookedGatedDeltaNet` as ``override_model`` and an in-memory text dataset (no network) trains a residual-stream
SAE for a few steps, evaluates it and saves it.

What the runner calls on the model: ``to_tokens(row, truncate=False, move_to_device=False, prepend_bos=False)``
(tested in the main environment in tests/test_transformer_lens_tools.py), ``run_with_cache(tokens,
names_filter=[hook], stop_at_layer=L + 1, prepend_bos=False)``, ``W_E.device``, ``tokenizer`` (its
``bos_token_id`` and special tokens), and in its evaluation ``forward(tokens, return_type="both",
loss_per_token=True)`` and ``run_with_hooks`` with a replacement hook. The activations it trains on are checked
against transformers' own hidden states of the same checkpoint.

sae-lens needs transformer-lens<4: these tests run in the TransformerLens 3.x subset of .ci/run and are skipped
where sae-lens is not importable.
"""

from __future__ import annotations

import pytest
import torch

sae_lens = pytest.importorskip("sae_lens", reason="sae-lens is not importable here (it needs transformer-lens<4): "
                                                  "the TransformerLens 3.x subset of .ci/run installs it")
from datasets import Dataset  # noqa: E402  (a dependency of sae-lens)
from sae_lens.training.activation_scaler import ActivationScaler  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from hooked_gdn import HookedGatedDeltaNet  # noqa: E402
from writesae import FlatSAE, load_sae  # noqa: E402
from writesae.splice import HookedSAEGatedDeltaNet  # noqa: E402

from .test_transformer_lens_tools import save_tiny  # noqa: E402

LAYER = 1
HOOK = f"blocks.{LAYER}.hook_resid_post"
CONTEXT, PROMPTS, STEPS = 16, 4, 3  # sequences of 16 tokens, 4 a model batch; 3 training steps of 32 tokens
TEXTS = ["It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
         "want of a wife.", "Emma Woodhouse, handsome, clever, and rich, with a comfortable home and happy "
         "disposition, seemed to unite some of the best blessings of existence."] * 48


@pytest.fixture(name="checkpoint", scope="module")
def checkpoint_fixture(tmp_path_factory):
    folder = tmp_path_factory.mktemp("saelens-runner-model")
    save_tiny("qwen3_5", folder)
    return folder


def train(checkpoint, out, hook: str = HOOK, head: int | None = None):
    """A runner on a fresh model and dataset, the SAE it built (copied before training), and the trained SAE: of
    ``hook`` (``head`` of it, SAELens' hook_head_index, on a per-head point)."""
    torch.manual_seed(0)
    model = HookedGatedDeltaNet.from_pretrained(checkpoint)
    d = model.cfg.d_model if head is None else model.cfg.d_value
    cfg = sae_lens.LanguageModelSAERunnerConfig(
        sae=sae_lens.StandardTrainingSAEConfig(d_in=d, d_sae=2 * d, l1_coefficient=1.0),
        model_name="tiny-qwen3_5", hook_name=hook, hook_head_index=head, dataset_path="in-memory", is_dataset_tokenized=False,
        streaming=False, context_size=CONTEXT, training_tokens=STEPS * 2 * CONTEXT, train_batch_size_tokens=2 * CONTEXT,
        store_batch_size_prompts=PROMPTS, n_batches_in_buffer=4, device="cpu", seed=0, lr=1e-2,
        logger=sae_lens.LoggingConfig(log_to_wandb=False), output_path=str(out), checkpoint_path=str(out.parent / "ck"),
        n_checkpoints=0, n_eval_batches=1, eval_batch_size_prompts=2, verbose=False,
    )
    runner = sae_lens.LanguageModelSAETrainingRunner(cfg, override_dataset=Dataset.from_dict({"text": TEXTS}),
                                                    override_model=model)
    initial = {name: p.detach().clone() for name, p in runner.sae.named_parameters()}
    return runner, initial, runner.run()


def test_the_runner_trains_a_residual_stream_sae_on_our_model(checkpoint, tmp_path):
    runner, initial, sae = train(checkpoint, tmp_path / "out")
    assert runner.model.__class__ is HookedGatedDeltaNet  # our model itself, no wrapper
    changed = [name for name, p in sae.named_parameters() if not torch.equal(p, initial[name])]
    assert {"W_enc", "W_dec", "b_enc", "b_dec"} <= set(changed)  # the steps trained it
    # the activations it trains on are the residual stream after layer LAYER, as transformers computes it
    store = runner.activations_store
    tokens = store.get_batch_tokens()
    assert tokens.shape == (PROMPTS, CONTEXT)
    hf = AutoModelForCausalLM.from_pretrained(checkpoint)
    with torch.no_grad():
        expected = hf(tokens, output_hidden_states=True).hidden_states[LAYER + 1]
    torch.testing.assert_close(store.get_activations(tokens).reshape(expected.shape), expected, rtol=1e-5, atol=1e-5)
    # its evaluation: our model's loss with the SAE spliced in (run_with_hooks), without it, and ablated
    metrics = runner.evaluator(sae, store, ActivationScaler())["model_performance_preservation"]
    losses = [metrics[k] for k in ("ce_loss_without_sae", "ce_loss_with_sae", "ce_loss_with_ablation")]
    assert all(torch.isfinite(torch.tensor(losses))) and len(set(losses)) == 3
    # the folder it saved is SAELens' format, which load_sae reads as a FlatSAE computing the same
    ours = load_sae(tmp_path / "out")
    assert type(ours) is FlatSAE and (ours.cfg.site, ours.cfg.d_v, ours.cfg.n_features) == (
        HOOK, sae.cfg.d_in, sae.cfg.d_sae)
    x = store.get_activations(tokens).reshape(-1, sae.cfg.d_in)
    with torch.no_grad():
        theirs = sae(x)
    torch.testing.assert_close(ours(x.reshape(-1, 1, 1, sae.cfg.d_in)).reshape(x.shape), theirs, rtol=1e-5, atol=1e-6)
    # and SAELens loads the folder as an SAE that splices into our model as into its HookedSAETransformer, giving the
    # logits its own forward gives as a hook at HOOK (tests/test_saelens_splice.py tests the splice in full)
    loaded = sae_lens.SAE.load_from_disk(tmp_path / "out")
    spliced_model = HookedSAEGatedDeltaNet.from_pretrained(checkpoint)
    spliced, cache = spliced_model.run_with_cache_with_saes(tokens, saes=[loaded], names_filter=lambda n: n.startswith(HOOK))
    torch.testing.assert_close(spliced, spliced_model.run_with_hooks(tokens, fwd_hooks=[(HOOK, lambda x, hook: loaded(x))]))
    torch.testing.assert_close(cache[f"{HOOK}.hook_sae_acts_post"], loaded.encode(cache[HOOK + ".hook_sae_input"]))


def test_the_runner_trains_an_sae_on_one_head_of_a_memory_layer_and_it_splices_back(checkpoint, tmp_path):
    """On a memory layer's per-head point (its gated output) with hook_head_index, the runner trains on that head's
    vectors as our cache holds them, and the SAE it saved splices into that head alone."""
    hook, head = "blocks.0.linear_attn.hook_gated_out", 1
    runner, _, sae = train(checkpoint, tmp_path / "out", hook, head)
    tokens = runner.activations_store.get_batch_tokens()
    _, cache = runner.model.run_with_cache(tokens, names_filter=hook)
    torch.testing.assert_close(runner.activations_store.get_activations(tokens).reshape(-1, sae.cfg.d_in),
                               cache[hook][..., head, :].reshape(-1, sae.cfg.d_in))
    loaded = sae_lens.SAE.load_from_disk(tmp_path / "out")
    assert loaded.cfg.metadata.hook_head_index == head
    model = HookedSAEGatedDeltaNet.from_pretrained(checkpoint)
    _, spliced = model.run_with_cache_with_saes(tokens, saes=[loaded], names_filter=hook)
    others = [h for h in range(model.cfg.n_value_heads) if h != head]
    torch.testing.assert_close(spliced[hook][..., others, :], cache[hook][..., others, :], rtol=0, atol=0)
    torch.testing.assert_close(spliced[hook][..., head, :], loaded(cache[hook][..., head, :]))


def test_training_is_deterministic(checkpoint, tmp_path):
    _, _, first = train(checkpoint, tmp_path / "a")
    _, _, second = train(checkpoint, tmp_path / "b")
    for (name, p), q in zip(first.named_parameters(), second.parameters()):
        assert torch.equal(p, q), name
