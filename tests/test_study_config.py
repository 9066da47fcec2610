"""Study-config validation: every intervention and the locality sweep stay inside [0, 1], and settings the
prediction gamma^2 dw T^2 P (gamma = lr) does not model are refused before any training starts."""

from __future__ import annotations

import pytest

from commute.errors import CommuteError
from commute.study import PRESETS, StudyConfig


def _cfg(**changes) -> dict:
    d = {**PRESETS["tiny"], **changes}
    return d


def test_presets_validate():
    for name in PRESETS:
        StudyConfig.from_dict(PRESETS[name])


def test_theta21_bound_is_checked_too():
    # base en=0.1: theta12 (en +0.2 first) is fine, but theta21 takes en to 0.1 - 0.2 < 0
    variants = [{"name": "v", "base": {"en": 0.1, "ru": 0.9}, "delta_ws": [0.2]}]
    with pytest.raises(CommuteError, match="outside"):
        StudyConfig.from_dict(_cfg(variants=variants))
    ok = [{"name": "v", "base": {"en": 0.1, "ru": 0.9}, "delta_ws": [0.1]}]
    StudyConfig.from_dict(_cfg(variants=ok, locality={**PRESETS["tiny"]["locality"], "delta_w": 0.05}))


def test_locality_delta_w_is_checked_against_its_mix():
    variants = [{"name": "imbalanced", "base": {"en": 0.9, "ru": 0.1}, "delta_ws": [0.05]}]
    with pytest.raises(CommuteError, match="locality.delta_w"):
        StudyConfig.from_dict(_cfg(variants=variants))  # the preset's locality delta_w is 0.3 > 0.1


@pytest.mark.parametrize("override", [{"momentum": 0.9}, {"lr_schedule": "cosine"}, {"warmup_steps": 10},
                                      {"grad_clip": 1.0}])
def test_step_size_changing_overrides_are_refused(override):
    with pytest.raises(CommuteError, match="effective step size"):
        StudyConfig.from_dict(_cfg(train_overrides=override))


def test_neutral_overrides_are_accepted():
    StudyConfig.from_dict(_cfg(train_overrides={"momentum": 0.0, "lr_schedule": "constant"}))


def test_three_language_example_config_loads():
    """The documented K = 3 example: three fortunes languages, interventions between en and ru."""
    from pathlib import Path

    cfg = StudyConfig.from_yaml(Path(__file__).resolve().parents[1] / "configs" / "study_tiny_3lang.yaml")
    assert cfg.domain_names == ("en", "ru", "de") and cfg.pair_names == ("en", "ru")
    assert all(set(v.base) == {"en", "ru", "de"} for v in cfg.variants)


def test_unreadable_study_config_files_are_one_sentence(tmp_path):
    import pytest

    cases = {"latin1.yaml": "T: 5\n# caf\xe9\n".encode("latin-1"), "bad.yaml": b"T: [1, 2\n",
             "twice.yaml": b"T: 5\nT: 6\n", "list.yaml": b"- 1\n- 2\n"}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CommuteError, match="UTF-8|not valid YAML|twice|mapping"):
            StudyConfig.from_yaml(tmp_path / name)
