"""``commute demo``: the README's main job on the embedded default."""

from __future__ import annotations

from pathlib import Path

import typer

from commute.cli._app import app, console


@app.command()
def demo(out: Path = typer.Option(Path("reports/demo"), help="Where results and figures go.")) -> None:
    """Run the main job on the embedded default and say where the results are."""
    from commute.toy import ToyConfig, run_toy

    cfg = ToyConfig()
    result = run_toy(cfg, out_dir=out)
    console.print(result.table())
    console.print(f"Results and figures written to [bold]{out.resolve()}[/]")
