"""Greedy generation for held-out prompts, spread over the ranks (every rank steps with the others: the layers
gather their weights in their forward), gathered on rank 0."""

from __future__ import annotations

import torch
import torch.distributed as dist

from shardtune.data.formats import adds_bos
from shardtune.parallel.backend import Backend
from shardtune.parallel.distributed import DistInfo


@torch.no_grad()
def generate(
    backend: Backend,
    model: torch.nn.Module,
    tokenizer,
    info: DistInfo,
    compute,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int,
) -> list[str]:
    """Greedy completions of `prompts` (rank 0 receives all) by `model` (what the backend wrapped); `compute`: the
    context forwards run in."""
    world, rank = info.world_size, info.rank
    mine = list(range(rank, len(prompts), world))
    tok = tokenizer
    side, tok.padding_side = tok.padding_side, "left"
    bos = adds_bos(tok)
    rounds = -(-len(prompts) // (batch_size * world)) if prompts else 0
    out: dict[int, str] = {}
    model.eval()
    try:
        for k in range(rounds):
            chunk = mine[k * batch_size : (k + 1) * batch_size]
            texts = [prompts[i] for i in chunk] or [prompts[0]]  # idle ranks still step with the rest
            if bos:
                texts = [t if t.startswith(tok.bos_token) else tok.bos_token + t for t in texts]
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(info.device)
            # synced_gpus keeps every rank stepping (and gathering layers) until all are done
            with backend.gathered_root(), compute():
                gen = backend.unwrap().generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    use_cache=True,
                    synced_gpus=world > 1,
                    pad_token_id=tok.pad_token_id,
                    eos_token_id=tok.eos_token_id,
                )
            new = gen[:, enc["input_ids"].shape[1] :]
            for i, ids in zip(chunk, new, strict=False):  # an idle rank's dummy row has no index
                out[i] = tok.decode(ids, skip_special_tokens=True)
    finally:
        model.train()
        tok.padding_side = side
    if world > 1:
        gathered: list = [None] * world
        dist.all_gather_object(gathered, out)
        out = {k: v for part in gathered for k, v in part.items()}
    return [out[i] for i in range(len(prompts))]
