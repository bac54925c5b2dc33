"""The training loop: exact resume, divergence handling, config checks, metrics, schedule, snapshots."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import hold_output_lock, tiny_cfg

from workbench import HookedGPT
from workbench.corpora import RepeatedTokensConfig, SyntheticBatches
from workbench.errors import CheckpointError, ConfigError, DataError
from workbench.loading import read_safetensors
from workbench.train import (
    CHECKPOINT_DIR,
    METRICS_FILE,
    SNAPSHOT_DIR,
    IterableBatches,
    TrainConfig,
    TrainingDivergedError,
    checkpoint_path,
    lr_at,
    read_metrics,
    train,
)

DATA = RepeatedTokensConfig(d_vocab=50, n_ctx=24, min_offset=4, max_offset=10)


@pytest.fixture(autouse=True)
def _one_thread():
    # bitwise comparisons need a fixed summation order; one thread also keeps the shared CPU free
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model(seed=0, **overrides):
    model = HookedGPT(tiny_cfg(**overrides), init=False)
    model.init_weights(seed=seed)
    return model


def _cfg(**overrides):
    base = dict(steps=12, lr=3e-3, warmup_steps=3, checkpoint_every=4, log_every=2, eval_every=4)
    base.update(overrides)
    return TrainConfig(**base)


def _batches():
    return SyntheticBatches(DATA, batch_size=8, seed=1)


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs by {(a[k] - b[k]).abs().max()}"


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory):
    """An uninterrupted 12-step run: its final weights and directory."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("unbroken")
    model = _model()
    train(model, _batches(), _cfg(snapshot_steps=(0, 3, 12)), out, progress=False)
    return _weights(model), out


def test_run_stopped_and_resumed_ends_with_the_unbroken_weights(unbroken, tmp_path):
    want, _ = unbroken
    stopped = train(_model(), _batches(), _cfg(), tmp_path, stop_at=5, progress=False)
    assert stopped.step == 5
    assert torch.load(checkpoint_path(tmp_path), weights_only=True)["step"] == 5
    assert not (tmp_path / "model.safetensors").exists()  # the final model is written only at the end
    # a fresh process would build the model from another seed: the checkpoint must overwrite everything
    resumed = _model(seed=99)
    result = train(resumed, _batches(), _cfg(), tmp_path, resume=True, progress=False)
    assert result.step == 12
    _assert_same(_weights(resumed), want)
    _assert_same(read_safetensors(tmp_path / "model.safetensors"), want)


class _Killed(Exception):
    pass


def test_run_killed_mid_interval_resumes_from_its_last_checkpoint(unbroken, tmp_path):
    """A crash at step 10 (checkpoints every 4) loses steps 9-10; the resumed run redoes them identically."""
    want, _ = unbroken

    def crash(model):
        if crash.calls == 4:  # evaluations run at steps 2, 4, 6, 8, 10: die at the fifth
            raise _Killed
        crash.calls += 1
        return {}

    crash.calls = 0
    with pytest.raises(_Killed):
        train(_model(), _batches(), _cfg(eval_every=2), tmp_path, evaluate=crash, progress=False)
    assert torch.load(checkpoint_path(tmp_path), weights_only=True)["step"] == 8
    with (tmp_path / METRICS_FILE).open("a") as f:
        f.write('{"step": 10, "lo')  # a kill mid-write also leaves a log line cut short
    resumed = _model(seed=5)
    train(resumed, _batches(), _cfg(), tmp_path, resume=True, progress=False)
    _assert_same(_weights(resumed), want)
    # metrics read as one run: no step logged twice, nothing past the end
    steps = [r["step"] for r in map(json.loads, (tmp_path / METRICS_FILE).read_text().splitlines()) if "loss" in r]
    assert steps == list(range(2, 13, 2))


def test_iterable_batches_resume_like_an_unbroken_run(tmp_path):
    gen_batches = lambda: (SyntheticBatches(DATA, 8, seed=3).batch(s) for s in range(100))  # noqa: E731
    a = _model()
    train(a, IterableBatches(gen_batches), _cfg(steps=6), tmp_path / "a", progress=False)
    train(_model(), IterableBatches(gen_batches), _cfg(steps=6), tmp_path / "b", stop_at=3, progress=False)
    b = _model(seed=7)
    train(b, IterableBatches(gen_batches), _cfg(steps=6), tmp_path / "b", resume=True, progress=False)
    _assert_same(_weights(a), _weights(b))


def test_nan_loss_stops_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    saved = {}

    def poison(model):
        if saved.get("step") is None and checkpoint_path(tmp_path).is_file():
            # at the evaluation of step 6 the step-4 checkpoint exists: remember it, then break the model
            saved["bytes"] = checkpoint_path(tmp_path).read_bytes()
            saved["step"] = 6
            with torch.no_grad():
                model.embed.W_E.fill_(float("nan"))
        return {}

    with pytest.raises(TrainingDivergedError, match=r"loss became nan at step 7.*last good checkpoint \(step 4\)"):
        train(_model(), _batches(), _cfg(eval_every=2), tmp_path, evaluate=poison, progress=False)
    assert checkpoint_path(tmp_path).read_bytes() == saved["bytes"]
    state = torch.load(checkpoint_path(tmp_path), weights_only=True)
    assert state["step"] == 4 and all(torch.isfinite(v).all() for v in state["model"].values())
    assert (tmp_path / CHECKPOINT_DIR).is_dir() and not (tmp_path / "model.safetensors").exists()


def test_nan_before_any_checkpoint_says_so(tmp_path):
    model = _model()
    with torch.no_grad():
        model.embed.W_E.fill_(float("inf"))
    with pytest.raises(TrainingDivergedError, match="at step 1.*no checkpoint had been written"):
        train(model, _batches(), _cfg(), tmp_path, progress=False)


def test_checkpoint_from_another_config_is_refused(tmp_path):
    train(_model(), _batches(), _cfg(), tmp_path, stop_at=4, progress=False)
    before = checkpoint_path(tmp_path).read_bytes()
    with pytest.raises(CheckpointError, match=r"different model config.*d_model.*\(32, 48\)"):
        train(_model(d_model=48), _batches(), _cfg(), tmp_path, resume=True, progress=False)
    with pytest.raises(CheckpointError, match=r"different training settings.*'lr': \(0.003, 0.001\)"):
        train(_model(), _batches(), _cfg(lr=1e-3), tmp_path, resume=True, progress=False)
    with pytest.raises(CheckpointError, match="already holds a training checkpoint"):
        train(_model(), _batches(), _cfg(), tmp_path, progress=False)
    with pytest.raises(CheckpointError, match="no checkpoint to resume"):
        train(_model(), _batches(), _cfg(), tmp_path / "empty", resume=True, progress=False)
    assert checkpoint_path(tmp_path).read_bytes() == before  # nothing lost
    # what may change on resume (logging, checkpoint cadence) is accepted
    train(_model(), _batches(), _cfg(log_every=3, checkpoint_every=6), tmp_path, resume=True, progress=False)


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    path = checkpoint_path(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be read"):
        train(_model(), _batches(), _cfg(), tmp_path, resume=True, progress=False)


def test_windows_longer_than_the_context_are_refused(tmp_path):
    long_data = RepeatedTokensConfig(d_vocab=50, n_ctx=40, min_offset=4, max_offset=10)
    with pytest.raises(ConfigError, match=r"windows have 40 tokens but the model's context is 24"):
        train(_model(), SyntheticBatches(long_data, 8), _cfg(), tmp_path, progress=False)


def test_metrics_jsonl_logs_losses_and_evaluations(unbroken):
    _, out = unbroken
    records = [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines()]
    logs = [r for r in records if "loss" in r]
    assert [r["step"] for r in logs] == list(range(2, 13, 2))
    assert {"step", "loss", "lr", "grad_norm", "tokens", "elapsed_s"} <= logs[0].keys()
    assert logs[-1]["tokens"] == 12 * 8 * 24
    assert all(math.isfinite(r["loss"]) for r in logs)
    # the logged lr is the one the step used (steps are logged by count done, lr_at takes the 0-based index)
    assert [r["lr"] for r in logs] == [lr_at(_cfg(), r["step"] - 1) for r in logs]


def test_read_metrics_skips_a_cut_last_line_and_names_a_corrupt_one(unbroken, tmp_path):
    _, out = unbroken
    text = (out / METRICS_FILE).read_text()
    lines = text.splitlines()
    assert read_metrics(out / METRICS_FILE) == [json.loads(line) for line in lines]
    # a job killed mid-write leaves half a record without its newline: the complete records still read
    cut = tmp_path / "cut.jsonl"
    cut.write_text(text + lines[-1][: len(lines[-1]) // 2])
    assert read_metrics(cut) == [json.loads(line) for line in lines]
    # the same damage before the last line is corruption, reported with the file and the 1-based line
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines[:2] + [lines[2][:10]] + lines[3:]) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl line 3 is not JSON"):
        read_metrics(bad)
    (tmp_path / "list.jsonl").write_text(lines[0] + "\n[1, 2]\n" + lines[1] + "\n")
    with pytest.raises(DataError, match=r"list\.jsonl line 2 is not a metrics record"):
        read_metrics(tmp_path / "list.jsonl")
    with pytest.raises(DataError, match=r"cannot read the training log .*missing\.jsonl"):
        read_metrics(tmp_path / "missing.jsonl")


def test_validation_and_extra_evaluations_are_logged(tmp_path):
    val = SyntheticBatches(DATA, 16, seed=42).batch(0)
    result = train(_model(), _batches(), _cfg(steps=8), tmp_path, val_windows=val,
                   evaluate=lambda m: {"answer": 42.0}, progress=False)  # fmt: skip
    evals = [r for r in map(json.loads, (tmp_path / METRICS_FILE).read_text().splitlines()) if "loss" not in r]
    assert [r["step"] for r in evals] == [4, 8]
    assert all(r["answer"] == 42.0 for r in evals)
    assert result.val_loss == evals[-1]["val_loss"]
    from workbench.train import evaluate_loss

    assert evaluate_loss(HookedGPT.load(tmp_path), val, _cfg()) == pytest.approx(result.val_loss, abs=1e-6)


def test_lr_schedule_is_linear_warmup_then_cosine():
    cfg = TrainConfig(steps=110, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    lrs = [lr_at(cfg, s) for s in range(cfg.steps)]
    assert lrs[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the decay
    assert lrs[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 99 / 100)))
    decay = lrs[10:]
    assert all(a >= b for a, b in zip(decay, decay[1:]))
    assert min(lrs) >= 0.1 - 1e-12
    no_warmup = TrainConfig(steps=5, lr=2.0, warmup_steps=0)
    assert lr_at(no_warmup, 0) == pytest.approx(2.0)


def test_snapshots_are_written_at_the_chosen_steps(unbroken, tmp_path):
    want, out = unbroken
    assert sorted(p.name for p in (out / SNAPSHOT_DIR).iterdir()) == ["step_000000", "step_000003", "step_000012"]
    _assert_same(read_safetensors(out / SNAPSHOT_DIR / "step_000012" / "model.safetensors"), want)
    init = read_safetensors(out / SNAPSHOT_DIR / "step_000000" / "model.safetensors")
    _assert_same(init, _weights(_model()))
    # the step-3 snapshot is the state after 3 optimiser steps: a run stopped there holds the same weights
    stopped = _model()
    train(stopped, _batches(), _cfg(), tmp_path, stop_at=3, progress=False)
    _assert_same(read_safetensors(out / SNAPSHOT_DIR / "step_000003" / "model.safetensors"), _weights(stopped))


def test_bad_train_configs_are_refused():
    with pytest.raises(ConfigError, match="outside"):
        TrainConfig(steps=10, snapshot_steps=(11,))
    with pytest.raises(ConfigError, match="precision"):
        TrainConfig(steps=10, precision="fp8")
    with pytest.raises(ConfigError, match="steps must be at least 1"):
        TrainConfig(steps=0)


def test_bf16_autocast_trains(tmp_path):
    model = _model()
    result = train(model, _batches(), _cfg(steps=4, precision="bf16"), tmp_path, progress=False)
    assert math.isfinite(result.train_loss)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # weights stay fp32


# --- issue 13: no unpickling of a checkpoint, one writer per run directory


class _RunsCode:
    """Pickles to a call of ``os.system``: unpickling it with weights_only=False would run the command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_resume_never_unpickles_a_crafted_checkpoint(tmp_path):
    marker = tmp_path / "pwned"
    path = checkpoint_path(tmp_path / "run")
    path.parent.mkdir(parents=True)
    torch.save({"step": 1, "payload": _RunsCode(marker)}, path)
    with pytest.raises(CheckpointError, match="cannot be read as a training checkpoint.*delete it to start over"):
        train(_model(), _batches(), _cfg(), tmp_path / "run", resume=True, progress=False)
    assert not marker.exists()
    # the same file unpickled the unsafe way does run the command: the test can fail
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_checkpoint_of_plain_containers_but_wrong_layout_is_a_checkpoint_error(tmp_path):
    path = checkpoint_path(tmp_path)
    path.parent.mkdir(parents=True)
    torch.save({"step": "three", "model": [1, 2]}, path)
    with pytest.raises(CheckpointError, match="not a training checkpoint .*step.*delete it"):
        train(_model(), _batches(), _cfg(), tmp_path, resume=True, progress=False)


def test_second_writer_on_a_run_directory_fails_at_once_and_the_first_finishes(tmp_path):
    from workbench.locking import OutputLockedError

    with hold_output_lock(tmp_path) as pid:
        with pytest.raises(OutputLockedError, match=rf"another process is writing .*pid {pid}"):
            train(_model(), _batches(), _cfg(), tmp_path, progress=False)
        assert not (tmp_path / METRICS_FILE).exists()  # failed before writing anything
    result = train(_model(), _batches(), _cfg(), tmp_path, progress=False)
    assert result.step == 12 and HookedGPT.load(tmp_path) is not None


# ------------------------------------------------------------------------ workbench train: flags from LMTrainConfig


def test_train_command_has_a_flag_per_training_setting_and_overrides_only_those_given(tmp_path, capsys):
    """Every LMTrainConfig field but snapshot_steps and device is a flag whose default is the recipe's value;
    the run's checkpoint holds the recipe's settings with the given ones changed."""
    from dataclasses import asdict, fields

    from workbench import builtin, cli
    from workbench.commands.train import RECIPE, TRAIN_FLAGS, train_overrides
    from workbench.train import LMTrainConfig, checkpoint_path

    parser = cli.build_parser()
    args = parser.parse_args(["train", "attn-only-1l"])
    flagged = {f.name for f in TRAIN_FLAGS.fields()}
    assert flagged == {f.name for f in fields(LMTrainConfig)} - {"snapshot_steps", "device"}
    assert all(getattr(args, TRAIN_FLAGS.dest(name)) is RECIPE for name in flagged) and train_overrides(args) == {}
    args = parser.parse_args(["train", "attn-only-1l", "--lr", "2e-3", "--precision", "bf16", "--log-every", "1"])
    assert train_overrides(args) == {"lr": 2e-3, "precision": "bf16", "log_every": 1}

    out = tmp_path / "run"
    assert cli.main(["train", "attn-only-1l", "--steps", "2", "--lr", "2e-3", "--log-every", "1", "--out", str(out),
                     "--no-progress"]) == 0
    assert "trained attn-only-1l: step 2" in capsys.readouterr().out
    saved = torch.load(checkpoint_path(out), weights_only=True)["train_config"]
    recipe = asdict(builtin.get_recipe("attn-only-1l").with_steps(2).train)
    recipe["snapshot_steps"] = list(recipe["snapshot_steps"])
    assert saved == {**recipe, "lr": 2e-3, "log_every": 1}


def test_train_command_refuses_values_the_config_cannot_use(capsys):
    from workbench import cli

    assert cli.main(["train", "attn-only-1l", "--lr", "0"]) == 1
    assert "--lr 0.0 is out of range" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["train", "attn-only-1l", "--precision", "fp8"])
    assert "invalid choice: 'fp8'" in capsys.readouterr().err
