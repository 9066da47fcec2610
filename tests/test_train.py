"""The training loop: exact resume, atomic checkpoints, branching, bad input, the CLI.

Truth comes from independent computations: an uninterrupted run (resume), a hand-written replay of the
sampler and of gradient descent (branching, full-batch steps), checksums of files (parent untouched).
A 1-layer, d=32, context-32 GPT-2 on two small synthetic corpora keeps every run well under a second.
"""

from __future__ import annotations

import csv
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from commute.errors import CommuteError, NonFiniteLossError
from commute.train import TrainConfig, find_checkpoint, list_checkpoints, load_checkpoint, lr_at, train

TIMING = ("tokens_per_s", "elapsed_s")


pytestmark = pytest.mark.usefixtures("one_thread")


def make_cfg(corpora: dict[str, str], cache: str, **kw) -> TrainConfig:
    base = dict(
        model="tiny",
        model_overrides={"n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 32},
        domains=dict(corpora),
        cache_dir=cache,
        seq_len=32,
        batch_size=8,
        steps=8,
        lr=3e-3,
        eval_every=4,
        eval_batches=2,
        log_every=1,
        ckpt_every=4,
        tensorboard=False,
    )
    base.update(kw)
    return TrainConfig(**base)


def rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return [{k: v for k, v in r.items() if k not in TIMING} for r in csv.DictReader(fh)]


def tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def params(path) -> dict[str, torch.Tensor]:
    return dict(load_checkpoint(path).model.state_dict())


# --------------------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------------------
def test_config_yaml_round_trip_and_every_field_documented(tmp_path, corpora, cache) -> None:
    cfg = make_cfg(corpora, cache, schedule={"type": "constant", "weights": {"a": 0.3, "b": 0.7}},
                   ckpt_steps=[5, 2], betas=(0.8, 0.99))
    path = tmp_path / "c.yaml"
    text = cfg.to_yaml(path)
    back = TrainConfig.from_yaml(path)
    assert back == cfg and back.ckpt_steps == [2, 5] and back.betas == [0.8, 0.99]
    import dataclasses

    for f in dataclasses.fields(TrainConfig):
        assert f.metadata.get("help"), f.name
        assert f"# {f.metadata['help']}\n{f.name}:" in text
    assert TrainConfig.from_dict({}) == TrainConfig()  # every field has a default


@pytest.mark.parametrize(
    "bad",
    [{"optimizer": "rmsprop"}, {"lr": -1.0}, {"lr": float("nan")}, {"betas": [0.9]}, {"seq_len": 1},
     {"batch_size": 0}, {"dtype": "float8"}, {"learning_rate": 0.1}, {"ckpt_steps": [-1]}],
)
def test_bad_config_fields_are_one_sentence_errors(bad: dict) -> None:
    with pytest.raises(CommuteError) as e:
        TrainConfig.from_dict(bad)
    assert "\n" not in str(e.value)


def test_lr_schedules() -> None:
    c = TrainConfig(lr=1.0, steps=100, warmup_steps=10, lr_schedule="cosine", min_lr_ratio=0.1)
    assert lr_at(c, 0) == pytest.approx(0.1) and lr_at(c, 9) == pytest.approx(1.0)
    assert lr_at(c, 10) == pytest.approx(1.0) and lr_at(c, 55) == pytest.approx(0.55)
    assert lr_at(c, 100) == pytest.approx(0.1)
    assert lr_at(TrainConfig(lr=0.5), 12345) == 0.5


# --------------------------------------------------------------------------------------------------
# exact resume
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "opt",
    [
        {"optimizer": "adam", "grad_accum": 2, "lr_schedule": "cosine", "warmup_steps": 2},
        {"optimizer": "sgd", "lr": 0.05},
        {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 0.01},
    ],
    ids=["adam", "sgd", "sgd-momentum"],
)
def test_resume_is_bitwise_identical(tmp_path, corpora, cache, domains, opt) -> None:
    cfg = make_cfg(corpora, cache, steps=10, log_every=4, eval_every=5, ckpt_every=0, **opt)
    full = train(cfg, tmp_path / "full", domains=domains, progress=False)
    first = train(cfg, tmp_path / "split", domains=domains, max_steps=5, progress=False)
    assert first.step == 5 and first.checkpoint.name == "step_00000005"
    second = train(cfg, tmp_path / "split", domains=domains, progress=False)
    assert second.step == 10 and sorted(second.losses) == list(range(5, 10))
    assert {**first.losses, **second.losses} == full.losses  # exact float equality
    a, b = params(tmp_path / "full"), params(tmp_path / "split")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ca, cb = load_checkpoint(tmp_path / "full", with_optimizer=True), load_checkpoint(
        tmp_path / "split", with_optimizer=True)
    sa, sb = ca.optimizer_state["state"], cb.optimizer_state["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        for name, v in sa[k].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(sb[k][name])), name
    assert ca.state["sampler"] == cb.state["sampler"] and ca.state["tokens"] == cb.state["tokens"]
    # the metrics file of the interrupted run is the uninterrupted one's (timings aside)
    assert rows(tmp_path / "full" / "metrics.csv") == rows(tmp_path / "split" / "metrics.csv")
    assert second.val_losses == full.val_losses


def test_resume_when_done_is_a_no_op_and_no_resume_refuses(tmp_path, corpora, cache, domains) -> None:
    cfg = make_cfg(corpora, cache, steps=4)
    train(cfg, tmp_path / "r", domains=domains, progress=False)
    before = tree_hashes(tmp_path / "r" / "checkpoints")
    again = train(cfg, tmp_path / "r", domains=domains, progress=False)
    assert again.step == 4 and again.losses == {}
    assert tree_hashes(tmp_path / "r" / "checkpoints") == before
    with pytest.raises(CommuteError, match="already holds a run"):
        train(cfg, tmp_path / "r", domains=domains, resume=False, progress=False)


def test_rerun_after_a_crash_before_the_first_checkpoint_starts_clean(tmp_path, corpora, cache,
                                                                       domains) -> None:
    cfg = make_cfg(corpora, cache, steps=4, ckpt_every=0)

    def crash(info) -> None:
        if info.step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "r", domains=domains, callbacks=[crash], progress=False)
    assert not list_checkpoints(tmp_path / "r") and len(rows(tmp_path / "r" / "metrics.csv")) == 3
    train(cfg, tmp_path / "r", domains=domains, progress=False)
    train(cfg, tmp_path / "ref", domains=domains, progress=False)
    assert rows(tmp_path / "r" / "metrics.csv") == rows(tmp_path / "ref" / "metrics.csv")


# --------------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------------
def test_checkpoint_layout_no_pickle_and_keep_last(tmp_path, corpora, cache, domains) -> None:
    cfg = make_cfg(corpora, cache, steps=6, ckpt_every=2, keep_last=1, ckpt_steps=[3])
    res = train(cfg, tmp_path / "r", domains=domains, progress=False)
    names = [p.name for p in list_checkpoints(tmp_path / "r")]
    assert names == ["step_00000003", "step_00000006"]  # periodic 2 and 4 pruned, ckpt_steps kept
    ck = find_checkpoint(tmp_path / "r")
    assert ck == res.checkpoint and (tmp_path / "r/checkpoints/latest").read_text().strip() == ck.name
    assert sorted(p.name for p in ck.iterdir()) == ["model.safetensors", "optimizer.pt", "rng.safetensors",
                                                    "state.json"]
    torch.load(ck / "optimizer.pt", weights_only=True)  # plain tensors and containers only
    state = json.loads((ck / "state.json").read_text())
    assert state["step"] == 6 and state["config"]["steps"] == 6 and state["sampler"]["step"] == 6
    assert state["schedule"] == {"type": "constant", "weights": {"a": 0.5, "b": 0.5}}
    assert sum(state["tokens"].values()) == 6 * 8 * 32
    assert TrainConfig.from_yaml(tmp_path / "r" / "config.yaml") == TrainConfig.from_dict(state["config"])
    # the loaded model reproduces the run's last validation losses; float64 on request
    from commute.model import sequence_losses
    from commute.train import evaluate

    val = {n: d.val_batches(cfg.eval_batches, cfg.batch_size, cfg.seq_len) for n, d in domains.items()}
    m32 = load_checkpoint(ck).model
    assert evaluate(m32, val) == pytest.approx(res.val_losses, rel=1e-12)
    by_hand = torch.cat([sequence_losses(m32, b) for b in val["a"]]).double().mean()
    assert evaluate(m32, val)["a"] == pytest.approx(float(by_hand.detach()), rel=1e-6)
    m64 = load_checkpoint(ck, dtype=torch.float64).model
    assert next(m64.parameters()).dtype == torch.float64
    assert evaluate(m64, val) == pytest.approx(res.val_losses, rel=1e-5)


def test_crash_mid_write_leaves_the_last_good_checkpoint(tmp_path, corpora, cache, domains,
                                                        monkeypatch) -> None:
    import commute.train as T

    cfg = make_cfg(corpora, cache, steps=8, ckpt_every=4)
    run = tmp_path / "r"
    train(cfg, run, domains=domains, max_steps=4, progress=False)
    good = tree_hashes(run / "checkpoints")
    real = T._sha256

    def dies(path):  # the process is killed while the step-8 checkpoint is half written
        if ".tmp-step_00000008" in str(path):
            raise KeyboardInterrupt
        return real(path)

    monkeypatch.setattr(T, "_sha256", dies)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, run, domains=domains, progress=False)
    monkeypatch.undo()
    assert [p.name for p in list_checkpoints(run)] == ["step_00000004"]
    assert tree_hashes(run / "checkpoints") == good
    # a kill -9 leaves its temp directory behind (no cleanup ran): loading must not care
    junk = run / "checkpoints" / ".tmp-step_00000008-xyz"
    junk.mkdir()
    (junk / "model.safetensors").write_bytes(b"\x00garbage")
    assert load_checkpoint(run).step == 4
    res = train(cfg, run, domains=domains, progress=False)
    assert res.step == 8 and not junk.exists()
    ref = train(cfg, tmp_path / "ref", domains=domains, progress=False)
    assert res.losses == {t: v for t, v in ref.losses.items() if t >= 4}


@pytest.mark.parametrize("damage", ["flip", "truncate_state", "drop_optimizer"])
def test_corrupt_checkpoint_is_a_clear_error(tmp_path, corpora, cache, domains, damage) -> None:
    cfg = make_cfg(corpora, cache, steps=4)
    run = tmp_path / "r"
    train(cfg, run, domains=domains, progress=False)
    ck = find_checkpoint(run)
    if damage == "flip":
        data = bytearray((ck / "model.safetensors").read_bytes())
        data[-5] ^= 0xFF
        (ck / "model.safetensors").write_bytes(bytes(data))
    elif damage == "truncate_state":
        (ck / "state.json").write_text((ck / "state.json").read_text()[:100])
    else:
        (ck / "optimizer.pt").unlink()
    for call in (lambda: load_checkpoint(run),
                 lambda: train(cfg.replace(steps=6), run, domains=domains, progress=False)):
        with pytest.raises(CommuteError, match="corrupt") as e:
            call()
        assert "\n" not in str(e.value)


def test_checkpoint_of_a_different_model_is_a_clear_error(tmp_path, corpora, cache, domains) -> None:
    cfg = make_cfg(corpora, cache, steps=4)
    train(cfg, tmp_path / "r", domains=domains, progress=False)
    other = cfg.replace(model_overrides={**cfg.model_overrides, "n_embd": 64})
    with pytest.raises(CommuteError, match="different model") as e:
        train(other, tmp_path / "r", domains=domains, progress=False)
    assert "n_embd" in str(e.value)
    with pytest.raises(CommuteError, match="different model"):
        train(other, tmp_path / "b", branch_from=tmp_path / "r", domains=domains, progress=False)
    with pytest.raises(CommuteError, match="seed"):
        train(cfg.replace(seed=1), tmp_path / "r", domains=domains, progress=False)


# --------------------------------------------------------------------------------------------------
# branching
# --------------------------------------------------------------------------------------------------
def test_branch_follows_the_new_schedule_and_leaves_the_parent_untouched(tmp_path, corpora, cache,
                                                                         domains) -> None:
    from commute.data import MixtureSampler
    from commute.model import lm_loss
    from commute.schedule import Intervention

    lr = 0.1
    cfg = make_cfg(corpora, cache, steps=10, optimizer="sgd", lr=lr, ckpt_steps=[4])
    parent = tmp_path / "parent"
    full = train(cfg, parent, domains=domains, progress=False)
    before = tree_hashes(parent)
    ck4 = parent / "checkpoints" / "step_00000004"

    # (1) branching with the parent's own schedule continues the parent exactly
    same = train(None, tmp_path / "same", branch_from=ck4, domains=domains, progress=False)
    assert same.losses == {t: v for t, v in full.losses.items() if t >= 4}
    a, b = params(parent), params(tmp_path / "same")
    assert all(torch.equal(a[k], b[k]) for k in a)

    # (2) an eq. (9) intervention: replay it by hand (sampler from the parent's state + plain SGD)
    sched = Intervention({"a": 0.5, "b": 0.5}, "a", "b", 0.4, t0=4, T=3)
    br = train(cfg, tmp_path / "b12", branch_from=ck4, schedule=sched, domains=domains, progress=False)
    assert br.step == 10 and sorted(br.losses) == list(range(4, 10))
    start = load_checkpoint(ck4)
    model = start.model.train()
    sampler = MixtureSampler(domains, cfg.batch_size, cfg.seq_len, cfg.seed, cfg.sampler_mode)
    sampler.load_state_dict(start.state["sampler"])
    counts = {"a": 0, "b": 0}
    for t in range(4, 10):
        batch = sampler.next_batch(sched(t))
        for k, n in zip("ab", batch.counts(2), strict=True):
            counts[k] += n
        loss = lm_loss(model, batch.input_ids)
        assert float(loss.detach()) == br.losses[t]
        grads = torch.autograd.grad(loss, list(model.parameters()))
        with torch.no_grad():
            for p, g in zip(model.parameters(), grads, strict=True):
                p.add_(g, alpha=-lr)
    got = params(tmp_path / "b12")
    for k, v in model.state_dict().items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=0)
    ckb = load_checkpoint(tmp_path / "b12")
    assert ckb.state["tokens"] == {k: start.state["tokens"][k] + 32 * n for k, n in counts.items()}
    assert ckb.schedule == sched
    assert ckb.state["parent"]["checkpoint"] == str(ck4.resolve()) and ckb.state["parent"]["step"] == 4
    r = rows(tmp_path / "b12" / "metrics.csv")
    assert r[0]["step"] == "4" and r[0]["val_loss/a"]  # the branch point is evaluated
    for row in r[1:]:  # weights logged on row s are those of step s-1
        assert float(row["weight/a"]) == pytest.approx(sched(int(row["step"]) - 1)["a"])
    assert not all(torch.equal(a[k], got[k]) for k in a)
    assert tree_hashes(parent) == before  # nothing of the parent was written
    with pytest.raises(CommuteError, match="own directory"):
        train(cfg, parent, branch_from=ck4, schedule=sched, domains=domains, progress=False)
    with pytest.raises(CommuteError, match="not a branch of"):
        train(cfg, tmp_path / "same", branch_from=parent, schedule=sched, domains=domains, progress=False)
    again = train(cfg, tmp_path / "b12", branch_from=ck4, schedule=sched, domains=domains, progress=False)
    assert again.step == 10 and again.losses == {}  # re-running a finished branch resumes it: a no-op


# --------------------------------------------------------------------------------------------------
# non-finite loss
# --------------------------------------------------------------------------------------------------
def test_nan_loss_stops_with_the_last_checkpoint_intact(tmp_path, corpora, cache, domains) -> None:
    cfg = make_cfg(corpora, cache, steps=10, ckpt_every=4)
    run = tmp_path / "r"

    def poison(info) -> None:
        if info.step == 5:
            with torch.no_grad():
                next(info.model.parameters())[0, 0] = float("nan")

    with pytest.raises(NonFiniteLossError) as e:
        train(cfg, run, domains=domains, callbacks=[poison], progress=False)
    msg = str(e.value)
    assert "step 5" in msg and "step_00000004 is intact" in msg and "\n" not in msg
    assert [p.name for p in list_checkpoints(run)] == ["step_00000004"]
    ck = load_checkpoint(run)
    assert ck.step == 4 and all(torch.isfinite(p).all() for p in ck.model.parameters())
    assert [r["step"] for r in rows(run / "metrics.csv")] == [str(s) for s in range(6)]


def test_huge_learning_rate_is_a_non_finite_loss_error(tmp_path, corpora, cache, domains) -> None:
    cfg = make_cfg(corpora, cache, steps=6, optimizer="sgd", lr=1e30)
    with pytest.raises(NonFiniteLossError, match="lower the learning rate"):
        train(cfg, tmp_path / "r", domains=domains, progress=False)


# --------------------------------------------------------------------------------------------------
# learning, batch sources
# --------------------------------------------------------------------------------------------------
def test_per_domain_validation_loss_falls(tmp_path, corpora, cache) -> None:
    cfg = make_cfg(corpora, cache, steps=40, lr=1e-2, eval_every=20, log_every=10, tensorboard=True)
    res = train(cfg, tmp_path / "r", progress=False)  # loads the domains from the config's sources
    r = [row for row in rows(tmp_path / "r" / "metrics.csv") if row["val_loss/a"]]
    assert [row["step"] for row in r] == ["0", "20", "40"]
    for d in ("a", "b"):
        v = [float(row[f"val_loss/{d}"]) for row in r]
        assert v[0] > v[1] > v[2] and v[0] - v[2] > 1.0, (d, v)  # from ~ln 256 = 5.5 toward ~ln 8 = 2.1
        assert res.val_losses[d] == v[-1]
    assert sum(res.tokens.values()) == 40 * 8 * 32
    assert list((tmp_path / "r" / "tb").glob("events.out.tfevents.*"))


def test_domain_weighted_full_batch_steps_are_gradient_descent(tmp_path, corpora, cache, domains) -> None:
    """batch_source + loss_weighting='domain': θ ← θ − γ Σ_k w_k(t) ∇L_k(θ) on a fixed batch, exactly."""
    from commute.data import Batch
    from commute.model import build_model, lm_loss
    from commute.schedule import Stages

    ids_a = torch.stack(list(domains["a"].val_batches(1, 4, 32)[0]))
    ids_b = torch.stack(list(domains["b"].val_batches(1, 4, 32)[0]))
    batch = Batch(input_ids=torch.cat([ids_a, ids_b]), domain=torch.tensor([0] * 4 + [1] * 4), step=0)
    sched = Stages([(0, {"a": 0.8, "b": 0.2}), (2, {"a": 0.1, "b": 0.9})])
    lr = 0.5
    cfg = make_cfg(corpora, cache, steps=4, optimizer="sgd", lr=lr, dtype="float64", loss_weighting="domain",
                   eval_every=0)
    res = train(cfg, tmp_path / "r", schedule=sched, batch_source=lambda t: batch, domains=domains,
                progress=False)
    torch.manual_seed(cfg.seed)  # the run's initialisation
    model = build_model("tiny", vocab_size=256, dtype=torch.float64, **cfg.model_overrides)
    for t in range(4):
        w = sched(t)
        loss = w["a"] * lm_loss(model, ids_a) + w["b"] * lm_loss(model, ids_b)
        assert res.losses[t] == pytest.approx(float(loss.detach()), rel=1e-12)
        grads = torch.autograd.grad(loss, list(model.parameters()))
        with torch.no_grad():
            for p, g in zip(model.parameters(), grads, strict=True):
                p.sub_(lr * g)
    got = params(tmp_path / "r")
    for k, v in model.state_dict().items():
        torch.testing.assert_close(got[k], v, rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------
def _cli(args: list[str], capsys) -> tuple[int, str]:
    from commute.cli import main

    code = main(args)
    err = capsys.readouterr().err
    return code, " ".join(err.split())


def test_cli_trains_resumes_and_branches(tmp_path, corpora, cache, capsys) -> None:
    cfgp = tmp_path / "c.yaml"
    make_cfg(corpora, cache, steps=4).to_yaml(cfgp)
    out = tmp_path / "run"
    assert _cli(["train", str(cfgp), "--out", str(out), "--no-progress"], capsys)[0] == 0
    assert find_checkpoint(out).name == "step_00000004"
    assert _cli(["train", str(cfgp), "--out", str(out), "--steps", "6", "--no-progress"], capsys)[0] == 0
    assert find_checkpoint(out).name == "step_00000006"
    sched = tmp_path / "s.yaml"
    sched.write_text("type: intervention\nbase: {a: 0.5, b: 0.5}\nfirst: b\nsecond: a\ndelta_w: 0.25\n"
                     "t0: 4\nT: 1\n")
    ck4 = str(out / "checkpoints" / "step_00000004")
    code, _ = _cli(["train", str(cfgp), "--out", str(tmp_path / "br"), "--branch-from", ck4,
                    "--schedule", str(sched), "--no-progress"], capsys)
    assert code == 0 and load_checkpoint(tmp_path / "br").state["parent"]["step"] == 4
    code, err = _cli(["train", str(cfgp), "--branch-from", str(out), "--no-progress"], capsys)
    assert code == 2 and "needs --out" in err


@pytest.mark.parametrize(
    "case, expect",
    [
        ("bad_schedule", "sum to"),
        ("unknown_domain", "unknown domain"),
        ("missing_data", "does not exist"),
        ("empty_data", "no text"),
        ("bad_yaml", "not valid YAML"),
        ("missing_config", "does not exist"),
        ("nan", "training loss became"),
    ],
)
def test_cli_bad_input_is_one_sentence_and_nonzero(tmp_path, corpora, cache, capsys, case, expect) -> None:
    cfg = make_cfg(corpora, cache, steps=2)
    extra: list[str] = []
    if case == "bad_schedule":
        extra = ["--schedule", "a=0.7,b=0.7"]
    elif case == "unknown_domain":
        extra = ["--schedule", "a=0.5,zz=0.5"]
    elif case == "missing_data":
        cfg = cfg.replace(domains={"a": corpora["a"], "b": str(tmp_path / "nope.txt")})
    elif case == "empty_data":
        (tmp_path / "empty.txt").write_text("\n\n")
        cfg = cfg.replace(domains={"a": corpora["a"], "b": str(tmp_path / "empty.txt")})
    cfgp = tmp_path / "c.yaml"
    cfg.to_yaml(cfgp)
    if case == "bad_yaml":
        cfgp.write_text("steps: [1,\n")
    if case == "missing_config":
        cfgp = tmp_path / "absent.yaml"
    if case == "nan":
        cfg.replace(optimizer="sgd", lr=1e30, steps=4).to_yaml(cfgp)
    code, err = _cli(["train", str(cfgp), "--out", str(tmp_path / "run"), "--no-progress", *extra], capsys)
    assert code == (3 if case == "nan" else 2), err
    assert err.startswith("error:") and expect in err and "Traceback" not in err
    assert not list_checkpoints(tmp_path / "run")


def test_cli_process_prints_no_traceback(tmp_path) -> None:
    cfgp = tmp_path / "c.yaml"
    cfgp.write_text("optimizer: rmsprop\n")
    proc = subprocess.run([sys.executable, "-c", "import sys; from commute.cli import main; sys.exit(main())",
                           "train", str(cfgp), "--out", str(tmp_path / "r")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "optimizer must be one of" in " ".join(proc.stderr.split())


def test_branch_after_the_intervention_start_is_refused(tmp_path, corpora, cache, domains) -> None:
    """A branch at step 4 with an intervention starting at t0=2 would skip part of it: refused."""
    from commute.schedule import Intervention

    cfg = make_cfg(corpora, cache, steps=8, optimizer="sgd", lr=0.1, ckpt_steps=[4])
    train(cfg, tmp_path / "parent", domains=domains, progress=False)
    ck4 = tmp_path / "parent" / "checkpoints" / "step_00000004"
    late = Intervention({"a": 0.5, "b": 0.5}, "a", "b", 0.2, t0=2, T=2)
    with pytest.raises(CommuteError, match="t0=2 but the branch starts at step 4"):
        train(cfg, tmp_path / "late", branch_from=ck4, schedule=late, domains=domains, progress=False)
    assert not list_checkpoints(tmp_path / "late")
    on_time = Intervention({"a": 0.5, "b": 0.5}, "a", "b", 0.2, t0=4, T=2)
    assert train(cfg, tmp_path / "ok", branch_from=ck4, schedule=on_time, domains=domains,
                 progress=False).step == 8


def test_result_says_when_its_validation_loss_was_measured(tmp_path, corpora, cache, domains) -> None:
    cfg = make_cfg(corpora, cache, steps=8, eval_every=4)
    res = train(cfg, tmp_path / "run", domains=domains, max_steps=6, progress=False)
    assert res.step == 6 and res.val_step == 4  # evaluated at 0 and 4, not at the early stop
    again = train(cfg, tmp_path / "run", domains=domains, max_steps=6, progress=False)
    assert again.val_step is None and again.val_losses == {}


def test_branch_with_its_own_sampler_seed_is_a_replicate_of_the_window(tmp_path, corpora, cache,
                                                                        domains) -> None:
    """sampler_seed: a branch keeps the parent's position (step, counters, exact-mode residual) but draws
    its window from fresh streams; a replay by hand agrees bit for bit, and it resumes exactly."""
    from commute.data import MixtureSampler
    from commute.model import lm_loss

    lr = 0.1
    cfg = make_cfg(corpora, cache, steps=8, optimizer="sgd", lr=lr, ckpt_steps=[3], sampler_mode="exact")
    parent = tmp_path / "parent"
    full = train(cfg, parent, domains=domains, progress=False)
    ck3 = parent / "checkpoints" / "step_00000003"
    rep = train(cfg.replace(sampler_seed=11), tmp_path / "rep", branch_from=ck3, domains=domains,
                progress=False)
    assert {t: v for t, v in rep.losses.items()} != {t: v for t, v in full.losses.items() if t >= 3}

    start = load_checkpoint(ck3)
    model = start.model.train()
    sampler = MixtureSampler(domains, cfg.batch_size, cfg.seq_len, 11, cfg.sampler_mode)
    sampler.load_state_dict({**start.state["sampler"], "seed": 11})
    for t in range(3, 8):
        batch = sampler.next_batch({"a": 0.5, "b": 0.5})
        loss = lm_loss(model, batch.input_ids)
        assert float(loss.detach()) == rep.losses[t]
        grads = torch.autograd.grad(loss, list(model.parameters()))
        with torch.no_grad():
            for p, g in zip(model.parameters(), grads, strict=True):
                p.add_(g, alpha=-lr)
    got = params(tmp_path / "rep")
    for k, v in model.state_dict().items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=0)
    # equal token totals per domain to the parent's own window (exact sampler, same weights)
    assert load_checkpoint(tmp_path / "rep").state["tokens"] == load_checkpoint(parent).state["tokens"]

    split = tmp_path / "split"
    train(cfg.replace(sampler_seed=11), split, branch_from=ck3, domains=domains, max_steps=5, progress=False)
    again = train(cfg.replace(sampler_seed=11), split, branch_from=ck3, domains=domains, progress=False)
    assert again.losses == {t: v for t, v in rep.losses.items() if t >= 5}
    b = params(split)
    assert all(torch.equal(got[k], b[k]) for k in got)
    # a config without sampler_seed keeps its trajectory hash (runs made before the field existed resume)
    old = {k: v for k, v in cfg.to_dict().items() if k not in TrainConfig.RUN_FIELDS and k != "sampler_seed"}
    assert cfg.trajectory_hash() == hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()[:16]
    assert cfg.trajectory_hash() != cfg.replace(sampler_seed=11).trajectory_hash()
