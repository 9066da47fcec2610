"""BracketMonitor and CommuteCallback: they log the estimator's numbers at the right steps and leave training
exactly as it was.

Truth: a second, identical training run without the monitor (dropout on, batches drawn from the global
torch RNG, so any disturbance of the RNG, the modes or the gradients changes the final weights), the
estimator run directly on the same held batches, and the files read back (CSV, TensorBoard events).
"""

from __future__ import annotations

import csv
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from commute.callbacks import BracketMonitor, CommuteCallback, preserve_rng
from commute.errors import CommuteError
from commute.estimate import BracketEstimator
from commute.model import lm_loss

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = {"n_grad_batches": 4, "n_hvp_batches": 2, "n_groups": 2}


def _gpt2(seed: int = 0) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=256, n_positions=32, n_embd=32, n_layer=1, n_head=2, bos_token_id=None,
                     eos_token_id=None)  # dropout 0.1: training consumes the global RNG
    return GPT2LMHeadModel(cfg)


def _held() -> dict:
    """Held-out batches: "lo" a fixed list (the same batches every estimate), "hi" an infinite generator
    that draws from the *global* torch RNG (fresh batches every estimate)."""
    g = torch.Generator().manual_seed(99)

    def hi():
        while True:
            yield torch.randint(128, 256, (2, 16))

    return {"lo": [torch.randint(0, 128, (2, 16), generator=g) for _ in range(6)], "hi": hi()}


def _plain_loop(monitor: BracketMonitor | None, steps: int = 6) -> nn.Module:
    model = _gpt2()
    model.train()
    model.transformer.h[0].attn.eval()  # a mixed train/eval state must survive the monitor
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    torch.manual_seed(1)
    for t in range(steps):
        ids = torch.randint(0, 256, (4, 16))  # global RNG
        opt.zero_grad(set_to_none=True)
        lm_loss(model, ids).backward()
        opt.step()
        if monitor is not None:
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
            modes = [m.training for m in model.modules()]
            monitor.step(t + 1, model=model)
            assert [m.training for m in model.modules()] == modes
            assert all(torch.equal(p.grad, grads[n]) for n, p in model.named_parameters())
    return model


def test_plain_loop_logs_at_the_right_steps_and_leaves_training_unchanged(tmp_path) -> None:
    with BracketMonitor(None, None, _held(), every=2, log_dir=tmp_path, tensorboard=True, **FAST) as mon:
        with_mon = _plain_loop(mon)
    without = _plain_loop(None)
    for (n, p), q in zip(with_mon.named_parameters(), without.parameters(), strict=True):
        assert torch.equal(p, q), n  # bit for bit: RNG, modes and gradients untouched
    with open(tmp_path / "bracket.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in rows] == [2, 4, 6] == [s for s, _ in mon.history]
    for r in rows:
        for t in ("lo", "hi", "mix"):
            for k in (f"P/{t}/lo->hi", f"P_stderr/{t}/lo->hi", f"S/{t}/lo", f"S/{t}/hi"):
                assert math.isfinite(float(r[k])), k
            assert sorted(r[f"order/{t}"].split(",")) == ["hi", "lo"]
        assert int(r["n_hvp"]) == 2 * 2  # K(K-1) = 2 HVPs per HVP batch, 2 HVP batches
    # the numbers are the estimator's: the latest row against a direct estimate on the same held list
    rep = mon.last
    assert float(rows[-1]["P/mix/lo->hi"]) == rep.P("lo", "hi", "mix").mean
    assert float(rows[-1]["S/lo/lo"]) == pytest.approx(rep.P("lo", "hi", "lo").mean, rel=1e-12)
    # TensorBoard events hold the same scalars at the same steps
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    ev = acc.Scalars("P/mix/lo->hi")
    assert [e.step for e in ev] == [2, 4, 6]
    np.testing.assert_allclose([e.value for e in ev], [float(r["P/mix/lo->hi"]) for r in rows], rtol=1e-6)


def test_monitor_equals_the_estimator_on_fixed_held_batches() -> None:
    model = _gpt2(seed=3).eval()
    g = torch.Generator().manual_seed(5)
    held = {d: [torch.randint(lo, lo + 128, (2, 16), generator=g) for _ in range(6)] for d, lo in
            (("x", 0), ("y", 128), ("z", 64))}
    mon = BracketMonitor(model, lm_loss, held, every=7, mode="tournament", targets="z", **FAST)
    tour = mon.step(14)
    assert tour.target == "z" and tour.n_hvp == 3 * 2  # K HVPs per HVP batch
    direct = BracketEstimator(model, lm_loss, held).estimate(4, 2, targets=["z"], n_groups=2, mode="pairs")
    for i in "xyz":
        for j in "xyz":
            assert tour.P(i, j).mean == pytest.approx(direct.P(i, j, "z").mean, rel=1e-6, abs=1e-12)
    row = BracketMonitor.row(14, tour)
    assert set(row) >= {"S/z/x", "S_z/z/y", "P/z/x->y", "order/z"} and row["step"] == 14
    assert mon.step(8) is None and len(mon.history) == 1  # not a multiple of every: nothing


def test_as_a_commute_train_callback(tmp_path) -> None:
    from commute.data import load_domains
    from commute.train import TrainConfig, train

    corpora = {}
    for name, alphabet, seed in (("a", "abcdefg ", 0), ("b", "xyz.,!? ", 1)):
        r = random.Random(seed)
        docs = ["".join(r.choice(alphabet) for _ in range(r.randint(50, 150))) for _ in range(60)]
        (tmp_path / f"{name}.txt").write_text("\n\n".join(docs))
        corpora[name] = str(tmp_path / f"{name}.txt")
    tiny = {"n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 32}
    cfg = TrainConfig(model="tiny", model_overrides=tiny, domains=corpora, cache_dir=str(tmp_path / "cache"),
                      seq_len=32, batch_size=4, steps=4, lr=3e-3, eval_every=0, log_every=1, ckpt_every=0,
                      tensorboard=False, device="cpu")
    doms = load_domains(corpora, cache_dir=cfg.cache_dir)
    held = {n: d.batches(4, 32, seed=7, split="val") for n, d in doms.items()}
    mon = BracketMonitor(None, lm_loss, held, every=2, csv_path=tmp_path / "logs" / "b.csv", **FAST)
    a = train(cfg, tmp_path / "with", callbacks=[mon], progress=False)
    mon.close()
    b = train(cfg, tmp_path / "without", progress=False)
    assert a.losses == b.losses
    from commute.train import load_checkpoint

    wa, wb = load_checkpoint(tmp_path / "with").model, load_checkpoint(tmp_path / "without").model
    assert all(torch.equal(p, q) for p, q in zip(wa.parameters(), wb.parameters(), strict=True))
    with open(tmp_path / "logs" / "b.csv", newline="") as fh:
        assert [int(r["step"]) for r in csv.DictReader(fh)] == [2, 4]


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 4, seq: int = 16) -> None:
        g = torch.Generator().manual_seed(11)
        self.ids = torch.randint(0, 256, (n, seq), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, k: int) -> dict:
        return {"input_ids": self.ids[k], "labels": self.ids[k]}


def _hf_train(out: Path, callback: CommuteCallback | None) -> tuple[float, nn.Module]:
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(out), max_steps=4, per_device_train_batch_size=2, report_to=[],
                             use_cpu=True, save_strategy="no", logging_strategy="no", seed=0,
                             disable_tqdm=True)
    model = _gpt2(seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=_Tokens(),
                      callbacks=[callback] if callback is not None else None)
    return trainer.train().training_loss, model


def test_hugging_face_trainer_callback(tmp_path) -> None:
    pytest.importorskip("accelerate")  # the Trainer needs it (pyproject's test extra)
    g = torch.Generator().manual_seed(2)

    def hi():  # draws from the global torch RNG, which the Trainer's dropout also uses
        while True:
            yield {"input_ids": torch.randint(128, 256, (2, 16))}

    held = {"lo": [{"input_ids": torch.randint(0, 128, (2, 16), generator=g)} for _ in range(6)], "hi": hi()}
    cb = CommuteCallback(held, every=2, **FAST)
    loss_with, m_with = _hf_train(tmp_path / "with", cb)
    loss_without, m_without = _hf_train(tmp_path / "without", None)
    assert loss_with == loss_without and math.isfinite(loss_with)
    assert all(torch.equal(p, q) for p, q in zip(m_with.parameters(), m_without.parameters(), strict=True))
    with open(tmp_path / "with" / "bracket.csv", newline="") as fh:  # default log_dir: the output_dir
        rows = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in rows] == [2, 4] == [s for s, _ in cb.monitor.history]
    for r in rows:
        for k, v in r.items():
            if k.startswith(("P/", "P_stderr/", "S/", "S_stderr/")):
                assert math.isfinite(float(v)), k


def test_preserve_rng_and_user_errors(tmp_path) -> None:
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    expect = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    with preserve_rng():
        torch.rand(100), random.random(), np.random.rand(5)
    assert torch.equal(torch.rand(3), expect[0]) and random.random() == expect[1]
    assert np.random.rand() == expect[2]

    held = _held()
    for kw, match in [({"every": 0}, "every"), ({"mode": "sideways"}, "mode"),
                      ({"tensorboard": True}, "log_dir")]:
        with pytest.raises(CommuteError, match=match):
            BracketMonitor(None, None, held, **kw)
    with pytest.raises(CommuteError, match="two domains"):
        BracketMonitor(None, None, {"lo": held["lo"]})
    with pytest.raises(CommuteError, match="no model"):
        BracketMonitor(None, None, held, every=1).step(1)
    (tmp_path / "bracket.csv").write_text("step,something_else\n1,2\n")
    mon = BracketMonitor(_gpt2(), None, held, every=1, log_dir=tmp_path, **FAST)
    with pytest.raises(CommuteError, match="other columns"):
        mon.step(1)
