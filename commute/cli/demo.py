"""``commute demo``: the README's main job on the embedded default.

It fetches the demo corpora (Debian's English and Russian fortunes) if needed, runs the ``tiny``
bilingual order study (paper §4.2–4.3; Adam and SGD, the locality sweep, the report) and the quadratic
reproduction (paper §4.1, Table 1), and says where the reports are. Re-running resumes and skips
finished work.
"""

from __future__ import annotations

from pathlib import Path

import typer

from commute.cli._app import app, console


@app.command()
def demo(
    out: Path = typer.Option(Path("reports/demo"), help="Where results and figures go."),
    device: str = typer.Option("cpu", help="Torch device for the study: cpu, cuda, mps, auto."),
    cache_dir: Path | None = typer.Option(None, help="Corpus and token cache (default ~/.cache/commute)."),
    quiet: bool = typer.Option(False, help="No progress bars."),
    jobs: int | None = typer.Option(None, "--jobs", "-j", metavar="N",
                                    help="Processes for the study's four arms (default: the CPU cores this "
                                    "process may use, at most 4; each runs one thread). Same results."),
) -> None:
    """Run the main job (tiny bilingual study + quadratic toy) and say where the results are."""
    from commute.study import run_bilingual_study, usable_cores
    from commute.toy import ToyConfig, run_toy

    console.rule("[bold]1/2 the quadratic reproduction (paper §4.1, Table 1)")
    toy = run_toy(ToyConfig(), out_dir=out / "toy", progress=not quiet)
    console.print(toy.table())

    console.rule("[bold]2/2 the bilingual order study, tiny preset (paper §4.2–4.3)")
    if jobs is None:
        jobs = min(4, usable_cores())
    res = run_bilingual_study("tiny", out / "study", device=device, cache_dir=cache_dir, progress=not quiet,
                              log=lambda s: console.print(s, highlight=False), jobs=jobs)
    console.print(res.table())

    console.rule("[bold]results")
    console.print(f"Bilingual study report: [bold]{res.report_path.resolve()}[/]")
    console.print(f"Quadratic report:       [bold]{(out / 'toy' / 'toy_report.md').resolve()}[/]")
