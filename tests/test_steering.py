"""Steering vectors: the contrast vector is the class mean difference, hooks stay on for every generated token and
never outlive the call, the measures and the side effect behave as their definitions say, bad input is an error."""

from __future__ import annotations

import pytest
import torch

from workbench.analysis import probes as P
from workbench.analysis import steering as S
from workbench.analysis.patching import LogitDiff
from workbench.analysis.probe_data import ProbeDataset, read_positions, sentiment_statements
from workbench.errors import DataError, InputError


@pytest.fixture(scope="module")
def tiny_lm(app_home):
    from workbench import HookedGPT

    return HookedGPT.load(app_home / "models" / "tiny-lm").eval()


def test_contrast_vector_is_the_mean_difference(tiny_lm):
    ds = sentiment_statements()
    vec = S.contrast_vector(tiny_lm, ds, layer=1)
    assert vec.hook == "blocks.1.hook_resid_post" and vec.source == "contrast"
    acts = P.collect_activations(tiny_lm, read_positions(tiny_lm, ds), [vec.hook])[0]
    y = torch.tensor(ds.labels)
    torch.testing.assert_close(vec.vector, acts[y == 1].mean(0) - acts[y == 0].mean(0))
    assert vec.meta["norm"] == pytest.approx(float(vec.vector.norm()))


def _forcing_vector(model, token: int, strength: float = 200.0) -> S.SteeringVector:
    """A vector at the last block's output along the unembedding of ``token``: strong enough to pick it every time."""
    hook = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    direction = model.W_U[:, token].detach()
    return S.SteeringVector(strength * direction / direction.norm(), hook, "test")


def test_steering_stays_on_for_every_generated_token_and_ends_with_the_call(tiny_lm):
    prompt = "The cat sat on the"
    target = 7
    vec = _forcing_vector(tiny_lm, target)
    out = S.steered_generation(tiny_lm, prompt, vec, 1.0, max_new_tokens=6, stop_tokens=[])
    assert out.steered.new_tokens[0].tolist() == [target] * 6  # every decode step saw the vector
    assert out.plain.new_tokens[0].tolist() != [target] * 6
    # the KV-cache decode steps see exactly what a full recompute with the same hooks sees
    from workbench.generate import generate

    slow = generate(tiny_lm, prompt, 6, stop_tokens=[], use_cache=False, fwd_hooks=vec.hooks(0.05))
    fast = generate(tiny_lm, prompt, 6, stop_tokens=[], fwd_hooks=vec.hooks(0.05))
    assert slow.tokens.tolist() == fast.tokens.tolist()
    # nothing is left attached: a plain forward pass afterwards is the unsteered one
    tokens = tiny_lm.to_tokens(prompt)
    assert not any(hp.active for hp in tiny_lm.hook_dict.values())
    torch.testing.assert_close(tiny_lm(tokens)[0, -1].argmax(), out.plain.new_tokens[0, 0])


def test_probe_score_moves_exactly_by_the_projection(tiny_lm):
    ds = sentiment_statements()
    probes = P.probe_model(tiny_lm, ds, layers=[1], cfg=P.ProbeConfig(Cs=(1.0,), control=False))
    direction = probes.direction(0)
    vec = S.from_probe(direction)
    assert vec.vector.norm().item() == pytest.approx(abs(direction.meta["class_gap"]), rel=1e-5)
    texts = ds.texts[:6]
    base = S.measure(tiny_lm, texts, direction)
    for m in (0.5, -2.0):
        moved = S.measure(tiny_lm, texts, direction, vec.hooks(m))
        torch.testing.assert_close(moved - base, torch.full_like(base, m * float(vec.vector @ direction.weight)),
                                   atol=1e-4, rtol=1e-4)


def test_logit_measure_kl_and_curve(tiny_lm):
    a, b = tiny_lm.to_tokens(" Mary")[0, -1].item(), tiny_lm.to_tokens(" John")[0, -1].item()
    target = LogitDiff(a, b)
    texts = ["When Mary and John went to the store, John gave a drink to", "The cat sat on the mat and"]
    got = S.measure(tiny_lm, texts, target)
    for i, t in enumerate(texts):
        with torch.no_grad():
            logits = tiny_lm(tiny_lm.to_tokens(t))[0, -1]
        assert float(got[i]) == pytest.approx(float(logits[a] - logits[b]), abs=1e-4)
    vec = _forcing_vector(tiny_lm, a, strength=5.0)
    windows = torch.randint(0, tiny_lm.cfg.d_vocab, (3, 12))
    assert S.kl_on_text(tiny_lm, windows, vec.hooks(0)) == 0.0
    kl1, kl2 = S.kl_on_text(tiny_lm, windows, vec.hooks(1.0)), S.kl_on_text(tiny_lm, windows, vec.hooks(3.0))
    assert 0 < kl1 < kl2
    with pytest.raises(DataError, match="same mean target measure"):  # both classes the same texts: no gap
        S.steering_curve(tiny_lm, vec, [1.0], texts, target, ProbeDataset(texts * 2, [0, 0, 1, 1]), windows)
    ref = ProbeDataset([texts[1], texts[1], texts[0], texts[0]], [0, 0, 1, 1])
    gap = float(got[0] - got[1])
    curve = S.steering_curve(tiny_lm, vec, [0.0, 1.0, 3.0], texts, target, ref, windows)
    assert curve.gap == pytest.approx(gap, abs=1e-4) and curve.fraction_of_gap[0] == 0 and curve.kl[0] == 0
    torch.testing.assert_close(curve.fraction_of_gap, (curve.measure - curve.baseline) / gap, atol=1e-4, rtol=1e-4)
    assert float(curve.measure[2]) > float(curve.measure[0])  # pushed towards " Mary"
    assert [r["multiplier"] for r in curve.rows()] == [0.0, 1.0, 3.0]


def test_sae_feature_vector(tiny_lm):
    from workbench.sae.model import SAE, SAEConfig

    sae = SAE(SAEConfig(d_in=tiny_lm.cfg.d_model, d_sae=16, k=4))
    vec = S.from_sae_feature(sae, 3, "blocks.0.hook_resid_post").check(tiny_lm)
    torch.testing.assert_close(vec.vector, sae.W_dec[3].detach())
    with pytest.raises(InputError, match="feature 16 is out of range"):
        S.from_sae_feature(sae, 16, "blocks.0.hook_resid_post")
    with pytest.raises(InputError, match="names no hook"):
        S.from_sae_feature(sae, 3)
    # a transcoder's decoder writes the MLP's output: that is where its latent steers by default
    sae.metadata = {"hook_name": "blocks.0.mlp.hook_in", "hook_name_out": "blocks.0.mlp.hook_out"}
    assert S.from_sae_feature(sae, 3).check(tiny_lm).hook == "blocks.0.mlp.hook_out"
    sae.metadata = {"hook_name": "blocks.1.hook_resid_post"}
    assert S.from_sae_feature(sae, 3).hook == "blocks.1.hook_resid_post"


def test_bad_vectors_and_layers_are_clear_errors(tiny_lm):
    with pytest.raises(InputError, match=r"shape \(5,\).*width 32"):
        S.SteeringVector(torch.ones(5), "blocks.0.hook_resid_post", "test").check(tiny_lm)
    with pytest.raises(InputError, match="layer 9 is out of range"):
        S.contrast_vector(tiny_lm, sentiment_statements(), layer=9)
    with pytest.raises(InputError, match="shape"):
        S.steered_generation(tiny_lm, "The cat", S.SteeringVector(torch.ones(3), "blocks.1.hook_resid_post", "t"), 1.0)
    mlp = S.SteeringVector(torch.ones(tiny_lm.cfg.d_mlp), "blocks.0.mlp.hook_post", "test").check(tiny_lm)
    assert mlp.vector.shape[0] == tiny_lm.cfg.d_mlp  # a hook of another width is checked against its own width


# ------------------------------------------------------------------------------------- CLI and app page


def test_cli_probe_and_steer(app_home, tmp_path, capsys):
    from workbench.cli import main

    model_dir = str(app_home / "models" / "tiny-lm")
    assert main(["probe", model_dir, "--dataset", "sentiment", "--save", str(tmp_path / "dir"),
                 "--json", str(tmp_path / "p.json")]) == 0
    out = capsys.readouterr().out
    assert "best: layer" in out and "selectivity" in out
    assert (tmp_path / "dir" / "direction.json").is_file()
    assert main(["steer", model_dir, "The cat sat", "--direction", str(tmp_path / "dir"), "-m", "2", "-n", "4",
                 "--kl-windows", "0", "--answer", " Mary", "--wrong", " John"]) == 0
    out = capsys.readouterr().out
    assert "x0:" in out and "x2:" in out and "measure" in out
    assert main(["steer", model_dir, "The cat sat", "--contrast", "sentiment", "--layer", "5"]) == 1
    assert "layer 5 is out of range" in capsys.readouterr().err
    bad = tmp_path / "one.csv"
    bad.write_text("text,label\n" + "\n".join(f"x {i},1" for i in range(20)))
    assert main(["probe", model_dir, "--dataset", str(bad)]) == 1
    assert "both" in capsys.readouterr().err


def _page_script() -> None:
    from workbench.app.main import render_page

    render_page("probes")


def test_probes_page(app_home, monkeypatch):
    import json

    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("WORKBENCH_HOME", str(app_home))
    monkeypatch.setenv("WORKBENCH_APP_MODEL", "tiny-lm")
    at = AppTest.from_function(_page_script, default_timeout=60)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    at.button(key="probe_go").click().run()
    assert not at.exception, [e.value for e in at.exception]
    specs = {s["layout"]["title"]["text"]: s for s in (json.loads(el.proto.spec) for el in at.get("plotly_chart"))}
    acc = next(s for t, s in specs.items() if "Probe accuracy by layer" in t)
    assert any("projected" in t for t in specs)
    # the page's numbers are the library's: the same probes trained on the same dataset and split
    from workbench import HookedGPT

    model = HookedGPT.load(app_home / "models" / "tiny-lm").eval()
    want = P.probe_model(model, sentiment_statements())
    curves = {d["name"]: _plotly_values(d["y"]) for d in acc["data"]}
    assert curves["logistic probe"] == pytest.approx(want.accuracy.tolist())
    assert curves["control task (logistic)"] == pytest.approx(want.control_accuracy.tolist())
    assert [m.value for m in at.metric if m.label == "held-out accuracy"] == [f"{float(want.accuracy[want.best]):.3f}"]
    at.slider(key="probe_layer").set_value(0).run()  # re-projects the kept activations
    assert not at.exception
    proj = next(json.loads(el.proto.spec) for el in at.get("plotly_chart")
                if "layer-0" in json.loads(el.proto.spec)["layout"]["title"]["text"])
    acts = P.collect_activations(model, read_positions(model, sentiment_statements()), [want.hooks[0]])[0]
    expected = (acts @ want.direction(0).vector).tolist()
    shown = sorted(v for d in proj["data"] for v in _plotly_values(d["x"]))
    assert shown == pytest.approx(sorted(expected), abs=1e-4)
    at.slider(key="steer_mult").set_value(3.0)
    at.slider(key="steer_n").set_value(4)
    at.button(key="steer_gen").click().run()
    assert not at.exception, [e.value for e in at.exception]
    vec = S.contrast_vector(model, sentiment_statements(), at.slider(key="steer_layer").value)
    prompt = at.text_input(key="steer_text").value
    both = S.steered_generation(model, prompt, vec, 3.0, max_new_tokens=4, stop_tokens=[])
    assert at.session_state["steer_text_off"] == both.plain.texts[0]
    assert at.session_state["steer_text_on"] == both.steered.texts[0]


def _plotly_values(value) -> list:
    """Return a plotly data array as a list (plotly ships numeric arrays base64-encoded)."""
    import base64

    import numpy as np

    if isinstance(value, dict) and "bdata" in value:
        return np.frombuffer(base64.b64decode(value["bdata"]), dtype=value["dtype"]).tolist()
    return list(value)
