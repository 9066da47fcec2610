"""The base run of one study window, shared by the window benches (``response_window.py``,
``noise_paradigms.py``): the preset narrowed to one optimiser, variant and t0, trained on first use and
cached under ``out``."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from commute import study as S
from commute.progress import Progress
from commute.study_config import PRESETS, StudyConfig


def window_arm(preset: str, optimizer: str, variant: str, t0: int, out: str | Path, device: str = "cpu",
               cache_dir: str | None = None) -> tuple[StudyConfig, dict[str, Any], dict[str, Any], S.Arm]:
    """(config, domains, validation batches, arm) of the window at ``t0``, its base run trained (cached)."""
    d = copy.deepcopy(PRESETS[preset])
    d.update(optimizers=[optimizer], t0s=[t0], extra_p_steps=[], replicates=1)
    d["variants"] = [v for v in d["variants"] if v["name"] == variant]
    d["locality"]["enabled"] = False
    cfg = StudyConfig.from_dict(d)
    domains, val = S._load_data(cfg, cache_dir)
    arm = S.Arm(cfg, optimizer, cfg.variants[0], Path(out), device)
    with Progress(f"{arm.label}: base run", cfg.t0s[-1] + 2 * cfg.T) as bar:
        S.run_base(arm, domains, bar)
    return cfg, domains, val, arm
