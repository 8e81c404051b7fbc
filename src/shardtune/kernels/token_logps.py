"""log p(target) at every position from the model's logits, without their float32 copies: what preference losses
(DPO, ORPO) need from every sequence, where the SFT loss can skip the logits altogether (Liger's fused loss).

`F.cross_entropy(logits.float(), ...)` holds a float32 copy of the logits, keeps their float32 log-softmax for
backward and makes a float32 gradient before casting it back: about 14 bytes per logit beside the bf16 logits
(7 GiB for two 8B pairs of 1,024 tokens: 4,096 x 128,256 logits). Here the logits are read in row chunks of
CHUNK_BYTES as float32: forward keeps only each row's log-sum-exp, backward computes the softmax again chunk by
chunk and writes the gradient straight into the logits' dtype. The arithmetic is cross-entropy's, in float32
(tests/test_token_logps.py: equal to it within float32 rounding, gradients too)."""

from __future__ import annotations

import torch

from shardtune.data.formats import IGNORE_INDEX

CHUNK_BYTES = 256 * 2**20  # float32 bytes of one chunk of rows


def token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) (float32) at every position of `logits` [..., vocab]; 0 where the target is
    IGNORE_INDEX (targets pre-shifted, shaped as logits without the last dimension)."""
    flat = _TokenLogps.apply(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    return flat.view(targets.shape)


def _chunks(rows: int, vocab: int) -> list[slice]:
    step = max(1, CHUNK_BYTES // (4 * vocab))
    return [slice(s, min(s + step, rows)) for s in range(0, rows, step)]


class _TokenLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        rows, vocab = logits.shape
        valid = targets != IGNORE_INDEX
        picked = targets.clamp(min=0).unsqueeze(1)
        out = torch.zeros(rows, dtype=torch.float32, device=logits.device)
        lse = torch.empty(rows, dtype=torch.float32, device=logits.device)
        for rows_ in _chunks(rows, vocab):
            x = logits[rows_].float()
            lse[rows_] = torch.logsumexp(x, dim=-1)
            out[rows_] = x.gather(1, picked[rows_]).squeeze(1) - lse[rows_]
        out.masked_fill_(~valid, 0.0)
        ctx.save_for_backward(logits, picked, valid, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        logits, picked, valid, lse = ctx.saved_tensors
        g = grad_out.float().masked_fill(~valid, 0.0).unsqueeze(1)
        grad = torch.empty_like(logits)
        for rows_ in _chunks(*logits.shape):
            # d/dx [x_t - logsumexp(x)] = onehot(t) - softmax(x)
            part = torch.exp(logits[rows_].float() - lse[rows_].unsqueeze(1)).mul_(-g[rows_])
            part.scatter_add_(1, picked[rows_], g[rows_])
            grad[rows_] = part
        return grad, None
