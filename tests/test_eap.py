"""Edge attribution patching, circuits and faithfulness (workbench/analysis/eap.py) on tiny models."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import LLAMA_TINY, tiny_cfg

from workbench import HookedGPT
from workbench.analysis import eap as E
from workbench.analysis import tasks as T
from workbench.analysis.patching import LogitDiff
from workbench.cli import main
from workbench.errors import InputError

FAMILIES = {"gpt2": {}, "llama": LLAMA_TINY, "attn-only": {"attn_only": True}}


@pytest.fixture(scope="module", params=list(FAMILIES))
def model(request):
    torch.manual_seed(0)
    m = HookedGPT(tiny_cfg(**FAMILIES[request.param])).eval()
    with torch.no_grad():  # larger weights than the init: a less linear model, so the checks can fail
        for p in m.parameters():
            if p.ndim >= 2:
                p.mul_(3)
    return m.requires_grad_(False)


def _pair(model, batch=3, pos=6, seed=3):
    clean = torch.randint(0, model.cfg.d_vocab, (batch, pos), generator=torch.Generator().manual_seed(seed))
    corrupt = clean.clone()
    corrupt[:, 2] = (corrupt[:, 2] + 7) % model.cfg.d_vocab
    return clean, corrupt


def test_graph_counts_match_hanna_et_al():
    # GPT-2 small: 32,491 edges (Hanna et al. 2024); SmolLM2 with its K/V heads split: 123,211
    assert E.Graph(12, 12, True).n_edges == 32491
    assert E.Graph(30, 9, True).n_edges == 123211
    g = E.Graph(2, 4, True)
    assert len(g.upstream) == g.n_up and len(g.downstream) == g.n_down
    assert g.owner(g.downstream.index("a1.h2<k>")) == g.upstream.index("a1.h2")
    assert g.owner(g.downstream.index("m0")) == g.upstream.index("m0")


def test_split_forward_is_the_model(model):
    clean, _ = _pair(model)
    run = E.split_forward(model, model.embed_tokens(clean))
    torch.testing.assert_close(run.logits, model(clean)[:, -1], rtol=1e-4, atol=1e-4)


def test_split_gradients_sum_to_the_models_gradients(model):
    """Per-node input gradients, summed over a layer's heads and q/k/v, are the gradient the attention
    layer passes back to the residual stream (resid_pre's minus resid_mid's, from backward hooks)."""
    clean, _ = _pair(model)
    metric = LogitDiff(3, 5)
    with torch.enable_grad():
        run = E.split_forward(model, model.embed_tokens(clean))
        grads = torch.autograd.grad(metric(run.logits).mean(), run.inputs)
        logits, cache = model.run_with_cache(clean, incl_grad=True)
        metric(logits[:, -1]).mean().backward()
    per_layer = 2 if not model.cfg.attn_only else 1
    for layer in range(model.cfg.n_layers):
        after = "hook_resid_mid" if not model.cfg.attn_only else "hook_resid_post"
        attn_grad = cache[f"blocks.{layer}.hook_resid_pre_grad"] - cache[f"blocks.{layer}.{after}_grad"]
        torch.testing.assert_close(grads[per_layer * layer].sum(2), attn_grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grads[-1], cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post_grad"])


def test_faithfulness_of_all_and_no_edges(model):
    clean, corrupt = _pair(model)
    metric = LogitDiff(3, 5)
    graph = E.Graph.from_model(model)
    everything, nothing = graph.valid(), torch.zeros(graph.n_up, graph.n_down, dtype=torch.bool)
    full, empty = E.faithfulness(model, clean, corrupt, metric, [everything, nothing], batch_size=2)
    assert full.faithfulness == pytest.approx(1.0, abs=1e-4)
    assert empty.faithfulness == pytest.approx(0.0, abs=1e-4)
    with torch.no_grad():
        assert full.corrupt == pytest.approx(float(metric(model(corrupt)[:, -1]).mean()), abs=1e-4)


def test_eap_score_is_the_first_order_effect_of_one_edge(model):
    """For single edges the EAP score tracks the exact effect of corrupting that edge alone."""
    clean, corrupt = _pair(model)
    metric = LogitDiff(3, 5)
    graph = E.Graph.from_model(model)
    res = E.edge_attribution(model, clean, corrupt, metric, E.EAPConfig(method="eap", batch_size=2))
    top = res.scores.abs().flatten().topk(6).indices
    circuits = []
    for i in top:
        keep = graph.valid().clone()
        keep.view(-1)[i] = False
        circuits.append(keep)
    exact = torch.tensor([f.circuit - f.clean for f in E.faithfulness(model, clean, corrupt, metric, circuits)])
    est = res.scores.flatten()[top]
    # first order: close on near-linear edges, off where a softmax bends (the reason for EAP-IG)
    assert torch.corrcoef(torch.stack([exact, est]))[0, 1] > 0.75, (exact, est)
    assert res.clean == pytest.approx(float(metric(model(clean)[:, -1]).mean()), abs=1e-4)


def test_eap_ig_completeness_on_the_input_edges(model):
    """Corrupting the input node's every edge is the corrupted run; IG's sum of those scores approaches
    m_corrupt - m_clean as the steps grow (completeness), EAP's first-order sum is further off."""
    clean, corrupt = _pair(model)
    metric = LogitDiff(3, 5)
    errs = {}
    for method, steps in (("eap", 1), ("eap-ig", 8)):
        res = E.edge_attribution(model, clean, corrupt, metric, E.EAPConfig(method=method, steps=steps))
        errs[method] = abs(float(res.scores[0].sum()) - (res.corrupt - res.clean))
    assert errs["eap-ig"] < errs["eap"], errs


def test_circuits(model):
    clean, corrupt = _pair(model)
    res = E.edge_attribution(model, clean, corrupt, LogitDiff(3, 5), E.EAPConfig(steps=2))
    keep = E.top_n_circuit(res, 10)
    assert int(keep.sum()) == 10 and not (keep & ~res.graph.valid()).any()
    greedy = E.greedy_circuit(res, 10)
    assert int(greedy.sum()) == 10
    # every greedy edge's downstream node is the logits or the input of a node already in the circuit
    ups = set(greedy.nonzero()[:, 0].tolist())
    for _up, down in greedy.nonzero().tolist():
        owner = res.graph.owner(down)
        assert owner is None or owner in ups
    assert len(res.top_edges(3)) == 3 and "->" in res.top_edges(3)[0][0]



def test_pruning_dangling_edges_changes_nothing(model):
    """Edges no kept path connects to both the input and the logits carry nothing: the pruned circuit's patched
    run is the same; top_n_circuit(prune=True) fills their places and stays within n."""
    clean, corrupt = _pair(model)
    metric = LogitDiff(3, 5)
    graph = E.Graph.from_model(model)
    gen = torch.Generator().manual_seed(1)
    circuits = [graph.valid() & (torch.rand(graph.n_up, graph.n_down, generator=gen) < p) for p in (0.05, 0.2)]
    pruned = [E.prune_circuit(graph, keep) for keep in circuits]
    for keep, small in zip(circuits, pruned):
        assert not (small & ~keep).any() and int(small.sum()) < int(keep.sum())
        assert torch.equal(E.prune_circuit(graph, small), small)
    full = E.faithfulness(model, clean, corrupt, metric, circuits)
    cut = E.faithfulness(model, clean, corrupt, metric, pruned)
    for a, b in zip(full, cut):
        assert a.circuit == pytest.approx(b.circuit, abs=1e-5)
    # an edge into a head whose output nothing kept reads is dangling, as is one out of a head nothing feeds
    keep = torch.zeros(graph.n_up, graph.n_down, dtype=torch.bool)
    h0, h1 = graph.up_start(0), graph.up_start(1)
    keep[0, graph.downstream.index("a0.h0<q>")] = True  # input -> a0.h0: dangling without a0.h0 -> ...
    keep[h1, graph.n_down - 1] = True  # a1.h0 -> logits: dangling, nothing feeds a1.h0
    assert not E.prune_circuit(graph, keep).any()
    keep[h0, graph.downstream.index("a1.h0<v>")] = True  # now a path input -> a0.h0 -> a1.h0 -> logits
    assert int(E.prune_circuit(graph, keep).sum()) == 3
    res = E.edge_attribution(model, clean, corrupt, metric, E.EAPConfig(steps=2))
    for n in (5, 20):
        filled = E.top_n_circuit(res, n, prune=True)
        assert int(filled.sum()) <= n and torch.equal(E.prune_circuit(graph, filled), filled)
        assert int(filled.sum()) >= int(E.prune_circuit(graph, E.top_n_circuit(res, n)).sum())


def test_a_float_mask_patches_as_the_boolean_one_and_its_gradient_is_each_edges_effect(model):
    """A 0/1 float mask gives the boolean mask's patched run, and the gradient of the metric with respect to a mask
    entry is the first-order effect of flipping that edge given the rest of the circuit (checked by flipping)."""
    clean, corrupt = _pair(model)
    metric = LogitDiff(3, 5)
    graph = E.Graph.from_model(model)
    keep = graph.valid() & (torch.rand(graph.n_up, graph.n_down, generator=torch.Generator().manual_seed(2)) < 0.3)
    e_clean = model.embed_tokens(clean)
    with torch.no_grad():
        run_corrupt = E.split_forward(model, model.embed_tokens(corrupt))
        hard = E.split_forward(model, e_clean, patch=E.Patch(keep, run_corrupt)).logits
    mask = keep.float().requires_grad_(True)
    with torch.enable_grad():
        soft = E.split_forward(model, e_clean, patch=E.Patch(mask, run_corrupt))
        (grad,) = torch.autograd.grad(metric(soft.logits).mean(), mask)
    torch.testing.assert_close(soft.logits, hard, rtol=1e-4, atol=1e-4)
    # small steps along single entries: finite differences against the gradient
    for u, d in graph.valid().nonzero()[torch.tensor([0, 7, 40, -1])].tolist():
        step = torch.zeros_like(mask)
        step[u, d] = 1e-2
        with torch.no_grad():
            up, down = (metric(E.split_forward(model, e_clean, patch=E.Patch(mask.detach() + s, run_corrupt)).logits)
                        for s in (step, -step))
        assert float(grad[u, d]) == pytest.approx(float(up.mean() - down.mean()) / 2e-2, rel=2e-2, abs=1e-3)
    assert not (grad[~graph.valid()] != 0).any()  # no edge, no gradient


def test_refining_a_circuit_keeps_its_size_and_never_loses_faithfulness(model):
    clean, corrupt = _pair(model, batch=4)
    metric = LogitDiff(3, 5)
    res = E.edge_attribution(model, clean, corrupt, metric, E.EAPConfig(steps=2, batch_size=2))
    n = 12
    (start,) = E.faithfulness(model, clean, corrupt, metric, [E.top_n_circuit(res, n)])
    out = E.refine_circuit(model, clean, corrupt, metric, res, n, steps=8, lr=0.2, batch_size=2)
    assert int(out.keep.sum()) == n and not (out.keep & ~res.graph.valid()).any()
    assert len(out.history) == 9 and out.history[0] == pytest.approx(start.faithfulness, abs=1e-4)
    assert abs(out.faithfulness.faithfulness - 1) <= abs(start.faithfulness - 1) + 1e-4
    assert out.faithfulness.faithfulness == pytest.approx(min(out.history, key=lambda f: abs(f - 1)), abs=1e-4)
    if out.swapped:  # a different circuit: it must be the better one
        assert abs(out.faithfulness.faithfulness - 1) < abs(start.faithfulness - 1)
    none = E.refine_circuit(model, clean, corrupt, metric, res, n, steps=0)
    assert torch.equal(none.keep, E.top_n_circuit(res, n)) and none.swapped == 0
    with pytest.raises(InputError, match="n_edges=0"):
        E.refine_circuit(model, clean, corrupt, metric, res, 0)
    with pytest.raises(InputError, match="steps=-1"):
        E.refine_circuit(model, clean, corrupt, metric, res, n, steps=-1)


def test_eap_bad_input(model):
    clean, corrupt = _pair(model)
    with pytest.raises(InputError, match="m >= 1"):
        E.edge_attribution(model, clean, corrupt, LogitDiff(3, 5), E.EAPConfig(steps=0))
    with pytest.raises(InputError, match="differ in shape"):
        E.edge_attribution(model, clean, corrupt[:, :4], LogitDiff(3, 5))
    with pytest.raises(InputError, match="3 prompt.s. of 6 tokens.*3 of 4"):
        E.faithfulness(model, clean, corrupt[:, :4], LogitDiff(3, 5), [E.Graph.from_model(model).valid()])
    # split_forward itself, given a corrupted run of another length
    with torch.no_grad():
        short = E.split_forward(model, model.embed_tokens(corrupt[:, :4]))
        keep = E.Graph.from_model(model).valid()
        with pytest.raises(InputError, match="3 prompt.s. of 4 tokens but this run has 3 of 6"):
            E.split_forward(model, model.embed_tokens(clean), patch=E.Patch(keep, short))
    with pytest.raises(InputError, match="metric returned shape"):
        E.edge_attribution(model, clean, corrupt, lambda logits: logits[:, :2])


# -- the CLI ------------------------------------------------------------------------------------


def test_circuit_command(tmp_path, capsys):
    out = tmp_path / "c.json"
    assert main(["circuit", "kjv-small", "--task", "ioi", "--method", "eap-ig", "--steps", "2", "--edges", "40",
                 "--prompts", "4", "--json", str(out), "--report", str(tmp_path / "rep")]) == 0
    numbers = json.loads(out.read_text())
    assert numbers["n_edges"] == 40 and len(numbers["edges"]) == 40 and "faithfulness" in numbers
    assert (tmp_path / "rep" / "report.html").is_file()
    assert main(["circuit", "kjv-small", "--task", "ioi", "--edges", "40", "--prompts", "4", "--steps", "2", "--prune",
                 "--json", str(out)]) == 0
    pruned = json.loads(out.read_text())
    assert pruned["prune"] and pruned["n_edges"] <= 40 and len(pruned["edges"]) == pruned["n_edges"]
    assert main(["circuit", "kjv-small", "--task", "ioi", "--edges", "40", "--prompts", "4", "--steps", "2",
                 "--refine", "3", "--json", str(out)]) == 0
    refined = json.loads(out.read_text())
    assert refined["n_edges"] == 40 and len(refined["refine_history"]) == 4
    assert abs(refined["faithfulness"] - 1) <= abs(refined["refine_history"][0] - 1) + 1e-4
    assert "refined in 3 steps" in capsys.readouterr().out
    assert main(["circuit", "kjv-small", "--task", "ioi", "--edges", "40", "--refine", "3", "--greedy"]) == 1
    assert "leave out --greedy" in capsys.readouterr().err
    assert main(["circuit", "kjv-small", "--task", "greater-than", "--method", "atp", "--prompts", "3",
                 "--top", "4"]) == 0
    assert "AtP in" in capsys.readouterr().out
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"clean": "In the beginning God", "corrupt": "In the beginning Moses",
                                "answer": " Nebuchadnezzarxyz", "wrong": " and"}]))
    assert main(["circuit", "kjv-small", "--task", str(bad), "--method", "eap"]) == 1
    assert "not one token" in capsys.readouterr().err


@pytest.mark.smollm2
def test_smollm2_split_forward_and_gradients(smollm2):
    """On SmolLM2 (grouped K/V heads split per query head, RMSNorm, RoPE): the split pass gives the model's
    logits, and its per-node gradients add up to the model's own (from backward hooks) at the last layer."""
    task = T.ioi_task(smollm2, n=1)
    model = smollm2
    with torch.enable_grad():
        run = E.split_forward(model, model.embed_tokens(task.clean))
        grads = torch.autograd.grad(task.metric(run.logits).sum(), run.inputs)
        logits, cache = model.run_with_cache(task.clean, names_filter=lambda n: "resid" in n, incl_grad=True)
        try:
            task.metric(logits[:, -1]).sum().backward()
        finally:
            model.zero_grad(set_to_none=True)  # the shared fixture's weights track gradients: leave none behind
    torch.testing.assert_close(run.logits, logits[:, -1].detach(), rtol=1e-3, atol=1e-3)
    L = model.cfg.n_layers - 1
    attn_grad = cache[f"blocks.{L}.hook_resid_pre_grad"] - cache[f"blocks.{L}.hook_resid_mid_grad"]
    torch.testing.assert_close(grads[2 * L].sum(2), attn_grad, rtol=1e-3, atol=1e-5)
    assert E.Graph.from_model(model).n_edges == 123211
