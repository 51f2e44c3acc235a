"""One training over several processes (DDP, or FSDP with sharding=fsdp): who this process is, its device, and
the few collectives the trainer needs. Without a launcher (no WORLD_SIZE in the environment) everything here is a
no-op for one process.

accelerate launch --multi_gpu --num_processes 2 -m entrypoints.train --rank 16     # 2 GPUs (2 CPU processes without)
mlflow run . -e train --env-manager local -P num_processes=2                        # the same: train relaunches
mlflow run . -e train --env-manager local -P num_processes=2 -P sharding=fsdp       # the base sharded over the 2
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from unittest import mock

import accelerate.commands.launch as accelerate_launch
import psutil
import torch
import torch.distributed as dist
from accelerate import PartialState
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

from lora_efficiency.config import parse_bool
from lora_efficiency.errors import UserError

LAUNCHER_ENV = ("WORLD_SIZE", "LOCAL_RANK")  # set by accelerate launch, torchrun, and accelerate's mpirun path


def launched() -> bool:
    """Whether a launcher (accelerate launch, torchrun) started this process as one rank of a group."""
    return all(k in os.environ for k in LAUNCHER_ENV)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1")) if launched() else 1


def is_main() -> bool:
    """Rank 0 (or the only process): the one that talks to MLflow."""
    return not launched() or int(os.environ.get("RANK", "0")) == 0


@dataclass(frozen=True)
class Group:
    """This process's place in the training: rank r of `size`, training on `device`."""

    rank: int
    size: int
    device: torch.device
    sharding: str = "none"  # none: DDP; fsdp: FSDP2 (settings.SHARDINGS)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum(self, value: float) -> float:
        """`value` summed over every process (the same result on each)."""
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return float(t.item())

    def gather(self, obj) -> list:
        """Every process's `obj`, in rank order (on each process)."""
        if self.size == 1:
            return [obj]
        out: list = [None] * self.size
        torch.distributed.all_gather_object(out, obj)
        return out

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """DDP over the group (gradients of the trainable (LoRA) parameters are averaged in backward), or FSDP2 with
        sharding=fsdp. Called before the optimizer is built: FSDP replaces each parameter by its shard."""
        if self.size == 1:
            return module
        if self.sharding == "fsdp":
            return shard(module)
        ids = [self.device.index] if self.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(module, device_ids=ids)

    def no_sync(self, module: torch.nn.Module, last: bool):
        """No all-reduce (reduce-scatter under FSDP) in the backward of a micro-batch that is not the step's last."""
        if self.size > 1 and self.sharding == "fsdp":
            module.set_requires_gradient_sync(last)
            return contextlib.nullcontext()
        return contextlib.nullcontext() if self.size == 1 or last else module.no_sync()

    def full_trainable_state(self, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The trainable parameters of a sharded `module`, whole, on the CPU (a collective: every rank calls it).
        Adapter-only: the frozen base is never gathered (LoRA r=16 on q,k,v,o of SmolLM2-135M: 1.8 M of 136 M)."""
        return {
            name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu()
            for name, p in module.named_parameters()
            if p.requires_grad
        }

    def close(self) -> None:
        """Leave the process group: no collective comes after this (rank 0 evaluates alone)."""
        if self.size > 1:
            torch.distributed.destroy_process_group()


def shard(module: torch.nn.Module) -> torch.nn.Module:
    """FSDP2 (`fully_shard`) over the group: every decoder layer is one unit, all-gathered only around its own
    forward and backward; the rest (embeddings, final norm, head: tied in most small models, so one unit) is the
    root's. The layers are the model's `_no_split_modules`, the wrap policy accelerate's FSDP plugin derives too.
    FSDP2 rather than accelerate's plugin (FSDP1 flat parameters): it shards each parameter on its own, so the
    frozen base and the trainable LoRA weights (different requires_grad, different dtypes) share a unit, and the
    trainer keeps its own loop, optimizer and autocast (Accelerator.prepare is not used, see setup())."""
    from torch.distributed.fsdp import fully_shard  # lazy: entrypoints.train imports this module before parsing; ~1 s

    layers = {name for m in module.modules() for name in (getattr(m, "_no_split_modules", None) or ())}
    for sub in list(module.modules())[1:]:
        if type(sub).__name__ in layers:
            fully_shard(sub)
    fully_shard(module)
    return module


def setup(device: torch.device, sharding: str = "none") -> Group:
    """Join the launcher's process group, if there is one. accelerate's PartialState reads whatever launcher set
    the environment (accelerate launch, torchrun, mpirun) and picks the backend (NCCL on GPUs, gloo on the CPU);
    each rank then trains on its own GPU, cuda:LOCAL_RANK. accelerate's Accelerator.prepare is not used: it would
    wrap the scheduler to step num_processes times per optimizer step and add a second autocast to the trainer's.
    """
    if not launched():
        return Group(0, 1, device)

    for engine in ("FSDP", "DEEPSPEED"):  # accelerate launch --use_fsdp / --use_deepspeed set these
        if parse_bool(os.environ.get(f"ACCELERATE_USE_{engine}", "false")):
            raise UserError(
                f"accelerate launch with {engine}: not supported, the trainer shards with its own FSDP2; launch "
                "with --multi_gpu and pass --sharding fsdp --num_processes N (docs/scaling.md)"
            )

    state = PartialState(cpu=device.type == "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(state.device)
    return Group(state.process_index, state.num_processes, state.device, sharding)


@contextlib.contextmanager
def _loopback_store() -> Iterator[int]:
    """torchrun's rendezvous key-value store, served from this process on 127.0.0.1 only; yields its port.

    torch 2.13's TCPStore server listens on every interface (`::`) whatever host it is given (measured: a 2-rank
    launch listened on `::` and on loopback only after this). It can instead serve a socket the caller bound
    (`master_listen_fd`), and torchrun's static rendezvous opens its store with `multi_tenant=True`, which reuses
    a server this process already runs on that port: this one. Accelerate's "port in use" check (which would
    move the launch to another port, on every interface) is told the port is ours.
    """
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    store = dist.TCPStore(  # noqa: F841 (kept alive for the launch: the server lives as long as the object)
        "127.0.0.1",
        port,
        None,
        True,
        timedelta(minutes=30),
        wait_for_workers=False,
        multi_tenant=True,
        master_listen_fd=sock.detach(),  # the server owns the socket from here
    )
    yield port


def loopback_interface() -> str:
    """The name of the network interface that holds 127.0.0.1 ("lo" on Linux)."""
    for name, addresses in psutil.net_if_addrs().items():
        if any(a.address == "127.0.0.1" for a in addresses):
            return name
    return "lo"


def launch(num_processes: int, module: str, argv: list[str]) -> None:
    """Run `python -m module argv` as `num_processes` ranks on this machine with accelerate's own launcher
    (`accelerate launch --multi_gpu`, i.e. torchrun), in this process; returns when every rank has finished.

    `--multi_gpu` on a machine without CUDA gives gloo ranks on the CPU (setup() passes cpu=True): accelerate
    1.15's `--cpu --num_processes N` starts ONE process unless MPI is set up (`--mpirun_hostfile`). A free port
    per launch keeps concurrent trainings (a sweep on Ray) off each other's rendezvous; the rendezvous store
    listens on 127.0.0.1 only (`_loopback_store`). Each failed rank has printed its own error line; torchrun's
    traceback of the failure is replaced by one UserError line.
    """
    # One machine: torchrun's MASTER_ADDR is 127.0.0.1, and gloo's and NCCL's own sockets (the collectives, NCCL's
    # bootstrap) go on loopback too, unless the caller chose an interface.
    for variable in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        os.environ.setdefault(variable, loopback_interface())
    # torchrun's log lines (an OMP_NUM_THREADS banner, "failed (exitcode: 2)"): the UserError below says it all
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        with _loopback_store() as port, mock.patch("accelerate.utils.launch.is_port_in_use", return_value=False):
            args = accelerate_launch.launch_command_parser().parse_args(
                [
                    "--multi_gpu",
                    "--num_processes",
                    str(num_processes),
                    "--num_machines",
                    "1",
                    "--mixed_precision",
                    "no",  # the trainer's own autocast decides the compute dtype
                    "--dynamo_backend",
                    "no",
                    "--main_process_port",
                    str(port),
                    "-m",
                    module,
                    *argv,
                ]
            )
            accelerate_launch.launch_command(args)
    except ChildFailedError as exc:
        failed = ", ".join(f"rank {rank}: exit status {f.exitcode}" for rank, f in sorted(exc.failures.items()))
        raise UserError(
            f"num_processes={num_processes}: the distributed training failed ({failed}); each rank's error is above"
        ) from None
