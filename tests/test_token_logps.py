"""kernels/token_logps.py against what it replaces: -cross_entropy(logits.float(), reduction='none'), its values and
the logits' gradient, in float32 and bf16 logits, with ignored targets, over several row chunks."""

import pytest
import torch
import torch.nn.functional as F

from shardtune.kernels import token_logps as tl


def reference(logits, targets):
    return -F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="none"
    ).view(targets.shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_logps_equal_cross_entropy_in_value_and_gradient(monkeypatch, dtype):
    monkeypatch.setattr(tl, "CHUNK_BYTES", 4 * 1000 * 7)  # 7 rows of the 1,000-token vocabulary per chunk
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 17, 1000, generator=gen) * 4).to(dtype)
    targets = torch.randint(0, 1000, (3, 17), generator=gen)
    targets[0, :5] = -100  # a prompt
    targets[2, -3:] = -100  # padding
    weights = torch.randn(3, 17, generator=gen)
    a, b = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    ours, theirs = tl.token_logps(a, targets), reference(b, targets)
    assert ours.dtype == torch.float32 and ours.shape == targets.shape
    assert torch.equal(ours[targets == -100], torch.zeros(8))
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-5)
    (ours * weights).sum().backward()
    (theirs * weights).sum().backward()
    assert a.grad.dtype == dtype
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-3}
    torch.testing.assert_close(a.grad, b.grad, **tol)
    assert torch.equal(a.grad[0, :5], torch.zeros(5, 1000, dtype=dtype))  # ignored rows: no gradient
