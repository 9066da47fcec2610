"""Domain-weight schedules: a schedule maps a training step t to weights w(t) over the domains.

A schedule is non-negative, sums to one at every step and is right-continuous (docs/design.md §1): the
weights at step t are the ones that compose the batch of step t. Every schedule is validated when it is
built, so a bad one fails with one :class:`~commute.errors.CommuteError` sentence before any training
starts. All schedules except :class:`FromCallable` round-trip through JSON/YAML (``to_dict`` /
:meth:`Schedule.from_dict`, :func:`save_schedule` / :func:`load_schedule`).

* :class:`Constant` — w(t) = w.
* :class:`Stages` — piecewise constant, w(t) = w_s for start_s <= t < start_{s+1}.
* :class:`LinearRamp` — w_from until ``start``, linear interpolation to w_to at ``end``, w_to after.
* :class:`Intervention` — the paper's reordering schedule, eq. (9) (and eq. (10) for unbalanced bases).
* :class:`FromCallable` — any ``fn(step) -> weights`` (e.g. an online controller), checked at every call.

:func:`parse_schedule` accepts a schedule, a dict, a path to a ``.json``/``.yaml`` file or a shorthand
``"en=0.5,ru=0.5"`` (constant weights).
"""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from commute.errors import CommuteError
from commute.io import atomic_write, read_text, read_yaml

__all__ = [
    "Schedule",
    "Constant",
    "Stages",
    "LinearRamp",
    "Intervention",
    "FromCallable",
    "check_weights",
    "check_delta_w",
    "delta_w_room",
    "load_schedule",
    "save_schedule",
    "parse_schedule",
]

TOL = 1e-6
"""Weights must sum to one within this tolerance."""


def _fmt(w: Mapping[str, float]) -> str:
    return "{" + ", ".join(f"{k}={v:g}" for k, v in w.items()) + "}"


def check_weights(
    weights: Mapping[str, Any], domains: Sequence[str] | None = None, where: str = "weights"
) -> dict[str, float]:
    """Validate one weight vector and return it as ``{domain: float}``.

    Checks: a non-empty mapping of finite, non-negative numbers summing to 1 within 1e-6; if ``domains``
    is given, every key is one of them (missing domains get weight 0 and are added, in ``domains``
    order). Raises :class:`CommuteError` with one sentence naming ``where`` otherwise.
    """
    if not isinstance(weights, Mapping) or not weights:
        raise CommuteError(f"{where} must be a non-empty mapping of domain name to weight, got {weights!r}.")
    out: dict[str, float] = {}
    for k, v in weights.items():
        if not isinstance(k, str) or not k:
            raise CommuteError(f"{where} has a domain name that is not a non-empty string: {k!r}.")
        if isinstance(v, bool):  # YAML's true/false are not 1 and 0
            raise CommuteError(f"{where} gives domain {k!r} the weight {str(v).lower()} (a boolean); weights "
                               "must be numbers.")
        try:
            f = float(v)
        except (TypeError, ValueError, OverflowError):
            raise CommuteError(f"{where} gives domain {k!r} the non-numeric weight {v!r}.") from None
        if not math.isfinite(f):
            raise CommuteError(f"{where} gives domain {k!r} the non-finite weight {v!r}.")
        if f < 0:
            raise CommuteError(f"{where} gives domain {k!r} the negative weight {f:g}; weights must be >= 0.")
        out[k] = f
    total = math.fsum(out.values())
    if abs(total - 1.0) > TOL:
        raise CommuteError(f"{where} {_fmt(out)} sum to {total:.9g}, not 1 (tolerance {TOL:g}).")
    if domains is not None:
        unknown = [k for k in out if k not in domains]
        if unknown:
            raise CommuteError(
                f"{where} name unknown domain(s) {', '.join(map(repr, unknown))}; "
                f"known domains: {', '.join(map(repr, domains))}."
            )
        out = {d: out.get(d, 0.0) for d in domains}
    return out


def _union_domains(ws: Sequence[Mapping[str, float]]) -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for w in ws:
        for k in w:
            seen.setdefault(k, None)
    return tuple(seen)


def _check_step(x: Any, name: str, minimum: int = 0) -> int:
    ok = (not isinstance(x, bool) and isinstance(x, int | float)
          and (isinstance(x, int) or (math.isfinite(x) and x == int(x))) and x >= minimum)
    if not ok:
        raise CommuteError(f"{name} must be an integer >= {minimum}, got {x!r}.")
    return int(x)


def delta_w_room(base: Mapping[str, float], first: str, second: str) -> float:
    """The largest |Δw| for which both orders of the eq. (9)/(10) intervention keep w_first and w_second in
    [0, 1]: min(w_first, w_second, 1 − w_first, 1 − w_second)."""
    lo, hi = min(base[first], base[second]), max(base[first], base[second])
    return min(lo, 1 - hi)


def check_delta_w(
    base: Mapping[str, float], first: str, second: str, delta_w: float, where: str = ""
) -> None:
    """Raise :class:`CommuteError` when Δw pushes a weight of θ12 or θ21 outside [0, 1] (the one check of
    the intervention's bounds: schedules, the study's config and the estimator's predictions use it)."""
    room = delta_w_room(base, first, second)
    if abs(delta_w) > room + 1e-12:
        raise CommuteError(
            f"{where}delta_w={delta_w:g} pushes a weight outside [0, 1] (base {first}={base[first]:g}, "
            f"{second}={base[second]:g}); use |delta_w| <= {room:g}."
        )


class Schedule(ABC):
    """Base class: ``schedule(step) -> {domain: weight}`` over the fixed tuple :attr:`domains`.

    Weights returned by ``__call__`` are non-negative, sum to 1 within 1e-6 and list every domain in
    :attr:`domains` (zeros included).
    """

    type_name: ClassVar[str] = ""
    _registry: ClassVar[dict[str, type[Schedule]]] = {}
    domains: tuple[str, ...]

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if cls.type_name:
            Schedule._registry[cls.type_name] = cls

    @abstractmethod
    def __call__(self, step: int) -> dict[str, float]:
        """Weights at training step ``step`` (>= 0)."""

    @abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """A JSON/YAML-able description ``{"type": ..., ...}``; inverse of :meth:`from_dict`."""

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> Schedule:
        """Rebuild a schedule from :meth:`to_dict` output (validated like a fresh one)."""
        if not isinstance(d, Mapping) or "type" not in d:
            raise CommuteError(f"a schedule description must be a mapping with a 'type' key, got {d!r}.")
        kind = d["type"]
        if not isinstance(kind, str):
            raise CommuteError(f"the schedule type must be a name such as 'constant', got {kind!r}.")
        cls = Schedule._registry.get(kind)
        if cls is None:
            raise CommuteError(
                f"unknown schedule type {kind!r}; expected one of {', '.join(sorted(Schedule._registry))}."
            )
        return cls._from_dict(d)

    @classmethod
    @abstractmethod
    def _from_dict(cls, d: Mapping[str, Any]) -> Schedule: ...

    def total_weight(self, start: int, end: int) -> dict[str, float]:
        """Σ_{t=start}^{end-1} w(t) per domain: the expected number of *batches' worth* of each domain.

        Multiplied by batch size × sequence length this is the expected token count per domain, which
        compared schedules must share (the paper's eqs. (9)/(10) keep it equal).
        """
        tot = dict.fromkeys(self.domains, 0.0)
        for t in range(start, end):
            for k, v in self(t).items():
                tot[k] += v
        return tot

    def tabulate(self, n_steps: int) -> Stages:
        """The schedule on steps [0, n_steps) as :class:`Stages` (serialisable; merges equal runs)."""
        stages: list[tuple[int, dict[str, float]]] = []
        for t in range(n_steps):
            w = self(t)
            if not stages or stages[-1][1] != w:
                stages.append((t, w))
        return Stages(stages)

    def _require(self, step: int) -> None:
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise CommuteError(f"a schedule is evaluated at integer steps >= 0, got {step!r}.")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Schedule) and type(self) is type(other) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(json.dumps(self.to_dict(), sort_keys=True))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items() if k != "type")
        return f"{type(self).__name__}({args})"


class Constant(Schedule):
    """w(t) = ``weights`` for every step."""

    type_name = "constant"

    def __init__(self, weights: Mapping[str, float]) -> None:
        self.weights = check_weights(weights, where="constant schedule weights")
        self.domains = tuple(self.weights)

    def __call__(self, step: int) -> dict[str, float]:
        self._require(step)
        return dict(self.weights)

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type_name, "weights": dict(self.weights)}

    @classmethod
    def _from_dict(cls, d: Mapping[str, Any]) -> Constant:
        return cls(d.get("weights", {}))


class Stages(Schedule):
    """Piecewise-constant, right-continuous: w(t) = w_s for start_s <= t < start_{s+1}.

    ``stages`` is ``[(start_0=0, w_0), (start_1, w_1), ...]`` with strictly increasing starts; the last
    stage lasts forever. Domains are the union over stages (a domain absent from a stage has weight 0).
    """

    type_name = "stages"

    def __init__(self, stages: Sequence[tuple[int, Mapping[str, float]]]) -> None:
        if not isinstance(stages, Sequence) or len(stages) == 0:
            raise CommuteError(
                f"a stages schedule needs a non-empty list of (start, weights), got {stages!r}."
            )
        parsed: list[tuple[int, dict[str, float]]] = []
        for i, item in enumerate(stages):
            if isinstance(item, Mapping):  # {"start": s, "weights": w} (YAML-friendly form)
                item = (item.get("start"), item.get("weights"))
            if not isinstance(item, Sequence) or len(item) != 2:
                raise CommuteError(f"stage {i} must be a (start, weights) pair, got {item!r}.")
            start = _check_step(item[0], f"the start of stage {i}")
            w = check_weights(item[1], where=f"stage {i} weights")
            if i == 0 and start != 0:
                raise CommuteError(f"the first stage must start at step 0, not {start}.")
            if i > 0 and start <= parsed[-1][0]:
                raise CommuteError(
                    f"stage starts must increase strictly, but stage {i} starts at {start} "
                    f"after stage {i - 1} at {parsed[-1][0]}."
                )
            parsed.append((start, w))
        self.domains = _union_domains([w for _, w in parsed])
        self.stages = [(s, {d: w.get(d, 0.0) for d in self.domains}) for s, w in parsed]
        self._starts = [s for s, _ in self.stages]

    def __call__(self, step: int) -> dict[str, float]:
        self._require(step)
        import bisect

        return dict(self.stages[bisect.bisect_right(self._starts, step) - 1][1])

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type_name, "stages": [{"start": s, "weights": dict(w)} for s, w in self.stages]}

    @classmethod
    def _from_dict(cls, d: Mapping[str, Any]) -> Stages:
        return cls(d.get("stages", []))


class LinearRamp(Schedule):
    """w(t) = w_from for t < start; w_from + (t−start)/(end−start)·(w_to − w_from) for start <= t < end;
    w_to for t >= end. A convex combination of two valid weight vectors, hence valid at every step."""

    type_name = "linear_ramp"

    def __init__(self, start: int, end: int, w_from: Mapping[str, float], w_to: Mapping[str, float]) -> None:
        self.start = _check_step(start, "the ramp start")
        self.end = _check_step(end, "the ramp end")
        if self.end <= self.start:
            raise CommuteError(f"the ramp must end after it starts, got start={self.start}, end={self.end}.")
        a = check_weights(w_from, where="the ramp's w_from")
        b = check_weights(w_to, where="the ramp's w_to")
        self.domains = _union_domains([a, b])
        self.w_from = {d: a.get(d, 0.0) for d in self.domains}
        self.w_to = {d: b.get(d, 0.0) for d in self.domains}

    def __call__(self, step: int) -> dict[str, float]:
        self._require(step)
        if step < self.start:
            return dict(self.w_from)
        if step >= self.end:
            return dict(self.w_to)
        s = (step - self.start) / (self.end - self.start)
        return {d: (1.0 - s) * self.w_from[d] + s * self.w_to[d] for d in self.domains}

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.type_name,
            "start": self.start,
            "end": self.end,
            "w_from": dict(self.w_from),
            "w_to": dict(self.w_to),
        }

    @classmethod
    def _from_dict(cls, d: Mapping[str, Any]) -> LinearRamp:
        return cls(d.get("start"), d.get("end"), d.get("w_from", {}), d.get("w_to", {}))


class Intervention(Schedule):
    """The paper's reordering schedule w^{12, t0, T, Δw}, eq. (9) (balanced base) and eq. (10) (any base).

    ``base`` until t0; for t in [t0, t0+T): w[first] = base[first]+Δw, w[second] = base[second]−Δw; for
    t in [t0+T, t0+2T): the opposite signs; ``base`` again from t0+2T on. Other domains keep their base
    weight. Over [t0, t0+2T) every domain receives exactly the total weight of the base schedule, so the
    compared runs see equal token budgets. ``reversed()`` is the 21 schedule (first and second swapped).
    """

    type_name = "intervention"

    def __init__(
        self, base: Mapping[str, float], first: str, second: str, delta_w: float, t0: int, T: int
    ) -> None:
        self.base = check_weights(base, where="the intervention's base weights")
        self.domains = tuple(self.base)
        for name, d in (("first", first), ("second", second)):
            if not isinstance(d, str):
                raise CommuteError(f"the intervention's {name} domain must be a domain name, got {d!r}.")
            if d not in self.base:
                raise CommuteError(
                    f"the intervention's {name} domain {d!r} is not in its base weights "
                    f"({', '.join(map(repr, self.domains))})."
                )
        if first == second:
            raise CommuteError(f"the intervention needs two different domains, got {first!r} twice.")
        try:
            dw = float(delta_w)
        except (TypeError, ValueError):
            raise CommuteError(f"the intervention's delta_w must be a number, got {delta_w!r}.") from None
        if not math.isfinite(dw):
            raise CommuteError(f"the intervention's delta_w must be finite, got {delta_w!r}.")
        check_delta_w(self.base, first, second, dw)
        self.first, self.second, self.delta_w = first, second, dw
        self.t0 = _check_step(t0, "the intervention start t0")
        self.T = _check_step(T, "the intervention length T", minimum=1)
        hiw, low = dict(self.base), dict(self.base)
        # clamp float dust (e.g. 0.3 - 0.30000000000000004) so boundary cases |Δw| = base stay valid
        hiw[first], hiw[second] = max(0.0, self.base[first] + dw), max(0.0, self.base[second] - dw)
        low[first], low[second] = max(0.0, self.base[first] - dw), max(0.0, self.base[second] + dw)
        self._phase1 = check_weights(hiw, where="the intervention's first-phase weights")
        self._phase2 = check_weights(low, where="the intervention's second-phase weights")

    @property
    def end(self) -> int:
        """First step after the intervention, t0 + 2T."""
        return self.t0 + 2 * self.T

    def __call__(self, step: int) -> dict[str, float]:
        self._require(step)
        if step < self.t0 or step >= self.end:
            return dict(self.base)
        return dict(self._phase1 if step < self.t0 + self.T else self._phase2)

    def reversed(self) -> Intervention:
        """The mirrored schedule w^{21}: second domain boosted first (same base, Δw, t0, T)."""
        return Intervention(self.base, self.second, self.first, self.delta_w, self.t0, self.T)

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.type_name,
            "base": dict(self.base),
            "first": self.first,
            "second": self.second,
            "delta_w": self.delta_w,
            "t0": self.t0,
            "T": self.T,
        }

    @classmethod
    def _from_dict(cls, d: Mapping[str, Any]) -> Intervention:
        missing = [k for k in ("base", "first", "second", "delta_w", "t0", "T") if k not in d]
        if missing:
            raise CommuteError(f"the intervention schedule is missing field(s) {', '.join(missing)}.")
        return cls(d["base"], d["first"], d["second"], d["delta_w"], d["t0"], d["T"])


class FromCallable(Schedule):
    """Any ``fn(step) -> {domain: weight}`` (e.g. an online controller); validated at every call.

    Not serialisable: ``to_dict`` records only its name; rebuild it in code, or freeze a finite horizon
    with :meth:`Schedule.tabulate`.
    """

    type_name = "callable"

    def __init__(self, fn: Callable[[int], Mapping[str, float]], domains: Sequence[str]) -> None:
        if not callable(fn):
            raise CommuteError(f"FromCallable needs a callable step -> weights, got {fn!r}.")
        self.fn = fn
        self.domains = tuple(domains)
        if not self.domains or len(set(self.domains)) != len(self.domains):
            raise CommuteError(f"FromCallable needs distinct domain names, got {list(domains)!r}.")
        self(0)  # fail early on an obviously bad function

    def __call__(self, step: int) -> dict[str, float]:
        self._require(step)
        return check_weights(self.fn(step), self.domains, where=f"the schedule's weights at step {step}")

    def to_dict(self) -> dict[str, Any]:
        name = getattr(self.fn, "__qualname__", type(self.fn).__name__)
        return {
            "type": self.type_name,
            "name": f"{getattr(self.fn, '__module__', '?')}.{name}",
            "domains": list(self.domains),
        }

    @classmethod
    def _from_dict(cls, d: Mapping[str, Any]) -> FromCallable:
        raise CommuteError(
            f"the callable schedule {d.get('name', '?')!r} cannot be rebuilt from a file; pass it again in "
            "Python (or save schedule.tabulate(n_steps) instead)."
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FromCallable) and self.fn is other.fn and self.domains == other.domains

    def __hash__(self) -> int:
        return hash((id(self.fn), self.domains))


# --- files and shorthands ---------------------------------------------------------------------------


def _suffix(path: Path) -> str:
    s = path.suffix.lower()
    if s not in {".json", ".yaml", ".yml"}:
        raise CommuteError(f"schedule files must end in .json, .yaml or .yml, got {str(path)!r}.")
    return s


def save_schedule(schedule: Schedule, path: str | Path) -> Path:
    """Write ``schedule.to_dict()`` as JSON or YAML (by suffix) with :func:`commute.io.atomic_write`."""
    path = Path(path)
    s = _suffix(path)
    d = schedule.to_dict()
    if s == ".json":
        text = json.dumps(d, indent=2) + "\n"
    else:
        import yaml

        text = yaml.safe_dump(d, sort_keys=False)
    return atomic_write(path, text)


def load_schedule(path: str | Path) -> Schedule:
    """Read a schedule written by :func:`save_schedule` (or by hand) from ``.json``/``.yaml``."""
    path = Path(path)
    s = _suffix(path)
    where = f"schedule file {str(path)!r}"
    if s != ".json":
        return Schedule.from_dict(read_yaml(path, where))
    text = read_text(path, where)
    try:
        d = json.loads(text)
    except RecursionError:
        raise CommuteError(f"{where} is nested too deeply to read.") from None
    except json.JSONDecodeError as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CommuteError(f"{where} is not valid JSON: {msg}.") from None
    return Schedule.from_dict(d)


def _parse_shorthand(text: str) -> Constant:
    weights: dict[str, float] = {}
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        name, sep, val = part.partition("=")
        name = name.strip()
        if not sep or not name:
            raise CommuteError(
                f"cannot read schedule {text!r}; write it like 'en=0.5,ru=0.5' or give a file."
            )
        try:
            weights[name] = float(val)
        except ValueError:
            raise CommuteError(
                f"cannot read weight {val.strip()!r} for domain {name!r} in {text!r}."
            ) from None
    return Constant(weights)


def parse_schedule(
    obj: Schedule | Mapping[str, Any] | str | Path, domains: Sequence[str] | None = None
) -> Schedule:
    """A schedule from a :class:`Schedule`, a ``to_dict`` mapping, a ``.json``/``.yaml`` path, or the
    shorthand ``"en=0.5,ru=0.5"`` (constant weights).

    With ``domains``, also check that the schedule names only known domains.
    """
    if isinstance(obj, Schedule):
        sched = obj
    elif isinstance(obj, Mapping):
        if "type" in obj:
            sched = Schedule.from_dict(obj)
        else:  # a bare {domain: weight} mapping means constant weights
            sched = Constant(obj)
    elif isinstance(obj, str | Path):
        text = str(obj).strip()
        if isinstance(obj, Path) or Path(text).suffix.lower() in {".json", ".yaml", ".yml"}:
            sched = load_schedule(text)
        elif "=" in text:
            sched = _parse_shorthand(text)
        else:
            raise CommuteError(
                f"cannot read schedule {text!r}; write it like 'en=0.5,ru=0.5' or give a file."
            )
    else:
        raise CommuteError(f"cannot make a schedule from {type(obj).__name__} {obj!r}.")
    if domains is not None:
        unknown = [d for d in sched.domains if d not in domains]
        if unknown:
            raise CommuteError(
                f"the schedule names unknown domain(s) {', '.join(map(repr, unknown))}; "
                f"known domains: {', '.join(map(repr, domains))}."
            )
    return sched
