"""``commute audit`` and :func:`commute.audit.audit_run` end to end on a tiny 3-domain run trained here.

Truth, independent of the audit's own wiring: :func:`commute.audit.bracket_at` at each checkpoint with the
same settings and seed (the P table); the bilinear combination Σ_k w_k [P(i, k; L) − P(j, k; L)] of the
pairwise per-group samples with the schedule's weights and the Student-t rule (Cor. 3.2b, with the
exemption where a weight is 0); a ResponseEstimator wired by hand on the run's checkpoint, restored
sampler, schedule and micro-batches (the heat-map data), and the checkpoint at each window's end (the
replay); a re-run with every estimator patched to raise (the cache); the JSON schema; one-sentence errors.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_corpora

pytestmark = pytest.mark.usefixtures("one_thread")

# c is not trained on before step 6 (the Cor. 3.2b exemption at the step-4 checkpoint)
SCHEDULE = {"type": "stages", "stages": [{"start": 0, "weights": {"a": 0.5, "b": 0.5, "c": 0.0}},
                                         {"start": 6, "weights": {"a": 0.3, "b": 0.3, "c": 0.4}}]}
SETTINGS = dict(grad_batches=6, hvp_batches=3, groups=3, batch_size=4, seed=3)
RESPONSE = dict(response_windows="all", response_groups=2, response_batch_size=2, response_target_batches=2)
FAST = ["--grad-batches", "6", "--hvp-batches", "3", "--groups", "3", "--batch-size", "4", "--seed", "3",
        "--response-groups", "2", "--response-batch-size", "2", "--no-progress"]


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> dict[str, str]:
    return write_corpora(tmp_path_factory.mktemp("corpora"), n_domains=3, n_docs=100)


def _train(root: Path, corpora: dict[str, str], **kw) -> Path:
    from commute.train import TrainConfig, train

    base = dict(model="tiny", model_overrides={"n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 32},
                domains=dict(corpora), cache_dir=str(root / "cache"), seq_len=32, batch_size=4, grad_accum=2,
                steps=12, lr=3e-3, eval_every=0, log_every=1, ckpt_every=4, tensorboard=False, device="cpu",
                schedule=SCHEDULE)
    base.update(kw)
    out = root / "run"
    train(TrainConfig(**base), out, progress=False)
    return out


def _one_thread(fn, *args, **kw):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn(*args, **kw)
    finally:
        torch.set_num_threads(n)


@pytest.fixture(scope="module")
def run(tmp_path_factory, corpora) -> Path:
    return _one_thread(_train, tmp_path_factory.mktemp("adam"), corpora)


@pytest.fixture(scope="module")
def audited(run, tmp_path_factory):
    from commute.audit import audit_run

    return _one_thread(audit_run, run, tmp_path_factory.mktemp("audit") / "out", **SETTINGS, **RESPONSE)


def _cli(args: list[str], capsys) -> tuple[int, str, str]:
    from commute.cli import main

    code = main(args)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def _strict(path: Path) -> dict:
    def bad(x):
        raise ValueError(f"non-finite number {x} in JSON")

    return json.loads(path.read_text(), parse_constant=bad)


def test_p_table_is_bracket_at_at_every_checkpoint(audited, run) -> None:
    from commute.audit import bracket_at
    from commute.train import load_checkpoint, lr_at

    d = audited.to_dict()
    assert d["checkpoints"] == [4, 8, 12] and d["domains"] == ["a", "b", "c"]
    cfg = load_checkpoint(run).config
    for row in d["p_table"]:
        step = row["step"]
        ref = bracket_at(run / "checkpoints" / f"step_{step:08d}", horizon=4, **SETTINGS)
        # the training mix at the step: the schedule's weights, zero weights left out
        assert row["mix"]["weights"] == ({"a": 0.5, "b": 0.5} if step < 6 else {"a": 0.3, "b": 0.3, "c": 0.4})
        assert row["targets"] == ref.targets
        P = {(r["i"], r["j"], r["target"]): r for r in row["P"]}
        assert len(P) == 3 * 2 * 4
        for i in "abc":
            for j in "abc":
                for t in ref.targets:
                    if i == j:
                        continue
                    e = ref.P(i, j, t)
                    assert P[(i, j, t)]["mean"] == pytest.approx(e.mean, rel=1e-9, abs=1e-15)
                    assert P[(i, j, t)]["stderr"] == pytest.approx(e.stderr, rel=1e-9, abs=1e-15)
                    assert P[(i, j, t)]["significant"] == (abs(e.z) > d["threshold"]["t"])
        assert row["lambda_max"] == pytest.approx(ref.lambda_max, rel=1e-9)
        # the locality of the window ahead (the last checkpoint: the previous window's length)
        loc = row["locality"]
        assert loc["horizon"] == 4 and loc["gamma"] == lr_at(cfg, step)
        assert loc["value"] == pytest.approx(lr_at(cfg, step) * 4 * ref.lambda_max, rel=1e-9)
        assert row["horizon_to"] == (f"to step {step + 4}" if step < 12 else "= the previous window's length")
    from scipy.stats import t as student_t

    assert d["threshold"]["dof"] == 2 and d["threshold"]["t"] == pytest.approx(student_t.ppf(0.975, 2))


def test_optimality_is_the_bilinear_combination_with_the_zero_weight_exemption(audited) -> None:
    from scipy.stats import t as student_t

    d = audited.to_dict()
    thr = student_t.ppf(0.975, 2)
    rows = d["optimality"]
    assert len(rows) == 3 * 3 * 4  # checkpoints x unordered pairs x targets
    for r in rows:
        audit = audited.brackets[r["step"]]
        rep = audit.report
        assert rep.mode == "pairs" and np.allclose(rep.basis_weights, np.eye(3))
        w = audit.targets[audit.mix_name]  # the training mix at the step
        c = np.array([audit.targets[r["target"]].get(k, 0.0) for k in "abc"])
        idx = {k: n for n, k in enumerate("abc")}
        Pg = np.einsum("gikm,m->gik", rep.p_groups, c)  # P(i, k; L) per group, from the raw samples
        stat = sum(w.get(k, 0.0) * (Pg[:, idx[r["i"]], idx[k]] - Pg[:, idx[r["j"]], idx[k]]) for k in "abc")
        np.testing.assert_allclose(r["groups"], stat, rtol=1e-9, atol=1e-14)
        mean, se = stat.mean(), stat.std(ddof=1) / math.sqrt(len(stat))
        assert r["mean"] == pytest.approx(mean, rel=1e-9, abs=1e-15)
        assert r["stderr"] == pytest.approx(se, rel=1e-9, abs=1e-15)
        assert r["t"] == pytest.approx(mean / se, rel=1e-9)
        assert (r["w_i"], r["w_j"]) == (w.get(r["i"], 0.0), w.get(r["j"], 0.0))
        if min(r["w_i"], r["w_j"]) == 0:
            assert r["status"] == "exempt"
        else:
            assert r["status"] == ("violation" if abs(mean / se) > thr else "consistent")
        if r["status"] == "violation":  # P(X, Y; L) > 0: "more i now, more j later" raises L
            first, then = (r["j"], r["i"]) if mean > 0 else (r["i"], r["j"])
            assert r["better"] == {"more_now": first, "more_later": then}
        # the predicted excess per unit delta: (gamma T)^2 P with T = half the window ahead
        eps = audit.gamma * audit.horizon / 2
        assert r["excess_per_delta"]["mean"] == pytest.approx(eps**2 * mean, rel=1e-9, abs=1e-18)
    exempt = [r for r in rows if r["status"] == "exempt"]
    assert exempt and {r["step"] for r in exempt} == {4} and all("c" in (r["i"], r["j"]) for r in exempt)
    # no recommendation rests on an exempt row, and each optimality recommendation is a violation
    viol = {(r["step"], r["target"], r["i"], r["j"]) for r in rows if r["status"] == "violation"}
    for rec in d["recommendations"]:
        if rec["kind"] == "optimality":
            assert (rec["step"], rec["target"], *rec["pair"]) in viol
        assert set(rec) >= {"kind", "text", "evidence"}


def test_heat_map_is_the_response_estimator_on_the_runs_replayed_window(audited, run) -> None:
    """Window [4, 8) wired by hand: the run's checkpoint and optimiser state, its sampler restored from the
    checkpoint, its schedule and learning rates, its two micro-batches per step."""
    from commute.data import MixtureSampler, load_domains
    from commute.model import lm_loss
    from commute.response import ResponseEstimator
    from commute.schedule import Schedule
    from commute.train import load_checkpoint, lr_at, param_group_names

    wins = {(w["start"], w["end"]): w for w in audited.to_dict()["response"]["windows"]}
    assert set(wins) == {(4, 8), (8, 12)}
    win = wins[(4, 8)]
    ck = load_checkpoint(run / "checkpoints" / "step_00000004", with_optimizer=True)
    cfg = ck.config
    sched = Schedule.from_dict(SCHEDULE)
    doms = load_domains(cfg.domains, tokenizer=cfg.tokenizer, cache_dir=cfg.cache_dir,
                        val_fraction=cfg.val_fraction)
    sampler = MixtureSampler(doms, 4, 32, cfg.seed, cfg.sampler_mode)
    sampler.load_state_dict(ck.state["sampler"])

    def train_loss(model, mbs):
        return sum(lm_loss(model, mb.input_ids) for mb in mbs) / len(mbs)

    est = ResponseEstimator(ck.model, lm_loss, {n: doms[n].batches(2, 32, seed=3 + 2) for n in "abc"},
                            lr=lambda s: lr_at(cfg, s), state=ck.optimizer_state,
                            state_names=param_group_names(ck.model), train_loss_fn=train_loss)
    rep = est.estimate(lambda s: [sampler.next_batch(sched(s)) for _ in range(2)], sched, ["a", "b", "c"],
                       steps=4, start=4, n_groups=2, batches_per_step=1, target_batches=2)
    mix = {"a": 0.3, "b": 0.3, "c": 0.4}  # the training mix at the window's end (step 8)
    assert win["targets"] == {"a": {"a": 1.0}, "b": {"b": 1.0}, "c": {"c": 1.0}, "mix": mix}
    assert win["weights"] == [sched(s) for s in range(4, 8)]
    assert win["lrs"] == [lr_at(cfg, s) for s in range(4, 8)]
    for t, tw in win["targets"].items():
        G, se = rep.G(tw), rep.stderr(tw)
        for k in "abc":
            np.testing.assert_allclose(win["G"][t][k], G[k], rtol=1e-6, atol=1e-12)
            np.testing.assert_allclose(win["stderr"][t][k], se[k], rtol=1e-5, atol=1e-12)
            # the heat map's bins (4 steps: one per step) and the window sums are the same numbers
            np.testing.assert_allclose(win["bins"]["G"][t][k], G[k], rtol=1e-6, atol=1e-12)
            assert win["window_sums"][t][k]["mean"] == pytest.approx(float(np.sum(G[k])), rel=1e-6, abs=1e-12)
    assert win["bins"]["edges"] == [4, 5, 6, 7, 8] and win["bins"]["weights"]["c"] == [0.0, 0.0, 0.4, 0.4]
    # the replay is the run: it reproduces the checkpoint at the window's end
    for w in wins.values():
        assert w["replay"]["rel_error"] < 1e-5, w["replay"]
    # the best shift of each target is the most significant decrease Σ_t (G_to − G_from) over the window
    # (weight moves from j only at steps where j has weight: c has none at steps 4 and 5)
    smp = rep.samples(mix)  # [groups, K, steps]
    live = {d: [sched(s)[d] > 0 for s in range(4, 8)] for d in "abc"}
    b = win["best_shift"]["mix"]
    assert b["steps"] == sum(live[b["from"]])
    ts = {}
    for k in "abc":
        for j in "abc":
            if j != k:
                dd = (smp[:, "abc".index(k)] - smp[:, "abc".index(j)])[:, live[j]].sum(axis=1)
                ts[(j, k)] = (dd.mean(), dd.mean() / (dd.std(ddof=1) / math.sqrt(2)))
    assert b["mean"] == pytest.approx(ts[(b["from"], b["to"])][0], rel=1e-6, abs=1e-12)
    assert b["t"] == pytest.approx(min(t for _, t in ts.values()), rel=1e-6)
    files = audited.to_dict()["files"]
    assert files["figures"] == ["p_along_training.png", "optimality.png", "response.png"]
    for f in [files["report"], *files["figures"]]:
        assert (audited.out_dir / f).stat().st_size > 5000
    md = (audited.out_dir / "report.md").read_text()
    for part in ("## Recommendations", "Table 4", "Cor. 3.2b", "schedule gradient", "![", "γTλ_max",
                 "the training mix at that step, measured on the run's validation batches"):
        assert part in md, part
    assert audited.to_dict()["settings"]["bracket_target"] == "val"


def test_cli_json_schema_and_a_cached_rerun_does_no_estimation(run, tmp_path, capsys, monkeypatch) -> None:
    import commute
    import commute.audit
    import commute.response
    from commute.estimate import BracketEstimator

    assert commute.audit_run is commute.audit.audit_run
    out, js = tmp_path / "cli", tmp_path / "copy.json"
    args = ["audit", str(run), "--out", str(out), "--checkpoints", "8,12", "--json", str(js), *FAST]
    code, stdout, err = _cli(args, capsys)
    assert code == 0, err
    text = " ".join(stdout.split())
    for part in ("P along training", "Cor. 3.2b", "Schedule gradient", "Recommendations", "Report:"):
        assert part in text, part
    d = _strict(js)
    assert d == _strict(out / "audit.json")
    for key in ("format", "run", "domains", "optimizer", "checkpoints", "threshold", "p_table", "optimality",
                "response", "recommendations", "settings", "meaning", "files"):
        assert key in d, key
    assert d["format"] == "commute.audit/1" and d["checkpoints"] == [8, 12]
    p = d["p_table"][0]
    for key in ("step", "mix", "targets", "lambda_max", "lambda_of", "locality", "horizon_to", "P",
                "ranking"):
        assert key in p, key
    assert set(p["P"][0]) >= {"i", "j", "target", "mean", "stderr", "z", "n", "significant"}
    assert set(d["optimality"][0]) >= {"step", "i", "j", "target", "w_i", "w_j", "mean", "stderr", "t",
                                       "dof", "threshold", "status", "groups", "better", "excess_per_delta",
                                       "locality"}
    (w,) = d["response"]["windows"]  # default: the last 2 windows, and there is one
    assert (w["start"], w["end"]) == (8, 12)
    for key in ("G", "stderr", "bins", "window_sums", "best_shift", "replay", "targets", "weights", "lrs"):
        assert key in w, key
    assert all(len(w["G"][t][k]) == 4 for t in w["G"] for k in "abc")
    # by default the targets are the run's own validation batches (eval_batches of them), not training draws
    assert w["target_data"] == {"a": 4, "b": 4, "c": 4} and w["target_batches"] == 0
    assert d["settings"]["bracket_target"] == "val" and d["settings"]["response_target_batches"] is None
    # the flags for training-split targets reach both estimators (and give other numbers)
    tr = tmp_path / "train_targets.json"
    flags = ["--bracket-train-target", "--response-target-batches", "2"]
    code, _, err = _cli(["audit", str(run), "--out", str(tmp_path / "cli_train"), "--checkpoints", "8,12",
                         "--json", str(tr), *flags, *FAST], capsys)
    assert code == 0, err
    t = _strict(tr)
    assert t["settings"]["bracket_target"] == "train" and t["settings"]["response_target_batches"] == 2
    (wt,) = t["response"]["windows"]
    assert wt["target_batches"] == 2 and wt["target_data"] is None
    assert t["p_table"][0]["P"][0]["mean"] != d["p_table"][0]["P"][0]["mean"]

    def boom(*a, **k):
        raise AssertionError("estimated again instead of reading the cache")

    monkeypatch.setattr(commute.audit, "bracket_at", boom)
    monkeypatch.setattr(BracketEstimator, "estimate", boom)
    monkeypatch.setattr(commute.response.ResponseEstimator, "__init__", boom)
    code, stdout, err = _cli(args, capsys)
    assert code == 0, err
    again = _strict(js)
    for x in (d, again):
        x.pop("seconds")
    assert again == d
    assert "cached" in err


@pytest.fixture(scope="module")
def exact_run(tmp_path_factory, corpora) -> Path:
    """The same run with exact-count batches (the rows noise channel's premise)."""
    return _one_thread(_train, tmp_path_factory.mktemp("exact"), corpora, sampler_mode="exact")


@pytest.mark.parametrize("how", [dict(response_adjoint="train"), dict(response_noise="rows")])
def test_training_rows_adjoint_replays_a_step_as_one_batch_of_its_rows(how, audited, run, exact_run,
                                                                       tmp_path) -> None:
    """``response_adjoint="train"`` and ``response_noise="rows"`` (on an exact-count run) replay a step's
    two micro-batches as one batch of their rows (the run's step for a batch-mean loss: the replay still
    reproduces the checkpoint at the window's end) and are the estimator wired by hand with
    ``adjoint="train"`` / ``noise="rows"`` and ``Batch.by_domain``; the default's numbers are not theirs."""
    from commute.audit import audit_run
    from commute.data import Batch, MixtureSampler, load_domains
    from commute.model import lm_loss
    from commute.response import ResponseEstimator
    from commute.schedule import Schedule
    from commute.train import load_checkpoint, lr_at, param_group_names

    run = exact_run if "response_noise" in how else run
    res = _one_thread(audit_run, run, tmp_path / "out", checkpoints=[8, 12], **SETTINGS, **RESPONSE, **how)
    (win,) = res.windows
    assert (win["start"], win["end"]) == (8, 12) and win["replay"]["rel_error"] < 1e-5, win["replay"]
    assert win["adjoint"] == "train" and win["noise"] == how.get("response_noise")
    settings = res.to_dict()["settings"]
    assert (settings["response_adjoint"], settings["response_noise"]) == ("train", how.get("response_noise"))
    ck = load_checkpoint(run / "checkpoints" / "step_00000008", with_optimizer=True)
    cfg, sched, names = ck.config, Schedule.from_dict(SCHEDULE), ["a", "b", "c"]
    doms = load_domains(cfg.domains, tokenizer=cfg.tokenizer, cache_dir=cfg.cache_dir,
                        val_fraction=cfg.val_fraction)
    sampler = MixtureSampler(doms, 4, 32, cfg.seed, cfg.sampler_mode)
    sampler.load_state_dict(ck.state["sampler"])
    est = ResponseEstimator(ck.model, lm_loss, {n: doms[n].batches(2, 32, seed=3 + 2) for n in names},
                            lr=lambda s: lr_at(cfg, s), state=ck.optimizer_state,
                            state_names=param_group_names(ck.model))
    rep = _one_thread(est.estimate, lambda s: Batch.concat([sampler.next_batch(sched(s)) for _ in range(2)]),
                      sched, names, steps=4, start=8, n_groups=2, target_batches=2,
                      train_rows=lambda b: b.by_domain(names),
                      **({"noise": "rows"} if "response_noise" in how else {"adjoint": "train"}))
    default = next(w for w in (audited if run is not exact_run else _one_thread(
        audit_run, run, tmp_path / "default", checkpoints=[8, 12], **SETTINGS, **RESPONSE)).windows
        if w["start"] == 8)
    for t, tw in win["targets"].items():
        G = rep.G(tw)
        for k in names:
            np.testing.assert_allclose(win["G"][t][k], G[k], rtol=1e-6, atol=1e-12)
        assert not np.allclose(win["G"][t]["a"], default["G"][t]["a"], rtol=1e-3, atol=0)
        if "response_noise" in how:  # the window sums' noise part: the hand-wired estimate's own term
            noise = rep.samples(tw, part="noise").sum(axis=2).mean(axis=0)
            np.testing.assert_allclose([win["noise_sums"][t][k]["mean"] for k in names], noise,
                                       rtol=1e-6, atol=1e-12)
    assert (win["noise_sums"] is None) == ("response_noise" not in how) and default["noise_sums"] is None
    md = (tmp_path / "out" / "report.md").read_text()
    assert "the training rows' own Hessians" in md and ("rows channel's noise term" in md) == (
        "response_noise" in how) == ("Σ_t G_a, noise" in md)


def test_training_rows_adjoint_needs_a_batch_mean_loss(corpora, tmp_path) -> None:
    """A domain-weighted run's step is not the mean of its rows' losses: one sentence, before any estimate."""
    from commute.audit import audit_run
    from commute.errors import CommuteError

    run = _train(tmp_path, corpora, loss_weighting="domain", steps=8, grad_accum=1)
    with pytest.raises(CommuteError, match="loss_weighting: sample"):
        audit_run(run, tmp_path / "out", response_adjoint="train", **SETTINGS)
    assert not (tmp_path / "out" / "cache").exists()


def test_rows_noise_channel_needs_exact_count_batches(run, tmp_path) -> None:
    """The rows channel models fixed rows per domain: a run whose batches draw each row's domain
    (``sampler_mode: sample``, the default) is refused in one sentence, before any estimate."""
    from commute.audit import audit_run
    from commute.errors import CommuteError

    with pytest.raises(CommuteError, match="sampler_mode: exact"):
        audit_run(run, tmp_path / "out", response_noise="rows", **SETTINGS)
    assert not (tmp_path / "out" / "cache").exists()


def test_skipped_window_and_no_response(corpora, tmp_path) -> None:
    """A run with gradient clipping cannot be replayed: the window says so; --no-response estimates none."""
    from commute.audit import audit_run

    run = _train(tmp_path, corpora, grad_clip=1.0, steps=8, grad_accum=1)
    res = audit_run(run, tmp_path / "out", **SETTINGS)
    (w,) = res.windows
    assert (w["start"], w["end"]) == (4, 8) and "clips gradients" in w["skipped"]
    assert "skipped" in (tmp_path / "out" / "report.md").read_text()
    assert not (tmp_path / "out" / "response.png").exists()
    res = audit_run(run, tmp_path / "out", response=False, **SETTINGS)
    assert res.windows == [] and res.to_dict()["response"]["enabled"] is False
    assert [r["step"] for r in res.p_table] == [4, 8]


def test_bad_input_is_one_sentence_with_exit_2(run, tmp_path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    broken = tmp_path / "broken"
    shutil.copytree(run, broken)
    shutil.rmtree(broken / "audit", ignore_errors=True)
    (broken / "checkpoints" / "step_00000012" / "model.safetensors").write_bytes(b"not a tensor file")
    ck = run / "checkpoints" / "step_00000008"
    cases = [
        ([str(tmp_path / "absent")], "does not exist"),
        ([str(tmp_path / "empty")], "no checkpoint"),
        ([str(ck)], "is one checkpoint"),
        ([str(run), "--checkpoints", "5,8"], "no checkpoint at step(s) 5"),
        ([str(run), "--checkpoints", "x,y"], "--checkpoints"),
        ([str(run), "--groups", "1"], "groups"),
        ([str(run), "--response-windows", "many"], "--response-windows"),
        ([str(run), "--response-adjoint", "sideways"], "response_adjoint"),
        ([str(run), "--response-noise", "variance"], "response_noise"),
        ([str(run), "--response-noise", "rows", "--response-adjoint", "fresh"], "rows noise channel"),
        ([str(broken), "--checkpoints", "12", "--no-response"], "corrupt"),
        ([str(run), "--device", "cuda:7"] if not torch.cuda.is_available() else
         [str(run), "--device", "nonsense"], "device"),
    ]
    for args, expect in cases:
        code, out, err = _cli(["audit", *FAST, "--out", str(tmp_path / "o"), *args], capsys)
        assert code == 2, (args, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and expect in lines[0], (args, err)
        assert "Traceback" not in err
