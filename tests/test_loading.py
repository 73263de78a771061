"""Lean loading (meta construction, sharded safetensors streamed one tensor at a time) and block placement.

The references: the in-memory path (every tensor read, then copied into a materialised model),
transformers' logits, and accelerate's own device-map computation.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from accelerate import init_empty_weights, infer_auto_device_map
from accelerate.utils import get_balanced_memory
from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError
from safetensors.torch import load_file, save_file
from transformers import Qwen3_5ForCausalLM

from hooked_gdn import HookedGatedDeltaNet
from hooked_gdn.loading import load_pretrained_in_memory
from hooked_gdn.mamba2 import HookedMamba2
from hooked_gdn.placement import plan_device_map
from hooked_gdn.sites import edit_at_positions, gdn_hook_name
from writesae.splice import HookedSAEGatedDeltaNet, HookedSAEMamba2

from .conftest import randomize_, tiny_hf_config

N_BLOCKS = 4  # the "grouped" tiny config


@pytest.fixture(name="sharded", scope="module")
def sharded_fixture(tmp_path_factory):
    """A randomized tiny transformers checkpoint saved in many shards with an index, and its transformers model."""
    torch.manual_seed(0)
    hf = Qwen3_5ForCausalLM(tiny_hf_config("grouped")).eval()
    randomize_(hf)
    folder = tmp_path_factory.mktemp("sharded")
    hf.save_pretrained(folder, max_shard_size="40KB")
    return folder, hf


@pytest.fixture(name="tokens", scope="module")
def tokens_fixture():
    return torch.randint(1, 101, (2, 11), generator=torch.Generator().manual_seed(1))


def _same_model(a: HookedGatedDeltaNet, b: HookedGatedDeltaNet) -> None:
    for (name, x), (_, y) in zip(a.state_dict(keep_vars=True).items(), b.state_dict(keep_vars=True).items(), strict=True):
        assert x.dtype == y.dtype and torch.equal(x, y), name
    for (name, x), (_, y) in zip(a.named_buffers(), b.named_buffers(), strict=True):  # non-persistent ones too
        assert x.device == y.device and x.dtype == y.dtype and torch.equal(x, y), name


def test_the_fixture_is_sharded_with_an_index(sharded):
    folder, _ = sharded
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streamed_model_equals_the_in_memory_path_bit_for_bit(sharded, tokens, dtype):
    folder, hf = sharded
    lean = HookedGatedDeltaNet.from_pretrained(folder, dtype=dtype).eval()
    reference = load_pretrained_in_memory(HookedGatedDeltaNet, folder, dtype=dtype).eval()
    _same_model(lean, reference)
    assert not any(t.is_meta for t in [*lean.parameters(), *lean.buffers()])
    with torch.no_grad():
        assert torch.equal(lean(tokens), reference(tokens))
        if dtype == torch.float32:
            assert (lean(tokens) - hf(tokens).logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shipped_model_streamed_equals_the_in_memory_path(dtype):
    lean = HookedGatedDeltaNet.from_pretrained("gdn-austen", dtype=dtype).eval()
    reference = load_pretrained_in_memory(HookedGatedDeltaNet, "gdn-austen", dtype=dtype).eval()
    _same_model(lean, reference)
    tokens = lean.to_tokens("It is a truth universally acknowledged, that a single man")
    with torch.no_grad():
        assert torch.equal(lean(tokens), reference(tokens))


def _rewrite(folder, change) -> None:
    """Apply ``change`` to the single-file checkpoint's state dict, in place."""
    path = folder / "model.safetensors"
    state = load_file(path)
    change(state)
    save_file(state, path, metadata={"format": "pt"})


@pytest.fixture(name="single_file")
def single_file_fixture(tiny_checkpoint, tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    for f in tiny_checkpoint().iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    return folder


def test_missing_tensors_are_named(single_file):
    _rewrite(single_file, lambda s: [s.pop("model.layers.1.mlp.up_proj.weight"), s.pop("model.norm.weight")])
    with pytest.raises(ValueError, match=r"lacks weights for blocks\.1\.mlp\.up_proj, ln_final\.w"):
        HookedGatedDeltaNet.from_pretrained(single_file)


def test_unexpected_tensors_are_named(single_file):
    _rewrite(single_file, lambda s: s.update({"model.layers.0.mlp.extra.weight": torch.zeros(2),
                                               "model.layers.9.mlp.up_proj.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.extra\.weight, model\.layers\.9\.mlp\.up_proj\.weight"):
        HookedGatedDeltaNet.from_pretrained(single_file)


def test_a_tensor_of_the_wrong_shape_is_named(single_file):
    _rewrite(single_file, lambda s: s.update({"model.layers.2.mlp.down_proj.weight": torch.zeros(48, 63)}))
    with pytest.raises(ValueError, match=r"'model\.layers\.2\.mlp\.down_proj\.weight'.*\(48, 63\).*\(48, 64\)"):
        HookedGatedDeltaNet.from_pretrained(single_file)


def test_an_index_naming_an_absent_shard_is_refused(sharded, tmp_path):
    folder, _ = sharded
    for f in folder.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name):
        HookedGatedDeltaNet.from_pretrained(tmp_path)


# ---------------------------------------------------------------------------------------------- placement


def _meta_model(sharded_folder) -> HookedGatedDeltaNet:
    from hooked_gdn.config import HookedGDNConfig
    from transformers import AutoConfig

    with init_empty_weights():
        return HookedGatedDeltaNet(HookedGDNConfig.from_hf_config(AutoConfig.from_pretrained(sharded_folder)))


def test_a_given_map_places_each_block_where_asked(sharded):
    asked = {0: 0, 1: "cuda:1", 2: torch.device("cuda", 1), 3: "cpu"}  # planned on the meta device: nothing is loaded
    plan = plan_device_map(_meta_model(sharded[0]), asked)
    assert [plan[f"blocks.{i}"] for i in range(N_BLOCKS)] == ["cuda:0", "cuda:1", "cuda:1", "cpu"]
    assert plan["W_E"] == plan["lm_head"] == plan["ln_final"] == "cuda:0"  # with block 0: accelerate's main device


def test_auto_splits_blocks_as_accelerate_computes(sharded):
    model = _meta_model(sharded[0])
    total = sum(p.numel() * 2 for p in model.parameters())  # bf16 bytes
    for share, spills in [(3 / 4, False), (1 / 2, True)]:  # two GPUs (as indices) that hold it; that do not
        max_memory = {0: int(share * total), 1: int(share * total), "cpu": 10 * total}
        plan = plan_device_map(model, "auto", max_memory=max_memory, dtype=torch.bfloat16)
        balanced = get_balanced_memory(model, max_memory=max_memory, no_split_module_classes=["Block"], dtype=torch.bfloat16)
        expected = infer_auto_device_map(model, max_memory=balanced, no_split_module_classes=["Block"], dtype=torch.bfloat16)
        as_named = lambda d: d if d == "cpu" else f"cuda:{d}"
        blocks = [plan[f"blocks.{i}"] for i in range(N_BLOCKS)]
        assert blocks == [as_named(expected[f"blocks.{i}"]) for i in range(N_BLOCKS)]
        assert plan["W_E"] == plan["lm_head"] == plan["ln_final"] == as_named(expected["W_E"])
        assert {"cuda:0", "cuda:1"} <= {*blocks, plan["W_E"]} and ("cpu" in blocks) == spills


@pytest.fixture(name="unplaced", scope="module")
def unplaced_fixture(sharded):
    return HookedGatedDeltaNet.from_pretrained(sharded[0]).eval()


@pytest.fixture(name="dispatched", scope="module")
def dispatched_fixture(sharded):
    return HookedGatedDeltaNet.from_pretrained(sharded[0], device_map={i: "cpu" for i in range(N_BLOCKS)}).eval()


def test_a_dispatched_model_runs_through_accelerate_hooks(dispatched, unplaced, tokens):
    assert dispatched.hf_device_map == {"W_E": "cpu", "lm_head": "cpu", "ln_final": "cpu",
                                        **{f"blocks.{i}": "cpu" for i in range(N_BLOCKS)}}
    assert all(str(block._hf_hook.execution_device) == "cpu" for block in dispatched.blocks)
    _same_model(dispatched, unplaced)
    with torch.no_grad():
        assert torch.equal(dispatched(tokens), unplaced(tokens))


def test_auto_on_this_machine_puts_everything_on_the_cpu(sharded, unplaced, tokens):
    model = HookedGatedDeltaNet.from_pretrained(sharded[0], device_map="auto", max_memory={"cpu": "1GiB"}).eval()
    assert set(model.hf_device_map.values()) == {"cpu"}
    with torch.no_grad():
        assert torch.equal(model(tokens), unplaced(tokens))


def test_a_dispatched_model_caches_edits_and_generates(dispatched, unplaced, tokens):
    site = gdn_hook_name(1, "hook_state")
    caches = [model.run_with_cache(tokens, names_filter=site, state_positions=[4, -1])[1][site] for model in (dispatched, unplaced)]
    assert torch.equal(*caches)
    delete = edit_at_positions(lambda rows, t: torch.zeros_like(rows), [3])  # a carried write edit
    edited = []
    for model in (dispatched, unplaced):
        with torch.no_grad():
            edited.append(model.run_with_hooks(tokens, fwd_hooks=[(gdn_hook_name(0, "hook_write_value"), delete)]))
    assert torch.equal(*edited)
    with torch.no_grad():
        assert not torch.equal(edited[0][:, 4:], unplaced(tokens)[:, 4:])  # the edit carried past its position
    generated = [model.generate(tokens, max_new_tokens=4, stop_at_eos=False) for model in (dispatched, unplaced)]
    assert torch.equal(*generated)


@pytest.mark.parametrize("device_map, error", [
    ({0: "cpu", 1: "cpu", 3: "cpu"}, r"no device for blocks \[2\]"),
    ({i: "cpu" for i in range(N_BLOCKS + 1)}, r"names blocks \[4\]"),
    ({0: "cpu", 1: "cpu", 2: "meta", 3: "cpu"}, r"'meta': \['blocks\.2'\].*available: \["),
    ({0: "cpu", 1: "cpu", 2: "cpu", 3: "cuda:99"}, r"'cuda:99': \['blocks\.3'\]"),
    ({0: "cpu", 1: "cpu", 2: "cpu", 3: "gpu-one"}, r"'gpu-one' is not a device"),
    ("balanced", r"'auto' or \{block_index: device\}"),
])
def test_bad_device_maps_are_refused(sharded, device_map, error):
    with pytest.raises(ValueError, match=error):
        HookedGatedDeltaNet.from_pretrained(sharded[0], device_map=device_map)


def test_device_and_device_map_together_are_refused(sharded):
    with pytest.raises(ValueError, match="not both"):
        HookedGatedDeltaNet.from_pretrained(sharded[0], device="cpu", device_map={i: "cpu" for i in range(N_BLOCKS)})


# ---------------------------------------------------------------------------------------------- entry points


@pytest.mark.parametrize("cls, name", [(HookedGatedDeltaNet, "gdn-austen"), (HookedSAEGatedDeltaNet, "gdn-austen"),
                                       (HookedMamba2, "mamba2-austen"), (HookedSAEMamba2, "mamba2-austen")])
def test_every_class_loads_in_eval_mode(cls, name):
    model = cls.from_pretrained(name)  # no .eval(): TransformerLens' patching refuses a model in training mode
    assert type(model) is cls and [n for n, m in model.named_modules() if m.training] == []


def test_the_in_memory_and_dispatched_loads_are_in_eval_mode(sharded):
    for model in (load_pretrained_in_memory(HookedGatedDeltaNet, sharded[0]),
                  HookedGatedDeltaNet.from_pretrained(sharded[0], device_map={i: "cpu" for i in range(N_BLOCKS)})):
        assert [n for n, m in model.named_modules() if m.training] == []


@pytest.fixture(name="in_a_folder_with_a_checkpoint")
def in_a_folder_with_a_checkpoint_fixture(tiny_checkpoint, tmp_path, monkeypatch):
    """The working directory: a checkpoint folder, a folder that is not one; the hub must not be asked."""
    import huggingface_hub

    shutil.copytree(tiny_checkpoint(), tmp_path / "my-model")
    (tmp_path / "notes").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("the hub was asked"))
    return tmp_path


@pytest.mark.parametrize("name, suggestion", [("gdn-austn", " (did you mean 'gdn-austen'?)"),
                                              ("my-modl", " (did you mean 'my-model'?)"), ("./nothing", ""),
                                              ("runs/a/b", ""), ("runs/my model", " (did you mean 'my-model'?)")])
def test_a_name_that_is_neither_shipped_nor_a_folder_nor_a_hub_id_lists_the_names(in_a_folder_with_a_checkpoint, name,
                                                                                  suggestion):
    with pytest.raises(FileNotFoundError) as error:
        HookedGatedDeltaNet.from_pretrained(name)
    assert str(error.value) == (f"no such folder or shipped name: {name!r}{suggestion}; shipped names: gdn-austen, "
                                f"mamba2-austen, rwkv7-austen; checkpoint folders in {in_a_folder_with_a_checkpoint}: my-model; "
                                f"a hub id has the form owner/name")
    with pytest.raises(FileNotFoundError, match="no such folder or shipped name: 'mamba2-austn'"):
        HookedMamba2.from_pretrained("mamba2-austn")


class NoSuchModelOnTheHub(RepositoryNotFoundError):
    """The hub's answer for a model it does not have (or this machine may not read), without an HTTP response."""

    def __init__(self, message: str):
        OSError.__init__(self, message)


@pytest.mark.parametrize("failure, why", [
    (LocalEntryNotFoundError("Got: ConnectError: [Errno -2] Name or service not known\nAn error happened while trying "
                             "to locate the files on the Hub"),
     "the hub could not be reached (offline?), and the local hub cache does not hold the model"),
    (NoSuchModelOnTheHub("404 Client Error.\nRepository Not Found"),
     "the hub has no such model that this machine may read (a gated or private one needs a login: hf auth login)"),
    (OSError("a first line\nand a second"), "a first line"),
])
def test_a_hub_id_that_cannot_be_downloaded_says_why_in_one_line(in_a_folder_with_a_checkpoint, monkeypatch, failure, why):
    import huggingface_hub

    def download(repo_id, **kwargs):
        raise failure

    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    with pytest.raises(FileNotFoundError) as error:
        HookedGatedDeltaNet.from_pretrained("someone/gdn-austn")
    assert str(error.value) == (f"'someone/gdn-austn' is not a folder here, and it could not be downloaded from the "
                                f"Hugging Face hub: {why}; shipped names: gdn-austen, mamba2-austen, rwkv7-austen; checkpoint "
                                f"folders in {in_a_folder_with_a_checkpoint}: my-model")


def test_a_typo_in_a_path_that_looks_like_a_hub_id_is_refused_here_not_on_the_network(in_a_folder_with_a_checkpoint):
    folder = in_a_folder_with_a_checkpoint
    (folder / "notes" / "run-model").mkdir()
    with pytest.raises(FileNotFoundError) as error:  # notes/ is a folder here: a path, not the hub's owner 'notes'
        HookedGatedDeltaNet.from_pretrained("notes/run-modl")
    assert str(error.value) == (f"no such folder or shipped name: 'notes/run-modl': notes/ is a folder here and holds no "
                                f"'run-modl' (did you mean 'notes/run-model'?); shipped names: gdn-austen, mamba2-austen, rwkv7-austen; "
                                f"checkpoint folders in {folder}: my-model (for the hub model notes/run-modl, run from a "
                                f"folder without notes/)")


# ---------------------------------------------------------------------------------------------- hostile or broken checkpoints


@pytest.mark.parametrize("dtype, stored", [(torch.int32, "I32"), (torch.bool, "BOOL"), (torch.int64, "I64")])
def test_a_weight_stored_in_a_non_float_dtype_is_refused_by_name(single_file, dtype, stored):
    key = "model.layers.1.mlp.up_proj.weight"
    _rewrite(single_file, lambda s: s.update({key: s[key].to(dtype)}))
    with pytest.raises(ValueError, match=rf"not floating point: {re.escape(key)} \({stored}\)"):
        HookedGatedDeltaNet.from_pretrained(single_file)
    with pytest.raises(ValueError, match=rf"{re.escape(key)} \({stored}\)"):
        load_pretrained_in_memory(HookedGatedDeltaNet, single_file)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_a_weight_with_nan_or_inf_is_refused_by_name(single_file, value):
    key = "model.layers.2.linear_attn.in_proj_qkv.weight"
    _rewrite(single_file, lambda s: s[key].view(-1).__setitem__(17, value))
    with pytest.raises(ValueError, match=rf"tensor '{re.escape(key)}' holds NaN or infinite values"):
        HookedGatedDeltaNet.from_pretrained(single_file)
    with pytest.raises(ValueError, match=rf"tensor '{re.escape(key)}' holds NaN or infinite values"):
        load_pretrained_in_memory(HookedGatedDeltaNet, single_file)


def test_finiteness_is_checked_while_streaming_reading_each_tensor_once(sharded, monkeypatch):
    from hooked_gdn import loading

    streamed, read, stream = [], [], loading.SafetensorsCheckpoint.stream

    def counted_stream(self):
        for key, tensor in stream(self):
            streamed.append(key)
            yield key, tensor

    monkeypatch.setattr(loading.SafetensorsCheckpoint, "stream", counted_stream)
    monkeypatch.setattr(loading.SafetensorsCheckpoint, "read", lambda self, name: read.append(name))
    monkeypatch.setattr(loading, "load_file", lambda *a, **k: pytest.fail("a second read of a file"))
    HookedGatedDeltaNet.from_pretrained(sharded[0])
    shapes = loading.SafetensorsCheckpoint.open(sharded[0]).shapes
    assert sorted(streamed) == sorted(shapes) and read == []  # each tensor once, nothing read beside the stream


def _set_config(folder, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def test_a_config_with_more_layers_than_the_checkpoint_is_refused_before_building(single_file, monkeypatch):
    from hooked_gdn import model as model_module

    built = []
    monkeypatch.setattr(model_module.HookedGatedDeltaNet, "setup", lambda self: built.append(self))
    _set_config(single_file, num_hidden_layers=10**5, layer_types=None)  # transformers fills in the layer types
    with pytest.raises(ValueError, match=r"n_layers \(num_hidden_layers\)=100000, but the checkpoint holds weights for 4 "
                                         r"layers \(none for layers 4, 5, .* \(99996 in all\)\)"):
        HookedGatedDeltaNet.from_pretrained(single_file)
    assert built == []  # no model was built, not even on the meta device


def test_a_config_with_fewer_layers_than_the_checkpoint_names_the_extra_ones(single_file):
    _set_config(single_file, num_hidden_layers=3, layer_types=None)
    with pytest.raises(ValueError, match=r"does not have: model\.layers\.3\."):
        HookedGatedDeltaNet.from_pretrained(single_file)


@pytest.mark.parametrize("changes, error", [
    (dict(hidden_size=-48), r"d_model must be an integer >= 1, got -48 \(config\.json's hidden_size\)"),
    (dict(linear_num_value_heads=0), r"n_value_heads must be an integer >= 1, got 0 \(config\.json's linear_num_value_heads\)"),
    (dict(vocab_size=1e10), r"config\.json: .*'vocab_size'.* expected int, got float"),
    (dict(vocab_size=10**10), r"larger than any dimension of its tensors \(the largest is 128\): d_vocab \(vocab_size\)=10000000000"),
    (dict(intermediate_size=10**12, head_dim=10**6),
     r"\(the largest is 128\): d_mlp \(intermediate_size\)=1000000000000, d_head \(head_dim\)=1000000, "
     r"rotary_dim \(head_dim × partial_rotary_factor\)=500000$"),
])
def test_config_sizes_are_checked_naming_the_field(single_file, changes, error):
    _set_config(single_file, **changes)
    with pytest.raises(ValueError, match=error):
        HookedGatedDeltaNet.from_pretrained(single_file)


def test_a_config_within_the_bound_but_not_the_checkpoints_shapes_is_refused_on_the_meta_device(single_file):
    """hidden_size = vocab_size: within the bound, but the model it describes is refused before the in-memory
    path materialises it."""
    _set_config(single_file, hidden_size=101)
    with pytest.raises(ValueError, match=r"tensor '\S+' gives \S+ a part of shape \(\d+, 48\), where the config needs "
                                         r"\(\d+, 101\)"):
        load_pretrained_in_memory(HookedGatedDeltaNet, single_file)


@pytest.mark.parametrize("cls, kwargs, field", [
    ("HookedGDNConfig", dict(d_head=2.5), "d_head"), ("HookedGDNConfig", dict(n_layers=True), "n_layers"),
    ("HookedGDNConfig", dict(n_experts=-1), "n_experts"), ("HookedMamba2Config", dict(d_key=0), "d_key"),
])
def test_config_classes_refuse_sizes_that_are_not_positive_integers(cls, kwargs, field):
    from hooked_gdn.config import ConfigSizeError, HookedGDNConfig
    from hooked_gdn.mamba2 import HookedMamba2Config

    sizes = dict(d_model=8, n_layers=1, d_vocab=5, n_key_heads=1, n_value_heads=1, d_key=4, d_value=4)
    if cls == "HookedGDNConfig":
        sizes |= dict(d_mlp=8, layer_types=["linear_attention"], n_heads=1, n_key_value_heads=1, d_head=4,
                      architecture="qwen3_5")
    config_class = {"HookedGDNConfig": HookedGDNConfig, "HookedMamba2Config": HookedMamba2Config}[cls]
    config_class(**sizes)
    with pytest.raises(ConfigSizeError, match=rf"^{field} must be an integer") as error:
        config_class(**sizes | kwargs)
    assert error.value.field == field


@pytest.fixture(name="sharded_copy")
def sharded_copy_fixture(sharded, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(sharded[0], folder)
    return folder


def _remap(folder, key: str, shard: str) -> str:
    """Point ``key`` in the index at ``shard``; returns the shard it was in."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    before, index["weight_map"][key] = index["weight_map"][key], shard
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return before


@pytest.mark.parametrize("shard", ["../../../../etc/passwd", "/etc/passwd", "sub/../../x.safetensors"])
def test_an_index_entry_leaving_the_folder_is_refused_unopened(sharded_copy, monkeypatch, shard):
    from hooked_gdn import loading

    opened = []
    monkeypatch.setattr(loading, "safe_open", lambda path, *a, **k: opened.append(path) or pytest.fail(f"opened {path}"))
    _remap(sharded_copy, "model.norm.weight", shard)
    with pytest.raises(ValueError, match=rf"tensor 'model\.norm\.weight': shard path '{re.escape(shard)}' leaves the "
                                         r"checkpoint folder"):
        HookedGatedDeltaNet.from_pretrained(sharded_copy)
    assert opened == []


def test_a_shard_reached_through_a_link_leading_outside_is_refused(sharded_copy, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    shard = _remap(sharded_copy, "model.norm.weight", "linked/shard.safetensors")
    shutil.copy(sharded_copy / shard, outside / "shard.safetensors")
    (sharded_copy / "linked").symlink_to(outside)
    with pytest.raises(ValueError, match=r"tensor 'model\.norm\.weight': shard path 'linked/shard\.safetensors' leads to "
                                         rf"{re.escape(str(outside.resolve()))}/shard\.safetensors, outside the checkpoint"):
        HookedGatedDeltaNet.from_pretrained(sharded_copy)


def test_a_linked_single_file_outside_the_folder_is_refused(single_file, tmp_path):
    (single_file / "model.safetensors").rename(tmp_path / "elsewhere.safetensors")
    (single_file / "model.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    with pytest.raises(ValueError, match=r"'model\.safetensors' leads to .*elsewhere\.safetensors, outside the checkpoint"):
        HookedGatedDeltaNet.from_pretrained(single_file)


def test_a_hub_cache_snapshot_whose_files_link_to_its_blobs_loads(single_file, tmp_path):
    """The hub's cache: snapshots/<commit>/ holds links to ../../blobs/<hash>, which is inside the model's cache."""
    repo = tmp_path / "models--someone--tiny"
    snapshot, blobs = repo / "snapshots" / "0123abc", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for f in single_file.iterdir():
        shutil.copy(f, blobs / f"blob-{f.name}")
        (snapshot / f.name).symlink_to(f"../../blobs/blob-{f.name}")
    _same_model(HookedGatedDeltaNet.from_pretrained(snapshot), HookedGatedDeltaNet.from_pretrained(single_file))


@pytest.mark.parametrize("keep", [5000, -100])  # inside the header; inside the tensor data
def test_a_truncated_safetensors_file_is_refused_in_one_line(single_file, keep):
    path = single_file / "model.safetensors"
    path.write_bytes(path.read_bytes()[:keep])
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))} is not a readable safetensors file") as error:
        HookedGatedDeltaNet.from_pretrained(single_file)
    assert "\n" not in str(error.value)


def test_a_tokenizer_that_is_custom_code_is_left_out_with_a_warning(tiny_checkpoint, tmp_path):
    """RWKV-7's released "world" tokenizer is custom code (auto_map), which transformers runs only with
    trust_remote_code: the weights load without it, and the warning names the checkpoint and what to do."""
    folder = tmp_path / "custom-tokenizer"
    shutil.copytree(tiny_checkpoint(), folder)
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "WorldTokenizer", "auto_map": {"AutoTokenizer": ["world_tokenizer.WorldTokenizer", None]}}))
    with pytest.warns(UserWarning, match=rf"^{re.escape(str(folder))}: its tokenizer could not be loaded .*pass token ids"):
        model = HookedGatedDeltaNet.from_pretrained(folder)
    assert model.tokenizer is None
    assert model(torch.tensor([[1, 2, 3]])).shape == (1, 3, model.cfg.d_vocab)
