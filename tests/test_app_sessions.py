"""The app under concurrent use and on every model (issue 12 items 1, 2, 8; issue 13's app items): results
that never depend on another run's hooks, background jobs, per-model defaults, prompts cut before
tokenizing, bad model names as messages. The browser-level proof is tests/test_app_browser.py."""

from __future__ import annotations

import threading
import time

import pytest
import torch

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

TIMEOUT = 60


def _script(url: str) -> None:
    from workbench.app.main import render_page

    render_page(url)


@pytest.fixture
def app_env(app_home, monkeypatch):
    monkeypatch.setenv("WORKBENCH_HOME", str(app_home))
    monkeypatch.setenv("WORKBENCH_APP_MODEL", "tiny-lm")
    return app_home


def _tiny(app_home):
    from workbench import HookedGPT

    return HookedGPT.load(app_home / "models" / "tiny-lm").eval()


# ------------------------------------------------------------------------------------ hooks and caches


def test_cached_results_never_see_the_callers_hooks(app_env):
    """A cached model run made while the calling run has a hook attached gives (and caches) the quiet result."""
    from workbench.app import cached

    key = "tiny-lm|cpu|float32"
    model = cached.model(key)
    text = "The cat sat on the mat and hooks stay out"
    quiet = model(torch.tensor([cached.encode(key, text).ids]))[0, -1].detach()

    direction = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(0))

    def steer(x, hook):  # (a constant shift would vanish in the next LayerNorm: a direction does not)
        return x + 100.0 * direction

    with model.hooks([("blocks.0.hook_resid_post", steer)]):
        loud = model(torch.tensor([cached.encode(key, text).ids]))[0, -1]
        assert not torch.allclose(loud, quiet, atol=1e-3)  # the hook is live in this run ...
        got = cached.next_token_logits(key, text)  # ... but not inside the cached computation
        patterns = cached.attention_patterns(key, text)
    torch.testing.assert_close(got, quiet.float())
    torch.testing.assert_close(cached.next_token_logits(key, text), quiet.float())  # and the cache holds that
    _, cache = model.run_with_cache(torch.tensor([cached.encode(key, text).ids]),
                                    names_filter="blocks.1.attn.hook_pattern")
    torch.testing.assert_close(patterns[1], cache["blocks.1.attn.hook_pattern"][0])


def _leftover_script() -> None:
    import streamlit as st

    from workbench.app import cached
    from workbench.app.main import render_page

    m = cached.model("tiny-lm|cpu|float32")
    # what a stopped run could leave in this thread's context: a hooks() block never exited
    left = m.hooks([("blocks.0.hook_resid_post", lambda x, hook: x * 0)])
    left.__enter__()
    st.session_state["left"] = left  # kept alive: a collected generator would remove its hooks itself
    st.session_state["before"] = m.hook_point("blocks.0.hook_resid_post").active
    render_page("tokenizer")
    st.session_state["after"] = m.hook_point("blocks.0.hook_resid_post").active


def test_each_script_run_starts_without_leftover_run_hooks(app_env):
    at = AppTest.from_function(_leftover_script, default_timeout=TIMEOUT)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert (at.session_state["before"], at.session_state["after"]) == (True, False)


def test_one_torch_thread_restores_the_setting_under_concurrent_use():
    from workbench.app.compute import one_torch_thread

    before = torch.get_num_threads()
    inside = []
    barrier = threading.Barrier(3)

    def user(delay: float) -> None:
        with one_torch_thread():
            barrier.wait()
            inside.append(torch.get_num_threads())
            time.sleep(delay)

    threads = [threading.Thread(target=user, args=(d,)) for d in (0.05, 0.01, 0.03)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert inside == [1, 1, 1]
    assert torch.get_num_threads() == before


# ---------------------------------------------------------------------------------------- jobs


def test_jobs_join_report_and_cancel():
    from workbench.app.jobs import Cancelled, Jobs

    jobs = Jobs()
    gate = threading.Event()

    def slow(report):
        for i in range(200):
            report(i / 200, "working")
            gate.wait(0.01)
        return "finished"

    job = jobs.start("a", "slow job", slow)
    assert jobs.start("a", "slow job", slow) is job  # the same work joins the running job
    time.sleep(0.1)
    assert 0 < job.fraction < 1 and job.stage == "working"
    job.cancel()
    assert job.wait(5) and job.cancelled and isinstance(job.error, Cancelled)
    again = jobs.start("a", "slow job", lambda report: "quick")
    assert again is not job and again.wait(5) and again.result == "quick"  # a cancelled job is replaced
    assert jobs.start("a", "slow job", slow) is again  # a finished one is kept


def test_job_threads_see_no_hooks_of_the_thread_that_started_them(app_home):
    from workbench.app.jobs import Jobs

    model = _tiny(app_home)
    tokens = torch.tensor([[1, 2, 3, 4]])
    quiet = model(tokens).detach()
    direction = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    with model.hooks([("blocks.0.hook_resid_post", lambda x, hook: x + 50.0 * direction)]):
        assert not torch.allclose(model(tokens), quiet, atol=1e-3)
        job = Jobs().start("run", "forward", lambda report: model(tokens).detach())
        assert job.wait(10)
    torch.testing.assert_close(job.result, quiet)


def test_jobs_writing_one_directory_take_turns(tmp_path):
    from workbench.app.jobs import Jobs

    jobs = Jobs()
    inside, overlap = [], []
    release = threading.Event()

    def writer(name):
        def work(report):
            with jobs.writing(tmp_path / "store", tmp_path / name, report=report):
                inside.append(name)
                overlap.append(len(inside))
                release.wait(10)
                inside.remove(name)
            return name
        return work

    a = jobs.start("a", "writer a", writer("run-a"))
    b = jobs.start("b", "writer b", writer("run-b"))
    deadline = time.monotonic() + 10
    while "waiting" not in a.stage + b.stage and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "another job is writing" in a.stage + b.stage  # the second says it waits for the first
    assert len(inside) == 1
    release.set()
    assert a.wait(10) and b.wait(10) and a.error is None and b.error is None
    assert overlap == [1, 1]


def test_patching_sweep_reports_progress_matches_the_library_and_can_be_cancelled(app_home):
    from workbench.analysis import patching as P
    from workbench.app.compute import patching_sweep
    from workbench.app.jobs import Cancelled

    model = _tiny(app_home)
    clean = torch.tensor([model.tokenizer.encode("When Mary and John went to the store, John gave a drink to")])
    corrupt = torch.tensor([model.tokenizer.encode("When Mary and John went to the store, Mary gave a drink to")])
    answer, wrong = model.tokenizer.encode(" Mary", add_bos=False)[0], model.tokenizer.encode(" John", add_bos=False)[0]
    seen = []
    for kind in ("resid_pre", "z"):
        got = patching_sweep(model, clean, corrupt, answer, wrong, kind, lambda f, what: seen.append(f))
        metric = P.LogitDiff(answer, wrong)
        want = P.patch_residual(model, clean, corrupt, metric) if kind == "resid_pre" else P.patch_heads(
            model, clean, corrupt, metric)
        torch.testing.assert_close(got.scores, want.scores)
    assert seen == sorted(seen) or seen[:len(seen) // 2] == sorted(seen[:len(seen) // 2])
    assert seen[-1] == pytest.approx(1.0)

    def stop(fraction, what):
        if fraction > 0.5:
            raise Cancelled("stop")

    with pytest.raises(Cancelled):
        patching_sweep(model, clean, corrupt, answer, wrong, "resid_pre", stop)
    assert not model.hook_point(f"blocks.{model.cfg.n_layers - 1}.hook_resid_post").active  # the counter is gone


def test_a_big_sweep_runs_in_the_background_with_progress_and_cancel(app_env, monkeypatch):
    monkeypatch.setattr("workbench.app.attribution.AUTO_PATCH_FLOPS", 0)
    gate = threading.Event()
    from workbench.app import compute

    real = compute.patching_sweep

    def slow_sweep(*args, **kw):
        report = args[-1]
        while not gate.is_set():  # holds the job until the test lets it go (or cancels it)
            report(0.25, "held by the test")
            time.sleep(0.02)
        return real(*args, **kw)

    monkeypatch.setattr(compute, "patching_sweep", slow_sweep)
    monkeypatch.setattr("workbench.app.ui.JOB_WAIT_S", 0.2)
    at = AppTest.from_function(_script, args=("attribution",), default_timeout=TIMEOUT)
    at.run()
    at.text_input(key="attr_prompt").set_value("When Mary and John went to the store, John gave a cat to").run()
    at.text_input(key="attr_corrupt").set_value("When Mary and John went to the store, Mary gave a cat to").run()
    assert any("patched runs" in c.value for c in at.caption)  # waits for the click
    at.button(key="attr_patch_go").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert any("held by the test" in (p.proto.text or "") for p in at.get("progress"))  # progress, not a result
    at.button(key="attr_patch_cancel").click().run()
    assert any("cancelled" in i.value for i in at.info)
    assert at.button(key="attr_patch_go")  # and the button is back
    gate.set()
    at.button(key="attr_patch_go").click().run()
    deadline = time.monotonic() + TIMEOUT
    while not any("patching" in str(c.proto.spec) for c in at.get("plotly_chart")) and time.monotonic() < deadline:
        time.sleep(0.2)
        at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert any("patching" in str(c.proto.spec) for c in at.get("plotly_chart"))


# ---------------------------------------------------------------------------------- defaults per model


@pytest.mark.parametrize("name", ["kjv-small", "attn-only-1l", "attn-only-2l"])
def test_attribution_defaults_fit_each_builtin_model(name, monkeypatch):
    from workbench import load_model
    from workbench.app import choices, compute

    model = load_model(name)
    d = choices.prompt_defaults(model)
    assert len(compute.encode(model, d.clean)[0]) == len(compute.encode(model, d.corrupt)[0])
    compute.answer_id(model, d.answer), compute.answer_id(model, d.wrong)  # one token each, or this raises
    monkeypatch.setenv("WORKBENCH_APP_MODEL", name)
    at = AppTest.from_function(_script, args=("attribution",), default_timeout=TIMEOUT)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    assert at.text_input(key="attr_answer").value == d.answer


def test_changing_the_model_resets_the_pages_widgets(app_env):
    at = AppTest.from_function(_script, args=("attribution",), default_timeout=TIMEOUT)
    at.run()
    at.text_input(key="attr_answer").set_value(" Paris").run()
    at.sidebar.selectbox(key="wb_model").set_value("attn-only-2l").run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    assert at.text_input(key="attr_answer").value == "17"  # the toy's default, not the last model's " Paris"
    assert at.text_input(key="attr_prompt").value.startswith("0 17 42")


# ------------------------------------------------------------------------------------- hostile input


def test_a_model_name_with_a_control_character_is_a_message(app_env):
    for bad in ("a\x00b", "tiny-lm\n", "x" * 300):
        at = AppTest.from_function(_script, args=("tokenizer",), default_timeout=TIMEOUT)
        at.query_params["model"] = bad
        at.run()
        assert not at.exception, [e.value for e in at.exception]
        assert any("model name" in e.value for e in at.error), [e.value for e in at.error]


def test_a_huge_prompt_is_cut_before_it_is_tokenized(app_env, monkeypatch):
    from workbench.app import cached
    from workbench.app.choices import MAX_PROMPT_TOKENS

    model = cached.model("tiny-lm|cpu|float32")
    read = []
    real = type(model.tokenizer).encode

    def counting(self, text, *a, **k):
        read.append(len(text))
        return real(self, text, *a, **k)

    monkeypatch.setattr(type(model.tokenizer), "encode", counting)
    huge = "The cat sat on the mat. " * 400_000  # 9.6 MB
    at = AppTest.from_function(_script, args=("tokenizer",), default_timeout=TIMEOUT)
    at.run()
    read.clear()
    at.text_input(key="tok_prompt").set_value(huge).run()
    assert not at.exception, [e.value for e in at.exception]
    assert read and max(read) < 20_000, read[:5]
    assert any("more than" in w.value and "only the first" in w.value for w in at.warning)
    n = min(MAX_PROMPT_TOKENS, model.cfg.n_ctx)
    got = cached.encode("tiny-lm|cpu|float32", huge)
    assert got.ids == real(model.tokenizer, huge[:10_000])[:n]  # the same first tokens as tokenizing it all


def test_prompt_cap_gives_the_first_tokens_of_the_whole_text(app_home):
    from workbench.app.compute import encode, encode_capped

    model = _tiny(app_home)
    for text in ("one two three " * 40, "x" * 5000, "The cat " + " " * 3000 + "sat", "short"):
        got = encode_capped(model, text, 16)
        ids, pieces = encode(model, text)
        assert got.ids == ids[:16] and got.str_tokens == pieces[:16]
        assert got.n_full <= len(ids) and (not got.exact or got.n_full == len(ids))
