"""Domains, tokenisation and the mixture sampler.

Data flows one way (docs/design.md §3): corpora -> documents -> a deterministic train/validation split by
document -> tokens (cached as ``.npy`` memmaps) -> :class:`TokenizedDomain` -> :class:`MixtureSampler`,
which composes every batch from the domain weights w(t) of the step (the paper's sampling paradigm, §4.2).

Sources (:func:`load_domains`): a directory of text files (one file = one document; ``.jsonl`` files in
it are read as records), a ``.txt`` file (documents separated by blank lines), a ``.jsonl`` file (one
document per line, field ``text``), a Hugging Face ``datasets`` directory written by ``save_to_disk``
(column ``text``; the ``train`` split of a ``DatasetDict``), or ``fortunes:<lang>`` (Debian's fortune
cookies, see :func:`fetch_fortunes`).

Validation split: a document goes to validation iff ``sha256(text)`` read as a number in [0, 1) is below
``val_fraction``. It depends only on the document's text, so it is the same on every machine and run,
identical documents always land on the same side, and training never sees a validation document.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

import numpy as np
import torch

from commute.errors import CommuteError
from commute.io import atomic_write
from commute.schedule import check_weights

__all__ = [
    "FORTUNE_PACKAGES",
    "Batch",
    "ByteTokenizer",
    "BPETokenizer",
    "MixtureSampler",
    "TokenizedDomain",
    "cache_root",
    "fetch_fortunes",
    "get_tokenizer",
    "load_domains",
    "parse_sources",
    "prepare_fortunes",
    "read_documents",
    "split_documents",
]

_FORMAT_VERSION = 1  # bump to invalidate token caches when preparation changes


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The cache directory: ``cache_dir``, else ``$COMMUTE_CACHE``, else ``~/.cache/commute``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("COMMUTE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "commute"


def _npy(arr: np.ndarray) -> Callable[[IO[bytes]], None]:
    """A writer for :func:`commute.io.atomic_write`: ``arr`` as ``.npy`` (no pickles)."""
    return lambda fh: np.save(fh, arr, allow_pickle=False)


# --- Debian fortunes --------------------------------------------------------------------------------

FORTUNE_PACKAGES: dict[str, tuple[str, ...]] = {
    "en": ("fortunes", "fortunes-min"),
    "ru": ("fortunes-ru",),
    "de": ("fortunes-de",),
    "it": ("fortunes-it",),
    "es": ("fortunes-es",),
    "pl": ("fortunes-pl",),
    "cs": ("fortunes-cs",),
    "eo": ("fortunes-eo",),
    "bg": ("fortunes-bg",),
    "ga": ("fortunes-ga",),
    "zh": ("fortunes-zh",),
}
"""Debian packages per language; any other ``<lang>`` is tried as package ``fortunes-<lang>``."""

_LEGACY_ENCODINGS: dict[str, tuple[str, ...]] = {
    "ru": ("koi8-r", "cp1251"),
    "bg": ("cp1251", "koi8-r"),
    "pl": ("iso-8859-2", "cp1250"),
    "cs": ("iso-8859-2", "cp1250"),
    "zh": ("gb18030", "big5"),
}

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
_OVERSTRIKE = re.compile(r"[^\x08\n]\x08")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_ATTRIBUTION = re.compile(r"^\s+(--|—|―|–)")
_TRAILING_ATTRIBUTION = re.compile(r"^--\s*[\"'(]?(\w)")
_SPACES = re.compile(r"[ \t\u00a0]+")


def _decode_cyrillic(raw: bytes) -> str:
    """KOI8-R or CP1251, whichever makes most Cyrillic letters lower case (Russian text mostly is).

    In CP1251 lower-case letters are bytes 0xE0–0xFF; in KOI8-R they are 0xC0–0xDF.
    """
    hi = np.frombuffer(raw, dtype=np.uint8)
    koi_lower = int(((hi >= 0xC0) & (hi <= 0xDF)).sum())
    cp_lower = int((hi >= 0xE0).sum())
    return raw.decode("koi8-r" if koi_lower >= cp_lower else "cp1251")


def decode_text(raw: bytes, lang: str = "") -> str:
    """Decode a fortune file: UTF-8 if valid, else the language's legacy 8-bit encoding, else Latin-1.

    Old Russian fortune files were KOI8-R (Debian's current ``fortunes-ru`` is UTF-8; both work).
    """
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        pass
    legacy = _LEGACY_ENCODINGS.get(lang, ())
    if lang in ("ru", "bg"):
        return _decode_cyrillic(raw)
    for enc in legacy:
        try:
            return raw.decode(enc)
        except UnicodeDecodeError:
            continue
    return raw.decode("latin-1")


def _clean_line(line: str) -> str:
    return _SPACES.sub(" ", line).strip()


def parse_fortunes(text: str) -> list[str]:
    """Split one fortune file into cleaned documents.

    Kept: the text of every ``%``-separated fortune, line breaks preserved, each line's runs of
    spaces/tabs collapsed to one space and stripped, blank lines dropped. Removed: terminal escape
    sequences (colours), overstrike sequences (``_\\bX`` -> ``X``), other control characters,
    attribution lines (a line after the first that starts with whitespace then ``--`` or a dash ``—``,
    together with the indented lines continuing it; or, among a fortune's last three lines, an
    unindented ``-- Capitalised`` line and everything after it), and fortunes left empty.
    """
    text = _ANSI.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))
    while True:
        new = _OVERSTRIKE.sub("", text)
        if new == text:
            break
        text = new
    text = _CONTROL.sub("", text.replace("\t", "    ").replace("\f", "\n"))
    docs: list[str] = []
    chunk: list[str] = []

    def flush() -> None:
        kept: list[str] = []
        in_attr = False
        lines = chunk
        while lines and not lines[-1].strip():
            lines = lines[:-1]
        for i, line in enumerate(lines):
            if i > 0 and _ATTRIBUTION.match(line):
                in_attr = True
                continue
            m = _TRAILING_ATTRIBUTION.match(line)
            if i > 0 and m and m.group(1)[0].isupper() and len(lines) - i <= 3:
                break  # unindented "-- Author, Title" closing the fortune: drop it and what follows
            if in_attr and line[:1].isspace() and line.strip():
                continue  # continuation of an attribution ("--- Author,\n      Title, 1987")
            in_attr = False
            c = _clean_line(line)
            if c:
                kept.append(c)
        if kept:
            docs.append("\n".join(kept))
        chunk.clear()

    for line in text.split("\n"):
        if line.rstrip() == "%":
            flush()
        else:
            chunk.append(line)
    flush()
    return docs


def _fortune_files(root: Path, lang: str) -> list[Path]:
    """Fortune text files in an extracted package: ``usr/share/games/fortunes[/<lang>]``.

    If the package has a ``<lang>`` subdirectory only that is read (``fortunes-cs`` also ships Slovak in
    ``sk/``); otherwise the top-level files. Skipped: symlinks (``*.u8`` aliases), ``*.dat`` index files,
    the ``off/`` (offensive) subdirectory, empty and binary files.
    """
    base = root / "usr" / "share" / "games" / "fortunes"
    if not base.is_dir():
        return []
    sub = base / lang
    top = sub if sub.is_dir() and not sub.is_symlink() else base
    out = []
    for p in sorted(top.iterdir()):
        if p.is_symlink() or not p.is_file() or p.suffix in (".dat", ".u8") or p.name.startswith("."):
            continue
        raw = p.read_bytes()
        if not raw or b"\x00" in raw:
            continue
        out.append(p)
    return out


def prepare_fortunes(roots: Sequence[Path], lang: str) -> tuple[list[str], list[str]]:
    """Documents from extracted fortune packages (``dpkg -x`` roots), deduplicated, in file order.

    Returns ``(documents, files_used)``.
    """
    docs: list[str] = []
    seen: set[str] = set()
    files: list[str] = []
    for root in roots:
        for p in _fortune_files(Path(root), lang):
            files.append(str(p.relative_to(root)))
            for d in parse_fortunes(decode_text(p.read_bytes(), lang)):
                if d not in seen:
                    seen.add(d)
                    docs.append(d)
    return docs, files


def _run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)


_OWN_FILES_HINT = (
    "point commute at your own text instead, e.g. `en=path/to/english.txt` "
    "(a .txt, .jsonl, a directory of text files or a Hugging Face save_to_disk directory)"
)


def _apt_download(pkg: str, dest: Path, state: dict[str, bool]) -> Path:
    """``apt-get download pkg`` into ``dest`` (runs ``apt-get update`` once if the package is unknown)."""
    for attempt in range(2):
        r = _run(["apt-get", "download", pkg], cwd=dest)
        debs = sorted(dest.glob(f"{pkg}_*.deb"))
        if r.returncode == 0 and debs:
            return debs[-1]
        err = (r.stderr or r.stdout).strip()
        unknown = "Unable to locate package" in err or "has no installation candidate" in err
        can_update = unknown and attempt == 0 and not state.get("updated") and hasattr(os, "geteuid")
        if can_update and os.geteuid() == 0:
            state["updated"] = True
            _run(["apt-get", "update"])
            continue
        last = err.splitlines()[-1] if err else f"exit code {r.returncode}"
        if unknown:
            raise CommuteError(f"Debian has no package {pkg!r} here ({last}); {_OWN_FILES_HINT}.")
        raise CommuteError(f"`apt-get download {pkg}` failed ({last}); {_OWN_FILES_HINT}.")
    raise AssertionError("unreachable")


def fetch_fortunes(
    langs: Sequence[str], cache_dir: str | Path | None = None, *, refresh: bool = False
) -> dict[str, Path]:
    """Download Debian's fortune packages for ``langs`` and prepare one text file per language.

    Uses ``apt-get download`` (no system-wide install) and ``dpkg-deb -x`` into
    ``<cache>/fortunes/``; the result ``<cache>/fortunes/<lang>.txt`` holds one fortune per paragraph
    (documents separated by a blank line, see :func:`parse_fortunes` for what is kept) and
    ``<lang>.json`` records packages, files, document and byte counts. Already prepared languages are
    reused unless ``refresh``. Raises :class:`CommuteError` if ``apt-get``/``dpkg-deb`` are missing or fail.
    """
    out_dir = cache_root(cache_dir) / "fortunes"
    result: dict[str, Path] = {}
    state: dict[str, bool] = {}
    for lang in langs:
        lang = lang.strip().lower()
        if not re.fullmatch(r"[a-z]{2,3}(_[a-z]{2})?", lang):
            raise CommuteError(f"{lang!r} is not a language code like 'en' or 'ru'.")
        txt, meta = out_dir / f"{lang}.txt", out_dir / f"{lang}.json"
        if txt.is_file() and meta.is_file() and not refresh:
            result[lang] = txt
            continue
        for tool in ("apt-get", "dpkg-deb"):
            if shutil.which(tool) is None:
                raise CommuteError(
                    f"`{tool}` is not available on this machine, so fortunes cannot be fetched; "
                    f"{_OWN_FILES_HINT}."
                )
        packages = FORTUNE_PACKAGES.get(lang, (f"fortunes-{lang}",))
        debs_dir = out_dir / "debs"
        debs_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out_dir, prefix=f".extract-{lang}-") as tmp:
            roots, versions = [], {}
            for pkg in packages:
                deb = _apt_download(pkg, debs_dir, state)
                versions[pkg] = deb.name
                root = Path(tmp) / pkg
                r = _run(["dpkg-deb", "-x", str(deb), str(root)])
                if r.returncode != 0:
                    raise CommuteError(
                        f"`dpkg-deb -x {deb.name}` failed ({r.stderr.strip()}); {_OWN_FILES_HINT}."
                    )
                roots.append(root)
            docs, files = prepare_fortunes(roots, lang)
        if not docs:
            raise CommuteError(f"the fortune packages for {lang!r} contain no fortunes; {_OWN_FILES_HINT}.")
        data = ("\n\n".join(docs) + "\n").encode("utf-8")
        atomic_write(txt, data)
        info = {
            "lang": lang,
            "packages": versions,
            "files": files,
            "documents": len(docs),
            "bytes": len(data),
        }
        atomic_write(meta, (json.dumps(info, indent=1, ensure_ascii=False) + "\n").encode("utf-8"))
        result[lang] = txt
    return result


# --- reading sources --------------------------------------------------------------------------------

_PARAGRAPH = re.compile(r"\n[ \t]*\n")


def _split_txt(text: str) -> list[str]:
    return [d.strip() for d in _PARAGRAPH.split(text.replace("\r\n", "\n")) if d.strip()]


def _read_utf8(p: Path) -> str:
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CommuteError(
            f"{str(p)!r} is not UTF-8 text (byte {exc.start}); convert it or remove it."
        ) from None


def _read_jsonl(p: Path) -> list[str]:
    docs = []
    with p.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                raise CommuteError(f"line {n} of {str(p)!r} is not valid JSON.") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                raise CommuteError(f"line {n} of {str(p)!r} has no string field 'text'.")
            if rec["text"].strip():
                docs.append(rec["text"])
    return docs


def _is_hf_dataset_dir(p: Path) -> bool:
    return (p / "dataset_dict.json").is_file() or (
        (p / "state.json").is_file() and (p / "dataset_info.json").is_file()
    )


def _read_hf(p: Path) -> list[str]:
    import datasets

    ds = datasets.load_from_disk(str(p))
    if isinstance(ds, datasets.DatasetDict):
        if not ds:
            return []
        ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
    if "text" not in ds.column_names:
        raise CommuteError(f"the dataset at {str(p)!r} has no 'text' column (columns: {ds.column_names}).")
    return [t for t in ds["text"] if isinstance(t, str) and t.strip()]


def _source_files(p: Path) -> list[Path]:
    return sorted(
        f
        for f in p.rglob("*")
        if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts)
    )


def read_documents(source: str | Path, cache_dir: str | Path | None = None) -> list[str]:
    """The documents of one source (see the module docstring for the formats)."""
    s = str(source)
    if s.startswith("fortunes:"):
        lang = s.split(":", 1)[1]
        return _split_txt(_read_utf8(fetch_fortunes([lang], cache_dir)[lang.strip().lower()]))
    p = Path(s).expanduser()
    if not p.exists():
        raise CommuteError(f"data source {s!r} does not exist.")
    if p.is_dir():
        if _is_hf_dataset_dir(p):
            return _read_hf(p)
        docs: list[str] = []
        for f in _source_files(p):
            if f.suffix == ".jsonl":
                docs.extend(_read_jsonl(f))
            else:
                t = _read_utf8(f)
                if t.strip():
                    docs.append(t.strip())
        return docs
    if p.suffix == ".jsonl":
        return _read_jsonl(p)
    return _split_txt(_read_utf8(p))


def _source_fingerprint(source: str | Path, cache_dir: str | Path | None) -> str:
    """sha256 over the source's bytes (and file names), so an edited corpus is re-tokenised."""
    h = hashlib.sha256()
    s = str(source)
    if s.startswith("fortunes:"):
        lang = s.split(":", 1)[1].strip().lower()
        p = fetch_fortunes([lang], cache_dir)[lang]
    else:
        p = Path(s).expanduser()
        if not p.exists():
            raise CommuteError(f"data source {s!r} does not exist.")
    files = _source_files(p) if p.is_dir() else [p]
    for f in files:
        h.update(str(f.relative_to(p) if p.is_dir() else f.name).encode() + b"\0")
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def split_documents(docs: Sequence[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """Deterministic split by document: validation iff sha256(text)/2^256 < ``val_fraction``.

    With at least two distinct documents both sides are non-empty (if the hash puts none in validation,
    the document with the smallest hash goes there, and vice versa).
    """
    if not 0.0 < val_fraction < 1.0:
        raise CommuteError(f"val_fraction must be in (0, 1), got {val_fraction!r}.")
    keys = [int.from_bytes(hashlib.sha256(d.encode("utf-8")).digest()[:8], "big") / 2.0**64 for d in docs]
    is_val = [k < val_fraction for k in keys]
    if len(set(docs)) >= 2:
        if not any(is_val):
            m = min(keys)
            is_val = [k == m for k in keys]
        elif all(is_val):
            m = max(keys)
            is_val = [k != m for k in keys]
    train = [d for d, v in zip(docs, is_val, strict=True) if not v]
    val = [d for d, v in zip(docs, is_val, strict=True) if v]
    return train, val


# --- tokenizers -------------------------------------------------------------------------------------


class Tokenizer(Protocol):
    """What :func:`get_tokenizer` returns."""

    name: str
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...
    def fingerprint(self) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocabulary 256, no training, no download, every language alike.

    Documents are joined by a blank line (bytes ``\\n\\n``) in the token stream.
    """

    name = "byte"
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_np(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def separator(self) -> list[int]:
        return self.encode("\n\n")

    def fingerprint(self) -> str:
        return "byte"


class BPETokenizer:
    """A byte-level BPE (Hugging Face ``tokenizers``) trained locally; ``<|endoftext|>`` separates documents.

    Build with :meth:`train` (on training splits only) or :meth:`from_file` (a ``tokenizer.json``).
    """

    name = "bpe"
    EOS = "<|endoftext|>"

    def __init__(self, tok: Any) -> None:
        self._tok = tok
        self.vocab_size = int(tok.get_vocab_size())
        eos = tok.token_to_id(self.EOS)
        self.eos_id = int(eos) if eos is not None else None

    @classmethod
    def train(cls, texts: Sequence[str], vocab_size: int = 4096) -> BPETokenizer:
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        if vocab_size < 257:
            raise CommuteError(
                f"a byte-level BPE needs vocab_size >= 257 (256 bytes + <|endoftext|>), got {vocab_size}."
            )
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[cls.EOS],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
        return cls(tok)

    @classmethod
    def from_file(cls, path: str | Path) -> BPETokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        return cls(HFTokenizer.from_file(str(path)))

    def save(self, path: str | Path) -> None:
        atomic_write(Path(path), self._tok.to_str().encode("utf-8"))

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text).ids)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts))]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def separator(self) -> list[int]:
        return [self.eos_id] if self.eos_id is not None else self.encode("\n\n")

    def fingerprint(self) -> str:
        return "bpe-" + hashlib.sha256(self._tok.to_str().encode("utf-8")).hexdigest()[:16]


def get_tokenizer(
    name: str = "byte",
    *,
    texts: Sequence[str] | None = None,
    vocab_size: int | None = None,
    cache_dir: str | Path | None = None,
) -> ByteTokenizer | BPETokenizer:
    """A tokenizer by name: ``"byte"`` (default), ``"bpe"`` / ``"bpe:<vocab>"`` (trained on ``texts``,
    cached by their hash and the vocabulary size), or a path to a ``tokenizer.json``."""
    if name == "byte":
        return ByteTokenizer()
    if name == "bpe" or name.startswith("bpe:"):
        if name.startswith("bpe:"):
            try:
                vocab_size = int(name.split(":", 1)[1])
            except ValueError:
                raise CommuteError(
                    f"cannot read the vocabulary size in tokenizer {name!r}; use e.g. 'bpe:4096'."
                ) from None
        vocab_size = vocab_size or 4096
        if texts is None:
            raise CommuteError("a BPE tokenizer must be trained on texts; pass texts= or use load_domains().")
        h = hashlib.sha256(f"bpe|{vocab_size}|{_FORMAT_VERSION}".encode())
        for t in texts:
            h.update(hashlib.sha256(t.encode("utf-8")).digest())
        path = cache_root(cache_dir) / "tokenizers" / f"bpe-{vocab_size}-{h.hexdigest()[:20]}.json"
        if path.is_file():
            return BPETokenizer.from_file(path)
        tok = BPETokenizer.train(texts, vocab_size)
        tok.save(path)
        return tok
    p = Path(name).expanduser()
    if p.is_file():
        return BPETokenizer.from_file(p)
    raise CommuteError(
        f"unknown tokenizer {name!r}; use 'byte', 'bpe', 'bpe:<vocab size>' or a tokenizer.json path."
    )


def _encode_docs(tok: ByteTokenizer | BPETokenizer, docs: Sequence[str]) -> np.ndarray:
    """Concatenate the documents' tokens with the tokenizer's separator between them."""
    dtype = np.uint8 if tok.vocab_size <= 256 else (np.uint16 if tok.vocab_size <= 65536 else np.int32)
    if not docs:
        return np.zeros(0, dtype=dtype)
    if isinstance(tok, ByteTokenizer):
        return np.frombuffer("\n\n".join(docs).encode("utf-8"), dtype=np.uint8).copy()
    sep = tok.separator()
    parts: list[np.ndarray] = []
    for i, ids in enumerate(tok.encode_batch(docs)):
        if i:
            parts.append(np.asarray(sep, dtype=dtype))
        parts.append(np.asarray(ids, dtype=dtype))
    return np.concatenate(parts)


# --- tokenised domains ------------------------------------------------------------------------------

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's output function (Steele et al. 2014), vectorised; uint64 arithmetic wraps."""
    z = x.astype(np.uint64, copy=True)  # array (not scalar) uint64 ops wrap silently
    z ^= z >> np.uint64(30)
    z *= np.uint64(0xBF58476D1CE4E5B9)
    z ^= z >> np.uint64(27)
    z *= np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return z


def _stream(key: int, start: int, n: int) -> np.ndarray:
    """Values start..start+n-1 of the SplitMix64 sequence seeded by ``key`` (counter-based: O(1) jumps)."""
    idx = np.arange(start + 1, start + n + 1, dtype=np.uint64)
    return _splitmix64(idx * _GOLDEN + np.uint64(key))


def _uniforms(key: int, start: int, n: int) -> np.ndarray:
    """Uniforms in [0, 1) with 53 random bits, from :func:`_stream`."""
    return (_stream(key, start, n) >> np.uint64(11)).astype(np.float64) * (1.0 / 9007199254740992.0)


def _key(*parts: Any) -> int:
    """A 64-bit stream key from (seed, purpose, ...): independent streams for different tuples."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little")


def token_sha256(tokens: np.ndarray) -> str:
    """sha256 of a 1-D token array: its dtype and values (read in chunks, so a memmap is not loaded)."""
    h = hashlib.sha256(np.dtype(tokens.dtype).str.encode() + b"\0")
    step = 1 << 24
    for i in range(0, len(tokens), step):
        h.update(np.ascontiguousarray(tokens[i:i + step]).tobytes())
    return h.hexdigest()


def _windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> np.ndarray:
    return tokens[starts[:, None] + np.arange(seq_len)[None, :]]


@dataclass
class TokenizedDomain:
    """One named corpus, tokenised once: ``train`` and ``val`` are 1-D token arrays (memmaps when cached).

    ``val`` holds the held-out documents (see :func:`split_documents`) and is never used by training.
    """

    name: str
    train: np.ndarray
    val: np.ndarray
    tokenizer: Any = None
    source: str = ""
    n_docs_train: int = 0
    n_docs_val: int = 0
    #: sha256 of the training tokens (:func:`token_sha256`); computed on first use if empty
    fingerprint: str = ""

    def train_fingerprint(self) -> str:
        """sha256 of the ``train`` tokens (what a sampler's state must be resumed on), computed once."""
        if not self.fingerprint:
            self.fingerprint = token_sha256(self.train)
        return self.fingerprint

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer.vocab_size) if self.tokenizer is not None else 256

    def _array(self, split: str) -> np.ndarray:
        if split not in ("train", "val"):
            raise CommuteError(f"split must be 'train' or 'val', got {split!r}.")
        return self.train if split == "train" else self.val

    def _check_len(self, arr: np.ndarray, seq_len: int, split: str) -> None:
        if seq_len < 1:
            raise CommuteError(f"seq_len must be >= 1, got {seq_len}.")
        if len(arr) < seq_len:
            raise CommuteError(
                f"domain {self.name!r} has only {len(arr)} {split} tokens, fewer than seq_len={seq_len}; "
                "use a shorter context or more text."
            )

    def window_starts(self, key: int, counter: int, n: int, seq_len: int, split: str = "train") -> np.ndarray:
        """Start offsets of windows counter..counter+n-1 of the stream ``key`` (uniform over valid starts)."""
        arr = self._array(split)
        self._check_len(arr, seq_len, split)
        n_starts = np.uint64(len(arr) - seq_len + 1)
        return (_stream(key, counter, n) % n_starts).astype(np.int64)

    def batches(
        self, batch_size: int, seq_len: int, seed: int, split: str = "train"
    ) -> Iterator[torch.Tensor]:
        """Infinite independent random windows ``LongTensor[batch_size, seq_len]``, deterministic in seed.

        For the bracket estimator: different seeds give independent streams (docs/design.md §1c: use
        independent batches for the two factors of a product).
        """
        arr = self._array(split)
        self._check_len(arr, seq_len, split)
        key = _key("batches", seed, self.name, split)
        counter = 0
        while True:
            starts = self.window_starts(key, counter, batch_size, seq_len, split)
            counter += batch_size
            yield torch.from_numpy(_windows(arr, starts, seq_len).astype(np.int64))

    def val_batches(self, n_batches: int, batch_size: int, seq_len: int) -> list[torch.Tensor]:
        """A fixed evaluation set: ``n_batches × batch_size`` windows evenly spaced over ``val``."""
        arr = self.val
        self._check_len(arr, seq_len, "val")
        n = n_batches * batch_size
        starts = np.round(np.linspace(0, len(arr) - seq_len, n)).astype(np.int64)
        w = torch.from_numpy(_windows(arr, starts, seq_len).astype(np.int64))
        return list(w.split(batch_size))

    def info(self) -> dict[str, Any]:
        """Sizes: documents and tokens per split."""
        return {
            "name": self.name,
            "source": self.source,
            "docs_train": self.n_docs_train,
            "docs_val": self.n_docs_val,
            "tokens_train": int(len(self.train)),
            "tokens_val": int(len(self.val)),
            "vocab_size": self.vocab_size,
        }


def parse_sources(specs: Sequence[str]) -> dict[str, str]:
    """``["en=fortunes:en", "code=src/"]`` -> ``{"en": "fortunes:en", "code": "src/"}``.

    Without ``name=``, the name is the language of ``fortunes:<lang>`` or the path's stem.
    """
    out: dict[str, str] = {}
    for spec in specs:
        name, sep, src = spec.partition("=")
        if not sep:
            src = spec
            name = spec.split(":", 1)[1] if spec.startswith("fortunes:") else Path(spec.rstrip("/")).stem
        name, src = name.strip(), src.strip()
        if not name or not src:
            raise CommuteError(f"cannot read domain {spec!r}; write it as NAME=SOURCE, e.g. en=fortunes:en.")
        if name in out:
            raise CommuteError(f"domain name {name!r} is given twice.")
        out[name] = src
    return out


def load_domains(
    sources: Mapping[str, str | Path],
    tokenizer: str | ByteTokenizer | BPETokenizer = "byte",
    cache_dir: str | Path | None = None,
    val_fraction: float = 0.05,
) -> dict[str, TokenizedDomain]:
    """Read, split and tokenise each named source; cached under ``<cache>/tokens`` as ``.npy`` memmaps.

    The cache key is sha256 of (source bytes and file names, tokenizer fingerprint, ``val_fraction``,
    format version), so a re-run loads instantly and an edited corpus or another tokenizer re-tokenises.
    A BPE tokenizer (``"bpe"`` / ``"bpe:<vocab>"``) is trained on the *training* splits of all domains
    together (one shared vocabulary). Raises :class:`CommuteError` for a missing or empty source.
    """
    if not sources:
        raise CommuteError("no domains given; name at least one, e.g. en=fortunes:en.")
    if not 0.0 < float(val_fraction) < 1.0:
        raise CommuteError(f"val_fraction must be in (0, 1), got {val_fraction!r}.")
    root = cache_root(cache_dir)
    fps = {name: _source_fingerprint(src, cache_dir) for name, src in sources.items()}

    splits: dict[str, tuple[list[str], list[str]]] = {}

    def get_split(name: str) -> tuple[list[str], list[str]]:
        if name not in splits:
            docs = read_documents(sources[name], cache_dir)
            if not docs:
                raise CommuteError(f"domain {name!r} ({sources[name]}) contains no text.")
            splits[name] = split_documents(docs, val_fraction)
            if not splits[name][1]:
                raise CommuteError(
                    f"domain {name!r} ({sources[name]}) has a single distinct document, so no validation "
                    "split is possible; give more documents (blank-line separated in a .txt)."
                )
        return splits[name]

    if isinstance(tokenizer, str) and (tokenizer == "bpe" or tokenizer.startswith("bpe:")):
        train_texts = [d for name in sources for d in get_split(name)[0]]
        tok: ByteTokenizer | BPETokenizer = get_tokenizer(tokenizer, texts=train_texts, cache_dir=cache_dir)
    elif isinstance(tokenizer, str):
        tok = get_tokenizer(tokenizer, cache_dir=cache_dir)
    else:
        tok = tokenizer

    out: dict[str, TokenizedDomain] = {}
    for name, src in sources.items():
        key = hashlib.sha256(
            f"{fps[name]}|{tok.fingerprint()}|{float(val_fraction)!r}|{_FORMAT_VERSION}".encode()
        ).hexdigest()[:24]
        d = root / "tokens" / key
        meta_p = d / "meta.json"

        def build(name: str = name, src: str | Path = src, d: Path = d) -> None:
            train_docs, val_docs = get_split(name)
            train_ids = _encode_docs(tok, train_docs)
            atomic_write(d / "train.npy", _npy(train_ids))
            atomic_write(d / "val.npy", _npy(_encode_docs(tok, val_docs)))
            meta = {
                "source": str(src),
                "tokenizer": tok.fingerprint(),
                "val_fraction": float(val_fraction),
                "docs_train": len(train_docs),
                "docs_val": len(val_docs),
                "train_sha256": token_sha256(train_ids),
            }
            atomic_write(d / "meta.json", json.dumps(meta, indent=1).encode())

        if not meta_p.is_file():
            build()
        try:
            meta = json.loads(meta_p.read_text())
            train = np.load(d / "train.npy", mmap_mode="r")
            val = np.load(d / "val.npy", mmap_mode="r")
        except (OSError, ValueError):  # a damaged cache entry (e.g. deleted file): tokenise again
            build()
            meta = json.loads(meta_p.read_text())
            train = np.load(d / "train.npy", mmap_mode="r")
            val = np.load(d / "val.npy", mmap_mode="r")
        if len(train) == 0:
            raise CommuteError(f"domain {name!r} ({src}) has no training text.")
        if not isinstance(meta.get("train_sha256"), str):  # a cache entry written before the fingerprint
            meta["train_sha256"] = token_sha256(train)
            atomic_write(meta_p, json.dumps(meta, indent=1).encode())
        out[name] = TokenizedDomain(
            name=name,
            train=train,
            val=val,
            tokenizer=tok,
            source=str(src),
            n_docs_train=int(meta["docs_train"]),
            n_docs_val=int(meta["docs_val"]),
            fingerprint=meta["train_sha256"],
        )
    return out


# --- mixture sampler --------------------------------------------------------------------------------


def _domain_fingerprint(d: Any) -> str:
    """sha256 of a domain's training tokens: its own fingerprint if it has one, else computed."""
    fp = getattr(d, "train_fingerprint", None)
    return fp() if callable(fp) else token_sha256(d.train)


@dataclass
class Batch:
    """One training batch: token windows and the domain of each row."""

    input_ids: torch.Tensor  # LongTensor[B, seq_len]
    domain: torch.Tensor  # LongTensor[B], index into MixtureSampler.domain_names
    step: int
    weights: dict[str, float] = field(default_factory=dict)  # w(step) used to compose the batch

    def counts(self, n_domains: int | None = None) -> list[int]:
        """Rows per domain index."""
        return torch.bincount(self.domain, minlength=n_domains or 0).tolist()

    @classmethod
    def concat(cls, parts: Sequence[Batch]) -> Batch:
        """One batch of the rows of ``parts`` in order (e.g. a step's gradient-accumulation micro-batches),
        with the first part's step and weights."""
        return cls(torch.cat([b.input_ids for b in parts]), torch.cat([b.domain for b in parts]),
                   parts[0].step, dict(parts[0].weights))

    def by_domain(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """{name: that domain's rows of ``input_ids``} for the domains with rows; ``names`` in the order of
        ``MixtureSampler.domain_names`` (the response estimator's ``train_rows``)."""
        return {d: self.input_ids[self.domain == i] for i, d in enumerate(names)
                if bool((self.domain == i).any())}


class MixtureSampler:
    """Composes each batch by drawing every example's domain with probability w(t) (paper §4.2).

    Randomness (all counter-based, so resuming from :meth:`state_dict` reproduces the uninterrupted run):

    * step t uses uniforms u_1..u_B keyed by (seed, t) only — *common random numbers*: two schedules see
      the same uniforms, so changing w changes as few example domains as possible. In ``"sample"`` mode
      example b goes to domain k iff C_{k-1} <= u_b < C_k with C the cumulative weights; counts are
      multinomial(B, w).
    * ``"exact"`` mode fixes the counts instead: n_k = largest-remainder rounding of B·w_k(t) + r_k, where
      the carried error r_k = B·Σ_{s<t} w_k(s) − (rows of k drawn so far) lives in the state. So every
      n_k is ⌊·⌋ or ⌈·⌉ of its target, a constant integral B·w_k is met exactly at every step, and the
      rows drawn per domain track the integral of w (with two domains within half a row at every step),
      which makes compared schedules with equal Σ w spend equal token budgets. Rows are assigned to
      domains in the order of the u_b.
    * the examples of domain k come in order from its own stream keyed by (seed, k's name) with a counter:
      random windows of ``seq_len`` tokens from k's training split.

    Weights may change at every call (an online controller sets them); domains absent from ``weights``
    get 0.
    """

    def __init__(
        self,
        domains: Mapping[str, TokenizedDomain],
        batch_size: int,
        seq_len: int,
        seed: int,
        mode: str = "sample",
    ) -> None:
        if not domains:
            raise CommuteError("the mixture sampler needs at least one domain.")
        if mode not in ("sample", "exact"):
            raise CommuteError(f"sampler mode must be 'sample' or 'exact', got {mode!r}.")
        if int(batch_size) < 1 or int(seq_len) < 1:
            raise CommuteError(f"batch_size and seq_len must be >= 1, got {batch_size} and {seq_len}.")
        self.domains = dict(domains)
        self.domain_names: tuple[str, ...] = tuple(domains)
        self.batch_size, self.seq_len, self.seed, self.mode = int(batch_size), int(seq_len), int(seed), mode
        for d in self.domains.values():
            d._check_len(d.train, self.seq_len, "train")
        self._n_starts = [np.uint64(len(d.train) - self.seq_len + 1) for d in self.domains.values()]
        self._keys = [_key("domain-stream", self.seed, n) for n in self.domain_names]
        self._step_key = _key("step", self.seed)
        self._offsets = np.arange(self.seq_len, dtype=np.int64)
        dtypes = {d.train.dtype for d in self.domains.values()}
        self._dtype = np.result_type(*dtypes) if dtypes else np.int64
        self.step = 0
        self.counters = dict.fromkeys(self.domain_names, 0)
        self.tokens_drawn = dict.fromkeys(self.domain_names, 0)
        self._residual = np.zeros(len(self.domain_names))  # exact mode: B·Σ_s w_k(s) − rows drawn so far
        self._fp: dict[str, str] | None = None

    # the per-step uniforms: public so that tests and tools can check the CRN property
    def uniforms(self, step: int) -> np.ndarray:
        """The B uniforms u_1..u_B of step ``step`` (keyed by (seed, step) only: common random numbers)."""
        return _uniforms(self._step_key, step * self.batch_size, self.batch_size)

    def _probs(self, weights: Mapping[str, float], step: int) -> np.ndarray:
        w = check_weights(weights, self.domain_names, where=f"the mixture weights at step {step}")
        p = np.fromiter(w.values(), dtype=np.float64, count=len(w))
        return p / p.sum()

    def _exact_counts(self, p: np.ndarray) -> np.ndarray:
        """Rows per domain in ``"exact"`` mode: largest-remainder rounding of B·w_k + r_k (carried error)."""
        bsz = self.batch_size
        active = p > 0
        q = np.where(active, bsz * p + self._residual, 0.0)
        q = np.where(active, q + (bsz - q.sum()) * p, 0.0)  # sum exactly B (only matters after a switch-off)
        q = np.maximum(q, 0.0)
        q *= bsz / q.sum()
        n = np.floor(q).astype(np.int64)
        short = bsz - int(n.sum())
        if short > 0:
            frac = np.where(active, q - n, -1.0)
            n[np.argsort(-frac, kind="stable")[:short]] += 1
        return n

    def assign(self, weights: Mapping[str, float], step: int | None = None) -> np.ndarray:
        """The domain index of every row under ``weights`` at ``step`` (default: the current step), from the
        current state; draws no tokens and changes nothing."""
        step = self.step if step is None else int(step)
        return self._assign(self._probs(weights, step), step)[0]

    def _assign(self, p: np.ndarray, step: int) -> tuple[np.ndarray, np.ndarray]:
        rows = self.uniforms(step)
        if self.mode == "sample":
            cdf = np.cumsum(p)
            last = int(np.flatnonzero(p > 0)[-1])
            cdf[last:] = 1.0  # float dust must neither drop the last domain nor pick a zero-weight one
            dom = np.minimum(np.searchsorted(cdf, rows, side="right"), last).astype(np.int64)
            return dom, np.bincount(dom, minlength=len(p))
        counts = self._exact_counts(p)
        dom = np.empty(self.batch_size, dtype=np.int64)
        dom[np.argsort(rows, kind="stable")] = np.repeat(np.arange(len(p)), counts)
        return dom, counts

    def next_batch(self, weights: Mapping[str, float], shard: tuple[int, int] | None = None) -> Batch:
        """The batch of the current :attr:`step` under ``weights`` (= w(step)); advances the step.

        ``shard=(rank, world_size)`` (several training processes): the step's *global* batch is composed
        as without it (every row's domain, every stream counter and token count advance for all B rows),
        but only rows rank·B/W .. (rank+1)·B/W − 1 are returned (B must be a multiple of W): the shards of
        the W ranks, stacked in rank order, are the unsharded batch, and the state stays the global one.
        """
        lo, hi = 0, self.batch_size
        if shard is not None:
            rank, world = (int(x) for x in shard)
            if world < 1 or not 0 <= rank < world:
                raise CommuteError(f"shard must be (rank, world_size) with 0 <= rank < world_size, got "
                                   f"{shard}.")
            if self.batch_size % world:
                raise CommuteError(f"batch_size={self.batch_size} is not divisible by the {world} processes; "
                                   "use a batch_size that is a multiple of the world size.")
            per = self.batch_size // world
            lo, hi = rank * per, (rank + 1) * per
        p = self._probs(weights, self.step)
        dom, counts = self._assign(p, self.step)
        if self.mode == "exact":
            self._residual += self.batch_size * p - counts
        out = np.empty((hi - lo, self.seq_len), dtype=self._dtype)
        for k, name in enumerate(self.domain_names):
            rows = np.flatnonzero(dom == k)
            n = len(rows)
            if n == 0:
                continue
            c = self.counters[name]
            starts = (_stream(self._keys[k], c, n) % self._n_starts[k]).astype(np.int64)
            if shard is None:
                out[rows] = self.domains[name].train[starts[:, None] + self._offsets]
            else:
                mine = (rows >= lo) & (rows < hi)
                out[rows[mine] - lo] = self.domains[name].train[starts[mine][:, None] + self._offsets]
            self.counters[name] = c + n
            self.tokens_drawn[name] += n * self.seq_len
        batch = Batch(
            input_ids=torch.from_numpy(out.astype(np.int64)),
            domain=torch.from_numpy(dom if shard is None else dom[lo:hi].copy()),
            step=self.step,
            weights={k: float(v) for k, v in weights.items()},
        )
        self.step += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state: step, per-domain counters and token totals, and the settings they refer to."""
        return {
            "version": 1,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "mode": self.mode,
            "domain_names": list(self.domain_names),
            "train_tokens": {n: int(len(d.train)) for n, d in self.domains.items()},
            "train_sha256": self._fingerprints(),
            "step": self.step,
            "counters": dict(self.counters),
            "tokens_drawn": dict(self.tokens_drawn),
            "residual": [float(r) for r in self._residual],
        }

    def _fingerprints(self) -> dict[str, str]:
        """sha256 of each domain's training tokens (short), computed once per sampler."""
        if self._fp is None:
            self._fp = {n: _domain_fingerprint(d)[:32] for n, d in self.domains.items()}
        return dict(self._fp)

    def load_state_dict(self, d: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output; the sampler must have the same seed, shapes, domains and
        training tokens (states written before ``train_sha256`` existed are checked by token counts)."""
        try:
            mine = self.state_dict()
            for k in ("seed", "batch_size", "seq_len", "mode", "domain_names", "train_tokens"):
                if d[k] != mine[k]:
                    raise CommuteError(
                        f"the saved sampler state has {k}={d[k]!r} but this sampler has {mine[k]!r}; "
                        "resume with the same data and settings."
                    )
            saved_fp = d.get("train_sha256")
            if saved_fp is not None:
                for n in self.domain_names:
                    if saved_fp[n] != mine["train_sha256"][n]:
                        raise CommuteError(
                            f"the training tokens of domain {n!r} differ from the ones the saved state was "
                            "drawn from (same count, other tokens: the corpus was edited since); resume with "
                            "the same data, or start a new run."
                        )
            self.step = int(d["step"])
            self.counters = {n: int(d["counters"][n]) for n in self.domain_names}
            self.tokens_drawn = {n: int(d["tokens_drawn"][n]) for n in self.domain_names}
            residual = np.asarray(d.get("residual", [0.0] * len(self.domain_names)), dtype=np.float64)
            if residual.shape != self._residual.shape:
                raise ValueError("residual has the wrong length")
            self._residual = residual
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CommuteError(
                f"the saved sampler state is malformed ({type(exc).__name__}: {exc})."
            ) from None
