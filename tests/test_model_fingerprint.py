"""An SAE records the model it was trained on (its name and `model_fingerprint` of its weights), and
using it with other weights warns (the Python API) or is refused (the commands, unless
--allow-other-model); an SAE saved before the fingerprint was recorded is used without a word."""

from __future__ import annotations

import json
import random
import warnings

import pytest
import torch

from writesae import load_sae
from writesae.cli import main
from writesae.disk_cache import CachedActivations
from writesae.io import CFG_FILE, PRETRAINED_SAES_DIR
from writesae.site_fit import OtherModelError, OtherModelWarning, check_sae_fits, model_fingerprint
from writesae.splice import load_model

from .conftest import save_tiny_checkpoint_with_tokenizer

WORDS = "the a of and to in letter sister house walk rain ball dance morning evening said thought".split()
TRAIN = "--layer 1 --n-features 16 --k 2 --context 16 --positions 4 --batch-size 8 --buffer-size 16 --steps 2 " \
        "--eval-every 0 --checkpoint-every 0 --no-progress --device cpu"
EVAL = "--context 16 --samples 16 --contexts 1 --device cpu"


@pytest.fixture(name="setup", scope="module")
def setup_fixture(tmp_path_factory):
    """Two tiny checkpoints of one config and different seeds (a, b), a corpus, and an SAE trained on a
    through the CLI (run/sae)."""
    root = tmp_path_factory.mktemp("fingerprint")
    for name, seed in (("a", 0), ("b", 1)):
        torch.manual_seed(seed)
        save_tiny_checkpoint_with_tokenizer(root / name)
    (root / "corpus").mkdir()
    for i in range(6):
        (root / "corpus" / f"doc{i}.txt").write_text(" ".join(random.Random(i).choices(WORDS, k=200)) + ".")
    main(["train", "--model", str(root / "a"), "--data", str(root / "corpus"), "--out", str(root / "run"), *TRAIN.split()])
    return root


def run(capsys, *args: str) -> tuple[int, str, str]:
    """The exit status of a ``writesae`` command, and what it printed to stdout and stderr."""
    try:
        main(list(args))
        code = 0
    except SystemExit as exit:
        code = exit.code
    out, err = capsys.readouterr()
    return code, out, err


def test_the_fingerprint_is_the_same_for_the_same_weights_and_differs_for_others(setup):
    a = load_model(setup / "a")
    fingerprint = model_fingerprint(a)
    assert len(fingerprint) == 64 and model_fingerprint(load_model(setup / "a")) == fingerprint
    assert model_fingerprint(load_model(setup / "a", dtype=torch.bfloat16)) == fingerprint  # the same weights, another dtype
    assert model_fingerprint(load_model(setup / "b")) != fingerprint  # another seed
    sae = load_sae(setup / "run" / "sae")
    a.add_sae(sae)  # an attached SAE's parameters are not the model's weights
    assert model_fingerprint(a) == fingerprint
    a.reset_saes()
    with torch.no_grad():
        a.W_E.mul_(1.001)  # a fine-tune: every weight of a tensor moved
    assert model_fingerprint(a) != fingerprint


def test_training_records_the_models_name_and_fingerprint(setup):
    sae = load_sae(setup / "run" / "sae")
    assert sae.cfg.model_name == str(setup / "a")
    assert sae.cfg.model_fingerprint == model_fingerprint(load_model(setup / "a"))


def test_the_python_api_warns_with_other_weights_naming_both_models_and_not_with_the_same(setup):
    sae = load_sae(setup / "run" / "sae")
    a, b = load_model(setup / "a"), load_model(setup / "b")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_sae_fits(sae, a)
        a.add_sae(sae)
        a.reset_saes()
    with pytest.warns(OtherModelWarning) as caught:
        check_sae_fits(sae, b)
    message = str(caught[0].message)
    assert f"trained on {setup / 'a'} (weights fingerprint {sae.cfg.model_fingerprint[:12]})" in message
    assert f"not on {setup / 'b'} (weights fingerprint {model_fingerprint(b)[:12]})" in message
    with pytest.warns(OtherModelWarning):
        b.add_sae(sae)  # attaching goes through the same check
    b.reset_saes()
    with pytest.raises(OtherModelError, match="trained on"):
        check_sae_fits(sae, b, other_model="refuse")


def test_an_sae_saved_before_fingerprints_loads_and_is_used_without_a_word(setup, tmp_path, capsys):
    sae = load_sae(setup / "run" / "sae")
    sae.save(tmp_path / "old")
    cfg = json.loads((tmp_path / "old" / CFG_FILE).read_text())
    del cfg["model_fingerprint"]  # as SAEs were saved before
    (tmp_path / "old" / CFG_FILE).write_text(json.dumps(cfg))
    old = load_sae(tmp_path / "old")
    assert old.cfg.model_fingerprint is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_sae_fits(old, load_model(setup / "b"))
    code, _, err = run(capsys, "eval", str(tmp_path / "old"), "--model", str(setup / "b"), "--data",
                       str(setup / "corpus"), *EVAL.split(), "--out", str(tmp_path / "out"))
    assert code == 0 and "other weights" not in err, err


def test_eval_and_dashboard_refuse_another_model_in_one_line_unless_allowed(setup, tmp_path, capsys):
    sae, corpus = str(setup / "run" / "sae"), str(setup / "corpus")
    for command in ("eval", "dashboard"):
        code, out, err = run(capsys, command, sae, "--model", str(setup / "b"), "--data", corpus, "--out",
                             str(tmp_path / command))
        assert code == 2 and out == "" and len(err.splitlines()) == 1, err
        assert err.startswith(f"writesae {command}: error: {sae}: the SAE was trained on {setup / 'a'}")
        assert f"not on {setup / 'b'}" in err and "--allow-other-model" in err
        assert not (tmp_path / command).exists()  # refused before anything was written
    code, out, err = run(capsys, "eval", sae, "--model", str(setup / "b"), "--data", corpus, *EVAL.split(),
                         "--out", str(tmp_path / "allowed"), "--allow-other-model")
    assert code == 0 and (tmp_path / "allowed" / "eval.json").is_file(), err
    assert err.count(f"writesae eval: warning: the SAE was trained on {setup / 'a'}") == 1, err  # once, not per splice
    code, out, err = run(capsys, "dashboard", sae, "--model", str(setup / "b"), "--data", corpus, "--context", "16",
                         "--contexts", "2", "--features-per-head", "1", "--no-progress", "--device", "cpu",
                         "--out", str(tmp_path / "dash"), "--allow-other-model")
    assert code == 0 and (tmp_path / "dash" / "index.html").is_file(), err
    assert err.count(f"writesae dashboard: warning: the SAE was trained on {setup / 'a'}") == 1, err
    code, out, err = run(capsys, "eval", sae, "--model", str(setup / "a"), "--data", corpus, *EVAL.split(),
                         "--out", str(tmp_path / "same"))
    assert code == 0 and "other weights" not in err, err


def test_a_cache_records_its_models_fingerprint_and_an_sae_trained_on_it_too(setup, tmp_path, capsys):
    code, _, err = run(capsys, "cache", "--model", str(setup / "a"), "--data", str(setup / "corpus"), "--layer", "1",
                       "--context", "16", "--positions", "4", "--shard-samples", "64", "--out", str(tmp_path / "cache"),
                       "--no-progress")
    assert code == 0, err
    fingerprint = model_fingerprint(load_model(setup / "a"))
    assert CachedActivations(tmp_path / "cache").model_fingerprint == fingerprint
    code, _, err = run(capsys, "train", "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "run"),
                       *TRAIN.replace("--layer 1 ", "").split())
    assert code == 0, err
    assert load_sae(tmp_path / "run" / "sae").cfg.model_fingerprint == fingerprint


@pytest.mark.parametrize("name", ["gdn-austen/L5-state", "gdn-austen/L5-write"])
def test_the_shipped_saes_record_the_shipped_model(name):
    sae = load_sae(name)
    assert (PRETRAINED_SAES_DIR / name).is_dir() and sae.cfg.model_name == "gdn-austen"
    assert sae.cfg.model_fingerprint == model_fingerprint(load_model("gdn-austen"))


def test_a_resumed_run_keeps_to_its_model_and_a_checkpoint_saved_before_fingerprints_resumes(setup, tmp_path, capsys):
    args = ["--data", str(setup / "corpus"), "--out", str(tmp_path / "run"),
            *TRAIN.replace("--checkpoint-every 0", "--checkpoint-every 1").split()]
    assert run(capsys, "train", "--model", str(setup / "a"), *args)[0] == 0
    args[args.index("--steps") + 1] = "3"
    code, _, err = run(capsys, "train", "--model", str(setup / "b"), *args)
    assert code == 2 and "cannot resume from" in err and "model_fingerprint" in err, err
    cfg_file = tmp_path / "run" / "checkpoint" / "sae" / CFG_FILE
    cfg = json.loads(cfg_file.read_text())
    del cfg["model_fingerprint"]  # as checkpoints were saved before
    cfg_file.write_text(json.dumps(cfg))
    code, _, err = run(capsys, "train", "--model", str(setup / "a"), *args)
    assert code == 0, err
    assert load_sae(tmp_path / "run" / "sae").cfg.model_fingerprint == model_fingerprint(load_model(setup / "a"))
