"""Several processes (torchrun, gloo on CPU): training and the bracket estimator equal the one-process ones.

Truth is the plain single-process run of the same config (float64, so agreement is tight): one torchrun launch
of 2 ranks on loopback trains through the CLI, resumes a 1-rank checkpoint, trains a domain-weighted run
through the Python API and splits a bracket estimate's groups; the test process then compares with its own
1-rank runs and estimate, and resumes the 2-rank checkpoint on 1 rank. Unit tests check the sampler's
shards and the one-sentence refusals without starting processes.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import WORLD, run_torchrun, skip_without_torchrun, write_corpora

from commute.distributed import SINGLE, World, env_world, shard_batch, shard_rows
from commute.errors import CommuteError
from commute.train import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")

TIMING = ("tokens_per_s", "elapsed_s")


def _config(root: Path, **kw) -> dict:
    base = dict(
        model="tiny",
        model_overrides={"n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 32},
        domains=write_corpora(root),
        cache_dir=str(root / "cache"),
        seq_len=32,
        batch_size=8,
        grad_accum=2,
        steps=8,
        lr=3e-3,
        eval_every=4,
        eval_batches=3,  # odd: the ranks evaluate 2 and 1 batches
        log_every=1,
        ckpt_every=4,
        tensorboard=False,
        dtype="float64",
        device="cpu",
    )
    base.update(kw)
    return base


def _dom_config(root: Path) -> dict:
    return _config(root, loss_weighting="domain", sampler_mode="exact", grad_accum=1, steps=3, ckpt_every=0,
                   eval_every=0, schedule={"type": "constant", "weights": {"a": 0.7, "b": 0.3}})


def _source(root: Path):
    """A fixed global batch per step (a ``batch_source``): each rank must take its rows of it."""
    from commute.data import MixtureSampler, load_domains

    cfg = json.loads((root / "cfg.json").read_text())
    sampler = MixtureSampler(load_domains(cfg["domains"], cache_dir=cfg["cache_dir"]), 6, 32, seed=11)
    batches = [sampler.next_batch({"a": 0.5, "b": 0.5}) for _ in range(3)]
    return lambda t: batches[t]


ESTIMATE = dict(n_grad_batches=6, n_hvp_batches=3, n_groups=3, mode="pairs")  # 3 groups: ranks do 2 and 1


def _estimator(root: Path):
    """The bracket estimator the worker and the test both build: the reference run's step-4 weights."""
    from commute.data import load_domains
    from commute.estimate import BracketEstimator
    from commute.model import lm_loss
    from commute.train import load_checkpoint

    cfg = json.loads((root / "cfg.json").read_text())
    doms = load_domains(cfg["domains"], cache_dir=cfg["cache_dir"])
    model = load_checkpoint(root / "ref" / "checkpoints" / "step_00000004").model
    return BracketEstimator(model, lm_loss, {n: d.batches(4, 32, seed=7) for n, d in doms.items()})


def _held(root: Path) -> dict:
    """A fixed held-out set per domain (``target_data``): 2 validation batches of 4 windows."""
    from commute.data import load_domains

    cfg = json.loads((root / "cfg.json").read_text())
    doms = load_domains(cfg["domains"], cache_dir=cfg["cache_dir"])
    return {n: d.val_batches(2, 4, 32) for n, d in doms.items()}


WORKER = textwrap.dedent("""
    import json, sys
    from pathlib import Path

    import torch

    torch.set_num_threads(1)
    from commute import distributed
    from commute.cli import main
    from commute.train import train

    sys.path.insert(0, sys.argv[2])
    from test_distributed import ESTIMATE, _estimator, _held, _source

    root = Path(sys.argv[1])
    torch.distributed.init_process_group("gloo")  # once: commute uses it (and leaves it to its creator)
    # 1. the CLI, a fresh run stopped at step 4; 2. the CLI resuming a 1-rank checkpoint on 2 ranks
    assert main(["train", str(root / "cfg.yaml"), "--out", str(root / "two"), "--max-steps", "4",
                 "--no-progress"]) == 0
    assert main(["train", str(root / "cfg.yaml"), "--out", str(root / "one_then_two"), "--no-progress"]) == 0
    # 3. the Python API: domain-weighted loss, exact sampler
    world = distributed.current()
    assert world.world_size == 2
    res = train(json.loads((root / "dom.json").read_text()), root / "dom", progress=False)
    if world.main:
        (root / "dom_losses.json").write_text(json.dumps(res.losses))
    # 4. given global batches (batch_source), domain-weighted
    dom = json.loads((root / "dom.json").read_text())
    train(dom, root / "src", batch_source=_source(root), progress=False)
    # 5. the bracket estimate, groups split over the ranks
    rep = _estimator(root).estimate(**ESTIMATE, distributed=True)
    rep.to_json(root / f"estimate_rank{world.rank}.json")
    rep = _estimator(root).estimate(**ESTIMATE, target_data=_held(root), distributed=True)
    rep.to_json(root / f"estimate_td_rank{world.rank}.json")
    torch.distributed.destroy_process_group()
""")


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return [{k: v for k, v in r.items() if k not in TIMING} for r in csv.DictReader(fh)]


def _assert_rows_close(a: list[dict[str, str]], b: list[dict[str, str]], rtol: float = 1e-10) -> None:
    assert len(a) == len(b)
    for ra, rb in zip(a, b, strict=True):
        assert ra.keys() == rb.keys()
        for k in ra:
            if k.startswith("tokens/") or k == "step" or ra[k] == "" or rb[k] == "":
                assert ra[k] == rb[k], (ra["step"], k, ra[k], rb[k])  # integers and empty cells exactly
            else:
                assert math.isclose(float(ra[k]), float(rb[k]), rel_tol=rtol), (ra["step"], k, ra[k], rb[k])


def _weights(ck: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(ck / "model.safetensors"))


def _assert_checkpoints_close(a: Path, b: Path, rtol: float = 1e-9) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=rtol, atol=1e-12, msg=k)
    oa = torch.load(a / "optimizer.pt", weights_only=True)
    ob = torch.load(b / "optimizer.pt", weights_only=True)
    for i, s in oa["state"].items():
        for k, v in s.items():
            torch.testing.assert_close(v, ob["state"][i][k], rtol=rtol, atol=1e-14, msg=f"{i}.{k}")
    sa, sb = (json.loads((c / "state.json").read_text()) for c in (a, b))
    for key in ("step", "sampler", "tokens", "config_hash", "config", "domain_names"):
        assert sa[key] == sb[key], key
    assert sa["interval"]["n"] == sb["interval"]["n"]
    assert sa["interval"]["dom_n"] == sb["interval"]["dom_n"]


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """One launch of 2 gloo ranks on loopback (see WORKER), next to the 1-rank runs it is compared with."""
    skip_without_torchrun()
    import yaml

    root = tmp_path_factory.mktemp("dist")
    cfg = _config(root)
    (root / "cfg.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    (root / "cfg.json").write_text(json.dumps(cfg))
    (root / "dom.json").write_text(json.dumps(_dom_config(root)))
    # 1-rank references: the uninterrupted run, and a run stopped at step 4 for the 2 ranks to resume
    train(cfg, root / "ref", progress=False)
    train(cfg, root / "one_then_two", max_steps=4, progress=False)
    proc = run_torchrun(root, WORKER, str(root), str(Path(__file__).parent))
    return root, proc


def test_two_ranks_train_the_one_rank_trajectory(launched) -> None:
    root, proc = launched
    two, ref = root / "two" / "checkpoints", root / "ref" / "checkpoints"
    assert sorted(p.name for p in two.iterdir()) == ["latest", "step_00000004"]  # rank 0 wrote it, once
    _assert_checkpoints_close(two / "step_00000004", ref / "step_00000004")
    state = json.loads((two / "step_00000004" / "state.json").read_text())
    assert state["world_size"] == WORLD
    assert "world_size" not in json.loads((ref / "step_00000004" / "state.json").read_text())
    # metrics: every row of the 1-rank run up to step 4 (losses, per-domain losses, validation, tokens)
    _assert_rows_close(_rows(root / "two" / "metrics.csv"), _rows(root / "ref" / "metrics.csv")[:5])
    assert (root / "two" / "config.yaml").read_text() == (root / "ref" / "config.yaml").read_text()
    assert proc.stdout.count("step 4: validation loss") == 1  # rank 0 reports


def test_two_rank_checkpoint_resumes_on_one_rank(launched, tmp_path) -> None:
    root, _ = launched
    run = tmp_path / "two"
    shutil.copytree(root / "two", run)
    res = train(json.loads((root / "cfg.json").read_text()), run, progress=False)
    assert res.step == 8
    _assert_checkpoints_close(run / "checkpoints" / "step_00000008",
                              root / "ref" / "checkpoints" / "step_00000008")
    _assert_rows_close(_rows(run / "metrics.csv"), _rows(root / "ref" / "metrics.csv"))


def test_one_rank_checkpoint_resumes_on_two_ranks(launched) -> None:
    root, _ = launched
    ck = root / "one_then_two" / "checkpoints"
    _assert_checkpoints_close(ck / "step_00000008", root / "ref" / "checkpoints" / "step_00000008")
    _assert_rows_close(_rows(root / "one_then_two" / "metrics.csv"), _rows(root / "ref" / "metrics.csv"))


def test_domain_weighted_loss_is_the_global_one(launched, tmp_path) -> None:
    root, _ = launched
    one = train(json.loads((root / "dom.json").read_text()), tmp_path / "dom", progress=False)
    two = {int(k): v for k, v in json.loads((root / "dom_losses.json").read_text()).items()}
    assert two.keys() == one.losses.keys()
    for t in one.losses:
        assert math.isclose(two[t], one.losses[t], rel_tol=1e-12)
    _assert_checkpoints_close(root / "dom" / "checkpoints" / "step_00000003",
                              tmp_path / "dom" / "checkpoints" / "step_00000003")


def test_given_batches_are_split_across_ranks(launched, tmp_path) -> None:
    root, _ = launched
    train(json.loads((root / "dom.json").read_text()), tmp_path / "src", batch_source=_source(root),
          progress=False)
    _assert_checkpoints_close(root / "src" / "checkpoints" / "step_00000003",
                              tmp_path / "src" / "checkpoints" / "step_00000003")
    rows = _rows(tmp_path / "src" / "metrics.csv")
    assert rows[-1]["tokens/a"] != "" and int(rows[-1]["tokens/a"]) + int(rows[-1]["tokens/b"]) == 3 * 6 * 32
    _assert_rows_close(_rows(root / "src" / "metrics.csv"), rows)


@pytest.mark.parametrize("held", [False, True], ids=["drawn-target", "target_data"])
def test_distributed_bracket_estimate_equals_one_process(launched, held: bool) -> None:
    root, _ = launched
    one = _estimator(root).estimate(**ESTIMATE, **({"target_data": _held(root)} if held else {}))
    reps = [json.loads((root / f"estimate{'_td' if held else ''}_rank{r}.json").read_text())
            for r in range(WORLD)]
    assert ("target_data" in one.meta) == held
    for rep in reps:
        np.testing.assert_allclose(rep["p_groups"], one.p_groups, rtol=1e-9, atol=1e-15)
        np.testing.assert_allclose(rep["loss_groups"], one.loss_groups, rtol=1e-12)
        assert (rep["n_hvp"], rep["n_grad"], rep["n_groups"]) == (one.n_hvp, one.n_grad, one.n_groups)
        assert rep["meta"]["world_size"] == WORLD
    assert reps[0]["p_groups"] == reps[1]["p_groups"]  # every rank holds the same report


# --------------------------------------------------------------------------------------------------
# without processes
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["sample", "exact"])
def test_sampler_shards_stack_to_the_global_batch(tmp_path, mode) -> None:
    from commute.data import MixtureSampler, load_domains

    doms = load_domains(write_corpora(tmp_path), cache_dir=str(tmp_path / "cache"))
    whole = MixtureSampler(doms, 12, 16, seed=3, mode=mode)
    shards = [MixtureSampler(doms, 12, 16, seed=3, mode=mode) for _ in range(3)]
    for t in range(4):
        w = {"a": 0.3 + 0.1 * t, "b": 0.7 - 0.1 * t}
        b = whole.next_batch(w)
        parts = [s.next_batch(w, shard=(r, 3)) for r, s in enumerate(shards)]
        assert torch.equal(torch.cat([p.input_ids for p in parts]), b.input_ids)
        assert torch.equal(torch.cat([p.domain for p in parts]), b.domain)
        assert all(s.state_dict() == whole.state_dict() for s in shards)  # the state stays global
    with pytest.raises(CommuteError, match="not divisible by the 5 processes"):
        whole.next_batch({"a": 1.0}, shard=(0, 5))


def test_shard_rows_and_batches() -> None:
    from commute.data import Batch

    w = World(rank=1, world_size=2)
    assert shard_rows(8, w) == slice(4, 8)
    ids, dom = torch.arange(16).view(8, 2), torch.arange(8) % 2
    assert torch.equal(shard_batch(ids, w), ids[4:])
    b = shard_batch(Batch(input_ids=ids, domain=dom, step=0), w)
    assert torch.equal(b.input_ids, ids[4:]) and torch.equal(b.domain, dom[4:])
    assert shard_batch(ids, SINGLE) is ids
    with pytest.raises(CommuteError, match="not divisible"):
        shard_rows(7, w)


def test_environment_parsing(monkeypatch) -> None:
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert env_world() == SINGLE
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert env_world() == SINGLE  # torchrun --nproc_per_node 1: a plain run
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert env_world() == World(rank=3, world_size=4, local_rank=1)
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(CommuteError, match="RANK"):
        env_world()


@pytest.mark.parametrize(("changes", "match"), [
    ({"batch_size": 8}, "batch_size=8 is not divisible by the 3 processes"),
    ({"batch_size": 9, "device": "cuda:1"}, "every process uses the GPU of its LOCAL_RANK"),
])
def test_torchrun_misconfigurations_are_one_sentence_before_waiting(tmp_path, monkeypatch, changes,
                                                                    match) -> None:
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(CommuteError, match=match):
        train(TrainConfig(**_config(tmp_path, **changes)), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
    assert not torch.distributed.is_initialized()


def test_process_group_timeout_comes_from_the_environment(monkeypatch) -> None:
    """setup gives init_process_group an explicit timeout (NCCL's default 10 minutes would kill a run whose
    ranks wait at GroupSplit.settle for a long response group): COMMUTE_DIST_TIMEOUT_S, else 3 hours; a bad
    value is one sentence before any process group exists."""
    from datetime import timedelta

    import commute.distributed as D

    monkeypatch.delenv("COMMUTE_DIST_TIMEOUT_S", raising=False)
    assert D.timeout() == timedelta(hours=3)
    monkeypatch.setenv("COMMUTE_DIST_TIMEOUT_S", "90.5")
    assert D.timeout() == timedelta(seconds=90.5)
    calls = []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda *a, **kw: calls.append((a, kw)))
    monkeypatch.setattr(D, "_INITIALISED_HERE", False)
    monkeypatch.setattr(D.atexit, "register", lambda f: f)
    for k, v in (("WORLD_SIZE", "2"), ("RANK", "1"), ("LOCAL_RANK", "1")):
        monkeypatch.setenv(k, v)
    D.setup("cpu")
    assert calls == [(("gloo",), {"timeout": timedelta(seconds=90.5)})]
    for bad in ("0", "-5", "ten", "inf", "nan"):
        monkeypatch.setenv("COMMUTE_DIST_TIMEOUT_S", bad)
        want = rf"^environment variable COMMUTE_DIST_TIMEOUT_S='{bad}' must be a positive number of seconds "
        with pytest.raises(CommuteError, match=want + r".*\)\.$"):
            D.setup("cpu")
    assert len(calls) == 1


def test_device_refusals_are_one_helper_for_train_and_the_estimators(tmp_path, monkeypatch) -> None:
    from commute.audit import _join
    from commute.distributed import check_device

    two = World(rank=0, world_size=2)
    check_device(SINGLE, "mps", "training")  # one process: any device
    check_device(two, "cuda", "training")
    with pytest.raises(CommuteError, match=r"^training on several processes needs cpu or cuda devices, not "
                                           r"mps\.$"):
        check_device(two, "mps", "training")
    for k, v in (("WORLD_SIZE", "2"), ("RANK", "0"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(k, v)
    want = (r"^device 'cuda:1' names one GPU, but under torchrun every process uses the GPU of its "
            r"LOCAL_RANK; use the device cuda \(or auto\)\.$")
    with pytest.raises(CommuteError, match=want):
        _join(True, "cuda:1")
    with pytest.raises(CommuteError, match=r"^estimating on several processes needs cpu or cuda devices"):
        _join(True, "mps")
    with pytest.raises(CommuteError, match=r"^training on several processes needs cpu or cuda devices"):
        train(TrainConfig(**_config(tmp_path, device="mps")), tmp_path / "run", progress=False)
    assert not torch.distributed.is_initialized()
