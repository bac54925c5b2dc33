"""The run scaffold the trainers share (workbench.runs)."""

import pickle

import pytest
import torch

from workbench.errors import CheckpointError
from workbench.runs import (
    LRSchedule,
    MetricsLog,
    check_same_settings,
    lr_at,
    read_checkpoint,
    read_metrics,
    write_checkpoint,
)


class _Cfg:
    def __init__(self, schedule):
        self.schedule = schedule


def test_lr_at_follows_both_decays():
    cosine = _Cfg(LRSchedule(lr=1.0, total_steps=12, warmup_steps=2, decay="cosine", min_lr_ratio=0.1))
    assert [lr_at(cosine, s) for s in (0, 1, 2)] == pytest.approx([0.5, 1.0, 1.0])
    assert lr_at(cosine, 7) == pytest.approx(0.55)  # half way through the cosine: midway to the floor
    linear = _Cfg(LRSchedule(lr=2.0, total_steps=10, decay="linear", decay_fraction=0.5))
    assert [lr_at(linear, s) for s in (0, 4, 5, 9)] == pytest.approx([2.0, 2.0, 2.0, 0.4])


def test_checkpoint_round_trip_is_atomic_and_refuses_pickled_code(tmp_path):
    path = tmp_path / "run" / "state.pt"
    write_checkpoint(path, {"step": 3, "w": torch.arange(4.0)})
    state = read_checkpoint(path, "cpu")
    assert state["step"] == 3 and torch.equal(state["w"], torch.arange(4.0))
    assert sorted(p.name for p in path.parent.iterdir()) == ["state.pt"]  # no temporary file left behind
    path.write_bytes(pickle.dumps(_Cfg(1), protocol=2))  # an object torch's weights-only unpickler must not build
    with pytest.raises(CheckpointError, match="cannot be read as a training checkpoint"):
        read_checkpoint(path, "cpu")


def test_settings_check_names_the_changed_field_and_metrics_restart(tmp_path):
    with pytest.raises(CheckpointError, match=r"'lr': \(1, 2\).*so choose again"):
        check_same_settings({"lr": 1, "log_every": 5}, {"lr": 2, "log_every": 9}, {"log_every"}, tmp_path / "c.pt",
                            "choose again")
    check_same_settings({"lr": 1, "log_every": 5}, {"lr": 1, "log_every": 9}, {"log_every"}, tmp_path / "c.pt", "-")
    log = MetricsLog(tmp_path / "m.jsonl", None)
    for step in (1, 2, 3):
        log.write({"step": step})
    MetricsLog(tmp_path / "m.jsonl", 2)  # resuming from step 2 drops step 3
    assert read_metrics(tmp_path / "m.jsonl") == [{"step": 1}, {"step": 2}]
