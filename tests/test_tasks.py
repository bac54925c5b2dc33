"""IOI, greater-than and file tasks (workbench/analysis/tasks.py), for the shipped kjv-small tokenizer and SmolLM2's."""

from __future__ import annotations

import json

import pytest
import torch

from workbench import load_model
from workbench.analysis import tasks as T
from workbench.errors import InputError


@pytest.fixture(scope="module")
def kjv():
    return load_model("kjv-small").eval()


def _check_ioi(model, task):
    tok = model.tokenizer
    assert task.clean.shape == task.corrupt.shape
    differ = (task.clean != task.corrupt).sum(1)
    assert (differ == 1).all()  # only the second mention of the subject changes
    io, s = task.metric.answer, task.metric.wrong
    for i, text in enumerate(task.clean_text):
        words = text.replace(",", "").replace(".", "").split()
        io_name, s_name = tok.decode([int(io[i])]).strip(), tok.decode([int(s[i])]).strip()
        assert words.count(io_name) == 1 and words.count(s_name) == 2
        assert io_name not in task.corrupt_text[i].split(".")[1]  # the third name is neither
    orders = {t.split(" and ")[0].split()[-1] == tok.decode([int(io[i])]).strip()
              for i, t in enumerate(task.clean_text)}
    assert orders == {True, False}  # ABBA and BABA


def test_ioi_for_a_small_tokenizer(kjv):
    task = T.ioi_task(kjv, n=12)
    assert len(task.clean_text) == 12
    _check_ioi(kjv, task)


def test_greater_than_pairs(kjv):
    task = T.greater_than_task(kjv, n=10)
    for clean, corrupt in zip(task.clean_text, task.corrupt_text):
        assert corrupt.split("year ")[1].startswith(clean.split("year ")[1][:2] + "01 ")
        assert clean.rsplit(" ", 1)[1] == clean.split("year ")[1][:2]  # ends in the century of the start year
    assert task.clean.shape == task.corrupt.shape


def test_file_task_and_its_errors(kjv, tmp_path):
    good = [{"clean": "In the beginning God", "corrupt": "In the beginning Moses", "answer": " the", "wrong": " and"}]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in good * 3))
    task = T.load_task(kjv, str(path))
    assert task.clean.shape[0] == 3 and task.metric.answer.tolist() == [T.single_token(kjv, " the")] * 3
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([dict(good[0], answer=" Nebuchadnezzarxyz")]))
    with pytest.raises(InputError, match="Nebuchadnezzarxyz"):
        T.load_task(kjv, str(bad))
    uneven = tmp_path / "uneven.json"
    uneven.write_text(json.dumps(good + [dict(good[0], corrupt="In the beginning was the Word of")]))
    with pytest.raises(InputError, match="pair 1"):
        T.load_task(kjv, str(uneven))
    with pytest.raises(InputError, match="unknown task"):
        T.load_task(kjv, "induction")


@pytest.mark.smollm2
def test_smollm2_does_both_tasks(smollm2):
    ioi = T.ioi_task(smollm2, n=8)
    _check_ioi(smollm2, ioi)
    gt = T.greater_than_task(smollm2, n=8)
    with torch.no_grad():
        for task in (ioi, gt):
            clean = float(task.metric(smollm2(task.clean)[:, -1]).mean())
            corrupt = float(task.metric(smollm2(task.corrupt)[:, -1]).mean())
            assert clean > corrupt + 0.3, (task.name, clean, corrupt)
