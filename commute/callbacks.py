"""The bracket inside your own training loop: a plain-loop hook and a Hugging Face ``TrainerCallback``.

:class:`BracketMonitor` estimates, every ``every`` steps, P(L_i, L_j; L) for the domain pairs and targets
(or the order tournament of one target, K HVPs per HVP batch) with :class:`commute.estimate.BracketEstimator`
on batches you hold out for it, and logs each estimate as one row of a CSV file and/or as TensorBoard
scalars. It leaves training exactly as it was: the torch CPU and CUDA RNG states (and Python's and numpy's
global ones) are saved and restored around each estimate, module train/eval modes are restored, ``.grad``
fields are never touched (everything goes through ``torch.autograd.grad``), and parameters are only read.
So a run with the monitor takes bit-for-bit the same steps as one without (tested for the plain loop,
:func:`commute.train.train` and the Hugging Face ``Trainer``).

* plain loop: ``monitor.step(step)`` after each optimiser step (it estimates when ``step % every == 0``);
* :func:`commute.train.train`: pass ``callbacks=[monitor]`` (it takes the :class:`~commute.train.StepInfo`);
* Hugging Face ``Trainer``: ``callbacks=[CommuteCallback(streams, every=...)]`` (estimates on the unwrapped
  model at ``state.global_step``, on the main process only).

Columns (``t`` a target, ``i``/``j``/``d`` domains; pairs i < j in the domains' order, P(j, i) = −P(i, j))::

    step, seconds, n_hvp
    P/t/i->j, P_stderr/t/i->j, P_z/t/i->j     P(L_i, L_j; L_t): > 0 means i then j raises L_t
    S/t/d, S_stderr/t/d, S_z/t/d              tournament score S_d = Σ_j P(L_d, L_j; L_t)
    order/t                                   suggested order for L_t, first to last ("a,b,c")

Cost per estimate: per domain ``n_grad_batches`` gradients and ``n_hvp_batches`` double-backward graphs
with min(K−1, M) HVPs each for M targets (``mode="bracket"``) or 1 (``"tournament"``), about 2 gradients
per HVP (docs/design.md; :mod:`commute.estimate`).
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
import random
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from transformers import TrainerCallback

from commute.errors import CommuteError
from commute.estimate import BracketEstimator, BracketReport, LossFn, TargetsArg, TournamentReport

__all__ = ["BracketMonitor", "CommuteCallback", "preserve_rng"]

CSV_NAME = "bracket.csv"


@contextlib.contextmanager
def preserve_rng() -> Iterator[None]:
    """Restore the torch CPU RNG, every initialised CUDA device's RNG, and Python's and numpy's global RNGs
    on exit, so that work done inside (e.g. drawing held-out batches) cannot shift training's randomness."""
    py, npy = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


class BracketMonitor:
    """Estimate the bracket every ``every`` steps on held batches; log to CSV and/or TensorBoard.

    Args:
        model: the model being trained (read only; or ``None`` and pass ``model=`` to :meth:`step`).
        loss_fn: ``loss_fn(model, batch) -> mean loss`` (default :func:`commute.model.lm_loss`, the mean
            next-token cross-entropy of a ``[B, T]`` batch of token ids, or of a dict's ``"input_ids"``); see
            :class:`~commute.estimate.BracketEstimator` for the contract.
        streams: domain name -> batches held out for the monitor: an infinite iterator (each estimate
            continues it: fresh batches every time) or a list (each estimate starts it over: the same
            batches every time, so estimates at different steps differ only by the model). Per estimate each
            domain needs ``n_grad_batches + n_hvp_batches`` batches.
        every: estimate when ``step % every == 0``.
        mode: ``"bracket"`` (every pair, every target; the estimator picks the cheaper HVP route) or
            ``"tournament"`` (one target, K HVPs per HVP batch).
        targets: for ``"bracket"``, the targets as for :meth:`BracketEstimator.estimate` (default: each
            domain's loss and their uniform mix ``"mix"``); for ``"tournament"``, one target: a domain name,
            ``"mix"`` (default) or a dict of domain weights (named ``"target"``).
        n_grad_batches, n_hvp_batches, n_groups: per estimate, as :meth:`BracketEstimator.estimate`.
        log_dir: writes ``<log_dir>/bracket.csv`` and, with ``tensorboard=True``, events under
            ``<log_dir>/tb``. ``csv_path``: the CSV file elsewhere. ``writer``: your own
            ``torch.utils.tensorboard.SummaryWriter`` (not closed by :meth:`close`).
        progress: show the estimator's progress bar.

    ``history`` keeps ``(step, report)`` of every estimate (a :class:`~commute.estimate.BracketReport`, or
    a :class:`~commute.estimate.TournamentReport`); ``last`` the latest.
    """

    def __init__(
        self,
        model: nn.Module | None,
        loss_fn: LossFn | None,
        streams: Mapping[str, Iterable[Any]],
        *,
        every: int = 100,
        mode: Literal["bracket", "tournament"] = "bracket",
        targets: TargetsArg | str = None,
        n_grad_batches: int = 20,
        n_hvp_batches: int = 10,
        n_groups: int = 5,
        log_dir: str | os.PathLike[str] | None = None,
        csv_path: str | os.PathLike[str] | None = None,
        tensorboard: bool = False,
        writer: Any = None,
        progress: bool = False,
    ) -> None:
        from commute.model import lm_loss

        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise CommuteError(f"every must be a whole number of steps >= 1, got {every!r}.")
        if mode not in ("bracket", "tournament"):
            raise CommuteError(f"mode must be 'bracket' or 'tournament', got {mode!r}.")
        if len(streams) < 2:
            raise CommuteError(f"the bracket needs at least two domains, got {list(streams)}.")
        if mode == "tournament" and targets is not None and not isinstance(targets, str | Mapping):
            raise CommuteError("a tournament has one target: a domain name, 'mix' or a dict of domain "
                               "weights.")
        self.model = model
        self.loss_fn = loss_fn if loss_fn is not None else lm_loss
        self.streams = {str(k): v for k, v in streams.items()}
        self.every = every
        self.mode = mode
        self.targets = targets
        self.n_grad_batches, self.n_hvp_batches, self.n_groups = n_grad_batches, n_hvp_batches, n_groups
        self.progress = progress
        self.csv_path = Path(csv_path) if csv_path is not None else (
            Path(log_dir) / CSV_NAME if log_dir is not None else None)
        self.writer = writer
        self._own_writer = False
        if tensorboard and writer is None:
            if log_dir is None:
                raise CommuteError("tensorboard=True needs a log_dir (or pass your own writer=).")
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(Path(log_dir) / "tb"))
            self._own_writer = True
        self._fields: list[str] | None = None
        self._fh: Any = None
        self._csv: Any = None
        self.history: list[tuple[int, BracketReport | TournamentReport]] = []

    @property
    def last(self) -> BracketReport | TournamentReport | None:
        return self.history[-1][1] if self.history else None

    # ---- the hook ----------------------------------------------------------------------------------
    def __call__(self, info: Any) -> None:
        """As a :func:`commute.train.train` callback: ``info`` is its :class:`~commute.train.StepInfo`."""
        self.step(int(info.step), model=info.model)

    def step(self, step: int, model: nn.Module | None = None) -> BracketReport | TournamentReport | None:
        """Estimate and log if ``step % every == 0`` (``step``: optimiser steps done); returns the report."""
        if step % self.every != 0:
            return None
        model = model if model is not None else self.model
        if model is None:
            raise CommuteError("BracketMonitor has no model: pass one to the constructor or to step().")
        t0 = time.perf_counter()
        with preserve_rng():
            est = BracketEstimator(model, self.loss_fn, self.streams)
            rep: BracketReport | TournamentReport
            targets: Any = self.targets
            if self.mode == "tournament":
                rep = est.tournament(targets, self.n_grad_batches, self.n_hvp_batches, n_groups=self.n_groups,
                                     progress=self.progress)
            else:
                rep = est.estimate(self.n_grad_batches, self.n_hvp_batches, targets=targets,
                                   n_groups=self.n_groups, progress=self.progress)
        self.history.append((step, rep))
        self._log(step, rep, time.perf_counter() - t0)
        return rep

    # ---- logging -----------------------------------------------------------------------------------
    @staticmethod
    def row(step: int, rep: BracketReport | TournamentReport, seconds: float = math.nan) -> dict[str, Any]:
        """The logged values of one estimate (see the module docstring for the columns)."""
        if isinstance(rep, TournamentReport):
            tours = {rep.target: rep}
        else:
            tours = {t: rep.tournament(t) for t in rep.targets}
        doms = rep.domains
        out: dict[str, Any] = {"step": step, "seconds": seconds, "n_hvp": rep.n_hvp}
        for t, tour in tours.items():
            for a, i in enumerate(doms):
                for j in doms[a + 1:]:
                    e = tour.P(i, j)
                    out |= {f"P/{t}/{i}->{j}": e.mean, f"P_stderr/{t}/{i}->{j}": e.stderr,
                            f"P_z/{t}/{i}->{j}": e.z if math.isfinite(e.z) else None}
            for d, e in tour.scores.items():
                out |= {f"S/{t}/{d}": e.mean, f"S_stderr/{t}/{d}": e.stderr,
                        f"S_z/{t}/{d}": e.z if math.isfinite(e.z) else None}
            out[f"order/{t}"] = ",".join(tour.order)
        return out

    def _log(self, step: int, rep: BracketReport | TournamentReport, seconds: float) -> None:
        row = self.row(step, rep, seconds)
        if self.csv_path is not None:
            if self._csv is None:
                self._open(list(row))
            if list(row) != self._fields:
                raise CommuteError(f"this estimate's columns differ from those of {str(self.csv_path)!r}.")
            self._csv.writerow({k: ("" if v is None else repr(v) if isinstance(v, float) else v)
                                for k, v in row.items()})
            self._fh.flush()
        if self.writer is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, int | float) and v is not None and math.isfinite(v):
                    self.writer.add_scalar(k, v, step)
            self.writer.flush()

    def _open(self, fields: list[str]) -> None:
        assert self.csv_path is not None
        path = self.csv_path
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_file() and path.stat().st_size > 0:  # continue a resumed run's file
            with open(path, newline="", encoding="utf-8") as fh:
                head = next(csv.reader(fh), [])
            if head != fields:
                raise CommuteError(f"{str(path)!r} has other columns than this monitor writes; give another "
                                   "log_dir or csv_path.")
            self._fh = open(path, "a", newline="", encoding="utf-8")  # noqa: SIM115
            self._csv = csv.DictWriter(self._fh, fieldnames=fields, lineterminator="\n")
        else:
            self._fh = open(path, "w", newline="", encoding="utf-8")  # noqa: SIM115
            self._csv = csv.DictWriter(self._fh, fieldnames=fields, lineterminator="\n")
            self._csv.writeheader()
        self._fields = fields

    def close(self) -> None:
        """Close the CSV file and a TensorBoard writer the monitor opened itself (idempotent)."""
        if self._fh is not None:
            with contextlib.suppress(Exception):
                self._fh.close()
            self._fh = self._csv = None
        if self._own_writer and self.writer is not None:
            with contextlib.suppress(Exception):
                self.writer.close()
            self.writer = None

    def __enter__(self) -> BracketMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class CommuteCallback(TrainerCallback):
    """:class:`BracketMonitor` inside a Hugging Face ``Trainer``: ``Trainer(..., callbacks=[cb])``.

    Estimates at ``on_step_end`` when ``state.global_step % every == 0``, on the model the Trainer passes
    (``kwargs["model"]``, the unwrapped module), on the main process only (``state.is_world_process_zero``;
    DDP has no double backward, docs/design.md §2). The CSV goes to ``log_dir`` (default: the Trainer's
    ``output_dir``) as ``bracket.csv``; TensorBoard events to ``<log_dir>/tb`` with ``tensorboard=True``, or
    to your ``writer``. Every other argument is :class:`BracketMonitor`'s; ``loss_fn`` defaults to
    :func:`commute.model.lm_loss` (our own float64-safe next-token cross-entropy of ``batch["input_ids"]``).
    ``monitor`` is the underlying :class:`BracketMonitor` (its ``history``), once training has begun.
    """

    def __init__(
        self,
        streams: Mapping[str, Iterable[Any]],
        loss_fn: LossFn | None = None,
        *,
        every: int = 100,
        log_dir: str | os.PathLike[str] | None = None,
        **monitor_kwargs: Any,
    ) -> None:
        self._streams = streams
        self._loss_fn = loss_fn
        self._every = every
        self._log_dir = log_dir
        self._kwargs = monitor_kwargs
        self.monitor: BracketMonitor | None = None
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise CommuteError(f"every must be a whole number of steps >= 1, got {every!r}.")

    def _get(self, args: Any) -> BracketMonitor:
        if self.monitor is None:
            log_dir = self._log_dir if self._log_dir is not None else getattr(args, "output_dir", None)
            self.monitor = BracketMonitor(None, self._loss_fn, self._streams, every=self._every,
                                          log_dir=log_dir, **self._kwargs)
        return self.monitor

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            self._get(args)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero or state.global_step % self._every != 0:
            return
        model = kwargs.get("model")
        if model is None:
            raise CommuteError("the Trainer passed no model to CommuteCallback.on_step_end.")
        self._get(args).step(int(state.global_step), model=model)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.monitor is not None:
            self.monitor.close()
