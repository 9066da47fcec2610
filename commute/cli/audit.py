"""``commute audit``: a run audited over its checkpoints (P along training, Cor. 3.2b, schedule gradient)."""

from __future__ import annotations

from pathlib import Path

import typer

from commute.cli._app import app, console
from commute.errors import CommuteError


def _steps(text: str | None) -> str | list[int]:
    if text is None or text.strip().lower() == "all":
        return "all"
    try:
        steps = [int(s) for s in text.replace(" ", "").split(",") if s]
    except ValueError:
        raise CommuteError(f"--checkpoints must be 'all' or steps separated by commas (e.g. 100,200), got "
                           f"{text!r}.") from None
    if not steps or any(s < 0 for s in steps):
        raise CommuteError(f"--checkpoints must be 'all' or steps >= 0 separated by commas, got {text!r}.")
    return steps


def _windows(text: str) -> int | str:
    if text.strip().lower() == "all":
        return "all"
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise CommuteError(f"--response-windows must be a whole number >= 0 or 'all', got {text!r}.")
    return n


@app.command("audit")
def audit_cmd(
    run: Path = typer.Argument(..., help="A run directory written by `commute train` (or commute.train)."),
    out: Path | None = typer.Option(None, "--out", help="Where audit.json, report.md and the figures go "
                                    "(default RUN/audit; its cache/ makes re-runs skip finished work)."),
    checkpoints: str | None = typer.Option(None, "--checkpoints",
                                           help="Steps to audit, e.g. 100,200 (default: all checkpoints)."),
    response: bool = typer.Option(True, "--response/--no-response",
                                  help="Estimate the schedule gradient over the last windows (costly)."),
    response_windows: str = typer.Option("2", "--response-windows",
                                         help="How many windows (the last ones) get the schedule gradient, "
                                              "or 'all'."),
    grad_batches: int = typer.Option(40, "--grad-batches", help="Gradient batches per domain (all groups)."),
    hvp_batches: int = typer.Option(20, "--hvp-batches", help="Hessian batches per domain (all groups)."),
    groups: int = typer.Option(5, "--groups", help="Independent batch groups of the bracket (stderr, t)."),
    batch_size: int | None = typer.Option(None, "--batch-size",
                                          help="Sequences per bracket batch (default: the run's "
                                               "batch_size)."),
    response_groups: int = typer.Option(2, "--response-groups", help="Groups of the schedule gradient."),
    response_batch_size: int | None = typer.Option(
        None, "--response-batch-size", help="Fresh sequences per domain per replayed step (default: the "
                                            "run's batch_size / K)."),
    bracket_train_target: bool = typer.Option(
        False, "--bracket-train-target", help="Project P on fresh training-split draws instead of the run's "
                                              "validation batches."),
    response_target_batches: int | None = typer.Option(
        None, "--response-target-batches", help="Measure the schedule gradient's targets on N fresh "
                                                "training-split batches per domain and group instead of the "
                                                "run's validation batches."),
    response_adjoint: str | None = typer.Option(
        None, "--response-adjoint", help="fresh (default) or train: pull the adjoint back through the "
                                         "training rows' own Hessians (the realised map's; needs "
                                         "loss_weighting: sample)."),
    response_noise: str | None = typer.Option(
        None, "--response-noise", help="rows: add the training rows' gradient-noise term to G (implies "
                                       "--response-adjoint train; needs sampler_mode: exact)."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:N, mps or auto."),
    seed: int = typer.Option(0, "--seed", help="Seeds the estimators' batch streams."),
    json_path: Path | None = typer.Option(None, "--json", help="Also write audit.json's content here."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
) -> None:
    """Audit a run over its checkpoints: P(i, j; L) ± stderr for every pair and target (each domain and
    the training mix) along training with λ_max and the locality γ·T·λ_max of the window to the next
    checkpoint; the Cor. 3.2b check that the training mix is locally optimal; the schedule gradient
    G_k(t) = ∂L/∂w_k(t) over the last windows, replayed on the run's own batches; and plain
    recommendations with their evidence. Writes audit.json, report.md and PNGs to --out.

    Under torchrun (torchrun --nproc_per_node N --no-python commute audit RUN) the N processes split the
    groups of both estimators (gloo on CPU, nccl on CUDA) and get the one-process numbers; rank 0 prints and
    writes.
    """
    from commute import distributed
    from commute.audit import audit_run

    res = audit_run(run, out, checkpoints=_steps(checkpoints), grad_batches=grad_batches,
                    hvp_batches=hvp_batches, groups=groups, batch_size=batch_size, response=response,
                    response_windows=_windows(response_windows), response_groups=response_groups,
                    response_batch_size=response_batch_size, response_target_batches=response_target_batches,
                    response_adjoint=response_adjoint, response_noise=response_noise,
                    bracket_train_target=bracket_train_target, device=device, seed=seed, progress=progress,
                    distributed=distributed.env_world().enabled)

    def report() -> None:
        for part in res.tables():
            console.print(part)
        if json_path is not None:
            console.print(f"JSON written to [bold]{res.to_json(json_path)}[/]")
        console.print(f"Report: [bold]{res.report_path}[/] ({res.seconds:.1f} s; figures: "
                      f"{', '.join(f.name for f in res.figures) or 'none'})")

    distributed.on_main(distributed.current(), "commute audit", report)  # several processes: rank 0 reports
