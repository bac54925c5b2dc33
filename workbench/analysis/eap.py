"""Edge attribution patching (EAP, EAP-IG), circuit discovery and faithfulness.

The graph (Hanna et al. 2024, "Have faith in faithfulness"): upstream nodes are the input
embeddings, every head's output (``z_h W_O[h]``, written into the residual stream) and every MLP's
output; downstream nodes are every head's query, key and value inputs (separately), every MLP's
input and the logits. An edge ``u -> d`` exists when ``u`` writes before ``d`` reads: the input of
``d`` is the sum of its upstream nodes' outputs (plus biases). In grouped-query models each query
head gets its own key and value inputs (the K/V heads are split), so SmolLM2 has 123,211 edges.

EAP scores an edge by the first-order effect of corrupting it alone,
``(a_u(corrupt) - a_u(clean)) . dm/d input_d``, with the gradient taken on the clean run; EAP-IG
averages the gradient over ``m`` inputs interpolated between the corrupted and the clean
embeddings (``k/m`` of the way, ``k = 1..m``). A circuit is a set of edges; its faithfulness is
``(m_circuit - m_corrupt) / (m_clean - m_corrupt)``, where ``m_circuit`` comes from the clean run
with every edge outside the circuit patched to its corrupt value: each downstream node reads the
clean-path outputs of the edges kept and the corrupted run's outputs of the others.

Both the gradients and the patched runs need every downstream node to have its own input, which the
fused model does not have; :func:`split_forward` recomputes the forward pass with one input per
downstream node from the model's own weights and norm modules (checked against the model's logits
and its gradients in the tests).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, NamedTuple

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from workbench.analysis.attribution_patching import metric_value
from workbench.analysis.patching import LogitDiff, Metric, _check_pair
from workbench.errors import InputError
from workbench.model import apply_rotary

if TYPE_CHECKING:
    from workbench.model import HookedGPT

EAPMethod = Literal["eap", "eap-ig"]
QKV = ("q", "k", "v")


# ---------------------------------------------------------------------------------------------
# The graph


@dataclass(frozen=True)
class Graph:
    """Nodes and edges of a model's computational graph, in the layout of EAP's score matrix.

    Upstream order: ``input``, then per layer ``a{l}.h{h}`` for every head and ``m{l}``.
    Downstream order: per layer ``a{l}.h{h}<q>``, ``<k>``, ``<v>`` for every head, then ``m{l}``;
    finally ``logits``."""

    n_layers: int
    n_heads: int
    has_mlp: bool

    @classmethod
    def from_model(cls, model: HookedGPT) -> Graph:
        return cls(model.cfg.n_layers, model.cfg.n_heads, not model.cfg.attn_only)

    @property
    def _m(self) -> int:
        return int(self.has_mlp)

    def up_start(self, layer: int) -> int:
        """Index of layer ``layer``'s first head among the upstream nodes."""
        return 1 + layer * (self.n_heads + self._m)

    def down_start(self, layer: int) -> int:
        """Index of layer ``layer``'s first head input among the downstream nodes."""
        return layer * (3 * self.n_heads + self._m)

    @property
    def n_up(self) -> int:
        return self.up_start(self.n_layers)

    @property
    def n_down(self) -> int:
        return self.down_start(self.n_layers) + 1

    @property
    def upstream(self) -> list[str]:
        names = ["input"]
        for layer in range(self.n_layers):
            names += [f"a{layer}.h{h}" for h in range(self.n_heads)] + ([f"m{layer}"] if self.has_mlp else [])
        return names

    @property
    def downstream(self) -> list[str]:
        names = []
        for layer in range(self.n_layers):
            names += [f"a{layer}.h{h}<{c}>" for h in range(self.n_heads) for c in QKV]
            names += [f"m{layer}"] if self.has_mlp else []
        return names + ["logits"]

    def valid(self) -> Bool[Tensor, "up down"]:
        """Which (upstream, downstream) pairs are edges: the upstream node writes before the downstream one reads."""
        H, m = self.n_heads, self._m
        up_layer = torch.tensor([-1] + [layer for layer in range(self.n_layers) for _ in range(H + m)])
        up_is_mlp = torch.tensor([False] + [i == H for _ in range(self.n_layers) for i in range(H + m)])
        down_layer = torch.tensor([layer for layer in range(self.n_layers) for _ in range(3 * H + m)] + [self.n_layers])
        down_is_mlp = torch.tensor([i == 3 * H for _ in range(self.n_layers) for i in range(3 * H + m)] + [False])
        before = up_layer[:, None] < down_layer[None, :]
        same_layer_head_to_mlp = (up_layer[:, None] == down_layer[None, :]) & ~up_is_mlp[:, None] & down_is_mlp[None, :]
        return before | same_layer_head_to_mlp

    @property
    def n_edges(self) -> int:
        return int(self.valid().sum())

    def owner(self, down: int) -> int | None:
        """The upstream node whose input ``down`` is (a head for its q/k/v, an MLP), None for the logits."""
        if down == self.n_down - 1:
            return None
        layer, i = divmod(down, 3 * self.n_heads + self._m)
        return self.up_start(layer) + (i // 3 if i < 3 * self.n_heads else self.n_heads)

    def edge_name(self, up: int, down: int) -> str:
        return f"{self.upstream[up]}->{self.downstream[down]}"


# ---------------------------------------------------------------------------------------------
# The forward pass with one input per downstream node


class SplitRun(NamedTuple):
    """What :func:`split_forward` gives back."""

    #: logits at the answer position
    logits: Float[Tensor, "batch d_vocab"]
    #: every upstream node's output
    up: Float[Tensor, "up batch pos d_model"]
    #: the residual stream each downstream layer reads: per layer (before attention, before the MLP), then the final one
    resid: list[Tensor]
    #: each downstream node's input, grouped: per layer the heads' ``[batch pos 3*head d_model]`` and
    #: the MLP's ``[batch pos d_model]``, then the logits' ``[batch pos d_model]``
    inputs: list[Tensor]


class Patch(NamedTuple):
    """Edges to keep; every other edge reads the corrupted run's upstream output.

    ``keep`` may also be a float mask (1 keeps an edge, 0 corrupts it, values between mix the two): the
    patched run is then differentiable with respect to it, through every upstream output
    (:func:`refine_circuit`)."""

    keep: Bool[Tensor, "up down"] | Float[Tensor, "up down"]
    corrupt: SplitRun


def split_forward(
    model: HookedGPT,
    embed: Float[Tensor, "batch pos d_model"],
    answer_pos: int = -1,
    patch: Patch | None = None,
) -> SplitRun:
    """Return the forward pass from ``embed`` (token plus positional embeddings) with one input per
    downstream node; with ``patch``, each input sums the kept edges' outputs of this run and the other
    edges' outputs of the corrupted run (see the module docstring).

    Without ``patch`` the inputs are views of the residual stream, so ``torch.autograd.grad`` with
    respect to them gives each downstream node's own gradient."""
    cfg, graph = model.cfg, Graph.from_model(model)
    B, P, d = embed.shape
    if patch is not None and tuple(patch.corrupt.up.shape[1:3]) != (B, P):
        cb, cp = patch.corrupt.up.shape[1:3]
        raise InputError(f"the corrupted run has {cb} prompt(s) of {cp} tokens but this run has {B} of {P}; edges are "
                         "patched position by position, so give each clean prompt a corrupted twin of the same token "
                         "length")
    if patch is None and torch.is_grad_enabled() and not embed.requires_grad:
        embed = embed.detach().requires_grad_(True)  # frozen weights: the inputs still need a graph
    H, group = cfg.n_heads, cfg.n_heads // cfg.n_kv
    up = embed.new_empty(graph.n_up, B, P, d)
    up[0] = embed.detach()  # no gradient flows through the stored outputs: they are only read for patching
    # a float mask: each upstream output minus the corrupted run's, kept with its autograd graph
    soft = patch is not None and patch.keep.is_floating_point()
    deltas: list[Tensor] = [(embed - patch.corrupt.up[0])[None]] if soft else []
    resids, inputs = [], []
    rotary = model.rotary(0, P, embed.dtype) if cfg.positional == "rotary" else None
    causal = torch.ones(P, P, dtype=torch.bool, device=embed.device).tril()
    n_up = 1

    def node_inputs(resid: Tensor, index: int, down: slice) -> Tensor:
        """``[batch pos n d_model]``: the input of each downstream node in ``down``."""
        n = down.stop - down.start
        resids.append(resid)
        if patch is None:
            return resid[:, :, None, :].expand(B, P, n, d)
        if soft:
            mask = patch.keep[:n_up, down].to(resid.dtype)
            return patch.corrupt.resid[index][:, :, None, :] + torch.einsum("ubpm,ud->bpdm", torch.cat(deltas), mask)
        kept = patch.keep[:n_up, down]
        # the corrupted input plus the kept edges' differences, or (the same sum, fewer terms when most edges
        # are kept) this run's input minus the other edges' differences
        cut = ~kept
        rows, base, sign, mask = kept.any(1), patch.corrupt.resid[index], 1.0, kept
        if int(cut.any(1).sum()) < int(rows.sum()):
            rows, base, sign, mask = cut.any(1), resid, -1.0, cut
        rows = rows.nonzero().squeeze(1)
        x = base[:, :, None, :].expand(B, P, n, d)
        if len(rows):
            delta = up[rows] - patch.corrupt.up[rows]
            x = x + sign * torch.einsum("ubpm,ud->bpdm", delta, mask[rows].to(resid.dtype))
        return x

    resid = embed
    for layer, block in enumerate(model.blocks):
        attn = block.attn
        start = graph.down_start(layer)
        x = node_inputs(resid, 2 * layer, slice(start, start + 3 * H))
        inputs.append(x)
        n = block.ln1(x).view(B, P, H, 3, d)
        W_K, W_V = (w.repeat_interleave(group, 0) for w in (attn.W_K, attn.W_V))
        q = torch.einsum("bphm,hmd->bphd", n[:, :, :, 0], attn.W_Q)
        k = torch.einsum("bphm,hmd->bphd", n[:, :, :, 1], W_K)
        v = torch.einsum("bphm,hmd->bphd", n[:, :, :, 2], W_V)
        if attn.b_Q is not None:
            q, k, v = q + attn.b_Q, k + attn.b_K.repeat_interleave(group, 0), v + attn.b_V.repeat_interleave(group, 0)
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(cfg.d_head)
        pattern = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        z = torch.einsum("bhqk,bkhd->bqhd", pattern, v)
        result = torch.einsum("bqhd,hdm->hbqm", z, attn.W_O)
        s = graph.up_start(layer)
        up[s: s + H] = result.detach()
        if soft:
            deltas.append(result - patch.corrupt.up[s: s + H])
        n_up = s + H
        attn_out = result.sum(0) if attn.b_O is None else result.sum(0) + attn.b_O
        resid = resid + attn_out
        if graph.has_mlp:
            x = node_inputs(resid, 2 * layer + 1, slice(start + 3 * H, start + 3 * H + 1))[:, :, 0]
            inputs.append(x)
            out = block.mlp(block.ln2(x))
            up[n_up] = out.detach()
            if soft:
                deltas.append((out - patch.corrupt.up[n_up])[None])
            n_up += 1
            resid = resid + out
        else:
            resids.append(resid)  # keeps resid[2 * layer + 1] defined for attention-only models
    x = node_inputs(resid, 2 * cfg.n_layers, slice(graph.n_down - 1, graph.n_down))[:, :, 0]
    inputs.append(x)
    logits = model.unembed_resid(x[:, answer_pos])
    return SplitRun(logits, up, resids, inputs)


# ---------------------------------------------------------------------------------------------
# Edge scores


@dataclass(frozen=True)
class EAPConfig:
    """How edges are scored."""

    #: ``eap``: the gradient on the clean run; ``eap-ig``: averaged over ``steps`` interpolated inputs
    method: EAPMethod = "eap-ig"
    #: integrated-gradient steps (Hanna et al. 2024 use 5); ignored by ``eap``
    steps: int = 5
    #: position whose logits the metric reads
    answer_pos: int = -1
    #: prompt pairs per forward/backward pass (memory); None: all at once
    batch_size: int | None = 8


class EAPResult(NamedTuple):
    """Every edge's score: the estimated change of the (mean) metric when that edge alone is corrupted."""

    graph: Graph
    config: EAPConfig
    #: ``[up down]``, zero where there is no edge
    scores: Float[Tensor, "up down"]
    clean: float
    corrupt: float

    def top_edges(self, n: int) -> list[tuple[str, float]]:
        """The ``n`` edges with the largest absolute scores, as ``("u->d", score)``."""
        flat = self.scores.abs().flatten()
        idx = flat.topk(min(n, self.graph.n_edges)).indices
        D = self.scores.shape[1]
        return [(self.graph.edge_name(int(i) // D, int(i) % D), float(self.scores.flatten()[i])) for i in idx]


def select_metric(metric: Metric, rows: slice, n: int) -> Metric:
    """Return the metric of the prompts ``rows`` of ``n`` (per-prompt answers sliced with them)."""
    if rows == slice(0, n):
        return metric
    if isinstance(metric, LogitDiff):
        pick = lambda ids: ids if ids is None or ids.ndim == 0 else ids[rows]  # noqa: E731
        return LogitDiff(pick(metric.answer), pick(metric.wrong))
    if hasattr(metric, "select"):
        return metric.select(rows)
    raise InputError("this metric cannot be split across batches of prompts; give it a select(rows) method, use "
                     "LogitDiff, or set batch_size to the number of prompts")


def _chunks(n: int, size: int | None) -> list[slice]:
    size = n if size is None else max(1, size)
    return [slice(lo, min(lo + size, n)) for lo in range(0, n, size)]


def edge_attribution(
    model: HookedGPT,
    clean: Int[Tensor, "batch pos"],
    corrupt: Int[Tensor, "batch pos"],
    metric: Metric,
    config: EAPConfig = EAPConfig(),
) -> EAPResult:
    """Return EAP or EAP-IG scores for every edge of the model's graph (see the module docstring)."""
    if config.method not in ("eap", "eap-ig"):
        raise InputError(f"method={config.method!r} is not one of 'eap', 'eap-ig'")
    if config.method == "eap-ig" and (not isinstance(config.steps, int) or config.steps < 1):
        raise InputError(f"steps={config.steps!r}: integrated gradients need m >= 1 steps (Hanna et al. use 5)")
    clean, corrupt = _check_pair(model, clean, corrupt)
    graph = Graph.from_model(model)
    steps = config.steps if config.method == "eap-ig" else 1
    N = clean.shape[0]
    scores = torch.zeros(graph.n_up, graph.n_down)
    m_clean = m_corrupt = 0.0
    for rows in _chunks(N, config.batch_size):
        w = (rows.stop - rows.start) / N
        chunk_metric = select_metric(metric, rows, N)
        with torch.no_grad():
            e_clean, e_corrupt = model.embed_tokens(clean[rows]), model.embed_tokens(corrupt[rows])
            run_clean = split_forward(model, e_clean, config.answer_pos)
            run_corrupt = split_forward(model, e_corrupt, config.answer_pos)
            m_clean += w * float(metric_value(chunk_metric, run_clean.logits))
            m_corrupt += w * float(metric_value(chunk_metric, run_corrupt.logits))
            delta = (run_corrupt.up - run_clean.up).flatten(1)
            del run_clean, run_corrupt
        grads = None
        for k in range(1, steps + 1):
            # k/m of the way from the corrupted to the clean embeddings (k = m: the clean run, plain EAP)
            embed = e_corrupt + (k / steps) * (e_clean - e_corrupt)
            with torch.enable_grad():
                run = split_forward(model, embed, config.answer_pos)
                value = metric_value(chunk_metric, run.logits) / steps
                g = torch.autograd.grad(value, run.inputs)
            g = _downstream_grads(g, graph)
            grads = g if grads is None else grads + g
            del run
        scores += w * (delta @ grads.flatten(1).T).cpu()
    scores *= graph.valid()
    return EAPResult(graph, config, scores, m_clean, m_corrupt)


def _downstream_grads(grads: Sequence[Tensor], graph: Graph) -> Float[Tensor, "down batch pos d_model"]:
    """Stack the per-group input gradients of :func:`split_forward` in the downstream order."""
    out = []
    for g in grads:
        out.append(g.permute(2, 0, 1, 3) if g.ndim == 4 else g[None])
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------
# Circuits and faithfulness


def top_n_circuit(result: EAPResult, n: int, prune: bool = False) -> Bool[Tensor, "up down"]:
    """The ``n`` edges with the largest absolute scores.

    ``prune``: drop the edges that cannot carry anything from the input to the logits (:func:`prune_circuit`)
    and fill their places from further down the ranking: the longest prefix of the ranking whose pruned circuit
    has at most ``n`` edges (so it may have a few fewer)."""
    if n < 0:
        raise InputError(f"n={n}: the number of edges must be >= 0")
    graph = result.graph
    valid = graph.valid().flatten()
    order = result.scores.abs().flatten().masked_fill(~valid, -1).argsort(descending=True)[: int(valid.sum())]

    def first(k: int) -> Tensor:
        keep = torch.zeros_like(valid)
        keep[order[:k]] = True
        return keep.view_as(result.scores)

    if not prune:
        return first(min(n, len(order)))
    lo, hi = min(n, len(order)), len(order)  # pruning only removes edges: a prefix of n never has more than n
    while lo < hi:  # the pruned size grows with the prefix, so bisect for the longest that fits
        mid = (lo + hi + 1) // 2
        if int(prune_circuit(graph, first(mid)).sum()) <= n:
            lo = mid
        else:
            hi = mid - 1
    return prune_circuit(graph, first(lo))


def prune_circuit(graph: Graph, keep: Bool[Tensor, "up down"]) -> Bool[Tensor, "up down"]:
    """Return ``keep`` without its dangling edges: those whose upstream node no kept path reaches from the input
    (its output is then its corrupted output, so the edge carries nothing) or whose downstream node feeds no kept
    path to the logits. The patched run, and so the faithfulness, is the same with or without them."""
    reads: dict[int, list[int]] = {}
    for down in range(graph.n_down - 1):
        reads.setdefault(graph.owner(down), []).append(down)
    keep = keep & graph.valid()
    reached = torch.zeros(graph.n_up, dtype=torch.bool)
    reached[0] = True
    for up in range(1, graph.n_up):  # upstream order is topological: a node's inputs read earlier nodes
        reached[up] = bool(keep[reached][:, reads[up]].any())
    alive = torch.zeros(graph.n_down, dtype=torch.bool)
    alive[-1] = True
    for down in range(graph.n_down - 2, -1, -1):  # a node's input is alive when the node feeds a live input
        alive[down] = bool(keep[graph.owner(down)][alive].any())
    return keep & reached[:, None] & alive[None, :]


def greedy_circuit(result: EAPResult, n: int) -> Bool[Tensor, "up down"]:
    """``n`` edges grown from the logits: each step adds the edge with the largest absolute score among
    those whose downstream node already belongs to the circuit (Hanna et al. 2023's greedy search)."""
    if n < 0:
        raise InputError(f"n={n}: the number of edges must be >= 0")
    graph = result.graph
    scores = result.scores.abs() * graph.valid()
    # the downstream inputs of each upstream node: a head's q/k/v, an MLP's input
    reads: dict[int, list[int]] = {}
    for down in range(graph.n_down):
        owner = graph.owner(down)
        if owner is not None:
            reads.setdefault(owner, []).append(down)
    valid = graph.valid()
    keep = torch.zeros_like(valid)
    heap: list[tuple[float, int, int]] = []

    def open_node(down: int) -> None:
        col = scores[:, down]
        for up in valid[:, down].nonzero().squeeze(1).tolist():
            heapq.heappush(heap, (-float(col[up]), up, down))

    open_node(graph.n_down - 1)
    in_circuit = set()
    while heap and int(keep.sum()) < n:
        _, up, down = heapq.heappop(heap)
        if keep[up, down]:
            continue
        keep[up, down] = True
        if up not in in_circuit:
            in_circuit.add(up)
            for d in reads.get(up, []):
                open_node(d)
    return keep


def node_circuit(graph: Graph, nodes: Sequence[int]) -> Bool[Tensor, "up down"]:
    """Every edge between the given upstream nodes (plus the input and the logits): a node-level circuit."""
    chosen = torch.zeros(graph.n_up, dtype=torch.bool)
    chosen[0] = True
    chosen[list(nodes)] = True
    down_ok = torch.tensor([graph.owner(d) is None or bool(chosen[graph.owner(d)]) for d in range(graph.n_down)])
    return graph.valid() & chosen[:, None] & down_ok[None, :]


class Faithfulness(NamedTuple):
    """The metric of a circuit's run beside the clean and corrupted runs'."""

    n_edges: int
    circuit: float
    clean: float
    corrupt: float

    @property
    def faithfulness(self) -> float:
        """``(m_circuit - m_corrupt) / (m_clean - m_corrupt)``: 1 when the circuit alone restores the clean metric."""
        return (self.circuit - self.corrupt) / (self.clean - self.corrupt)


def _patch_chunks(
    model: HookedGPT,
    clean: Int[Tensor, "batch pos"],
    corrupt: Int[Tensor, "batch pos"],
    metric: Metric,
    answer_pos: int,
    batch_size: int | None,
) -> Iterator[tuple[float, Metric, Tensor, SplitRun, float, float]]:
    """Per chunk of prompt pairs: its weight in the mean, its metric, the clean embeddings, the corrupted split
    run, and the clean and corrupted metric values (what a patched run of the chunk needs)."""
    N = clean.shape[0]
    for rows in _chunks(N, batch_size):
        chunk_metric = select_metric(metric, rows, N)
        with torch.no_grad():  # not a decorator: the run-time checks wrap generators in plain functions
            run_corrupt = split_forward(model, model.embed_tokens(corrupt[rows]), answer_pos)
            chunk = ((rows.stop - rows.start) / N, chunk_metric, model.embed_tokens(clean[rows]), run_corrupt,
                     float(metric_value(chunk_metric, model(clean[rows])[:, answer_pos])),
                     float(metric_value(chunk_metric, run_corrupt.logits)))
        yield chunk


@torch.no_grad()
def faithfulness(
    model: HookedGPT,
    clean: Int[Tensor, "batch pos"],
    corrupt: Int[Tensor, "batch pos"],
    metric: Metric,
    circuits: Sequence[Bool[Tensor, "up down"]],
    answer_pos: int = -1,
    batch_size: int | None = 8,
) -> list[Faithfulness]:
    """Return each circuit's faithfulness: the clean run with every edge outside it patched to its
    corrupted value (one patched pass per circuit, the corrupted run shared)."""
    clean, corrupt = _check_pair(model, clean, corrupt)
    graph = Graph.from_model(model)
    for keep in circuits:
        if tuple(keep.shape) != (graph.n_up, graph.n_down):
            raise InputError(f"a circuit mask of shape {tuple(keep.shape)} does not fit this model's graph "
                             f"({graph.n_up} upstream x {graph.n_down} downstream nodes)")
    m_clean = m_corrupt = 0.0
    m_circuit = [0.0] * len(circuits)
    for w, chunk_metric, e_clean, run_corrupt, v_clean, v_corrupt in _patch_chunks(
            model, clean, corrupt, metric, answer_pos, batch_size):
        m_clean += w * v_clean
        m_corrupt += w * v_corrupt
        for i, keep in enumerate(circuits):
            run = split_forward(model, e_clean, answer_pos, Patch(keep.to(e_clean.device), run_corrupt))
            m_circuit[i] += w * float(metric_value(chunk_metric, run.logits))
    return [Faithfulness(int(keep.sum()), m, m_clean, m_corrupt) for keep, m in zip(circuits, m_circuit)]


class Refinement(NamedTuple):
    """What :func:`refine_circuit` gives back."""

    #: the best circuit found (the one whose faithfulness lies nearest 1), ``[up down]``
    keep: Bool[Tensor, "up down"]
    #: its faithfulness on the prompts it was refined on (the patched run :func:`faithfulness` makes)
    faithfulness: Faithfulness
    #: the faithfulness of the circuit each step ran (step 0: the starting circuit)
    history: list[float]
    #: how many edges entered the circuit (and as many left) between the start and the best circuit
    swapped: int


def refine_circuit(
    model: HookedGPT,
    clean: Int[Tensor, "batch pos"],
    corrupt: Int[Tensor, "batch pos"],
    metric: Metric,
    start: EAPResult,
    n_edges: int,
    steps: int = 30,
    lr: float = 0.05,
    answer_pos: int = -1,
    batch_size: int | None = 8,
) -> Refinement:
    """Refine the top-``n_edges`` circuit of ``start``'s scores by gradient steps on its own patched run.

    Every edge gets a logit, at first ``log(|score| / t)`` with ``t`` the threshold of the top ``n_edges``, so
    the starting circuit is :func:`top_n_circuit`'s. Each step runs the clean prompts with the current circuit
    (the top ``n_edges`` logits) patched as :func:`faithfulness` does, with the mask a float tensor so that
    the run is differentiable: the gradient of the metric with respect to an edge's mask entry is the
    first-order effect of adding (or removing) that edge *given the rest of the circuit*, where EAP's score is
    its effect given the whole clean model. Adam moves the logits along it (straight-through: the forward
    pass sees the hard top-n mask), towards a faithfulness of 1 from either side; the circuit always has
    exactly ``n_edges`` edges. In the spirit of learned edge masks (Bhaskar et al. 2024, "Finding Transformer
    Circuits with Edge Pruning"), with the size fixed instead of penalised.

    Each step costs one patched forward and backward pass over the prompts. The best circuit is never worse
    than the start on these prompts; check it on held-out prompts too (it is fitted to these)."""
    if steps < 0:
        raise InputError(f"steps={steps} must be >= 0")
    if not (math.isfinite(lr) and lr > 0):
        raise InputError(f"lr={lr} must be a positive number")
    clean, corrupt = _check_pair(model, clean, corrupt)
    graph = start.graph
    if graph != Graph.from_model(model):
        raise InputError("the scores were computed for another model's graph")
    valid = graph.valid()
    n_valid = int(valid.sum())
    if not 0 < n_edges <= n_valid:
        raise InputError(f"n_edges={n_edges} must lie in [1, {n_valid}] (the graph's edge count)")
    size = start.scores.abs()[valid]
    ranked = size.sort(descending=True).values
    threshold = float(ranked[n_edges - 1] + ranked[n_edges]) / 2 if n_edges < n_valid else float(ranked[-1]) / 2
    tiny = max(float(ranked[0]), 1e-30) * 1e-12
    theta = torch.log(size.clamp_min(tiny) / max(threshold, tiny)).requires_grad_(True)  # one logit per edge
    optimizer = torch.optim.Adam([theta], lr=lr)

    chunks = list(_patch_chunks(model, clean, corrupt, metric, answer_pos, batch_size))
    m_clean = sum(c[0] * c[4] for c in chunks)
    m_corrupt = sum(c[0] * c[5] for c in chunks)
    gap = m_clean - m_corrupt
    if abs(gap) < 1e-9:
        raise InputError("the clean and corrupted runs give the same metric: there is nothing for a circuit to restore")

    def hard() -> Bool[Tensor, " edge"]:
        keep = torch.zeros(n_valid, dtype=torch.bool)
        keep[theta.detach().topk(n_edges).indices] = True
        return keep

    first = hard()
    best, best_distance, best_metric, history = first, math.inf, 0.0, []
    for step in range(steps + 1):
        keep_flat = hard()
        m_circuit = 0.0
        grad = torch.zeros_like(theta)
        for w, chunk_metric, e_clean, run_corrupt, _, _ in chunks:
            with torch.enable_grad() if step < steps else torch.no_grad():
                # straight through: the values of the hard mask, the gradient of the logits
                flat = keep_flat.to(theta.dtype) + theta - theta.detach()
                mask = torch.zeros(valid.shape, dtype=theta.dtype).masked_scatter(valid, flat)
                run = split_forward(model, e_clean, answer_pos, Patch(mask.to(e_clean.dtype), run_corrupt))
                value = w * metric_value(chunk_metric, run.logits)
                if step < steps:
                    grad += torch.autograd.grad(value, theta)[0]
            m_circuit += float(value.detach())
            del run
        f = (m_circuit - m_corrupt) / gap
        history.append(f)
        if abs(f - 1) < best_distance:
            best, best_distance, best_metric = keep_flat, abs(f - 1), m_circuit
        if step == steps:
            break
        optimizer.zero_grad()
        theta.grad = grad * (-1.0 if f < 1 else 1.0) / gap  # towards faithfulness 1 from either side
        optimizer.step()
    keep = torch.zeros(valid.shape, dtype=torch.bool).masked_scatter(valid, best)
    faith = Faithfulness(n_edges, best_metric, m_clean, m_corrupt)  # that step's run was the circuit's patched run
    return Refinement(keep, faith, history, int((best & ~first).sum()))


class Circuit(NamedTuple):
    """What :func:`find_circuit` gives back."""

    #: every edge's score
    result: EAPResult
    #: the edges kept, ``[up down]``
    keep: Bool[Tensor, "up down"]
    #: the circuit's metric beside the clean and corrupted runs'
    faithfulness: Faithfulness

    def edges(self) -> list[tuple[str, float]]:
        """The circuit's edges as ``("u->d", score)``, the largest absolute score first."""
        graph, scores = self.result.graph, self.result.scores
        out = [(graph.edge_name(u, d), float(scores[u, d])) for u, d in self.keep.nonzero().tolist()]
        return sorted(out, key=lambda e: -abs(e[1]))


def find_circuit(
    model: HookedGPT,
    clean: Int[Tensor, "batch pos"],
    corrupt: Int[Tensor, "batch pos"],
    metric: Metric,
    n_edges: int,
    config: EAPConfig = EAPConfig(),
    greedy: bool = False,
) -> Circuit:
    """Return the circuit of ``n_edges`` edges by EAP or EAP-IG scores (top-n by absolute score, or grown
    greedily from the logits) and its faithfulness on the same prompts."""
    result = edge_attribution(model, clean, corrupt, metric, config)
    keep = greedy_circuit(result, n_edges) if greedy else top_n_circuit(result, n_edges)
    (faith,) = faithfulness(model, clean, corrupt, metric, [keep], config.answer_pos, config.batch_size)
    return Circuit(result, keep, faith)
