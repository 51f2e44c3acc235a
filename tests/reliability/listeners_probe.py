"""Run as the ranks of `distributed.launch` by test_listening_and_temp: once the group is up, rank 0 writes every
TCP socket that the launcher and its ranks listen on to the JSON file named by argv[1]."""

from __future__ import annotations

import json
import os
import sys

import psutil
import torch.distributed as dist

dist.init_process_group("gloo")
dist.barrier()  # every rank connected: the store and gloo's pairs are listening
if dist.get_rank() == 0:
    launcher = psutil.Process(os.getppid())
    pids = {launcher.pid} | {p.pid for p in launcher.children(recursive=True)}
    listening = [
        [c.laddr.ip, c.laddr.port, c.pid]
        for c in psutil.net_connections("tcp")
        if c.status == psutil.CONN_LISTEN and c.pid in pids
    ]
    with open(sys.argv[1], "w") as f:
        json.dump({"listening": listening, "store_port": int(os.environ["MASTER_PORT"])}, f)
dist.barrier()
dist.destroy_process_group()
