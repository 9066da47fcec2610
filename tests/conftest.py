"""Shared test fixtures."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

#: Distinguishable synthetic domains (different alphabets): name, alphabet, seed.
ALPHABETS = (("a", "abcdefg ", 0), ("b", "xyz.,!? ", 1), ("c", "hijklmn\n", 2))


def write_corpora(root: Path, n_domains: int = 2, n_docs: int = 200) -> dict[str, str]:
    """``n_domains`` synthetic corpora of ``n_docs`` blank-line separated documents in ``root``;
    name -> path of its ``.txt``."""
    out = {}
    for name, alphabet, seed in ALPHABETS[:n_domains]:
        r = random.Random(seed)
        docs = ["".join(r.choice(alphabet) for _ in range(r.randint(50, 150))) for _ in range(n_docs)]
        p = Path(root) / f"{name}.txt"
        p.write_text("\n\n".join(docs), encoding="utf-8")
        out[name] = str(p)
    return out


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> dict[str, str]:
    """Two synthetic corpora (:func:`write_corpora`), shared by a test module."""
    return write_corpora(tmp_path_factory.mktemp("corpora"))


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def domains(corpora, cache):
    from commute.data import load_domains

    return load_domains(corpora, cache_dir=cache)


@pytest.fixture
def one_thread():
    """Tiny models run fastest (and least disturbed by other processes) on one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
