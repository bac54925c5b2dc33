"""Workflows: a transcoder set trained from live activations (resume, files, bad input), and its command."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from workbench.errors import ConfigError, InputError
from workbench.pipelines import (
    TranscoderRecipe,
    export_circuit_tracer,
    find_transcoder_set,
    load_transcoder_set,
    ship_transcoders,
    train_transcoders,
)
from workbench.sae.circuit_tracer import load_circuit_tracer
from workbench.zoo import load_model

# 6 steps of 2 windows of 16 tokens, 128 latents a layer: seconds, and every code path of a real run
TINY = dict(n_ctx=16, batch_windows=2, tokens=180, expansion=1, k=8, eval_windows=2, checkpoint_every=2,
            dead_tokens=1000)


@pytest.fixture(scope="module")
def kjv():
    return load_model("kjv-small").eval()


@pytest.fixture(scope="module")
def tiny_set(kjv, tmp_path_factory):
    out = tmp_path_factory.mktemp("tc") / "set"
    return train_transcoders(kjv, [0, 1, 2, 3], TranscoderRecipe(**TINY), out, progress=False)


def test_a_set_trains_every_layer_from_one_pass_and_saves_what_it_evaluated(kjv, tiny_set):
    out = tiny_set.out_dir
    record = json.loads((out / "set.json").read_text())
    assert record["layers"] == [0, 1, 2, 3] and record["recipe"]["tokens"] == 180
    assert [ev["layer"] for ev in record["per_layer"]] == [0, 1, 2, 3]
    for layer in range(4):
        lines = (out / f"layer_{layer}" / "metrics.jsonl").read_text().splitlines()
        assert json.loads(lines[-1])["step"] == 6 and json.loads(lines[-1])["tokens"] == 6 * 2 * 15
    loaded = load_transcoder_set(out, model=kjv)
    assert sorted(loaded) == [0, 1, 2, 3]
    for layer, tc in loaded.items():
        assert tc.metadata["hook_name"] == f"blocks.{layer}.mlp.hook_in"
        assert tc.metadata["hook_name_out"] == f"blocks.{layer}.mlp.hook_out"
        assert tc.cfg.skip and tc.cfg.d_out == 128 and tc.cfg.architecture == "batchtopk"
        x = torch.randn(3, 128)
        torch.testing.assert_close(tc(x).x_hat, tiny_set.transcoders[layer].eval()(x).x_hat)
    assert 0 <= tiny_set.whole.top1_agreement <= 1 and tiny_set.whole.n_tokens == 2 * 14


def test_running_again_resumes_a_finished_set_without_training(kjv, tiny_set):
    again = train_transcoders(kjv, [0, 1, 2, 3], TranscoderRecipe(**TINY), tiny_set.out_dir, progress=False)
    assert again.resumed == {layer: 6 for layer in range(4)}
    for layer in range(4):
        torch.testing.assert_close(again.transcoders[layer].W_enc, tiny_set.transcoders[layer].W_enc, atol=0, rtol=0)
    with pytest.raises(ConfigError, match=r"other settings \(k\)"):
        train_transcoders(kjv, [0, 1, 2, 3], TranscoderRecipe(**{**TINY, "k": 4}), tiny_set.out_dir, progress=False)


def test_a_set_recorded_before_adam_beta2_existed_resumes_only_at_the_old_value(kjv, tmp_path):
    """recipe.json files written before the field read as Adam's old 0.999; the new default 0.99 reaches the
    trainer, and a value outside (0, 1) is refused."""
    from workbench.pipelines import transcoder_configs

    old = tmp_path / "old"
    train_transcoders(kjv, [1], TranscoderRecipe(**{**TINY, "adam_beta2": 0.999}), old, progress=False)
    recorded = json.loads((old / "recipe.json").read_text())
    del recorded["adam_beta2"]  # as a set trained before the field existed recorded it
    (old / "recipe.json").write_text(json.dumps(recorded))
    with pytest.raises(ConfigError, match=r"other settings \(adam_beta2\)"):
        train_transcoders(kjv, [1], TranscoderRecipe(**TINY), old, progress=False)
    again = train_transcoders(kjv, [1], TranscoderRecipe(**{**TINY, "adam_beta2": 0.999}), old, progress=False)
    assert again.resumed == {1: 6}
    assert transcoder_configs(TranscoderRecipe(**TINY), 128)[1].adam_betas == (0.9, 0.99)
    with pytest.raises(ConfigError, match="adam_beta2=1.0"):
        TranscoderRecipe(adam_beta2=1.0)


def test_a_set_trained_in_bf16_records_it_and_matches_fp32s_quality_and_a_rerun_may_not_change_it(kjv, tiny_set,
                                                                                                  tmp_path):
    """``precision="bf16"``: the forward passes under bf16 autocast, the latents chosen from a bf16 matmul. The
    recipe, each layer's training settings and the card say so; the weights stay fp32 and the held-out FVU is
    fp32's within noise; a finished set is not rerun at another precision, and a recipe.json written before the
    field existed reads as fp32."""
    from workbench.pipelines import transcoder_card

    out = tmp_path / "bf16"
    low = train_transcoders(kjv, [1, 3], TranscoderRecipe(**{**TINY, "precision": "bf16"}), out, progress=False)
    assert json.loads((out / "recipe.json").read_text())["precision"] == "bf16"
    assert json.loads((out / "layer_1" / "train_config.json").read_text())["train"]["precision"] == "bf16"
    record = json.loads((out / "set.json").read_text())
    assert "(the model under bfloat16 autocast, latents chosen from a bfloat16 encoder matmul)" in transcoder_card(
        record, "cmd")
    exact = {ev.layer: ev for ev in tiny_set.per_layer}
    for ev in low.per_layer:
        assert not torch.equal(low.transcoders[ev.layer].W_dec, tiny_set.transcoders[ev.layer].W_dec)
        assert low.transcoders[ev.layer].W_dec.dtype == torch.float32
        assert ev.fvu == pytest.approx(exact[ev.layer].fvu, rel=0.1)
    with pytest.raises(ConfigError, match=r"other settings \(precision\)"):
        train_transcoders(kjv, [1, 3], TranscoderRecipe(**TINY), out, progress=False)
    recorded = json.loads((tiny_set.out_dir / "recipe.json").read_text())
    del recorded["precision"]  # as a set trained before the field existed recorded it
    old = tmp_path / "old"
    old.mkdir()
    (old / "recipe.json").write_text(json.dumps(recorded))
    with pytest.raises(ConfigError, match=r"other settings \(precision\)"):
        train_transcoders(kjv, [1], TranscoderRecipe(**{**TINY, "precision": "bf16"}), old, progress=False)
    with pytest.raises(ConfigError, match="precision='fp16' is unknown"):
        TranscoderRecipe(**{**TINY, "precision": "fp16"})


def test_thresholds_are_calibrated_on_the_last_training_windows_and_a_rerun_may_change_only_that(kjv, tmp_path):
    """After training, a BatchTopK transcoder's inference threshold is the calibration batch's k*rows-th activation
    (so k latents fire a row there, less the one at the threshold), not the EMA that lags behind the weights.
    ``calibrate_windows`` may change on a finished set: a rerun recalibrates from the checkpoints without
    training, 0 gives back exactly what a set trained without calibration holds, and a recipe.json written
    before the field existed is not refused for it."""
    from workbench.pipelines import token_windows, window_order
    from workbench.sae.transcoders import live_pairs

    one_batch = TranscoderRecipe(**{**TINY, "calibrate_windows": 2})
    out = tmp_path / "set"
    trained = train_transcoders(kjv, [1], one_batch, out, progress=False)
    n_train = one_batch.steps_per_epoch() * one_batch.batch_windows
    windows = token_windows(kjv, one_batch.corpus, one_batch.n_ctx, n_train + one_batch.eval_windows)
    last = windows[:n_train][window_order(one_batch, n_train)][-2:]
    x = next(live_pairs(kjv, last, [1], 2, one_batch.first_position))[1].x
    tc = load_transcoder_set(out, model=kjv)[1]
    assert torch.all(tc.threshold == tc.threshold[0])  # one global value
    fired = int((tc.encode(x) > 0).sum())
    assert fired == one_batch.k * x.shape[0] - 1, fired  # the k*rows-th activation itself sits at the threshold
    record = json.loads((out / "set.json").read_text())
    calibrated = record["thresholds"]["1"]["calibrated"]
    assert calibrated == pytest.approx(float(trained.transcoders[1].threshold[0]))
    assert record["thresholds"]["1"]["training"] != pytest.approx(calibrated)

    # the EMA back, from the checkpoint, without training: equal to a set never calibrated
    again = train_transcoders(kjv, [1], TranscoderRecipe(**{**TINY, "calibrate_windows": 0}), out, progress=False)
    assert again.resumed == {1: 6}
    never = train_transcoders(kjv, [1], TranscoderRecipe(**{**TINY, "calibrate_windows": 0}), tmp_path / "never",
                              progress=False)
    torch.testing.assert_close(again.transcoders[1].threshold, never.transcoders[1].threshold, atol=0, rtol=0)
    assert json.loads((out / "recipe.json").read_text())["calibrate_windows"] == 0
    assert json.loads((out / "set.json").read_text())["thresholds"] == {}

    recorded = json.loads((out / "recipe.json").read_text())
    del recorded["calibrate_windows"]  # as a set trained before the field existed recorded it
    (out / "recipe.json").write_text(json.dumps(recorded))
    third = train_transcoders(kjv, [1], one_batch, out, progress=False)  # recalibrated, the same value again
    assert third.resumed == {1: 6} and float(third.transcoders[1].threshold[0]) == pytest.approx(calibrated)
    with pytest.raises(ConfigError, match="calibrate_windows=1 must be 0"):
        TranscoderRecipe(**{**TINY, "calibrate_windows": 1})


def test_a_kl_fine_tune_changes_only_its_layers_and_a_rerun_without_it_gives_back_the_trained_set(kjv, tmp_path):
    """``kl_steps`` fine-tunes the ``kl_layers`` transcoders after training (recorded in set.json and the card);
    the other layers are bit for bit those of a set trained without it. The fine-tune's fields may change on a
    finished set: a rerun at 0 gives back the trained weights from the checkpoints, without training, and the
    same rerun resumes the fine-tune's finished checkpoint. Layers it does not train are refused up front."""
    from workbench.pipelines import transcoder_card

    tuned_recipe = TranscoderRecipe(**{**TINY, "kl_steps": 4, "kl_windows": 2, "kl_layers": "1", "kl_lr": 1e-3})
    out = tmp_path / "set"
    tuned = train_transcoders(kjv, [1, 2], tuned_recipe, out, progress=False)
    plain = train_transcoders(kjv, [1, 2], TranscoderRecipe(**TINY), tmp_path / "plain", progress=False)
    torch.testing.assert_close(tuned.transcoders[2].W_dec, plain.transcoders[2].W_dec, atol=0, rtol=0)
    assert not torch.equal(tuned.transcoders[1].W_dec, plain.transcoders[1].W_dec)
    record = json.loads((out / "set.json").read_text())
    assert record["finetune"]["layers"] == [1] and record["finetune"]["resumed_from"] is None
    assert [h["step"] for h in record["finetune"]["history"]["1"]] == [0, 3]
    assert "Then layers 1 fine-tuned 4 steps of 2 windows" in transcoder_card(record, "cmd")
    for name in ("W_dec", "W_enc", "W_skip"):
        torch.testing.assert_close(getattr(load_transcoder_set(out, model=kjv)[1], name),
                                   getattr(tuned.transcoders[1], name), atol=0, rtol=0)

    again = train_transcoders(kjv, [1, 2], tuned_recipe, out, progress=False)  # the finished fine-tune is resumed
    assert json.loads((out / "set.json").read_text())["finetune"]["resumed_from"] == 4
    torch.testing.assert_close(again.transcoders[1].W_dec, tuned.transcoders[1].W_dec, atol=0, rtol=0)
    back = train_transcoders(kjv, [1, 2], TranscoderRecipe(**TINY), out, progress=False)
    assert back.resumed == {1: 6, 2: 6} and json.loads((out / "set.json").read_text())["finetune"] is None
    for layer in (1, 2):
        torch.testing.assert_close(back.transcoders[layer].W_dec, plain.transcoders[layer].W_dec, atol=0, rtol=0)

    # the joint fine-tune follows the per-layer one (resumed here from its finished checkpoint) and moves every layer
    joint = train_transcoders(kjv, [1, 2], dataclasses.replace(tuned_recipe, kl_joint_steps=2), out, progress=False)
    record = json.loads((out / "set.json").read_text())
    assert record["finetune"]["resumed_from"] == 4 and record["finetune_joint"]["layers"] == [1, 2]
    assert record["finetune_joint"]["resumed_from"] is None and (out / "finetune_joint" / "state.pt").exists()
    for layer in (1, 2):
        assert not torch.equal(joint.transcoders[layer].W_dec, tuned.transcoders[layer].W_dec)
    assert "Then every layer's transcoder fine-tuned together 2 steps of 2 windows" in transcoder_card(record, "cmd")
    # the fine-tunes' precision may change on a finished set too: both stages start over, the model under bf16
    bf16 = train_transcoders(kjv, [1, 2], dataclasses.replace(tuned_recipe, kl_joint_steps=2, kl_precision="bf16"),
                             out, progress=False)
    record = json.loads((out / "set.json").read_text())
    assert record["finetune"]["resumed_from"] is None and record["finetune_joint"]["resumed_from"] is None
    assert json.loads((out / "recipe.json").read_text())["kl_precision"] == "bf16"
    assert "Adam lr 0.001; the model under bfloat16 autocast" in transcoder_card(record, "cmd")
    for layer in (1, 2):
        assert not torch.equal(bf16.transcoders[layer].W_dec, joint.transcoders[layer].W_dec)
    # a layer's own step count (LAYER:STEPS in kl_layers), recorded and on the card
    train_transcoders(kjv, [1, 2], dataclasses.replace(tuned_recipe, kl_layers="1:6,2"), out, progress=False)
    record = json.loads((out / "set.json").read_text())
    assert record["finetune"]["steps"] == {"1": 6, "2": 4} and record["finetune_joint"] is None
    assert "Then layers 1, 2 fine-tuned 4 steps of 2 windows (1: 6 steps) on" in transcoder_card(record, "cmd")

    with pytest.raises(ConfigError, match=r"names layers \[3\] this run does not train"):
        train_transcoders(kjv, [1, 2], TranscoderRecipe(**{**TINY, "kl_steps": 2, "kl_layers": "1,3"}),
                          tmp_path / "bad", progress=False)
    assert not (tmp_path / "bad").exists()
    with pytest.raises(ConfigError, match="calibrate_windows >= batch_windows"):
        TranscoderRecipe(**{**TINY, "kl_steps": 2, "calibrate_windows": 0})
    with pytest.raises(ConfigError, match="kl_lr"):
        TranscoderRecipe(**{**TINY, "kl_steps": 2, "kl_lr": 0.0})
    with pytest.raises(ConfigError, match=r"kl_joint_steps\) moves BatchTopK"):
        TranscoderRecipe(**{**TINY, "kl_joint_steps": 2, "calibrate_windows": 0})
    with pytest.raises(ConfigError, match=r"'1:x' is not LAYER or LAYER:STEPS"):
        train_transcoders(kjv, [1, 2], TranscoderRecipe(**{**TINY, "kl_steps": 2, "kl_layers": "1:x"}),
                          tmp_path / "bad", progress=False)
    with pytest.raises(ConfigError, match="kl_steps=0 turns the per-layer fine-tune off"):
        TranscoderRecipe(**{**TINY, "kl_layers": "1:4"})
    with pytest.raises(ConfigError, match="kl_precision='fp16' is unknown"):
        TranscoderRecipe(**{**TINY, "kl_precision": "fp16"})


def test_export_and_ship(kjv, tiny_set, tmp_path, monkeypatch):
    ct = export_circuit_tracer(tiny_set.out_dir, tmp_path / "ct")
    theirs, config = load_circuit_tracer(ct)
    assert config["model_name"] == "kjv-small" and len(theirs) == 4
    x = torch.randn(5, 128)
    for layer, tc in enumerate(theirs):  # batchtopk exported as JumpReLU with its threshold: the same function
        torch.testing.assert_close(tc(x).x_hat, tiny_set.transcoders[layer](x).x_hat, atol=1e-6, rtol=0)
    import workbench.pipelines as P

    monkeypatch.setattr(P, "SHIPPED_TRANSCODERS", tmp_path / "data")
    shipped = ship_transcoders(tiny_set.out_dir, "kjv-small", "workbench train-transcoders kjv-small")
    assert not list(shipped.rglob("state.pt")) and (shipped / "card.md").exists()
    assert "workbench train-transcoders kjv-small" in (shipped / "card.md").read_text()
    assert find_transcoder_set("kjv-small") == shipped
    assert sorted(load_transcoder_set("kjv-small", model=kjv)) == [0, 1, 2, 3]
    with pytest.raises(InputError, match="neither a directory nor a transcoder set"):
        load_transcoder_set("no-such-set")


def test_bad_sets_and_models_are_refused_before_anything_is_written(kjv, tiny_set, tmp_path):
    from helpers import tiny_cfg

    from workbench import HookedGPT

    with pytest.raises(ConfigError, match="attention-only"):
        train_transcoders(load_model("attn-only-2l"), [0], TranscoderRecipe(**TINY), tmp_path / "a", progress=False)
    assert not (tmp_path / "a").exists()
    with pytest.raises(InputError, match=r"layers \[7\] do not exist"):
        train_transcoders(kjv, [0, 7], TranscoderRecipe(**TINY), tmp_path / "b", progress=False)
    assert not (tmp_path / "b").exists()
    other = HookedGPT(tiny_cfg(n_layers=4))  # d_model 32: the set's 128 -> 128 transcoders do not fit
    with pytest.raises(InputError, match="another model"):
        load_transcoder_set(tiny_set.out_dir, model=other)
    with pytest.raises(InputError, match="holds no transcoders"):
        load_transcoder_set(tmp_path)
    partial = tmp_path / "partial"
    for layer in (1, 2):
        (partial / f"layer_{layer}").mkdir(parents=True)
        (partial / f"layer_{layer}" / "transcoder").symlink_to(tiny_set.out_dir / f"layer_{layer}" / "transcoder")
    with pytest.raises(InputError, match=r"every layer from 0; this set has layers \[1, 2\]"):
        export_circuit_tracer(partial, tmp_path / "ct")
    assert not (tmp_path / "ct").exists()


_RUN = textwrap.dedent("""
    import sys, time, torch
    torch.set_num_threads(1)
    import workbench.pipelines as P
    from workbench.zoo import load_model

    slow = sys.argv[2] == "slow"
    real = P.mixed_live_pairs

    def paced(*args, **kwargs):  # the same batches, slowly, so the parent can kill the run between checkpoints
        for batch in real(*args, **kwargs):
            if slow:
                time.sleep(0.4)
            yield batch

    P.mixed_live_pairs = paced
    recipe = P.TranscoderRecipe(**%r)
    P.train_transcoders(load_model("kjv-small").eval(), [1, 3], recipe, sys.argv[1], progress=False)
""")


@pytest.mark.slow
def test_a_run_killed_mid_way_resumes_to_the_weights_of_an_unbroken_run(tmp_path):
    recipe = {**TINY, "tokens": 2 * 15 * 10, "checkpoint_every": 3}  # 10 steps, checkpoints at 3, 6, 9
    script = tmp_path / "run.py"
    script.write_text(_RUN % recipe)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}

    def run(out: Path, mode: str) -> None:
        subprocess.run([sys.executable, str(script), str(out), mode], check=True, env=env, timeout=600)

    run(tmp_path / "whole", "fast")
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(script), str(killed), "slow"], env=env)
    try:
        deadline = time.monotonic() + 300
        while not (killed / "layer_3" / "checkpoint" / "state.pt").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before its first checkpoint"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (killed / "set.json").exists()  # killed mid-way: nothing final was written
    run(killed, "fast")
    record = json.loads((killed / "set.json").read_text())
    assert set(record["fresh_layers"]) < {1, 3}  # at least one layer resumed from its checkpoint
    for layer in (1, 3):
        a = load_file(str(tmp_path / "whole" / f"layer_{layer}" / "transcoder" / "sae_weights.safetensors"))
        b = load_file(str(killed / f"layer_{layer}" / "transcoder" / "sae_weights.safetensors"))
        assert a.keys() == b.keys()
        for name in a:
            torch.testing.assert_close(b[name], a[name], atol=0, rtol=0)


def test_the_command_takes_its_flags_from_the_recipe(kjv, tmp_path, capsys):
    from workbench.cli import build_parser, main
    from workbench.commands.transcoders import reproduce_command

    args = build_parser().parse_args(["train-transcoders", "kjv-small", "--k", "16", "--no-skip", "--lr", "0.001"])
    assert (args.k, args.skip, args.lr, args.tokens) == (16, False, 0.001, TranscoderRecipe.tokens)
    assert reproduce_command("kjv-small", "all", TranscoderRecipe(k=16, skip=False)) == (
        "workbench train-transcoders kjv-small --layers all --k 16 --no-skip")
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    code = main(["train-transcoders", "kjv-small", "--layers", "0,2", "--out", str(tmp_path / "s"), "--no-progress",
                 *flags])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert [ev["layer"] for ev in summary["per_layer"]] == [0, 2]
    assert main(["train-transcoders", "attn-only-1l", "--out", str(tmp_path / "t"), *flags]) == 1
    assert "attention-only" in capsys.readouterr().err and not (tmp_path / "t").exists()
    assert main(["train-transcoders", "kjv-small", "--layers", "0,2", "--export-circuit-tracer", str(tmp_path / "c"),
                 *flags]) == 1
    assert "--layers all" in capsys.readouterr().err


def test_the_shipped_sets_card_command_rebuilds_the_recipe_it_was_trained_with():
    """The recipe's defaults have changed since kjv-small's set was trained; its card's command must still name
    every value that set was trained with (a recipe.json written before a field existed reads as
    RECIPE_BEFORE_FIELD)."""
    import shlex

    from workbench.cli import build_parser
    from workbench.commands.transcoders import RECIPE_FLAGS
    from workbench.pipelines import RECIPE_BEFORE_FIELD, SHIPPED_TRANSCODERS

    shipped = SHIPPED_TRANSCODERS / "kjv-small"
    card = (shipped / "card.md").read_text()
    line = next(line for line in card.splitlines() if line.startswith("workbench train-transcoders"))
    rebuilt = dataclasses.asdict(RECIPE_FLAGS.build(build_parser().parse_args(shlex.split(line)[1:])))
    defaults = dataclasses.asdict(TranscoderRecipe())  # a field added since: its default, unless named below
    recorded = {**defaults, **RECIPE_BEFORE_FIELD, **json.loads((shipped / "set.json").read_text())["recipe"]}
    assert rebuilt == recorded


# --------------------------------------------------------------------------------- the SAE pipeline (issue 14)


def test_cache_corpus_then_train_sae_on_store_writes_one_metadata_and_resumes(tmp_path, monkeypatch):
    """corpus -> store -> SAE through the library: the SAE's metadata comes from sae_metadata alone, and the same
    call again resumes the finished run instead of training anew."""
    from workbench.pipelines import SAERecipe, cache_corpus, sae_metadata, train_sae_on_store
    from workbench.sae.io import load_sae
    from workbench.sae.train import SAETrainConfig
    from workbench.store import ReaderConfig, StoreConfig

    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path / "home"))
    hook = "blocks.1.hook_resid_post"
    cached = cache_corpus("kjv-small", "kjv", tmp_path / "store", StoreConfig(hooks=(hook,), first_position=1),
                          tokens=500, n_ctx=32)
    assert cached.written.n_rows == cached.store.n_rows == 17 * 31 and cached.store.manifest.model.name == "kjv-small"
    recipe, train_cfg = SAERecipe(d_sae=64, k=4), SAETrainConfig(total_steps=3, checkpoint_every=3, progress=False)
    run = train_sae_on_store(cached.store, None, recipe, train_cfg, reader=ReaderConfig(batch_size=64, seed=0))
    assert run.run_dir == tmp_path / "home" / "runs" / f"sae-kjv-small-{hook}-topk-64"
    assert run.sae_dir == run.run_dir / "sae"
    sae = load_sae(run.sae_dir)
    expected = sae_metadata("kjv-small", hook, dataset=str(tmp_path / "store"), context_size=32,
                            activation_store=tmp_path / "store")
    assert expected == {"model_name": "kjv-small", "hook_name": hook, "hook_layer": 1, "context_size": 32,
                        "dataset_path": str(tmp_path / "store"),
                        "activation_store": str((tmp_path / "store").resolve())}
    assert {k: sae.metadata[k] for k in expected} == expected and sae.metadata["trained_with"] == "interp-workbench"
    assert sae.cfg.d_sae == 64 and sae.cfg.k == 4 and run.train.steps == 3 and run.train.resumed_from is None
    cached.store.check_sae(sae, hook)  # what the store compares agrees with what was written
    again = train_sae_on_store(tmp_path / "store", hook, recipe, train_cfg, run.run_dir,
                               reader=ReaderConfig(batch_size=64, seed=0))
    assert again.train.resumed_from == 3 and torch.equal(load_sae(again.sae_dir).W_dec, sae.W_dec)


def test_transcoder_metadata_is_an_sae_metadata_plus_its_output_hook(kjv):
    from workbench.pipelines import sae_metadata, transcoder_metadata

    meta = transcoder_metadata(kjv, 2, TranscoderRecipe(**TINY))
    assert meta == {**sae_metadata("kjv-small", "blocks.2.mlp.hook_in", dataset="kjv", context_size=16,
                                   prepend_bos=True), "hook_name_out": "blocks.2.mlp.hook_out"}
    assert meta["hook_layer"] == 2 and "activation_store" not in meta


def test_train_sae_on_store_refuses_an_ambiguous_hook_and_an_sae_too_big_for_memory(tmp_path, monkeypatch):
    from workbench import pipelines
    from workbench.model import GPTConfig, HookedGPT
    from workbench.pipelines import SAERecipe, cache_windows, train_sae_on_store
    from workbench.sae.train import SAETrainConfig
    from workbench.store import StoreConfig

    model = HookedGPT(GPTConfig(d_model=8, n_layers=1, n_heads=2, d_mlp=16, d_vocab=20, n_ctx=8)).eval()
    hooks = ("blocks.0.hook_resid_pre", "blocks.0.hook_resid_post")
    store = cache_windows(model, torch.randint(0, 20, (4, 8)), tmp_path / "s", StoreConfig(hooks=hooks)).store
    train_cfg = SAETrainConfig(total_steps=1, progress=False)
    with pytest.raises(ConfigError, match=r"holds hooks \['blocks.0.hook_resid_pre', 'blocks.0.hook_resid_post'\]; "
                                          "choose one with --hook"):
        train_sae_on_store(store, None, SAERecipe(), train_cfg, tmp_path / "run")
    monkeypatch.setattr(pipelines, "available_memory", lambda: 2**20)
    with pytest.raises(ConfigError, match="--d-sae 8192 with d_in 8 needs about 0.0 GiB to train but 0.0 GiB"):
        train_sae_on_store(store, hooks[1], SAERecipe(d_sae=8192), train_cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()  # refused before anything was written
