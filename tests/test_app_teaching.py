"""The teaching pages and the training-dynamics page, run headless with Streamlit's AppTest; each test
checks the values a page shows against the library or an oracle (tokenizers, hook_pattern, formulas)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

TIMEOUT = 120


def _script(url: str) -> None:
    from workbench.app.main import render_page

    render_page(url)


@pytest.fixture
def app_env(app_home, monkeypatch):
    monkeypatch.setenv("WORKBENCH_HOME", str(app_home))
    monkeypatch.setenv("WORKBENCH_APP_MODEL", "tiny-lm")
    return app_home


def page(url: str, state: dict | None = None) -> AppTest:
    at = AppTest.from_function(_script, args=(url,), default_timeout=TIMEOUT)
    for k, v in (state or {}).items():
        at.session_state[k] = v
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def figures(at: AppTest) -> dict[str, dict]:
    """Return the page's plotly figures by title (JSON specs)."""
    out = {}
    for el in at.get("plotly_chart"):
        fig = json.loads(el.proto.spec)
        title = fig.get("layout", {}).get("title", {})
        out[title.get("text", "") if isinstance(title, dict) else str(title)] = fig
    return out


def fig_titled(at: AppTest, start: str) -> dict:
    found = [f for t, f in figures(at).items() if t.startswith(start)]
    assert found, f"no figure titled {start!r}; have {list(figures(at))}"
    return found[0]


def arr(value):
    """Return a plotly data array as nested lists (plotly ships numeric arrays base64-encoded)."""
    import base64

    if isinstance(value, dict) and "bdata" in value:
        a = np.frombuffer(base64.b64decode(value["bdata"]), dtype=value["dtype"])
        if "shape" in value:
            shape = value["shape"]
            a = a.reshape([int(x) for x in shape.split(",")] if isinstance(shape, str) else shape)
        return a.tolist()
    return value


def metric(at: AppTest, label: str) -> str:
    found = [m.value for m in at.metric if m.label == label]
    assert found, f"no metric {label!r}; have {[m.label for m in at.metric]}"
    return found[0]


def _attn_only_2l(monkeypatch):
    from workbench import snapshots as S
    from workbench.app import choices

    if "attn-only-2l" not in choices.zoo_names() or len(S.list_snapshots(choices.model_dir("attn-only-2l"))) < 10:
        pytest.skip("the built-in attn-only-2l and its snapshots are not in data/models")
    monkeypatch.setenv("WORKBENCH_APP_MODEL", "attn-only-2l")


# ------------------------------------------------------------------------------------------- BPE


def test_bpe_page_segmentation_after_k_merges_equals_tokenizers(app_env):
    from workbench import teaching as T
    from workbench.app.teaching import DEFAULT_BPE_TEXT, DEFAULT_SENTENCE
    from workbench.corpora import train_bpe

    at = page("bpe", {"bpe_merges": 40, "bpe_step": 25})
    docs = [line for line in DEFAULT_BPE_TEXT.splitlines() if line.strip()]
    vocab = int(metric(at, "vocabulary"))
    assert int(metric(at, "merges")) == 25 and vocab == 257 + 25
    lib = train_bpe(docs, vocab_size=vocab).tok.encode(DEFAULT_SENTENCE, add_special_tokens=False).tokens
    assert int(metric(at, "tokens in the sentence")) == len(lib)
    # the chips show each token's bytes in hex: the same bytes, token by token, as the library's tokens
    chips = [m.value for m in at.markdown if "<span" in m.value][0]
    for token in lib:
        assert " ".join(f"{b:02x}" for b in T.piece_bytes(token)) in chips
    assert any("Same segmentation as the `tokenizers`" in s.value for s in at.success)
    merges = at.dataframe[0].value
    assert len(merges) == 25 and merges["step"].iloc[0] == 25  # latest merge first
    # the merge table's counts are the trainer's
    trace = T.train_bpe_steps(docs, 40)
    assert merges["count"].tolist() == [m.count for m in reversed(trace.merges[:25])]
    multi = at.dataframe[1].value
    assert "東" in multi["character"].tolist()
    assert multi.set_index("character").loc["東", "UTF-8 bytes"] == "e6 9d b1"
    progress = fig_titled(at, "The sentence's tokens after each merge")
    n_tokens = arr(progress["data"][0]["y"])
    assert n_tokens[0] == len(DEFAULT_SENTENCE.encode()) and n_tokens[25] == len(lib)
    assert all(a >= b for a, b in zip(n_tokens, n_tokens[1:]))  # a merge never adds tokens

    at.slider(key="bpe_step").set_value(0).run()
    assert int(metric(at, "tokens in the sentence")) == len(DEFAULT_SENTENCE.encode("utf-8"))
    assert any("Same segmentation" in s.value for s in at.success)


# ----------------------------------------------------------------------------- attention from scratch


def test_attention_scratch_page_equals_hook_pattern(app_env):
    import torch

    from workbench import HookedGPT
    from workbench.names import act_name

    text = "The cat sat on the mat. The cat"
    at = page("attention-scratch", {"scratch_layer": 1, "scratch_head": 2})
    model = HookedGPT.load(app_env / "models" / "tiny-lm")
    tokens = torch.tensor([model.tokenizer.encode(text)])
    _, cache = model.run_with_cache(tokens, names_filter=[act_name("pattern", 1)])
    want = cache[act_name("pattern", 1)][0, 2].numpy()
    side = fig_titled(at, "Layer 1, head 2: by hand and in the model")
    mine, real = (np.array(arr(d["z"]), dtype=float) for d in side["data"])
    np.testing.assert_allclose(np.nan_to_num(mine), want, atol=1e-5)
    np.testing.assert_allclose(np.nan_to_num(real), want, atol=1e-6)
    assert float(metric(at, "largest difference from the model's pattern")) < 1e-5
    assert any("reproduces the model's attention pattern" in s.value for s in at.success)
    xxt = np.array(arr(fig_titled(at, "Scores, then weights")["data"][0]["z"]), dtype=float)
    np.testing.assert_allclose(xxt, xxt.T, atol=1e-4)  # X·Xᵀ is symmetric
    qkt = np.array(arr(fig_titled(at, "Q·Kᵀ")["data"][0]["z"]), dtype=float)
    assert np.abs(qkt - qkt.T).max() > 1e-3  # Q·Kᵀ is not
    # the mask slider: only the first 3 rows have their future masked (blank cells)
    at.slider(key="scratch_mask").set_value(3).run()
    masked = np.array(arr(fig_titled(at, "Applying the causal mask")["data"][0]["z"]), dtype=float)
    assert np.isnan(masked[:3]).any() and not np.isnan(masked[3:]).any()
    assert float(metric(at, "score spread (std), scaled")) == pytest.approx(
        float(metric(at, "score spread (std), unscaled")) / math.sqrt(model.cfg.d_head), rel=0.02)


# ----------------------------------------------------------------------- nearly orthogonal directions


def test_orthogonal_page_mean_90_and_spread_one_over_sqrt_d(app_env):
    at = page("orthogonal", {"orth_n": 200, "orth_dims": [10, 100, 1000]})
    table = at.dataframe[0].value
    assert table.d.tolist() == [10, 100, 1000]
    assert np.allclose(table["mean (°)"], 90, atol=0.5)
    np.testing.assert_allclose(table["std (°)"], np.degrees(1 / np.sqrt(table.d)), rtol=0.1)
    assert table["std (°)"].is_monotonic_decreasing
    hist = fig_titled(at, "Angles between random unit vectors")
    assert [d["name"] for d in hist["data"]] == ["d = 10", "d = 100", "d = 1000"]
    assert len(arr(hist["data"][0]["x"])) == 200 * 199 // 2
    assert "superposition" in "\n".join(m.value for m in at.markdown)


# ------------------------------------------------------------------------------------------ KV cache


def test_kv_cache_page_contents_memory_and_speed(app_env):
    import torch

    from workbench import HookedGPT, teaching
    from workbench.names import act_name

    at = page("kv-cache", {"kv_new": 6, "kv_step": 3, "kv_layer": 1})
    model = HookedGPT.load(app_env / "models" / "tiny-lm")
    prompt = model.tokenizer.encode("The capital of France is")
    out = model.generate(torch.tensor(prompt), 6, stop_tokens=[]).tokens[0]
    filled = len(prompt) + 3
    _, cache = model.run_with_cache(out[None, :filled], names_filter=[act_name("k", 1), act_name("v", 1)])
    contents = fig_titled(at, "Layer 1, KV head 0: the cache after step 3")
    K, V = (np.array(arr(d["z"]), dtype=float) for d in contents["data"])
    assert K.shape == (filled, model.cfg.d_head)
    np.testing.assert_allclose(K, cache[act_name("k", 1)][0, :, 0].numpy(), atol=1e-5)
    np.testing.assert_allclose(V, cache[act_name("v", 1)][0, :, 0].numpy(), atol=1e-5)
    cfg = model.cfg
    total = len(prompt) + 6
    want = teaching.kv_cache_bytes(cfg, total)
    assert want == 2 * cfg.n_layers * cfg.n_kv * total * cfg.d_head * 4
    mem = fig_titled(at, "KV cache of")
    assert arr(mem["data"][1]["x"]) == [total] and arr(mem["data"][1]["y"])[0] == pytest.approx(want / 2**20)
    assert any("agree exactly" in c.value for c in at.caption)
    at.button(key="kv_measure").click().run()
    assert not at.exception
    assert float(metric(at, "with the cache").split()[0].replace(",", "")) > 0
    assert metric(at, "speed-up").endswith("×")
    per_step = fig_titled(at, "Time of each decoding step")
    n_time = at.slider(key="kv_time_n").value
    assert [len(arr(d["y"])) for d in per_step["data"]] == [n_time, n_time]


# ----------------------------------------------------------------------------- live architecture


def test_architecture_live_page_shapes_and_parameters(app_env):
    from workbench import HookedGPT

    at = page("architecture-live", {"archlive_prompt": "The cat sat on the mat", "archlive_block": 1})
    model = HookedGPT.load(app_env / "models" / "tiny-lm")
    n = len(model.tokenizer.encode("The cat sat on the mat"))
    cfg = model.cfg
    hooks = at.dataframe[2].value.set_index("hook")
    assert hooks.loc["blocks.1.attn.hook_pattern", "shape"] == f"[1, {cfg.n_heads}, {n}, {n}]"
    assert hooks.loc["blocks.1.mlp.hook_post", "shape"] == f"[1, {n}, {cfg.d_mlp}]"
    assert hooks.loc["blocks.1.attn.hook_q", "parameters"] == cfg.n_heads * cfg.d_head * (cfg.d_model + 1)
    assert hooks.index[0] == "blocks.1.hook_resid_pre" and hooks.index[-1] == "blocks.1.hook_resid_post"
    block = sum(p.numel() for p in model.blocks[1].parameters())
    assert metric(at, "parameters in block 1") == f"{block:,}"
    assert metric(at, "parameters in the model") == f"{sum(p.numel() for p in model.parameters()):,}"
    assert fig_titled(at, f"Block 1 on a {n}-token prompt")


# ------------------------------------------------------------------------------ training dynamics


def test_dynamics_page_without_snapshots_says_so(app_env):
    at = page("dynamics")
    assert any("no training snapshots" in i.value for i in at.info)


def test_dynamics_slider_on_attn_only_2l_shows_the_phase_change(app_env, monkeypatch):
    from workbench import snapshots as S
    from workbench.app import choices

    _attn_only_2l(monkeypatch)
    snaps = S.list_snapshots(choices.model_dir("attn-only-2l"))
    at = page("dynamics", {"dyn_len": 20})
    caption = [c.value for c in at.caption if "phase change" in c.value]
    assert caption, [c.value for c in at.caption]
    lo, hi = (int(w) for w in caption[0].split("between steps ")[1].split(" (")[0].split(" and "))
    assert 200 <= lo < hi <= 1000 and hi - lo == 100  # consecutive snapshots around the shipped run's step ~500
    scores = fig_titled(at, "Head scores across training")
    best_l1 = arr([d for d in scores["data"] if d["name"] == "best induction, layer 1"][0]["y"])
    steps = arr(scores["data"][0]["x"])
    assert steps == [s.step for s in snaps]
    assert best_l1[steps.index(hi)] - best_l1[steps.index(lo)] > 0.1 and best_l1[0] < 0.2 and best_l1[-1] > 0.4

    # the slider before and after the phase change: the head-score grid and the embeddings change with it
    shown = {}
    for step in (lo, hi):
        at.select_slider(key="dyn_step").set_value(step).run()
        assert not at.exception, [e.value for e in at.exception]
        grid = np.array(arr(fig_titled(at, f"Induction score of every head at step {step}")["data"][0]["z"]))
        want = S.snapshot_heads(S.load_snapshot([s.path for s in snaps if s.step == step][0]), step, 20)
        np.testing.assert_allclose(grid, want.induction.numpy(), atol=1e-5)
        assert float(metric(at, "best induction score")) == pytest.approx(float(want.induction.max()), abs=5e-3)
        emb = fig_titled(at, f"Token embeddings at step {step}")
        shown[step] = (grid, np.array(arr(emb["data"][0]["x"])))
        pattern = fig_titled(at, "Layer 1, head")
        assert f"at step {step}" in pattern["layout"]["title"]["text"]
    assert shown[hi][0][1].max() - shown[lo][0][1].max() > 0.1  # the induction score jumps in layer 1
    assert not np.allclose(shown[lo][1], shown[hi][1])  # the embeddings moved
    final = S.load_snapshot(snaps[-1].path).embed.W_E.detach()
    assert len(shown[lo][1]) == final.shape[0]  # the toy vocabulary is shown whole

    at.radio(key="dyn_proj").set_value("tsne").run()
    assert not at.exception, [e.value for e in at.exception]
    assert len(arr(fig_titled(at, f"Token embeddings at step {hi} (t-SNE")["data"][0]["x"])) == final.shape[0]

    lens = fig_titled(at, "Logit lens on the repeated copy across training")
    final = arr([d for d in lens["data"] if d["name"] == "decoded after block 1"][0]["y"])
    repeat = arr([d for d in fig_titled(at, "Loss on repeated random tokens")["data"]
                  if d["name"] == "loss, repeat"][0]["y"])
    assert final == pytest.approx(repeat, abs=1e-4)  # the lens after the last block is the model's own loss
    embed = arr([d for d in lens["data"] if d["name"] == "decoded embeddings"][0]["y"])
    assert embed[-1] > 2 * final[-1]  # the embeddings alone cannot predict the repeat

    loss = fig_titled(at, "Loss and learning-rate schedule")
    names = [d["name"] for d in loss["data"]]
    assert "training loss" in names and "learning rate (warmup + cosine, as trained)" in names
    sched = [d for d in loss["data"] if d["name"].startswith("learning rate (warmup")][0]
    cfg = S.recipe_train_config("attn-only-2l")
    from workbench.train import lr_at

    ys = arr(sched["y"])
    assert max(ys) == pytest.approx(cfg.lr) and ys[-1] == pytest.approx(lr_at(cfg, cfg.steps - 1))
    assert ys[-1] == pytest.approx(cfg.lr * cfg.min_lr_ratio, rel=1e-4)  # the cosine ends at the floor
    logged = [d for d in loss["data"] if d["name"] == "learning rate (logged)"][0]
    assert arr(logged["y"]) == pytest.approx(S.lr_schedule(cfg, arr(logged["x"])))


def test_snapshot_slider_on_the_attention_embeddings_and_lens_pages(app_env, monkeypatch):
    """The "Across training" section where each view lives: its slider redraws that page's view at a snapshot, and
    on attn-only-2l the attention page shows the induction score jumping between the snapshots around the phase
    change."""
    from workbench import snapshots as S
    from workbench.app import choices
    from workbench.app.dynamics import SECTION_SEQ_LEN

    _attn_only_2l(monkeypatch)
    snaps = S.list_snapshots(choices.model_dir("attn-only-2l"))
    path = {s.step: s.path for s in snaps}

    at = page("attention")
    caption = [c.value for c in at.caption if "phase change" in c.value and "between steps" in c.value]
    assert caption, [c.value for c in at.caption]
    lo, hi = (int(w) for w in caption[0].split("between steps ")[1].split(" (")[0].split(" and "))
    assert 200 <= lo < hi <= 1000
    best = {}
    for step in (lo, hi):
        at.select_slider(key="attention_snap_step").set_value(step).run()
        assert not at.exception, [e.value for e in at.exception]
        grid = np.array(arr(fig_titled(at, f"Induction score of every head at step {step}")["data"][0]["z"]))
        want = S.snapshot_heads(S.load_snapshot(path[step]), step, SECTION_SEQ_LEN)
        np.testing.assert_allclose(grid, want.induction.numpy(), atol=1e-5)
        assert float(metric(at, "best induction score")) == pytest.approx(float(want.induction.max()), abs=5e-3)
        layer, head = at.slider(key="attention_snap_layer").value, at.slider(key="attention_snap_head").value
        pattern = np.array(arr(fig_titled(at, f"Layer {layer}, head {head} at step {step}")["data"][0]["z"]),
                           dtype=float)
        np.testing.assert_allclose(np.nan_to_num(pattern), want.pattern[layer, head].numpy(), atol=1e-5)
        best[step] = grid[1].max()
    assert best[hi] - best[lo] > 0.1  # the phase change: layer 1's induction head forms between the two snapshots
    assert at.slider(key="attn_layer") is not None  # the page's own view is still there, above the section

    at = page("embeddings")
    shown = {}
    for step in (lo, hi):
        at.select_slider(key="embeddings_snap_step").set_value(step).run()
        assert not at.exception, [e.value for e in at.exception]
        emb = fig_titled(at, f"Token embeddings at step {step}")
        shown[step] = np.array(arr(emb["data"][0]["x"])), np.array(arr(emb["data"][0]["y"]))
    final = S.load_snapshot(snaps[-1].path).embed.W_E.detach()
    frames = S.embedding_frames([S.load_snapshot(path[s]).embed.W_E.detach() for s in sorted(path)], sorted(path),
                                list(range(final.shape[0])))
    i = sorted(path).index(hi)
    np.testing.assert_allclose(shown[hi][0], frames.coords[i, :, 0].numpy(), atol=1e-4)
    np.testing.assert_allclose(shown[hi][1], frames.coords[i, :, 1].numpy(), atol=1e-4)
    assert not np.allclose(shown[lo][0], shown[hi][0])  # the embeddings moved between the two snapshots

    at = page("logit-lens")
    at.select_slider(key="lens_snap_step").set_value(hi).run()
    assert not at.exception, [e.value for e in at.exception]
    lens = fig_titled(at, "Logit lens on the repeated copy across training")
    last = arr([d for d in lens["data"] if d["name"] == "decoded after block 1"][0]["y"])
    assert last[i] == pytest.approx(S.snapshot_heads(S.load_snapshot(path[hi]), hi, SECTION_SEQ_LEN).loss_repeat,
                                    abs=1e-4)


def test_pages_without_snapshots_draw_no_training_section(app_env):
    for url in ("attention", "embeddings"):
        at = page(url)
        assert not [h for h in at.subheader if h.value == "Across training"]
        assert "attention_snap_step" not in at.session_state and "embeddings_snap_step" not in at.session_state


def test_dynamics_page_without_snapshots_still_draws_the_training_log(app_env, monkeypatch):
    from workbench import snapshots as S
    from workbench.app import choices

    if "kjv-small" not in choices.zoo_names():
        pytest.skip("the built-in kjv-small has not landed in data/models")
    monkeypatch.setenv("WORKBENCH_APP_MODEL", "kjv-small")
    at = page("dynamics")
    assert any("no training snapshots" in i.value for i in at.info)
    loss = fig_titled(at, "Loss and learning-rate schedule")
    log = S.training_log(choices.model_dir("kjv-small")).dropna(subset=["loss"])
    train = [d for d in loss["data"] if d["name"] == "training loss"][0]
    assert arr(train["x"]) == log.step.tolist() and arr(train["y"]) == pytest.approx(log.loss.tolist())
    cfg = S.recipe_train_config("kjv-small")
    sched = [d for d in loss["data"] if d["name"].startswith("learning rate (warmup")][0]
    assert max(arr(sched["y"])) == pytest.approx(cfg.lr)
