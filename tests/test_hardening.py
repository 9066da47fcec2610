"""Hostile input to training (issue 10): every bad input is one sentence, nothing written earlier is
destroyed, a diverged run is never called intact, Ctrl-C names the checkpoint to resume from, and a huge
schedule costs neither time nor disk per checkpoint.

Each test reproduces a defect measured on the code before the fix (it failed there). A 1-layer, d=32,
context-32 GPT-2 on two small synthetic corpora keeps every run well under a second.
"""

from __future__ import annotations

import hashlib
import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from commute.errors import CommuteError, NonFiniteLossError
from commute.train import TrainConfig, list_checkpoints, load_checkpoint, train

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 32}


def make_cfg(corpora: dict[str, str], cache: str, **kw) -> TrainConfig:
    base = dict(model="tiny", model_overrides=dict(TINY), domains=dict(corpora), cache_dir=cache, seq_len=32,
                batch_size=8, steps=8, lr=3e-3, eval_every=4, eval_batches=2, log_every=1, ckpt_every=4,
                tensorboard=False)
    base.update(kw)
    return TrainConfig(**base)


def config_text(corpora: dict[str, str], cache: str, **kw) -> str:
    """The YAML of make_cfg(**kw) (for CLI cases that edit it as text)."""
    return make_cfg(corpora, cache, **kw).to_yaml(comments=False)


def _cli(args: list, capsys) -> tuple[int, str]:
    from commute.cli import main

    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    return code, err


def one_sentence(err: str) -> str:
    """stderr must be one 'error: ...' line without a traceback; returns it with whitespace collapsed."""
    assert err.startswith("error:") and "Traceback" not in err, err
    assert err.strip().count("\n") == 0, err
    return " ".join(err.split())


def tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------------------------------
# 1. a diverged run: no unhealthy checkpoint, the healthy one named, a branch with a lower lr goes on
# --------------------------------------------------------------------------------------------------
def test_diverged_weights_are_never_checkpointed_nor_called_intact(tmp_path, corpora, cache, domains,
                                                                     capsys) -> None:
    """SGD at lr 1e6: θ_2 is finite (~1e11) but gives NaN on any input. Before the fix step_00000002 was
    written and called intact, and neither resuming nor branching from it could go on."""
    cfg = make_cfg(corpora, cache, optimizer="sgd", lr=1e6, ckpt_every=2, ckpt_steps=[1], eval_every=0)
    run = tmp_path / "r"
    with pytest.raises(NonFiniteLossError) as e:
        train(cfg, run, domains=domains, progress=False)
    msg = str(e.value)
    assert "\n" not in msg and "step_00000001 is intact" in msg and "step_00000002" not in msg, msg
    assert "--branch-from" in msg and "lower" in msg, msg
    assert [p.name for p in list_checkpoints(run)] == ["step_00000001"]
    ck = load_checkpoint(run)
    assert all(torch.isfinite(p).all() for p in ck.model.parameters())
    # resuming the run itself with another lr is refused, naming the way that works: a branch
    with pytest.raises(CommuteError, match="--branch-from") as e:
        train(cfg.replace(lr=0.01), run, domains=domains, progress=False)
    assert "\n" not in str(e.value)
    # ... and that way works: the healthy checkpoint, a lower lr, a new directory
    res = train(cfg.replace(lr=0.01), tmp_path / "lower", branch_from=run / "checkpoints" / "step_00000001",
                domains=domains, progress=False)
    assert res.step == 8 and all(v == v for v in res.losses.values())
    # the CLI says the same in one sentence, exit 3
    cfgp = tmp_path / "c.yaml"
    cfg.to_yaml(cfgp)
    code, err = _cli(["train", cfgp, "--out", tmp_path / "cli", "--no-progress"], capsys)
    assert code == 3 and "step_00000001 is intact" in one_sentence(err)


def test_resuming_a_checkpoint_with_non_finite_weights_is_refused(tmp_path, corpora, cache, domains) -> None:
    """A checkpoint written by an older version with NaN weights (checksums fixed up) is not resumed."""
    from safetensors.torch import save_model

    from commute.checkpoint import sha256_file

    cfg = make_cfg(corpora, cache, steps=4)
    run = tmp_path / "r"
    train(cfg, run, domains=domains, progress=False)
    ck = run / "checkpoints" / "step_00000004"
    m = load_checkpoint(ck).model
    with torch.no_grad():
        next(m.parameters())[0, 0] = float("nan")
    save_model(m, str(ck / "model.safetensors"))
    state = json.loads((ck / "state.json").read_text())
    state["files"]["model.safetensors"] = sha256_file(ck / "model.safetensors")
    (ck / "state.json").write_text(json.dumps(state))
    with pytest.raises(CommuteError, match="not finite") as e:
        train(cfg.replace(steps=6), run, domains=domains, progress=False)
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------------------------------
# 2. nothing written earlier is destroyed
# --------------------------------------------------------------------------------------------------
def test_a_fresh_start_moves_earlier_output_aside(tmp_path, corpora, cache, capsys) -> None:
    """After rm -rf R/checkpoints, --no-resume used to truncate metrics.csv (5 rows -> 1) and rewrite
    config.yaml; now both are moved aside, byte for byte, before the new run writes anything."""
    cfgp = tmp_path / "c.yaml"
    make_cfg(corpora, cache, steps=4).to_yaml(cfgp)
    run = tmp_path / "r"
    assert _cli(["train", cfgp, "--out", run, "--no-progress"], capsys)[0] == 0
    old = {f: (run / f).read_bytes() for f in ("metrics.csv", "config.yaml")}
    import shutil

    shutil.rmtree(run / "checkpoints")
    code, err = _cli(["train", cfgp, "--out", run, "--no-resume", "--steps", "1", "--no-progress"], capsys)
    assert code == 0, err
    aside = [p for p in run.iterdir() if p.name.startswith("previous-")]
    assert len(aside) == 1 and "moved" in err and aside[0].name in err
    assert {f: (aside[0] / f).read_bytes() for f in old} == old
    assert len((run / "metrics.csv").read_text().splitlines()) == 3  # header, step 0, step 1


def test_a_file_in_the_way_is_refused_before_anything_is_written(tmp_path, corpora, cache, capsys) -> None:
    """A regular file where checkpoints/ should be: the run used to exit 1 after truncating metrics.csv."""
    cfgp = tmp_path / "c.yaml"
    make_cfg(corpora, cache, steps=4).to_yaml(cfgp)
    run = tmp_path / "r"
    assert _cli(["train", cfgp, "--out", run, "--no-progress"], capsys)[0] == 0
    import shutil

    shutil.rmtree(run / "checkpoints")
    (run / "checkpoints").write_text("not a directory")
    before = tree_hashes(run)
    code, err = _cli(["train", cfgp, "--out", run, "--no-progress"], capsys)
    assert code == 2 and "not a directory" in one_sentence(err)
    assert tree_hashes(run) == before and sorted(p.name for p in run.iterdir()) == sorted(before)
    (tmp_path / "afile").write_text("x")
    code, err = _cli(["train", cfgp, "--out", tmp_path / "afile", "--no-progress"], capsys)
    assert code == 2 and "not a directory" in one_sentence(err)


# --------------------------------------------------------------------------------------------------
# 3./4. bad config and schedule values: one sentence, exit 2, nothing written
# --------------------------------------------------------------------------------------------------
DEEP = "[" * 5000 + "]" * 5000


@pytest.mark.parametrize(
    "case, expect",
    [
        ({"vocab_size": 100}, "vocab_size"),
        ({"n_head": 0}, "n_head"),
        ({"n_embd": "x"}, "n_embd"),
        ({"n_layer": -1}, "n_layer"),
        ({"n_inner": -3}, "n_inner"),
        ({"resid_pdrop": 2}, "resid_pdrop"),
        ({"activation_function": "foo"}, "activation_function"),
        ({"layer_norm_epsilon": -1}, "layer_norm_epsilon"),
        ({"model": ["tiny"]}, "model"),
        ({"seed": 10**23}, "seed"),
        ({"vocab_size": 10**11}, "vocab_size"),
        ({"eval_batches": 100_000_000}, "eval_batches"),
        ({"batch_size": 10**9}, "batch_size"),
        ("schedule: {type: stages, stages: [{start: 0, weights: {a: 1}}, {start: .nan, weights: {b: 1}}]}",
         "stage 1"),
        ("schedule: {type: stages, stages: [{start: 0, weights: {a: 1}}, {start: .inf, weights: {b: 1}}]}",
         "stage 1"),
        ("schedule: {type: intervention, base: {a: 0.5, b: 0.5}, first: a, second: b, delta_w: 0.1, "
         "t0: .inf, T: 2}", "t0"),
        ("schedule: {type: linear_ramp, start: 0, end: .inf, w_from: {a: 1}, w_to: {b: 1}}", "ramp end"),
        ("schedule: {type: [constant], weights: {a: 1}}", "schedule type"),
        ("schedule: {type: intervention, base: {a: 0.5, b: 0.5}, first: [a], second: b, delta_w: 0.1, "
         "t0: 1, T: 1}", "first domain"),
        ("schedule: {type: constant, weights: {a: true, b: false}}", "true"),
        ("steps: 3\n", "twice"),  # a duplicate key (steps is already in the file)
        ("seq_len: " + DEEP, "nested"),
        (b"# \xff\xfe not UTF-8\n", "UTF-8"),
    ],
    ids=lambda x: x if isinstance(x, str) and len(x) < 30 else None,
)
def test_bad_config_is_one_sentence_and_writes_nothing(tmp_path, corpora, cache, capsys, case,
                                                       expect) -> None:
    cfgp = tmp_path / "c.yaml"
    if isinstance(case, dict):
        model_keys = {k: v for k, v in case.items() if k not in TrainConfig.__dataclass_fields__}
        top = {k: v for k, v in case.items() if k in TrainConfig.__dataclass_fields__}
        d = make_cfg(corpora, cache).to_dict()
        d["model_overrides"].update(model_keys)
        d.update(top)
        import yaml

        cfgp.write_text(yaml.safe_dump(d))
    elif isinstance(case, bytes):
        cfgp.write_bytes(config_text(corpora, cache).encode() + case)
    elif case.startswith("schedule:"):
        text = config_text(corpora, cache)
        assert "\nschedule: null\n" in text
        cfgp.write_text(text.replace("\nschedule: null\n", "\n" + case + "\n"))
    else:
        cfgp.write_text(config_text(corpora, cache) + case + "\n")
    code, err = _cli(["train", cfgp, "--out", tmp_path / "run", "--no-progress"], capsys)
    assert code == 2, err  # eval_batches 1e8: refused by a bound up front, not by a MemoryError after 36 s
    assert expect in one_sentence(err), err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("kind", ["yaml", "json"])
def test_bad_schedule_files_are_one_sentence(tmp_path, corpora, cache, capsys, kind) -> None:
    cfgp = tmp_path / "c.yaml"
    make_cfg(corpora, cache).to_yaml(cfgp)
    s = tmp_path / f"s.{kind}"
    for body, expect in ((b"type: constant\nweights: {a: 1}\n# \xff\n", "UTF-8"),
                         (("type: " + DEEP + "\n").encode(), "nested"),
                         (b"type: stages\nstages: [{start: 0, weights: {a: 1}}, "
                          b"{start: .nan, weights: {b: 1}}]\n", "stage 1")):
        if kind == "json" and expect == "nested":
            body = ('{"type": ' + DEEP + "}").encode()
        elif kind == "json" and expect != "UTF-8":
            stages = [{"start": 0, "weights": {"a": 1}}, {"start": float("nan"), "weights": {"b": 1}}]
            body = json.dumps({"type": "stages", "stages": stages}).encode()
        s.write_bytes(body)
        code, err = _cli(["train", cfgp, "--out", tmp_path / "run", "--schedule", s, "--no-progress"], capsys)
        assert code == 2 and expect in one_sentence(err), err
        assert not (tmp_path / "run").exists()


def test_a_key_given_twice_in_a_schedule_file_is_refused(tmp_path) -> None:
    from commute.schedule import load_schedule

    s = tmp_path / "s.yaml"
    s.write_text("type: constant\nweights: {a: 1}\nweights: {b: 1}\n")
    with pytest.raises(CommuteError, match="'weights' twice"):
        load_schedule(s)


def test_weights_must_be_numbers_not_booleans() -> None:
    from commute.schedule import check_weights

    with pytest.raises(CommuteError, match="true"):
        check_weights({"a": True, "b": False})


def test_zero_steps_says_nothing_was_trained(tmp_path, corpora, cache, capsys) -> None:
    cfgp = tmp_path / "c.yaml"
    make_cfg(corpora, cache, steps=0).to_yaml(cfgp)
    code, err = _cli(["train", cfgp, "--out", tmp_path / "r", "--no-progress"], capsys)
    out = " ".join(capsys.readouterr().out.split()) + " ".join(err.split())
    assert code == 0 and "nothing to train" in out and "steps is 0" in out, out


# --------------------------------------------------------------------------------------------------
# damaged run files
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["metrics_utf8", "latest_utf8", "latest_elsewhere", "files_list",
                                    "arch_list"])
def test_damaged_run_files_are_one_sentence(tmp_path, corpora, cache, capsys, damage) -> None:
    cfgp = tmp_path / "c.yaml"
    make_cfg(corpora, cache, steps=8, ckpt_every=2).to_yaml(cfgp)
    run = tmp_path / "r"
    if damage == "latest_elsewhere":  # another run, further on
        assert _cli(["train", cfgp, "--out", tmp_path / "other", "--no-progress", "--max-steps", 6],
                    capsys)[0] == 0
    assert _cli(["train", cfgp, "--out", run, "--no-progress", "--max-steps", 2], capsys)[0] == 0
    ck = run / "checkpoints" / "step_00000002"
    if damage == "metrics_utf8":
        (run / "metrics.csv").write_bytes((run / "metrics.csv").read_bytes() + b"\xff\xfe\n")
    elif damage == "latest_utf8":
        (run / "checkpoints" / "latest").write_bytes(b"\xff\xfe")
    elif damage == "latest_elsewhere":
        (run / "checkpoints" / "latest").write_text(str((tmp_path / "other/checkpoints/step_00000006")
                                                        .resolve()))
    else:
        state = json.loads((ck / "state.json").read_text())
        state["files" if damage == "files_list" else "arch"] = []
        (ck / "state.json").write_text(json.dumps(state))
    before = tree_hashes(run)
    code, err = _cli(["train", cfgp, "--out", run, "--no-progress"], capsys)
    msg = one_sentence(err)
    assert code == 2, err
    assert {"metrics_utf8": "metrics.csv", "latest_utf8": "latest", "latest_elsewhere": "latest",
            "files_list": "corrupt", "arch_list": "corrupt"}[damage] in msg
    assert tree_hashes(run) == before


def test_a_corpus_edited_in_place_to_the_same_size_is_not_resumed(tmp_path, corpora, cache) -> None:
    """The sampler state recorded only token counts: a same-size edit resumed silently on other data."""
    from commute.data import load_domains

    src = tmp_path / "a.txt"
    text = Path(corpora["a"]).read_text()
    src.write_text(text)
    cfg = make_cfg({"a": str(src), "b": corpora["b"]}, cache, steps=6)
    n0 = len(load_domains({"a": str(src)}, cache_dir=cache)["a"].train)
    train(cfg, tmp_path / "r", max_steps=2, progress=False)
    for i in range(len(text) - 1, 0, -1):  # one letter changed, in a document that stays in training
        if text[i] in "abcdefg":
            src.write_text(text[:i] + ("a" if text[i] != "a" else "b") + text[i + 1:])
            if len(load_domains({"a": str(src)}, cache_dir=cache)["a"].train) == n0:
                break
    else:  # pragma: no cover
        pytest.fail("no same-size edit found")
    with pytest.raises(CommuteError, match="training tokens of domain 'a'") as e:
        train(cfg, tmp_path / "r", progress=False)
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------------------------------
# 5. Ctrl-C names the checkpoint to resume from
# --------------------------------------------------------------------------------------------------
def test_interrupt_names_the_last_checkpoint_in_process(tmp_path, corpora, cache, capsys,
                                                        monkeypatch) -> None:
    import commute.train as T

    cfgp = tmp_path / "c.yaml"
    make_cfg(corpora, cache, steps=8, ckpt_every=2).to_yaml(cfgp)
    real = T.train_step

    def interrupted(*a, **kw):
        if kw.get("step") == 5:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(T, "train_step", interrupted)
    code, err = _cli(["train", cfgp, "--out", tmp_path / "r", "--no-progress"], capsys)
    msg = " ".join(err.split())
    assert code == 130 and "interrupted" in msg and "(step 4)" in msg and "is intact" in msg, err
    assert "step_00000004" in msg


def test_ctrl_c_in_a_real_process_names_the_last_checkpoint(tmp_path, corpora, cache) -> None:
    cfgp = tmp_path / "c.yaml"
    make_cfg(corpora, cache, steps=100_000, ckpt_every=3, eval_every=0).to_yaml(cfgp)
    run = tmp_path / "r"
    code = "import sys; from commute.cli import main; sys.exit(main(sys.argv[1:]))"
    # a background job of a non-interactive shell (e.g. CI) inherits SIGINT ignored, and Python then installs
    # no KeyboardInterrupt handler: give the child the default disposition, as a terminal would
    p = subprocess.Popen([sys.executable, "-c", code, "train", str(cfgp), "--out", str(run), "--no-progress"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 120
        while not list_checkpoints(run) and time.time() < deadline and p.poll() is None:
            time.sleep(0.1)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    msg = " ".join(err.split())
    assert p.returncode == 130 and "interrupted" in msg and "is intact" in msg, err
    assert "Traceback" not in err
    named = int(msg.split("(step ")[1].split(")")[0])
    assert load_checkpoint(run / "checkpoints" / f"step_{named:08d}").step == named


# --------------------------------------------------------------------------------------------------
# 6. a huge schedule is stored once per run, not in every state.json
# --------------------------------------------------------------------------------------------------
def test_a_huge_schedule_is_stored_once_and_costs_little(tmp_path, corpora, cache, domains) -> None:
    from commute.schedule import Stages

    r = random.Random(0)
    stages = []
    for i in range(40_000):
        a = round(r.random(), 6)
        stages.append((3 * i, {"a": a, "b": round(1 - a, 6)}))
    sched = Stages(stages)
    spath = tmp_path / "big.json"
    spath.write_text(json.dumps(sched.to_dict()))
    assert spath.stat().st_size > 2_000_000
    cfg = make_cfg(corpora, cache, steps=4, ckpt_every=2)
    res = train(cfg, tmp_path / "r", schedule=spath, domains=domains, progress=False)
    states = sorted((tmp_path / "r" / "checkpoints").glob("step_*/state.json"))
    assert len(states) == 2 and all(s.stat().st_size < 100_000 for s in states)
    assert (tmp_path / "r" / "config.yaml").stat().st_size < 100_000
    stored = list((tmp_path / "r").glob("schedules/*.json"))
    assert len(stored) == 1
    ck = load_checkpoint(tmp_path / "r")
    assert ck.schedule == sched and ck.config.schedule == sched.to_dict()
    # resume and branch from it are exact and read the stored schedule
    again = train(cfg.replace(steps=6), tmp_path / "r", schedule=spath, domains=domains, progress=False)
    full = train(cfg.replace(steps=6), tmp_path / "full", schedule=spath, domains=domains, progress=False)
    assert {**res.losses, **again.losses} == full.losses
    br = train(None, tmp_path / "br", branch_from=tmp_path / "r" / "checkpoints" / "step_00000002",
               domains=domains, progress=False)
    assert br.losses == {t: v for t, v in full.losses.items() if 2 <= t < 4}  # the parent's steps: 4
    # a damaged stored schedule is refused, not followed
    stored[0].write_text(stored[0].read_text().replace('"a": 0.', '"a": 1.', 1))
    with pytest.raises(CommuteError, match="corrupt"):
        load_checkpoint(tmp_path / "r")


def test_stage_lookup_is_logarithmic() -> None:
    from commute.schedule import Stages

    sched = Stages([(i, {"a": (i % 2) * 1.0, "b": 1.0 - (i % 2)}) for i in range(200_000)])
    t = time.perf_counter()
    for s in range(0, 200_000, 10):
        sched(s)
    assert time.perf_counter() - t < 2.0
