"""``workbench train-sae``: train a sparse autoencoder on an activation store or synthetic data.

    workbench train-sae --store DIR --hook blocks.3.hook_resid_post --architecture topk --k 32
    workbench train-sae --synthetic --architecture relu --steps 3000      # ground-truth benchmark
    torchrun --nproc_per_node 2 -m workbench.cli train-sae ...            # data parallel

The run directory (``--out``) holds ``metrics.jsonl``, ``checkpoint/`` (resumed from when the
same command runs again) and ``sae/`` in SAELens' layout. (``eval-sae`` is in ``commands/store.py``.)
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from torch import Tensor

ARCHITECTURES = ("relu", "topk", "batchtopk", "jumprelu")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train-sae",
        help="train a sparse autoencoder on an activation store (or synthetic features)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_argument_group("data")
    src.add_argument("--store", type=Path, help="activation store directory (from `workbench cache`)")
    src.add_argument("--hook", help="hook in the store to train on (default: the store's only hook)")
    src.add_argument("--synthetic", action="store_true", help="train on known sparse features instead")
    src.add_argument("--synthetic-d-in", type=int, default=64)
    src.add_argument("--synthetic-features", type=int, default=128)
    src.add_argument("--synthetic-active", type=float, default=3.0, help="mean features present per sample")
    sae = p.add_argument_group("SAE")
    sae.add_argument("--architecture", choices=ARCHITECTURES, default="topk")
    sae.add_argument("--d-sae", type=int, help="latents (default: --expansion x d_in)")
    sae.add_argument("--expansion", type=int, default=8)
    sae.add_argument("--k", type=int, default=32, help="topk/batchtopk: active latents per row")
    sae.add_argument("--normalize", choices=("none", "expected_average_only_in"), default="expected_average_only_in")
    tr = p.add_argument_group("training")
    tr.add_argument("--steps", type=int, default=1000)
    tr.add_argument("--batch-size", type=int, default=4096, help="global batch (split over torchrun processes)")
    tr.add_argument("--lr", type=float, default=4e-4)
    tr.add_argument("--warmup-steps", type=int, default=0)
    tr.add_argument("--l1-coefficient", type=float, default=5.0)
    tr.add_argument("--l0-coefficient", type=float, default=1e-3)
    tr.add_argument("--dead-tokens", type=int, default=10_000_000)
    tr.add_argument("--resample-every", type=int, default=0, help="relu: resample dead latents every N steps")
    tr.add_argument("--checkpoint-every", type=int, default=1000)
    tr.add_argument("--log-every", type=int, default=10)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    tr.add_argument("--out", type=Path, help="run directory (default: $WORKBENCH_HOME/runs/sae-...)")
    tr.add_argument("--no-resume", action="store_true", help="start over even if --out holds a checkpoint")
    tr.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_train_sae)


def cmd_train_sae(args: argparse.Namespace) -> int:
    """Train an SAE as the arguments say; print a JSON summary; return 0."""
    from workbench.distributed import destroy_distributed, init_distributed
    from workbench.errors import ConfigError
    from workbench.locking import lock_name, output_lock
    from workbench.sae.io import save_sae
    from workbench.sae.model import SAE, SAEConfig
    from workbench.sae.train import TrainConfig, train_sae

    if bool(args.store) == bool(args.synthetic):
        raise ConfigError("give exactly one data source: --store DIR (with --hook) or --synthetic")
    device = _device(args.device)
    info = init_distributed(device)
    if args.batch_size % info.world_size:
        raise ConfigError(
            f"--batch-size {args.batch_size} does not split over {info.world_size} processes; use a multiple"
        )
    local_batch = args.batch_size // info.world_size
    data, d_in, metadata, name = _data_source(args, local_batch, info.rank, info.world_size)
    d_sae = args.d_sae if args.d_sae is not None else args.expansion * d_in
    _check_memory(d_in, d_sae, device)
    sae_cfg = SAEConfig(
        d_in=d_in,
        d_sae=d_sae,
        architecture=args.architecture,
        k=args.k,
        normalize_activations=args.normalize,
    )
    train_cfg = TrainConfig(
        total_steps=args.steps,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        l1_coefficient=args.l1_coefficient,
        l0_coefficient=args.l0_coefficient,
        dead_tokens=args.dead_tokens,
        resample_every=args.resample_every,
        checkpoint_every=args.checkpoint_every,
        log_every=args.log_every,
        seed=args.seed,
        progress=not args.no_progress,
    )
    out = args.out or _default_out(name, sae_cfg)
    model = SAE(sae_cfg, seed=args.seed).to(device)
    model.metadata = metadata
    with output_lock(out, lock_name(info.rank)):  # one run per --out, from training to the saved SAE
        result = train_sae(model, data, train_cfg, out, resume=not args.no_resume)
        if info.rank == 0:
            save_sae(result.sae, out / "sae", log_feature_density=result.log_feature_density)
    if info.rank == 0:
        summary: dict[str, Any] = {
            "out": str(out),
            "sae": str(out / "sae"),
            "steps": result.steps,
            "tokens": result.tokens,
            "resumed_from": result.resumed_from,
            "world_size": info.world_size,
            **{k: v for k, v in result.last_metrics.items() if k not in ("step", "tokens")},
        }
        if args.synthetic:
            from workbench.analysis.superposition import mmcs

            summary["mmcs"] = mmcs(result.sae.W_dec, data.features)  # type: ignore[attr-defined]
        print(json.dumps(summary, indent=2))
    destroy_distributed()
    return 0


class _Source:
    """A batch factory for the trainer: ``source(start_step)`` gives this process's batches."""

    def __init__(self, make: Callable[[int], Iterable[Tensor]], features: Tensor | None = None):
        self._make = make
        self.features = features

    def __call__(self, start: int) -> Iterable[Tensor]:
        return self._make(start)


def _data_source(args: argparse.Namespace, local_batch: int, rank: int, world: int):
    """Return (batch factory, d_in, SAELens metadata, run name)."""
    if args.synthetic:
        from workbench.analysis.superposition import SyntheticConfig, SyntheticFeatures

        synthetic = SyntheticFeatures(
            SyntheticConfig(
                d_in=args.synthetic_d_in,
                n_features=args.synthetic_features,
                mean_active=args.synthetic_active,
                seed=args.seed,
            )
        )
        source = _Source(
            lambda start: synthetic.batches(local_batch, start, rank=rank, world_size=world), synthetic.features
        )
        metadata = {"model_name": "synthetic", "hook_name": "synthetic", "dataset_path": "synthetic"}
        return source, args.synthetic_d_in, metadata, "synthetic"

    from workbench.errors import ConfigError
    from workbench.store import ReaderConfig, open_store

    store = open_store(args.store)
    hook = args.hook
    if hook is None:
        if len(store.hooks) != 1:
            raise ConfigError(f"the store in {args.store} holds hooks {store.hooks}; choose one with --hook")
        hook = store.hooks[0]
    store.check_hook(hook)
    global_batch = local_batch * world
    reader = ReaderConfig(batch_size=global_batch, seed=args.seed)

    def make(start: int) -> Iterable[Tensor]:
        # Every process reads the same shuffled global batch and keeps its slice, so the run is
        # the same however many processes share it.
        for batch in store.stream(hook, reader, start_row=start * global_batch):
            yield batch[rank * local_batch : (rank + 1) * local_batch]

    from workbench.names import layer_of

    model_name = store.manifest.model.name
    metadata = {
        "model_name": model_name,
        "hook_name": hook,
        "hook_layer": layer_of(hook),
        "context_size": store.n_ctx,
        "dataset_path": str(args.store),  # the manifest records the corpus by digest, not by name
        "activation_store": str(Path(args.store).resolve()),
    }
    name = f"{model_name or 'model'}-{hook}"
    return _Source(make), store.d_in(hook), metadata, name


def _check_memory(d_in: int, d_sae: int, device) -> None:
    """Refuse an SAE whose training state cannot fit in this machine's memory, before allocating it."""
    from workbench.errors import ConfigError
    from workbench.loading import available_memory

    # W_enc and W_dec, each with its gradient and Adam's two moments: 8 float32 copies of d_in x d_sae
    need = 8 * 4 * d_in * d_sae
    import torch

    if torch.device(device).type == "cuda":
        available = torch.cuda.mem_get_info(torch.device(device))[0]  # free bytes on that GPU
    else:
        available = available_memory()
    if available is not None and need > available:
        raise ConfigError(
            f"--d-sae {d_sae} with d_in {d_in} needs about {need / 2**30:.1f} GiB to train but {available / 2**30:.1f} GiB "
            "are available; choose a smaller --d-sae or --expansion"
        )


def _device(requested: str | None):
    """Return the device to train on: as requested, else CUDA when there is one; under torchrun this rank's GPU."""
    import torch

    from workbench.distributed import local_device

    return local_device(requested or ("cuda" if torch.cuda.is_available() else "cpu"))


def _default_out(name: str, cfg) -> Path:
    from workbench.paths import runs_dir

    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    return runs_dir() / f"sae-{safe}-{cfg.architecture}-{cfg.d_sae}"
