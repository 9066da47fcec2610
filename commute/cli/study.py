"""``commute study``: the bilingual order study (paper §4.2–4.3) and its report."""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import Any

import typer

from commute.cli._app import app, console
from commute.errors import CommuteError

study_app = typer.Typer(help="Reordering studies: interventions, bracket predictions, reports.",
                        no_args_is_help=True)
app.add_typer(study_app, name="study")


class _Preset(StrEnum):
    tiny = "tiny"
    small = "small"
    paper = "paper"


class _Opt(StrEnum):
    adam = "adam"
    sgd = "sgd"
    both = "both"


@study_app.command("run")
@study_app.command("bilingual")
def bilingual(
    preset: _Preset = typer.Option(_Preset.tiny, help="tiny (~15 min on 2 CPU cores), small (27 min on one "
                                   "H100, hours on CPU), paper (GPT-2 124M, T = 4000; for GPUs)."),
    out: Path = typer.Option(Path("reports/study"), "--out",
                             help="Report and run directory (re-runs resume)."),
    optimizer: _Opt = typer.Option(_Opt.both, help="Run Adam, SGD or both."),
    device: str = typer.Option("cpu", help="Torch device: cpu, cuda, cuda:1, mps, auto."),
    config: Path | None = typer.Option(None, help="A study config YAML (e.g. a previous run's config.yaml); "
                                       "overrides --preset."),
    cache_dir: Path | None = typer.Option(None, help="Corpus and token cache (default ~/.cache/commute)."),
    quiet: bool = typer.Option(False, help="No progress bar."),
    seed: int | None = typer.Option(None, min=0, help="The study's seed (model init, sampler streams), "
                                    "overriding the preset's or config's: run a preset under several seeds "
                                    "and `commute study pool` them."),
    jobs: int = typer.Option(1, "--jobs", "-j", metavar="N",
                             help="Run the arms (optimizer × variant) in N processes (at most one per arm), "
                             "each with the config's `threads`; on a GPU they share the device. Same "
                             "results as --jobs 1."),
) -> None:
    """Does the order of two domains matter, and which predictor says so? (`bilingual`: English/Russian
    fortunes presets; `run --config`: any K domains, e.g. configs/study_tiny_3lang.yaml.)"""
    from commute.study import run_bilingual_study

    if config is not None and not config.is_file():
        raise CommuteError(f"Study config {config} does not exist.")
    opts = None if optimizer == _Opt.both else [optimizer.value]
    res = run_bilingual_study(preset.value, out, config=config, optimizers=opts, device=device,
                              cache_dir=cache_dir, progress=not quiet, jobs=jobs, seed=seed,
                              log=lambda s: console.print(s, highlight=False))
    _print_summary(res.data)
    console.print(f"Report: [bold]{res.report_path.resolve()}[/]")


def _damaged(out: Path) -> CommuteError:
    return CommuteError(f"{out / 'results.json'} is damaged or incomplete; re-run `commute study bilingual "
                        f"--out {out}` to rebuild it (finished runs are reused).")


def _load_results(out: Path) -> dict[str, Any]:
    """A study directory's results.json, checked to be a study's (one clear error otherwise)."""
    path = out / "results.json"
    if not path.is_file():
        raise CommuteError(f"{path} does not exist; run `commute study bilingual --out {out}` first.")
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        raise _damaged(out) from None
    if not isinstance(data, dict) or not isinstance(data.get("arms"), list) or "domains" not in data:
        raise _damaged(out)
    return data


@study_app.command("report")
def report(out: Path = typer.Argument(..., help="A study directory holding results.json.")) -> None:
    """Re-render report.md, figures and CSVs from a study's results.json (no training)."""
    from commute.report import render_report, summarise

    data = _load_results(out)
    try:
        data["summary"] = summarise(data)
        report_path = render_report(data, out)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        raise _damaged(out) from None
    console.print(f"Report: [bold]{report_path.resolve()}[/]")
    _print_summary(data)


@study_app.command("pool")
def pool(
    studies: list[Path] = typer.Argument(..., help="Two or more study directories (e.g. one preset under "
                                         "several --seed values)."),
    out: Path = typer.Option(Path("reports/pooled"), "--out", help="Where pooled.md and its figure go."),
) -> None:
    """Score the predictors over the significant cells of several studies at once (no training)."""
    from commute.report import predictors_table, render_pooled
    from commute.scores import pool_studies, score_predictors

    if len(studies) < 2:
        raise CommuteError("commute study pool needs at least two study directories.")
    names = [str(p) for p in studies]
    if len(set(names)) < len(names):
        raise CommuteError("a study directory is given twice; its cells would count twice.")
    datas = {name: _load_results(p) for name, p in zip(names, studies, strict=True)}
    try:
        pooled = pool_studies(datas)
    except ValueError as e:
        raise CommuteError(str(e)) from None
    try:
        scores = score_predictors(pooled)
        path = render_pooled(pooled, out, predictors=scores)
        table = predictors_table(pooled, scores, details=path.name)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        bad = next((n for n, d in datas.items() if not _scorable(d)), None)
        if bad is None:
            raise CommuteError(f"the studies {', '.join(names)} passed the checks but could not be scored "
                               "together; please report this.") from None
        raise _damaged(Path(bad)) from None
    console.print(table)
    console.print(f"Pooled report: [bold]{path.resolve()}[/]")


def _scorable(data: dict[str, Any]) -> bool:
    """Whether one study's results can be scored and drawn alone (to name the damaged one)."""
    import tempfile

    from commute.report import plot_predictors
    from commute.scores import score_predictors

    try:
        score_predictors(data)
        with tempfile.TemporaryDirectory() as tmp:
            plot_predictors(data, Path(tmp) / "p.png")
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        return False
    return True


def _print_summary(data: dict) -> None:
    from commute.report import summary_table

    console.print(summary_table(data))
