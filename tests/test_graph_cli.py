"""`workbench graph`: the numbers it prints and writes are the library's; bad inputs are one-line errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from workbench.analysis import graph as G
from workbench.cli import main
from workbench.sae.io import save_sae
from workbench.sae.model import SAE, SAEConfig
from workbench.zoo import load_model

PROMPT = "And God said, Let there be"


def _save_set(out, model_name: str, layers=range(4), d: int = 128):
    for layer in layers:
        tc = SAE(SAEConfig(d_in=d, d_sae=64, architecture="topk", k=4, apply_b_dec_to_input=False, d_out=d), seed=layer)
        save_sae(tc, out / f"layer_{layer}" / "transcoder", metadata={"model_name": model_name})
    return out


@pytest.fixture(scope="module")
def kjv_set(tmp_path_factory):
    return _save_set(tmp_path_factory.mktemp("kjv_tc"), "kjv-small")


def test_graph_command_writes_the_librarys_graph(kjv_set, tmp_path, capsys):
    out, export, numbers = tmp_path / "g.safetensors", tmp_path / "g.json", tmp_path / "n.json"
    rc = main(["graph", "kjv-small", PROMPT, "--transcoders", str(kjv_set), "--out", str(out), "--export", str(export),
               "--json", str(numbers), "--report", str(tmp_path / "report"), "--top", "3"])
    assert rc == 0
    text = capsys.readouterr().out
    model = load_model("kjv-small")
    graph = G.attribute(model, G.load_transcoders(kjv_set), PROMPT)
    pruned = G.prune(graph)
    scores = G.graph_scores(graph)
    assert f"{graph.n_features} active features" in text
    assert f"replacement score {scores.replacement:.3f}" in text and "strongest paths to" in text
    saved = G.AttributionGraph.load(out, model_name="kjv-small")
    torch.testing.assert_close(saved.adjacency, graph.adjacency, atol=1e-5, rtol=0)
    data = json.loads(numbers.read_text())
    assert data["n_nodes_pruned"] == int(pruned.node_mask.sum()) and len(data["paths"]) == 3
    assert data["paths"][0]["strength"] == pytest.approx(G.top_paths(graph, pruned, k=1)[0].strength, rel=1e-4)
    ct = json.loads(export.read_text())
    assert len(ct["links"]) == int(pruned.edge_mask.sum())
    models = pytest.importorskip("circuit_tracer.frontend.graph_models")
    models.Model(**ct)  # circuit-tracer's own schema
    assert (tmp_path / "report" / "report.html").stat().st_size > 1000


def test_graph_command_bad_inputs(kjv_set, tmp_path, capsys):
    def error(*argv) -> str:
        assert main(["graph", "kjv-small", *argv]) == 1
        return capsys.readouterr().err

    for flag, bad in (("--edge-threshold", "1.5"), ("--node-threshold", "0"), ("--node-threshold", "nan")):
        msg = error(PROMPT, "--transcoders", str(kjv_set), flag, bad)
        assert flag in msg and "(0, 1]" in msg or "finite" in msg, msg
    assert "no such directory and no shipped set" in error(PROMPT, "--transcoders", str(tmp_path / "nowhere"))
    assert "not one" in error(PROMPT, "--transcoders", str(kjv_set), "--target", " the Lord")
    assert "prompt is empty" in error("", "--transcoders", str(kjv_set))
    assert "exceed the model's context" in error("And " * 200, "--transcoders", str(kjv_set))
    partial = _save_set(tmp_path / "partial", "kjv-small", layers=(0, 1, 3))
    assert "no transcoder for layer(s) [2]" in error(PROMPT, "--transcoders", str(partial))
    other = _save_set(tmp_path / "other", "smollm2-135m")
    assert "trained on 'smollm2-135m', not 'kjv-small'" in error(PROMPT, "--transcoders", str(other))
    narrow = _save_set(tmp_path / "narrow", "", d=32)
    assert "was it trained for another model" in error(PROMPT, "--transcoders", str(narrow))
    assert not list(tmp_path.glob("*.safetensors"))  # nothing half-written


# -- one writer per output file; a killed writer leaves the old file, never half of a new one --

ROOT = Path(__file__).resolve().parents[1]

# holds the lock `workbench graph --out DIR/NAME` takes (DIR/.NAME.lock) until killed
_HOLDER = textwrap.dedent("""
    import sys, time
    from workbench.locking import output_lock
    with output_lock(sys.argv[1], sys.argv[2]):
        print("held", flush=True)
        time.sleep(120)
""")

# runs `workbench graph` with a writer that dies (SIGKILL) half-way through writing argv[1]'s kind of output
_KILLED = textwrap.dedent("""
    import os, pathlib, signal, sys
    from workbench.analysis import graph as G
    from workbench.cli import main

    def half_then_die(data: bytes, path) -> None:
        pathlib.Path(path).write_bytes(data[: len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)

    if sys.argv[1] == "out":
        G.save_file = lambda tensors, path, metadata=None: half_then_die(b"x" * 4096, path)
    else:
        pathlib.Path.write_text = lambda self, text, *a, **k: half_then_die(text.encode(), self)
    main(["graph", "kjv-small", sys.argv[3], "--transcoders", sys.argv[4], f"--{sys.argv[1]}", sys.argv[2]])
""")


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def test_a_second_writer_of_the_same_file_is_refused_at_once(kjv_set, tmp_path, capsys):
    out = tmp_path / "g.safetensors"
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(tmp_path), ".g.safetensors.lock"],
                              stdout=subprocess.PIPE, text=True, cwd=ROOT, env=_env())
    try:
        assert holder.stdout.readline().strip() == "held"
        for flag in ("--out", "--export"):
            other = out if flag == "--out" else tmp_path / "g.safetensors"
            assert main(["graph", "kjv-small", PROMPT, "--transcoders", str(kjv_set), flag, str(other)]) == 1
            err = capsys.readouterr().err
            assert f"another process is writing {tmp_path} (pid {holder.pid})" in err, err
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
    # the holder died: its lock file does not block, and another file in the same directory never did
    assert main(["graph", "kjv-small", PROMPT, "--transcoders", str(kjv_set), "--out", str(out),
                 "--export", str(tmp_path / "g.json")]) == 0
    assert G.AttributionGraph.load(out).n_nodes > 0 and json.loads((tmp_path / "g.json").read_text())["nodes"]
    assert not list(tmp_path.glob(".*.lock")) and not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("kind", ["out", "export"])
def test_a_killed_writer_leaves_the_old_file_whole(kjv_set, tmp_path, kind):
    path = tmp_path / ("g.safetensors" if kind == "out" else "g.json")
    assert main(["graph", "kjv-small", PROMPT, "--transcoders", str(kjv_set), f"--{kind}", str(path)]) == 0
    before = path.read_bytes()
    done = subprocess.run([sys.executable, "-c", _KILLED, kind, str(path), "And the LORD spake", str(kjv_set)],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert (tmp_path / f"{path.name}.tmp").exists()  # it died half-way through the temporary file ...
    assert path.read_bytes() == before  # ... and the file under the real name is the old, whole one
    if kind == "out":
        assert G.AttributionGraph.load(path, model_name="kjv-small").n_nodes > 0
    else:
        json.loads(path.read_text())
    # the dead writer's lock does not block the next one, which replaces its leftover temporary file
    argv = ["graph", "kjv-small", "And the LORD spake", "--transcoders", str(kjv_set), f"--{kind}", str(path)]
    assert main(argv) == 0
    assert path.read_bytes() != before and not (tmp_path / f"{path.name}.tmp").exists()
