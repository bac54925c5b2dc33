"""The analysis subcommands, run in-process on a tiny model saved to a temporary directory; their
numbers are checked against the library (and the model's own logits), their reports opened."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import tiny_cfg

from workbench.cli import main

TEXT = ("When Mary and John went to the store, John gave a drink to Mary. The cat sat on the mat. "
        "The capital of France is Paris. One two three four five six seven eight nine ten. ")
CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPT = "When Mary and John went to the store, Mary gave a drink to"


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    """(model, directory): a random 2-layer GPT with a small BPE tokenizer, saved as a native checkpoint,
    and a text file to train a tuned lens on."""
    from workbench import HookedGPT
    from workbench.corpora import train_bpe

    d = tmp_path_factory.mktemp("cli_lm")
    tok = train_bpe((TEXT * 4).split(". "), vocab_size=320)
    torch.manual_seed(0)
    model = HookedGPT(tiny_cfg(d_vocab=tok.vocab_size, n_ctx=64, name="tiny-lm"), tokenizer=tok).eval()
    model.save(d / "model")
    (d / "corpus.txt").write_text("\n\n".join([TEXT] * 30))
    return model, str(d / "model"), d


def _report(directory) -> dict:
    page = (directory / "report.html").read_text()
    assert "Plotly.newPlot" in page and page.rstrip().endswith("</html>")
    return json.loads((directory / "report.json").read_text())


def test_induction_command(tiny_lm, tmp_path, capsys):
    from workbench.analysis import induction as I

    model, path, _ = tiny_lm
    rc = main(["induction", path, "--seq-len", "8", "--batch", "3", "--json", str(tmp_path / "n.json"),
               "--report", str(tmp_path / "rep")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "induction score of every head" in out and "top previous_token heads" in out
    numbers = json.loads((tmp_path / "n.json").read_text())
    seq = I.repeated_random_tokens(I.default_spec(model, seq_len=8, batch=3), model.cfg.d_vocab)
    expect = I.score_heads(model, seq.tokens)
    torch.testing.assert_close(torch.tensor(numbers["induction"]), expect.induction)
    assert numbers["loss_second"] == pytest.approx(I.repeat_losses(expect.loss, seq).second, rel=1e-5)
    rep = _report(tmp_path / "rep")
    assert rep["title"].startswith("Induction heads") and len(rep["top_induction"]) == 5
    assert (tmp_path / "rep" / "report.html").read_text().count("Plotly.newPlot") == 3


def test_lens_command_last_row_is_the_output(tiny_lm, tmp_path, capsys):
    model, path, _ = tiny_lm
    assert main(["lens", path, CLEAN, "--k", "2", "--json", str(tmp_path / "l.json"),
                 "--report", str(tmp_path / "rep")]) == 0
    out = capsys.readouterr().out
    assert "logit lens at position" in out and "final" in out
    numbers = json.loads((tmp_path / "l.json").read_text())
    tokens = model.to_tokens(CLEAN)
    n = tokens.shape[1]
    assert numbers["str_tokens"] == model.to_str_tokens(tokens[0])
    assert len(numbers["layer"]) == 3 * n and numbers["layer"][-1] == "final"
    top = model(tokens)[0].softmax(-1).max(-1)
    torch.testing.assert_close(torch.tensor(numbers["top_prob"][-n:]), top.values.detach())
    assert numbers["top_token"][-n:] == top.indices.tolist()
    assert max(abs(v) for v in numbers["kl_to_final"][-n:]) < 1e-6
    assert _report(tmp_path / "rep")["lens"] == "logit"


def test_lens_command_rejects_a_bad_position(tiny_lm, capsys):
    _, path, _ = tiny_lm
    assert main(["lens", path, "one two", "--pos", "40"]) == 1
    assert "--pos 40 is outside" in capsys.readouterr().err


@pytest.mark.parametrize("heads", [False, True], ids=["layers", "heads"])
def test_attribute_command_sums_to_the_logit_difference(tiny_lm, tmp_path, capsys, heads):
    model, path, _ = tiny_lm
    argv = ["attribute", path, CLEAN, "--answer", " Mary", "--wrong", " John", "--json", str(tmp_path / "a.json"),
            "--report", str(tmp_path / "rep")] + (["--heads"] if heads else [])
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "logit(' Mary') - logit(' John')" in out
    numbers = json.loads((tmp_path / "a.json").read_text())
    logits = model(model.to_tokens(CLEAN))[0, -1].detach()
    mary, john = (model.to_tokens(t, prepend_bos=False)[0, 0] for t in (" Mary", " John"))
    assert numbers["logit"] == pytest.approx(float(logits[mary] - logits[john]), abs=1e-5)
    assert sum(numbers["attrs"]) + numbers["constant"] == pytest.approx(numbers["logit"], abs=1e-4)
    assert any(lbl == "L1H3" for lbl in numbers["labels"]) == heads
    _report(tmp_path / "rep")


def test_attribute_command_rejects_a_multi_token_answer(tiny_lm, capsys):
    _, path, _ = tiny_lm
    assert main(["attribute", path, CLEAN, "--answer", " Mary and John"]) == 1
    assert "not one" in capsys.readouterr().err


@pytest.mark.parametrize("what", ["resid", "heads", "mlp"])
def test_patch_command(tiny_lm, tmp_path, capsys, what):
    from workbench.analysis import patching as P

    model, path, _ = tiny_lm
    assert main(["patch", path, CLEAN, CORRUPT, "--answer", " Mary", "--wrong", " John", "--what", what,
                 "--json", str(tmp_path / "p.json"), "--report", str(tmp_path / "rep")]) == 0
    assert "fraction of the difference restored" in capsys.readouterr().out
    numbers = json.loads((tmp_path / "p.json").read_text())
    clean, corrupt = model.to_tokens(CLEAN), model.to_tokens(CORRUPT)
    mary, john = (int(model.to_tokens(t, prepend_bos=False)[0, 0]) for t in (" Mary", " John"))
    metric = P.LogitDiff(mary, john)
    assert numbers["clean"] == pytest.approx(float(metric(model(clean)[:, -1].detach())), abs=1e-5)
    assert numbers["corrupt"] == pytest.approx(float(metric(model(corrupt)[:, -1].detach())), abs=1e-5)
    cols = model.cfg.n_heads if what == "heads" else clean.shape[1]
    assert torch.tensor(numbers["scores"]).shape == (model.cfg.n_layers, cols)
    if what == "resid":  # the prompts differ at one position: at layer 0 patching it is the clean run,
        diff = int((clean[0] != corrupt[0]).nonzero())  # patching any other position changes nothing
        row = torch.tensor(numbers["scores"][0])
        assert row[diff].item() == pytest.approx(numbers["clean"], abs=1e-5)
        torch.testing.assert_close(row[torch.arange(len(row)) != diff], torch.full((len(row) - 1,), numbers["corrupt"]))
    _report(tmp_path / "rep")


def test_tuned_lens_train_and_eval_commands(tiny_lm, tmp_path, capsys):
    _, path, d = tiny_lm
    corpus = str(d / "corpus.txt")
    assert main(["tuned-lens", "train", path, "--corpus", corpus, "--out", str(tmp_path / "lens"), "--n-ctx", "16",
                 "--windows", "24", "--held-out", "8", "--steps", "20", "--lr", "1e-2", "--batch-size", "4",
                 "--json", str(tmp_path / "t.json"), "--report", str(tmp_path / "rep")]) == 0
    trained = json.loads((tmp_path / "t.json").read_text())
    assert all(t <= lg + 1e-6 for t, lg in zip(trained["tuned_kl"], trained["logit_kl"]))
    assert (tmp_path / "lens" / "tuned_lens.safetensors").is_file()
    assert main(["tuned-lens", "eval", path, str(tmp_path / "lens"), "--corpus", corpus, "--n-ctx", "16",
                 "--skip", "24", "--held-out", "8", "--json", str(tmp_path / "e.json")]) == 0
    evaluated = json.loads((tmp_path / "e.json").read_text())
    torch.testing.assert_close(torch.tensor(evaluated["tuned_kl"]), torch.tensor(trained["tuned_kl"]))
    assert main(["lens", path, CLEAN, "--tuned", str(tmp_path / "lens")]) == 0
    assert "tuned lens at position" in capsys.readouterr().out
    assert _report(tmp_path / "rep")["layers"] == ["0", "1"]


def _script(name: str):
    """Import one of the analyses/ scripts as a module."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "analyses" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"analyses_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_induction_script_on_a_tiny_model(tiny_lm, tmp_path):
    from workbench.analysis import induction as I

    model, path, _ = tiny_lm
    numbers = _script("induction_heads").main(["--models", path, str(tmp_path / "nothing-here"), "--seq-len", "6",
                                               "--batch", "3", "--out", str(tmp_path / "rep")])
    got = numbers["models"][path]
    seq = I.repeated_random_tokens(I.default_spec(model, seq_len=6, batch=3), model.cfg.d_vocab)
    torch.testing.assert_close(torch.as_tensor(got["induction"]), I.score_heads(model, seq.tokens).induction)
    assert got["composition_head"].startswith("L1H") and len(got["causal_k_drop"]) == 4  # the 4 heads of layer 0
    assert numbers["skipped"] == [str(tmp_path / "nothing-here")]
    assert json.loads((tmp_path / "rep" / "report.json").read_text())["models"][path]["n_layers"] == 2


def test_attribution_patching_script_on_a_tiny_model(tiny_lm, tmp_path):
    model, path, _ = tiny_lm
    numbers = _script("attribution_patching").main(["--model", path, "--out", str(tmp_path / "rep")])
    attr, patch = numbers["attribution"], numbers["patching"]
    assert attr["abs_error"] < 1e-4
    assert patch["whole_residual_restore_max_abs_error"] < 1e-4
    resid = torch.as_tensor(patch["resid_pre"]["normalized"])
    assert resid.shape == (2, model.to_tokens(CLEAN).shape[1])
    assert (tmp_path / "rep" / "report.html").is_file()


def test_attribution_graphs_script_on_kjv_small_with_a_feature_budget(tmp_path):
    """The issue-16 analysis runs end to end on the shipped kjv-small set; --max-features caps every graph."""
    assert _script("attribution_graphs").main(["--models", "kjv-small", "--max-features", "150", "--ablate", "8",
                                               "--out", str(tmp_path / "rep")]) == 0
    numbers = json.loads((tmp_path / "rep" / "report.json").read_text())
    result = numbers["models"]["kjv-small"]
    graphs = result["graphs"]
    assert len(graphs) == 20 and result["summary"]["prompts"] == 20
    assert all(1 <= g["features"] <= 150 and g["feature+error nodes"] >= g["kept"] >= 1 for g in graphs)
    assert any(g["features"] == 150 for g in graphs)  # the budget bound (kjv-small's graphs have ~900 features)
    s = result["summary"]
    assert 0 < s["replacement"] <= 1 and 0 < s["completeness"] <= 1 and 0 <= s["completeness_drop"] <= 1, s
    assert s["reduction"] >= 1 and -1 <= s["spearman_pooled"] <= 1, s
