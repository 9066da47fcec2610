"""Shared test fixtures."""

from __future__ import annotations

import importlib.util
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

#: Distinguishable synthetic domains (different alphabets): name, alphabet, seed.
ALPHABETS = (("a", "abcdefg ", 0), ("b", "xyz.,!? ", 1), ("c", "hijklmn\n", 2))


def write_corpora(root: Path, n_domains: int = 2, n_docs: int = 200) -> dict[str, str]:
    """``n_domains`` synthetic corpora of ``n_docs`` blank-line separated documents in ``root``;
    name -> path of its ``.txt``."""
    out = {}
    for name, alphabet, seed in ALPHABETS[:n_domains]:
        r = random.Random(seed)
        docs = ["".join(r.choice(alphabet) for _ in range(r.randint(50, 150))) for _ in range(n_docs)]
        p = Path(root) / f"{name}.txt"
        p.write_text("\n\n".join(docs), encoding="utf-8")
        out[name] = str(p)
    return out


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> dict[str, str]:
    """Two synthetic corpora (:func:`write_corpora`), shared by a test module."""
    return write_corpora(tmp_path_factory.mktemp("corpora"))


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def domains(corpora, cache):
    from commute.data import load_domains

    return load_domains(corpora, cache_dir=cache)


@pytest.fixture
def one_thread():
    """Tiny models run fastest (and least disturbed by other processes) on one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --------------------------------------------------------------------------------------------------
# torchrun launches (gloo on loopback) for the multi-process tests
# --------------------------------------------------------------------------------------------------
#: ranks of every torchrun launch in the tests, and how long one may take
WORLD = 2
LAUNCH_TIMEOUT_S = 120


def skip_without_torchrun() -> None:
    """Skip the calling test unless this torch build has gloo and torchrun (torch.distributed.run)."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("this torch build has no gloo backend")
    if importlib.util.find_spec("torch.distributed.run") is None:
        pytest.skip("this torch build has no torchrun (torch.distributed.run)")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_torchrun(root: Path, worker: str, *args: str) -> subprocess.Popen:
    """Write ``worker`` to ``root/worker.py`` and start it under torchrun on :data:`WORLD` gloo ranks on
    loopback (one thread each, no inherited torchrun environment) with ``args``; :func:`finish_torchrun`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(k, None)
    if Path("/sys/class/net/lo").exists():
        env["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
    (root / "worker.py").write_text(worker)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD), "--nnodes", "1",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(root / "worker.py"), *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=root)


def finish_torchrun(root: Path, proc: subprocess.Popen) -> subprocess.CompletedProcess:
    """Wait for a :func:`start_torchrun` launch (at most :data:`LAUNCH_TIMEOUT_S`), keep its output in
    ``root/launch.log`` and require that every rank succeeded."""
    try:
        stdout, stderr = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
        pytest.fail(f"the torchrun launch did not finish in {LAUNCH_TIMEOUT_S} s: {stderr[-3000:]}")
    (root / "launch.log").write_text(stdout + "\n----\n" + stderr)
    assert proc.returncode == 0, (stdout[-3000:], stderr[-6000:])
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def run_torchrun(root: Path, worker: str, *args: str) -> subprocess.CompletedProcess:
    """:func:`start_torchrun` then :func:`finish_torchrun`."""
    return finish_torchrun(root, start_torchrun(root, worker, *args))


# --------------------------------------------------------------------------------------------------
# memory: how many tensors autograd graphs hold at once
# --------------------------------------------------------------------------------------------------
class _Held:
    def __init__(self, live: LiveSaved, t: torch.Tensor) -> None:
        self.live, self.t = live, t.detach()
        live.now += 1
        live.peak = max(live.peak, live.now)

    def __del__(self) -> None:
        self.live.now -= 1


class LiveSaved:
    """Counts the tensors autograd graphs hold (saved for backward) alive at once. It holds a detached alias
    (autograd re-attaches the graph when unpacking): a reference to a saved *output* itself (also through a
    closure) would make a cycle through its grad_fn, freed only by the garbage collector, at random times."""

    def __init__(self) -> None:
        self.now = self.peak = 0

    def run(self, fn) -> int:
        """The peak number of saved tensors alive while ``fn()`` runs (all freed when it returns)."""
        self.now = self.peak = 0
        with torch.autograd.graph.saved_tensors_hooks(lambda t: _Held(self, t), lambda held: held.t):
            fn()
        assert self.now == 0
        return self.peak
