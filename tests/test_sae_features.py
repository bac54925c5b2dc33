"""Feature statistics: each field against a brute-force computation over the whole store."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from workbench.errors import DataError
from workbench.sae.features import (
    FeatureStats,
    FeatureStatsConfig,
    feature_contexts,
    feature_stats,
    residual_directions,
)
from workbench.sae.model import SAE, SAEConfig
from workbench.store import ActivationStore, StoreConfig, write_store

HOOKS = ("blocks.0.hook_resid_post", "blocks.0.mlp.hook_post", "blocks.0.attn.hook_z")

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors on shared cores


@pytest.fixture(scope="module")
def store(bigram_lm, tmp_path_factory) -> ActivationStore:
    path = tmp_path_factory.mktemp("features") / "store"
    windows = bigram_lm.windows[:160]
    write_store(bigram_lm.model, windows, path,
                StoreConfig(hooks=HOOKS, batch_windows=32, shard_tokens=700, first_position=1))
    return ActivationStore.open(path)


@pytest.fixture(scope="module")
def sae() -> SAE:
    sae = SAE(SAEConfig(d_in=32, d_sae=48, architecture="topk", k=3), seed=1)
    with torch.no_grad():
        sae.b_enc[:4] = -100.0  # four latents that can never fire
    return sae.eval()


CFG = FeatureStatsConfig(batch_size=500, n_top=6, n_samples=40, n_logits=5, n_neighbours=4)


@pytest.fixture(scope="module")
def stats(sae, store, bigram_lm) -> FeatureStats:
    return feature_stats(sae, store, HOOKS[0], CFG, model=bigram_lm.model)


@pytest.fixture(scope="module")
def latents(sae, store) -> torch.Tensor:
    with torch.no_grad():
        return sae.encode(store.acts(HOOKS[0]))


def test_density_mean_max_and_histogram(stats, latents):
    fires = (latents > 0).sum(0)
    assert torch.allclose(stats.density, fires.float() / latents.shape[0])
    assert stats.dead_fraction == pytest.approx(4 / 48) and stats.density[:4].eq(0).all()
    assert torch.allclose(stats.max_act, latents.max(0).values.clamp_min(0))
    mean = latents.clamp_min(0).sum(0) / fires.clamp_min(1)
    assert torch.allclose(stats.mean_active, mean, rtol=1e-5)
    assert torch.equal(stats.hist_counts.sum(1), fires)
    f = int(fires.argmax())
    vals = latents[:, f][latents[:, f] > 0].double()
    ref = torch.histogram(vals.clamp(1e-3, 1e3 * 0.999), stats.hist_edges.double()).hist.long()
    assert torch.equal(stats.hist_counts[f], ref)


def test_top_examples_are_the_true_top_rows(stats, latents):
    ref = latents.T.topk(CFG.n_top, dim=1)
    live = stats.density > 0
    assert torch.allclose(stats.top_values[live], ref.values[live])
    # the rows hold those values (ties could swap rows, so compare values at the rows)
    rows = stats.top_rows[live]
    assert torch.allclose(latents.T[live].gather(1, rows), ref.values[live])
    assert stats.top_rows[~live].eq(-1).all()


def test_uniform_sample_and_quantiles(stats, latents):
    for f in range(4, 48):
        rows = stats.sample_rows[f][stats.sample_rows[f] >= 0]
        firing = (latents[:, f] > 0).nonzero().squeeze(1)
        assert len(rows) == min(CFG.n_samples, len(firing)) and len(set(rows.tolist())) == len(rows)
        assert torch.isin(rows, firing).all()
        vals = stats.sample_values[f][: len(rows)]
        assert torch.allclose(vals, latents[rows, f]) and (vals.diff() >= 0).all()
        if len(firing) <= CFG.n_samples:
            assert set(rows.tolist()) == set(firing.tolist())
    f = int(stats.density.argmax())
    qs = stats.quantile_rows(f, n_quantiles=4)
    assert [q for q, _, _ in qs] == [0.125, 0.375, 0.625, 0.875]
    assert [v for _, _, v in qs] == sorted(v for _, _, v in qs)
    assert stats.quantile_rows(0) == []


def test_uniform_sample_is_not_biased_to_early_rows(sae, store):
    """With a big store and a small sample, the sampled rows spread over the whole store."""
    s = feature_stats(sae, store, HOOKS[0], FeatureStatsConfig(batch_size=300, n_samples=8, n_neighbours=0))
    busy = s.density.argsort(descending=True)[:10]
    rows = s.sample_rows[busy].flatten().float()
    assert 0.3 * store.n_rows < rows.mean() < 0.7 * store.n_rows


def test_one_pass_over_the_store(sae, store, monkeypatch):
    reads = []
    real = ActivationStore.acts
    monkeypatch.setattr(ActivationStore, "acts",
                        lambda self, hook, a=0, b=None, **kw: reads.append((a, b)) or real(self, hook, a, b, **kw))
    feature_stats(sae, store, HOOKS[0], CFG)
    covered = sorted(reads)
    assert covered[0][0] == 0 and covered[-1][1] == store.n_rows
    assert all(a[1] == b[0] for a, b in zip(covered, covered[1:]))  # each row once, in order


def test_logit_effects_and_neighbours(stats, sae, bigram_lm):
    model = bigram_lm.model
    d = sae.W_dec.detach()
    d = (d - d.mean(-1, keepdim=True)) * model.ln_final.w
    effects = d @ model.unembed.W_U
    assert torch.allclose(stats.logit_top_values, effects.topk(5, -1).values, atol=1e-5)
    assert torch.equal(stats.logit_bottom_ids, effects.topk(5, -1, largest=False).indices)
    cos = F.normalize(sae.W_dec, dim=-1) @ F.normalize(sae.W_dec, dim=-1).T
    cos.fill_diagonal_(-2)
    ref = cos.topk(4, -1)
    assert torch.allclose(stats.neighbour_cos, ref.values, atol=1e-6)
    assert torch.equal(stats.neighbour_ids[:, 0], ref.indices[:, 0])


@pytest.mark.parametrize("hook, out_hook", [("blocks.0.mlp.hook_post", "blocks.0.hook_mlp_out"),
                                            ("blocks.0.attn.hook_z", "blocks.0.hook_attn_out")])
def test_residual_direction_is_what_the_model_writes(bigram_lm, hook, out_hook):
    """Adding a decoder row at the hook changes the sub-layer's output by exactly its residual direction."""
    model = bigram_lm.model
    d_in = 64 if "mlp" in hook else 32
    sae = SAE(SAEConfig(d_in=d_in, d_sae=5, architecture="topk", k=1), seed=0)
    dirs = residual_directions(model, sae, hook)
    tokens = bigram_lm.windows[:2]
    _, clean = model.run_with_cache(tokens, names_filter=[out_hook])
    row = sae.W_dec[2].detach()
    add = lambda x, h: x + row.reshape(x.shape[2:])  # noqa: E731
    with model.hooks([(hook, add)]):
        _, pushed = model.run_with_cache(tokens, names_filter=[out_hook])
    assert torch.allclose(pushed[out_hook] - clean[out_hook], dirs[2].expand_as(clean[out_hook]), atol=1e-5)
    assert residual_directions(model, sae, "blocks.0.mlp.hook_pre") is None


def test_feature_contexts_give_per_token_activations(stats, sae, store, latents):
    f = int(stats.density.argmax())
    rows = stats.top_rows[f, :3].tolist()
    ctxs = feature_contexts(sae, store, HOOKS[0], f, rows, before=5, after=2)
    windows, first = store.windows(), 1
    for ctx, r in zip(ctxs, rows):
        assert ctx.row == r and ctx.value == pytest.approx(float(latents[r, f]))
        assert ctx.acts[ctx.focus] == pytest.approx(ctx.value)
        assert ctx.tokens == windows[ctx.window, ctx.positions[0] : ctx.positions[-1] + 1].tolist()
        for q, a in zip(ctx.positions, ctx.acts):
            expect = 0.0 if q < first else float(latents[store.row_of(ctx.window, q), f])
            assert a == pytest.approx(expect)
    with pytest.raises(DataError, match="feature 99 does not exist"):
        feature_contexts(sae, store, HOOKS[0], 99, rows)


def test_save_load_round_trip(stats, tmp_path):
    stats.save(tmp_path)
    back = FeatureStats.load(tmp_path)
    assert back.hook == stats.hook and back.n_rows == stats.n_rows
    assert torch.equal(back.top_rows, stats.top_rows) and torch.equal(back.hist_counts, stats.hist_counts)
    assert back.summary() == stats.summary()


def test_wrong_width_or_hook_is_refused(store):
    with pytest.raises(DataError, match="d_in 64, the SAE expects 32"):
        feature_stats(SAE(SAEConfig(d_in=32, d_sae=8, k=2)), store, HOOKS[1])
    with pytest.raises(DataError, match="holds no hook"):
        feature_stats(SAE(SAEConfig(d_in=32, d_sae=8, k=2)), store, "blocks.0.hook_resid_pre")
