"""``commute bracket``: the bracket, the order tournament and the locality at a run's checkpoint."""

from __future__ import annotations

from pathlib import Path

import typer

from commute.cli._app import app, console


@app.command("bracket")
def bracket_cmd(
    checkpoint: Path = typer.Argument(..., help="A run directory (its latest checkpoint) or a step_* dir."),
    json_path: Path | None = typer.Option(None, "--json", help="Also write the results as JSON here."),
    horizon: int = typer.Option(100, "--horizon", help="T, in steps, of the locality number γ·T·λ_max."),
    grad_batches: int = typer.Option(40, "--grad-batches", help="Gradient batches per domain (all groups)."),
    hvp_batches: int = typer.Option(20, "--hvp-batches", help="Hessian batches per domain (all groups)."),
    groups: int = typer.Option(5, "--groups", help="Independent batch groups; stderr = std / sqrt(groups)."),
    batch_size: int | None = typer.Option(None, "--batch-size",
                                          help="Sequences per batch (default: the run's batch_size)."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:N, mps or auto."),
    seed: int = typer.Option(0, "--seed", help="Seeds the estimator's batch streams."),
    train_target: bool = typer.Option(False, "--train-target",
                                      help="Project P on fresh training-split draws instead of the run's "
                                           "validation batches (the loss its evaluation reports)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Estimate P(i, j; L) for every ordered pair of the run's domains and every target L (each domain and the
    training mix at the checkpoint's step, on the run's validation batches), with stderr and z; the order
    tournament of each target (suggested training order, first to last); and λ_max of the training mix
    with the locality γ·T·λ_max.

    P(i, j; L) > 0 means training domain i then j ends with a higher L than mixing them. The JSON has the
    fields step, domains, targets, lambda_max, lambda_of, locality {horizon, gamma, value}, P [{i, j, target,
    mean, stderr, z, n}] for every ordered pair, ranking {target: domains first to last}, and more.

    Under torchrun (torchrun --nproc_per_node N --no-python commute bracket RUN) the N processes split the
    estimator's groups (gloo on CPU, nccl on CUDA) and get the one-process numbers; rank 0 prints and writes.
    """
    from commute import distributed
    from commute.audit import bracket_at

    audit = bracket_at(checkpoint, grad_batches=grad_batches, hvp_batches=hvp_batches, groups=groups,
                       batch_size=batch_size, horizon=horizon, device=device, seed=seed,
                       train_target=train_target, progress=progress,
                       distributed=distributed.env_world().enabled)

    def report() -> None:
        for part in audit.tables():
            console.print(part)
        console.print(f"{audit.seconds:.1f} s")
        if json_path is not None:
            console.print(f"JSON written to [bold]{audit.to_json(json_path)}[/]")

    distributed.on_main(distributed.current(), "commute bracket", report)  # several processes: rank 0 reports
