"""Process-group set-up: no-ops alone, backend by device, reuse of a joined group, clear errors; the live
transcoder trainer under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from workbench import distributed
from workbench.distributed import (
    DistInfo,
    barrier,
    destroy_distributed,
    dist_info,
    init_distributed,
    local_device,
)
from workbench.errors import ConfigError
from workbench.pipelines import TranscoderRecipe, train_transcoders
from workbench.zoo import load_model

TORCHRUN_ENV = {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999"}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """Tests start as a plain single process, whatever launched pytest."""
    for name in TORCHRUN_ENV:
        monkeypatch.delenv(name, raising=False)
    assert not dist.is_initialized()
    yield
    destroy_distributed()


class _Joined(Exception):
    pass


@pytest.fixture
def record_init(monkeypatch):
    """Replace the process-group join by a recorder that stops before any rendezvous."""
    calls: list[tuple[str, object]] = []

    def init_process_group(backend, *args, **kwargs):
        calls.append(("init", backend))
        raise _Joined

    monkeypatch.setattr(dist, "init_process_group", init_process_group)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", torch.device(d))))
    return calls


@pytest.mark.parametrize("world", [None, "1"])
def test_single_process_is_rank_0_of_1_and_joins_nothing(monkeypatch, record_init, world):
    if world is not None:
        monkeypatch.setenv("WORLD_SIZE", world)
    assert init_distributed("cpu") == DistInfo(0, 1)
    assert init_distributed("cuda") == DistInfo(0, 1)  # no CUDA needed: nothing is set up
    assert dist_info() == (0, 1)
    barrier()
    destroy_distributed()
    assert record_init == [] and not dist.is_initialized()


@pytest.mark.parametrize(
    ("device", "expected"),
    [
        ("cpu", [("init", "gloo")]),
        ("cuda", [("set_device", torch.device("cuda", 1)), ("init", "nccl")]),  # LOCAL_RANK=1
        ("cuda:0", [("set_device", torch.device("cuda", 0)), ("init", "nccl")]),
        ("meta", [("init", "gloo")]),
    ],
)
def test_backend_follows_the_device_not_cuda_availability(monkeypatch, record_init, device, expected):
    for name, value in TORCHRUN_ENV.items():
        monkeypatch.setenv(name, value)
    # A GPU machine running on the CPU must still get gloo (nccl cannot reduce CPU tensors).
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(_Joined):
        init_distributed(device)
    assert record_init == expected


def test_local_device_gives_each_rank_its_own_gpu(monkeypatch):
    assert local_device("cuda") == torch.device("cuda")
    assert local_device("cpu") == torch.device("cpu")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert local_device("cuda") == torch.device("cuda", 3)
    assert local_device(torch.device("cuda", 1)) == torch.device("cuda", 1)  # an explicit index wins
    assert local_device("cpu") == torch.device("cpu")


def test_a_joined_group_is_reused(monkeypatch, tmp_path):
    # A real one-process gloo group, joined by the caller before the launcher's env says 2.
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    joins = []
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: joins.append(a))
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert init_distributed("cpu") == DistInfo(0, 1)  # the group's own size, not the env's
    assert init_distributed("cpu") == DistInfo(0, 1)
    assert joins == []
    barrier()  # a real barrier of one rank returns
    destroy_distributed()
    assert not dist.is_initialized()
    destroy_distributed()  # twice is harmless


def test_torchrun_env_without_rendezvous_names_what_is_missing(monkeypatch, record_init):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ConfigError, match=r"WORLD_SIZE=2 .*MASTER_ADDR, MASTER_PORT are not set.*torchrun"):
        init_distributed("cpu")
    assert record_init == [] and not dist.is_initialized()


def test_torchrun_env_with_no_group_joined_is_an_error_not_rank_0_of_1(monkeypatch):
    for name, value in TORCHRUN_ENV.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=r"WORLD_SIZE=2 but no process group.*init_distributed"):
        dist_info()
    barrier()  # nothing to wait for without a group
    assert distributed.launched_world_size() == 2


@pytest.mark.parametrize("bad", ["two", "0", "-1", ""])
def test_a_malformed_world_size_is_named(monkeypatch, bad):
    monkeypatch.setenv("WORLD_SIZE", bad)
    with pytest.raises(ConfigError, match=f"WORLD_SIZE={bad!r} is not a positive integer"):
        init_distributed("cpu")


def test_torchrun_two_processes_train_the_transcoder_set_one_process_trains(tmp_path):
    """The live all-layers trainer under `torchrun --nproc_per_node 2` (gloo, kjv-small, two layers, TopK so
    the selection is per row): each process reads half of every step's windows, each layer averages its
    gradients over its own group, and the weights, both KL fine-tunes included, equal a one-process run's."""
    repo = Path(__file__).resolve().parent.parent
    # lr 2e-3, not the recipe's 4e-3: the two runs sum in different orders, and at 4e-3 layer 0's decoder came out
    # up to 1.9e-3 apart after the 4 steps (W_enc 2e-5; not traced, most likely a TopK choice flipped by a
    # near-tie). At 2e-3, with the 4 steps' rows mixed as the recipe mixes them, every weight agrees within 4e-6.
    # Then a KL fine-tune of layer 1, two steps of 4 windows: each process splices its 2 windows and the gradients
    # are averaged. Without the FVU term, whose denominator is each process's own variance, it is what one
    # process computes. Then a joint KL fine-tune of both layers, two steps, split and averaged the same way.
    recipe = dict(n_ctx=32, tokens=4 * 4 * 31, batch_windows=4, expansion=2, architecture="topk", k=8, eval_windows=2,
                  checkpoint_every=0, lr=2e-3, kl_steps=2, kl_windows=4, kl_layers="1", kl_lr=1e-3, kl_fvu_weight=0.0,
                  kl_joint_steps=2, kl_joint_lr=1e-3)
    script = tmp_path / "ddp.py"
    script.write_text(textwrap.dedent(f"""
        import json, sys
        from workbench.distributed import init_distributed, dist_info
        from workbench.pipelines import TranscoderRecipe, train_transcoders
        from workbench.zoo import load_model
        init_distributed("cpu")
        model = load_model("kjv-small").eval()
        result = train_transcoders(model, [0, 1], TranscoderRecipe(**{recipe!r}), sys.argv[1], progress=False)
        # one file per rank: two ranks printing at once can share a line of torchrun's output
        with open(sys.argv[1] + f".rank{{dist_info().rank}}.json", "w") as f:
            json.dump({{"rank": dist_info().rank, "world": dist_info().world_size,
                       "ce": [ev.ce_loss_recovered for ev in result.per_layer]}}, f)
    """))
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script), str(tmp_path / "ddp")], cwd=repo, env=env, capture_output=True, text=True,
                         timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"ddp.rank{r}.json").read_text()) for r in (0, 1)]
    assert sorted((r["rank"], r["world"]) for r in ranks) == [(0, 2), (1, 2)]
    assert ranks[0]["ce"] == ranks[1]["ce"]  # every rank evaluates the same weights

    one = train_transcoders(load_model("kjv-small").eval(), [0, 1], TranscoderRecipe(**recipe), tmp_path / "one",
                            progress=False)
    for layer in (0, 1):
        theirs = load_file(str(tmp_path / "ddp" / f"layer_{layer}" / "transcoder" / "sae_weights.safetensors"))
        for name, tensor in one.transcoders[layer].state_dict().items():
            if name in theirs:
                torch.testing.assert_close(theirs[name], tensor.detach(), atol=1e-4, rtol=1e-4, msg=f"{layer} {name}")
    saved = json.loads((tmp_path / "ddp" / "set.json").read_text())
    assert [ev["ce_loss_recovered"] for ev in saved["per_layer"]] == pytest.approx(ranks[0]["ce"])
    assert saved["finetune"]["layers"] == [1] and saved["finetune_joint"]["layers"] == [0, 1]
    assert not list((tmp_path / "ddp").glob("layer_*/transcoder.r*"))  # rank 1 wrote no files of its own


def test_torchrun_runs_the_train_transcoders_command(tmp_path):
    """`torchrun --nproc_per_node 2 -m workbench.cli train-transcoders ...`: the command joins the group,
    both ranks train, rank 0 alone prints the summary and writes the set."""
    repo = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "set"
    argv = ["train-transcoders", "kjv-small", "--layers", "1", "--out", str(out), "--n-ctx", "32",
            "--tokens", str(4 * 4 * 31), "--batch-windows", "4", "--expansion", "2", "--architecture", "topk",
            "--k", "8", "--eval-windows", "2", "--checkpoint-every", "0", "--no-progress"]
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "workbench.cli", *argv], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(run.stdout[run.stdout.index("{"):])  # one summary: rank 1 prints nothing
    assert summary["world_size"] == 2 and summary["out"] == str(out)
    assert [ev["layer"] for ev in summary["per_layer"]] == [1]
    saved = json.loads((out / "set.json").read_text())
    assert [ev["ce_loss_recovered"] for ev in saved["per_layer"]] == pytest.approx(
        [ev["ce_loss_recovered"] for ev in summary["per_layer"]], abs=1e-4)
