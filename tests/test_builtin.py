"""The built-in models: the shipped checkpoints meet the issue's acceptance, load by name, reproduce."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from workbench import builtin
from workbench.errors import CheckpointError, ConfigError, DataError
from workbench.loading import read_safetensors

TOYS = ("attn-only-2l", "attn-only-1l")


def _shipped(name):
    d = builtin.BUILTIN_DIR / name
    # shipped files are part of the project: their absence is a failure, not a skip
    assert (d / "config.json").is_file(), f"the built-in checkpoint {d} is missing; `workbench train {name} --ship`"
    return d


@pytest.fixture(scope="module")
def toy_scores():
    """Induction measurements of the shipped toys on 256 fresh repeated sequences (a second or two)."""
    from workbench.model import HookedGPT

    out = {}
    for name in TOYS:
        model = HookedGPT.load(_shipped(name)).eval()
        out[name] = builtin.induction_scores(model, builtin.get_recipe(name).synthetic)
    return out


def test_attn_only_2l_shows_the_induction_phase_change(toy_scores):
    s = toy_scores["attn-only-2l"]
    chance = math.log(63)
    assert s.loss_first > chance - 0.15, s  # a new token cannot be predicted: the first half stays at chance
    assert s.loss_repeat < 0.5 * chance, s  # the repeat is predicted from context
    assert s.induction[1].max() >= 0.35, s.induction
    assert s.prev_token[0].max() >= 0.3, s.prev_token


def test_attn_only_1l_has_no_induction_head_and_no_loss_drop(toy_scores):
    s, two = toy_scores["attn-only-1l"], toy_scores["attn-only-2l"]
    chance = math.log(63)
    assert s.induction.max() < 0.2, s.induction
    assert s.loss_first > chance - 0.15
    assert s.loss_repeat > 0.5 * chance and s.loss_repeat > two.loss_repeat + 1.0, (s.loss_repeat, two.loss_repeat)


def test_shipped_checkpoints_load_by_name():
    from workbench import load_model
    from workbench.zoo import zoo

    for name in (*TOYS, "kjv-small"):
        d = _shipped(name)
        assert zoo()[name].kind == "builtin"
        model = load_model(name)
        assert not model.training
        state = read_safetensors(d / "model.safetensors")
        for k, v in model.state_dict().items():
            assert torch.equal(v, state[k].float()), k
    assert load_model("kjv-small").tokenizer is not None


def test_snapshots_span_training_and_rebuild_the_model():
    name = "attn-only-2l"
    steps = builtin.snapshot_steps(name)
    assert steps == list(range(0, 2501, 100))
    final = builtin.load_snapshot(name, 2500)
    shipped = read_safetensors(_shipped(name) / "model.safetensors")
    for k, v in final.state_dict().items():
        # snapshots ship in fp16: equal to the final weights up to fp16 rounding
        torch.testing.assert_close(v, shipped[k], rtol=1e-3, atol=1e-4)
    recipe = builtin.get_recipe(name)
    start = builtin.induction_scores(builtin.load_snapshot(name, 0), recipe.synthetic)
    assert start.loss_repeat > math.log(63) - 0.1  # at initialisation nothing is predicted
    with pytest.raises(CheckpointError, match="no snapshot at step 150"):
        builtin.load_snapshot(name, 150)


def test_kjv_small_card_reports_validation_loss_per_checkpoint():
    d = _shipped("kjv-small")
    card = (d / "card.md").read_text()
    section = card.split("## Validation loss per checkpoint", 1)[1].split("##", 1)[0]
    rows = [line.split("|")[1:-1] for line in section.splitlines() if re.match(r"^\| \d+ \|", line)]
    steps = [int(r[0]) for r in rows]
    val = [float(r[2]) for r in rows]
    recipe = builtin.get_recipe("kjv-small")
    assert steps == list(range(recipe.train.checkpoint_every, recipe.train.steps + 1, recipe.train.checkpoint_every))
    # the table is the log: each value is the val_loss that metrics.jsonl recorded at that step
    _, evals = builtin._read_metrics(d)
    assert val == [round(evals[s]["val_loss"], 3) for s in steps]
    assert val[-1] < val[0] - 1.0 and val[-1] < 0.6 * math.log(2048)
    assert "## Greedy samples" in card and "workbench train kjv-small" in card


def test_card_metrics_split_losses_from_evaluations_by_step(tmp_path):
    records = [{"step": 2, "loss": 3.0}, {"step": 4, "loss": 2.5}, {"step": 4, "val_loss": 2.7, "answer": 1.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 6, "lo')
    logs, evals = builtin._read_metrics(tmp_path)  # the cut last line (a killed run) is left out
    assert logs == {2: records[0], 4: records[1]} and evals == {4: records[2]}
    (tmp_path / "metrics.jsonl").write_text('{"step": 2, "lo\n' + json.dumps(records[1]) + "\n")
    with pytest.raises(DataError, match=r"metrics\.jsonl line 1 is not JSON"):
        builtin._read_metrics(tmp_path)
    assert builtin._read_metrics(tmp_path / "no-run") == ({}, {})


def test_kjv_small_greedy_text_is_shaped_like_the_bible():
    from workbench import load_model

    model = load_model("kjv-small")
    text = model.generate("And the LORD said unto Moses,", max_new_tokens=40).texts[0]
    words = set(re.findall(r"[A-Za-z]+", text))
    assert len(words & {"unto", "thee", "thou", "thy", "LORD", "shall", "Israel", "children", "God", "ye"}) >= 2, text


def test_train_builtin_reproduces_bitwise_and_writes_a_card(tmp_path):
    a = builtin.train_builtin("attn-only-2l", out_dir=tmp_path / "a", steps=20, progress=False)
    b = builtin.train_builtin("attn-only-2l", out_dir=tmp_path / "b", steps=20, progress=False)
    assert a.step == b.step == 20 and a.train_loss == b.train_loss
    wa = read_safetensors(tmp_path / "a" / "model.safetensors")
    wb = read_safetensors(tmp_path / "b" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # 20 steps are not the shipped 2,500: the comparison says how far apart they are
    assert builtin.compare_with_shipped("attn-only-2l", tmp_path / "a") > 0.01
    card = (tmp_path / "a" / "card.md").read_text()
    assert "| steps | 20 |" in card and "| 20 |" in card.split("## Validation loss per checkpoint")[1]
    assert "workbench train attn-only-2l" in card
    assert builtin.snapshot_steps(tmp_path / "a") == [0]
    with pytest.raises(CheckpointError, match="already holds a training checkpoint"):
        builtin.train_builtin("attn-only-2l", out_dir=tmp_path / "a", steps=20, progress=False)


def test_ship_copies_a_finished_run_only(tmp_path, monkeypatch):
    run = tmp_path / "run"
    builtin.train_builtin("attn-only-1l", out_dir=run, steps=5, progress=False)
    monkeypatch.setattr(builtin, "BUILTIN_DIR", tmp_path / "data")
    target = builtin.ship("attn-only-1l", run)
    assert sorted(p.name for p in target.iterdir()) == sorted(
        ["config.json", "model.safetensors", "card.md", "metrics.jsonl", "snapshots"])
    assert builtin.compare_with_shipped("attn-only-1l", run) == 0.0
    with pytest.raises(CheckpointError, match="no finished run"):
        builtin.ship("attn-only-1l", tmp_path / "nothing")


def test_unknown_builtin_name_lists_the_recipes():
    with pytest.raises(ConfigError, match=r"no built-in model named 'gpt5'.*attn-only-1l"):
        builtin.train_builtin("gpt5")


def test_cli_lists_the_builtin_models(capsys):
    from workbench.cli import main

    assert main(["train", "--list"]) == 0
    out = capsys.readouterr().out
    for name in builtin.RECIPES:
        assert name in out
    assert main(["corpora"]) == 0
    assert "kjv" in capsys.readouterr().out


def test_recipe_windows_longer_than_the_model_context_are_refused():
    from dataclasses import replace

    recipe = builtin.get_recipe("kjv-small")
    bad = replace(recipe, corpus=replace(recipe.corpus, n_ctx=recipe.model["n_ctx"] * 2))
    with pytest.raises(ConfigError, match=r"windows of 256 tokens exceed the model's context n_ctx=128"):
        builtin.recipe_data(bad)
