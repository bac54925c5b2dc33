"""Feature statistics for dashboards, computed in one pass over an activation store.

Per latent: firing density, a histogram of its (positive) activations on fixed log-spaced bins,
its top activating rows, a uniform random sample of the rows where it fires (from which quantile
samples are drawn: the rows at the 10th, 20th, ... percentile of its activations), top and bottom
logit effects of its decoder direction, and its nearest latents by decoder cosine.

Everything that needs the data is gathered in a single sequential read of the store; the
per-token activations around a chosen example are read back on demand (:func:`feature_contexts`),
only for the features someone looks at.

The uniform sample uses random keys: every firing (row, latent) pair draws a uniform key and each
latent keeps the ``n`` smallest keys seen so far, which is a uniform sample without replacement
of its firings (bottom-k sampling) and merges batch by batch with the same top-k machinery as the
top examples.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, NamedTuple

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from safetensors.torch import load_file, save_file
from torch import Tensor

from workbench.errors import ConfigError, DataError
from workbench.sae import metrics
from workbench.sae.model import SAE
from workbench.store import ActivationStore


@dataclass(frozen=True)
class FeatureStatsConfig:
    """What to gather per latent."""

    batch_size: int = 2048
    """Store rows per SAE batch."""
    max_rows: int | None = None
    """Read at most this many rows of the store (None: all)."""
    n_top: int = 16
    """Top activating rows kept per latent."""
    n_samples: int = 64
    """Size of the uniform sample of firing rows per latent (quantile samples are drawn from it)."""
    hist_bins: int = 60
    """Histogram bins, log-spaced between ``10**hist_log10_min`` and ``10**hist_log10_max``."""
    hist_log10_min: float = -3.0
    hist_log10_max: float = 3.0
    n_logits: int = 10
    """Top and bottom logit effects kept per latent (0: skip)."""
    n_neighbours: int = 8
    """Nearest latents by decoder cosine kept per latent (0: skip)."""
    dense_threshold: float = 0.1
    """A latent firing on more than this fraction of rows counts as dense."""
    seed: int = 0
    """Seed of the uniform sample."""

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.n_top < 1 or self.n_samples < 1 or self.hist_bins < 1:
            raise ConfigError("FeatureStatsConfig needs batch_size, n_top, n_samples and hist_bins >= 1")
        if self.hist_log10_min >= self.hist_log10_max:
            raise ConfigError(f"hist_log10_min ({self.hist_log10_min}) must be below "
                              f"hist_log10_max ({self.hist_log10_max})")


@dataclass
class FeatureStats:
    """Per-latent dashboard statistics (row indices refer to the store they were computed on; -1 = none)."""

    hook: str
    n_rows: int
    """Store rows read."""
    density: Float[Tensor, " d_sae"]
    """Fraction of rows on which each latent fires (activation > 0)."""
    mean_active: Float[Tensor, " d_sae"]
    """Mean activation over the rows where it fires (0 if it never does)."""
    max_act: Float[Tensor, " d_sae"]
    hist_edges: Float[Tensor, " bins_plus_one"]
    """Bin edges of the histograms (activations below the first edge go to bin 0, above the last to the last)."""
    hist_counts: Int[Tensor, "d_sae bins"]
    top_values: Float[Tensor, "d_sae n_top"]
    """Largest activations of each latent, descending."""
    top_rows: Int[Tensor, "d_sae n_top"]
    sample_values: Float[Tensor, "d_sae n_samples"]
    """A uniform random sample of each latent's firing activations, ascending."""
    sample_rows: Int[Tensor, "d_sae n_samples"]
    logit_top_ids: Int[Tensor, "d_sae n_logits"] | None
    """Tokens whose logits the decoder direction raises most (None if the hook cannot reach the unembedding)."""
    logit_top_values: Float[Tensor, "d_sae n_logits"] | None
    logit_bottom_ids: Int[Tensor, "d_sae n_logits"] | None
    logit_bottom_values: Float[Tensor, "d_sae n_logits"] | None
    neighbour_ids: Int[Tensor, "d_sae n_neighbours"] | None
    """Latents with the most similar decoder directions, most similar first."""
    neighbour_cos: Float[Tensor, "d_sae n_neighbours"] | None
    dense_threshold: float = 0.1

    @property
    def d_sae(self) -> int:
        return int(self.density.shape[0])

    @property
    def dead_fraction(self) -> float:
        return metrics.dead_fraction(self.density)

    @property
    def dense_fraction(self) -> float:
        return metrics.dense_fraction(self.density, self.dense_threshold)

    def quantile_rows(self, feature: int, n_quantiles: int = 5) -> list[tuple[float, int, float]]:
        """Return ``(quantile, row, activation)`` for evenly spaced quantiles of a latent's firing activations."""
        valid = self.sample_rows[feature] >= 0
        values, rows = self.sample_values[feature][valid], self.sample_rows[feature][valid]
        if values.numel() == 0:
            return []
        out = []
        for i in range(n_quantiles):
            q = (i + 0.5) / n_quantiles
            j = min(int(q * values.numel()), values.numel() - 1)
            out.append((q, int(rows[j]), float(values[j])))
        return out

    def summary(self) -> dict[str, Any]:
        """Return headline numbers (for JSON reports)."""
        return {
            "hook": self.hook,
            "n_rows": self.n_rows,
            "d_sae": self.d_sae,
            "dead_fraction": self.dead_fraction,
            "dense_fraction": self.dense_fraction,
            "mean_density": float(self.density.mean()),
            "median_density_of_live": float(live.median()) if (live := self.density[self.density > 0]).numel() else 0.0,
        }

    def save(self, directory: str | Path) -> None:
        """Write ``feature_stats.safetensors`` and ``feature_stats.json`` into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), Tensor)}
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / "feature_stats.safetensors"))
        meta = {"hook": self.hook, "n_rows": self.n_rows, "dense_threshold": self.dense_threshold}
        (directory / "feature_stats.json").write_text(json.dumps(meta, indent=1))

    @classmethod
    def load(cls, directory: str | Path) -> FeatureStats:
        directory = Path(directory)
        try:
            tensors = load_file(str(directory / "feature_stats.safetensors"))
            meta = json.loads((directory / "feature_stats.json").read_text())
        except (OSError, ValueError) as exc:
            raise DataError(f"no readable feature statistics in {directory} ({exc}); "
                            "compute them with feature_stats()") from exc
        kwargs = {f.name: tensors.get(f.name) for f in fields(cls) if f.name not in meta}
        return cls(**meta, **kwargs)


def _merge_top(
    values: Tensor, rows: Tensor, new_values: Tensor, new_rows: Tensor, n: int, largest: bool
) -> tuple[Tensor, Tensor]:
    """Keep the ``n`` best of two ``[d_sae, m]`` candidate sets per latent."""
    v = torch.cat([values, new_values], dim=1)
    r = torch.cat([rows, new_rows], dim=1)
    best = v.topk(min(n, v.shape[1]), dim=1, largest=largest, sorted=True)
    return best.values, r.gather(1, best.indices)


def residual_directions(model: Any, sae: SAE, hook: str) -> Float[Tensor, "d_sae d_model"] | None:
    """Return each latent's decoder direction as written into the residual stream, or None.

    Residual and sub-layer output hooks write there directly; ``mlp.hook_post`` goes through
    ``W_out`` and ``attn.hook_z`` through ``W_O``. Hooks upstream of a nonlinearity have no
    linear path to the logits, and get None.
    """
    W_dec = sae.W_dec.detach().float()
    if sae.cfg.is_transcoder:  # it reads `hook` (an MLP's input) but its decoder writes where the MLP writes
        hook = (getattr(sae, "metadata", None) or {}).get("hook_name_out") or hook
    parts = hook.split(".")
    d_model = model.cfg.d_model
    if hook.endswith(("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out",
                      "mlp.hook_out", "hook_embed")):
        return W_dec if W_dec.shape[1] == d_model else None
    if hook.endswith("mlp.hook_post") and parts[0] == "blocks":
        return W_dec @ model.blocks[int(parts[1])].mlp.W_out.detach().float()
    if hook.endswith("attn.hook_z") and parts[0] == "blocks":
        W_O = model.blocks[int(parts[1])].attn.W_O.detach().float()  # [head d_head d_model]
        per_head = einops.rearrange(W_dec, "d_sae (head d_head) -> d_sae head d_head", head=W_O.shape[0])
        return einops.einsum(per_head, W_O, "d_sae head d_head, head d_head d_model -> d_sae d_model")
    return None


@torch.no_grad()
def logit_effects(model: Any, directions: Float[Tensor, "d_sae d_model"], k: int,
                  chunk: int = 256) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Return ``(top_ids, top_values, bottom_ids, bottom_values)`` of ``directions @ W_U`` per latent.

    The final norm's gain is folded in (and a LayerNorm's centering applied), since that is the
    linear part of what the final norm does to a direction; its input-dependent scale is not.
    """
    W_U = model.unembed.W_U.detach().float()
    ln = model.ln_final
    outs: list[list[Tensor]] = [[], [], [], []]
    for c0 in range(0, directions.shape[0], chunk):
        d = directions[c0 : c0 + chunk]
        if getattr(ln, "b", None) is not None:  # layernorm: centre first
            d = d - d.mean(-1, keepdim=True)
        effects = (d * ln.w.detach().float()) @ W_U
        top = effects.topk(k, dim=-1)
        bottom = effects.topk(k, dim=-1, largest=False)
        for lst, t in zip(outs, (top.indices, top.values, bottom.indices, bottom.values)):
            lst.append(t)
    return tuple(torch.cat(lst) for lst in outs)  # type: ignore[return-value]


@torch.no_grad()
def decoder_neighbours(sae: SAE, k: int, chunk: int = 1024) -> tuple[Int[Tensor, "d_sae k"], Float[Tensor, "d_sae k"]]:
    """Return the ``k`` latents with the most similar decoder directions (cosine) for each latent."""
    W = F.normalize(sae.W_dec.detach().float(), dim=-1)
    k = min(k, W.shape[0] - 1)
    ids, cos = [], []
    for c0 in range(0, W.shape[0], chunk):
        sims = W[c0 : c0 + chunk] @ W.T
        sims[torch.arange(sims.shape[0]), torch.arange(c0, c0 + sims.shape[0])] = -float("inf")  # not itself
        best = sims.topk(k, dim=-1)
        ids.append(best.indices)
        cos.append(best.values)
    return torch.cat(ids), torch.cat(cos)


@torch.no_grad()
def feature_stats(sae: SAE, store: ActivationStore, hook: str, cfg: FeatureStatsConfig = FeatureStatsConfig(),
                  model: Any = None) -> FeatureStats:
    """Return per-latent statistics of ``sae`` on ``store``'s rows of ``hook``, in one pass over the store.

    ``model`` (optional) adds logit effects; it must be the model the store came from.
    """
    store.check_sae(sae, hook)
    if model is not None:
        store.check_model(model)
    d_sae = sae.cfg.d_sae
    device = sae.W_enc.device
    n_top, n_smp = cfg.n_top, cfg.n_samples
    top_v = torch.full((d_sae, 0), -float("inf"), device=device)
    top_r = torch.full((d_sae, 0), -1, dtype=torch.long, device=device)
    smp_k = torch.full((d_sae, 0), float("inf"), device=device)
    smp_v = torch.zeros((d_sae, 0), device=device)
    smp_r = torch.full((d_sae, 0), -1, dtype=torch.long, device=device)
    fires = torch.zeros(d_sae, dtype=torch.float64, device=device)
    act_sum = torch.zeros(d_sae, dtype=torch.float64, device=device)
    max_act = torch.zeros(d_sae, device=device)
    edges = torch.logspace(cfg.hist_log10_min, cfg.hist_log10_max, cfg.hist_bins + 1)
    inner_log_edges = torch.linspace(cfg.hist_log10_min, cfg.hist_log10_max, cfg.hist_bins + 1)[1:-1].to(device)
    hist = torch.zeros(d_sae * cfg.hist_bins, dtype=torch.long, device=device)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    was_training = sae.training
    sae.eval()
    n = 0
    stop = store.n_rows if cfg.max_rows is None else min(cfg.max_rows, store.n_rows)
    try:
        for batch in store.iter_rows(hook, cfg.batch_size, stop=stop):
            x = batch.acts.to(device, sae.W_enc.dtype)
            if not bool(torch.isfinite(x).all()):
                raise DataError(f"store rows {batch.start}..{batch.start + x.shape[0]} of {hook!r} hold NaN or Inf")
            lat = sae.encode(x).float()  # [batch d_sae]
            rows = torch.arange(batch.start, batch.start + x.shape[0], device=device)
            active = lat > 0
            fires += active.sum(0).double()
            act_sum += lat.clamp_min(0).sum(0).double()
            max_act = torch.maximum(max_act, lat.max(0).values)
            # histogram over the firing entries only (few for a sparse code)
            nz = active.nonzero()
            vals = lat[nz[:, 0], nz[:, 1]]
            bins = torch.bucketize(vals.log10(), inner_log_edges)
            hist.index_add_(0, nz[:, 1] * cfg.hist_bins + bins, torch.ones_like(bins))
            # top activations
            latT = lat.T  # [d_sae batch]
            m = min(n_top, x.shape[0])
            bt = latT.topk(m, dim=1)
            top_v, top_r = _merge_top(top_v, top_r, bt.values, rows[bt.indices], n_top, largest=True)
            # uniform sample of firings: smallest random keys win
            keys = torch.rand(latT.shape, generator=gen, device=device).masked_fill_(~active.T, float("inf"))
            m = min(n_smp, x.shape[0])
            bk = keys.topk(m, dim=1, largest=False)
            cand_k = torch.cat([smp_k, bk.values], 1)
            cand_v = torch.cat([smp_v, latT.gather(1, bk.indices)], 1)
            cand_r = torch.cat([smp_r, rows[bk.indices]], 1)
            keep = cand_k.topk(min(n_smp, cand_k.shape[1]), dim=1, largest=False).indices
            smp_k, smp_v, smp_r = cand_k.gather(1, keep), cand_v.gather(1, keep), cand_r.gather(1, keep)
            n += x.shape[0]
    finally:
        sae.train(was_training)
    if n == 0:
        raise DataError(f"the store has no rows of {hook!r} to compute feature statistics on")
    # rows that never fired are not examples
    top_r = torch.where(top_v > 0, top_r, -1)
    top_v = top_v.clamp_min(0)
    valid = torch.isfinite(smp_k)
    smp_v = torch.where(valid, smp_v, torch.full_like(smp_v, float("inf")))
    order = smp_v.argsort(dim=1)
    smp_v, smp_r, valid = smp_v.gather(1, order), smp_r.gather(1, order), valid.gather(1, order)
    smp_v = torch.where(valid, smp_v, 0.0)
    smp_r = torch.where(valid, smp_r, -1)

    logit = (None, None, None, None)
    if model is not None and cfg.n_logits > 0:
        directions = residual_directions(model, sae, hook)
        if directions is not None:
            logit = logit_effects(model, directions.to(model.unembed.W_U.device), min(cfg.n_logits, model.cfg.d_vocab))
    nb_ids = nb_cos = None
    if cfg.n_neighbours > 0 and d_sae > 1:
        nb_ids, nb_cos = decoder_neighbours(sae, cfg.n_neighbours)
    cpu = lambda t: None if t is None else t.cpu()  # noqa: E731
    return FeatureStats(
        hook=hook,
        n_rows=n,
        density=(fires / n).float().cpu(),
        mean_active=(act_sum / fires.clamp_min(1)).float().cpu(),
        max_act=max_act.clamp_min(0).cpu(),
        hist_edges=edges,
        hist_counts=hist.view(d_sae, cfg.hist_bins).cpu(),
        top_values=top_v.cpu(),
        top_rows=top_r.cpu(),
        sample_values=smp_v.cpu(),
        sample_rows=smp_r.cpu(),
        logit_top_ids=cpu(logit[0]),
        logit_top_values=cpu(logit[1]),
        logit_bottom_ids=cpu(logit[2]),
        logit_bottom_values=cpu(logit[3]),
        neighbour_ids=cpu(nb_ids),
        neighbour_cos=cpu(nb_cos),
        dense_threshold=cfg.dense_threshold,
    )


class FeatureContext(NamedTuple):
    """One example of a latent firing, with its per-token activations around it."""

    row: int
    """Store row of the example token."""
    window: int
    position: int
    value: float
    """The latent's activation on the example token."""
    tokens: list[int]
    """Token ids of the context, the example token at index ``focus``."""
    positions: list[int]
    acts: list[float]
    """The latent's activation on every context token (0 where not stored, e.g. a skipped BOS)."""
    focus: int


@torch.no_grad()
def feature_contexts(
    sae: SAE, store: ActivationStore, hook: str, feature: int, rows: list[int], before: int = 12, after: int = 4
) -> list[FeatureContext]:
    """Return, for each store row in ``rows``, the latent's activation on the tokens around it."""
    if not 0 <= feature < sae.cfg.d_sae:
        raise DataError(f"feature {feature} does not exist; the SAE has d_sae={sae.cfg.d_sae} latents")
    store.check_sae(sae, hook)
    rows = [int(r) for r in rows if int(r) >= 0]
    if not rows:
        return []
    positions, wins = store.positions(), store.window_index()
    windows = store.windows()
    first = store.manifest.first_position
    spans = []
    for r in rows:
        w, p = int(wins[r]), int(positions[r])
        lo, hi = max(0, p - before), min(store.n_ctx, p + after + 1)
        spans.append((r, w, p, lo, hi))
    # read each needed stored row once, encode them together
    need = sorted({store.row_of(w, q) for _, w, _, lo, hi in spans for q in range(max(lo, first), hi)})
    acts = torch.cat([store.acts(hook, r, r + 1) for r in need]) if need else torch.empty(0, sae.cfg.d_in)
    values = (sae.encode(acts.to(sae.W_enc.device, sae.W_enc.dtype))[:, feature].float().cpu() if need
              else torch.empty(0))
    value_of = dict(zip(need, values.tolist()))
    out = []
    for r, w, p, lo, hi in spans:
        per_token = [value_of.get(store.row_of(w, q), 0.0) if q >= first else 0.0 for q in range(lo, hi)]
        out.append(
            FeatureContext(r, w, p, value_of[r], windows[w, lo:hi].tolist(), list(range(lo, hi)), per_token, p - lo)
        )
    return out
