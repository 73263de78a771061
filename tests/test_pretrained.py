"""The shipped gdn-austen model: offline loading, its model card's figures, parity, the main job."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import Qwen3_5ForCausalLM

from hooked_gdn import HookedGatedDeltaNet
from hooked_gdn.pretrained import PRETRAINED_MODELS, austen_documents, heldout_windows

FOLDER = PRETRAINED_MODELS["gdn-austen"]


@pytest.fixture(scope="module")
def shipped():
    return HookedGatedDeltaNet.from_pretrained("gdn-austen").eval()


def test_loads_offline_with_its_tokenizer(shipped, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = HookedGatedDeltaNet.from_pretrained("gdn-austen")
    assert model.tokenizer is not None
    assert model.cfg.layer_types.count("linear_attention") == 3 * model.cfg.layer_types.count("full_attention")
    assert model.cfg.d_key == model.cfg.d_value >= 32
    assert sum(f.stat().st_size for f in FOLDER.glob("*.safetensors")) <= 20 * 2**20


def test_heldout_loss_matches_the_model_card(shipped):
    stats = json.loads((FOLDER / "training_stats.json").read_text())
    assert f"{stats['heldout_loss']:.4f}" in (FOLDER / "README.md").read_text()
    windows = heldout_windows(shipped.tokenizer)
    assert windows.numel() == stats["heldout_tokens"]
    total = 0.0
    with torch.no_grad():
        for batch in windows.split(32):
            total += shipped(batch, "loss", loss_per_token=True).sum().item()
    loss = total / windows[:, 1:].numel()
    assert abs(loss - stats["heldout_loss"]) <= 0.02 * stats["heldout_loss"]


def test_logits_equal_transformers_on_the_same_folder(shipped):
    hf = Qwen3_5ForCausalLM.from_pretrained(FOLDER, dtype=torch.float32).eval()
    tokens = shipped.to_tokens("Captain Wentworth had no fortune. He had been lucky in his profession.")
    with torch.no_grad():
        assert (shipped(tokens) - hf(tokens).logits).abs().max().item() <= 1e-4


def test_heldout_split_is_by_document():
    train = {d.name for d in austen_documents("train")}
    heldout = {d.name for d in austen_documents("heldout")}
    assert heldout == {f"persuasion/{i}" for i in range(21, 25)}
    assert not train & heldout
    assert len(train) + len(heldout) == len(austen_documents("all"))


def test_strings_tokens_and_padding(shipped):
    text = "Emma Woodhouse, handsome, clever, and rich"
    tokens = shipped.to_tokens(text)
    assert shipped.to_string(tokens[0]) == text
    assert "".join(shipped.to_str_tokens(text)) == text
    with torch.no_grad():
        batch = shipped(["Mr. Darcy", text])
        alone = shipped("Mr. Darcy")
    assert (batch[0, -alone.shape[1]:] - alone[0]).abs().max().item() <= 1e-4
    continued = shipped.generate("Mr. Darcy", max_new_tokens=5)
    assert isinstance(continued, str) and continued.startswith("Mr. Darcy")


def test_readme_main_job_runs_in_under_a_minute():
    # the requirement, checked with a timeout rather than a timing assertion
    result = subprocess.run([sys.executable, "-m", "hooked_gdn.demo"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "hook_state" in result.stdout and "σ1" in result.stdout


def test_a_local_folder_with_a_shipped_name_is_never_silently_shadowed(tmp_path, monkeypatch):
    from .conftest import tiny_hf_config

    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    Qwen3_5ForCausalLM(tiny_hf_config("grouped")).save_pretrained(tmp_path / "gdn-austen")
    with pytest.raises(ValueError, match="names both the shipped model and .*gdn-austen: pass './gdn-austen'"):
        HookedGatedDeltaNet.from_pretrained("gdn-austen")
    assert HookedGatedDeltaNet.from_pretrained("./gdn-austen").cfg.d_vocab == 101
    assert HookedGatedDeltaNet.from_pretrained(FOLDER).cfg.d_vocab == 4096


def test_empty_text_is_refused(shipped):
    for call in (lambda: shipped(""), lambda: shipped.generate("", max_new_tokens=3), lambda: shipped([""])):
        with pytest.raises(ValueError, match="the input has no tokens"):
            call()
