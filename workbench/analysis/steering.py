"""Steering vectors: push the model along a direction, and measure what that does.

    vec = contrast_vector(model, contrast_set, layer=12)            # mean difference of the two classes
    vec = from_probe(ProbeDirection.load("runs/truth-probe"))       # a probe's direction
    vec = from_sae_feature(sae, 1234, "blocks.6.hook_resid_post")   # an SAE/transcoder latent's decoder row
    out = steered_generation(model, "I think the film was", vec, multiplier=4.0, max_new_tokens=20)
    out.plain.texts[0], out.steered.texts[0]
    curve = steering_curve(model, vec, [0, 1, 2, 4], steered_texts, target, reference, unrelated_windows)

A steering vector is added, times a multiplier, to one hook's activation at every position
(activation addition, Turner et al. 2023; contrastive activation addition, Rimsky et al. 2024). The
hooks go through ``generate``'s ``fwd_hooks``, so they stay on for the prompt and for every
generated token, and they belong to the calling run only (``workbench.hooks``): another thread
sharing the model never sees them.

The effect is measured two ways: the *target measure* (a logit difference at the last position, or a
probe's score) on texts being steered, against the gap between the two classes' unsteered measures;
and the *side effect*, the KL divergence per token between the unsteered and the steered next-token
distributions on unrelated text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from jaxtyping import Float, Int
from torch import Tensor

from workbench.analysis.patching import LogitDiff
from workbench.analysis.probe_data import ProbeDataset, read_positions
from workbench.analysis.probes import ProbeDirection, collect_activations, probe_hooks
from workbench.errors import DataError, InputError
from workbench.generate import GenerationOutput, generate
from workbench.model import HookedGPT
from workbench.names import layer_of

#: what a steering study measures: a logit difference at the last position, or a probe's score at its hook
Target = LogitDiff | ProbeDirection


@dataclass
class SteeringVector:
    """A vector added (times a multiplier) to one hook's activation at every position."""

    #: the vector added at multiplier 1
    vector: Float[Tensor, " d_model"]
    #: the hook it is added at, e.g. ``blocks.12.hook_resid_post``
    hook: str
    #: where it came from: ``contrast``, ``probe:logistic``, ``probe:mean_diff``, ``sae_feature``
    source: str
    #: what it was built from (dataset, feature index, norms, ...)
    meta: dict = field(default_factory=dict)

    def check(self, model: HookedGPT) -> SteeringVector:
        """Return self after checking that the hook exists in ``model`` and the vector has the hook's width."""
        model.hook_point(self.hook)
        layer = layer_of(self.hook)
        if layer is not None and not 0 <= layer < model.cfg.n_layers:
            raise InputError(f"layer {layer} is out of range: the model has {model.cfg.n_layers} layers")
        width = _hook_width(model, self.hook)
        if self.vector.ndim != 1 or self.vector.shape[0] != width:
            raise InputError(f"the steering vector has shape {tuple(self.vector.shape)}, but {self.hook} has width "
                             f"{width}; build it on the same model and hook (or pick the hook it was made for)")
        return self

    def hooks(self, multiplier: float) -> list[tuple[str, object]]:
        """Return the ``fwd_hooks`` that add ``multiplier * vector`` at every position (none for multiplier 0)."""
        if multiplier == 0:
            return []
        return [(self.hook, add_vector_hook(self.vector, multiplier))]


def _hook_width(model: HookedGPT, hook: str) -> int:
    if hook.endswith(("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out",
                      "hook_embed", "hook_pos_embed", "hook_normalized")):
        return model.cfg.d_model
    return model.hook_shapes(1, 1)[hook][-1]


def add_vector_hook(vector: Float[Tensor, " d_model"], multiplier: float):
    """Return a hook that adds ``multiplier * vector`` to the activation at every position."""
    cache: dict[tuple, Tensor] = {}

    def add(act: Tensor, hook) -> Tensor:
        key = (act.dtype, act.device)
        if key not in cache:  # converted once per generation, not once per decode step
            cache[key] = (multiplier * vector.float()).to(dtype=act.dtype, device=act.device)
        return act + cache[key]

    return add


# ------------------------------------------------------------------------------------ building vectors


def contrast_vector(model: HookedGPT, contrast: ProbeDataset, layer: int, kind: str = "resid_post",
                    batch_size: int = 32) -> SteeringVector:
    """Return the mean activation of label-1 texts minus that of label-0 texts at ``kind``/``layer``, read at the
    dataset's position (a marked token or the last one): multiplier 1 moves a text by the class difference."""
    contrast.check()
    hook = probe_hooks(model, kind, [layer])[0]
    acts = collect_activations(model, read_positions(model, contrast), [hook], batch_size)[0]
    y = torch.tensor(contrast.labels)
    diff = acts[y == 1].mean(0) - acts[y == 0].mean(0)
    return SteeringVector(diff, hook, "contrast", {
        "dataset": contrast.name, "n": len(contrast), "norm": float(diff.norm()),
        "resid_norm": float(acts.norm(dim=-1).mean()), "towards": contrast.label_names[1]})


def from_probe(direction: ProbeDirection, scale: float | None = None) -> SteeringVector:
    """Return a probe direction as a steering vector: the unit direction times ``scale`` (default: the distance
    between the class means along it, so that multiplier 1 is comparable with the contrast vector)."""
    if scale is None:
        scale = float(direction.meta.get("class_gap", 1.0)) or 1.0
    return SteeringVector(direction.vector.float() * scale, direction.hook, f"probe:{direction.method}",
                          {**direction.meta, "scale": scale})


def from_sae_feature(sae, feature: int, hook: str | None = None) -> SteeringVector:
    """Return an SAE's (or transcoder's) latent ``feature`` as a steering vector: its decoder row, as stored.

    ``hook`` defaults to where the decoder writes: a transcoder's output hook (``hook_name_out`` in its
    metadata), else the SAE's own hook (``hook_name``)."""
    meta = getattr(sae, "metadata", None) or {}
    hook = hook or meta.get("hook_name_out") or meta.get("hook_name")
    if not hook:
        raise InputError("the SAE's metadata names no hook; say which hook its decoder writes to (e.g. "
                         "blocks.2.hook_resid_post, or a transcoder's blocks.2.mlp.hook_out)")
    d_sae = sae.W_dec.shape[0]
    if not 0 <= feature < d_sae:
        raise InputError(f"feature {feature} is out of range: the SAE has {d_sae} latents, numbered 0..{d_sae - 1}")
    row = sae.W_dec[feature].detach().float().cpu()
    return SteeringVector(row, hook, "sae_feature", {"feature": feature, "norm": float(row.norm())})


# ----------------------------------------------------------------------------------------- generation


class SteeredGeneration(NamedTuple):
    """The same prompt continued without and with steering."""

    plain: GenerationOutput
    steered: GenerationOutput
    multiplier: float


def steered_generation(model: HookedGPT, prompt, vector: SteeringVector, multiplier: float,
                       max_new_tokens: int = 32, **sampling) -> SteeredGeneration:
    """Return the prompt continued without and with ``multiplier * vector`` (hooks on for every token).

    ``sampling``: ``temperature``, ``top_k``, ``top_p``, ``seed``, ``stop_tokens``, as
    :func:`workbench.generate.generate` takes them; with a seed both runs draw the same random numbers."""
    vector.check(model)
    plain = generate(model, prompt, max_new_tokens, **sampling)
    steered = generate(model, prompt, max_new_tokens, fwd_hooks=vector.hooks(multiplier), **sampling)
    return SteeredGeneration(plain, steered, multiplier)


# ------------------------------------------------------------------------------------------ measuring


def _padded(tokens: Sequence[Sequence[int]], device) -> Int[Tensor, "batch pos"]:
    width = max(len(t) for t in tokens)
    out = torch.zeros(len(tokens), width, dtype=torch.long)
    for i, t in enumerate(tokens):
        out[i, : len(t)] = torch.tensor(list(t))
    return out.to(device)


def measure(model: HookedGPT, texts: ProbeDataset | Sequence[str], target: Target,
            fwd_hooks: Sequence = (), batch_size: int = 32) -> Float[Tensor, " batch"]:
    """Return the target measure of every text at its read position (a dataset's position, else the last token)
    with ``fwd_hooks`` attached: a logit difference of the next token, or a probe's score ``x @ weight + bias``."""
    ds = texts if isinstance(texts, ProbeDataset) else ProbeDataset(list(texts), [0] * len(texts))
    reads = read_positions(model, ds)
    device = model.embed.W_E.device
    if isinstance(target, ProbeDirection):
        target.check_width(model.cfg.d_model)
        model.hook_point(target.hook)
    out = []
    with torch.inference_mode(), model.hooks(fwd_hooks):
        for start in range(0, len(reads.tokens), batch_size):
            toks = _padded(reads.tokens[start: start + batch_size], device)
            pos = torch.tensor(reads.positions[start: start + batch_size], device=device)
            rows = torch.arange(len(pos), device=device)
            if isinstance(target, ProbeDirection):
                _, cache = model.run_with_cache(toks, names_filter=[target.hook],
                                                stop_at_layer=_stop_after(model, target.hook))
                x = cache[target.hook][rows, pos].float()
                bias = 0.0 if target.bias != target.bias else target.bias  # NaN: no threshold, the raw projection
                out.append((x @ target.weight.float().to(x.device) + bias).cpu())
            else:
                resid = model.run_blocks(model.embed_tokens(model.check_tokens(toks)))
                logits = model.unembed_resid(resid[rows, pos][:, None])[:, 0].float()  # only the read positions
                out.append(target(logits).cpu())
    return torch.cat(out)


def _stop_after(model: HookedGPT, hook: str) -> int | None:
    layer = layer_of(hook)
    return None if layer is None else layer + 1


def next_token_logprobs(model: HookedGPT, windows: Int[Tensor, "batch pos"], fwd_hooks: Sequence = (),
                        batch_size: int = 8) -> Float[Tensor, "batch pos d_vocab"]:
    """Return the next-token log-probabilities at every position of ``windows`` (float32), with ``fwd_hooks`` on."""
    device = model.embed.W_E.device
    out = []
    with torch.inference_mode(), model.hooks(fwd_hooks):
        for start in range(0, windows.shape[0], batch_size):
            out.append(model(windows[start: start + batch_size].to(device)).float().log_softmax(-1))
    return torch.cat(out)


def kl_on_text(model: HookedGPT, windows: Int[Tensor, "batch pos"], fwd_hooks: Sequence,
               plain: Float[Tensor, "batch pos d_vocab"] | None = None, batch_size: int = 8) -> float:
    """Return the mean KL(plain || steered) of the next-token distributions over every position of ``windows``,
    in nats per token: what steering does to text it was not meant for. ``plain``: the unsteered
    :func:`next_token_logprobs`, when already computed (a curve reuses them for every multiplier)."""
    if not fwd_hooks:
        return 0.0
    if plain is None:
        plain = next_token_logprobs(model, windows, (), batch_size)
    total = 0.0
    for start in range(0, windows.shape[0], batch_size):
        p = plain[start: start + batch_size]
        q = next_token_logprobs(model, windows[start: start + batch_size], fwd_hooks, batch_size)
        total += float((p.exp() * (p - q.to(p.device))).sum())
    return total / windows.numel()


@dataclass
class SteeringCurve:
    """The target measure and the side effect over a range of multipliers."""

    multipliers: list[float]
    #: mean target measure of the steered texts at each multiplier
    measure: Float[Tensor, " mult"]
    #: mean KL(plain || steered) per token on unrelated text at each multiplier (nats)
    kl: Float[Tensor, " mult"]
    #: the unsteered mean measure of each reference class (label 0, label 1)
    class_means: tuple[float, float]
    #: the steered texts' unsteered mean measure
    baseline: float

    @property
    def gap(self) -> float:
        """Mean measure of class 1 minus class 0, unsteered."""
        return self.class_means[1] - self.class_means[0]

    @property
    def fraction_of_gap(self) -> Float[Tensor, " mult"]:
        """How far steering moved the measure, as a fraction of the class gap (1: as far as class 0 -> class 1)."""
        return (self.measure - self.baseline) / self.gap

    def reaching(self, fraction: float = 0.5, max_kl: float = 0.5) -> float | None:
        """Return the smallest multiplier moving the measure by ``fraction`` of the gap with KL < ``max_kl``.

        None when no multiplier does."""
        ok = [m for m, f, k in zip(self.multipliers, self.fraction_of_gap.tolist(), self.kl.tolist())
              if f >= fraction and k < max_kl]
        return min(ok, key=abs) if ok else None

    def rows(self) -> list[dict]:
        """Return one dict per multiplier: multiplier, measure, shift, fraction of the gap, KL."""
        return [{"multiplier": m, "measure": float(v), "shift": float(v) - self.baseline, "fraction_of_gap": float(f),
                 "kl_nats_per_token": float(k)}
                for m, v, f, k in zip(self.multipliers, self.measure, self.fraction_of_gap, self.kl)]


def steering_curve(model: HookedGPT, vector: SteeringVector, multipliers: Sequence[float],
                   steered: ProbeDataset | Sequence[str], target: Target, reference: ProbeDataset,
                   unrelated: Int[Tensor, "batch pos"], batch_size: int = 32, progress=None) -> SteeringCurve:
    """Return the target measure on ``steered`` texts and the KL on ``unrelated`` windows at each multiplier.

    ``reference`` (both classes, unsteered) gives the class gap the shift is compared with; typically
    ``steered`` holds held-out texts of class 0 and the vector points towards class 1."""
    vector.check(model)
    reference.check(min_per_class=1)
    ref = measure(model, reference, target, batch_size=batch_size)
    y = torch.tensor(reference.labels)
    class_means = (float(ref[y == 0].mean()), float(ref[y == 1].mean()))
    if class_means[0] == class_means[1]:
        raise DataError(f"the two reference classes have the same mean target measure ({class_means[0]:.4g}), so a "
                        "shift cannot be read as a fraction of their gap; give reference texts of each class that the "
                        "target tells apart")
    base = float(measure(model, steered, target, batch_size=batch_size).mean())
    plain = next_token_logprobs(model, unrelated)
    values, kls = [], []
    for i, m in enumerate(multipliers):
        hooks = vector.hooks(m)
        values.append(float(measure(model, steered, target, hooks, batch_size).mean()) if hooks else base)
        kls.append(kl_on_text(model, unrelated, hooks, plain))
        if progress is not None:
            progress(i + 1, len(multipliers))
    return SteeringCurve(list(multipliers), torch.tensor(values), torch.tensor(kls), class_means, base)
