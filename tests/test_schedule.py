"""Schedules: validation, exact values at boundaries, token-budget equality, JSON/YAML round trips."""

from __future__ import annotations

import math

import pytest

from commute.errors import CommuteError
from commute.schedule import (
    Constant,
    FromCallable,
    Intervention,
    LinearRamp,
    Schedule,
    Stages,
    check_weights,
    load_schedule,
    parse_schedule,
    save_schedule,
)

EXAMPLES: list[Schedule] = [
    Constant({"en": 0.3, "ru": 0.7}),
    Stages([(0, {"en": 1.0}), (10, {"en": 0.25, "ru": 0.75}), (25, {"ru": 1.0})]),
    LinearRamp(5, 15, {"en": 0.9, "ru": 0.1}, {"en": 0.2, "ru": 0.8}),
    Intervention({"en": 0.5, "ru": 0.5}, "en", "ru", 0.3, t0=7, T=4),
    Intervention({"en": 0.9, "ru": 0.1}, "ru", "en", 0.09, t0=3, T=5),  # eq. (10), reversed roles
    Intervention({"en": 0.4, "ru": 0.4, "de": 0.2}, "en", "de", 0.2, t0=0, T=3),
]


@pytest.mark.parametrize("sched", EXAMPLES, ids=lambda s: type(s).__name__)
def test_every_step_is_a_valid_weight_vector(sched: Schedule) -> None:
    for t in range(40):
        w = sched(t)
        assert tuple(w) == sched.domains
        assert all(v >= 0 for v in w.values())
        assert math.fsum(w.values()) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("sched", EXAMPLES, ids=lambda s: type(s).__name__)
@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_file_round_trip_gives_identical_weights(sched: Schedule, suffix: str, tmp_path) -> None:
    path = save_schedule(sched, tmp_path / f"s{suffix}")
    back = load_schedule(path)
    assert back == sched and type(back) is type(sched)
    assert all(back(t) == sched(t) for t in range(40))
    assert Schedule.from_dict(sched.to_dict()) == sched
    assert parse_schedule(path) == sched and parse_schedule(str(path)) == sched


def test_stages_are_right_continuous() -> None:
    s = Stages([(0, {"a": 1.0}), (10, {"b": 1.0})])
    assert s(9) == {"a": 1.0, "b": 0.0}
    assert s(10) == {"a": 0.0, "b": 1.0}  # the new stage owns its start step
    assert s(10**9) == {"a": 0.0, "b": 1.0}
    # the YAML-friendly form is accepted too
    assert Stages([{"start": 0, "weights": {"a": 1}}, {"start": 10, "weights": {"b": 1}}]) == s


def test_linear_ramp_interpolates() -> None:
    r = LinearRamp(10, 20, {"a": 1.0, "b": 0.0}, {"a": 0.0, "b": 1.0})
    assert r(0) == r(10) == {"a": 1.0, "b": 0.0}
    assert r(15) == pytest.approx({"a": 0.5, "b": 0.5})
    assert r(19) == pytest.approx({"a": 0.1, "b": 0.9})
    assert r(20) == r(99) == {"a": 0.0, "b": 1.0}


@pytest.mark.parametrize("base", [{"en": 0.5, "ru": 0.5}, {"en": 0.9, "ru": 0.1}])
def test_intervention_matches_eq_9_at_every_boundary(base: dict[str, float]) -> None:
    t0, T, dw = 11, 6, 0.07
    s = Intervention(base, "en", "ru", dw, t0, T)
    up = {"en": base["en"] + dw, "ru": base["ru"] - dw}
    down = {"en": base["en"] - dw, "ru": base["ru"] + dw}
    expected = {
        0: base,
        t0 - 1: base,
        t0: up,
        t0 + T - 1: up,
        t0 + T: down,
        t0 + 2 * T - 1: down,
        t0 + 2 * T: base,
    }
    for t, w in expected.items():
        assert s(t) == pytest.approx(w, abs=1e-15), t
    assert s.end == t0 + 2 * T


@pytest.mark.parametrize("base", [{"en": 0.5, "ru": 0.5}, {"en": 0.9, "ru": 0.1}])
def test_intervention_12_21_and_base_spend_equal_budgets(base: dict[str, float]) -> None:
    """Paper §4.2: θ_12, θ_21 and θ(t0+2T) use the same number of tokens of every domain."""
    dw = min(base.values())
    s12 = Intervention(base, "en", "ru", dw, t0=4, T=9)
    s21 = s12.reversed()
    assert s21(4) == {"en": base["en"] - dw, "ru": base["ru"] + dw}
    ref = Constant(base).total_weight(0, s12.end)
    for s in (s12, s21):
        tot = s.total_weight(0, s12.end)
        assert tot == pytest.approx(ref, abs=1e-9)
    # ...but not over a window that cuts the intervention in half
    half = Constant(base).total_weight(0, 4 + 9)
    assert s12.total_weight(0, 4 + 9)["en"] == pytest.approx(half["en"] + 9 * dw, abs=1e-9)


@pytest.mark.parametrize(
    "make, fragment",
    [
        (lambda: Constant({"a": 0.6, "b": 0.6}), "sum to"),
        (lambda: Constant({"a": 1.2, "b": -0.2}), "negative"),
        (lambda: Constant({"a": float("nan"), "b": 1.0}), "non-finite"),
        (lambda: Constant({}), "non-empty"),
        (lambda: Constant({"a": "x"}), "non-numeric"),
        (lambda: Stages([(5, {"a": 1.0})]), "first stage must start at step 0"),
        (lambda: Stages([(0, {"a": 1.0}), (10, {"a": 1.0}), (10, {"a": 1.0})]), "increase strictly"),
        (lambda: Stages([(0, {"a": 1.0}), (-3, {"a": 1.0})]), "integer >= 0"),
        (lambda: Stages([]), "non-empty"),
        (lambda: LinearRamp(5, 5, {"a": 1}, {"a": 1}), "end after"),
        (lambda: Intervention({"a": 0.5, "b": 0.5}, "a", "c", 0.1, 0, 1), "not in its base"),
        (lambda: Intervention({"a": 0.5, "b": 0.5}, "a", "a", 0.1, 0, 1), "two different"),
        (lambda: Intervention({"a": 0.9, "b": 0.1}, "a", "b", 0.2, 0, 1), "outside [0, 1]"),
        (lambda: Intervention({"a": 0.5, "b": 0.5}, "a", "b", 0.1, 0, 0), "integer >= 1"),
        (lambda: FromCallable(lambda t: {"a": 0.5}, ["a"]), "sum to"),
        (lambda: FromCallable(lambda t: {"z": 1.0}, ["a"]), "unknown domain"),
        (lambda: Schedule.from_dict({"type": "wavy"}), "unknown schedule type"),
        (lambda: parse_schedule("en=0.5,ru"), "en=0.5,ru=0.5"),
        (lambda: parse_schedule("en=half,ru=0.5"), "cannot read weight"),
        (lambda: parse_schedule("en=0.5,ru=0.5", domains=["en", "de"]), "unknown domain"),
    ],
)
def test_bad_schedules_fail_with_one_sentence(make, fragment: str) -> None:
    with pytest.raises(CommuteError) as info:
        make()
    msg = str(info.value)
    assert fragment in msg
    assert "\n" not in msg and msg.endswith(".")


def test_sum_tolerance_is_1e_6() -> None:
    check_weights({"a": 0.5, "b": 0.5 + 0.9e-6})
    with pytest.raises(CommuteError):
        check_weights({"a": 0.5, "b": 0.5 + 1.1e-6})


def test_check_weights_fills_missing_domains_with_zero() -> None:
    assert check_weights({"ru": 1.0}, ["en", "ru"]) == {"en": 0.0, "ru": 1.0}


def test_parse_schedule_forms(tmp_path) -> None:
    c = parse_schedule(" en = 0.25 , ru=0.75 ")
    assert c == Constant({"en": 0.25, "ru": 0.75})
    assert parse_schedule({"en": 0.25, "ru": 0.75}) == c
    assert parse_schedule(c.to_dict()) == c
    assert parse_schedule(c) is c
    bad = tmp_path / "bad.yaml"
    bad.write_text("type: [unclosed")
    with pytest.raises(CommuteError, match="not valid YAML"):
        parse_schedule(bad)
    with pytest.raises(CommuteError, match="does not exist"):
        parse_schedule(tmp_path / "missing.json")


def test_callable_schedule_is_checked_and_tabulates() -> None:
    calls = []

    def fn(t: int) -> dict[str, float]:
        calls.append(t)
        return {"a": 1.0, "b": 0.0} if t < 3 else {"a": -0.5, "b": 1.5}

    s = FromCallable(fn, ["a", "b"])
    assert s(2) == {"a": 1.0, "b": 0.0}
    with pytest.raises(CommuteError, match="step 3"):
        s(3)
    ok = FromCallable(lambda t: {"a": 1.0} if t < 3 else {"b": 1.0}, ["a", "b"])
    tab = ok.tabulate(10)
    assert isinstance(tab, Stages) and len(tab.stages) == 2
    assert all(tab(t) == ok(t) for t in range(10))
    with pytest.raises(CommuteError, match="cannot be rebuilt"):
        Schedule.from_dict(ok.to_dict())


def test_steps_must_be_non_negative_integers() -> None:
    with pytest.raises(CommuteError):
        Constant({"a": 1.0})(-1)
