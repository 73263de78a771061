"""The `writesae` command and the quickstart, end to end in reduced sizes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import torch
from transformers import Qwen3_5ForCausalLM

from hooked_gdn.pretrained import PRETRAINED_MODELS
from writesae import BilinearMatrixSAE, load_sae
from writesae.quickstart import run_quickstart

from .conftest import tiny_hf_config


def writesae(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "writesae.cli", *args], capture_output=True, text=True, timeout=timeout)


def test_help_lists_the_commands_and_options():
    for command, option in (("train", "--n-features"), ("eval", "--contexts"), ("quickstart", "--steps")):
        result = writesae(command, "--help")
        assert result.returncode == 0 and option in result.stdout


def test_twenty_step_cli_run_on_a_random_tiny_model_writes_a_loadable_sae(tmp_path):
    torch.manual_seed(0)
    folder = tmp_path / "tiny"
    Qwen3_5ForCausalLM(tiny_hf_config("grouped", vocab_size=4096)).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):  # text needs a tokenizer: borrow the shipped one
        shutil.copy(PRETRAINED_MODELS["gdn-austen"] / name, folder / name)
    out = tmp_path / "run"
    result = writesae("train", "--model", str(folder), "--layer", "1", "--steps", "20", "--batch-size", "16",
                      "--n-features", "32", "--k", "4", "--context", "32", "--eval-every", "10", "--out", str(out),
                      "--no-progress")
    assert result.returncode == 0, result.stderr
    sae = load_sae(out / "sae")
    assert isinstance(sae, BilinearMatrixSAE) and sae.cfg.site == "blocks.1.linear_attn.hook_state"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in records) == 20 and any(r["split"] == "heldout" for r in records)
    result = writesae("eval", str(out / "sae"), "--model", str(folder), "--context", "32", "--contexts", "2",
                      "--samples", "64", "--json", str(tmp_path / "eval.json"))
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "eval.json").read_text())
    assert len(metrics["reconstruction"]["fvu"]) == 4 and "ce_loss_recovered" in metrics["downstream"]


def test_quickstart_in_reduced_mode_writes_outputs_that_load(tmp_path):
    summary = run_quickstart(tmp_path, n_features=32, k=4, steps=6, batch_size=16, context=64, eval_contexts=2,
                             progress=False)
    sae = load_sae(tmp_path / "sae")
    assert sae.cfg.site == summary["site"] and sae.cfg.model_name == "gdn-austen"
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["reconstruction"]["fvu"] == summary["reconstruction"]["fvu"]
    assert 0 <= on_disk["downstream_in_the_loop"]["kl_spliced"]
    assert on_disk["top_contexts"] and all("[[" in line for lines in on_disk["top_contexts"].values() for line in lines)
    for plot in ("atoms.png", "activations.png", "training_curve.png"):
        assert (tmp_path / plot).read_bytes()[:4] == b"\x89PNG"
