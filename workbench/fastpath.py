"""Speed paths the reference model in ``model.py`` calls instead of a plain torch op.

Each function here computes exactly what the torch op it replaces computes (up to the order of
summation) and falls back to that op whenever its trick does not pay. Reading ``model.py``, treat
``linear(x, W, b)`` as ``F.linear(x, W, b)``; the reasons and the measurements are here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

#: inputs of at most this many rows take :func:`linear`'s split path ...
SPLIT_MAX_ROWS = 8
#: ... for weights of at least this many elements (smaller ones sit in cache: splitting costs more than it saves)
SPLIT_MIN_WEIGHTS = 1 << 16


def linear(x: Float[Tensor, "... d_in"], W: Float[Tensor, "d_out d_in"], b: Tensor | None = None) -> Tensor:
    """Return ``F.linear(x, W, b)``, computed faster when ``x`` has only a few rows on a multi-threaded CPU.

    Decoding multiplies one row by every weight matrix. Torch hands a one-row fp32 product on the CPU to a
    kernel that runs on one core, and one core streams memory at about half the rate of all. So for up
    to :data:`SPLIT_MAX_ROWS` rows of fp32 on the CPU, the rows of ``W`` are cut into one block per
    thread and multiplied as a batched matmul, which the BLAS spreads over the threads
    (``python -m benchmarks generate`` prints both kernels' SmolLM2 weight-read rates, the
    ``F.linear_ceiling`` and ``wb.linear_ceiling`` lines). Each output is the same dot product, so the
    result equals ``F.linear``'s up to the order of summation (bit for bit in SmolLM2's shapes). Other
    inputs (more rows, small weights, other dtypes, GPUs, one thread) go to ``F.linear`` unchanged.
    """
    d_out, d_in = W.shape
    blocks = torch.get_num_threads()
    if (
        blocks < 2 or x.dtype is not torch.float32 or d_out % blocks or d_out * d_in < SPLIT_MIN_WEIGHTS
        or not 0 < x.numel() <= SPLIT_MAX_ROWS * d_in
        or not x.is_cpu or W.dtype is not torch.float32 or not W.is_contiguous()
    ):
        return F.linear(x, W, b)
    # every step costs a few µs and this runs ~200 times per decoded token: views only, as few as possible
    rows, n = x.numel() // d_in, d_out // blocks
    x3 = x if x.ndim == 3 and x.shape[0] == 1 else x.reshape(1, rows, d_in)
    y = torch.bmm(x3.expand(blocks, rows, d_in), W.as_strided((blocks, d_in, n), (n * d_in, 1, d_in)))
    y = y.view(*x.shape[:-1], d_out) if rows == 1 else y.transpose(0, 1).reshape(*x.shape[:-1], d_out)
    return y if b is None else y + b
