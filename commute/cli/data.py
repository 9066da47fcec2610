"""``commute data``: fetch the demo corpora and inspect domains (documents, tokens, split sizes)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from commute.cli._app import app, console

data_app = typer.Typer(
    name="data",
    help="Fetch the demo corpora (Debian fortunes) and inspect domains.",
    no_args_is_help=True,
)
app.add_typer(data_app, name="data")

_CACHE_HELP = "Cache directory (default: $COMMUTE_CACHE or ~/.cache/commute)."


@data_app.command("fetch")
def fetch(
    langs: list[str] = typer.Argument(..., help="Languages, e.g. en ru (also de it es pl cs eo bg ga zh)."),
    cache: Path | None = typer.Option(None, "--cache-dir", help=_CACHE_HELP),
    refresh: bool = typer.Option(False, "--refresh", help="Download and prepare again even if cached."),
) -> None:
    """Download Debian's fortune packages (apt-get download + dpkg-deb -x, no install) and prepare them.

    Each language becomes one text file, one fortune per paragraph, usable as the domain source
    ``fortunes:<lang>`` (or by its path).
    """
    from commute.data import fetch_fortunes

    table = Table(title="Prepared fortunes")
    for col in ("lang", "packages", "documents", "MB", "file"):
        table.add_column(col, justify="right" if col in ("documents", "MB") else "left")
    for lang in langs:
        with console.status(f"fetching and preparing fortunes for {lang!r}..."):
            path = fetch_fortunes([lang], cache_dir=cache, refresh=refresh)[lang.strip().lower()]
        meta = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
        table.add_row(
            meta["lang"],
            ", ".join(meta["packages"]),
            f"{meta['documents']:,}",
            f"{meta['bytes'] / 1e6:.2f}",
            str(path),
        )
    console.print(table)
    console.print("Use them as domains, e.g. [bold]en=fortunes:en ru=fortunes:ru[/].")


@data_app.command("info")
def info(
    sources: list[str] = typer.Argument(
        ...,
        help="Domains as NAME=SOURCE or SOURCE: fortunes:<lang>, a .txt/.jsonl file, a text dir, an HF dir.",
    ),
    tokenizer: str = typer.Option(
        "byte", "--tokenizer", help="'byte', 'bpe', 'bpe:<vocab>' or a tokenizer.json."
    ),
    val_fraction: float = typer.Option(0.05, "--val-fraction", help="Share of documents held out."),
    cache: Path | None = typer.Option(None, "--cache-dir", help=_CACHE_HELP),
    json_path: Path | None = typer.Option(None, "--json", help="Also write the sizes as JSON to this file."),
) -> None:
    """Tokenise (once; cached) and print documents and tokens per domain and split."""
    from commute.data import load_domains, parse_sources

    specs = parse_sources(sources)
    with console.status("reading and tokenising (cached after the first time)..."):
        domains = load_domains(specs, tokenizer=tokenizer, cache_dir=cache, val_fraction=val_fraction)
    rows = [d.info() for d in domains.values()]
    vocab = rows[0]["vocab_size"] if rows else 0
    table = Table(title=f"Domains (tokenizer {tokenizer}, vocabulary {vocab})")
    for col in ("domain", "source", "docs train", "docs val", "tokens train", "tokens val"):
        table.add_column(col, justify="left" if col in ("domain", "source") else "right")
    for r in rows:
        table.add_row(
            r["name"],
            r["source"],
            f"{r['docs_train']:,}",
            f"{r['docs_val']:,}",
            f"{r['tokens_train']:,}",
            f"{r['tokens_val']:,}",
        )
    console.print(table)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
        console.print(f"JSON written to [bold]{json_path}[/]")
