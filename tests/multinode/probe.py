"""Run by `deepspeed` on every rank: report what the rank sees (its address, environment, threads) as
OUT/rank<r>.json, after one all_reduce over the hosts so a broken network fails here."""
from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist

VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "OMP_NUM_THREADS", "DS_ACCELERATOR", "GLOO_SOCKET_IFNAME",
        "NCCL_SOCKET_IFNAME", "NCCL_DEBUG", "GEOKD_MARK", "PYTHONPATH")


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    total = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(total)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # the address this rank reaches the master from
        s.connect((os.environ["MASTER_ADDR"], 9))
        addr = s.getsockname()[0]
    report = {"addr": addr, "all_reduce": total.item(), "threads": torch.get_num_threads(),
              "env": {k: os.environ.get(k) for k in VARS}}
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[-1]))  # the launcher puts --local_rank=N first
