"""The `writesae` command and the quickstart, end to end in reduced sizes."""

from __future__ import annotations

import argparse
import gzip
import json
import random
import re
import shlex
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import torch

from hooked_gdn import HookedGatedDeltaNet
from hooked_gdn.pretrained import PRETRAINED_MODELS, default_layer
from writesae import ARCHITECTURES, BilinearMatrixSAE, load_sae
from writesae.cli import _parser, main
from writesae.quickstart import format_report, run_quickstart
from writesae.sparsity import SPARSITIES
from writesae.store import ActivationStore

from .conftest import save_tiny_checkpoint_with_tokenizer


def writesae(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "writesae.cli", *args], capture_output=True, text=True, timeout=timeout)


COMMANDS = ["quickstart", "cache", "train", "census", "eval", "dashboard"]


def help_text(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as exit:
        main([*args, "--help"])
    assert exit.value.code == 0
    return capsys.readouterr().out


def test_help_names_every_command_and_explains_every_option_with_its_default(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # one line per option: its help and default are never cut by the wrapping
    top = help_text(capsys)
    assert all(f"\n    {command}" in top for command in COMMANDS) and "--version" in top and "`" not in top
    commands = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert sorted(commands) == sorted(COMMANDS)
    for name, command in commands.items():
        text = help_text(capsys, name)
        assert "`" not in text, name  # plain text, not reST
        for action in command._actions:
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"
            shown = action.default not in (None, False, argparse.SUPPRESS) and action.option_strings
            assert not shown or f"(default: {action.default})" in text or "%(default)" in action.help, \
                f"{name} {action.option_strings}: its default is not shown"
    quickstart = help_text(capsys, "quickstart")
    assert re.search(r"--n-features N_FEATURES\s+features per head \(default: 256\)", quickstart)
    assert f"gdn-austen {default_layer('gdn-austen')}, mamba2-austen {default_layer('mamba2-austen')}, rwkv7-austen" in quickstart


def test_a_shipped_model_without_its_census_yet_leaves_every_help_working(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("COLUMNS", "1000")
    monkeypatch.setitem(PRETRAINED_MODELS, "no-census", tmp_path)  # a model folder whose census.json is still to come
    assert "no-census: none yet, give --layer" in help_text(capsys, "quickstart")
    with pytest.raises(ValueError, match="no-census ships no census.json yet, whose census picks the default layer: give --layer"):
        run_quickstart(tmp_path / "out", model="no-census", progress=False)


def test_trains_choices_are_the_registries(capsys, monkeypatch):
    commands = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    options = {a.dest: a for a in commands["train"]._actions}
    assert options["architecture"].choices == list(ARCHITECTURES) and options["architecture"].default == "bilinear"
    assert options["sparsity"].choices == list(SPARSITIES) and options["sparsity"].default == "topk"
    monkeypatch.setenv("COLUMNS", "1000")
    text = help_text(capsys, "train")
    assert "; ".join(f"{name}: {cls.summary}" for name, cls in ARCHITECTURES.items()) in text
    assert re.search(r"--k K\s+features active per sample and head, for topk and batchtopk \(default: 16\)", text)
    with pytest.raises(SystemExit) as exit:
        main(["train", "--sparsity", "l2"])
    assert exit.value.code == 2
    refusal = capsys.readouterr().err.splitlines()[-1]  # argparse quotes the choices or not, by Python version
    assert "argument --sparsity: invalid choice: 'l2' (choose from " in refusal and all(name in refusal for name in SPARSITIES)


def test_version_is_the_installed_distributions(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["--version"])
    assert exit.value.code == 0 and capsys.readouterr().out == f"writesae {version('writesae')}\n"


@pytest.mark.slow
def test_twenty_step_cli_run_on_a_random_tiny_model_writes_a_loadable_sae(tmp_path):
    torch.manual_seed(0)
    folder = tmp_path / "tiny"
    save_tiny_checkpoint_with_tokenizer(folder)
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
                      "--samples", "64", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "CE loss recovered" in result.stdout and result.stdout.endswith(f"wrote {out / 'eval.json'}\n")
    metrics = json.loads((out / "eval.json").read_text())
    assert len(metrics["reconstruction"]["fvu"]) == 4 and "ce_loss_recovered" in metrics["downstream"]
    assert "eval.json" in json.loads((out / "writesae-outputs.json").read_text())["created"]


@pytest.mark.slow
def test_quickstart_on_two_heads_labels_model_heads_and_writes_outputs_that_load(tmp_path, capsys):
    summary = run_quickstart(tmp_path, heads=[1, 3], n_features=32, k=4, steps=6, batch_size=16, context=64, positions=16,
                             buffer_size=64, input_scale_samples=64, heldout_samples=128, eval_contexts=2)
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("quickstart: ")]
    # what it does, from the start, and the training's size and expected time before training
    assert said[0] == "quickstart: loading gdn-austen and tokenising the six novels"
    assert "128 held-out states of layer 5" in said[1] and "6 steps of 16 states" in said[2] and "takes about" in said[2]
    assert summary["reconstruction"]["samples"] == 128 and summary["config"]["positions"] == 16
    sae = load_sae(tmp_path / "sae")
    assert sae.cfg.site == summary["site"] and sae.cfg.model_name == "gdn-austen" and sae.cfg.head_indices == [1, 3]
    # the SAE's dictionaries 0 and 1 are model heads 1 and 3: reports name the model heads
    assert {label.split(",")[0] for label in summary["top_contexts"]} == {"head 1", "head 3"}
    assert all("[[" in line for lines in summary["top_contexts"].values() for line in lines)
    table = format_report(summary).splitlines()[5:7]
    assert [row.split()[0] for row in table] == ["1", "3"]
    for plot in ("atoms.png", "activations.png", "training_curve.png"):
        assert (tmp_path / plot).read_bytes()[:4] == b"\x89PNG"


# --- --data, --out and errors, in-process on the shipped model and a small folder of text -------

WORDS = "amber basalt cobalt dune ember fjord garnet harbor indigo jasper kelp lagoon meadow nickel".split()
# the overrides that make a README command small enough for a test (argparse keeps the last value)
SMALL = {
    "train": "--model gdn-austen --device cpu --dtype float32 --layer 4 --n-features 32 --k 4 --context 32 "
             "--batch-size 16 --buffer-size 64 --steps 3 --eval-every 3 --checkpoint-every 3 --no-progress",
    "eval": "--model gdn-austen --device cpu --dtype float32 --context 32 --samples 64 --contexts 2",
}


def text_folder(folder: Path) -> list[str]:
    """Six documents of random words (.txt files, a gzipped one in a subfolder) and a note that is no document."""
    texts = [" ".join(random.Random(i).choices(WORDS, k=120)) + "." for i in range(6)]
    (folder / "more").mkdir(parents=True)
    for i, text in enumerate(texts[:5]):
        (folder / f"doc{i}.txt").write_text(text)
    with gzip.open(folder / "more" / "doc5.txt.gz", "wt") as f:
        f.write(texts[5])
    (folder / "notes.md").write_text("zebra " * 300)
    return texts


def readme_data_commands() -> list[list[str]]:
    readme = (Path(__file__).parents[1] / "README.md").read_text().replace("\\\n", " ")
    commands = [shlex.split(line) for line in readme.splitlines() if line.startswith("writesae ") and " --data " in line]
    return [c for c in commands if c[1] in ("train", "eval")]  # the cache command has its own test (test_disk_cache)


def test_the_readmes_data_commands_train_and_evaluate_on_the_files_text(tmp_path, monkeypatch, capsys):
    texts = text_folder(tmp_path / "my_corpus")
    commands = readme_data_commands()
    assert len(commands) >= 2 and [c[1] for c in commands] == ["train", "eval"] * (len(commands) // 2)
    trained_on = []
    extract = ActivationStore._extract

    def recording(self, split, indices, generator):
        if split == "train":
            trained_on.extend(self._contexts[split][indices].tolist())
        return extract(self, split, indices, generator)

    monkeypatch.setattr(ActivationStore, "_extract", recording)
    monkeypatch.chdir(tmp_path)  # the README's paths are relative: my_corpus/, runs/…
    model = HookedGatedDeltaNet.from_pretrained("gdn-austen")
    for command in commands:
        trained_on.clear()
        main(command[1:] + SMALL[command[1]].split())
        out = capsys.readouterr().out
        if command[1] == "eval":  # a table, and the figures in eval-out/eval.json
            assert "head    FVU     L0   dead  dense" in out and "CE loss recovered: " in out
            metrics = json.loads((tmp_path / "eval-out" / "eval.json").read_text())
            assert f"CE loss recovered: {metrics['downstream']['ce_loss_recovered']:.3f}" in out
            continue
        # every trained sample comes from a context whose text, cut at EOS, lies in one of the files
        pieces = []
        for context in trained_on:
            while context:
                end = context.index(model.cfg.eos_token_id) if model.cfg.eos_token_id in context else len(context)
                pieces.append(model.tokenizer.decode(context[:end], clean_up_tokenization_spaces=False))
                context = context[end + 1 :]
        assert sum(map(len, pieces)) > 3000
        assert all(any(piece in text for text in texts) for piece in pieces if piece)
        sae = load_sae(Path(command[command.index("--out") + 1]) / "sae")
        assert sae.cfg.site == "blocks.4.linear_attn.hook_state"


def test_a_list_of_file_names_is_refused_as_text(tmp_path):
    texts = text_folder(tmp_path / "corpus")
    files = sorted(str(f) for f in (tmp_path / "corpus").glob("*.txt"))
    model = HookedGatedDeltaNet.from_pretrained("gdn-austen")
    with pytest.raises(TypeError, match="every one names a file or folder .*pass pathlib.Path objects"):
        ActivationStore(model, files, layer=4, context=32)
    store = ActivationStore(model, [Path(f) for f in files], layer=4, context=32)
    assert store.document_names == files and texts[0].startswith(model.to_string(store.context_tokens(0)[:5]))


def cli_error(capsys, *args: str) -> str:
    """Run the command, which must fail with exit status 2 and one line on stderr; return that line."""
    with pytest.raises(SystemExit) as exit:
        main(list(args))
    err = capsys.readouterr().err
    assert exit.value.code == 2 and "Traceback" not in err, err
    return err


def test_train_refuses_a_file_in_out_before_loading_anything(tmp_path, monkeypatch, capsys):
    import writesae.cli as cli

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "metrics.jsonl").write_text("my own notes\n")
    monkeypatch.setattr(cli, "_load_model", lambda args: pytest.fail("the model was loaded"))
    err = cli_error(capsys, "train", "--layer", "4", "--out", str(tmp_path / "out"))
    assert f"{tmp_path / 'out' / 'metrics.jsonl'} exists and was not created by writesae" in err
    assert (tmp_path / "out" / "metrics.jsonl").read_text() == "my own notes\n"


@pytest.fixture(name="trained", scope="module")
def trained_fixture(tmp_path_factory):
    """A folder of text, and an SAE trained on it through the CLI at a learning rate that makes it diverge
    (it is an SAE all the same, for the errors that come before any metric)."""
    root = tmp_path_factory.mktemp("trained")
    text_folder(root / "corpus")
    with pytest.raises(SystemExit) as exit:
        main(["train", "--data", str(root / "corpus"), "--out", str(root / "run"), *SMALL["train"].split(), "--lr", "1e6"])
    (root / "exit.txt").write_text(str(exit.value.code))
    return root


def test_eval_errors_name_the_argument_or_the_file(trained, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where eval-out/, the default --out, goes
    corpus, sae = str(trained / "corpus"), str(trained / "run" / "sae")
    small = SMALL["eval"].split()
    assert "argument --contexts: must be a positive integer, got 0" in cli_error(capsys, "eval", sae, "--contexts", "0")
    assert "argument --samples: must be a positive integer, got -1" in cli_error(capsys, "eval", sae, "--samples", "-1")
    err = cli_error(capsys, "eval", sae, "--data", corpus, *small, "--contexts", "100000")
    assert "--contexts 100000: the held-out documents give only" in err and "of --context 32 tokens" in err
    bad = load_sae(sae)
    bad.cfg.site = "blocks.4.mlp.hook_post"
    bad.save(tmp_path / "bad")
    err = cli_error(capsys, "eval", str(tmp_path / "bad"), "--data", corpus, *small)
    assert f"{tmp_path / 'bad' / 'cfg.json'}: the SAE's site does not exist on " in err
    assert "'blocks.4.mlp.hook_post' is not an SAE site" in err
    (tmp_path / "bad" / "cfg.json").write_text("null")
    assert "cfg.json must hold a JSON object" in cli_error(capsys, "eval", str(tmp_path / "bad"))
    assert "no file or folder at" in cli_error(capsys, "eval", sae, "--data", str(tmp_path / "nowhere"), *small)


def test_eval_prints_a_table_writes_its_json_in_out_and_warns_of_an_fvu_above_1(trained, tmp_path, capsys):
    out = tmp_path / "eval"
    main(["eval", str(trained / "run" / "sae"), "--data", str(trained / "corpus"), *SMALL["eval"].split(), "--out", str(out)])
    printed, err = capsys.readouterr()
    metrics = json.loads((out / "eval.json").read_text())
    fvu = metrics["reconstruction"]["fvu"]
    assert metrics["site"] == "blocks.4.linear_attn.hook_state" and min(fvu) > 1  # the diverged SAE of the fixture
    rows = printed.splitlines()[5:9]
    assert [row.split()[:2] for row in rows] == [[str(head), f"{value:.3g}"] for head, value in enumerate(fvu)]
    assert "CE loss recovered: " in printed and printed.endswith(f"wrote {out / 'eval.json'}\n")
    assert err.startswith("writesae eval: warning: held-out FVU above 1 for head 0 (") and err.count("\n") == 1
    assert "worse than predicting the held-out mean" in err and "distribution shift" in err


def test_eval_never_replaces_a_file_it_did_not_create(trained, tmp_path, capsys, monkeypatch):
    import writesae.cli as cli

    (tmp_path / "eval.json").write_text("my own figures\n")
    monkeypatch.setattr(cli, "_store", lambda *args: pytest.fail("the corpus was read"))
    err = cli_error(capsys, "eval", str(trained / "run" / "sae"), "--out", str(tmp_path))
    assert f"{tmp_path / 'eval.json'} exists and was not created by writesae" in err
    assert (tmp_path / "eval.json").read_text() == "my own figures\n"


def test_a_rerun_with_another_n_features_names_that_field(trained, capsys):
    err = cli_error(capsys, "train", "--data", str(trained / "corpus"), "--out", str(trained / "run"), *SMALL["train"].split(),
                    "--lr", "1e6", "--n-features", "16")
    assert err == (f"writesae train: error: cannot resume from {trained / 'run' / 'checkpoint'}: sae.n_features: the "
                   f"checkpoint has 32, this run 16 (use another out_dir (--out), or resume=False)\n")


def test_a_mistyped_model_name_lists_the_shipped_names_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    err = cli_error(capsys, "census", "--model", "gdn-austn")
    assert err == (f"writesae census: error: no such folder or shipped name: 'gdn-austn' (did you mean 'gdn-austen'?); "
                   f"shipped names: gdn-austen, mamba2-austen, rwkv7-austen; checkpoint folders in {tmp_path}: none; a hub id has the "
                   f"form owner/name\n")


def test_a_run_that_diverges_without_a_nan_exits_non_zero(trained):
    # a string as SystemExit's code: printed to stderr, exit status 1
    assert (trained / "exit.txt").read_text().startswith("writesae train: the saved SAE looks diverged: held-out FVU")
    assert load_sae(trained / "run" / "sae")  # saved all the same, for a look


def test_quickstart_refuses_a_users_file_of_the_same_name_before_any_work(tmp_path, monkeypatch):
    import writesae.quickstart as quickstart

    (tmp_path / "atoms.png").write_bytes(b"my own picture")
    monkeypatch.setattr(quickstart, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(FileExistsError, match=f"{tmp_path / 'atoms.png'} exists and was not created by writesae"):
        run_quickstart(tmp_path, steps=1)
    assert (tmp_path / "atoms.png").read_bytes() == b"my own picture" and sorted(p.name for p in tmp_path.iterdir()) == ["atoms.png"]


# (model, the cache's site options, the site the SAE gets, its heads, the census's heads): Mamba-2 on its default site
# (the state), RWKV-7 on the erase site only it has, whose cache samples are its rank-1 erases
SHIPPED_SMALL_MODELS = [
    pytest.param("mamba2-austen", ["--layer", "0"], "blocks.0.linear_attn.hook_state", [1, 3], 6 * 8, id="mamba2"),
    pytest.param("rwkv7-austen", ["--kind", "erase", "--layer", "1"], "blocks.1.linear_attn.hook_erase_value", [0, 3], 4 * 4,
                 id="rwkv7-erase"),
]


@pytest.mark.parametrize("name, site_options, site, heads, n_heads", SHIPPED_SMALL_MODELS)
def test_every_command_runs_on_the_shipped_mamba2_and_rwkv7_models(tmp_path, name, site_options, site, heads, n_heads):
    """The commands load --model by its checkpoint's model_type (writesae.splice.load_model), so a Mamba-2 model and
    an RWKV-7 model (flash-linear-attention's format) go through each of them (they refused Mamba-2 before: each
    loaded a HookedGatedDeltaNet)."""
    text_folder(tmp_path / "corpus")
    model, data = ["--model", name], ["--data", str(tmp_path / "corpus"), "--context", "32"]
    main(["cache", *model, *data, *site_options, "--positions", "2", "--heads", ",".join(map(str, heads)), "--out",
          str(tmp_path / "cache"), "--shard-samples", "64", "--no-progress"])
    main(["train", "--cache", str(tmp_path / "cache"), "--n-features", "16", "--k", "2", "--steps", "3", "--batch-size", "8",
          "--buffer-size", "32", "--eval-every", "3", "--checkpoint-every", "3", "--out", str(tmp_path / "run"), "--no-progress"])
    sae = str(tmp_path / "run" / "sae")
    assert load_sae(sae).cfg.site == site and load_sae(sae).cfg.head_indices == heads
    main(["eval", sae, *model, *data, "--samples", "16", "--contexts", "2", "--out", str(tmp_path / "eval")])
    main(["dashboard", sae, *model, *data, "--contexts", "2", "--features-per-head", "2", "--out", str(tmp_path / "dash"),
          "--no-progress"])
    main(["census", *model, "--tokens", "64", "--context", "32", "--out", str(tmp_path / "census")])
    for written in ("eval/eval.json", "dash/index.html", "census/census.json"):
        assert (tmp_path / written).is_file(), written
    assert len(json.loads((tmp_path / "census" / "census.json").read_text())["heads"]) == n_heads  # every layer and head


@pytest.mark.slow
@pytest.mark.parametrize("name, heads, layer", [("mamba2-austen", [0, 5], 0), ("rwkv7-austen", [0, 3], 1)])
def test_quickstart_runs_on_the_shipped_mamba2_and_rwkv7_models(tmp_path, name, heads, layer):
    summary = run_quickstart(tmp_path, model=name, heads=heads, n_features=16, k=2, steps=4, batch_size=16,
                             context=64, positions=16, buffer_size=64, input_scale_samples=64, heldout_samples=64,
                             eval_contexts=2, progress=False)
    assert summary["model"] == name and summary["site"] == f"blocks.{layer}.linear_attn.hook_state"  # its census's layer
    assert load_sae(tmp_path / "sae").cfg.model_name == name


def test_census_and_device_arguments_are_refused_in_one_line_before_any_work(tmp_path, capsys, monkeypatch):
    import writesae.cli as cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "_load_model", lambda args: pytest.fail("the model was loaded"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "argument --context: must be a positive integer, got 0" in cli_error(capsys, "census", "--context", "0")
    assert "argument --tokens: must be a positive integer, got -5" in cli_error(capsys, "census", "--tokens", "-5")
    assert "argument --state-every: must be a positive integer, got 0" in cli_error(capsys, "census", "--state-every", "0")
    err = cli_error(capsys, "census", "--device", "banana", "--out", "new")
    assert err.startswith("writesae census: error: argument --device: 'banana' is not a torch device") and err.count("\n") == 1
    err = cli_error(capsys, "train", "--layer", "4", "--device", "cuda")
    assert err.startswith("writesae train: error: argument --device: 'cuda': CUDA is not available on this machine")
    assert err.count("\n") == 1 and not Path("new").exists()
    assert "argument --device: 'cuda:0'" in cli_error(capsys, "eval", "gdn-austen/L5-state", "--device", "cuda:0")


def test_a_torn_last_metrics_line_is_dropped_on_resume_and_a_corrupt_line_is_named(tmp_path):
    from writesae.train import _drop_records_after, _log

    metrics = tmp_path / "metrics.jsonl"
    for step in (1, 2, 3):
        _log(metrics, {"step": step, "split": "train"}, None)
    whole = metrics.read_text()
    metrics.write_text(whole + '{"step": 4, "spl')  # a run killed in the middle of an append
    with pytest.warns(UserWarning, match=f"{re.escape(str(metrics))}: dropped its last line"):
        _drop_records_after(metrics, 2)
    assert metrics.read_text() == "".join(line + "\n" for line in whole.splitlines()[:2])
    metrics.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match=f"{re.escape(str(metrics))}, line 2: not a metrics record"):
        _drop_records_after(metrics, 2)
    metrics.write_text('{"step": 1}\n{"step": 2, "cut')  # a torn line that ends with a newline is no torn append
    with pytest.warns(UserWarning, match="dropped its last line"):
        _drop_records_after(metrics, 5)
    assert metrics.read_text() == '{"step": 1}\n'


def test_a_full_disk_during_a_checkpoint_save_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, capsys, monkeypatch):
    import errno

    from safetensors import SafetensorError

    import writesae.train as train_module

    text_folder(tmp_path / "corpus")
    saves = []

    def save_file(*args, **kwargs):
        saves.append(args[1])
        if len(saves) == 2:  # safetensors reports a full disk so
            raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space '
                                  'left on device" })')
        if len(saves) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    real = train_module.save_file
    monkeypatch.setattr(train_module, "save_file", save_file)
    out = tmp_path / "run"
    args = ["train", "--data", str(tmp_path / "corpus"), "--out", str(out), *SMALL["train"].split(), "--steps", "2",
            "--checkpoint-every", "1"]
    for _ in range(2):  # the second resumes from step 1 and fails the same way
        err = cli_error(capsys, *args).splitlines()[-1]  # after the warning that the FVU is above 1
        assert err.startswith("writesae train: error: could not write the step-2 checkpoint beside ")
        assert "No space left on device" in err and f"the previous checkpoint (step 1) is intact at {out / 'checkpoint'}" in err
        assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 1
        assert not [p.name for p in out.iterdir() if p.name.startswith(".checkpoint")]


def test_train_refuses_a_sae_folder_it_could_not_replace_before_loading_anything(tmp_path, capsys, monkeypatch):
    import writesae.cli as cli
    from writesae.outputs import claim_outputs

    claim_outputs(tmp_path, ["sae"])  # writesae made sae/ once; then the user put their notes in it
    (tmp_path / "sae").mkdir()
    (tmp_path / "sae" / "notes.txt").write_text("mine\n")
    monkeypatch.setattr(cli, "_load_model", lambda args: pytest.fail("the model was loaded"))
    err = cli_error(capsys, "train", "--layer", "4", "--out", str(tmp_path))
    assert f"{tmp_path / 'sae'} exists and is not an SAE folder" in err and err.count("\n") == 1
    assert (tmp_path / "sae" / "notes.txt").read_text() == "mine\n"


def test_a_failed_command_removes_only_the_out_it_created(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert "no such folder or shipped name" in cli_error(capsys, "train", "--layer", "4", "--model", "gdn-austn",
                                                         "--out", "new/run")
    assert not (tmp_path / "new").exists()
    (tmp_path / "mine").mkdir()
    assert "no such folder or shipped name" in cli_error(capsys, "census", "--model", "gdn-austn", "--out", "mine")
    assert (tmp_path / "mine").is_dir()  # the user's folder: kept, as the manifest the claim wrote in it


def test_dashboard_flags_default_to_the_librarys_and_reach_it_and_loss_tokens_0_skips_the_token_ablations(
        trained, tmp_path, monkeypatch):
    """--loss-tokens, --quantiles and --quantile-contexts default to build_dashboard's own defaults; given, they reach
    it; --loss-tokens 0 ablates only the carried KL's firings (horizon --horizon), no token's (horizon 1), and leaves
    every other hover's loss change null."""
    import functools
    import inspect

    import writesae.dashboard as dashboard

    library = {name: p.default for name, p in inspect.signature(dashboard.build_dashboard).parameters.items()}
    parsed = _parser().parse_args(["dashboard", "sae"])
    assert (parsed.loss_tokens, parsed.quantiles, parsed.quantile_contexts) == (
        library["loss_tokens"], library["n_quantiles"], library["quantile_contexts"])
    received, horizons = {}, []
    build, ablate = dashboard.build_dashboard, dashboard._ablate
    spy = functools.wraps(build)(lambda *a, **kw: received.update(kw) or build(*a, **kw))  # its signature: the CLI's defaults
    monkeypatch.setattr(dashboard, "build_dashboard", spy)
    monkeypatch.setattr(dashboard, "_ablate", lambda m, s, site, w, firings, *a, **kw:
                        horizons.extend(f.horizon for f in firings) or ablate(m, s, site, w, firings, *a, **kw))
    out = tmp_path / "dash"
    main(["dashboard", str(trained / "run" / "sae"), "--data", str(trained / "corpus"), *SMALL["eval"].split()[:6],
          "--context", "32", "--contexts", "2", "--features-per-head", "2", "--horizon", "3", "--loss-tokens", "0",
          "--quantiles", "2", "--quantile-contexts", "1", "--out", str(out), "--no-progress"])
    assert {k: received[k] for k in ("loss_tokens", "n_quantiles", "quantile_contexts")} == dict(
        loss_tokens=0, n_quantiles=2, quantile_contexts=1)
    assert horizons and set(horizons) == {3}  # the carried KL's ablations only
    cards = json.loads((out / "dashboard.json").read_text())["features"]
    fired = [card for card in cards if card["n_firings"]]
    assert fired and all(len(card["quantile_groups"]) == 2 for card in fired)
    assert all(len(group["contexts"]) <= 1 for card in fired for group in card["quantile_groups"])
    # a loss change only where the carried KL's ablation (the first --ablation-firings top contexts' firing) gave one
    kl_firings = {(card["feature"], c["window"], c["position"]) for card in fired for c in card["top_contexts"][:4]}
    hovers = [((card["feature"], c["window"], c["start"] + j), h) for card in fired
              for c in card["top_contexts"] + [c for g in card["quantile_groups"] for c in g["contexts"]]
              for j, h in enumerate(c["hovers"]) if h is not None]
    assert len(hovers) > len(kl_firings) and all(h["loss_change"] is None for at, h in hovers if at not in kl_firings)
