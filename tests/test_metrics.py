"""metrics.csv: exact float round trip, truncation on resume, the interval accumulator."""

from __future__ import annotations

import csv

import pytest

from commute.errors import CommuteError
from commute.metrics import Interval, Metrics, csv_fields


def read(path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_rows_round_trip_exactly_and_resume_truncates(tmp_path) -> None:
    names = ["en", "ru"]
    loss = 1 / 3  # repr round-trips every bit
    with Metrics(tmp_path, names, -1, tensorboard=False) as m:
        m.write_start(0, {"en": 5.5, "ru": 5.25}, {"en": 0, "ru": 0})
        for s in (1, 2, 3):
            m.write_step(s, 1e-3, loss * s, {"en": 0.1 * s, "ru": None}, {"en": 2.0} if s == 2 else {},
                         {"en": 0.7}, {"en": 64 * s, "ru": 0}, 1234.56, 0.123456)
    rows = read(tmp_path / "metrics.csv")
    assert list(rows[0]) == csv_fields(names)
    assert [r["step"] for r in rows] == ["0", "1", "2", "3"]
    assert rows[0]["val_loss/en"] == "5.5" and rows[0]["lr"] == "" and rows[0]["tokens/ru"] == "0"
    assert float(rows[3]["loss"]) == loss * 3 and float(rows[1]["train_loss/en"]) == 0.1
    assert rows[1]["train_loss/ru"] == "" and rows[1]["val_loss/en"] == "" and rows[2]["val_loss/en"] == "2.0"
    assert rows[1]["weight/en"] == "0.7" and rows[1]["weight/ru"] == "0.0"  # a missing weight is 0
    assert rows[1]["tokens_per_s"] == "1234.6" and rows[1]["elapsed_s"] == "0.123"
    # a run resumed from its step-2 checkpoint keeps rows 0..2 and appends after them
    with Metrics(tmp_path, names, 2, tensorboard=False) as m:
        assert [r["step"] for r in read(tmp_path / "metrics.csv")] == ["0", "1", "2"]
        m.write_step(3, 1e-3, None, {"en": None, "ru": None}, {}, {}, {"en": 0, "ru": 0}, 0.0, 0.0)
    assert [r["step"] for r in read(tmp_path / "metrics.csv")] == ["0", "1", "2", "3"]
    with pytest.raises(CommuteError, match="different columns"):
        Metrics(tmp_path, ["en", "de"], 3, tensorboard=False)


def test_tensorboard_events_are_written(tmp_path) -> None:
    with Metrics(tmp_path, ["a"], -1, tensorboard=True) as m:
        m.write_step(1, 0.5, 2.0, {"a": float("nan")}, {}, {"a": 1.0}, {"a": 8}, 1.0, 1.0)
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_interval_means_reset_and_survive_a_checkpoint() -> None:
    iv = Interval(["a", "b"])
    iv.add(2.0, {"a": 3.0, "b": 0.0}, {"a": 2, "b": 0})
    iv.add(4.0, {"a": 1.0, "b": 6.0}, {"a": 1, "b": 3})
    saved = Interval(["a", "b"], iv.to_dict())  # what a checkpoint stores and a resume rebuilds
    for x in (iv, saved):
        assert x.pop() == (3.0, {"a": 4.0 / 3, "b": 2.0})
        assert x.pop() == (None, {"a": None, "b": None})
