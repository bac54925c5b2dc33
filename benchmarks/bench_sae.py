"""TopK SAE training speed on this machine, beside a plain matmul's FLOP/s, as ratios in one run.

    python -m benchmarks.bench_sae [--quick] [--d-in 576 --d-sae 4608 --k 32 --batch 4096]

Three contenders, timed interleaved (A B C A B C ...) with the median kept, so a busy machine slows
each alike:

- ``workbench``: ``workbench.sae.train.train_sae`` itself (TopK, Adam, decoder renorm and gradient
  projection, finiteness check of every batch): one dense matmul (the encoder's forward), the
  decoder and every gradient through k-sparse kernels.
- ``dense``: the naive TopK step, as SAELens' ``TopKTrainingSAE`` does it: a dense [batch, d_sae]
  latent matrix, dense decoder matmul, dense autograd (five dense matmuls), Adam.
- ``matmul``: a plain 4096 x 4096 x 4096 float32 matmul, for the machine's FLOP/s.

Reported: tokens/s of both steps, their ratio, the matmul's GFLOP/s, and the FLOP/s the workbench
step achieves counting only its dense encoder matmul (2 * d_in * d_sae per token), i.e. how close
it comes to the bound that matmul sets. Target: >= 10,000 tokens/s at d_in 576, d_sae 4608, k 32,
batch 4096. No latent is dead here (AuxK costs nothing until some are).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from benchmarks import interleaved_medians
from workbench.sae.model import SAE, SAEConfig
from workbench.sae.train import TrainConfig, train_sae


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (seconds, not a minute)")
    parser.add_argument("--d-in", type=int, default=576)
    parser.add_argument("--d-sae", type=int, default=4608)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=3, help="SAE steps per timed call")
    args = parser.parse_args(argv)
    repeats = 2 if args.quick else 5
    d_in, d_sae, k, batch, steps = args.d_in, args.d_sae, args.k, args.batch, args.steps

    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(batch, d_in, generator=g) for _ in range(steps)]
    sae_cfg = SAEConfig(d_in=d_in, d_sae=d_sae, architecture="topk", k=k)
    train_cfg = TrainConfig(total_steps=steps, lr=1e-4, progress=False, checkpoint_every=0, log_every=steps)
    sae = SAE(sae_cfg, seed=0)

    def workbench() -> None:
        train_sae(sae, batches, train_cfg)

    # The naive reference: dense latents and dense autograd.
    W_enc = torch.nn.Parameter(sae.W_enc.detach().clone())
    W_dec = torch.nn.Parameter(sae.W_dec.detach().clone())
    b_enc = torch.nn.Parameter(torch.zeros(d_sae))
    b_dec = torch.nn.Parameter(torch.zeros(d_in))
    dense_params = [W_enc, W_dec, b_enc, b_dec]
    dense_opt = torch.optim.Adam(dense_params, lr=1e-4)

    def dense() -> None:
        for x in batches:
            pre = (x - b_dec) @ W_enc + b_enc
            top = pre.topk(k, dim=-1, sorted=False)
            acts = torch.zeros_like(pre).scatter(-1, top.indices, F.relu(top.values))
            x_hat = acts @ W_dec + b_dec
            loss = (x_hat - x).pow(2).sum(-1).mean()
            dense_opt.zero_grad(set_to_none=True)
            loss.backward()
            dense_opt.step()
            with torch.no_grad():
                W_dec.div_(W_dec.norm(dim=-1, keepdim=True))

    n = 4096
    A, B = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)

    def matmul() -> None:
        A @ B

    med = interleaved_medians({"workbench": workbench, "dense": dense, "matmul": matmul}, repeats)
    tokens = steps * batch
    tps_wb, tps_dense = tokens / med["workbench"], tokens / med["dense"]
    gflops = 2 * n**3 / med["matmul"] / 1e9
    encoder_gflops = tps_wb * 2 * d_in * d_sae / 1e9
    bound = gflops * 1e9 / (2 * d_in * d_sae)
    print(f"TopK SAE training step: d_in {d_in}, d_sae {d_sae}, k {k}, batch {batch}, float32, "
          f"torch threads {torch.get_num_threads()}, {repeats} interleaved repeats of {steps} steps (median)")
    print(f"  matmul 4096^3           {gflops:10.1f} GFLOP/s")
    print(f"  workbench train_sae     {tps_wb:10.0f} tokens/s  (target >= 10,000)")
    print(f"  naive dense TopK step   {tps_dense:10.0f} tokens/s")
    print(f"  workbench / dense       {tps_wb / tps_dense:10.2f} x")
    print(f"  encoder matmul achieved {encoder_gflops:10.1f} GFLOP/s = {encoder_gflops / gflops:.2f} of the matmul's; "
          f"bound if only that matmul cost anything: {bound:,.0f} tokens/s")


if __name__ == "__main__":
    main()
