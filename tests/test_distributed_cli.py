"""Several processes (torchrun, gloo on CPU): ``commute bracket`` and ``commute audit`` equal the one-process
commands.

A tiny float64 run (2 domains, checkpoints at steps 4 and 8) is trained here; the test process runs both
commands on it as one process (the truth), and one torchrun launch of 2 ranks on loopback runs them through
the CLI's ``main`` (what ``torchrun --no-python commute ...`` calls), each command's stdout and stderr
captured per rank, then a bracket whose ``--json`` cannot be written.

Agreement is asserted bit for bit on every number the JSON holds (timings and the output folder aside): the
estimators' groups are each computed by one rank with the same operations on the same inputs as on one
process (3 groups: rank 0 computes two, rank 1 one; the all-reduce adds exact zeros), and λ_max and the
response estimator's replays are computed by every rank exactly as on one process. Rank 1 must print
nothing; the ranks must have split the work (the estimates rank 0 cached were made on 2 processes); a
write that fails on rank 0 must end both ranks with one sentence and a non-zero exit code.
"""

from __future__ import annotations

import json
import re
import textwrap

import pytest
import torch
from conftest import WORLD, finish_torchrun, skip_without_torchrun, start_torchrun, write_corpora

pytestmark = pytest.mark.usefixtures("one_thread")

# 3 bracket groups and 3 response groups: the ranks compute 2 and 1 of each
BRACKET = ["--grad-batches", "6", "--hvp-batches", "3", "--groups", "3", "--batch-size", "4", "--seed", "3",
           "--no-progress"]
AUDIT = [*BRACKET, "--response-groups", "3", "--response-batch-size", "2"]
FAIL = ["--grad-batches", "4", "--hvp-batches", "2", "--groups", "2", "--batch-size", "2", "--no-progress"]
TIMING = {"seconds", "estimate_seconds"}

WORKER = textwrap.dedent("""
    import contextlib, io, json, sys
    from pathlib import Path

    import torch

    torch.set_num_threads(1)
    from commute import distributed
    from commute.cli import main

    root, run = Path(sys.argv[1]), sys.argv[2]
    args = json.loads(sys.argv[3])
    world = distributed.env_world()

    def cli(name, argv):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(argv)
        res = {"code": code, "out": out.getvalue(), "err": err.getvalue(),
               "world_size": distributed.current().world_size}
        (root / f"{name}_rank{world.rank}.json").write_text(json.dumps(res))

    two = root / "two"
    cli("bracket", ["bracket", run, "--json", str(two / "bracket.json"), *args["bracket"]])
    cli("audit", ["audit", run, "--out", str(two / "audit"), "--json", str(two / "audit_copy.json"),
                  *args["audit"]])
    cli("fail", ["bracket", run, "--json", str(root / "blocker" / "bracket.json"), *args["fail"]])
    # leave the process group together: a rank destroying it while the other still exits can abort gloo
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
""")


def _cli(args: list[str], capsys) -> tuple[int, str, str]:
    from commute.cli import main

    code = main(args)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def _numbers(x, drop=frozenset()):
    """``x`` without its timings (and the keys in ``drop``), for an exact comparison."""
    if isinstance(x, dict):
        return {k: _numbers(v, drop) for k, v in x.items() if k not in TIMING and k not in drop}
    if isinstance(x, list):
        return [_numbers(v, drop) for v in x]
    return x


def _text(s: str, paths: dict[str, str]) -> str:
    """Printed output with the paths it names replaced and its timings blanked."""
    for path in sorted(paths, key=len, reverse=True):
        s = s.replace(path, paths[path])
    s = re.sub(r"\d+\.\d s\b", "<t> s", s)
    return " ".join(s.split())  # rich may wrap a long path differently


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The run, the one-process outputs, and one launch of 2 gloo ranks on loopback (see WORKER)."""
    skip_without_torchrun()

    from commute.train import TrainConfig, train

    root = tmp_path_factory.mktemp("dist_cli")
    tiny = {"n_layer": 1, "n_embd": 16, "n_head": 2, "n_positions": 16}
    cfg = TrainConfig(model="tiny", model_overrides=tiny,
                      domains=write_corpora(root, n_docs=60), cache_dir=str(root / "cache"), seq_len=16,
                      batch_size=4, steps=8, lr=3e-3, eval_every=0, log_every=1, ckpt_every=4,
                      tensorboard=False, dtype="float64", device="cpu",
                      schedule={"type": "stages", "stages": [{"start": 0, "weights": {"a": 0.7, "b": 0.3}},
                                                             {"start": 6, "weights": {"a": 0.4, "b": 0.6}}]})
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(cfg, root / "run", progress=False)
    finally:
        torch.set_num_threads(n)
    (root / "blocker").write_text("a file where the failing bracket's --json wants a folder")
    args = json.dumps({"bracket": BRACKET, "audit": AUDIT, "fail": FAIL})
    # started now, it runs while this process computes the one-process references
    return root, start_torchrun(root, WORKER, str(root), str(root / "run"), args)


@pytest.fixture(scope="module")
def outputs(setup):
    """Per command and rank: {code, out, err, world_size} of the launch (waited for here)."""
    root, proc = setup
    finish_torchrun(root, proc)
    return {(name, r): json.loads((root / f"{name}_rank{r}.json").read_text())
            for name in ("bracket", "audit", "fail") for r in range(WORLD)}


def test_bracket_on_two_ranks_is_the_one_process_bracket(setup, outputs, tmp_path, capsys) -> None:
    root, _ = setup
    one = tmp_path / "bracket.json"
    code, out, err = _cli(["bracket", str(root / "run"), "--json", str(one), *BRACKET], capsys)
    assert code == 0, err
    a, b = json.loads(one.read_text()), json.loads((root / "two" / "bracket.json").read_text())
    # the groups differ (a rank that dropped or misplaced one would change the mean and stderr)
    assert all(r["stderr"] > 0 and r["n"] == 3 for r in a["P"]) and a["lambda_max"] > 0
    assert "world_size" not in a["settings"] and b["settings"]["world_size"] == WORLD
    assert _numbers(b, {"world_size"}) == _numbers(a)  # bit for bit: every number is equal
    r0, r1 = outputs[("bracket", 0)], outputs[("bracket", 1)]
    assert r0["code"] == r1["code"] == 0 and r0["world_size"] == r1["world_size"] == WORLD
    assert r1["out"] == "" and r1["err"] == ""  # rank 1 prints nothing
    assert _text(r0["out"], {str(root / "two" / "bracket.json"): "J"}) == _text(out, {str(one): "J"})
    assert sorted(p.name for p in (root / "two").iterdir() if p.is_file()) == ["audit_copy.json",
                                                                              "bracket.json"]  # no temporary


def test_audit_on_two_ranks_is_the_one_process_audit(setup, outputs, tmp_path, capsys) -> None:
    root, _ = setup
    one = tmp_path / "audit"
    code, out, err = _cli(["audit", str(root / "run"), "--out", str(one), *AUDIT], capsys)
    assert code == 0, err
    two = root / "two" / "audit"
    a, b = json.loads((one / "audit.json").read_text()), json.loads((two / "audit.json").read_text())
    assert json.loads((root / "two" / "audit_copy.json").read_text()) == b
    assert a["checkpoints"] == [4, 8] and [w["skipped"] for w in a["response"]["windows"]] == [None]
    assert all(len(r["groups"]) == 3 for r in a["optimality"])
    assert b["out_dir"] == str(two)
    assert _numbers(b, {"world_size", "out_dir"}) == _numbers(a, {"out_dir"})  # bit for bit
    # rank 0 cached estimates made on 2 processes (the groups were split), the one process's were not
    for d, n in ((two, WORLD), (one, None)):
        cached = sorted((d / "cache").glob("*.json"))
        assert [p.name.split("_")[0] for p in cached] == ["bracket", "bracket", "response"]
        for p in cached:
            assert json.loads(p.read_text())["report"]["meta"].get("world_size") == n, p
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    r0, r1 = outputs[("audit", 0)], outputs[("audit", 1)]
    assert r0["code"] == r1["code"] == 0
    assert r1["out"] == "" and r1["err"] == ""  # rank 1 neither prints nor logs
    assert "audit [1/3] P table at step 4" in r0["err"] and "audit [3/3] schedule gradient" in r0["err"]
    paths = {str(two): "D", str(root / "two" / "audit_copy.json"): "J"}
    assert "JSON written to J" in _text(r0["out"], paths)
    assert _text(r0["out"], paths).replace("JSON written to J ", "") == _text(out, {str(one): "D"})


def test_a_write_failing_on_rank_0_ends_every_rank_with_one_sentence(outputs) -> None:
    r0, r1 = outputs[("fail", 0)], outputs[("fail", 1)]
    assert r0["code"] == 1 and r1["code"] == 2  # an OSError; a CommuteError
    assert r0["err"].startswith("error: ") and "files already written are kept" in r0["err"], r0["err"]
    assert " ".join(r1["err"].split()) == ("error: the distributed commute bracket failed on another process "
                                           "(its message is in that process's output).")
    assert r0["err"].count("\n") == r1["err"].count("\n") == 1  # one line each, no traceback
    assert r1["out"] == ""
