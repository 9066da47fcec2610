"""``commute bracket`` and :func:`commute.audit.bracket_at` end to end on tiny runs trained here.

Truth: the estimator run by hand on the same checkpoint and batch streams (the wiring: checkpoint, domains,
seed, batch size), the run's own schedule and learning-rate rule at the checkpoint's step, the antisymmetry
of P, the tournament's definition (ascending row sums), and the JSON schema the command promises.
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

from commute.errors import CommuteError

pytestmark = pytest.mark.usefixtures("one_thread")

SCHEDULE = {"type": "stages", "stages": [{"start": 0, "weights": {"a": 0.5, "b": 0.3, "c": 0.2}},
                                         {"start": 3, "weights": {"a": 0.2, "b": 0.3, "c": 0.5}}]}
FAST = ["--grad-batches", "8", "--hvp-batches", "4", "--groups", "2", "--batch-size", "4", "--no-progress"]


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> dict[str, str]:
    return write_corpora(tmp_path_factory.mktemp("corpora"), n_domains=3, n_docs=100)


def _train(root: Path, corpora: dict[str, str], **kw) -> Path:
    from commute.train import TrainConfig, train

    base = dict(model="tiny", model_overrides={"n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 32},
                domains=dict(corpora), cache_dir=str(root / "cache"), seq_len=32, batch_size=8, steps=4,
                lr=3e-3, eval_every=0, log_every=1, ckpt_every=4, tensorboard=False, device="cpu",
                schedule=SCHEDULE)
    base.update(kw)
    out = root / "run"
    train(TrainConfig(**base), out, progress=False)
    return out


@pytest.fixture(scope="module")
def adam_run(tmp_path_factory, corpora) -> Path:
    return _train(tmp_path_factory.mktemp("adam"), corpora)


def _cli(args: list[str], capsys) -> tuple[int, str, str]:
    from commute.cli import main

    code = main(args)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_bracket_cli_end_to_end_and_json_schema(adam_run, tmp_path, capsys) -> None:
    path = tmp_path / "out" / "bracket.json"
    code, out, err = _cli(["bracket", str(adam_run), "--json", str(path), "--horizon", "50", *FAST], capsys)
    assert code == 0, err
    d = json.loads(path.read_text())
    for key in ("step", "domains", "targets", "lambda_max", "lambda_of", "locality", "P", "ranking"):
        assert key in d, key
    assert d["step"] == 4 and d["domains"] == ["a", "b", "c"]
    # the mix is the schedule's weights at the checkpoint's step (step 4 is in the second stage)
    assert d["targets"] == {"a": {"a": 1.0}, "b": {"b": 1.0}, "c": {"c": 1.0},
                            "mix": {"a": 0.2, "b": 0.3, "c": 0.5}}
    assert d["lambda_of"] == "D^-1/2 H D^-1/2 (Adam)" and d["lambda_max"] > 0
    loc = d["locality"]
    assert loc["horizon"] == 50 and loc["gamma"] == 3e-3
    assert loc["value"] == pytest.approx(3e-3 * 50 * d["lambda_max"], rel=1e-12)
    # every ordered pair and every target, antisymmetric, with the promised fields
    assert len(d["P"]) == 3 * 2 * 4
    P = {(r["i"], r["j"], r["target"]): r for r in d["P"]}
    for (i, j, t), r in P.items():
        assert set(r) >= {"i", "j", "target", "mean", "stderr", "z", "n"} and r["n"] == 2
        assert r["mean"] == -P[(j, i, t)]["mean"] and math.isfinite(r["mean"]) and r["stderr"] > 0
        assert r["z"] == pytest.approx(r["mean"] / r["stderr"])
    # the ranking: ascending row sums S_i = sum_j P(i, j; L)
    for t in d["targets"]:
        S = {i: sum(P[(i, j, t)]["mean"] for j in d["domains"] if j != i) for i in d["domains"]}
        assert d["ranking"][t] == sorted(d["domains"], key=S.get)
        for i in d["domains"]:
            assert d["scores"][t][i]["mean"] == pytest.approx(S[i], rel=1e-9, abs=1e-15)
    text = " ".join(out.split())
    assert "P(i, j; L)" in text and "Order tournament" in text and "first to last" in text
    assert "T = 50 steps" in text and "JSON written" in text
    assert not [p for p in path.parent.iterdir() if p.name != "bracket.json"]  # atomic: no temporary file
    assert d["settings"]["target"] == "val" and "L: the run's validation batches" in text
    # --train-target: L on fresh training-split draws, other numbers
    code, out, err = _cli(["bracket", str(adam_run), "--json", str(path), "--train-target", *FAST], capsys)
    assert code == 0, err
    d2 = json.loads(path.read_text())
    assert d2["settings"]["target"] == "train" and "L: fresh training-split batches" in " ".join(out.split())
    assert d2["P"][0]["mean"] != d["P"][0]["mean"]


@pytest.mark.parametrize("train_target", [False, True], ids=["val-target", "train-target"])
def test_bracket_at_is_the_estimator_on_the_runs_checkpoint_and_domains(adam_run, train_target: bool) -> None:
    """Independent wiring: load the checkpoint and the domains by hand, run the estimator on the same
    streams (the run's train split, seed 0, batch size 4, seq_len 32) with the target on the run's
    validation batches (``eval_batches`` of its ``batch_size``; default) or on fresh training draws
    (``train_target``): the same numbers, and the two targets differ."""
    from commute.audit import bracket_at
    from commute.data import load_domains
    from commute.estimate import BracketEstimator
    from commute.model import lm_loss
    from commute.train import load_checkpoint

    audit = bracket_at(adam_run, grad_batches=8, hvp_batches=4, groups=2, batch_size=4, horizon=10,
                       train_target=train_target)
    ck = load_checkpoint(adam_run)
    cfg = ck.config
    doms = load_domains(cfg.domains, tokenizer=cfg.tokenizer, cache_dir=cfg.cache_dir,
                        val_fraction=cfg.val_fraction)
    est = BracketEstimator(ck.model, lm_loss, {n: doms[n].batches(4, 32, seed=0) for n in "abc"})
    held = {n: doms[n].val_batches(max(1, cfg.eval_batches), cfg.batch_size, cfg.seq_len) for n in "abc"}
    rep = est.estimate(8, 4, n_groups=2, mode="pairs", target_data=None if train_target else held)
    other = BracketEstimator(ck.model, lm_loss, {n: doms[n].batches(4, 32, seed=0) for n in "abc"}).estimate(
        8, 4, n_groups=2, mode="pairs", target_data=held if train_target else None)
    for t, w in audit.targets.items():
        for i in "abc":
            for j in "abc":
                np.testing.assert_allclose(audit.P(i, j, t).mean, rep.P(i, j, w).mean, rtol=1e-6, atol=1e-12)
    assert not np.allclose(audit.P("a", "b", "mix").mean, other.P("a", "b", audit.targets["mix"]).mean,
                           rtol=1e-3)
    assert audit.step == 4 and audit.horizon == 10 and audit.optimizer == "adam"
    assert audit.ranking["mix"] == rep.tournament(audit.targets["mix"]).order
    assert audit.settings["target"] == ("train" if train_target else "val")
    assert ("fresh training-split batches" if train_target else "the run's validation batches") in str(
        audit.tables()[0].caption)


def test_sgd_run_uses_H_and_the_learning_rate_at_the_step(tmp_path, corpora) -> None:
    from commute.audit import bracket_at
    from commute.train import load_checkpoint, lr_at

    run = _train(tmp_path, corpora, optimizer="sgd", lr=0.05, lr_schedule="cosine", steps=6, ckpt_every=3)
    ck3 = run / "checkpoints" / "step_00000003"
    audit = bracket_at(ck3, grad_batches=4, hvp_batches=2, groups=2, batch_size=4, horizon=7)
    cfg = load_checkpoint(ck3).config
    assert audit.step == 3 and audit.lambda_of == "H"
    assert audit.gamma == lr_at(cfg, 3) < 0.05  # the cosine schedule has decayed by step 3
    assert audit.locality == pytest.approx(audit.gamma * 7 * audit.lambda_max)
    assert audit.targets["mix"] == {"a": 0.2, "b": 0.3, "c": 0.5}
    assert bracket_at(run, grad_batches=4, hvp_batches=2, groups=2, batch_size=4).step == 6  # latest


def test_bad_paths_and_settings_are_one_sentence_with_exit_2(adam_run, tmp_path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    broken = tmp_path / "broken"
    shutil.copytree(adam_run, broken)
    (broken / "checkpoints" / "step_00000004" / "model.safetensors").write_bytes(b"not a tensor file")
    cases = [
        ([str(tmp_path / "absent")], "does not exist"),
        ([str(tmp_path / "empty")], "no checkpoint"),
        ([str(broken)], "corrupt"),
        ([str(adam_run), "--horizon", "0"], "horizon"),
        ([str(adam_run), "--groups", "1"], "n_groups"),
        ([str(adam_run), "--device", "cuda:7"] if not torch.cuda.is_available() else
         [str(adam_run), "--device", "nonsense"], "device"),
    ]
    for args, expect in cases:
        code, out, err = _cli(["bracket", *FAST, *args], capsys)  # the case's options win
        assert code == 2, (args, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and expect in lines[0], (args, err)
        assert "Traceback" not in err
    with pytest.raises(CommuteError, match="does not exist"):
        from commute.audit import bracket_at

        bracket_at(tmp_path / "absent")
