"""A LoRA adapter's first matmul with its dropout drawn inside the kernel: `dropout(x, p) @ A^T`, in Triton.

The dropped input is never written. Forward reads x once and draws each element's keep bit from a counter-based
generator (Philox: the bits are a function of a seed, the row and the column), so backward draws the very same
bits again while it reads x for A's gradient and writes x's. Against dropout as autograd runs it (a dropped copy
and a mask written, read back by the matmul, both kept for backward, read again there) that is 2 bytes moved
per input element in forward instead of 7, 4 in backward instead of 9, and nothing kept but x, which the base
layer keeps anyway: the memory of selective recomputation without its second dropout pass. (The kernels are
bound by the generator, ~2 keep bits per ns on an H200, more than by memory; one adapter's forward and backward
at a 3072 x 28672 input take 0.3 ms.)

The mask is not PEFT's: torch's dropout draws from the CUDA generator through its own kernel. The draws here
use that generator too (its seed, and an offset reserved from it as torch's dropout reserves one), so
torch.manual_seed, checkpointed RNG state and activation checkpointing's replay govern them the same way.
A keep bit is a 16-bit uniform against round(p * 2^16) (one Philox call gives eight): the drop probability is
p to within 2^-17, and the kept values are scaled by exactly the inverse of the keep probability.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Philox rounds: 7 passes BigCrush (Salmon et al. 2011; 10, curand's, adds a safety margin); a keep bit needs no
# more, and 7 make the kernels 5-15% faster on an H200 (bench/results/2026-12-01-1xh200-dropout-kernel/tiles)
ROUNDS = 7


@triton.jit
def _keep(seed, offset, rows, k0, n_groups, threshold, BK: tl.constexpr, ROUNDS: tl.constexpr):
    """The keep bits of rows `rows` (a [BM] block) and columns k0 .. k0 + BK: one Philox call per row and
    8 columns, its four 32-bit outputs split into eight 16-bit uniforms."""
    groups = k0 // 8 + tl.arange(0, BK // 8)
    counter = offset + rows.to(tl.int64)[:, None] * n_groups + groups[None, :]
    lo = counter.to(tl.uint32)
    # the counter's last word set: torch's Philox draws (curand) use it for the thread's subsequence, whose high
    # word is 0, so these numbers are never ones torch's dropout draws from the same seed and offset
    r0, r1, r2, r3 = tl.philox(seed, lo, (counter >> 32).to(tl.uint32), lo * 0, lo * 0 + 0x5348, ROUNDS)
    a0 = tl.interleave(r0 & 0xFFFF, r0 >> 16)
    a1 = tl.interleave(r1 & 0xFFFF, r1 >> 16)
    a2 = tl.interleave(r2 & 0xFFFF, r2 >> 16)
    a3 = tl.interleave(r3 & 0xFFFF, r3 >> 16)
    u = tl.interleave(tl.interleave(a0, a1), tl.interleave(a2, a3))
    return u >= threshold


@triton.jit
def _lora_dropout_forward(
    x_ptr, a_ptr, part_ptr, M, K, R, k_per_split, seed, offset, threshold,
    BM: tl.constexpr, BK: tl.constexpr, RP: tl.constexpr, ROUNDS: tl.constexpr,
):  # fmt: skip
    """partial[s, rows] = (keep * x)[rows, split s's columns] @ A[:, those columns]^T, in fp32."""
    pm, s = tl.program_id(0), tl.program_id(1)
    rows = pm * BM + tl.arange(0, BM)
    ranks = tl.arange(0, RP)
    n_groups = tl.cdiv(K, 8)
    acc = tl.zeros((BM, RP), dtype=tl.float32)
    for i in range(0, k_per_split, BK):  # (past K: masked)
        k0 = s * k_per_split + i
        cols = k0 + tl.arange(0, BK)
        inside = (rows[:, None] < M) & (cols[None, :] < K)
        x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * K + cols[None, :], mask=inside, other=0.0)
        x = tl.where(_keep(seed, offset, rows, k0, n_groups, threshold, BK, ROUNDS), x, 0.0)
        a = tl.load(
            a_ptr + ranks[None, :] * K + cols[:, None],
            mask=(ranks[None, :] < R) & (cols[:, None] < K),
            other=0.0,
        )
        acc = tl.dot(x, a, acc)
    out = part_ptr + (s * M + rows.to(tl.int64))[:, None] * RP + ranks[None, :]
    tl.store(out, acc, mask=rows[:, None] < M)


@triton.jit
def _lora_dropout_backward(
    x_ptr, a_ptr, g_ptr, gx_ptr, part_ptr, M, K, R, rows_per_split, seed, offset, threshold, scale,
    BM: tl.constexpr, BK: tl.constexpr, RP: tl.constexpr, GRAD_X: tl.constexpr, ROUNDS: tl.constexpr,
):  # fmt: skip
    """For columns block pk and split s's rows: partial[s, :, cols] = g[rows]^T @ (keep * x)[rows, cols] (A's
    gradient before the scale), and grad_x[rows, cols] = scale * keep * (g[rows] @ A[:, cols])."""
    pk, s = tl.program_id(0), tl.program_id(1)
    cols = pk * BK + tl.arange(0, BK)
    ranks = tl.arange(0, RP)
    n_groups = tl.cdiv(K, 8)
    a = tl.load(
        a_ptr + ranks[:, None] * K + cols[None, :], mask=(ranks[:, None] < R) & (cols[None, :] < K), other=0.0
    )
    acc = tl.zeros((RP, BK), dtype=tl.float32)
    for i in range(0, rows_per_split, BM):  # (past M: masked)
        rows = s * rows_per_split + i + tl.arange(0, BM)
        inside = (rows[:, None] < M) & (cols[None, :] < K)
        keep = _keep(seed, offset, rows, pk * BK, n_groups, threshold, BK, ROUNDS)
        x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * K + cols[None, :], mask=inside, other=0.0)
        g = tl.load(
            g_ptr + rows.to(tl.int64)[:, None] * R + ranks[None, :],
            mask=(rows[:, None] < M) & (ranks[None, :] < R),
            other=0.0,
        )
        acc = tl.dot(tl.trans(g), tl.where(keep, x, 0.0), acc)
        if GRAD_X:
            gx = tl.where(keep, tl.dot(g, a) * scale, 0.0)
            tl.store(
                gx_ptr + rows.to(tl.int64)[:, None] * K + cols[None, :],
                gx.to(gx_ptr.dtype.element_ty),
                mask=inside,
            )
    out = part_ptr + (s * RP + ranks.to(tl.int64))[:, None] * K + cols[None, :]
    tl.store(out, acc, mask=cols[None, :] < K)


@triton.jit
def _lora_dropout_mask(
    out_ptr, M, K, seed, offset, threshold, BM: tl.constexpr, BK: tl.constexpr, ROUNDS: tl.constexpr
):
    """The keep bits themselves (tests compare the kernels against dropout with this mask)."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    k0 = tl.program_id(1) * BK
    cols = k0 + tl.arange(0, BK)
    keep = _keep(seed, offset, rows, k0, tl.cdiv(K, 8), threshold, BK, ROUNDS)
    tl.store(
        out_ptr + rows.to(tl.int64)[:, None] * K + cols[None, :],
        keep,
        mask=(rows[:, None] < M) & (cols[None, :] < K),
    )


def _split(length: int, block: int, programs: int, device: torch.device) -> tuple[int, int]:
    """How to split `length` (a multiple of `block` per part) among programs that already number `programs`
    along the other dimension, so that the GPU gets ~4 per multiprocessor: (length per part, parts)."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    parts = max(1, min(triton.cdiv(length, block), triton.cdiv(4 * sms, programs)))
    per_part = triton.cdiv(triton.cdiv(length, parts), block) * block
    return per_part, triton.cdiv(length, per_part)


def threshold(p: float) -> int:
    return round(p * 65536)


def keep_scale(p: float) -> float:
    """The inverse of the keep probability the 16-bit draws give (p rounded to a multiple of 2^-16)."""
    return 65536 / (65536 - threshold(p))


def draw_state(device: torch.device, n: int) -> tuple[int, int]:
    """A Philox seed and a base offset for `n` counters. On CUDA: the default generator's seed, and `n`
    counters reserved from its offset (as torch's own dropout reserves them), so that the next draw anywhere
    gets fresh numbers and restoring the generator's state draws these again. Elsewhere (the Triton
    interpreter, in tests): a seed from torch's CPU generator."""
    if device.type != "cuda":
        return int(torch.randint(0, 2**62, (1,)).item()), 0
    gen = torch.cuda.default_generators[
        device.index if device.index is not None else torch.cuda.current_device()
    ]
    state = gen.get_state()
    seed, offset = (int(v) for v in state.view(torch.int64))
    state.view(torch.int64)[1] = offset + (n + 3) // 4 * 4  # the generator takes offsets in steps of 4
    gen.set_state(state)
    return seed, offset


def reserve(x2: torch.Tensor, p: float) -> tuple[float, int, int]:
    """(p, seed, offset) of one dropout draw over a 2-D x2 (its keep bits' counters reserved: draw_state)."""
    return (p, *draw_state(x2.device, x2.shape[0] * triton.cdiv(x2.shape[1], 8)))


def keep_mask(
    x_shape: tuple[int, int],
    device: torch.device,
    p: float,
    seed: int,
    offset: int,
    rounds: int | None = None,
) -> torch.Tensor:
    M, K = x_shape
    out = torch.empty(M, K, dtype=torch.bool, device=device)
    bm, bk = 64, 128
    _lora_dropout_mask[(triton.cdiv(M, bm), triton.cdiv(K, bk))](
        out, M, K, seed, offset, threshold(p), BM=bm, BK=bk, ROUNDS=rounds or ROUNDS
    )
    return out


def _ranks_padded(r: int) -> int:
    return max(16, triton.next_power_of_2(r))  # tl.dot's smallest dimension is 16


# Tiles and launch settings (bench/lora_kernel_probe.py compares others on an H200)
FORWARD = {"BM": 64, "BK": 128, "num_warps": 4, "num_stages": 3, "ROUNDS": ROUNDS}
BACKWARD = {"BM": 64, "BK": 128, "num_warps": 4, "num_stages": 2, "ROUNDS": ROUNDS}


def forward(x2, weight, p, seed, offset, tiles=FORWARD) -> torch.Tensor:
    """dropout(x2, p) @ weight^T for a 2-D x2, in x2's dtype."""
    (M, K), R = x2.shape, weight.shape[0]
    RP, bm, bk = _ranks_padded(R), tiles["BM"], tiles["BK"]
    row_tiles = triton.cdiv(M, bm)
    k_per_split, splits = _split(K, bk, row_tiles, x2.device)
    part = torch.empty(splits, M, RP, dtype=torch.float32, device=x2.device)
    _lora_dropout_forward[(row_tiles, splits)](
        x2, weight, part, M, K, R, k_per_split, seed, offset, threshold(p), RP=RP, **tiles
    )
    return (part.sum(0)[:, :R] * keep_scale(p)).to(x2.dtype)


def backward(x2, weight, g, p, seed, offset, grad_x: bool, tiles=BACKWARD):
    """The gradients of x2 (None unless `grad_x`) and of weight, given g, the gradient of forward's output."""
    (M, K), R = x2.shape, weight.shape[0]
    RP, bm, bk = _ranks_padded(R), tiles["BM"], tiles["BK"]
    col_tiles = triton.cdiv(K, bk)
    rows_per_split, splits = _split(M, bm, col_tiles, x2.device)
    part = torch.empty(splits, RP, K, dtype=torch.float32, device=x2.device)
    gx = torch.empty_like(x2) if grad_x else x2  # (not written without GRAD_X)
    scale = keep_scale(p)
    _lora_dropout_backward[(col_tiles, splits)](
        x2, weight, g, gx, part, M, K, R, rows_per_split, seed, offset, threshold(p), scale,
        RP=RP, GRAD_X=grad_x, **tiles,
    )  # fmt: skip
    return (gx if grad_x else None), (part.sum(0)[:R] * scale).to(weight.dtype)


class DroppedMatmul(torch.autograd.Function):
    """linear(dropout(x, p), weight) for a LoRA A (weight [r, K]), x [..., K] on a GPU, both in one dtype. Keeps
    x, the weight and the Philox seed and offset; backward draws the same keep bits."""

    @staticmethod
    def forward(ctx, x, weight, p):
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        weight = weight.contiguous()
        ctx.draw = reserve(x2, p)
        ctx.save_for_backward(x, weight)
        return forward(x2, weight, *ctx.draw).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        g = grad.reshape(-1, weight.shape[0]).to(x.dtype).contiguous()
        gx, gw = backward(x2, weight, g, *ctx.draw, grad_x=ctx.needs_input_grad[0])
        return (gx.view(x.shape) if gx is not None else None), gw, None
