"""Logit lens and tuned lens: exact at the last layer, identity at initialisation, better after training."""

from __future__ import annotations

import pytest
import torch
from helpers import LLAMA_TINY, tiny_cfg

from workbench.analysis import logit_lens as LL
from workbench.errors import CheckpointError


@pytest.fixture(params=[{}, LLAMA_TINY], ids=["gpt2", "llama"])
def model(request):
    from workbench import HookedGPT

    return HookedGPT(tiny_cfg(**request.param)).eval()


def test_last_layer_is_the_models_output(model):
    tokens = torch.randint(0, 50, (2, 10))
    res = LL.logit_lens(model, tokens, k=3)
    assert res.labels == ["0", "1", "final"]
    assert res.kl_to_final[-1].abs().max() < 1e-6
    probs = model(tokens).softmax(-1).detach()
    top = probs.topk(3, dim=-1)
    torch.testing.assert_close(res.top_probs[-1], top.values)
    assert torch.equal(res.top_tokens[-1], top.indices)
    nxt = tokens[:, 1:]
    torch.testing.assert_close(res.target_prob[-1, :, :-1], probs[:, :-1].gather(-1, nxt[..., None]).squeeze(-1))
    assert res.target_prob[:, :, -1].isnan().all() and (res.target_rank[:, :, -1] == -1).all()
    # rank 0 exactly where the target is the top token
    assert torch.equal(res.target_rank[-1, :, :-1] == 0, top.indices[:, :-1, 0] == nxt)
    ent = -(probs * probs.log()).sum(-1)
    torch.testing.assert_close(res.entropy[-1], ent, atol=1e-5, rtol=1e-5)
    assert (res.kl_to_final[:-1] > 0).all()


def test_tuned_lens_at_init_is_the_logit_lens(model):
    tokens = torch.randint(0, 50, (2, 10))
    lens = LL.TunedLens.for_model(model)
    a, b = LL.logit_lens(model, tokens), LL.tuned_lens(model, lens, tokens)
    for x, y in zip(a[1:], b[1:]):
        assert torch.equal(x.nan_to_num(), y.nan_to_num())


def test_training_beats_the_logit_lens_held_out_and_round_trips(tmp_path):
    from workbench import HookedGPT

    torch.manual_seed(0)
    model = HookedGPT(tiny_cfg(n_layers=3, d_vocab=40)).eval()
    windows = torch.randint(0, 40, (64, 16))
    held_out = torch.randint(0, 40, (16, 16))
    cfg = LL.TunedLensConfig(steps=60, lr=1e-2, batch_size=8, eval_every=20)
    out = LL.train_tuned_lens(model, windows, cfg)
    assert out.losses[-1] < out.losses[0]
    assert not any(p.requires_grad is False for p in model.parameters())  # the model is given back as it was
    cmp = LL.compare_lenses(model, out.lens, held_out)
    assert (cmp.tuned_kl <= cmp.logit_kl + 1e-6).all(), cmp
    assert cmp.tuned_kl.sum() < 0.8 * cmp.logit_kl.sum()
    out.lens.save(tmp_path / "lens")
    loaded = LL.TunedLens.load(tmp_path / "lens", model)
    torch.testing.assert_close(LL.lens_kl(model, held_out, loaded), cmp.tuned_kl)
    with pytest.raises(CheckpointError, match="trained for 3 layers"):
        LL.TunedLens.load(tmp_path / "lens", HookedGPT(tiny_cfg()))
    with pytest.raises(CheckpointError, match="tuned-lens train"):
        LL.TunedLens.load(tmp_path / "nothing")


def test_restricted_vocabulary_training(model):
    """The cheap training decoder is the full one restricted to the batch's most likely tokens, and a
    lens trained with it still does no worse than the logit lens held out."""
    tokens = torch.randint(0, 50, (2, 8))
    resid = LL.lens_residuals(model, tokens)
    with torch.no_grad():
        full = model.unembed_resid(resid[-1]).float()
        decode, final = LL._training_decoder(model, full, vocab=12)
        idx = full.softmax(-1).sum((0, 1)).topk(12).indices
        torch.testing.assert_close(decode(resid[0]), model.unembed_resid(resid[0])[..., idx])
    torch.testing.assert_close(final, full[..., idx].log_softmax(-1))
    assert LL._training_decoder(model, full, vocab=None)[0] == model.unembed_resid

def test_restricted_vocabulary_training_beats_the_logit_lens_held_out(bigram_lm):
    """On a trained model (peaked outputs, so the KL is large), training on the 16 likeliest of 64 tokens."""
    model, windows = bigram_lm
    out = LL.train_tuned_lens(model, windows[:128], LL.TunedLensConfig(steps=40, lr=1e-2, batch_size=16,
                                                                       eval_every=20, vocab=16))
    cmp = LL.compare_lenses(model, out.lens, windows[-64:])
    assert (cmp.tuned_kl <= cmp.logit_kl + 1e-6).all(), cmp
    assert cmp.tuned_kl.sum() < 0.8 * cmp.logit_kl.sum(), cmp


def test_lens_frame_has_a_row_per_layer_and_position(model):
    res = LL.logit_lens(model, torch.randint(0, 50, (1, 6)))
    df = LL.lens_frame(res)
    assert len(df) == 3 * 6 and set(df.layer) == {"0", "1", "final"}


def _small_lm():
    from workbench.builtin import BUILTIN_DIR
    from workbench.model import HookedGPT

    for name in ("kjv-small",):
        d = BUILTIN_DIR / name
        if (d / "config.json").is_file():
            return HookedGPT.load(d).eval()
    pytest.skip("the small text LM checkpoint is not shipped yet")


def test_small_text_lm_tuned_lens_beats_logit_lens():
    model = _small_lm()
    text = ("In the beginning God created the heaven and the earth. And the earth was without form, and void; "
            "and darkness was upon the face of the deep. And the Spirit of God moved upon the face of the waters. "
            "And God said, Let there be light: and there was light. And God saw the light, that it was good: "
            "and God divided the light from the darkness. And God called the light Day, and the darkness he called "
            "Night. And the evening and the morning were the first day.")
    ids = model.to_tokens(text)[0]
    n = 32
    windows = ids[: (len(ids) // n) * n].view(-1, n)
    assert windows.shape[0] >= 3
    res = LL.logit_lens(model, windows[:1])
    assert res.kl_to_final[-1].abs().max() < 1e-5
    train, held = windows[:-1], windows[-1:]
    out = LL.train_tuned_lens(model, train.repeat(4, 1), LL.TunedLensConfig(steps=40, lr=3e-3, batch_size=4,
                                                                            eval_every=20, val_fraction=0.25))
    cmp = LL.compare_lenses(model, out.lens, held)
    assert (cmp.tuned_kl <= cmp.logit_kl + 1e-5).all()


@pytest.mark.smollm2
def test_smollm2_logit_lens_last_layer_is_exact(smollm2):
    tokens = smollm2.to_tokens("The capital of France is")
    res = LL.logit_lens(smollm2, tokens)
    assert res.kl_to_final[-1].abs().max() < 1e-5
    assert res.kl_to_final[0].mean() > res.kl_to_final[-2].mean()


def test_validation_residuals_are_computed_once(monkeypatch):
    """Each evaluation scores the same validation windows: their residuals are cached once (when they fit),
    and the kept translators are the same as when every evaluation recomputes them."""
    from workbench import HookedGPT

    torch.manual_seed(0)
    model = HookedGPT(tiny_cfg(n_layers=2, d_vocab=40)).eval()
    windows = torch.randint(0, 40, (40, 12))
    cfg = LL.TunedLensConfig(steps=8, lr=1e-2, batch_size=4, eval_every=2, val_fraction=0.25)  # 10 val windows
    calls = []
    real = LL.lens_residuals
    monkeypatch.setattr(LL, "lens_residuals", lambda m, t: calls.append(t.shape[0]) or real(m, t))
    cached = LL.train_tuned_lens(model, windows, cfg)
    assert calls == [8, 2] + [4] * 8  # the validation windows in 2 chunks, once, then one batch per step
    calls.clear()
    monkeypatch.setattr(LL, "VAL_CACHE_BYTES", 0)
    recomputed = LL.train_tuned_lens(model, windows, cfg)
    assert calls.count(4) == 8 and calls.count(8) == 1 + 4 and calls.count(2) == 1 + 4  # before training + 4 evals
    torch.testing.assert_close(cached.val_kl_tuned, recomputed.val_kl_tuned)
    for a, b in zip(cached.lens.parameters(), recomputed.lens.parameters()):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------ tuned lens on the run scaffold


class _Crash(RuntimeError):
    pass


def _crash_at(step):
    def on_step(done):
        if done == step:
            raise _Crash(f"killed after step {done}")
    return on_step


def _lens_run_inputs():
    from workbench import HookedGPT

    torch.manual_seed(0)
    model = HookedGPT(tiny_cfg(n_layers=3, d_vocab=40)).eval()
    windows = torch.randint(0, 40, (40, 12))
    cfg = LL.TunedLensConfig(steps=20, lr=1e-2, batch_size=4, eval_every=4, val_fraction=0.25, checkpoint_every=5)
    return model, windows, cfg


def test_killed_tuned_lens_run_resumes_to_the_same_lens(tmp_path):
    """A run stopped after step 13 (checkpoint at 10) and run again gives the unbroken run's lens, losses,
    kept translators and metrics.jsonl; writing checkpoints changes nothing against a run without a directory."""
    import json

    from workbench.runs import METRICS_FILE, read_metrics

    model, windows, cfg = _lens_run_inputs()
    plain = LL.train_tuned_lens(model, windows, cfg)
    unbroken = LL.train_tuned_lens(model, windows, cfg, out_dir=tmp_path / "a")
    with pytest.raises(_Crash):
        LL.train_tuned_lens(model, windows, cfg, out_dir=tmp_path / "b", on_step=_crash_at(13))
    assert [r["step"] for r in read_metrics(tmp_path / "b" / METRICS_FILE) if "loss" in r] == list(range(1, 14))
    seen = []
    resumed = LL.train_tuned_lens(model, windows, cfg, out_dir=tmp_path / "b", on_step=seen.append)
    assert seen == list(range(11, 21))  # from the checkpoint at step 10
    for other in (plain, resumed):
        for name, tensor in unbroken.lens.state_dict().items():
            assert torch.equal(tensor, other.lens.state_dict()[name]), name
        assert other.losses == unbroken.losses and other.reset_layers == unbroken.reset_layers
        assert torch.equal(other.val_kl_tuned, unbroken.val_kl_tuned)
        assert torch.equal(other.val_kl_logit, unbroken.val_kl_logit)
    a = (tmp_path / "a" / METRICS_FILE).read_text().splitlines()
    b = (tmp_path / "b" / METRICS_FILE).read_text().splitlines()
    assert a == b and len(a) == 20 + 5  # a loss record every step, a validation record every 4 steps and at the end
    assert set(json.loads(a[4])) == {"step", "val_kl", "val_kl_kept"}  # after the loss of step 4
    # a finished run's directory resumes to the finished lens without a step
    again = LL.train_tuned_lens(model, windows, cfg, out_dir=tmp_path / "a", on_step=seen.append)
    assert seen == list(range(11, 21)) and again.losses == unbroken.losses


def test_tuned_lens_resume_follows_the_same_settings_model_and_windows(tmp_path):
    from dataclasses import replace

    from workbench import HookedGPT

    model, windows, cfg = _lens_run_inputs()
    with pytest.raises(_Crash):
        LL.train_tuned_lens(model, windows, cfg, out_dir=tmp_path, on_step=_crash_at(6))
    with pytest.raises(CheckpointError, match=r"'lr': \(0.01, 0.02\)"):
        LL.train_tuned_lens(model, windows, replace(cfg, lr=2e-2), out_dir=tmp_path)
    with pytest.raises(CheckpointError, match="'windows'"):
        LL.train_tuned_lens(model, windows.flip(0), cfg, out_dir=tmp_path)
    with pytest.raises(CheckpointError, match="'d_model'"):
        LL.train_tuned_lens(HookedGPT(tiny_cfg(n_layers=3, d_vocab=40, d_model=16, n_heads=2)), windows, cfg,
                            out_dir=tmp_path)
    # how often checkpoints are written may change; resume=False starts over
    assert LL.train_tuned_lens(model, windows, replace(cfg, checkpoint_every=3), out_dir=tmp_path).losses
    fresh = LL.train_tuned_lens(model, windows, replace(cfg, lr=2e-2), out_dir=tmp_path, resume=False)
    assert len(fresh.losses) == cfg.steps


def test_tuned_lens_checkpoint_that_is_not_one_is_refused(tmp_path):
    model, windows, cfg = _lens_run_inputs()
    ckpt = tmp_path / "checkpoint" / LL.LENS_CHECKPOINT_FILE
    ckpt.parent.mkdir(parents=True)
    torch.save({"step": 3}, ckpt)
    with pytest.raises(CheckpointError, match="not a tuned-lens checkpoint.*settings"):
        LL.train_tuned_lens(model, windows, cfg, out_dir=tmp_path)
    ckpt.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot be read as a training checkpoint"):
        LL.train_tuned_lens(model, windows, cfg, out_dir=tmp_path)


@pytest.mark.parametrize("bad, match", [
    (dict(steps=0), "'steps': 0"), (dict(eval_every=0), "'eval_every': 0"), (dict(lr=0.0), "lr > 0"),
    (dict(val_fraction=1.0), "val_fraction=1.0"), (dict(vocab=0), "vocab=0"),
])
def test_tuned_lens_config_refuses_values_it_cannot_use(bad, match):
    from workbench.errors import ConfigError

    with pytest.raises(ConfigError, match=match):
        LL.TunedLensConfig(**bad)


def test_training_a_lens_leaves_a_shared_models_gradients_alone():
    """The app shares one model between sessions and trains tuned lenses on it in the background: the
    model's requires_grad flags stay as they were during and after training, no gradient lands on its
    weights, and a backward pass through the weights in the middle of training gets its gradient."""
    from workbench import HookedGPT

    model = HookedGPT(tiny_cfg()).eval().requires_grad_(True)
    tokens = torch.randint(0, 50, (1, 8))
    windows = torch.randint(0, 50, (16, 8))
    seen = []

    def mid_training_backward(step: int) -> None:
        seen.append(all(p.requires_grad for p in model.parameters()))
        model.zero_grad(set_to_none=True)
        model(tokens)[0, -1, 3].backward()
        seen.append(model.embed.W_E.grad is not None)
        model.zero_grad(set_to_none=True)

    LL.train_tuned_lens(model, windows, LL.TunedLensConfig(steps=3, batch_size=4, eval_every=2),
                        on_step=mid_training_backward)
    assert seen and all(seen)
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
