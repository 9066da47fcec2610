"""parallel: fsdp (FSDP2, commute.fsdp) under torchrun equals the one-process run, and its checkpoints are the
one-process format.

Truth is the plain single-process run of the same config (float64; ``parallel`` has no effect on one
process). One torchrun launch of 2 gloo ranks on loopback runs ``commute train`` with ``parallel: fsdp``
(every block and the root sharded, gradient clipping on the global norm active at every step): a fresh run
stopped at step 4, a 1-rank checkpoint resumed on 2 ranks, and a Python-API run whose validation batches
have fewer rows than ranks, then a run whose checkpoint write fails on rank 0 only. The test process compares
with its own 1-rank runs and resumes the 2-rank checkpoint on 1 rank. Measured: parameters and Adam moments
agree to ~1e-15 (max abs difference), metrics to ~1e-16 relative. Without processes: the checkpoint writer
given the state dicts commute.fsdp gathers writes the module path's files, and the config field keeps
existing trajectory hashes.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import WORLD, run_torchrun, skip_without_torchrun
from test_distributed import (
    _assert_checkpoints_close,
    _assert_rows_close,
    _config,
    _rows,
    _weights,
)

from commute.errors import CommuteError
from commute.train import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")

GRAD_CLIP = 0.05  #: below the gradient norm of every step: the global norm decides each step's length


def _fsdp_config(root: Path, **kw) -> dict:
    """test_distributed's config (tiny GPT-2 with 2 blocks: 2 FSDP units and the root), sharded, clipped."""
    overrides = {"n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 32}
    return _config(root, parallel="fsdp", grad_clip=GRAD_CLIP, model_overrides=overrides, **kw)


def _val_batches() -> dict[str, list[torch.Tensor]]:
    """Validation batches of 1, 3 and 2 rows: with 2 ranks one rank has no row of the first."""
    g = torch.Generator().manual_seed(5)
    return {"a": [torch.randint(0, 256, (1, 32), generator=g), torch.randint(0, 256, (3, 32), generator=g)],
            "b": [torch.randint(0, 256, (2, 32), generator=g)]}


def _held(model: torch.nn.Module) -> list:
    """Is ``model`` an FSDP module, and the elements of its parameters this rank holds and in all."""
    from commute import fsdp

    params = list(model.parameters())
    local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in params)
    return [fsdp.is_sharded(model), local, sum(p.numel() for p in params)]


def _rows_config(cfg: dict) -> dict:
    """``cfg`` for the run with given validation batches: 3 steps, domain-weighted, evaluated at the end."""
    return {**cfg, "steps": 3, "ckpt_every": 0, "eval_every": 3, "loss_weighting": "domain",
            "sampler_mode": "exact", "grad_accum": 1}


WORKER = textwrap.dedent("""
    import json, sys
    from pathlib import Path

    import torch

    torch.set_num_threads(1)
    from commute.cli import main
    from commute.train import train

    sys.path.insert(0, sys.argv[2])
    from test_fsdp import _held, _val_batches

    root = Path(sys.argv[1])
    # commute train joins torchrun's process group itself (and leaves it at exit); cfg.yaml says ddp
    # 1. a fresh run stopped at step 4; 2. a 1-rank checkpoint at step 4 resumed on 2 ranks to step 8
    fsdp = ["--parallel", "fsdp", "--no-progress"]
    assert main(["train", str(root / "cfg.yaml"), "--out", str(root / "two"), "--max-steps", "4", *fsdp]) == 0
    assert main(["train", str(root / "cfg.yaml"), "--out", str(root / "one_then_two"), *fsdp]) == 0
    # 3. the Python API: validation batches with fewer rows than ranks, domain-weighted loss; a callback
    # records what each rank holds of the parameters after each step
    held = []
    res = train(json.loads((root / "rows_cfg.json").read_text()), root / "rows", val_batches=_val_batches(),
                progress=False, callbacks=[lambda info: held.append(_held(info.model))])
    if torch.distributed.get_rank() == 0:
        out = {"losses": res.losses, "val": res.val_losses, "held": held}
        (root / "rows.json").write_text(json.dumps(out))
    # 4. the write of the step-2 checkpoint fails on rank 0 only (a full disk, after the gather): every rank
    # must end with one sentence, none wait for the others
    import contextlib, io, os
    import commute.train as T

    def full_disk(path):
        raise OSError(28, "No space left on device (simulated)", str(path))

    rank = int(os.environ["RANK"])
    if rank == 0:
        T._sha256 = full_disk
    err = io.StringIO()
    try:  # what escapes main (e.g. gloo's error when rank 0 has left) fails this case only
        with contextlib.redirect_stderr(err):
            code = main(["train", str(root / "cfg.yaml"), "--out", str(root / "full"), "--max-steps", "2",
                         *fsdp])
    except Exception as exc:
        code = repr(exc)
    (root / f"full_rank{rank}.json").write_text(json.dumps({"code": code, "err": err.getvalue()}))
    # leave the process group together: a rank destroying it while the other still exits can abort gloo
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
""")


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """One launch of 2 gloo ranks (see WORKER), next to the 1-rank runs it is compared with."""
    skip_without_torchrun()
    from commute import fsdp

    if not fsdp.available():
        pytest.skip("this torch build has no FSDP2 (torch.distributed.fsdp.fully_shard)")
    import yaml

    root = tmp_path_factory.mktemp("fsdp")
    cfg = _fsdp_config(root)
    (root / "cfg.yaml").write_text(yaml.safe_dump({**cfg, "parallel": "ddp"}, sort_keys=False))  # --parallel
    (root / "cfg.json").write_text(json.dumps(cfg))
    (root / "rows_cfg.json").write_text(json.dumps(_rows_config(cfg)))
    # 1-rank references: the uninterrupted run, and a run stopped at step 4 for the 2 ranks to resume (written
    # with parallel: ddp, the default: the field may differ on resume)
    train(cfg, root / "ref", progress=False)
    train({**cfg, "parallel": "ddp"}, root / "one_then_two", max_steps=4, progress=False)
    proc = run_torchrun(root, WORKER, str(root), str(Path(__file__).parent))
    return root, proc


def _assert_same_format(a: Path, b: Path) -> None:
    """Checkpoints ``a`` and ``b`` have the same files in the same format: tensor names, dtypes, shapes and
    safetensors metadata (the tied head stored once), the optimiser's numbering and groups."""
    from safetensors import safe_open

    with safe_open(str(a / "model.safetensors"), "pt") as fa, \
            safe_open(str(b / "model.safetensors"), "pt") as fb:
        assert sorted(fa.keys()) == sorted(fb.keys())
        assert fa.metadata() == fb.metadata()
    wa, wb = _weights(a), _weights(b)
    assert {k: (v.dtype, v.shape) for k, v in wa.items()} == {k: (v.dtype, v.shape) for k, v in wb.items()}
    oa = torch.load(a / "optimizer.pt", weights_only=True)
    ob = torch.load(b / "optimizer.pt", weights_only=True)
    assert oa.keys() == ob.keys() and oa["param_groups"] == ob["param_groups"]
    assert list(oa["state"]) == list(ob["state"])
    for i in oa["state"]:
        assert oa["state"][i].keys() == ob["state"][i].keys()
        for k, v in oa["state"][i].items():
            assert (v.dtype, v.shape, v.device) == (ob["state"][i][k].dtype, ob["state"][i][k].shape,
                                                    ob["state"][i][k].device), (i, k)


def test_fsdp_ranks_train_the_one_rank_trajectory(launched) -> None:
    root, proc = launched
    two, ref = root / "two" / "checkpoints", root / "ref" / "checkpoints"
    assert sorted(p.name for p in two.iterdir()) == ["latest", "step_00000004"]  # rank 0 wrote it, once
    _assert_same_format(two / "step_00000004", ref / "step_00000004")
    _assert_checkpoints_close(two / "step_00000004", ref / "step_00000004")
    state = json.loads((two / "step_00000004" / "state.json").read_text())
    assert state["world_size"] == WORLD and state["config"]["parallel"] == "fsdp"
    _assert_rows_close(_rows(root / "two" / "metrics.csv"), _rows(root / "ref" / "metrics.csv")[:5])
    assert proc.stdout.count("step 4: validation loss") == 1  # rank 0 reports


def test_fsdp_checkpoint_resumes_on_one_rank(launched, tmp_path) -> None:
    root, _ = launched
    run = tmp_path / "two"
    shutil.copytree(root / "two", run)
    res = train(json.loads((root / "cfg.json").read_text()), run, progress=False)
    assert res.step == 8
    _assert_checkpoints_close(run / "checkpoints" / "step_00000008",
                              root / "ref" / "checkpoints" / "step_00000008")
    _assert_rows_close(_rows(run / "metrics.csv"), _rows(root / "ref" / "metrics.csv"))


def test_one_rank_checkpoint_resumes_under_fsdp(launched) -> None:
    root, _ = launched
    ck = root / "one_then_two" / "checkpoints"
    assert json.loads((ck / "step_00000008" / "state.json").read_text())["world_size"] == WORLD
    _assert_same_format(ck / "step_00000008", root / "ref" / "checkpoints" / "step_00000008")
    _assert_checkpoints_close(ck / "step_00000008", root / "ref" / "checkpoints" / "step_00000008")
    _assert_rows_close(_rows(root / "one_then_two" / "metrics.csv"), _rows(root / "ref" / "metrics.csv"))


def test_fsdp_validation_with_fewer_rows_than_ranks(launched, tmp_path) -> None:
    root, _ = launched
    cfg = json.loads((root / "rows_cfg.json").read_text())
    one = train(cfg, tmp_path / "rows", val_batches=_val_batches(), progress=False)
    two = json.loads((root / "rows.json").read_text())
    assert two["val"].keys() == one.val_losses.keys()
    for name, v in one.val_losses.items():
        assert v == pytest.approx(two["val"][name], rel=1e-12, abs=0), name
    assert {int(k): v for k, v in two["losses"].items()} == pytest.approx(one.losses, rel=1e-12, abs=0)
    # the ranks held sharded parameters: about half of the elements each (a shard is padded to equal size)
    assert len(two["held"]) == 3
    for sharded, local, total in two["held"]:
        assert sharded and total == json.loads((one.checkpoint / "state.json").read_text())["n_params"]
        assert total / WORLD <= local < total / WORLD + 1000


def test_a_checkpoint_write_failing_on_rank_0_ends_every_rank_with_one_sentence(launched) -> None:
    """The write runs inside distributed.on_main: rank 0 says its error, rank 1 one sentence pointing to it
    (before, rank 1 waited in a barrier that rank 0 never reached)."""
    from commute.checkpoint import list_checkpoints

    root, _ = launched
    r0, r1 = (json.loads((root / f"full_rank{r}.json").read_text()) for r in range(WORLD))
    assert (r0["code"], r1["code"]) == (1, 2)  # an OSError; a CommuteError
    last = r0["err"].rstrip().splitlines()[-1]
    assert last.startswith("error: No space left on device (simulated)") and last.endswith("files already "
                                                                                          "written are kept.")
    assert " ".join(r1["err"].split()) == ("error: the distributed training (writing the checkpoint of step "
                                           "2) failed on another process (its message is in that process's "
                                           "output).")
    assert "Traceback" not in r0["err"] + r1["err"]
    assert list_checkpoints(root / "full") == []  # the partial write was removed


# --------------------------------------------------------------------------------------------------
# without processes
# --------------------------------------------------------------------------------------------------
def test_one_process_ignores_parallel(tmp_path) -> None:
    """parallel: fsdp on one process is the plain run, bit for bit (and its trajectory hash)."""
    cfg = _config(tmp_path, steps=2, ckpt_every=0, eval_every=0)
    ddp = train(cfg, tmp_path / "ddp", progress=False)
    fs = train({**cfg, "parallel": "fsdp"}, tmp_path / "fsdp", progress=False)
    assert ddp.losses == fs.losses
    for f in ("model.safetensors", "optimizer.pt"):
        assert (ddp.checkpoint / f).read_bytes() == (fs.checkpoint / f).read_bytes(), f
    a, b = (json.loads((r.checkpoint / "state.json").read_text()) for r in (ddp, fs))
    assert a["config_hash"] == b["config_hash"]


def test_state_dict_checkpoint_is_the_module_checkpoint(tmp_path) -> None:
    """save_checkpoint given the full state dicts FSDP gathers writes the files of the modules: the state
    dicts are built by commute.fsdp's own gathering and numbering (full_model_state, full_optimizer_state:
    they also run on an unsharded module), so a wrong numbering of the optimiser's parameters fails here."""
    from commute import fsdp
    from commute.checkpoint import save_checkpoint
    from commute.model import build_model
    from commute.train import _build_optimizer, param_group_names

    torch.manual_seed(0)
    model = build_model("tiny", vocab_size=64, n_layer=1, n_embd=16, n_head=2, n_positions=16)
    opt = _build_optimizer(model, TrainConfig(optimizer="adam"))  # two groups: numbered across both
    model(input_ids=torch.randint(0, 64, (2, 8))).logits.sum().backward()
    opt.step()
    assert fsdp.tied_groups(model) == [["lm_head.weight", "transformer.wte.weight"]]
    state = {"step": 1, "config": {"seed": 0}}
    a = save_checkpoint(tmp_path / "a", 1, model, opt, state)
    names = param_group_names(model)
    by_name = fsdp.gather_optimizer_state(model, opt)
    assert by_name is not None and set(by_name["state"]) == {n for g in names for n in g}
    b = save_checkpoint(tmp_path / "b", 1, fsdp.full_model_state(model),
                        fsdp.full_optimizer_state(model, opt, names), state)
    c = save_checkpoint(tmp_path / "c", 1, model.state_dict(), fsdp.number_optimizer_state(by_name, names),
                        state)
    ref = torch.load(a / "optimizer.pt", weights_only=True)
    for ck in (b, c):
        assert (ck / "model.safetensors").read_bytes() == (a / "model.safetensors").read_bytes()
        # equal content (torch.save's bytes differ: the module's groups share one betas tuple object)
        got = torch.load(ck / "optimizer.pt", weights_only=True)
        assert got["param_groups"] == ref["param_groups"] and list(got["state"]) == list(ref["state"])
        for i, s in ref["state"].items():
            assert list(got["state"][i]) == list(s), i
            for k, v in s.items():
                w = got["state"][i][k]
                assert (w.dtype, w.shape) == (v.dtype, v.shape) and torch.equal(w, v), (i, k)
    with pytest.raises(CommuteError, match="differ from the model's"):
        fsdp.number_optimizer_state(by_name, [names[1], names[0]])


def test_parallel_field_is_checked_and_keeps_trajectory_hashes() -> None:
    with pytest.raises(CommuteError, match=r"^config field parallel must be ddp or fsdp, got 'zero3'\.$"):
        TrainConfig(parallel="zero3")
    cfg = TrainConfig(domains={"a": "x.txt"}, lr=2e-3)
    # the hash of a config written before the field existed (the RUN_FIELDS of then, no sampler_seed)
    then = ("steps", "eval_every", "eval_batches", "log_every", "ckpt_every", "ckpt_steps", "keep_last",
            "tensorboard", "device", "cache_dir")
    old = {k: v for k, v in cfg.to_dict().items() if k not in then and k not in ("sampler_seed", "parallel")}
    assert cfg.trajectory_hash() == hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()[:16]
    assert cfg.replace(parallel="fsdp").trajectory_hash() == cfg.trajectory_hash()
