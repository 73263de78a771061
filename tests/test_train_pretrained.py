"""The shipped model's training recipe on a tiny config: the decay initialisation, the frozen
fixed-decay heads, and a bit-exact resume after a kill."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from scripts import train_pretrained as recipe

from .conftest import tiny_hf_config

SETTINGS = recipe.TrainSettings(context=16, batch=2, steps=6, lr=1e-2, fixed_heads=(1, 3), fixed_half_lives=(16.0, 1024.0))


def _half_lives(mixer) -> torch.Tensor:
    return math.log(2) / (mixer.A_log.exp() * F.softplus(mixer.dt_bias))


def test_fixed_heads_get_the_log_spaced_half_lives_and_learned_heads_span_timescales():
    model = recipe.build_model(tiny_hf_config("grouped", num_hidden_layers=8), SETTINGS)
    mixers = recipe.gdn_mixers(model)
    spectrum = torch.logspace(math.log10(16), math.log10(1024), 2 * len(mixers), dtype=torch.float64)
    for layer, mixer in enumerate(mixers):
        assert torch.allclose(_half_lives(mixer)[[1, 3]].double(), spectrum[[layer, layer + len(mixers)]], rtol=1e-4)
        assert not mixer.in_proj_a.weight[[1, 3]].any()
        learned = mixer.A_log.exp()[[0, 2]]
        assert ((learned >= 1) & (learned <= 16)).all()
    learned_dt = torch.cat([F.softplus(m.dt_bias)[[0, 2]] for m in mixers])
    assert ((learned_dt >= 1e-3 * 0.999) & (learned_dt <= 1e-1 * 1.001)).all()


def test_training_moves_only_the_learned_heads_decay_and_decays_no_decay_parameter(tmp_path):
    model = recipe.build_model(tiny_hf_config("grouped"), SETTINGS)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    stream = torch.randint(0, 101, (500,))
    recipe.train(model, stream, SETTINGS, tmp_path / "ck.pt")
    for name, p in model.named_parameters():
        if name.endswith(("A_log", "dt_bias", "in_proj_a.weight")):
            assert torch.equal(p[[1, 3]], before[name][[1, 3]]), name
            assert not torch.equal(p[[0, 2]], before[name][[0, 2]]), name
    groups = recipe.parameter_groups(model, 0.1)
    no_decay = {id(p) for p in groups[1]["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in no_decay}
    assert all(n.endswith(("A_log", "dt_bias")) or "norm" in n or n.endswith("bias") for n in names)
    assert any(n.endswith("A_log") for n in names) and not any(n.endswith("in_proj_qkv.weight") for n in names)


class _Killed(Exception):
    pass


def test_resume_after_a_kill_is_bit_exact(tmp_path):
    stream = torch.randint(0, 101, (500,))
    config = tiny_hf_config("grouped")
    straight = recipe.build_model(config, SETTINGS)
    assert recipe.train(straight, stream, SETTINGS, tmp_path / "straight.pt", checkpoint_every=2) == SETTINGS.steps

    def kill_at_5(step, loss):
        if step == 5:  # after the checkpoint of step 4, before that of step 6
            raise _Killed

    interrupted = recipe.build_model(config, SETTINGS)
    with pytest.raises(_Killed):
        recipe.train(interrupted, stream, SETTINGS, tmp_path / "resumed.pt", checkpoint_every=2, on_step=kill_at_5)
    assert torch.load(tmp_path / "resumed.pt", weights_only=True)["step"] == 4
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left behind
    resumed = recipe.build_model(config, SETTINGS)  # a fresh process: the initialisation again
    assert recipe.train(resumed, stream, SETTINGS, tmp_path / "resumed.pt", checkpoint_every=2) == SETTINGS.steps
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_resuming_with_other_settings_is_refused(tmp_path):
    stream = torch.randint(0, 101, (500,))
    model = recipe.build_model(tiny_hf_config("grouped"), SETTINGS)
    recipe.train(model, stream, SETTINGS, tmp_path / "ck.pt", checkpoint_every=2)
    other = recipe.TrainSettings(**{**SETTINGS.__dict__, "lr": 5e-3})
    with pytest.raises(ValueError, match="resume with the same settings"):
        recipe.train(recipe.build_model(tiny_hf_config("grouped"), other), stream, other, tmp_path / "ck.pt")
