"""A run's metrics: ``metrics.csv`` and TensorBoard events, one row per logged step, exact across resume.

Columns (``d`` over the run's domains)::

    step            optimiser steps done (the row describes θ_step)
    lr              learning rate of the last step
    loss            mean training loss of the steps since the previous row
    train_loss/d    mean per-sequence training loss of domain d's sequences since the previous row
    val_loss/d      validation loss at this step (only on evaluation rows)
    weight/d        schedule weight w_d of the last step (w(step - 1))
    tokens/d        tokens of domain d trained on since step 0
    tokens_per_s    throughput since the previous row; elapsed_s: seconds since this call started

The sums behind ``loss`` and ``train_loss/d`` (:class:`Interval`) are saved in every checkpoint, and a
resumed run first drops the rows written after its checkpoint, so an interrupted-and-resumed run writes the
same rows as an uninterrupted one (timings aside).
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from commute.errors import CommuteError
from commute.io import atomic_write

__all__ = ["Metrics", "Interval", "csv_fields", "read_metrics", "truncate_metrics"]

_CSV_BASE = ("step", "lr", "loss")
_STEP = re.compile(r"[0-9]+")


def csv_fields(names: Sequence[str]) -> list[str]:
    """The columns of ``metrics.csv`` for domains ``names``."""
    f = list(_CSV_BASE)
    f += [f"train_loss/{d}" for d in names]
    f += [f"val_loss/{d}" for d in names]
    f += [f"weight/{d}" for d in names]
    f += [f"tokens/{d}" for d in names]
    f += ["tokens_per_s", "elapsed_s"]
    return f


def read_metrics(path: Path, fields: list[str], upto: int) -> list[dict[str, str]]:
    """The rows of steps <= ``upto`` of an existing ``metrics.csv`` (none if there is none); a file with
    other columns than ``fields``, or one that is not UTF-8 CSV, is a one-sentence :class:`CommuteError`
    (nothing is written)."""
    if not path.exists():
        return []
    if not path.is_file():
        raise CommuteError(f"{str(path)!r} is not a regular file; move it away and run again.")
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            if reader.fieldnames and list(reader.fieldnames) != fields:
                raise CommuteError(f"{str(path)!r} has different columns than this run; use a new output "
                                   "directory.")
            return [r for r in reader if _STEP.fullmatch(r.get("step") or "") and int(r["step"]) <= upto]
    except (UnicodeDecodeError, csv.Error) as exc:
        why = "not UTF-8 text" if isinstance(exc, UnicodeDecodeError) else f"not CSV: {exc}"
        raise CommuteError(f"{str(path)!r} is damaged ({why}); move it away to go on (the checkpoints are "
                           "intact; the rows up to the checkpoint are then lost).") from None


def truncate_metrics(path: Path, fields: list[str], upto: int) -> None:
    """Keep the rows of steps <= ``upto`` (a resumed run rewrites what came after its checkpoint); write
    the header alone if ``path`` does not exist. Other columns than ``fields`` are an error."""
    rows = read_metrics(path, fields, upto)
    s = io.StringIO()
    w = csv.DictWriter(s, fieldnames=fields, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    atomic_write(path, s.getvalue())


class Metrics:
    """``<out_dir>/metrics.csv`` (+ TensorBoard events in ``<out_dir>/tb``), one row per logged step.

    Opening keeps the existing rows of steps <= ``keep_upto`` (−1: none) and purges later TensorBoard
    events. Floats are written with ``repr`` (exact round trip), ``None`` as an empty cell. A context
    manager; :meth:`close` is idempotent.
    """

    def __init__(self, out_dir: Path, names: Sequence[str], keep_upto: int, tensorboard: bool) -> None:
        self.names = list(names)
        self.fields = csv_fields(self.names)
        self.path = out_dir / "metrics.csv"
        truncate_metrics(self.path, self.fields, keep_upto)
        self.fh = open(self.path, "a", newline="", encoding="utf-8")  # noqa: SIM115
        self.writer = csv.DictWriter(self.fh, fieldnames=self.fields, lineterminator="\n")
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(log_dir=str(out_dir / "tb"), purge_step=max(0, keep_upto + 1))
            except ImportError:  # pragma: no cover - tensorboard is a dependency
                self.tb = None

    def write(self, row: Mapping[str, Any]) -> None:
        """Append one row (keys among :attr:`fields`) and flush; finite numbers also go to TensorBoard."""
        self.writer.writerow({k: ("" if v is None else (repr(v) if isinstance(v, float) else v))
                              for k, v in row.items()})
        self.fh.flush()
        if self.tb is not None:
            step = int(row["step"])
            for k, v in row.items():
                if k != "step" and isinstance(v, int | float) and v is not None and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)

    def write_start(self, step: int, val: Mapping[str, float], tokens: Mapping[str, int]) -> None:
        """The row of a run's (or branch's) starting point: validation losses and token counts only."""
        self.write({"step": step, **{f"val_loss/{n}": v for n, v in val.items()},
                    **{f"tokens/{n}": tokens[n] for n in self.names}})

    def write_step(self, step: int, lr: float, loss: float | None, train_loss: Mapping[str, float | None],
                   val: Mapping[str, float], weights: Mapping[str, float], tokens: Mapping[str, int],
                   tokens_per_s: float, elapsed_s: float) -> None:
        """A training row (see the module docstring); a domain missing from ``val``/``weights`` is
        empty/0."""
        n_ = self.names
        self.write({"step": step, "lr": lr, "loss": loss,
                    **{f"train_loss/{n}": train_loss[n] for n in n_},
                    **{f"val_loss/{n}": val.get(n) for n in n_},
                    **{f"weight/{n}": weights.get(n, 0.0) for n in n_},
                    **{f"tokens/{n}": tokens[n] for n in n_},
                    "tokens_per_s": round(tokens_per_s, 1), "elapsed_s": round(elapsed_s, 3)})

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.fh.close()
        if self.tb is not None:
            with contextlib.suppress(Exception):
                self.tb.close()

    def __enter__(self) -> Metrics:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Interval:
    """Training-loss sums since the last metrics row (part of each checkpoint, so rows are exact on resume).

    ``loss_sum``/``n``: sum and count of step losses; ``dom_sum[d]``/``dom_n[d]``: sum and count of domain
    d's per-sequence losses.
    """

    def __init__(self, names: Sequence[str], d: Mapping[str, Any] | None = None) -> None:
        self.names = list(names)
        d = d or {}
        self.loss_sum = float(d.get("loss_sum", 0.0))
        self.n = int(d.get("n", 0))
        self.dom_sum = {k: float(d.get("dom_sum", {}).get(k, 0.0)) for k in self.names}
        self.dom_n = {k: int(d.get("dom_n", {}).get(k, 0)) for k in self.names}

    def add(self, loss: float, dom_sum: Mapping[str, float], dom_n: Mapping[str, int]) -> None:
        """Count one step: its loss and its per-domain sums and sequence counts."""
        self.loss_sum += loss
        self.n += 1
        for k in self.names:
            self.dom_sum[k] += dom_sum[k]
            self.dom_n[k] += dom_n[k]

    def to_dict(self) -> dict[str, Any]:
        return {"loss_sum": self.loss_sum, "n": self.n, "dom_sum": self.dom_sum, "dom_n": self.dom_n}

    def pop(self) -> tuple[float | None, dict[str, float | None]]:
        """The means since the last row (``None`` where nothing was counted), then start afresh."""
        loss = self.loss_sum / self.n if self.n else None
        dom = {k: (self.dom_sum[k] / self.dom_n[k] if self.dom_n[k] else None) for k in self.names}
        self.__init__(self.names)  # type: ignore[misc]
        return loss, dom
