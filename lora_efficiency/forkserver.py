"""A warm process for a sweep's children: it imports the training stack once, then forks one child per job, so a
child starts at its own work instead of at `import torch`.

Why: launching `python -m entrypoints.train` spends ~7 of its ~8 s before the first step importing torch, mlflow,
transformers, peft and bitsandbytes (docs/benchmarks.md, 2026-12-02, this 2-core CPU), and a quick study launches
28 children. Each child is still a process of its own (its pid, its RSS and NVML figures, its exit status, its
stderr), forked from a server that has only imported modules: no thread started, no CUDA context, no MLflow call.
The server checks that before it forks anything and, if it does not hold (a library started a Python thread or
loaded the CUDA driver at import), says so and the caller launches fresh processes instead.

Why not multiprocessing's forkserver (`set_forkserver_preload`): its children write to the server's stderr (a
child's own stderr, read to its end, is how a sweep names a child's error), they re-import the caller's
`__main__`, and it has no way to refuse to fork an unsafe server; the protocol below takes ~20 lines.

Protocol, over an AF_UNIX SOCK_SEQPACKET pair (one message is one job): the server sends {"unsafe": reason or ""}
once its imports are done; then, per job, the caller sends {"module", "args", "env", "cwd"} (what `python -m module
args` would run, where, with what environment) with the write end of the child's stderr pipe attached (SCM_RIGHTS),
and the server answers {"returncode"} (negative: killed by that signal) when the child has exited.
"""

from __future__ import annotations

import importlib
import json
import os
import runpy
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

from lora_efficiency.subprocesses import die_with_parent

# What a training child imports anyway, in the order it does (entrypoints.train pulls in the trainer, the
# models, peft and bitsandbytes; the MLflow model and evaluation come in at its end).
PRELOAD = (
    "torch",
    "mlflow",
    "transformers",
    "peft",
    "datasets",
    "entrypoints.train",
    "lora_efficiency.trainer",
    "lora_efficiency.evaluation",
    "lora_efficiency.mlflow_model",
)
# What may differ between two children of one server; any other difference in the environment gets a new server
# (a library may have read it at import).
PER_CHILD_ENV = ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID")
MAX_MESSAGE = 1 << 20


class ForkServer:
    """The caller's side: start the server, run children through it one at a time, close it."""

    def __init__(self, env: dict[str, str], preload: tuple[str, ...] = PRELOAD):
        self.env = _shared(env)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lora_efficiency.forkserver", str(theirs.fileno()), ",".join(preload)],
            env=self.env,  # a child's environment (subprocesses.child_env: the project on PYTHONPATH), run ids aside
            pass_fds=(theirs.fileno(),),
            preexec_fn=die_with_parent,
        )
        theirs.close()
        self.sock = ours
        answer = ours.recv(MAX_MESSAGE)
        self.unsafe = json.loads(answer)["unsafe"] if answer else f"exit status {self.proc.wait()} before it was ready"

    def serves(self, env: dict[str, str]) -> bool:
        return not self.unsafe and self.proc.poll() is None and _shared(env) == self.env

    def run(self, module: str, args: list[str], env: dict[str, str], forward) -> int:
        """Run what `python -m module args` runs, with environment `env` and this working folder, as a fork of the
        server; `forward(fd)` reads the child's stderr to its end. Returns the child's exit status (negative:
        killed by that signal)."""
        read, write = os.pipe()
        try:
            message = json.dumps({"module": module, "args": args, "env": env, "cwd": os.getcwd()}).encode()
            socket.send_fds(self.sock, [message], [write])
        finally:
            os.close(write)
        reader = threading.Thread(target=forward, args=(read,), daemon=True)
        reader.start()
        answer = self.sock.recv(MAX_MESSAGE)
        reader.join()
        os.close(read)
        if not answer:  # the server died with its child (kill -9 of both, the OOM killer): the child failed
            return self.proc.wait() or 1  # and serves() is False from now on: the next child gets a new server
        return json.loads(answer)["returncode"]

    def close(self, stop_child: bool = False) -> None:
        """End the server: at once after its running child, if any, ends (`stop_child`: SIGTERM to that child,
        which marks its run FAILED), else after the child it runs, which the caller is waiting for anyway."""
        if stop_child and self.proc.poll() is None:
            self.proc.terminate()  # the server passes it on to its child (serve)
        self.sock.close()  # the server reads end-of-file and exits
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _shared(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k not in PER_CHILD_ENV}


def _why_unsafe() -> str:
    """Why forking this process now could give a broken child, or "" when it is safe. Python threads count (one
    could hold a lock the child then waits on for good); native idle pools do not: after the imports this process
    also holds OpenBLAS's thread servers (numpy's and scipy's) and jemalloc's background thread (pyarrow's), and
    both libraries reset them in a forked child (pthread_atfork handlers), as every numpy program under
    multiprocessing's fork start method relies on."""
    if threading.active_count() > 1:
        names = ", ".join(t.name for t in threading.enumerate() if t is not threading.main_thread())
        return f"Python threads running after the imports ({names}): a fork copies only the calling one"
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        return "CUDA initialized by an import (a forked child cannot use it)"
    # the CUDA driver is loaded only by a CUDA call (torch.cuda.is_available() counting devices counts), which
    # torch.cuda.is_initialized() does not see; a forked child cannot initialize it again. Not tried on a GPU yet.
    if any("libcuda.so" in line for line in Path("/proc/self/maps").read_text().splitlines()):
        return "the CUDA driver loaded by an import (a forked child cannot use it)"
    return ""


def serve(fd: int, preload: list[str]) -> None:
    """The server: import `preload`, report whether forking is safe, then fork one child per job until the caller
    closes the socket. Ctrl-C reaches the child (same process group), which marks its run; the server ignores it.
    A SIGTERM (the caller stopping: ForkServer.close(stop_child=True)) is passed on to the child, which marks its
    run FAILED as a `kill` of a fresh one would."""
    child = [0]  # the running child's pid, 0 between children

    def pass_on(signum, frame) -> None:
        if child[0]:
            os.kill(child[0], signal.SIGTERM)
        else:
            raise SystemExit(0)

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, pass_on)
    sock = socket.socket(fileno=fd)
    for name in preload:
        importlib.import_module(name)
    unsafe = _why_unsafe()
    sock.send(json.dumps({"unsafe": unsafe}).encode())
    while not unsafe:
        message, fds, _, _ = socket.recv_fds(sock, MAX_MESSAGE, 1)
        if not message:
            return
        sys.stdout.flush()
        sys.stderr.flush()
        server = os.getpid()
        child[0] = pid = os.fork()
        if pid == 0:
            sock.close()
            _child(json.loads(message), fds[0], server)  # raises SystemExit: the child exits as a fresh process would
        os.close(fds[0])
        _, status = os.waitpid(pid, 0)  # retried by Python after a signal handler (PEP 475)
        child[0] = 0
        try:
            sock.send(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}).encode())
        except OSError:  # the caller is gone (stopped while the child ran)
            return


def _child(job: dict, stderr_fd: int, server: int) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # until run_cli sets its own; the server's pass_on is not ours
    die_with_parent()  # dies with the server, which dies with the sweep (kill -9 included)
    if os.getppid() != server:  # the server died before the line above: nobody waits for this child
        os._exit(1)
    os.dup2(stderr_fd, 2)
    os.close(stderr_fd)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.environ.clear()
    os.environ.update(job["env"])
    os.chdir(job["cwd"])
    sys.path.insert(0, job["cwd"])  # as `python -m` puts the working folder first
    sys.argv = [job["module"], *job["args"]]
    sys.modules.pop(job["module"], None)  # preloaded for its imports; runpy executes it afresh as __main__ anyway
    runpy.run_module(job["module"], run_name="__main__", alter_sys=True)  # `python -m module`, imports cached
    raise SystemExit(0)


if __name__ == "__main__":
    serve(int(sys.argv[1]), [name for name in sys.argv[2].split(",") if name])
