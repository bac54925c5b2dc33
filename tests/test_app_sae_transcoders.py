"""Transcoders on the SAE page (issue 15): the shipped kjv-small set is listed, its features are read live from the
corpus (no activation store) at the MLP's input, their logit effects and steering taken at the MLP's output."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402
from test_app_pages import arr, figures  # noqa: E402

from workbench.app import compute  # noqa: E402
from workbench.errors import InputError  # noqa: E402
from workbench.pipelines import SHIPPED_TRANSCODERS, cache_windows  # noqa: E402
from workbench.sae import features as F  # noqa: E402
from workbench.sae.io import load_sae, save_sae  # noqa: E402
from workbench.sae.model import SAE, SAEConfig  # noqa: E402
from workbench.store import StoreConfig  # noqa: E402
from workbench.zoo import load_model  # noqa: E402

TIMEOUT = 120


def _script(url: str) -> None:
    from workbench.app.main import render_page

    render_page(url)


@pytest.fixture(scope="module")
def kjv():
    return load_model("kjv-small").eval()


@pytest.fixture
def kjv_env(app_home, monkeypatch):
    monkeypatch.setenv("WORKBENCH_HOME", str(app_home))
    monkeypatch.setenv("WORKBENCH_APP_MODEL", "kjv-small")
    return app_home


def _fig(at: AppTest, part: str) -> dict:
    found = [f for f in figures(at) if part in str(f.get("layout", {}).get("title", ""))]
    assert found, f"no figure titled {part!r}"
    return found[0]


def test_sae_page_lists_the_shipped_transcoders_and_shows_a_feature_card(kjv_env, kjv):
    at = AppTest.from_function(_script, args=("sae",), default_timeout=TIMEOUT)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    pick = at.sidebar.selectbox(key="sae_pick")
    shipped = [str(SHIPPED_TRANSCODERS / "kjv-small" / f"layer_{layer}" / "transcoder") for layer in range(4)]
    assert list(pick.options) == [f"transcoder · kjv-small (shipped) · layer {layer} · jumprelu_skip_transcoder · "
                                  "1024 latents" for layer in range(4)]
    pick.set_value(shipped[1]).run()
    assert not at.exception, [e.value for e in at.exception]
    assert any("blocks.1.mlp.hook_in" in c.value and "blocks.1.hook_mlp_out" in c.value for c in at.caption)
    feature = int(at.slider(key="sae_feature").value)

    # the card agrees with the library: histogram and top contexts read at the MLP's input on the model's corpus
    tc = load_sae(shipped[1])
    windows = compute.sae_windows(kjv, compute.LIVE_TOKENS, compute.LIVE_CTX, "kjv")
    live = compute.live_features(kjv, tc, "blocks.1.mlp.hook_in", windows)
    assert live.density[feature] > 0  # the page opens on a live latent
    hist = _fig(at, f"Activations of latent {feature}")
    assert sum(arr(hist["data"][0]["y"])) == int(live.hist_counts[feature].sum()) == round(
        float(live.density[feature]) * live.n_rows)
    html = " ".join(m.proto.body for m in at.get("markdown"))
    assert "rgba(255,120,0" in html  # highlighted contexts
    best = compute.live_contexts(kjv, tc, "blocks.1.mlp.hook_in", live, feature)[0]
    assert f"<b>{best.value:.2f}</b>" in html
    assert best.value == pytest.approx(float(live.top.values[feature, 0]), rel=1e-5)

    # promoted logits: the decoder row at the output side through the final norm's gain and W_U
    logits = _fig(at, f"Logit effects of latent {feature}")
    effect = (tc.W_dec[feature].detach().float() * kjv.ln_final.w.detach().float()) @ kjv.unembed.W_U.detach().float()
    if getattr(kjv.ln_final, "b", None) is not None:
        d = tc.W_dec[feature].detach().float()
        effect = ((d - d.mean()) * kjv.ln_final.w.detach().float()) @ kjv.unembed.W_U.detach().float()
    raises = logits["data"][0]
    assert arr(raises["x"])[0] == pytest.approx(float(effect.max()), rel=1e-4)

    # another latent: its own card, no rerun of the corpus pass
    at.slider(key="sae_feature").set_value(7).run()
    assert not at.exception, [e.value for e in at.exception]
    _fig(at, "Logit effects of latent 7")


def test_transcoder_steering_writes_the_mlp_output_and_changes_generation(kjv_env, kjv):
    at = AppTest.from_function(_script, args=("sae",), default_timeout=TIMEOUT)
    at.run()
    at.sidebar.selectbox(key="sae_pick").set_value(str(SHIPPED_TRANSCODERS / "kjv-small" / "layer_2" / "transcoder"))
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    text = at.text_input(key="steer_prompt").value
    tokens = torch.tensor([kjv.tokenizer.encode(text)])
    _, cache = kjv.run_with_cache(tokens, names_filter=["blocks.2.hook_mlp_out"])
    norm = float(cache["blocks.2.hook_mlp_out"][0].norm(dim=-1).mean())
    assert any("`blocks.2.hook_mlp_out`" in c.value and f"{norm:.1f}" in c.value for c in at.caption)
    at.slider(key="steer_strength").set_value(100.0)
    at.slider(key="steer_new").set_value(6)
    at.button(key="steer_go").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.session_state["steer_out_on"] != at.session_state["steer_out_off"]


def test_transcoder_steering_hook_is_the_mlp_output(kjv):
    (info,) = [i for i in compute.find_saes("kjv-small", kjv.cfg.d_model) if i.hook == "blocks.1.mlp.hook_in"]
    assert info.is_transcoder and info.out_hook == "blocks.1.mlp.hook_out"
    assert info.steer_hook == "blocks.1.hook_mlp_out"
    tc = load_sae(info.path)
    direction = tc.W_dec[3].detach()
    tokens = torch.tensor([kjv.tokenizer.encode("In the beginning God created")])
    hook = compute.steering_hook(direction, 10.0)
    with torch.no_grad():
        steered = kjv.run_with_hooks(tokens, fwd_hooks=[(info.steer_hook, hook)])
        # the same as adding the direction to what the MLP writes, and not what adding it to the MLP's input does
        at_out = kjv.run_with_hooks(tokens, fwd_hooks=[("blocks.1.mlp.hook_out", hook)])
        at_in = kjv.run_with_hooks(tokens, fwd_hooks=[(info.hook, hook)])
    torch.testing.assert_close(steered, at_out)
    assert not torch.allclose(steered, at_in, atol=1e-3)


def test_a_transcoder_in_the_runs_directory_is_listed_as_one(app_home, tmp_path, monkeypatch, kjv):
    """A transcoder trained into the runs directory used to show as an SAE and be steered at its input hook."""
    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path))
    tc = SAE(SAEConfig(d_in=128, d_sae=32, architecture="relu", apply_b_dec_to_input=False, d_out=128), seed=0)
    run = tmp_path / "runs" / "tc-run" / "layer_0" / "transcoder"
    save_sae(tc, run, metadata={"model_name": "kjv-small", "hook_name": "blocks.0.mlp.hook_in",
                                "hook_name_out": "blocks.0.mlp.hook_out"})
    sae = SAE(SAEConfig(d_in=128, d_sae=32, architecture="relu"), seed=0)
    save_sae(sae, tmp_path / "runs" / "sae-run", metadata={"model_name": "kjv-small",
                                                          "hook_name": "blocks.0.hook_resid_post"})
    found = compute.find_saes("kjv-small", 128)
    by_path = {i.path: i for i in found}
    assert by_path[run].is_transcoder and by_path[run].steer_hook == "blocks.0.hook_mlp_out"
    assert "transcoder" in by_path[run].label
    plain = by_path[tmp_path / "runs" / "sae-run"]
    assert not plain.is_transcoder and plain.steer_hook == "blocks.0.hook_resid_post"
    assert sum(i.set_name == "kjv-small (shipped)" for i in found) == 4  # the shipped set after the runs
    assert [i.set_name for i in found[:2]] == [None, None]
    assert compute.find_saes("tiny-lm", 128) == []


def test_live_features_equal_the_store_statistics(kjv, tmp_path):
    """Read live from windows, a transcoder's statistics are those :func:`features.feature_stats` gives on a store of
    the same windows' MLP input (density, histogram, max, logit effects, neighbours)."""
    tc = load_sae(SHIPPED_TRANSCODERS / "kjv-small" / "layer_0" / "transcoder")
    hook = "blocks.0.mlp.hook_in"
    windows = compute.sae_windows(kjv, 1024, 32, "kjv")
    live = compute.live_features(kjv, tc, hook, windows)
    store = cache_windows(kjv, windows, tmp_path / "store", StoreConfig(hooks=(hook,), dtype="float32"),
                          model_name="kjv-small").store
    stats = F.feature_stats(tc, store, hook, model=kjv)
    assert live.n_rows == stats.n_rows == windows.numel()
    torch.testing.assert_close(live.density, stats.density)
    torch.testing.assert_close(live.max_act, stats.max_act, rtol=1e-5, atol=1e-6)
    assert (live.hist_counts - stats.hist_counts).abs().sum() <= 2  # a value on a bin edge may fall either side
    assert torch.equal(live.logit_top_ids, stats.logit_top_ids)
    assert torch.equal(live.neighbour_ids, stats.neighbour_ids)
    torch.testing.assert_close(live.top.values[:, 0], stats.top_values[:, 0], rtol=1e-5, atol=1e-6)


def test_live_features_refuse_an_sae(kjv):
    sae = SAE(SAEConfig(d_in=128, d_sae=16, architecture="relu"), seed=0)
    with pytest.raises(InputError, match="only for transcoders"):
        compute.live_features(kjv, sae, "blocks.0.hook_resid_post", torch.zeros(2, 8, dtype=torch.long))
    tc = SAE(SAEConfig(d_in=128, d_sae=16, architecture="relu", apply_b_dec_to_input=False, d_out=128), seed=0)
    with pytest.raises(InputError, match="layers 0..3"):
        compute.live_features(kjv, tc, "blocks.9.mlp.hook_in", torch.zeros(2, 8, dtype=torch.long))
    assert json.loads((SHIPPED_TRANSCODERS / "kjv-small" / "set.json").read_text())["layers"] == [0, 1, 2, 3]
