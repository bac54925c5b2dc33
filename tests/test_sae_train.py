"""SAE trainer: ground-truth recovery, exact resume, torchrun equivalence, bad batches, metrics."""

from __future__ import annotations

import json
import math
import os
import runpy
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import hold_output_lock

from workbench.analysis.superposition import SyntheticConfig, SyntheticFeatures, mmcs, random_dictionary_mmcs
from workbench.cli import main
from workbench.errors import CheckpointError, ConfigError, DataError, InputError
from workbench.locking import OutputLockedError, output_lock
from workbench.sae.io import load_sae
from workbench.sae.kernels import largest_entries, make_pattern, pattern_of_entries, values_at
from workbench.sae.model import SAE, SAEConfig
from workbench.sae.train import (
    CHECKPOINT_DIR,
    METRICS_FILE,
    TrainConfig,
    _initialise_from_batch,
    compute_losses,
    lr_at,
    topk_forward,
    train_sae,
)
from workbench.train import TrainingDivergedError

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors on shared cores


@pytest.fixture(scope="module")
def synthetic() -> SyntheticFeatures:
    # The benchmark: 64 dims, 128 true features, about 3 active per sample.
    return SyntheticFeatures(SyntheticConfig(d_in=64, n_features=128, mean_active=3.0, seed=0))


def _fit(synthetic: SyntheticFeatures, arch: str, steps: int, **train_kw) -> SAE:
    sae = SAE(SAEConfig(d_in=64, d_sae=256, architecture=arch, k=4), seed=0)
    cfg = TrainConfig(total_steps=steps, lr=3e-3, decay_fraction=0.3, progress=False, checkpoint_every=0,
                      log_every=50, dead_tokens=20_000, **train_kw)
    train_sae(sae, lambda start: synthetic.batches(512, start), cfg)
    return sae


@pytest.mark.parametrize("arch,kw", [("topk", {}), ("relu", {"l1_coefficient": 0.3})])
def test_sae_recovers_ground_truth_features(synthetic, arch, kw):
    sae = _fit(synthetic, arch, 600, **kw)
    score = mmcs(sae.W_dec, synthetic.features)
    baseline = random_dictionary_mmcs(256, synthetic.features)
    assert score >= 0.98, f"{arch} SAE MMCS {score:.4f}"
    assert baseline < 0.6, baseline
    assert mmcs(synthetic.features, synthetic.features) == pytest.approx(1.0)


class _Crash(Exception):
    pass


def _crashing(source, crash_at: int):
    def make(start: int):
        for i, batch in enumerate(source(start)):
            if start + i == crash_at:
                raise _Crash
            yield batch
    return make


@pytest.mark.parametrize("arch", ["topk", "relu"])
def test_killed_run_resumes_to_the_same_sae(tmp_path, arch):
    data = SyntheticFeatures(SyntheticConfig(d_in=16, n_features=32, mean_active=2.0, seed=3))
    source = lambda start: data.batches(64, start)  # noqa: E731
    sae_cfg = SAEConfig(d_in=16, d_sae=64, architecture=arch, k=4, normalize_activations="expected_average_only_in")
    cfg = TrainConfig(total_steps=30, lr=3e-3, warmup_steps=3, checkpoint_every=5, log_every=5, progress=False,
                      dead_tokens=300, resample_every=10 if arch == "relu" else 0)

    unbroken = train_sae(SAE(sae_cfg, seed=0), source, cfg, tmp_path / "a")

    with pytest.raises(_Crash):  # dies at step 13: steps 11-13 are lost, the checkpoint at 10 is not
        train_sae(SAE(sae_cfg, seed=0), _crashing(source, 13), cfg, tmp_path / "b")
    resumed = train_sae(SAE(sae_cfg, seed=99), source, cfg, tmp_path / "b")

    assert resumed.resumed_from == 10 and resumed.steps == 30 and resumed.tokens == unbroken.tokens
    for name, tensor in unbroken.sae.state_dict().items():
        assert torch.equal(tensor, resumed.sae.state_dict()[name]), name
    lines_a = (tmp_path / "a" / METRICS_FILE).read_text().splitlines()
    lines_b = (tmp_path / "b" / METRICS_FILE).read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines_b] == [5, 10, 15, 20, 25, 30]
    drop_timing = lambda line: {k: v for k, v in json.loads(line).items() if k != "tokens_per_s"}  # noqa: E731
    assert list(map(drop_timing, lines_a)) == list(map(drop_timing, lines_b))


def test_sigkilled_training_process_resumes_to_the_same_sae(tmp_path, monkeypatch):
    """A real SIGKILL (the process kills itself while fetching batch 23; the last checkpoint is at
    step 20), plus the debris of a kill during a checkpoint write, then the same command again."""
    script = textwrap.dedent(
        """
        import os, signal, sys, torch
        torch.set_num_threads(1)
        from workbench.analysis.superposition import SyntheticConfig, SyntheticFeatures
        from workbench.sae.model import SAE, SAEConfig
        from workbench.sae.train import TrainConfig, train_sae
        kill_at, out = int(sys.argv[1]), sys.argv[2]
        data = SyntheticFeatures(SyntheticConfig(d_in=16, n_features=32, mean_active=2.0, seed=5))
        def source(start):
            for i, batch in enumerate(data.batches(64, start)):
                if start + i == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                yield batch
        sae = SAE(SAEConfig(d_in=16, d_sae=64, architecture="topk", k=4,
                            normalize_activations="expected_average_only_in"), seed=0)
        sae.metadata = {"model_name": "synthetic", "hook_name": "synthetic"}
        cfg = TrainConfig(total_steps=40, lr=3e-3, warmup_steps=4, checkpoint_every=5, log_every=1,
                          progress=False, dead_tokens=300)
        res = train_sae(sae, source, cfg, out)
        torch.save({"state": sae.state_dict(), "resumed_from": res.resumed_from}, out + "/final.pt")
        """
    )
    (tmp_path / "job.py").write_text(script)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    run = lambda kill_at, out: subprocess.run(  # noqa: E731
        [sys.executable, str(tmp_path / "job.py"), str(kill_at), str(tmp_path / out)],
        env=env, capture_output=True, text=True, timeout=120,
    )
    killed = run(23, "b")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert torch.load(tmp_path / "b" / CHECKPOINT_DIR / "state.pt", weights_only=True)["step"] == 20
    (tmp_path / "b" / CHECKPOINT_DIR / "state.pt.tmp").write_bytes(b"half a checkpoint")  # killed mid-save
    with open(tmp_path / "b" / METRICS_FILE, "a") as f:
        f.write('{"step": 24, "loss"')  # killed mid-line
    assert run(-1, "b").returncode == 0
    monkeypatch.setattr(sys, "argv", ["job.py", "-1", str(tmp_path / "a")])
    runpy.run_path(str(tmp_path / "job.py"), run_name="__main__")  # the unbroken run, in this process
    a, b = (torch.load(tmp_path / d / "final.pt", weights_only=True) for d in "ab")
    assert a["resumed_from"] is None and b["resumed_from"] == 20
    for name, tensor in a["state"].items():
        assert torch.equal(tensor, b["state"][name]), name
    drop_timing = lambda line: {k: v for k, v in json.loads(line).items() if k != "tokens_per_s"}  # noqa: E731
    lines = [list(map(drop_timing, (tmp_path / d / METRICS_FILE).read_text().splitlines())) for d in "ab"]
    assert lines[0] == lines[1] and [m["step"] for m in lines[1]] == list(range(1, 41))


def test_checkpoint_of_another_hook_is_not_resumed(tmp_path):
    data = SyntheticFeatures(SyntheticConfig(d_in=16, n_features=32, seed=1))
    cfg = TrainConfig(total_steps=4, checkpoint_every=2, progress=False)
    sae = SAE(SAEConfig(d_in=16, d_sae=32, architecture="topk", k=4), seed=0)
    sae.metadata = {"model_name": "m", "hook_name": "blocks.0.hook_resid_post"}
    train_sae(sae, lambda s: data.batches(32, s), TrainConfig(total_steps=2, checkpoint_every=2, progress=False),
              tmp_path)
    other = SAE(SAEConfig(d_in=16, d_sae=32, architecture="topk", k=4), seed=0)
    other.metadata = {"model_name": "m", "hook_name": "blocks.1.hook_resid_post"}
    with pytest.raises(CheckpointError, match="hook_name='blocks.0.hook_resid_post'.*--no-resume"):
        train_sae(other, lambda s: data.batches(32, s), cfg, tmp_path)
    assert train_sae(other, lambda s: data.batches(32, s), cfg, tmp_path, resume=False).resumed_from is None


def test_torchrun_two_processes_train_the_same_sae_as_one(tmp_path):
    """`torchrun --nproc_per_node 2` (gloo) with batch 32 each == one process with batch 64."""
    args = ["train-sae", "--synthetic", "--synthetic-d-in", "16", "--synthetic-features", "32",
            "--synthetic-active", "2", "--architecture", "topk", "--k", "4", "--d-sae", "64", "--steps", "12",
            "--batch-size", "64", "--lr", "3e-3", "--dead-tokens", "256", "--checkpoint-every", "0",
            "--no-progress", "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "WORKBENCH_HOME": str(tmp_path / "home")}
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "workbench.cli", *args, "--out", str(tmp_path / "ddp")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=240,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    summary = json.loads(ddp.stdout[ddp.stdout.index("{"):])
    assert summary["world_size"] == 2 and summary["tokens"] == 12 * 64

    assert main([*args, "--out", str(tmp_path / "single")]) == 0
    one, two = load_sae(tmp_path / "single" / "sae"), load_sae(tmp_path / "ddp" / "sae")
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        torch.testing.assert_close(getattr(two, name), getattr(one, name), atol=1e-5, rtol=1e-4, msg=name)
    assert not torch.equal(one.W_dec, SAE(one.cfg, seed=0).W_dec)  # it did train


def test_nan_batch_stops_with_a_clear_error_and_nothing_lost(tmp_path):
    data = SyntheticFeatures(SyntheticConfig(d_in=16, n_features=32, seed=1))

    def poisoned(start: int):
        for i, batch in enumerate(data.batches(32, start)):
            if start + i == 7:
                batch = batch.clone()
                batch[3, 5] = float("nan")
            yield batch

    sae_cfg = SAEConfig(d_in=16, d_sae=32, architecture="topk", k=4)
    cfg = TrainConfig(total_steps=10, checkpoint_every=5, log_every=1, progress=False)
    sae = SAE(sae_cfg, seed=0)
    with pytest.raises(DataError, match="batch 7 holds 1 NaN/Inf"):
        train_sae(sae, poisoned, cfg, tmp_path)
    assert torch.isfinite(sae.W_dec).all()
    state = torch.load(tmp_path / CHECKPOINT_DIR / "state.pt", weights_only=True)
    assert state["step"] == 7  # saved just before the bad batch: steps 6 and 7 were not lost
    # Once the source is repaired, the run continues from step 7 and finishes.
    result = train_sae(SAE(sae_cfg, seed=0), lambda s: data.batches(32, s), cfg, tmp_path)
    assert result.resumed_from == 7 and result.steps == 10


def test_wrong_width_and_exhausted_source_are_clear_errors():
    sae = SAE(SAEConfig(d_in=16, d_sae=32, architecture="relu"), seed=0)
    cfg = TrainConfig(total_steps=3, progress=False)
    with pytest.raises(InputError, match="width 12, but the SAE has d_in=16"):
        train_sae(sae, [torch.randn(8, 12)], cfg)
    with pytest.raises(DataError, match="ran out after 1 of 3 steps"):
        train_sae(sae, [torch.randn(8, 16)], cfg)


@pytest.mark.parametrize("arch", ["jumprelu", "batchtopk"])
def test_other_architectures_train(arch):
    data = SyntheticFeatures(SyntheticConfig(d_in=16, n_features=32, mean_active=2.0, seed=2))
    sae = SAE(SAEConfig(d_in=16, d_sae=64, architecture=arch, k=3), seed=0)
    cfg = TrainConfig(total_steps=150, lr=3e-3, progress=False, log_every=150, l0_coefficient=3e-3)
    result = train_sae(sae, lambda s: data.batches(128, s), cfg)
    assert result.last_metrics["fvu"] < 0.3, result.last_metrics
    if arch == "batchtopk":
        assert result.last_metrics["l0"] == pytest.approx(3.0, abs=0.05)
        assert float(sae.threshold[0]) > 0  # learned the inference threshold
        sae.eval()
        l0_inference = (sae.encode(data.global_batch(10_000, 512)) != 0).sum(-1).float().mean()
        assert 1.5 < l0_inference < 6.0
    else:
        assert (sae.threshold > 0).all()


def test_lr_schedule_warms_up_and_decays():
    cfg = TrainConfig(total_steps=100, lr=1.0, warmup_steps=10, decay_fraction=0.2)
    assert lr_at(cfg, 0) == pytest.approx(0.1)
    assert lr_at(cfg, 50) == 1.0
    assert lr_at(cfg, 80) == 1.0 and lr_at(cfg, 90) == pytest.approx(0.5) and lr_at(cfg, 99) == pytest.approx(0.05)


def test_a_fresh_run_does_not_append_to_an_earlier_runs_metrics(tmp_path):
    data = SyntheticFeatures(SyntheticConfig(d_in=16, n_features=32, mean_active=2.0, seed=3))
    sae_cfg = SAEConfig(d_in=16, d_sae=64, architecture="topk", k=4)
    cfg = TrainConfig(total_steps=10, lr=3e-3, warmup_steps=2, checkpoint_every=5, log_every=5, progress=False)
    for _ in range(2):
        train_sae(SAE(sae_cfg, seed=0), lambda start: data.batches(64, start), cfg, tmp_path, resume=False)
    lines = (tmp_path / METRICS_FILE).read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [5, 10]


# --- issue 13: resume with changed settings, divergence, batches of 0 rows, one writer per --out


def _small_run(tmp_path, **overrides):
    data = SyntheticFeatures(SyntheticConfig(d_in=16, n_features=32, mean_active=2.0, seed=3))
    sae_cfg = SAEConfig(d_in=16, d_sae=32, architecture="topk", k=4)
    kw = dict(total_steps=6, lr=3e-3, checkpoint_every=2, log_every=2, progress=False)
    return data, sae_cfg, kw


@pytest.mark.parametrize("change", [{"lr": 1e-3}, {"seed": 5}, {"total_steps": 8}, {"batch": 48}])
def test_resume_with_changed_settings_is_refused(tmp_path, change):
    data, sae_cfg, kw = _small_run(tmp_path)
    with pytest.raises(_Crash):
        train_sae(SAE(sae_cfg, seed=0), _crashing(lambda s: data.batches(32, s), 3), TrainConfig(**kw), tmp_path)
    saved_config = (tmp_path / "train_config.json").read_text()
    batch = change.pop("batch", 32)
    with pytest.raises(CheckpointError, match="(different training settings|batches of 32 rows).*another output"):
        train_sae(SAE(sae_cfg, seed=0), lambda s: data.batches(batch, s), TrainConfig(**{**kw, **change}), tmp_path)
    assert (tmp_path / "train_config.json").read_text() == saved_config  # not overwritten
    # what only changes the output (log and checkpoint cadence) may change
    done = train_sae(SAE(sae_cfg, seed=0), lambda s: data.batches(32, s),
                     TrainConfig(**{**kw, "log_every": 1, "checkpoint_every": 3}), tmp_path)
    assert done.resumed_from == 2 and done.steps == 6


@pytest.mark.parametrize("scale", [1e20, 1e30])
def test_huge_activations_stop_as_divergence_naming_the_step(tmp_path, scale):
    data, sae_cfg, kw = _small_run(tmp_path)

    def blowing_up(start: int):
        for i, batch in enumerate(data.batches(32, start)):
            yield batch * scale if start + i >= 3 else batch  # finite, but its squares overflow float32

    with pytest.raises(TrainingDivergedError, match=r"at step 4; .*last good checkpoint \(step 2\)"):
        train_sae(SAE(sae_cfg, seed=0), blowing_up, TrainConfig(**kw), tmp_path)
    state = torch.load(tmp_path / CHECKPOINT_DIR / "state.pt", weights_only=True)
    assert state["step"] == 2 and all(torch.isfinite(v).all() for v in state["sae"].values())
    lines = [json.loads(line) for line in (tmp_path / METRICS_FILE).read_text().splitlines()]
    assert all(math.isfinite(m["loss"]) for m in lines)  # no "loss": Infinity logged


def test_a_finite_loss_that_explodes_stops_as_divergence(tmp_path):
    """A transcoder whose inputs grow 10^4-fold from step 3 predicts outputs far off its target's scale: every
    loss stays finite, but the squared error passes EXPLODED_FVU times the target's variance at once."""
    torch.manual_seed(0)
    A = torch.randn(16, 16) / 4
    cfg = SAEConfig(d_in=16, d_sae=32, architecture="topk", k=4, d_out=16, skip=True, apply_b_dec_to_input=False)

    def pairs(start: int):
        for step in range(start, 8):
            x = torch.randn(64, 16, generator=torch.Generator().manual_seed(step))
            yield (x * 1e4 if step >= 3 else x), x @ A

    with pytest.raises(TrainingDivergedError, match=r"more than 1,000 times its target's variance, at step 4"):
        train_sae(SAE(cfg, seed=0), pairs, TrainConfig(total_steps=8, progress=False, checkpoint_every=2), tmp_path)
    lines = [json.loads(line) for line in (tmp_path / METRICS_FILE).read_text().splitlines()]
    assert all(math.isfinite(m["loss"]) for m in lines)
    assert torch.load(tmp_path / CHECKPOINT_DIR / "state.pt", weights_only=True)["step"] == 2


def test_api_batch_of_huge_values_or_zero_rows_raises_instead_of_returning_nan_weights():
    sae = SAE(SAEConfig(d_in=16, d_sae=32, architecture="relu"), seed=0)
    cfg = TrainConfig(total_steps=1, progress=False)
    with pytest.raises(TrainingDivergedError, match="at step 1"):
        train_sae(sae, [torch.randn(8, 16) * 1e30], cfg)
    with pytest.raises(InputError, match="0 rows"):
        train_sae(SAE(sae.cfg, seed=0), [torch.randn(0, 16)], cfg)


def test_two_train_sae_runs_on_one_out_exclude_each_other(tmp_path):
    data, sae_cfg, kw = _small_run(tmp_path)
    with hold_output_lock(tmp_path) as pid:
        with pytest.raises(OutputLockedError, match=rf"another process is writing .* \(pid {pid}\)"):
            train_sae(SAE(sae_cfg, seed=0), lambda s: data.batches(32, s), TrainConfig(**kw), tmp_path)
        assert not (tmp_path / METRICS_FILE).exists() and not (tmp_path / "train_config.json").exists()
    with output_lock(tmp_path):  # the dead holder does not block
        pass


@pytest.mark.parametrize("transcoder", [False, True])
def test_sparse_batchtopk_gives_the_dense_paths_losses_and_gradients(transcoder):
    """BatchTopK through the sparse kernels (any number of latents a row) against the dense [batch, d_sae] step."""
    torch.set_default_dtype(torch.float64)
    try:
        kw = dict(d_out=12, apply_b_dec_to_input=False, skip=True) if transcoder else {}
        sae = SAE(SAEConfig(d_in=16, d_sae=48, architecture="batchtopk", k=4, **kw), seed=0).train()
        with torch.no_grad():
            sae.b_enc.normal_(0, 0.3)  # some rows take many latents, some none
            if transcoder:
                sae.W_skip.normal_(0, 0.1)
        x = torch.randn(32, 16)
        y = torch.randn(32, 12) if transcoder else None
        dead = torch.zeros(48, dtype=torch.bool)
        dead[::3] = True
        results = {}
        for sparse in (True, False):
            sae.zero_grad()
            cfg = TrainConfig(total_steps=1, sparse_batchtopk=sparse)
            losses = compute_losses(sae, x, cfg, 0, dead, target=y)
            losses.loss.backward()
            results[sparse] = (losses, {n: p.grad.clone() for n, p in sae.named_parameters()})
        (sparse_losses, sparse_grads), (dense_losses, dense_grads) = results[True], results[False]
        per_row = (sparse_losses.fired > 0).sum()
        assert 0 < per_row < 48
        for field in ("loss", "mse", "sparsity", "fired", "l0", "min_active"):
            torch.testing.assert_close(getattr(sparse_losses, field).double(), getattr(dense_losses, field).double(),
                                       rtol=1e-10, atol=1e-10, msg=field)
        assert sparse_losses.sparsity > 0  # AuxK took part
        for name in dense_grads:
            torch.testing.assert_close(sparse_grads[name], dense_grads[name], rtol=1e-10, atol=1e-10, msg=name)
    finally:
        torch.set_default_dtype(torch.float32)


def _linear_pairs(n=512, d_in=12, d_out=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    A, c = torch.randn(d_out, d_in, generator=g), torch.randn(d_out, generator=g)
    x = torch.randn(n, d_in, generator=g) * 2 + 1
    return x, x @ A.T + c, A, c


def _skip_tc(d_in=12, d_out=10):
    return SAE(SAEConfig(d_in=d_in, d_sae=32, architecture="batchtopk", k=4, apply_b_dec_to_input=False, d_out=d_out,
                         skip=True), seed=0)


def test_ridge_skip_init_starts_at_the_linear_fit_and_the_latents_at_a_fraction_of_what_it_leaves():
    x, y, A, c = _linear_pairs()
    y = y + 0.3 * torch.randn(y.shape, generator=torch.Generator().manual_seed(1))  # a part no linear map explains
    tc = _skip_tc()
    _initialise_from_batch(tc, x, y, TrainConfig(total_steps=1, skip_init="ridge", latent_init_scale=0.1))
    torch.testing.assert_close(tc.W_skip, A, atol=0.02, rtol=0)
    torch.testing.assert_close(tc.b_dec, c, atol=0.05, rtol=0)
    with torch.no_grad():
        residual = y - tc.b_dec - tc.skip_out(x)
        latent_out = tc.encode(x) @ tc.W_dec
    ratio = latent_out.norm(dim=-1).mean() / residual.norm(dim=-1).mean()
    assert ratio == pytest.approx(0.1, rel=1e-4)
    zero = _skip_tc()
    _initialise_from_batch(zero, x, y, TrainConfig(total_steps=1))  # the default: W_skip 0, b_dec the target mean
    assert zero.W_skip.abs().sum() == 0
    torch.testing.assert_close(zero.b_dec, y.mean(0))


def test_ridge_init_makes_a_linear_map_exact_from_the_first_step_and_skip_lr_scale_sets_w_skips_own_rate():
    x, y, A, c = _linear_pairs()
    tc = _skip_tc()
    cfg = TrainConfig(total_steps=3, lr=1e-3, skip_init="ridge", latent_init_scale=1e-3, progress=False)
    result = train_sae(tc, [(x, y)] * 3, cfg)
    assert result.last_metrics["fvu"] < 1e-4  # a linear target is the skip term's alone
    before = _skip_tc()
    scaled = _skip_tc()
    for sae, scale in ((before, 1.0), (scaled, 10.0)):
        train_sae(sae, [(x, y)], TrainConfig(total_steps=1, lr=1e-3, decay_fraction=0, skip_lr_scale=scale,
                                             progress=False))
    # Adam's first step moves each entry by about the learning rate
    assert float(scaled.W_skip.abs().max()) == pytest.approx(1e-2, rel=1e-3)
    assert float(before.W_skip.abs().max()) == pytest.approx(1e-3, rel=1e-3)


@pytest.mark.parametrize("bad,match", [({"skip_init": "pca"}, "skip_init='pca' is unknown"),
                                       ({"latent_init_scale": 0.0}, "latent_init_scale=0.0"),
                                       ({"skip_lr_scale": float("nan")}, "skip_lr_scale=nan")])
def test_bad_transcoder_init_settings_are_named(bad, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig(total_steps=1, **bad)


def test_largest_entries_is_topk_whether_the_sample_threshold_holds_or_not():
    g = torch.Generator().manual_seed(0)
    flat = torch.randn(1 << 20, generator=g)
    for values in (flat, torch.where(torch.arange(flat.numel()) % 16 == 0, 10 + flat, flat)):  # a misleading sample
        for n_keep in (1000, 100_000):
            want = set(values.topk(n_keep).indices.tolist())
            assert set(largest_entries(values, n_keep).tolist()) == want


def test_values_at_gives_the_dense_pre_activations_at_any_pattern():
    g = torch.Generator().manual_seed(0)
    x, W, b = torch.randn(40, 16, generator=g), torch.randn(16, 48, generator=g), torch.randn(48, generator=g)
    dense = x @ W + b
    indices = torch.randn(40, 48, generator=g).topk(5, dim=-1).indices.sort(-1).values
    torch.testing.assert_close(values_at(x, W, b, make_pattern(indices, 48)), dense.gather(1, indices).reshape(-1))
    flat = torch.randperm(40 * 48, generator=g)[:300].sort().values  # any number a row, some rows none
    torch.testing.assert_close(values_at(x, W, b, pattern_of_entries(flat, 40, 48)), dense.reshape(-1)[flat])


def _entries(out) -> dict[tuple[int, int], float]:
    return dict(zip(zip(out.pattern.rows.tolist(), out.pattern.columns.tolist()), out.values.reshape(-1).tolist()))


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_bf16_selection_chooses_almost_the_same_latents_and_gives_them_their_exact_values(arch):
    """precision='bf16': the active latents come from a bfloat16 matmul, their values are fp32's exactly."""
    tc = SAE(SAEConfig(d_in=32, d_sae=96, architecture=arch, k=6, d_out=24, apply_b_dec_to_input=False, skip=True),
             seed=0).train()
    x = torch.randn(128, 32, generator=torch.Generator().manual_seed(1))
    exact, low = topk_forward(tc, x), topk_forward(tc, x, torch.bfloat16)
    assert low.pre.dtype == torch.bfloat16 and low.values.dtype == torch.float32
    a, b = _entries(exact), _entries(low)
    common = a.keys() & b.keys()
    assert len(common) >= 0.95 * len(a)  # only near-ties within bf16's rounding may be chosen otherwise
    for key in common:
        assert b[key] == pytest.approx(a[key], abs=1e-5)  # computed in fp32, not rounded to bf16
    if low.pattern.batch and len(common) == len(a) == len(b):
        torch.testing.assert_close(low.x_hat_n, exact.x_hat_n)


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_bf16_selection_trains_as_well_as_fp32_and_keeps_every_parameter_fp32(synthetic, arch):
    fits = {precision: _fit(synthetic, arch, 300, precision=precision) for precision in ("fp32", "bf16")}
    x = synthetic.sample(4096, torch.Generator().manual_seed(9))
    fvu = {}
    for precision, sae in fits.items():
        assert all(p.dtype == torch.float32 for p in sae.parameters())
        with torch.no_grad():
            fvu[precision] = float((sae(x).x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    assert fvu["bf16"] < 0.1
    assert fvu["bf16"] == pytest.approx(fvu["fp32"], rel=0.15, abs=0.005)
    assert mmcs(fits["bf16"].W_dec.detach(), synthetic.features) > 0.9


def test_bf16_selection_is_refused_where_a_step_has_no_selection_and_unknown_precisions_are_named():
    with pytest.raises(ConfigError, match="precision='fp16' is unknown"):
        TrainConfig(total_steps=1, precision="fp16")
    x = torch.randn(64, 16)
    for arch, kw in (("relu", {}), ("jumprelu", {}), ("batchtopk", {"sparse_batchtopk": False})):
        sae = SAE(SAEConfig(d_in=16, d_sae=32, architecture=arch, k=4), seed=0)
        with pytest.raises(ConfigError, match="train it with precision='fp32'"):
            train_sae(sae, [x], TrainConfig(total_steps=1, precision="bf16", progress=False, **kw))
