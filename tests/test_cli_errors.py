"""CLI failures caused by the user's paths or files: one sentence on stderr, non-zero exit, no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    code = "import sys; from commute.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def test_unwritable_path_is_one_sentence(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    r = _run("data", "fetch", "en", "--cache-dir", "afile", cwd=tmp_path)  # an OSError deep inside the API
    assert r.returncode != 0 and r.stderr.startswith("error:"), r.stderr
    assert "Traceback" not in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr


def test_damaged_study_results_are_reported(tmp_path: Path) -> None:
    (tmp_path / "study").mkdir()
    for text in ('{"arms": [', "{}", '{"arms": [{"x": 1}]}'):
        (tmp_path / "study" / "results.json").write_text(text)
        r = _run("study", "report", "study", cwd=tmp_path)
        assert r.returncode == 2, r.stderr
        assert "damaged or incomplete" in r.stderr and "Traceback" not in r.stderr
