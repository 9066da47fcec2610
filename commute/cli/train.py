"""``commute train``: train, resume or branch a run from a YAML config; ``commute train-template``."""

from __future__ import annotations

from pathlib import Path

import typer

from commute.cli._app import app, console
from commute.errors import CommuteError


@app.command("train")
def train_cmd(
    config: Path = typer.Argument(..., help="YAML training config (see `commute train-template`)."),
    out: Path | None = typer.Option(None, "--out", help="Run directory (default: runs/<config name>)."),
    steps: int | None = typer.Option(None, "--steps", help="Override the config's total steps."),
    max_steps: int | None = typer.Option(
        None, "--max-steps", help="Stop after this step (resumable later); the lr horizon stays --steps."
    ),
    device: str | None = typer.Option(None, "--device", help="auto, cpu, cuda, cuda:N, mps."),
    parallel: str | None = typer.Option(
        None, "--parallel", help="Under torchrun: ddp (replicated model) or fsdp (sharded); overrides config."
    ),
    resume: bool = typer.Option(
        True, "--resume/--no-resume", help="Continue the run in --out if it has checkpoints (else refuse)."
    ),
    branch_from: Path | None = typer.Option(
        None, "--branch-from", help="Start from this checkpoint (or run) into --out, never touching it."
    ),
    schedule: str | None = typer.Option(
        None, "--schedule",
        help="Weight schedule, a .json/.yaml file or 'en=0.7,ru=0.3' (overrides the config)."
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Train the model of CONFIG on its domains into --out (checkpoints, metrics.csv, TensorBoard).

    Re-running the same command resumes from the last checkpoint, bitwise-identically.

    --branch-from CKPT --schedule S --out DIR starts a new run at CKPT with schedule S (e.g. eq. 9).

    Under torchrun (torchrun --nproc_per_node N --no-python commute train CONFIG) the run is data-parallel
    over N processes (gloo on CPU, nccl on CUDA): the same global batch, metrics and checkpoints as one
    process; rank 0 writes and prints (train() joins the process group; it is left at exit). --parallel fsdp
    shards the weights, gradients and optimiser state over the processes (FSDP2) instead of replicating them.
    """
    from commute import distributed
    from commute.train import TrainConfig, train

    cfg = TrainConfig.from_yaml(config)
    changes: dict[str, object] = {}
    if steps is not None:
        changes["steps"] = steps
    if device is not None:
        changes["device"] = device
    if parallel is not None:
        changes["parallel"] = parallel
    if changes:
        cfg = cfg.replace(**changes)
    if out is None:
        if branch_from is not None:
            raise CommuteError("--branch-from needs --out: a branch is written to its own directory.")
        out = Path("runs") / config.stem
    result = train(cfg, out, resume=resume, branch_from=branch_from, schedule=schedule, max_steps=max_steps,
                   progress=progress)
    if not distributed.current().main:  # several processes: rank 0 reports
        return
    if not result.losses:  # no step was taken in this call: say why instead of a summary of nothing
        if result.step > 0:  # (a fresh run with steps 0 is reported by train() itself)
            stop = cfg.steps if max_steps is None else min(cfg.steps, max_steps)
            console.print(f"nothing to train: the run in {out} is already at step {result.step} and this "
                          f"call stops at step {stop}; raise --steps or --max-steps to go on.",
                          soft_wrap=True)
        if result.checkpoint is None:
            return
    val = "  ".join(f"{k} {v:.4f}" for k, v in result.val_losses.items())
    tokens = "  ".join(f"{k} {v:,}" for k, v in result.tokens.items())
    at = f" (at step {result.val_step})" if result.val_step is not None else " n/a (no evaluation this call)"
    console.print(f"step {result.step}: validation loss{at} {val}; tokens trained on {tokens}",
                  soft_wrap=True)
    console.print(f"{result.tokens_per_second:,.0f} tokens/s; checkpoint {result.checkpoint}; "
                  f"metrics {result.metrics_path}", soft_wrap=True)


@app.command("train-template")
def train_template(
    out: Path | None = typer.Option(None, "--out", help="Write the template here instead of printing it."),
) -> None:
    """Print a training config with every field at its default, each documented."""
    from commute.train import TrainConfig

    cfg = TrainConfig(domains={"en": "fortunes:en", "ru": "fortunes:ru"},
                      schedule={"type": "constant", "weights": {"en": 0.5, "ru": 0.5}})
    text = cfg.to_yaml(out)
    if out is None:
        typer.echo(text, nl=False)
    else:
        console.print(f"wrote {out}", soft_wrap=True)
