"""Attribution graphs: a prompt's computation traced through transcoder features (Ameisen et al. 2025).

The *local replacement model* of a prompt is the model with every MLP replaced by its transcoder
(plus skip term), the attention patterns and every norm's scale frozen at their values on that
prompt, and an *error* at each (layer, position) holding what the transcoder misses, so that it
reproduces the model's logits exactly. Freezing is done with hooks on the model itself
(``attn.hook_pattern``, ``*.hook_scale``, ``mlp.hook_out``), not with a second model class.

With patterns and scales frozen and the features' nonlinearities cut, every target below is an
affine function of the sources, so each edge is a *direct effect*: the source's value times the
gradient of the target with respect to it.

- nodes, in this order: active features ``(layer, position, index)``, errors ``(layer, position)``,
  tokens (the token's embedding plus its position embedding, per position), and the top logits
  at the last position (cumulative probability 0.95, at most 10);
- ``adjacency[target, source]``: rows are targets (a feature's pre-activation without its encoder
  bias; a logit minus the mean logit), columns sources, one square matrix over all nodes;
- ``constant[target]``: what the biases contribute (the decoder biases, attention and norm biases,
  the encoder bias for features): the target's value when every source is zero.

Nothing is dropped: for every row ``adjacency[row].sum() + constant[row] == target[row]``. The first
position keeps its features and errors too (circuit-tracer zeroes them), so the workbench's rows
sum exactly where circuit-tracer's do not, and the edges both graphs share agree.

Edge rows are computed by backward passes over one forward pass of ``batch_size`` copies of the
prompt: each copy carries one target, so one backward pass gives ``batch_size`` rows.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from workbench import paths
from workbench.allocator import release_freed_memory
from workbench.errors import CheckpointError, ConfigError, InputError
from workbench.model import HookedGPT
from workbench.sae.model import SAE

GRAPH_FORMAT = "workbench-attribution-graph"


@dataclass
class AttributionGraph:
    """An attribution graph over one prompt; see the module docstring for the node order."""

    tokens: Int[Tensor, " pos"]
    """The prompt's token ids."""
    str_tokens: list[str]
    """Each token as text (empty strings when the model has no tokenizer)."""
    features: Int[Tensor, "n_features 3"]
    """Active features as ``(layer, position, index)`` rows, in node order."""
    activations: Float[Tensor, " n_features"]
    """Each feature's activation on the prompt."""
    logit_tokens: Int[Tensor, " n_logits"]
    """Token ids of the logit nodes (most probable first)."""
    logit_probs: Float[Tensor, " n_logits"]
    """Their probabilities at the last position."""
    adjacency: Float[Tensor, "n_nodes n_nodes"]
    """Direct effects: ``adjacency[target, source]``."""
    constant: Float[Tensor, " n_nodes"]
    """Each row's bias contribution (the row's target when every source is zero)."""
    target: Float[Tensor, " n_nodes"]
    """Each row's value on the prompt: a feature's pre-activation, a logit minus the mean logit (0 for
    errors and tokens, which have no inputs)."""
    error_norms: Float[Tensor, "layer pos"]
    """Norm of each error node's vector (what the transcoder misses)."""
    n_layers: int
    logit_texts: list[str] = field(default_factory=list)
    """Each logit node's token as text (empty without a tokenizer)."""
    model_name: str = ""
    settings: dict[str, Any] = field(default_factory=dict)
    """How it was built (batch size, feature budget, thresholds...)."""

    # -- node bookkeeping ---------------------------------------------------------------------

    @property
    def n_pos(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def n_features(self) -> int:
        return int(self.features.shape[0])

    @property
    def n_errors(self) -> int:
        return self.n_layers * self.n_pos

    @property
    def n_logits(self) -> int:
        return int(self.logit_tokens.shape[0])

    @property
    def n_nodes(self) -> int:
        return self.n_features + self.n_errors + self.n_pos + self.n_logits

    def error_node(self, layer: int, pos: int) -> int:
        return self.n_features + layer * self.n_pos + pos

    def token_node(self, pos: int) -> int:
        return self.n_features + self.n_errors + pos

    def logit_node(self, i: int) -> int:
        return self.n_features + self.n_errors + self.n_pos + i

    def feature_node(self, layer: int, pos: int, index: int) -> int:
        """Return the node index of an active feature (an error if it is not in the graph)."""
        hit = ((self.features[:, 0] == layer) & (self.features[:, 1] == pos) & (self.features[:, 2] == index)).nonzero()
        if hit.numel() == 0:
            raise InputError(f"feature {index} at layer {layer}, position {pos} is not an active node of this graph")
        return int(hit[0, 0])

    def node_kind(self, node: int) -> str:
        if node < self.n_features:
            return "feature"
        if node < self.n_features + self.n_errors:
            return "error"
        return "token" if node < self.n_features + self.n_errors + self.n_pos else "logit"

    def node_label(self, node: int) -> str:
        """Return a short human-readable name of a node (e.g. ``F2/17@5``, ``err L1@3``, ``tok 'the'@2``)."""
        kind = self.node_kind(node)
        if kind == "feature":
            layer, pos, index = self.features[node].tolist()
            return f"F{layer}/{index}@{pos}"
        if kind == "error":
            layer, pos = divmod(node - self.n_features, self.n_pos)
            return f"err L{layer}@{pos}"
        if kind == "token":
            pos = node - self.n_features - self.n_errors
            return f"tok {self.str_tokens[pos]!r}@{pos}" if self.str_tokens else f"tok @{pos}"
        i = node - self.logit_node(0)
        name = repr(self.logit_texts[i]) if i < len(self.logit_texts) else f"#{int(self.logit_tokens[i])}"
        return f"logit {name} (p={float(self.logit_probs[i]):.2f})"

    def logit_label(self, i: int) -> str:
        """The text of logit node ``i``'s token (its id when there is no tokenizer)."""
        return self.logit_texts[i] if i < len(self.logit_texts) else str(int(self.logit_tokens[i]))

    def logit_weights(self) -> Float[Tensor, " n_nodes"]:
        """Return the logit nodes' probabilities, normalised to sum to 1, on the full node axis."""
        w = torch.zeros(self.n_nodes)
        w[self.logit_node(0):] = self.logit_probs / self.logit_probs.sum()
        return w

    # -- files --------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        """Write the graph to one safetensors file (tensors + JSON metadata); written under a temporary name.

        The adjacency matrix is stored in the smallest of three exact forms: dense (``adjacency``); its
        nonzero entries as ``adjacency_index`` ``[2 nnz]`` int32 rows and columns plus ``adjacency_values``
        (12 bytes an edge: best under ~1.6% density); or a bitmap of the nonzero entries, ``adjacency_bits``
        (``n_nodes``^2 bits, row-major, NumPy ``packbits`` order) plus their ``adjacency_values`` in row-major
        order (4 bytes an edge and 1/8 byte a cell). A pruned graph keeps a few percent of its cells, so its
        file holds those edges, not ``n_nodes``^2 zeros: a 10-token SmolLM2 graph pruned from a budget of
        7,500 features (2,457 nodes, ~880k edges) takes 4.15 MiB as a bitmap against 10.14 MiB as COO. With the
        SmolLM2 set whose thresholds are calibrated (28,410 active features on that prompt) the same pruning keeps
        3,396 nodes and ~2.7M edges: 11.97 MiB, over the 5 MB wanted, and 205 MiB as circuit-tracer JSON
        (``python -m benchmarks.bench_graph --smollm2 --smollm2-transcoders DIR --max-features 7500``)."""
        path = Path(path)
        tensors = {"tokens": self.tokens, "features": self.features, "activations": self.activations,
                   "logit_tokens": self.logit_tokens, "logit_probs": self.logit_probs,
                   "constant": self.constant, "target": self.target, "error_norms": self.error_norms}
        nnz, cells = int(torch.count_nonzero(self.adjacency)), self.adjacency.numel()
        sizes = {"dense": 4 * cells, "coo": 12 * nnz, "bits": (cells + 7) // 8 + 4 * nnz}
        form = min(sizes, key=sizes.get)
        if form == "coo":  # int32 row and column, f32 value
            nonzero = self.adjacency.nonzero().T
            tensors["adjacency_index"] = nonzero.to(torch.int32)
            tensors["adjacency_values"] = self.adjacency[nonzero[0], nonzero[1]]
            del nonzero
        elif form == "bits":
            mask = self.adjacency != 0
            tensors["adjacency_bits"] = torch.from_numpy(np.packbits(mask.flatten().numpy()))
            tensors["adjacency_values"] = self.adjacency[mask]  # row-major, the bitmap's order
            del mask
        else:
            tensors["adjacency"] = self.adjacency
        meta = {"format": GRAPH_FORMAT, "version": "1", "n_layers": str(self.n_layers), "model_name": self.model_name,
                "str_tokens": json.dumps(self.str_tokens), "logit_texts": json.dumps(self.logit_texts),
                "settings": json.dumps(self.settings)}
        tmp = path.with_name(path.name + ".tmp")
        try:
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=meta)
            os.replace(tmp, path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise CheckpointError(
                f"cannot write the graph to {path}: {exc.strerror or exc}; choose a writable path"
            ) from None
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, model_name: str | None = None) -> AttributionGraph:
        """Read a graph written by :meth:`save`; with ``model_name``, refuse a graph built on another model."""
        path = Path(path)
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            tensors = load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(
                f"cannot read the graph {path} ({exc}); the file is truncated or not a graph"
            ) from None
        if meta.get("format") != GRAPH_FORMAT:
            raise CheckpointError(f"{path} is not an attribution graph written by the workbench")
        if model_name is not None and meta.get("model_name") != model_name:
            raise CheckpointError(f"{path} was built on model {meta.get('model_name')!r}, not {model_name!r}")
        try:
            if "adjacency" not in tensors:  # stored as its nonzero entries
                n = int(tensors["features"].shape[0] + (int(meta["n_layers"]) + 1) * tensors["tokens"].shape[0]
                        + tensors["logit_tokens"].shape[0])
                tensors["adjacency"] = _sparse_adjacency(tensors, n)
            graph = cls(**tensors, str_tokens=json.loads(meta["str_tokens"]), n_layers=int(meta["n_layers"]),
                        logit_texts=json.loads(meta.get("logit_texts", "[]")),
                        model_name=meta.get("model_name", ""), settings=json.loads(meta.get("settings", "{}")))
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path} is an incomplete graph file ({exc}); rebuild it") from None
        if graph.adjacency.shape != (graph.n_nodes, graph.n_nodes):
            shape = tuple(graph.adjacency.shape)
            raise CheckpointError(f"{path}: adjacency {shape} does not fit {graph.n_nodes} nodes")
        return graph


def _sparse_adjacency(tensors: dict[str, Tensor], n: int) -> Tensor:
    """Rebuild the dense ``[n n]`` adjacency from its stored nonzero entries (popped from ``tensors``): a
    bitmap with row-major values, or int32 ``(row, column)`` pairs with values. A ValueError says what does
    not fit."""
    values = tensors.pop("adjacency_values")
    if "adjacency_bits" in tensors:
        bits = tensors.pop("adjacency_bits")
        if bits.dtype != torch.uint8 or bits.ndim != 1 or bits.numel() != (n * n + 7) // 8:
            raise ValueError(f"adjacency_bits {tuple(bits.shape)} {bits.dtype} does not fit {n} nodes")
        mask = torch.from_numpy(np.unpackbits(bits.numpy(), count=n * n).view(np.bool_)).view(n, n)
        if int(mask.sum()) != values.numel():
            raise ValueError(f"adjacency_bits marks {int(mask.sum())} edges but {values.numel()} values are stored")
        A = torch.zeros(n, n, dtype=values.dtype)
        A[mask] = values
        return A
    index = tensors.pop("adjacency_index").long()
    if index.ndim != 2 or index.shape[0] != 2 or index.shape[1] != values.numel() or (
            index.numel() and (int(index.min()) < 0 or int(index.max()) >= n)):
        raise ValueError(f"adjacency_index {tuple(index.shape)} does not fit {n} nodes")
    return torch.zeros(n, n, dtype=values.dtype).index_put_((index[0], index[1]), values)


# ---------------------------------------------------------------------------------------------
# The frozen replacement model


@dataclass
class _Prompt:
    """What one plain pass over the prompt records: the values the replacement model freezes."""

    logits: Float[Tensor, "pos d_vocab"]
    scales: dict[str, Tensor]  # every *.hook_scale
    patterns: dict[str, Tensor]  # every attn.hook_pattern
    mlp_in: list[Tensor]  # [pos d_model] per layer
    mlp_out: list[Tensor]


Transcoders = Sequence[SAE] | Mapping[int, SAE]
"""One transcoder per layer: a list (layer 0 first) or ``{layer: transcoder}`` as ``load_transcoder_set`` gives."""


def check_transcoders(model: HookedGPT, transcoders: Transcoders) -> list[SAE]:
    """Return one MLP transcoder per layer of ``model``, layer 0 first, or raise a clear error."""
    cfg = model.cfg
    if cfg.attn_only:
        raise ConfigError(f"{cfg.name or 'this model'} is attention-only: it has no MLPs to replace with transcoders")
    if isinstance(transcoders, Mapping):
        missing = sorted(set(range(cfg.n_layers)) - set(transcoders))
        if missing:
            raise InputError(f"the transcoder set has no transcoder for layer(s) {missing} of "
                             f"{cfg.name or 'the model'} "
                             f"({cfg.n_layers} layers); an attribution graph needs every layer: train the missing ones "
                             "(workbench train-transcoders)")
        extra = sorted(set(transcoders) - set(range(cfg.n_layers)))
        if extra:
            raise InputError(f"the transcoder set has layer(s) {extra}, but the model has {cfg.n_layers} layers; "
                             "was it trained for another model?")
        transcoders = [transcoders[layer] for layer in range(cfg.n_layers)]
    transcoders = list(transcoders)
    if len(transcoders) != cfg.n_layers:
        raise InputError(f"the model has {cfg.n_layers} layers but {len(transcoders)} transcoders were given; "
                         "train or load one transcoder per layer (workbench train-transcoders)")
    for layer, tc in enumerate(transcoders):
        if not tc.cfg.is_transcoder or tc.cfg.d_in != cfg.d_model or tc.cfg.out_dim != cfg.d_model:
            raise InputError(f"layer {layer}: expected a transcoder d_model={cfg.d_model} -> d_model, got "
                             f"d_in={tc.cfg.d_in}, d_out={tc.cfg.d_out}; was it trained for another model?")
        trained_on = tc.metadata.get("model_name")
        if trained_on and cfg.name and trained_on != cfg.name:
            raise InputError(f"layer {layer}'s transcoder was trained on {trained_on!r}, not {cfg.name!r}; "
                             f"load the set trained for {cfg.name!r}")
    return transcoders


def prompt_tokens(model: HookedGPT, prompt: str | Tensor) -> Int[Tensor, "1 pos"]:
    """Return one prompt's token ids ``[1 pos]``; an empty, batched or too long prompt is an InputError."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise InputError("the prompt is empty; give the text whose next token the graph should explain")
        prompt = model.to_tokens(prompt)
    tokens = model.check_tokens(prompt)
    if tokens.shape[0] != 1:
        raise InputError(f"an attribution graph explains one prompt, got a batch of {tokens.shape[0]}")
    return tokens


def target_token(model: HookedGPT, target: str | int) -> int:
    """Return the token id of ``target`` (an id, or text that must be exactly one token)."""
    if isinstance(target, int):
        if not 0 <= target < model.cfg.d_vocab:
            raise InputError(f"target token id {target} is outside the vocabulary [0, {model.cfg.d_vocab})")
        return target
    ids = model._require_tokenizer().encode(target, add_bos=False)
    if len(ids) != 1:
        pieces = model.to_str_tokens(torch.tensor(ids)) if ids else []
        raise InputError(f"target {target!r} is {len(ids)} tokens {pieces}, not one; an attribution graph explains "
                         "one next token: give its first token (e.g. with or without a leading space)")
    return int(ids[0])


def _record(model: HookedGPT, tokens: Tensor) -> _Prompt:
    wanted = lambda n: n.endswith(("hook_scale", "hook_pattern", "mlp.hook_in", "mlp.hook_out"))  # noqa: E731
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, names_filter=wanted)
    L = model.cfg.n_layers
    return _Prompt(
        logits=logits[0].float(),
        scales={n: t for n, t in cache.items() if n.endswith("hook_scale")},
        patterns={n: t for n, t in cache.items() if n.endswith("hook_pattern")},
        mlp_in=[cache[f"blocks.{i}.mlp.hook_in"][0].float() for i in range(L)],
        mlp_out=[cache[f"blocks.{i}.mlp.hook_out"][0].float() for i in range(L)],
    )


def _frozen_hooks(prompt: _Prompt, batch: int) -> list:
    """Hooks that hold every norm scale and attention pattern at the prompt's values, for ``batch`` copies."""
    def hold(value: Tensor):
        fixed = value.expand(batch, *value.shape[1:])
        return lambda x, hook: fixed.to(x.dtype)
    return [(n, hold(v)) for n, v in {**prompt.scales, **prompt.patterns}.items()]


def _active(acts: Sequence[Tensor]) -> Int[Tensor, "n 3"]:
    """Every nonzero activation as a ``(layer, pos, index)`` row, layer by layer: the feature nodes' order."""
    parts = [torch.cat([torch.full_like(idx[:, :1], layer), idx], dim=1) for layer, idx in
             enumerate(a.nonzero() for a in acts)]
    return torch.cat(parts) if parts else torch.zeros(0, 3, dtype=torch.long)


class _Replacement:
    """One forward pass of the local replacement model on ``batch`` copies of the prompt.

    Sources are small leaf tensors, so one backward pass costs no ``d_sae``-wide gradient: each layer's
    active features' values ``[batch n_active]`` (its decoder output is built from those rows of
    ``W_dec`` only), one coefficient per error node ``[batch layer pos]`` and per token ``[batch pos]``
    (1 on the prompt, multiplying the error vector or the token's embedding). A feature's edge is its
    gradient times its value, an error's or a token's the gradient of its coefficient.
    """

    def __init__(self, model: HookedGPT, transcoders: Sequence[SAE], tokens: Tensor, prompt: _Prompt,
                 acts: list[Tensor], errors: list[Tensor], batch: int, zero_sources: bool = False):
        n_pos, L = tokens.shape[-1], len(transcoders)
        scale = 0.0 if zero_sources else 1.0
        self.batch = batch
        self.active = [a.nonzero() for a in acts]  # per layer: [n_active 2] rows of (pos, index)
        self.values = [a[i[:, 0], i[:, 1]].detach().float() for a, i in zip(acts, self.active)]
        self.acts = [(v * scale).expand(batch, -1).clone().requires_grad_(True) for v in self.values]
        self.error_coef = torch.full((batch, L, n_pos), scale, requires_grad=True)
        self.token_coef = torch.full((batch, n_pos), scale, requires_grad=True)
        self.errors = errors
        with torch.no_grad():
            self.embed = model.embed_tokens(tokens[:1])  # token + position: one source per position
            # each layer's decoder restricted to its active rows, and which position each row writes to
            self._decoders = [(F.one_hot(i[:, 0], n_pos).T.float(), tc.W_dec[i[:, 1]].float())
                              for tc, i in zip(transcoders, self.active)]
        self.mlp_in: list[Tensor | None] = [None] * L
        hooks = _frozen_hooks(prompt, batch)
        for layer, tc in enumerate(transcoders):
            hooks.append((f"blocks.{layer}.mlp.hook_in", self._keep_input(layer)))
            hooks.append((f"blocks.{layer}.mlp.hook_out", self._replace_mlp(layer, tc)))
        with torch.enable_grad(), model.hooks(hooks):
            resid = (self.token_coef[..., None] * self.embed).to(self.embed.dtype)
            normed = model.ln_final(model.run_blocks(resid))
            self.final = normed[:, -1].float()  # [batch d_model]: what the logit targets read
        with torch.no_grad():
            self.logits = model.unembed(normed[:1].detach()).float()  # [1 pos d_vocab], to check exactness
            # A demeaned logit is linear in the final residual: its W_U column minus W_U's mean column. So the
            # logit targets need no [batch d_vocab] logits (12 MB for 64 copies, and as much again in each
            # backward pass), only the few columns of the logit nodes.
            self.W_U = model.W_U.detach()
            self.mean_W_U = self.W_U.float().mean(1)
            b_U = model.unembed.b_U
            self.b_U = None if b_U is None else b_U.detach().float()

    def _keep_input(self, layer: int):
        def keep(x: Tensor, hook) -> None:
            self.mlp_in[layer] = x
        return keep

    def _replace_mlp(self, layer: int, tc: SAE):
        def replace(y: Tensor, hook) -> Tensor:
            at_pos, W_dec = self._decoders[layer]
            decoded = (self.acts[layer][:, None, :] * at_pos) @ W_dec  # [batch pos d_model]
            out = (decoded + tc.b_dec) / tc.norm_scale + self.error_coef[:, layer, :, None] * self.errors[layer]
            skip = tc.skip_out(self.mlp_in[layer])  # b_dec: a constant, never zeroed
            return (out if skip is None else out + skip).to(y.dtype)
        return replace

    def sources(self) -> list[Tensor]:
        return [*self.acts, self.error_coef, self.token_coef]

    def demeaned_logits(self, rows: Int[Tensor, " n"], tokens: Int[Tensor, " n"]) -> Float[Tensor, " n"]:
        """Return logit ``tokens[i]`` minus the mean logit at the last position of batch row ``rows[i]``."""
        direction = self.W_U[:, tokens].float().T - self.mean_W_U  # [n d_model]
        out = (self.final[rows] * direction).sum(-1)
        return out if self.b_U is None else out + (self.b_U[tokens] - self.b_U.mean())


# ---------------------------------------------------------------------------------------------
# Attribution


def attribute(
    model: HookedGPT,
    transcoders: Transcoders,
    prompt: str | Tensor,
    *,
    max_n_logits: int = 10,
    desired_logit_prob: float = 0.95,
    max_feature_nodes: int | None = None,
    batch_size: int = 64,
    target: str | int | None = None,
) -> AttributionGraph:
    """Return the attribution graph of ``prompt`` through ``transcoders`` (one per layer, layer 0 first).

    ``max_feature_nodes`` caps the number of feature nodes: when a prompt has more active features,
    those with the largest influence on the logit nodes are kept (ranked by the logit rows' direct
    effects, then refined through the feature rows computed so far, as circuit-tracer does). The
    dropped features' contributions stay in their targets' ``constant``, so rows still sum exactly.
    ``target`` (one token, as text or id) joins the logit nodes when it is not among the top ones.

    Memory: the adjacency matrix (``n_nodes``^2 floats) is the one large allocation. Backward passes write
    compact row blocks (only the columns of earlier layers' features, errors and tokens: about half); the
    dense matrix is filled from them after the replacement model is freed, each block freed as it is copied.
    The passes' temporaries go back to the system as they go (:func:`workbench.allocator.release_freed_memory`),
    so the peak is the model, the transcoders and the larger of the replacement model's ``batch_size``
    copies and the adjacency. Measured on a 10-token SmolLM2 prompt (``benchmarks/bench_graph.py``):
    with a set of 9,600 active features, ~1,885 MiB (~1,490 before it starts); with the trained
    expansion-4 k-64 set, 20,016 features, a 1,578 MiB adjacency and 2,792 MiB (1,372 before it starts).
    With ``max_feature_nodes`` below the number of active features, the visited rows are held in compact
    per-layer chunks (each cut to the columns its layer can have) and copied into the ``[n_nodes n_nodes]``
    matrix chunk by chunk: the same prompt with a budget of 7,500 peaks at 1,623 MiB in 35.5 s (it was
    4,333 MiB and 61.5 s when the rows were held in full and the ranking summed its series term by term);
    with the calibrated set (28,410 active features, 119 backward passes) 1,737 MiB in 53.8 s.

    Memory: parameters that require gradients make autograd keep each matmul's input for their
    gradient (~270 MB on a SmolLM2 graph). The graph never needs them, but the model may be shared
    (the app's sessions), so this function does not touch its flags: a caller that owns the model and
    transcoders freezes them (``requires_grad_(False)``), as ``workbench graph`` and the benchmark do.
    """
    transcoders = check_transcoders(model, transcoders)
    if not 0 < desired_logit_prob <= 1:
        raise InputError(f"desired_logit_prob={desired_logit_prob} must lie in (0, 1]")
    if max_n_logits < 1 or batch_size < 1:
        raise InputError(f"max_n_logits={max_n_logits} and batch_size={batch_size} must be at least 1")
    if max_feature_nodes is not None and max_feature_nodes < 1:
        raise InputError(f"max_feature_nodes={max_feature_nodes} must be at least 1 (or None for all)")
    tokens = prompt_tokens(model, prompt)
    wanted = None if target is None else target_token(model, target)
    L, n_pos = model.cfg.n_layers, tokens.shape[1]
    rec = _record(model, tokens)

    with torch.no_grad():
        acts = [tc.encode(x) for tc, x in zip(transcoders, rec.mlp_in)]
        errors = [y - tc(x).x_hat for tc, x, y in zip(transcoders, rec.mlp_in, rec.mlp_out)]
    active = _active(acts)
    probs = rec.logits[-1].softmax(-1)
    top = probs.topk(min(max_n_logits, probs.numel()))
    n_logits = min(int((top.values.cumsum(0) < desired_logit_prob).sum()) + 1, top.values.numel())
    logit_tokens, logit_probs = top.indices[:n_logits], top.values[:n_logits]
    if wanted is not None and wanted not in logit_tokens.tolist():  # an asked-for answer joins the logit nodes
        logit_tokens = torch.cat([logit_tokens, torch.tensor([wanted], device=logit_tokens.device)])
        logit_probs = torch.cat([logit_probs, probs[wanted:wanted + 1]])
        n_logits += 1

    # The replacement model, and a copy with every source zeroed: its targets are the constants.
    n_all = active.shape[0]
    n_f = n_all if max_feature_nodes is None else min(max_feature_nodes, n_all)
    rep = _Replacement(model, transcoders, tokens, rec, acts, errors, min(batch_size, n_f + n_logits))  # no idle copies
    gap = float((rep.logits[0] - rec.logits).abs().max())
    if gap > 1e-3 * max(1.0, float(rec.logits.abs().max())):
        raise ConfigError(f"the replacement model misses the model's logits by {gap:.2e}; report this as a bug")
    logit_targets = [("logit", int(t)) for t in logit_tokens]
    zero = _Replacement(model, transcoders, tokens, rec, acts, errors, 1, zero_sources=True)
    with torch.no_grad():  # every candidate row's bias share, read now so that the zeroed copy can go
        biases = _target_values(zero, [("feature", tuple(f)) for f in active.tolist()] + logit_targets, transcoders)
    del zero
    # The forward passes freed ~2x what they keep (a SmolLM2 graph's: ~120 MB in holes of the heap, kept there
    # by retain_freed_memory()); give it back before the adjacency matrix, the one large allocation, is made.
    release_freed_memory()
    n_src = n_f + L * n_pos + n_pos  # sources: kept features, errors, tokens
    n_nodes = n_src + n_logits
    constant = torch.zeros(n_nodes)
    row_idx = torch.cat([torch.arange(n_f), torch.arange(n_src, n_nodes)])
    if n_f < n_all:
        logit_rows = torch.zeros(n_logits, n_all + L * n_pos + n_pos)
        passes = _rows(rep, logit_targets, transcoders, logit_rows)
        chunks, more = _select_by_influence(rep, transcoders, active, logit_rows, logit_probs, n_f)
        passes += more
        keep = torch.cat([c.index for c in chunks]).sort().values
    else:  # every feature: compact row blocks now, the dense matrix once the replacement model is gone
        keep = torch.arange(n_all)
        logit_rows = torch.empty(n_logits, n_src)
        passes = _rows(rep, logit_targets, transcoders, logit_rows)
        blocks, more = _feature_row_blocks(rep, active, transcoders)
        passes += more
    features = active[keep]
    targets = [("feature", tuple(f)) for f in features.tolist()] + logit_targets
    with torch.no_grad():
        target = torch.zeros(n_nodes)
        target[row_idx] = _target_values(rep, targets, transcoders).float()
        constant[row_idx] += biases[torch.cat([keep, torch.arange(n_all, n_all + n_logits)])].float()
        activations = (torch.stack([acts[layer][pos, index] for layer, pos, index in features.tolist()]).float().cpu()
                       if n_f else torch.zeros(0))
        error_norms = torch.stack([e.norm(dim=-1) for e in errors]).float().cpu()
    del rep, rec, acts, errors, targets
    release_freed_memory()  # the replacement's activations and the passes' temporaries, before n_nodes^2 floats
    if n_f == n_all:
        adjacency = _assemble(blocks, logit_rows, n_f, n_nodes)
        del blocks
    else:
        adjacency = _assemble_budget(chunks, logit_rows, keep, n_all, n_nodes, constant)
    del logit_rows
    str_tokens = model.to_str_tokens(tokens[0]) if model.tokenizer is not None else []
    logit_texts = model.to_str_tokens(logit_tokens) if model.tokenizer is not None else []
    return AttributionGraph(
        tokens=tokens[0].cpu(), str_tokens=str_tokens, features=features.cpu(), activations=activations,
        logit_tokens=logit_tokens.cpu(), logit_probs=logit_probs.float().cpu(), adjacency=adjacency,
        constant=constant, target=target, error_norms=error_norms,
        n_layers=L, logit_texts=logit_texts, model_name=model.cfg.name or "",
        settings={"max_n_logits": max_n_logits, "desired_logit_prob": desired_logit_prob,
                  "max_feature_nodes": max_feature_nodes, "batch_size": batch_size, "n_active_features": n_all,
                  "target": wanted, "backward_passes": passes},
    )


def _target_values(rep: _Replacement, targets: Sequence[tuple[str, Any]], transcoders: Sequence[SAE],
                   rows: Sequence[int] | None = None) -> Float[Tensor, " n"]:
    """Return each target's value: a feature's pre-activation ``("feature", (layer, pos, index))`` or a
    demeaned last-position logit ``("logit", token)``; target ``i`` is read in batch row ``rows[i]``
    (row 0 for every target by default). Vectorised per layer: one call serves a whole batch."""
    rows_t = torch.zeros(len(targets), dtype=torch.long) if rows is None else torch.as_tensor(list(rows))
    kinds = [kind for kind, _ in targets]
    parts, order = [], []
    feats = [i for i, k in enumerate(kinds) if k == "feature"]
    if feats:
        keys = torch.tensor([targets[i][1] for i in feats])  # [m 3]
        for layer in keys[:, 0].unique().tolist():
            sel = (keys[:, 0] == layer).nonzero().flatten()
            tc, pos, index = transcoders[layer], keys[sel, 1], keys[sel, 2]
            x = tc.centered_input(rep.mlp_in[layer][rows_t[[feats[i] for i in sel.tolist()]], pos])
            parts.append((x * tc.W_enc.detach()[:, index].T).sum(-1) + tc.b_enc.detach()[index])
            order += [feats[i] for i in sel.tolist()]
    logits = [i for i, k in enumerate(kinds) if k == "logit"]
    if logits:
        parts.append(rep.demeaned_logits(rows_t[logits], torch.tensor([targets[i][1] for i in logits])))
        order += logits
    if not parts:
        return torch.zeros(0)
    return torch.cat(parts)[torch.tensor(order).argsort()]


def _target_value(rep: _Replacement, kind: str, key, transcoders: Sequence[SAE], row: int) -> Tensor:
    """A feature's pre-activation ``(layer, pos, index)`` or a demeaned last-position logit, in one batch row."""
    return _target_values(rep, [(kind, key)], transcoders, [row])[0]


#: backward passes between two :func:`release_freed_memory` calls. Each pass of a SmolLM2 graph frees ~50 MB
#: of small temporaries; kept, their holes in the heap grow by ~1 MB a pass, so the peak would rise with the
#: number of passes. Released after every pass, the pages fault in again: a kjv-small graph took ~50% longer
#: (a loaded machine: 0.87 s against 0.57 s); every 8 passes, ~10% (0.56 s against 0.50 s), and a SmolLM2
#: graph's peak is 14 MiB above the every-pass figure.
_RELEASE_EVERY = 8


def _rows(rep: _Replacement, targets: list, transcoders: Sequence[SAE], out: Float[Tensor, "n src"],
          n_feature_cols: int | None = None) -> int:
    """Write the direct effects on each target into the rows of ``out`` (columns: every active feature,
    errors, tokens) and return the number of backward passes.

    ``n_feature_cols`` (a layer boundary) keeps only the first features' columns, those of the layers
    before every target's own: later features cannot reach them, so their columns would be zeros.

    Each backward pass handles as many targets as the replacement has copies of the prompt: copy
    ``b`` carries target ``b``, and the copies do not interact."""
    B, L = rep.batch, len(rep.acts)
    if n_feature_cols is None:
        n_feature_cols = sum(v.numel() for v in rep.values)
    passes = 0
    for start in range(0, len(targets), B):
        chunk = targets[start: start + B]
        n = len(chunk)
        total = _target_values(rep, chunk, transcoders, range(n)).sum()
        grads = torch.autograd.grad(total, rep.sources(), retain_graph=True, allow_unused=True, materialize_grads=True)
        block, col = out[start: start + n], 0
        for g, value in zip(grads[:L], rep.values):
            if col + value.numel() > n_feature_cols:
                break
            block[:, col: col + value.numel()] = g[:n] * value
            col += value.numel()
        errors = grads[L][:n].flatten(1)  # [n layer*pos]: error node (layer, pos) is column layer * pos + pos
        block[:, col: col + errors.shape[1]] = errors
        block[:, col + errors.shape[1]:] = grads[L + 1][:n]
        del grads, total
        passes += 1
        if passes % _RELEASE_EVERY == 0:
            release_freed_memory()
    return passes


def _layer_starts(active: Tensor, n_layers: int) -> Int[Tensor, " n_layers_plus_1"]:
    """Where each layer's features begin among the active ``(layer, pos, index)`` rows (ordered by layer),
    and their count last: features of layer ``l`` are rows ``starts[l]:starts[l + 1]``."""
    return torch.searchsorted(active[:, 0].contiguous(), torch.arange(n_layers + 1))


def _feature_row_blocks(rep: _Replacement, active: Tensor, transcoders: Sequence[SAE]
                        ) -> tuple[list[tuple[int, int, Tensor]], int]:
    """Return every active feature's row, one backward pass at a time, as ``(first row, n_feature_cols, block)``
    blocks, and the number of passes. A block keeps the columns of the features of earlier layers than its
    last row's (a prefix of the feature columns: nodes are ordered by layer), then the errors and tokens:
    about half of the dense rows, the rest being edges no feature can have."""
    n_all, B = active.shape[0], rep.batch
    layer_start = _layer_starts(active, len(rep.acts))
    n_other = rep.error_coef[0].numel() + rep.token_coef.shape[1]
    blocks, passes = [], 0
    for start in range(0, n_all, B):
        stop = min(start + B, n_all)
        width = int(layer_start[int(active[stop - 1, 0])])
        block = torch.empty(stop - start, width + n_other)
        passes += _rows(rep, [("feature", tuple(f)) for f in active[start:stop].tolist()], transcoders, block, width)
        blocks.append((start, width, block))
        if len(blocks) % _RELEASE_EVERY == 0:
            release_freed_memory()
    return blocks, passes


def _assemble(blocks: list[tuple[int, int, Tensor]], logit_rows: Tensor, n_features: int, n_nodes: int
              ) -> Float[Tensor, "n_nodes n_nodes"]:
    """Return the dense adjacency matrix from the compact feature row blocks (emptying ``blocks``) and the logit rows.

    The matrix is allocated empty and each block's rows are written, zeros included, as that block is
    freed: its pages become resident as the blocks' go back, so the two never coexist whole."""
    n_src = n_nodes - logit_rows.shape[0]
    A = torch.empty(n_nodes, n_nodes)
    A[n_features:n_src].zero_()  # errors and tokens: sources only
    blocks.reverse()
    freed = 0
    while blocks:
        start, width, block = blocks.pop()
        rows = A[start: start + block.shape[0]]
        rows[:, :width] = block[:, :width]
        rows[:, width:n_features].zero_()
        rows[:, n_features:n_src] = block[:, width:]
        rows[:, n_src:].zero_()
        freed += block.numel() * block.element_size()
        del block, rows
        if freed >= 4 << 20:  # the freed blocks' pages leave as the matrix's come in (at most 4 MiB behind)
            release_freed_memory()
            freed = 0
    A[n_src:, :n_src] = logit_rows
    A[n_src:, n_src:].zero_()
    return A


def _assemble_budget(chunks: list[_RowChunk], logit_rows: Tensor, keep: Tensor, n_all: int, n_nodes: int,
                     constant: Tensor) -> Float[Tensor, "n_nodes n_nodes"]:
    """Return the dense adjacency matrix of the features ``keep`` (sorted) from the budget's row chunks
    (emptying ``chunks``) and the logit rows (every active feature's column). What the features left out
    by the budget send to a row is added to its ``constant``, so every row still sums to its target.

    As in :func:`_assemble`, the matrix's pages come in as the chunks' go back."""
    n_f, n_logits = keep.numel(), logit_rows.shape[0]
    n_src = n_nodes - n_logits
    dropped = torch.ones(n_all, dtype=torch.bool)
    dropped[keep] = False
    A = torch.zeros(n_nodes, n_nodes)  # calloc'd: untouched pages cost nothing
    at = slice(n_src, n_nodes)
    A[at, :n_f] = logit_rows[:, keep]
    A[at, n_f:n_src] = logit_rows[:, n_all:]
    constant[at] += logit_rows[:, :n_all][:, dropped].sum(-1)
    chunks.reverse()
    freed = 0
    while chunks:
        chunk = chunks.pop()
        rows = torch.searchsorted(keep, chunk.index)  # where the chunk's features sit among the kept
        cols = keep[: int(torch.searchsorted(keep, torch.tensor(chunk.width)))]  # kept features this layer can hear
        A[rows, : cols.numel()] = chunk.rows[:, cols]
        A[rows, n_f:n_src] = chunk.rows[:, chunk.width:]
        constant[rows] += chunk.rows[:, : chunk.width][:, dropped[: chunk.width]].sum(-1)
        freed += chunk.rows.numel() * chunk.rows.element_size()
        del chunk
        if freed >= 4 << 20:
            release_freed_memory()
            freed = 0
    return A


class _RowChunk(NamedTuple):
    """Some visited features' rows, compact: the feature columns before the first feature of their layer
    (``width``; later features cannot reach them), then every error and token column."""

    index: Tensor  # [m] the rows' features, as indices into the active features
    layer: int
    width: int
    rows: Tensor  # [m width + n_errors + n_tokens]
    norm: Tensor  # [m] each row's total absolute input, for its shares


def _select_by_influence(rep: _Replacement, transcoders: Sequence[SAE], active: Tensor, logit_rows: Tensor,
                         logit_probs: Tensor, budget: int) -> tuple[list[_RowChunk], int]:
    """Return the ``budget`` most influential active features' rows, as compact chunks, and the number of
    backward passes, found batch by batch.

    Influence on the logits is first estimated from the logit rows' direct effects; after each batch of
    feature rows it is recomputed through the rows known so far, and the next batch is the most
    influential of the features not yet visited (circuit-tracer's order). Only the visited features'
    rows are held, each cut to the columns its layer can have (on average about half of a dense row)."""
    n_all, B = active.shape[0], rep.batch
    layer_start = _layer_starts(active, len(rep.acts))
    n_other = logit_rows.shape[1] - n_all
    buffer = torch.empty(B, logit_rows.shape[1])  # one batch's full rows, before they are cut per layer
    visited = torch.zeros(n_all, dtype=torch.bool)
    chunks: list[_RowChunk] = []
    weights = (logit_probs / logit_probs.sum()).float()
    direct = weights @ _row_shares(logit_rows)[:, :n_all]
    passes, n_visited = 0, 0
    while n_visited < budget:
        influence = _feature_influence(chunks, direct)
        influence[visited] = -1.0
        take = influence.topk(min(B, budget - n_visited)).indices.sort().values  # by layer: one chunk per layer
        layers = active[take, 0]
        width = int(layer_start[int(layers[-1])])
        rows = buffer[: take.numel(), : width + n_other]
        passes += _rows(rep, [("feature", tuple(f)) for f in active[take].tolist()], transcoders, rows, width)
        for layer in layers.unique().tolist():
            sel = (layers == layer).nonzero().flatten()
            w = int(layer_start[layer])
            part = torch.cat([rows[sel, :w], rows[sel, width: width + n_other]], dim=1)
            chunks.append(_RowChunk(take[sel], layer, w, part, part.abs().sum(-1).clamp_min(1e-12)))
        visited[take] = True
        n_visited += take.numel()
    return chunks, passes


def _row_shares(rows: Tensor) -> Tensor:
    """``|rows|`` divided by each row's total absolute input."""
    return rows.abs() / rows.abs().sum(-1, keepdim=True).clamp_min(1e-12)


def _feature_influence(chunks: Sequence[_RowChunk], direct: Tensor) -> Tensor:
    """Return each feature's total influence on the weighted logits: ``direct`` (through the logit rows)
    plus the paths through the feature rows known so far.

    A feature hears only features of earlier layers, so one sweep from the last layer down is exact:
    when a layer's rows are reached, every path into its features has been summed. That is the series
    ``direct (I + M + M^2 + ...)`` at the cost of its first term, chunk by chunk (no temporary as large
    as the rows)."""
    total = direct.clone()
    for chunk in sorted(chunks, key=lambda c: -c.layer):
        if chunk.width:
            total[: chunk.width].addmv_(chunk.rows[:, : chunk.width].abs().T, total[chunk.index] / chunk.norm)
    return total


# ---------------------------------------------------------------------------------------------
# Interventions


@dataclass(frozen=True)
class FeatureEdit:
    """Set feature ``index`` of layer ``layer``'s transcoder to ``value`` at position ``pos``
    (``scale=True``: multiply its activation by ``value``; ``value=0`` zeroes it either way)."""

    layer: int
    pos: int
    index: int
    value: float
    scale: bool = False

    def new_value(self, activation: Tensor) -> Tensor:
        """The feature's value after the edit, given its activation before."""
        return activation * self.value if self.scale else torch.full_like(activation, self.value)


def _check_edits(model: HookedGPT, transcoders: Sequence[SAE], n_pos: int, edits: Sequence[FeatureEdit]) -> None:
    for e in edits:
        if not 0 <= e.layer < model.cfg.n_layers or not 0 <= e.pos < n_pos:
            raise InputError(f"{e}: layer must lie in [0, {model.cfg.n_layers}) and pos in [0, {n_pos})")
        if not 0 <= e.index < transcoders[e.layer].cfg.d_sae:
            raise InputError(f"{e}: index must lie in [0, {transcoders[e.layer].cfg.d_sae})")
        if not math.isfinite(e.value):
            raise InputError(f"{e}: the value must be a finite number")


def intervene(model: HookedGPT, transcoders: Transcoders, prompt: str | Tensor, edits: Sequence[FeatureEdit],
              ) -> Float[Tensor, "pos d_vocab"]:
    """Return the real model's logits with the edited features' decoder differences added to the MLP outputs.

    At each edited (layer, position) the feature's activation on this run (its transcoder applied to
    ``mlp.hook_in``) is moved to the new value by adding ``(value - activation) * W_dec[index]`` to
    ``mlp.hook_out``; everything downstream, attention included, is recomputed by the real model."""
    transcoders = check_transcoders(model, transcoders)
    tokens = prompt_tokens(model, prompt)
    _check_edits(model, transcoders, tokens.shape[-1], edits)
    seen: dict[int, Tensor] = {}
    by_layer: dict[int, list[FeatureEdit]] = {}
    for e in edits:
        by_layer.setdefault(e.layer, []).append(e)

    def read(layer: int):
        def hook(x: Tensor, hook) -> None:
            seen[layer] = x
        return hook

    def add(layer: int):
        tc = transcoders[layer]

        def hook(y: Tensor, hook) -> Tensor:
            acts = tc.encode(seen[layer])
            y = y.clone()
            for e in by_layer[layer]:
                a = acts[:, e.pos, e.index]
                y[:, e.pos] += ((e.new_value(a) - a)[:, None] * tc.W_dec[e.index]).to(y.dtype)
            return y
        return hook

    hooks = [h for layer in by_layer for h in ((f"blocks.{layer}.mlp.hook_in", read(layer)),
                                                 (f"blocks.{layer}.mlp.hook_out", add(layer)))]
    with torch.no_grad():
        return model.run_with_hooks(tokens[:1], fwd_hooks=hooks)[0].float()


def ablation_effects(model: HookedGPT, transcoders: Transcoders, graph: AttributionGraph, nodes: Sequence[int],
                     logit: int = 0, batch_size: int = 64) -> Float[Tensor, " n"]:
    """Return, for each feature node, how much zeroing it alone in the real model moves logit node ``logit``
    (demeaned, last position): ablated minus clean. Each ablation is one row of a batch, done as in
    :func:`intervene` (the feature's decoder row times its activation taken off ``mlp.hook_out``)."""
    transcoders = check_transcoders(model, transcoders)
    if any(graph.node_kind(n) != "feature" for n in nodes):
        raise InputError("ablation_effects takes feature nodes only")
    tokens = graph.tokens[None].to(model.embed.W_E.device)
    token = int(graph.logit_tokens[logit])

    def demeaned(logits: Tensor) -> Tensor:
        last = logits[:, -1].float()
        return last[:, token] - last.mean(-1)

    with torch.no_grad():
        base = demeaned(model(tokens))[0]
    out = []
    for start in range(0, len(nodes), batch_size):
        chunk = graph.features[list(nodes[start: start + batch_size])]  # [n 3]
        rows = torch.arange(chunk.shape[0])
        seen: dict[int, Tensor] = {}
        hooks = []
        for layer in chunk[:, 0].unique().tolist():
            sel = chunk[:, 0] == layer
            b, p, f = rows[sel], chunk[sel, 1], chunk[sel, 2]

            def read(x: Tensor, hook, layer=layer) -> None:
                seen[layer] = x

            def remove(y: Tensor, hook, layer=layer, b=b, p=p, f=f) -> Tensor:
                tc = transcoders[layer]
                a = tc.encode(seen[layer][b, p].float())[torch.arange(b.numel()), f]
                return y.index_put((b, p), -(a[:, None] * tc.W_dec[f]).to(y.dtype), accumulate=True)

            hooks += [(f"blocks.{layer}.mlp.hook_in", read), (f"blocks.{layer}.mlp.hook_out", remove)]
        with torch.no_grad():
            out.append(demeaned(model.run_with_hooks(tokens.expand(chunk.shape[0], -1), fwd_hooks=hooks)) - base)
    return torch.cat(out) if out else torch.zeros(0)


def predicted_logit_change(graph: AttributionGraph, edits: Sequence[FeatureEdit]) -> Float[Tensor, " n_logits"]:
    """Return what the graph predicts an edit does to each logit node (demeaned): the edited features'
    direct effects, scaled by how far each feature moves (exact in the frozen replacement with the
    other features held, ``intervene_replacement(..., propagate=False)``). Features the graph does not
    hold (inactive, or left out by the budget) are an InputError."""
    change = torch.zeros(graph.n_logits)
    for e in edits:
        node = graph.feature_node(e.layer, e.pos, e.index)
        act = graph.activations[node]
        change += graph.adjacency[graph.logit_node(0):, node] * (e.new_value(act) - act) / act
    return change


def intervene_replacement(model: HookedGPT, transcoders: Transcoders, prompt: str | Tensor,
                          edits: Sequence[FeatureEdit], *, propagate: bool = True) -> Float[Tensor, "pos d_vocab"]:
    """Return the local replacement model's logits with features set to new values.

    Attention patterns and norm scales stay frozen at the prompt's values and the error nodes keep
    their values. ``propagate=True`` recomputes every later feature through its transcoder (the
    circuit-tracer semantics of an intervention); ``propagate=False`` holds every other feature at its
    recorded activation, the linear model whose direct effects are the graph's edges."""
    transcoders = check_transcoders(model, transcoders)
    tokens = prompt_tokens(model, prompt)
    _check_edits(model, transcoders, tokens.shape[-1], edits)
    rec = _record(model, tokens)
    with torch.no_grad():
        acts = [tc.encode(x) for tc, x in zip(transcoders, rec.mlp_in)]
        errors = [y - tc(x).x_hat for tc, x, y in zip(transcoders, rec.mlp_in, rec.mlp_out)]
        mlp_in: dict[int, Tensor] = {}
        hooks = _frozen_hooks(rec, 1)

        def keep(layer: int):
            def hook(x: Tensor, hook) -> None:
                mlp_in[layer] = x[0].float()
            return hook

        def replace(layer: int):
            tc = transcoders[layer]

            def hook(y: Tensor, hook) -> Tensor:
                a = tc.encode(mlp_in[layer]) if propagate else acts[layer].clone()
                for e in edits:
                    if e.layer == layer:
                        a[e.pos, e.index] = e.new_value(a[e.pos, e.index])
                out = a @ tc.W_dec + tc.b_dec + errors[layer]
                skip = tc.skip_out(mlp_in[layer])
                return (out if skip is None else out + skip).unsqueeze(0).to(y.dtype)
            return hook

        for layer in range(model.cfg.n_layers):
            hooks += [(f"blocks.{layer}.mlp.hook_in", keep(layer)), (f"blocks.{layer}.mlp.hook_out", replace(layer))]
        return model.run_with_hooks(tokens, fwd_hooks=hooks)[0].float()


# ---------------------------------------------------------------------------------------------
# Influence, pruning and scores
#
# As in circuit-tracer: edges are normalised by each row's total absolute input, and a node's
# influence is the logit-probability-weighted sum over all paths from it to the logits
# (w A + w A^2 + ..., a finite series because the graph is layered). The bias constants are not
# edges, so they take no part: on the same adjacency matrix the masks equal circuit-tracer's.


def _normalized(adjacency: Tensor, by: Tensor | None = None) -> Tensor:
    """``|A|`` divided by each row's total absolute input (of ``by``, default ``A`` itself)."""
    total = (adjacency if by is None else by).abs().sum(-1, keepdim=True).clamp_min(1e-10)
    return adjacency.abs().div_(total)  # one [n n] temporary, not two


def _influence(A: Tensor, weights: Tensor) -> Tensor:
    """Return ``w A + w A^2 + ...``: each node's total influence on the weighted targets."""
    step = weights @ A
    total = step.clone()
    for _ in range(A.shape[0] + 1):
        step = step @ A
        if not bool(step.any()):
            return total
        total += step
    raise ConfigError("influence did not converge: the adjacency matrix has a cycle, so it is not an attribution graph")


def _cutoff(scores: Tensor, fraction: float) -> Tensor:
    """The smallest score among the top scores that hold ``fraction`` of the total.

    Only the positive scores are sorted (zeros add nothing to the running share), in place in NumPy:
    ``torch.sort`` of a SmolLM2 graph's 98M edge scores would allocate 1.2 GB of values and indices."""
    flat = scores.flatten()
    positive = flat[flat > 0]
    if positive.numel() == 0:
        return torch.zeros((), dtype=scores.dtype)
    # descending, in place: negation is exact, so this is the ascending sort reversed, without a flipped copy
    ranked = positive.neg_()
    ranked.numpy().sort()
    ranked.neg_()
    del positive
    share = ranked.cumsum(0).div_(ranked.sum().clamp_min(1e-30))
    at = int(torch.searchsorted(share, torch.tensor(fraction)))
    if at >= ranked.numel():  # the share never reaches the fraction: every score counts, zeros included
        return ranked[-1].clone() if ranked.numel() == flat.numel() else torch.zeros((), dtype=scores.dtype)
    return ranked[at].clone()  # not a view that would hold every sorted score


@dataclass
class Pruned:
    """What pruning keeps."""

    node_mask: Tensor
    """Nodes kept (tokens and logits always are)."""
    edge_mask: Tensor
    """Edges kept, ``[target, source]``."""
    influence: Tensor
    """Each node's influence on the logits in the full graph."""
    cumulative: Tensor
    """Each node's cumulative influence share when nodes are ranked by influence
    (circuit-tracer's ``influence`` field)."""


def prune(graph: AttributionGraph, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> Pruned:
    """Return the nodes and edges that carry ``node_threshold`` / ``edge_threshold`` of the influence on the logits."""
    for name, value in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0 < value <= 1:
            raise InputError(f"{name}={value} must lie in (0, 1]")
    A, w = graph.adjacency, graph.logit_weights() * graph.logit_probs.sum()  # circuit-tracer weighs by raw probability
    n_fe = graph.n_features + graph.n_errors
    release_freed_memory()  # [n n] buffers follow: give back what earlier steps left in the heap first
    influence = _influence(_normalized(A), w)
    nodes = influence >= _cutoff(influence, node_threshold)
    nodes[n_fe:] = True
    # the kept nodes' normalised edges and their scores, built in one [n n] buffer (a SmolLM2 graph's is 394 MB)
    scores = A.abs()
    scores *= nodes[:, None]
    scores *= nodes[None, :]
    scores /= scores.sum(-1, keepdim=True).clamp_min(1e-10)
    scores *= (_influence(scores, w) + w)[:, None]
    edges = scores >= _cutoff(scores, edge_threshold)
    del scores
    while True:  # drop features and errors left without outputs, and features left without inputs
        before = nodes.clone()
        edges &= nodes[:, None]  # two in-place steps: no [n n] temporary
        edges &= nodes[None, :]
        nodes[:n_fe] &= edges[:, :n_fe].any(0)
        nodes[: graph.n_features] &= edges[: graph.n_features].any(1)
        if torch.equal(nodes, before):
            break
    order = influence.sort(descending=True)
    cumulative = torch.zeros_like(influence)
    cumulative[order.indices] = order.values.cumsum(0) / order.values.sum().clamp_min(1e-30)
    return Pruned(node_mask=nodes, edge_mask=edges, influence=influence, cumulative=cumulative)


def subgraph(graph: AttributionGraph, pruned: Pruned) -> AttributionGraph:
    """Return the pruned graph as a graph of its own: the kept features (every error, token and logit node
    stays, so node bookkeeping holds) and only the kept edges. What the dropped edges and features sent
    to a row moves into its ``constant``, so every row still sums to its target; a pruned SmolLM2 graph
    saves to a few MB instead of hundreds."""
    keep = torch.cat([pruned.node_mask[: graph.n_features].nonzero().flatten(),
                      torch.arange(graph.n_features, graph.n_nodes)])
    rows = graph.adjacency[keep]  # [kept nodes, n]: no [n n] temporary
    kept_edges = rows[:, keep] * pruned.edge_mask[keep][:, keep]
    constant = graph.constant[keep] + rows.sum(-1) - kept_edges.sum(-1)
    del rows
    n_f = int(pruned.node_mask[: graph.n_features].sum())
    return AttributionGraph(
        tokens=graph.tokens, str_tokens=graph.str_tokens, features=graph.features[keep[:n_f]],
        activations=graph.activations[keep[:n_f]], logit_tokens=graph.logit_tokens, logit_probs=graph.logit_probs,
        adjacency=kept_edges.contiguous(), constant=constant, target=graph.target[keep], error_norms=graph.error_norms,
        n_layers=graph.n_layers, logit_texts=graph.logit_texts, model_name=graph.model_name,
        settings={**graph.settings, "pruned_from_nodes": graph.n_nodes})


class GraphScores(NamedTuple):
    """How much of the model's computation a graph explains with features rather than errors."""

    replacement: float
    """Of the tokens' and errors' end-to-end influence on the logits, the tokens' share (errors, and
    pruned edges, explain nothing)."""
    completeness: float
    """Influence-weighted mean, over nodes, of the fraction of each node's input coming from kept
    feature and token edges rather than from errors or pruned edges."""


def graph_scores(graph: AttributionGraph, pruned: Pruned | None = None) -> GraphScores:
    """Return the replacement and completeness scores (Ameisen et al. 2025) of a graph, or of its pruned form.

    For the full graph these are circuit-tracer's definitions. For a pruned graph, each row is still
    normalised by its total input in the full graph, so the edges pruning removes count as
    unexplained, like an error node's, instead of being renormalised away."""
    A = graph.adjacency
    w = graph.logit_weights() * graph.logit_probs.sum()
    release_freed_memory()  # as in prune
    raw_total = A.abs().sum(-1)  # each row's total absolute input, once: its [n n] temporary goes before An's
    total = raw_total.clamp_min(1e-10)[:, None]
    An = A.abs()  # the kept edges' shares of each row's full input: one [n n] buffer
    if pruned is not None:
        An.masked_fill_(~pruned.edge_mask, 0)  # not *= a bool mask: that casts it to an [n n] float temporary
    An /= total
    influence = _influence(An, w)
    errors = slice(graph.n_features, graph.n_features + graph.n_errors)
    tokens = slice(graph.n_features + graph.n_errors, graph.n_features + graph.n_errors + graph.n_pos)
    token_inf = influence[tokens].sum()
    # influence that reaches errors or falls on pruned edges: what the graph leaves unexplained
    unexplained = influence[errors].sum()
    if pruned is not None:
        lost = (raw_total / total[:, 0]) - An.sum(-1)  # per row, the normalised input pruning removed
        lost[errors] = 0
        unexplained = unexplained + ((influence + w) * lost).sum()
    replacement = float(token_inf / (token_inf + unexplained).clamp_min(1e-30))
    explained = 1 - An[:, errors].sum(-1) - (0 if pruned is None else lost)
    out = influence + w  # as circuit-tracer: tokens and errors (no inputs) count as fully explained
    completeness = float((explained * out).sum() / out.sum().clamp_min(1e-30))
    return GraphScores(replacement=replacement, completeness=completeness)


# ---------------------------------------------------------------------------------------------
# circuit-tracer's graph JSON (what Neuronpedia-style viewers read)


def _cantor(x: int, y: int) -> int:
    return (x + y) * (x + y + 1) // 2 + y


def to_circuit_tracer_json(graph: AttributionGraph, pruned: Pruned | None = None, slug: str = "workbench-graph",
                           node_threshold: float = 0.8) -> dict[str, Any]:
    """Return the graph as circuit-tracer's frontend JSON (``metadata``, ``qParams``, ``nodes``, ``links``).

    Node ids follow circuit-tracer: features ``{layer}_{index}_{pos}``, errors ``0_{layer}_{pos}``
    (``err_{layer}_{pos}`` where that would repeat a layer-0 feature's id), tokens ``E_{token}_{pos}``,
    logits ``{n_layers + 1}_{token}_{last pos}``. Only kept nodes and edges
    are written when ``pruned`` is given; every node of the graph otherwise."""
    nodes_mask = torch.ones(graph.n_nodes, dtype=torch.bool) if pruned is None else pruned.node_mask
    edge_mask = (graph.adjacency != 0) if pruned is None else pruned.edge_mask
    cumulative = (pruned or prune(graph, node_threshold, 1.0)).cumulative
    nodes: dict[int, dict[str, Any]] = {}
    last = graph.n_pos - 1
    for node in nodes_mask.nonzero().flatten().tolist():
        kind, inf = graph.node_kind(node), float(cumulative[node])
        if kind == "feature":
            layer, pos, index = graph.features[node].tolist()
            nodes[node] = dict(node_id=f"{layer}_{index}_{pos}", feature=_cantor(layer, index), layer=str(layer),
                               ctx_idx=pos, feature_type="cross layer transcoder", jsNodeId=f"{layer}_{index}-0",
                               influence=inf, activation=float(graph.activations[node]))
        elif kind == "error":
            layer, pos = divmod(node - graph.n_features, graph.n_pos)
            # circuit-tracer's error id can equal a layer-0 feature's ({0}_{index}_{pos} with index == layer);
            # such an error gets an id of its own (viewers tell errors by feature_type, not by id)
            taken = (graph.features[:, 0] == 0) & (graph.features[:, 2] == layer) & (graph.features[:, 1] == pos)
            error_id = f"err_{layer}_{pos}" if bool(taken.any()) else f"0_{layer}_{pos}"
            nodes[node] = dict(node_id=error_id, feature=-1, layer=str(layer), ctx_idx=pos,
                               feature_type="mlp reconstruction error", jsNodeId=f"{layer}_{pos}-0", influence=inf)
        elif kind == "token":
            pos = node - graph.token_node(0)
            tok = int(graph.tokens[pos])
            nodes[node] = dict(node_id=f"E_{tok}_{pos}", feature=pos, layer="E", ctx_idx=pos, feature_type="embedding",
                               jsNodeId=f"E_{tok}-{pos}", influence=inf)
        else:
            i = node - graph.logit_node(0)
            tok, p = int(graph.logit_tokens[i]), float(graph.logit_probs[i])
            layer = str(graph.n_layers + 1)
            nodes[node] = dict(node_id=f"{layer}_{tok}_{last}", feature=tok, layer=layer, ctx_idx=last,
                               feature_type="logit", token_prob=p, is_target_logit=i == 0, jsNodeId=f"L_{tok}-{last}",
                               clerp=f"Output {graph.logit_label(i)!r} (p={p:.3f})")
    targets, sources = edge_mask.nonzero(as_tuple=True)
    links = [{"source": nodes[s]["node_id"], "target": nodes[t]["node_id"], "weight": float(graph.adjacency[t, s])}
             for t, s in zip(targets.tolist(), sources.tolist()) if s in nodes and t in nodes]
    linked = {x for link in links for x in (link["source"], link["target"])}
    used = [n for n in nodes.values() if n["node_id"] in linked or n["feature_type"] in ("embedding", "logit")]
    meta = {"slug": slug, "scan": graph.model_name or "workbench", "transcoder_list": [],
            "prompt_tokens": graph.str_tokens, "prompt": "".join(graph.str_tokens), "node_threshold": node_threshold,
            "schema_version": 1, "info": {"generator": "interp-workbench", "settings": graph.settings}}
    qparams = {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}
    return {"metadata": meta, "qParams": qparams, "nodes": used, "links": links}


# ---------------------------------------------------------------------------------------------
# Reading a graph: influence on one logit, the strongest paths, a transcoder set by name


def logit_influence(graph: AttributionGraph, logit: int = 0) -> Float[Tensor, " n_nodes"]:
    """Return every node's influence on logit node ``logit`` alone (0: the most probable): the sum over
    all paths to it of the products of the edges' shares of each target's total absolute input."""
    if not 0 <= logit < graph.n_logits:
        raise InputError(f"logit node {logit} does not exist; the graph has {graph.n_logits} logit nodes")
    w = torch.zeros(graph.n_nodes)
    w[graph.logit_node(logit)] = 1.0
    return _influence(_normalized(graph.adjacency), w)


class GraphPath(NamedTuple):
    """A path from a source (token or error) to a logit node."""

    nodes: list[int]
    """Node indices, source first."""
    strength: float
    """The product of each edge's signed share of its target's total absolute input."""


def top_paths(graph: AttributionGraph, pruned: Pruned | None = None, logit: int = 0, k: int = 10) -> list[GraphPath]:
    """Return the ``k`` strongest paths (by |strength|) from a token or error node to logit node ``logit``,
    over the edges ``pruned`` keeps (all edges without it)."""
    A = graph.adjacency if pruned is None else graph.adjacency.masked_fill(~pruned.edge_mask, 0)
    share = A / graph.adjacency.abs().sum(-1, keepdim=True).clamp_min(1e-10)
    end = graph.logit_node(logit)
    best: dict[int, list[tuple[float, list[int]]]] = {end: [(1.0, [end])]}
    # targets in reverse topological order: the logit, then features from the last layer to the first
    layers = graph.features[:, 0]
    order = [end] + [int(n) for n in torch.argsort(layers, descending=True, stable=True)]
    for t in order:
        paths = best.get(t)
        if not paths:
            continue
        row = share[t]
        for s in row.nonzero().flatten().tolist():
            w = float(row[s])
            merged = best.setdefault(s, []) + [(w * strength, [s, *nodes]) for strength, nodes in paths]
            best[s] = sorted(merged, key=lambda p: -abs(p[0]))[:k]
    sources = range(graph.n_features, graph.logit_node(0))
    found = [p for s in sources for p in best.get(s, [])]
    return [GraphPath(nodes, strength) for strength, nodes in sorted(found, key=lambda p: -abs(p[0]))[:k]]


def load_transcoders(spec: str | os.PathLike) -> dict[int, SAE]:
    """Return a transcoder set by directory (a ``train_transcoders`` output) or by the name of a shipped set
    (``data/transcoders/NAME``), as ``{layer: transcoder}``."""
    path = Path(spec)
    if not path.is_dir():
        shipped = paths.DATA_DIR / "transcoders" / str(spec)
        if not shipped.is_dir():
            names_ = sorted(p.name for p in (paths.DATA_DIR / "transcoders").glob("*") if p.is_dir())
            raise InputError(f"transcoders {str(spec)!r}: no such directory and no shipped set of that name "
                             f"(shipped: {', '.join(names_) or 'none'}); train one with `workbench train-transcoders`")
        path = shipped
    from workbench.pipelines import load_transcoder_set  # here: it pulls the trainers and the store (~0.9 s)

    return load_transcoder_set(path)


# ---------------------------------------------------------------------------------------------
# Feature cards: where a transcoder feature fires most, and what it writes


class TopActivations(NamedTuple):
    """Each feature's ``k`` strongest activations over a set of windows."""

    values: Float[Tensor, "d_sae k"]
    window: Int[Tensor, "d_sae k"]
    pos: Int[Tensor, "d_sae k"]


def top_activations(model: HookedGPT, transcoder: SAE, layer: int, windows: Int[Tensor, "batch pos"], k: int = 8,
                    batch_size: int = 16) -> TopActivations:
    """Return every feature of layer ``layer``'s transcoder at its ``k`` largest activations over ``windows``."""
    if not 0 <= layer < model.cfg.n_layers:
        raise InputError(f"layer {layer} must lie in [0, {model.cfg.n_layers})")
    windows = model.check_tokens(windows)
    hook = f"blocks.{layer}.mlp.hook_in"
    n_pos = windows.shape[1]
    best_v = torch.full((transcoder.cfg.d_sae, k), -1.0)
    best_i = torch.zeros((transcoder.cfg.d_sae, k), dtype=torch.long)
    for start in range(0, windows.shape[0], batch_size):
        chunk = windows[start: start + batch_size]
        with torch.no_grad():
            _, cache = model.run_with_cache(chunk, names_filter=[hook], stop_at_layer=layer + 1)
            acts = transcoder.encode(cache[hook].float().flatten(0, 1)).T.cpu()  # [d_sae rows]
        top = acts.topk(min(k, acts.shape[1]), dim=1)
        values = torch.cat([best_v, top.values], 1)
        index = torch.cat([best_i, top.indices + start * n_pos], 1)
        keep = values.topk(k, dim=1).indices
        best_v, best_i = values.gather(1, keep), index.gather(1, keep)
    return TopActivations(best_v, best_i // n_pos, best_i % n_pos)


def promoted_logits(
    model: HookedGPT, transcoder: SAE, index: int, k: int = 10
) -> tuple[Int[Tensor, " k"], Float[Tensor, " k"]]:
    """Return the ``k`` tokens whose logits the feature's decoder row raises most directly (``W_dec[i] @ W_U``,
    the final norm's scale left out), and by how much."""
    if not 0 <= index < transcoder.cfg.d_sae:
        raise InputError(f"feature {index} must lie in [0, {transcoder.cfg.d_sae})")
    with torch.no_grad():
        effect = transcoder.W_dec[index].float() @ model.W_U.float().to(transcoder.W_dec.device)
        top = effect.topk(min(k, effect.numel()))
    return top.indices.cpu(), top.values.cpu()
