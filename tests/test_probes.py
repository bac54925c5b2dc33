"""Linear probes: a planted direction is recovered, the control task stays at chance, activations are read at the
stated position (padding never reaches it), directions round-trip, and bad datasets are clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from workbench.analysis import probes as P
from workbench.analysis.probe_data import (
    ProbeDataset,
    load_probe_dataset,
    read_positions,
    sentiment_statements,
    truth_dataset,
)
from workbench.errors import DataError, HookError, InputError


@pytest.fixture(scope="module")
def tiny_lm(app_home):
    """A random 2-layer GPT with a small BPE tokenizer (conftest's app model)."""
    from workbench import HookedGPT

    return HookedGPT.load(app_home / "models" / "tiny-lm").eval()


def _planted(n=400, d=32, n_types=40, seed=0):
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(d, generator=gen)
    u /= u.norm()
    y = torch.arange(n) % 2
    X = torch.randn(n, d, generator=gen) + 1.5 * (2 * y[:, None] - 1) * u  # class means +-1.5 u, unit noise
    types = torch.randint(0, n_types, (n,), generator=gen).tolist()
    return X, y.tolist(), types, u


def test_planted_direction_is_recovered_and_the_control_task_stays_at_chance(one_thread):
    X, y, types, u = _planted()
    res = P.train_probes(X[None], y, ["blocks.0.hook_resid_post"], types)
    cos_logistic = float(res.directions[0] @ u)
    cos_mean = float(res.mean_diff_directions[0] @ u)
    print(f"planted direction: cosine logistic {cos_logistic:.3f}, mean difference {cos_mean:.3f}; held-out accuracy "
          f"{float(res.accuracy[0]):.3f}, control {float(res.control_accuracy[0]):.3f}")
    assert cos_logistic >= 0.95 and cos_mean >= 0.95
    assert float(res.accuracy[0]) > 0.9 and float(res.mean_diff_accuracy[0]) > 0.9
    assert abs(float(res.control_accuracy[0]) - 0.5) < 0.12  # activations say nothing about the random type labels
    assert float(res.selectivity[0]) > 0.3
    assert res.n_train + res.n_test == len(y)
    frame = res.frame()
    assert list(frame.columns[:3]) == ["layer", "hook", "accuracy"] and frame.layer.tolist() == [0]


def test_probe_score_and_direction_round_trip(tmp_path, one_thread):
    X, y, types, u = _planted()
    res = P.train_probes(X[None], y, ["blocks.0.hook_resid_post"], types)
    d = res.direction(0)
    scores = X @ d.weight + d.bias
    assert float(((scores > 0).long() == torch.tensor(y)).float().mean()) > 0.9
    assert d.meta["class_gap"] == pytest.approx(float(res.mean_diff[0] @ d.vector))
    back = P.ProbeDirection.load(d.save(tmp_path / "dir"))
    torch.testing.assert_close(back.vector, d.vector)
    assert back.hook == d.hook and back.method == "logistic" and back.bias == pytest.approx(d.bias)
    assert back.meta["accuracy"] == pytest.approx(float(res.accuracy[0]))
    assert P.ProbeDirection.load(res.direction(0, "mean_diff").save(tmp_path / "md")).method == "mean_diff"
    with pytest.raises(Exception, match="no saved direction"):
        P.ProbeDirection.load(tmp_path / "nothing")


def test_C_chosen_by_cross_validated_selectivity(one_thread):
    X, y, types, u = _planted(n=200)
    Xn, yn = X.double().numpy(), np.asarray(y)
    cfg = P.ProbeConfig(Cs=(1e-3, 1e-2, 1e-1, 1.0), choose_C_by="selectivity")
    # control labels equal to the task's: every C is exactly as selective (0), so the strongest regularisation wins
    assert P.selective_C(Xn, yn, yn, cfg) == 1e-3
    control = P.control_labels(types)
    C = P.selective_C(Xn, yn, control, cfg)
    assert C in cfg.Cs
    res = P.train_probes(X[None], y, ["blocks.0.hook_resid_post"], types, cfg)
    train, _ = P.split(yn, cfg)
    assert float(res.C[0]) == pytest.approx(P.selective_C(Xn[train], yn[train], control[train], cfg))
    assert float(res.accuracy[0]) > 0.8 and float(res.selectivity[0]) > 0.2  # 50 held out: a coarse check
    with pytest.raises(InputError, match="choose_C_by"):
        P.ProbeConfig(choose_C_by="luck")


def test_control_labels_follow_the_type():
    labels = P.control_labels(["a", "b", "a", "c", "d", "b"], seed=1)
    assert labels[0] == labels[2] and labels[1] == labels[5]
    assert set(labels.tolist()) == {0, 1}
    with pytest.raises(DataError, match="two token types"):
        P.control_labels(["x"] * 5)


def test_activations_are_read_at_the_position_padding_never_reaches_it(tiny_lm):
    texts = ["The cat sat on the mat.", "John gave a drink.", "One two three four five six seven eight."]
    ds = ProbeDataset(texts, [0, 1, 0])
    reads = read_positions(tiny_lm, ds)
    hooks = P.probe_hooks(tiny_lm, "resid_post")
    acts = P.collect_activations(tiny_lm, reads, hooks, batch_size=3)  # one right-padded batch
    for i, ids in enumerate(reads.tokens):
        _, cache = tiny_lm.run_with_cache(torch.tensor([ids]), names_filter=hooks)
        for h, name in enumerate(hooks):
            torch.testing.assert_close(acts[h, i], cache[name][0, len(ids) - 1], atol=1e-5, rtol=1e-5)


def test_a_marker_says_which_token_is_read(tiny_lm):
    ds = ProbeDataset(["The capital of France is Paris<<>>. The cat sat."], [1], position="<<>>")
    reads = read_positions(tiny_lm, ds)
    ids, pos = reads.tokens[0], reads.positions[0]
    assert ids == tiny_lm.tokenizer.encode("The capital of France is Paris. The cat sat.")
    pieces = tiny_lm.to_str_tokens(ids)  # (BOS first: this tokenizer adds one)
    assert "".join(pieces[: pos + 1]).endswith("The capital of France is Paris") and pieces[pos + 1] == "."
    assert reads.types[0] == (ids[pos - 1], ids[pos])


def test_generated_statements_pair_every_fact_with_a_false_answer():
    ds = truth_dataset(n_per_family=40)
    assert ds.counts()[0] == ds.counts()[1]
    assert set(ds.groups) == {"capitals", "arithmetic", "comparisons"}
    assert "The capital of France is Paris." in ds.texts
    sums = [t for t, g in zip(ds.texts, ds.groups) if g == "arithmetic"]
    for text, label in zip(ds.texts, ds.labels):
        if "+" in text:
            a, rest = text.rstrip(".").split(" + ")
            b, c = rest.split(" = ")
            assert (int(a) + int(b) == int(c)) == bool(label), text
    assert len(sums) == 40
    assert truth_dataset(("capitals",)).texts == truth_dataset(("capitals",)).texts  # seeded
    assert sentiment_statements().counts() == (64, 64)
    with pytest.raises(InputError, match="families"):
        truth_dataset(("physics",))


def test_probe_model_end_to_end_on_a_tiny_model(tiny_lm, one_thread):
    res = P.probe_model(tiny_lm, sentiment_statements(), "resid_post", cfg=P.ProbeConfig(Cs=(0.1, 1.0)))
    assert res.hooks == ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    assert res.meta["dataset"] == "sentiment" and res.meta["d_model"] == tiny_lm.cfg.d_model
    assert res.directions.shape == (2, tiny_lm.cfg.d_model)
    assert ((res.accuracy >= 0) & (res.accuracy <= 1)).all()
    proj = P.project(tiny_lm, sentiment_statements(), res.direction(1))
    assert proj.shape == (128,)


# ------------------------------------------------------------------------------------------- bad input


def test_user_files_csv_and_jsonl(tmp_path):
    rows = [(f"good thing {i}", "true") for i in range(10)] + [(f"bad thing {i}", "0") for i in range(10)]
    csv = tmp_path / "d.csv"
    csv.write_text("text,label\n" + "\n".join(f"{t},{lbl}" for t, lbl in rows))
    ds = load_probe_dataset(csv)
    assert ds.counts() == (10, 10) and ds.labels[0] == 1 and ds.name == "d"
    jl = tmp_path / "d.jsonl"
    jl.write_text("\n".join(json.dumps({"text": t + " <<>>end", "label": lbl == "true"}) for t, lbl in rows))
    assert load_probe_dataset(jl, position="<<>>").counts() == (10, 10)


def test_bad_datasets_are_clear_errors(tmp_path, tiny_lm):
    one_class = tmp_path / "one.csv"
    one_class.write_text("text,label\n" + "\n".join(f"x {i},1" for i in range(20)))
    with pytest.raises(DataError, match="both"):
        load_probe_dataset(one_class)
    bad_label = tmp_path / "bad.csv"
    bad_label.write_text("text,label\nhello,maybe\n")
    with pytest.raises(DataError, match=r"bad.csv:2: label 'maybe' does not parse"):
        load_probe_dataset(bad_label)
    few = tmp_path / "few.jsonl"
    few.write_text("\n".join(json.dumps({"text": f"t{i}", "label": i % 2}) for i in range(12)))
    with pytest.raises(DataError, match="at least 10 of each"):
        load_probe_dataset(few)
    marked = tmp_path / "marked.jsonl"
    marked.write_text("\n".join(json.dumps({"text": f"t{i}" + ("" if i == 7 else " <<>>"), "label": i % 2})
                                for i in range(30)))
    with pytest.raises(DataError, match="marker '<<>>' is absent from 1 text"):
        load_probe_dataset(marked, position="<<>>")
    with pytest.raises(DataError, match="columns"):
        (tmp_path / "cols.csv").write_text("sentence,y\na,1\n")
        load_probe_dataset(tmp_path / "cols.csv")
    with pytest.raises(DataError, match="not a JSON object"):
        (tmp_path / "broken.jsonl").write_text('{"text": "a", "label": 1}\n{"text": \n')
        load_probe_dataset(tmp_path / "broken.jsonl")
    with pytest.raises(InputError, match="layer 2 is out of range.*0..1"):
        P.probe_hooks(tiny_lm, "resid_post", [0, 2])
    with pytest.raises(HookError, match="nearest"):
        P.probe_hooks(tiny_lm, "hook_resid_pots", [0])
    X, y, types, _ = _planted(n=16)
    with pytest.raises(DataError, match="at least 10"):
        P.train_probes(X[None], y, ["h"], types)
    d = P.ProbeDirection(torch.ones(7), "blocks.0.hook_resid_post", "logistic", torch.ones(7), 0.0)
    with pytest.raises(InputError, match=r"shape \(7,\).*width 32"):
        P.project(tiny_lm, sentiment_statements(), d)
