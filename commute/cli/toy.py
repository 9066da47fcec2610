"""``commute toy``: the paper's quadratic reproduction (Table 1, Figures 1-2)."""

from __future__ import annotations

from pathlib import Path

import typer

from commute.cli._app import app, console


@app.command()
def toy(
    n: int = typer.Option(100, "--n", help="Dimension of θ (paper: 100)."),
    decay: float = typer.Option(0.7, "--decay", help="Eigenvalues are decay**j, j = 0..n-1 (paper: 0.7)."),
    starts: int = typer.Option(50, "--starts", help="Random starts θ_0 ~ N(0, I) (>= 50 for the table)."),
    seed: int = typer.Option(0, "--seed", help="Seeds the quadratics and the starts."),
    json_path: Path | None = typer.Option(None, "--json", help="Write the table as JSON to this file."),
    out: Path | None = typer.Option(None, "--out", help="Directory for toy.json, figures, toy_report.md."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Reproduce the paper's Table 1: excess loss of reordering two quadratics vs the bracket prediction.

    Prints, for each start time t on the 50/50 flow and intervention length Δt, the median and 10-90 %
    range over starts of EL^12 / ((Δt²/2) P(L1, L2; L)), the antisymmetric ratio, and the paper's values.
    """
    from commute.toy import ToyConfig, run_toy

    cfg = ToyConfig(n=n, decay=decay, n_starts=starts, seed=seed)
    result = run_toy(cfg, out_dir=out, json_path=json_path, progress=progress)
    console.print(result.table())
    if json_path is not None:
        console.print(f"JSON written to [bold]{json_path}[/]")
    if out is not None:
        console.print(f"Figures, toy.json and toy_report.md written to [bold]{out.resolve()}[/]")
