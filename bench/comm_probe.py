"""All-gather bandwidth between the GPUs of this machine, as FSDP uses it (one layer's flat parameter).

    torchrun --nproc_per_node 2 bench/comm_probe.py [MiB ...]     (NCCL_DEBUG=INFO shows the transport)

Prints one JSON line per size from rank 0: the time of one all-gather and the bus bandwidth
(bytes each rank receives / time), the figure to compare with the link (NVLink vs PCIe vs host memory).
"""

import json
import os
import sys
import time

import torch
import torch.distributed as dist


def main(sizes_mib: list[float]) -> None:
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    for mib in sizes_mib:
        shard = torch.ones(int(mib * 2**20 / 2 / world), dtype=torch.bfloat16, device="cuda")
        whole = torch.empty(shard.numel() * world, dtype=shard.dtype, device="cuda")
        for _ in range(3):
            dist.all_gather_into_tensor(whole, shard)
        torch.cuda.synchronize()
        n = 20
        start = time.perf_counter()
        for _ in range(n):
            dist.all_gather_into_tensor(whole, shard)
        torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / n
        received = shard.numel() * shard.element_size() * (world - 1)
        if rank == 0:
            print(
                json.dumps(
                    {
                        "check": "allgather",
                        "mib": mib,
                        "ms": seconds * 1e3,
                        "busbw_gb_s": received / seconds / 1e9,
                        "world": world,
                    }
                ),
                flush=True,
            )
    dist.destroy_process_group()


if __name__ == "__main__":
    main([float(x) for x in sys.argv[1:]] or [1, 16, 110, 440])
