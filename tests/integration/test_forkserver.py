"""The warm server a sweep forks its children from (lora_efficiency.forkserver, children.WarmChildren): each child
is a process of its own, with its own environment, stderr and exit status, forked from one server; a server that
cannot fork safely is refused."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from lora_efficiency import children
from lora_efficiency.forkserver import ForkServer, _why_unsafe
from lora_efficiency.subprocesses import child_env

# `python -m probe_child <code> [signal [server] | wait]`: says who it is on stderr, then exits with <code>, or sends
# [signal] to itself (or to its server), or writes its pid to probe.pid and waits for a SIGTERM (noted in probe.term)
PROBE = """
import os, signal, sys
print(f"pid={os.getpid()} ppid={os.getppid()} probe={os.environ.get('PROBE', '')} argv={sys.argv[1:]}", file=sys.stderr)
if sys.argv[2:] == ["wait"]:
    def noted(signum, frame):
        open("probe.term", "w").write(signal.Signals(signum).name)
        sys.exit(143)
    signal.signal(signal.SIGTERM, noted)
    open("probe.pid", "w").write(str(os.getpid()))
    signal.pause()
elif len(sys.argv) > 2:
    os.kill(os.getppid() if sys.argv[3:] == ["server"] else os.getpid(), int(sys.argv[2]))
    signal.pause()
sys.exit(int(sys.argv[1]))
"""


class _Read:
    def __init__(self):
        self.text = ""

    def __call__(self, fd):
        while chunk := os.read(fd, 65536):
            self.text += chunk.decode()


def _said(text: str) -> dict[str, str]:
    (line,) = [ln for ln in text.splitlines() if ln.startswith("pid=")]
    return dict(part.split("=", 1) for part in line.split(" ", 3))


@pytest.fixture(scope="module")
def server():
    """A server with the imports of a training child (forkserver.PRELOAD): forking after them is safe."""
    env = child_env()
    server = ForkServer(env)
    yield server, env
    server.close()
    assert server.proc.returncode == 0  # the server ends when its socket closes


def test_children_are_forks_of_one_server_each_with_its_own_environment_stderr_and_exit_status(
    server, tmp_path, monkeypatch
):
    server, env = server
    assert server.unsafe == ""
    (tmp_path / "probe_child.py").write_text(PROBE)
    monkeypatch.chdir(tmp_path)  # `python -m` finds a module in the working folder
    first, second = _Read(), _Read()
    assert server.run("probe_child", ["0"], {**env, "PROBE": "one"}, first) == 0
    assert server.run("probe_child", ["3"], {**env, "PROBE": "two"}, second) == 3
    one, two = _said(first.text), _said(second.text)
    assert one["ppid"] == two["ppid"] == str(server.proc.pid)  # forked by the server
    assert len({one["pid"], two["pid"], str(server.proc.pid), str(os.getpid())}) == 4  # a process each
    assert (one["probe"], two["probe"]) == ("one", "two")
    assert (one["argv"], two["argv"]) == ("['0']", "['3']")
    assert "probe=two" not in first.text  # each child's stderr is its own


def test_a_child_killed_by_a_signal_is_reported_as_such_and_the_server_goes_on(server, tmp_path, monkeypatch):
    server, env = server
    (tmp_path / "probe_child.py").write_text(PROBE)
    monkeypatch.chdir(tmp_path)
    assert server.run("probe_child", ["0", "9"], env, _Read()) == -9  # as subprocess reports a SIGKILL
    assert server.run("probe_child", ["0"], env, _Read()) == 0
    assert server.serves(env) and not server.serves({**env, "OMP_NUM_THREADS": "1"})  # run ids aside, one env


def test_a_process_with_a_second_thread_is_not_forked():
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    try:
        assert "Python threads running after the imports" in _why_unsafe()
    finally:
        stop.set()
        thread.join()


def test_warm_children_start_a_new_server_when_the_environment_changes(tmp_path, monkeypatch):
    """A library may read the environment at import: a child whose environment differs (run ids aside) gets a
    server started with it."""
    (tmp_path / "probe_child.py").write_text(PROBE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(children, "TRAIN_MODULE", "probe_child")
    env = child_env()
    with children.WarmChildren(preload=()) as launch:  # the protocol alone: the fixture's server has the imports
        code, err = launch(["0"], {**env, "MLFLOW_RUN_ID": "a"})
        first = launch.server.proc.pid
        assert code == 0 and _said(err)["ppid"] == str(first)
        code, err = launch(["5"], {**env, "MLFLOW_RUN_ID": "b"})
        assert code == 5 and _said(err)["ppid"] == str(first)  # the same server: only a run id differed
        code, err = launch(["0"], {**env, "PROBE": "new"})
        assert code == 0 and _said(err)["ppid"] == str(launch.server.proc.pid) != str(first)
        assert _said(err)["probe"] == "new"


def test_a_server_that_dies_fails_its_child_and_the_next_child_gets_a_new_server(tmp_path, monkeypatch):
    """kill -9 of the server (the OOM killer's pick, a user): the child dies with it, the sweep records a failed
    child and goes on, and the next child is forked from a new server."""
    (tmp_path / "probe_child.py").write_text(PROBE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(children, "TRAIN_MODULE", "probe_child")
    env = child_env()
    with children.WarmChildren(preload=()) as launch:
        code, err = launch(["0", "9", "server"], env)
        first = launch.server.proc.pid
        assert code == -9 and _said(err)["ppid"] == str(first)
        code, err = launch(["0"], env)
        assert code == 0 and _said(err)["ppid"] == str(launch.server.proc.pid) != str(first)


def test_an_interrupted_sweep_stops_its_running_child_through_the_server(tmp_path, monkeypatch):
    """The sweep alone gets the signal (`kill <sweep pid>`: SIGTERM, which run_cli makes a KeyboardInterrupt, as
    this SIGINT to this process alone does): the server passes a SIGTERM on to its child, which a training child
    answers by marking its run FAILED; the child does not train on unwatched."""
    (tmp_path / "probe_child.py").write_text(PROBE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(children, "TRAIN_MODULE", "probe_child")
    pid_file = tmp_path / "probe.pid"

    def interrupt_once_the_child_runs():
        while not pid_file.exists() or not pid_file.read_text():
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt_once_the_child_runs, daemon=True).start()
    with pytest.raises(KeyboardInterrupt), children.WarmChildren(preload=()) as launch:
        launch(["0", "wait"], child_env())
    server = launch.server
    assert server is None  # closed on the way out
    assert (tmp_path / "probe.term").read_text() == "SIGTERM"  # a signal it can answer (a run marked FAILED)
    with pytest.raises(ProcessLookupError):  # and it ended, reaped: not training on
        os.kill(int(pid_file.read_text()), 0)
