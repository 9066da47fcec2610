"""Several processes (torchrun, gloo on CPU): the distributed response estimate is the one-process one.

One torchrun launch of 2 ranks on loopback computes a ``ResponseEstimator.estimate(..., distributed=True)``
of a tiny float64 MLP (Adam, 4 steps, 3 groups: rank 0 computes groups 0 and 2, rank 1 group 1; the process
group is joined by the estimator itself), then a second estimate in which only rank 1's streams run out. The
test process computes the same estimate on one process and compares.

Agreement is asserted bit for bit: each group is computed by one rank with the same operations on the same
inputs as on one process (same trajectory: every rank replays the window; same batches: the other groups'
batches are drawn and dropped; one thread per process on the same machine), and the all-reduce adds only
exact zeros to it. The groups differ from each other and from zero, so a rank that skipped or misplaced its
groups, or a wrong count of dropped batches (target_batches != batches_per_step here), fails the test.
"""

from __future__ import annotations

import itertools
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import WORLD, run_torchrun, skip_without_torchrun
from torch import nn

from commute.response import ResponseEstimator, ResponseReport

pytestmark = pytest.mark.usefixtures("one_thread")

DT = torch.float64
DOMAINS = ("a", "b", "c")
WEIGHTS = [{"a": 0.5, "b": 0.3, "c": 0.2}, {"a": 0.4, "b": 0.4, "c": 0.2}, {"a": 0.2, "b": 0.3, "c": 0.5},
           {"a": 0.3, "b": 0.3, "c": 0.4}]
# 3 groups: the ranks do 2 and 1; "c" is in no target, so its loss_groups column is NaN
ESTIMATE = dict(targets=["a", "b"], n_groups=3, batches_per_step=1, target_batches=2)
HELD = dict(targets=["a", "b"], n_groups=3, batches_per_step=1)  # with held_out() as target_data
# with Adam's variance channel: its own part of G (gn_groups) is summed over the ranks as well
NOISE = dict(ESTIMATE, batches_per_step=2, noise="exact", train_batch_size=12)
RUN_OUT = 8  # rank 1's batches per stream in the failing estimate: it runs out inside its group 1


class Stream:
    """Independent random batches ``(x, y)`` of domain ``k``: the same seeded sequence at every ``iter()``."""

    def __init__(self, k: int, limit: int | None = None) -> None:
        self.k, self.limit = k, limit

    def __iter__(self):
        gen = torch.Generator().manual_seed(100 + self.k)
        centre = torch.randn(4, generator=gen, dtype=DT)
        proj = 2 * torch.randn(4, 3, generator=gen, dtype=DT)
        for _ in itertools.count() if self.limit is None else range(self.limit):
            x = torch.randn(6, 4, generator=gen, dtype=DT) + centre
            yield x, (x @ proj).argmax(1)


def ce(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def train_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The window's training batches: 4 rows of every domain, drawn from seeds the streams do not use."""
    its = [iter(Stream(10 + k)) for k in range(len(DOMAINS))]
    out = []
    for _ in WEIGHTS:
        xs, ys = zip(*(next(it) for it in its), strict=True)
        out.append((torch.cat([x[:4] for x in xs]), torch.cat([y[:4] for y in ys])))
    return out


def held_out() -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
    """A fixed held-out set (``target_data``) for the targets' domains, from seeds nothing else uses."""
    return {d: [next(iter(Stream(20 + k + 10 * i))) for i in range(2)] for k, d in enumerate(DOMAINS[:2])}


def estimator(limit: int | None = None) -> ResponseEstimator:
    """The estimator the ranks and the test both build: a tanh MLP with fixed float64 weights, Adam."""
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.7 * torch.randn(p.shape, generator=gen, dtype=DT))
    streams = {d: Stream(k, limit) for k, d in enumerate(DOMAINS)}
    return ResponseEstimator(model, ce, streams, lr=0.05, optimizer="adam")


WORKER = textwrap.dedent("""
    import sys
    from pathlib import Path

    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, sys.argv[2])
    from test_distributed_response import (ESTIMATE, HELD, NOISE, RUN_OUT, WEIGHTS, estimator, held_out,
                                           train_batches)

    from commute import distributed
    from commute.errors import CommuteError

    root = Path(sys.argv[1])
    assert not torch.distributed.is_initialized()  # the estimator joins torchrun's process group itself
    rep = estimator().estimate(train_batches(), WEIGHTS, **ESTIMATE, distributed=True)
    world = distributed.current()
    assert world.world_size == 2
    rep.to_json(root / f"response_rank{world.rank}.json")
    rep = estimator().estimate(train_batches(), WEIGHTS, **HELD, target_data=held_out(), distributed=True)
    rep.to_json(root / f"response_td_rank{world.rank}.json")
    rep = estimator().estimate(train_batches(), WEIGHTS, **NOISE, distributed=True)
    rep.to_json(root / f"response_noise_rank{world.rank}.json")
    # only rank 1's streams run out: both ranks must raise (rank 0 at the collective), neither may hang
    try:
        estimator(RUN_OUT if world.rank == 1 else None).estimate(train_batches(), WEIGHTS, **ESTIMATE,
                                                                 distributed=True)
        message = "no error"
    except CommuteError as exc:
        message = str(exc)
    (root / f"failure_rank{world.rank}.txt").write_text(message)
    # leave the process group together: a rank destroying it while the other still exits can abort gloo
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
""")


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """One launch of 2 gloo ranks on loopback running WORKER; returns the folder of its reports."""
    skip_without_torchrun()
    root = tmp_path_factory.mktemp("dist_response")
    run_torchrun(root, WORKER, str(root), str(Path(__file__).parent))
    return root


@pytest.mark.parametrize("held", [False, True], ids=["drawn-target", "target_data"])
def test_distributed_response_estimate_equals_one_process(launched, held: bool) -> None:
    one = (estimator().estimate(train_batches(), WEIGHTS, **HELD, target_data=held_out()) if held else
           estimator().estimate(train_batches(), WEIGHTS, **ESTIMATE))
    # the groups are distinct and non-zero: a skipped or misplaced group cannot pass unnoticed
    G = one.n_groups
    assert np.all(one.g_groups != 0) and np.all(one.g0_groups != 0)
    assert all(not np.array_equal(one.g_groups[g], one.g_groups[h]) for g in range(G) for h in range(g))
    assert np.isnan(one.loss_groups[:, 2]).all() and np.isfinite(one.loss_groups[:, :2]).all()
    reps = [ResponseReport.from_json(launched / f"response{'_td' if held else ''}_rank{r}.json")
            for r in range(WORLD)]
    for rep in reps:
        assert np.array_equal(rep.g_groups, one.g_groups)  # bit for bit (see the module docstring)
        assert np.array_equal(rep.g0_groups, one.g0_groups)
        assert np.array_equal(rep.loss_groups, one.loss_groups, equal_nan=True)
        assert rep.train_losses == one.train_losses
        assert (rep.n_grad, rep.n_graph, rep.n_hvp, rep.n_vjp) == (one.n_grad, one.n_graph, one.n_hvp,
                                                                   one.n_vjp)
        assert rep.meta["world_size"] == WORLD and "world_size" not in one.meta
        assert {k: v for k, v in rep.meta.items() if k != "world_size"} == one.meta
        assert str(rep.predict("a", {"b": np.ones(rep.n_steps)})) == str(one.predict("a", {"b": np.ones(4)}))


def test_distributed_noise_part_equals_one_process(launched) -> None:
    """With a noise channel the report's noise part (gn_groups) is gathered like G: bit for bit."""
    one = estimator().estimate(train_batches(), WEIGHTS, **NOISE)
    assert one.gn_groups is not None and np.all(one.gn_groups != 0)
    for r in range(WORLD):
        rep = ResponseReport.from_json(launched / f"response_noise_rank{r}.json")
        assert np.array_equal(rep.g_groups, one.g_groups) and np.array_equal(rep.gn_groups, one.gn_groups)


def test_a_failure_on_one_rank_is_raised_on_every_rank(launched) -> None:
    assert "domain 'a' ran out of batches after 8" in (launched / "failure_rank1.txt").read_text()
    assert (launched / "failure_rank0.txt").read_text() == (
        "the distributed response estimate failed on another process (its message is in that process's "
        "output).")
