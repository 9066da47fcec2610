"""One optimiser step (``train_step``) and Adam's metric (``adam_metric``), against independent computations.

Truth: hand-written losses and gradient-descent updates for ``train_step``; for ``adam_metric``, the state
``torch.optim.Adam`` keeps per parameter *object* (no index order involved) and the update Adam actually
applied (with β1 = 0, Δθ = −lr·g / D).
"""

from __future__ import annotations

import copy

import pytest
import torch

from commute.data import Batch
from commute.errors import CommuteError, NonFiniteLossError
from commute.model import build_model, lm_loss, sequence_losses
from commute.train import (
    TrainConfig,
    _build_optimizer,
    _param_groups,
    adam_metric,
    param_group_names,
    train,
    train_step,
)

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = ["a", "b"]
OVERRIDES = {"n_layer": 1, "n_embd": 16, "n_head": 2, "n_positions": 16}


def tiny(dtype: torch.dtype = torch.float64, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("tiny", vocab_size=32, dtype=dtype, **OVERRIDES)


def batch(seed: int, rows: int = 6, T: int = 12) -> Batch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 32, (rows, T), generator=g)
    dom = torch.tensor([i % 2 for i in range(rows)])
    return Batch(input_ids=ids, domain=dom, step=0)


def sgd(model: torch.nn.Module, lr: float, **kw) -> torch.optim.Optimizer:
    return _build_optimizer(model, TrainConfig(optimizer="sgd", lr=lr, **kw))


# --------------------------------------------------------------------------------------------------
# train_step
# --------------------------------------------------------------------------------------------------
def test_sample_weighted_step_is_sgd_on_the_micro_batch_mean() -> None:
    model, lr = tiny(), 0.3
    ref = copy.deepcopy(model)
    micro = [batch(1), batch(2)]
    res = train_step(model, sgd(model, lr), micro, {"a": 0.5, "b": 0.5}, NAMES, lr=lr)
    loss = (lm_loss(ref, micro[0].input_ids) + lm_loss(ref, micro[1].input_ids)) / 2
    assert res.loss == pytest.approx(float(loss.detach()), rel=1e-12)
    grads = torch.autograd.grad(loss, list(ref.parameters()))
    for p, q, g in zip(model.parameters(), ref.parameters(), grads, strict=True):
        torch.testing.assert_close(p, q - lr * g, rtol=1e-12, atol=1e-14)
    # per-domain sums and counts: rows 0, 2, 4 are domain a, rows 1, 3, 5 domain b
    with torch.no_grad():
        seq = torch.cat([sequence_losses(ref, m.input_ids) for m in micro])
    dom = torch.cat([m.domain for m in micro])
    for k, n in enumerate(NAMES):
        assert res.domain_loss_sum[n] == pytest.approx(float(seq[dom == k].sum()), rel=1e-12)
        assert res.domain_sequences[n] == 6 and res.domain_tokens[n] == 6 * 12
        assert res.domain_losses[n] == pytest.approx(float(seq[dom == k].mean()), rel=1e-12)
    assert res.tokens == 2 * 6 * 12


def test_domain_weighted_step_descends_the_weighted_domain_means() -> None:
    model, lr, w = tiny(), 0.2, {"a": 0.9, "b": 0.3}
    ref = copy.deepcopy(model)
    mb = batch(3)
    res = train_step(model, sgd(model, lr), [mb], w, NAMES, lr=lr, loss_weighting="domain")
    seq = sequence_losses(ref, mb.input_ids)
    loss = (w["a"] * seq[mb.domain == 0].mean() + w["b"] * seq[mb.domain == 1].mean()) / (w["a"] + w["b"])
    assert res.loss == pytest.approx(float(loss.detach()), rel=1e-12)
    grads = torch.autograd.grad(loss, list(ref.parameters()))
    for p, q, g in zip(model.parameters(), ref.parameters(), grads, strict=True):
        torch.testing.assert_close(p, q - lr * g, rtol=1e-12, atol=1e-14)
    with pytest.raises(CommuteError, match="domain ids"):
        train_step(model, sgd(model, lr), [mb.input_ids], w, NAMES, lr=lr, loss_weighting="domain")


def test_grad_clip_bounds_the_step_and_lr_is_set() -> None:
    model, clip = tiny(), 1e-3
    before = [p.detach().clone() for p in model.parameters()]
    opt = sgd(model, 123.0)  # train_step sets the lr of every group
    train_step(model, opt, [batch(4)], {"a": 0.5, "b": 0.5}, NAMES, lr=1.0, grad_clip=clip)
    assert all(g["lr"] == 1.0 for g in opt.param_groups)
    with torch.no_grad():
        step = torch.sqrt(sum(((p - b) ** 2).sum() for p, b in zip(model.parameters(), before, strict=True)))
    assert float(step) == pytest.approx(clip, rel=1e-5)  # torch divides by ‖g‖ + 1e-6


def test_non_finite_loss_stops_before_the_optimiser_steps(tmp_path) -> None:
    model = tiny()
    with torch.no_grad():
        next(model.parameters())[0, 0] = float("nan")
    before = [p.detach().clone() for p in model.parameters()]
    ck = tmp_path / "step_00000004"
    with pytest.raises(NonFiniteLossError, match=r"at step 7 \(lr=0.1\); checkpoint step_00000004 is intact"):
        train_step(model, sgd(model, 0.1), [batch(5)], {"a": 1.0, "b": 0.0}, NAMES, lr=0.1, step=7,
                   last_checkpoint=ck)
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p.nan_to_num(), b.nan_to_num())


# --------------------------------------------------------------------------------------------------
# parameter groups and Adam's metric
# --------------------------------------------------------------------------------------------------
def test_param_group_names_are_the_optimisers_order() -> None:
    model = tiny()
    names = param_group_names(model)
    params = dict(model.named_parameters())
    groups = _param_groups(model, 0.1)
    assert [[id(params[n]) for n in g] for g in names] == [[id(p) for p in g["params"]] for g in groups]
    assert all(params[n].dim() >= 2 for n in names[0]) and all(params[n].dim() < 2 for n in names[1])
    assert sorted(names[0] + names[1]) == sorted(params)  # every parameter once (tied embeddings once)
    model.transformer.ln_f.weight.requires_grad_(False)
    assert "transformer.ln_f.weight" not in param_group_names(model)[1]


def _adam_steps(dtype: torch.dtype, betas: list[float], steps: int = 3):
    model = tiny(dtype)
    opt = _build_optimizer(model, TrainConfig(optimizer="adam", lr=1e-2, betas=betas, eps=1e-6))
    for s in range(steps):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        train_step(model, opt, [batch(10 + s)], {"a": 0.5, "b": 0.5}, NAMES, lr=1e-2)
    return model, opt, before


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_adam_metric_is_sqrt_vhat_plus_eps_per_named_parameter(dtype) -> None:
    model, opt, _ = _adam_steps(dtype, [0.9, 0.95])
    D = adam_metric(opt.state_dict(), model)
    assert D is not None and set(D) == {n for n, _ in model.named_parameters()}
    for name, p in model.named_parameters():
        s = opt.state[p]  # keyed by the parameter itself: no index order involved
        vhat = s["exp_avg_sq"].double() / (1 - 0.95 ** float(s["step"]))
        assert D[name].dtype == dtype and D[name].shape == p.shape
        assert torch.equal(D[name], (vhat.sqrt() + 1e-6).to(dtype)), name


def test_adam_metric_is_what_adam_divides_by() -> None:
    """With β1 = 0, m̂ = g and Adam's step is Δθ = −lr·g/D (up to rounding); g is still in ``.grad``."""
    model, opt, before = _adam_steps(torch.float64, [0.0, 0.99], steps=4)
    D = adam_metric(opt.state_dict(), model)
    assert D is not None
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach() - before[name], -1e-2 * p.grad / D[name], rtol=1e-9,
                                   atol=1e-15)


def test_adam_metric_without_adam_state_is_none_and_a_foreign_model_is_an_error() -> None:
    model = tiny()
    assert adam_metric(None, model) is None
    opt = _build_optimizer(model, TrainConfig(optimizer="adam"))
    assert adam_metric(opt.state_dict(), model) is None  # no step yet
    for momentum in (0.0, 0.9):  # plain SGD keeps no state, momentum SGD no exp_avg_sq
        m = tiny()
        o = sgd(m, 0.1, momentum=momentum)
        train_step(m, o, [batch(6)], {"a": 0.5, "b": 0.5}, NAMES, lr=0.1)
        assert adam_metric(o.state_dict(), m) is None
    model, opt, _ = _adam_steps(torch.float64, [0.9, 0.999], steps=1)
    other = build_model("tiny", vocab_size=32, dtype=torch.float64, **{**OVERRIDES, "n_layer": 2})
    with pytest.raises(CommuteError, match="parameter groups of sizes"):
        adam_metric(opt.state_dict(), other)


def test_adam_metric_of_a_checkpoint_is_the_live_optimisers(tmp_path) -> None:
    """Through train(): the metric from a saved checkpoint (torch.save/load, indices) is the live one."""
    from commute.train import load_checkpoint

    g = torch.Generator().manual_seed(0)
    src = [Batch(input_ids=torch.randint(0, 32, (4, 12), generator=g), domain=torch.tensor([0, 1, 0, 1]),
                 step=t) for t in range(3)]
    cfg = TrainConfig(model="tiny", model_overrides=OVERRIDES, vocab_size=32, domains={}, seq_len=12,
                      batch_size=4, steps=3, optimizer="adamw", weight_decay=0.1, lr=1e-2, eval_every=0,
                      ckpt_every=0, tensorboard=False, schedule={"type": "constant",
                                                                  "weights": {"a": 0.5, "b": 0.5}})
    live = {}

    def grab(info) -> None:
        live["D"] = adam_metric(info.optimizer.state_dict(), info.model)

    train(cfg, tmp_path / "r", batch_source=lambda t: src[t], callbacks=[grab], progress=False)
    ck = load_checkpoint(tmp_path / "r", with_optimizer=True)
    D = adam_metric(ck.optimizer_state, ck.model)
    assert D is not None and D.keys() == live["D"].keys()
    assert all(torch.equal(D[k], live["D"][k]) for k in D)
