"""Data sources, validation split, tokenizers, token cache, fortunes preparation and the mixture sampler."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch
from scipy import stats

from commute.data import (
    ByteTokenizer,
    MixtureSampler,
    TokenizedDomain,
    fetch_fortunes,
    get_tokenizer,
    load_domains,
    parse_fortunes,
    parse_sources,
    prepare_fortunes,
    read_documents,
    split_documents,
)
from commute.errors import CommuteError

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def make_docs(n: int, seed: int = 0, words: list[str] | None = None) -> list[str]:
    rng = np.random.default_rng(seed)
    words = words or WORDS
    return [f"doc {i}: " + " ".join(rng.choice(words, size=int(rng.integers(5, 30)))) for i in range(n)]


def synthetic_domain(name: str, n_tokens: int, offset: int) -> TokenizedDomain:
    """Token values encode (domain, position): train[i] = 1000 * index + i % 1000."""
    arr = ((np.arange(n_tokens) % 1000) + 1000 * offset).astype(np.uint16)
    return TokenizedDomain(name=name, train=arr, val=arr[:200].copy())


@pytest.fixture
def three_domains() -> dict[str, TokenizedDomain]:
    return {
        "a": synthetic_domain("a", 5000, 0),
        "b": synthetic_domain("b", 7000, 1),
        "c": synthetic_domain("c", 3000, 2),
    }


# --- sources ---------------------------------------------------------------------------------------


def test_all_source_kinds_give_the_same_documents(tmp_path) -> None:
    docs = make_docs(40)
    d = tmp_path / "dir"
    d.mkdir()
    for i, t in enumerate(docs):
        (d / f"{i:03d}.txt").write_text(t, encoding="utf-8")
    (d / ".hidden").write_text("never read")
    txt = tmp_path / "c.txt"
    txt.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    jl = tmp_path / "c.jsonl"
    jl.write_text(
        "".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(docs)), encoding="utf-8"
    )
    import datasets

    hf = tmp_path / "hf"
    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(hf))
    hfd = tmp_path / "hfd"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": docs}),
            "test": datasets.Dataset.from_dict({"text": ["x"]}),
        }
    ).save_to_disk(str(hfd))
    for src in (d, txt, jl, hf, hfd):
        assert read_documents(src) == docs, src


def test_split_is_by_document_deterministic_and_disjoint(tmp_path) -> None:
    docs = make_docs(400) + ["duplicate text"] * 3
    train, val = split_documents(docs, 0.1)
    assert split_documents(list(reversed(docs)), 0.1)[1] == list(reversed(val))  # depends on text only
    assert not set(train) & set(val)
    assert len(train) + len(val) == len(docs)
    # a binomial bound on the validation share: 400 docs, p = 0.1, 5 sigma
    assert abs(len(val) - 40.3) < 5 * math.sqrt(403 * 0.09)
    # both sides non-empty even when the fraction is tiny
    tr, va = split_documents(make_docs(3), 1e-9)
    assert len(va) == 1 and len(tr) == 2


def test_val_tokens_never_reach_training(tmp_path) -> None:
    """Each document carries a unique marker; no validation marker appears in the training tokens."""
    docs = [f"<{i:04d}> " + t for i, t in enumerate(make_docs(300))]
    src = tmp_path / "c.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    dom = load_domains({"x": src}, cache_dir=tmp_path / "cache", val_fraction=0.2)["x"]
    tok = ByteTokenizer()
    train_text, val_text = tok.decode(np.asarray(dom.train)), tok.decode(np.asarray(dom.val))
    val_ids = {t[:6] for t in docs if t[:6] in val_text}
    assert len(val_ids) == dom.n_docs_val > 30
    assert not any(m in train_text for m in val_ids)
    assert dom.n_docs_train + dom.n_docs_val == len(docs)


def test_token_cache_is_hit_and_invalidated_by_edits(tmp_path, monkeypatch) -> None:
    src = tmp_path / "c.txt"
    src.write_text("\n\n".join(make_docs(50)))
    cache = tmp_path / "cache"
    first = load_domains({"x": src}, cache_dir=cache)["x"]
    assert isinstance(first.train, np.memmap)

    import commute.data as data_mod

    def boom(*a, **k):
        raise AssertionError("re-tokenised although cached")

    monkeypatch.setattr(data_mod, "_encode_docs", boom)
    again = load_domains({"x": src}, cache_dir=cache)["x"]
    np.testing.assert_array_equal(again.train, first.train)
    monkeypatch.undo()

    expected = np.array(first.train)
    del first, again  # release the memmaps before damaging the file under them
    damaged = next((cache / "tokens").iterdir()) / "train.npy"
    damaged.unlink()
    damaged.write_bytes(b"garbage")  # a damaged cache entry is rebuilt
    np.testing.assert_array_equal(load_domains({"x": src}, cache_dir=cache)["x"].train, expected)

    src.write_text("\n\n".join(make_docs(50, seed=1)))  # edited corpus -> new tokens
    edited = load_domains({"x": src}, cache_dir=cache)["x"]
    assert not np.array_equal(np.asarray(edited.train[:500]), expected[:500])


def test_byte_tokenizer_round_trip() -> None:
    tok = get_tokenizer("byte")
    text = "Hello, мир! ∮ E⋅da = Q — ünïcödé 🎲"
    ids = tok.encode(text)
    assert tok.vocab_size == 256 and max(ids) < 256
    assert len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text


def test_bpe_tokenizer_trained_on_train_split_round_trips(tmp_path) -> None:
    en = tmp_path / "en.txt"
    ru = tmp_path / "ru.txt"
    en.write_text("\n\n".join(make_docs(200)))
    ru.write_text("\n\n".join(make_docs(200, words="один два три четыре пять шесть семь восемь".split())))
    doms = load_domains({"en": en, "ru": ru}, tokenizer="bpe:400", cache_dir=tmp_path / "cache")
    tok = doms["en"].tokenizer
    assert doms["ru"].tokenizer is tok and tok.vocab_size == 400 == doms["en"].vocab_size
    for text in ["doc 7: alpha beta gamma", "один два три, и ещё Unicode ✓"]:
        assert tok.decode(tok.encode(text)) == text
    # merges were learnt: BPE tokens are fewer than bytes
    n_bytes = len(en.read_bytes())
    assert len(doms["en"].train) + len(doms["en"].val) < 0.6 * n_bytes
    # documents are separated by <|endoftext|> in the stream
    assert int((np.asarray(doms["en"].train) == tok.eos_id).sum()) == doms["en"].n_docs_train - 1
    # training again on the same splits hits the tokenizer cache and gives the same vocabulary
    again = load_domains({"en": en, "ru": ru}, tokenizer="bpe:400", cache_dir=tmp_path / "cache")
    assert again["en"].tokenizer.fingerprint() == tok.fingerprint()


@pytest.mark.parametrize(
    "setup, fragment",
    [
        (lambda p: {"x": p / "missing.txt"}, "does not exist"),
        (lambda p: {"x": (p / "empty.txt", (p / "empty.txt").write_text("  \n\n "))[0]}, "contains no text"),
        (
            lambda p: {"x": (p / "one.txt", (p / "one.txt").write_text("only one"))[0]},
            "single distinct document",
        ),
        (
            lambda p: {"x": (p / "b.jsonl", (p / "b.jsonl").write_text('{"txt": "x"}\n'))[0]},
            "no string field",
        ),
        (lambda p: {"x": (p / "l.bin", (p / "l.bin").write_bytes(b"\xff\xfe\x00bad"))[0]}, "not UTF-8"),
        (lambda p: {}, "no domains"),
    ],
)
def test_bad_sources_fail_with_one_sentence(tmp_path, setup, fragment) -> None:
    with pytest.raises(CommuteError) as info:
        load_domains(setup(tmp_path), cache_dir=tmp_path / "cache")
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_parse_sources() -> None:
    assert parse_sources(["en=fortunes:en", "fortunes:ru", "data/code/"]) == {
        "en": "fortunes:en",
        "ru": "fortunes:ru",
        "code": "data/code/",
    }
    with pytest.raises(CommuteError, match="twice"):
        parse_sources(["a=x", "a=y"])


def test_short_domain_is_rejected_for_long_context() -> None:
    d = synthetic_domain("s", 50, 0)
    with pytest.raises(CommuteError, match="fewer than seq_len"):
        next(d.batches(2, 64, seed=0))
    with pytest.raises(CommuteError, match="fewer than seq_len"):
        MixtureSampler({"s": d}, 2, 64, seed=0)


# --- domain batches --------------------------------------------------------------------------------


def test_domain_batches_are_contiguous_windows_and_seeded() -> None:
    d = synthetic_domain("a", 5000, 0)
    it = d.batches(16, 32, seed=3)
    b1, b2 = next(it), next(it)
    assert b1.shape == (16, 32) and b1.dtype == torch.long
    diffs = (b1[:, 1:] - b1[:, :-1]) % 1000
    assert bool((diffs == 1).all())  # contiguous windows of the training array
    again = d.batches(16, 32, seed=3)
    assert torch.equal(next(again), b1) and torch.equal(next(again), b2)
    assert not torch.equal(next(d.batches(16, 32, seed=4)), b1)


def test_val_batches_are_fixed_and_from_val() -> None:
    d = TokenizedDomain("v", train=np.zeros(1000, np.uint8), val=np.arange(1, 201, dtype=np.uint8))
    vb = d.val_batches(3, 4, 10)
    assert len(vb) == 3 and all(b.shape == (4, 10) for b in vb)
    assert all(torch.equal(a, b) for a, b in zip(vb, d.val_batches(3, 4, 10), strict=True))
    flat = torch.cat(vb)
    assert int(flat.min()) >= 1  # never a training token (all zeros)
    assert int(flat[0, 0]) == 1 and int(flat[-1, -1]) == 200  # evenly spread over the whole split


# --- mixture sampler -------------------------------------------------------------------------------


def _domain_of_tokens(x: torch.Tensor) -> torch.Tensor:
    """Recover the domain of each row from the synthetic token values (value // 1000)."""
    dom = x // 1000
    assert bool((dom == dom[:, :1]).all())
    return dom[:, 0]


def test_rows_come_from_their_domain(three_domains) -> None:
    s = MixtureSampler({"a": three_domains["a"], "b": three_domains["b"]}, 64, 8, seed=1)
    for _ in range(5):
        b = s.next_batch({"a": 0.3, "b": 0.7})
        assert torch.equal(_domain_of_tokens(b.input_ids), b.domain)


def test_domain_frequencies_match_weights_chi_square(three_domains) -> None:
    w = {"a": 0.2, "b": 0.5, "c": 0.3}
    s = MixtureSampler(three_domains, 32, 4, seed=7)
    counts = np.zeros(3)
    for _ in range(300):
        counts += np.bincount(s.next_batch(w).domain.numpy(), minlength=3)
    n = counts.sum()
    chi2 = float((((counts - n * np.array(list(w.values()))) ** 2) / (n * np.array(list(w.values())))).sum())
    assert stats.chi2.sf(chi2, df=2) > 1e-4, counts
    assert s.tokens_drawn == {k: int(c) * 4 for k, c in zip(w, counts, strict=True)}


def test_sample_mode_counts_are_multinomial_not_exact(three_domains) -> None:
    """Sampling paradigm: per-batch counts vary (variance ≈ B w (1-w)); exact mode does not."""
    w = {"a": 0.5, "b": 0.5, "c": 0.0}
    s = MixtureSampler(three_domains, 40, 4, seed=0)
    ca = np.array([int((s.next_batch(w).domain == 0).sum()) for _ in range(400)])
    assert ca.var() == pytest.approx(40 * 0.25, rel=0.3)
    assert not (s.tokens_drawn["c"])


def test_exact_mode_tracks_the_integral_of_w(three_domains) -> None:
    """Rows drawn per domain stay within one row of B·Σ_s w_k(s) at every step (three domains, moving w)."""
    bsz = 32
    rng = np.random.default_rng(0)
    s = MixtureSampler(three_domains, bsz, 4, seed=5, mode="exact")
    target = np.zeros(3)
    drawn = np.zeros(3)
    for _ in range(500):
        p = 0.05 + 0.85 * rng.dirichlet(np.ones(3))
        w = dict(zip("abc", p, strict=True))
        b = s.next_batch(w)
        c = np.bincount(b.domain.numpy(), minlength=3)
        assert np.all(np.abs(c - bsz * p) < 2)
        assert torch.equal(_domain_of_tokens(b.input_ids), b.domain)
        target += bsz * p
        drawn += c
        assert np.all(np.abs(drawn - target) < 1), (drawn, target)
    assert s.tokens_drawn == {k: int(v) * 4 for k, v in zip("abc", drawn, strict=True)}


@pytest.mark.parametrize("base", [{"a": 0.5, "b": 0.5}, {"a": 0.9, "b": 0.1}])
def test_exact_mode_gives_12_21_and_base_equal_token_budgets(three_domains, base) -> None:
    """Paper §4.2: the eq. (9)/(10) branches spend the same tokens per domain as the base run."""
    from commute.schedule import Constant, Intervention

    two = {"a": three_domains["a"], "b": three_domains["b"]}
    s12 = Intervention(base, "a", "b", 0.07, t0=3, T=17)
    budgets = []
    for sched in (s12, s12.reversed(), Constant(base)):
        s = MixtureSampler(two, 12, 4, seed=1, mode="exact")
        for t in range(s12.end):
            s.next_batch(sched(t))
        budgets.append(s.tokens_drawn)
    expected = {k: 12 * 4 * v * s12.end for k, v in base.items()}
    for b in budgets:
        assert all(abs(b[k] - expected[k]) <= 0.5 * 4 for k in base), (b, expected)
    assert budgets[0] == budgets[1] == budgets[2]


def test_exact_mode_integer_weights_are_exact(three_domains) -> None:
    s = MixtureSampler(three_domains, 8, 4, seed=2, mode="exact")
    for _ in range(20):
        assert s.next_batch({"a": 0.25, "b": 0.75}).counts(3) == [2, 6, 0]
    for _ in range(20):  # a domain switched off gets nothing, whatever its carried error
        assert s.next_batch({"a": 0.3, "c": 0.7}).counts(3)[1] == 0


def test_common_random_numbers_across_mixes(three_domains) -> None:
    """Same seed and step -> same uniforms: raising w_a only turns rows into 'a', never away from it."""
    two = {"a": three_domains["a"], "b": three_domains["b"]}
    s1 = MixtureSampler(two, 256, 4, seed=11)
    s2 = MixtureSampler(two, 256, 4, seed=11)
    for _ in range(10):
        lo = s1.next_batch({"a": 0.3, "b": 0.7}).domain == 0
        hi = s2.next_batch({"a": 0.6, "b": 0.4}).domain == 0
        assert bool((hi | ~lo).all())  # lo ⊆ hi
        assert int(lo.sum()) < int(hi.sum())
    np.testing.assert_array_equal(s1.uniforms(3), s2.uniforms(3))
    assert not np.array_equal(s1.uniforms(3), s1.uniforms(4))
    assert not np.array_equal(s1.uniforms(3), MixtureSampler(two, 256, 4, seed=12).uniforms(3))


def test_domain_streams_do_not_depend_on_the_mix(three_domains) -> None:
    """Domain a's examples come in the same order whatever the weights (its own stream + counter)."""
    s1 = MixtureSampler(three_domains, 16, 6, seed=4)
    s2 = MixtureSampler(three_domains, 16, 6, seed=4)
    rows1 = torch.cat(
        [b.input_ids[b.domain == 0] for b in (s1.next_batch({"a": 0.5, "b": 0.5}) for _ in range(6))]
    )
    rows2 = torch.cat(
        [
            b.input_ids[b.domain == 0]
            for b in (s2.next_batch({"a": 0.2, "b": 0.3, "c": 0.5}) for _ in range(12))
        ]
    )
    n = min(len(rows1), len(rows2))
    assert n > 10 and torch.equal(rows1[:n], rows2[:n])


@pytest.mark.parametrize("mode", ["sample", "exact"])
def test_resume_from_state_reproduces_the_run(three_domains, mode, tmp_path) -> None:
    from commute.schedule import LinearRamp

    sched = LinearRamp(0, 30, {"a": 1.0}, {"b": 0.5, "c": 0.5})
    ref = MixtureSampler(three_domains, 12, 16, seed=9, mode=mode)
    full = [ref.next_batch(sched(t)) for t in range(30)]

    first = MixtureSampler(three_domains, 12, 16, seed=9, mode=mode)
    for t in range(13):
        first.next_batch(sched(t))
    path = tmp_path / "sampler.json"
    path.write_text(json.dumps(first.state_dict()))  # must be JSON-able
    resumed = MixtureSampler(three_domains, 12, 16, seed=9, mode=mode)
    resumed.load_state_dict(json.loads(path.read_text()))
    assert resumed.step == 13
    for t in range(13, 30):
        b = resumed.next_batch(sched(t))
        assert b.step == full[t].step
        assert torch.equal(b.input_ids, full[t].input_ids) and torch.equal(b.domain, full[t].domain)
    assert resumed.tokens_drawn == ref.tokens_drawn
    assert sum(ref.tokens_drawn.values()) == 30 * 12 * 16


def test_state_from_another_setup_is_refused(three_domains) -> None:
    s = MixtureSampler(three_domains, 12, 16, seed=9)
    st = s.state_dict()
    with pytest.raises(CommuteError, match="seed"):
        MixtureSampler(three_domains, 12, 16, seed=10).load_state_dict(st)
    with pytest.raises(CommuteError, match="domain_names"):
        MixtureSampler({"a": three_domains["a"]}, 12, 16, seed=9).load_state_dict(st)
    with pytest.raises(CommuteError, match="malformed"):
        s.load_state_dict({"seed": 9})


def test_bad_weights_are_refused(three_domains) -> None:
    s = MixtureSampler(three_domains, 4, 4, seed=0)
    with pytest.raises(CommuteError, match="unknown domain"):
        s.next_batch({"a": 0.5, "zz": 0.5})
    with pytest.raises(CommuteError, match="sum to"):
        s.next_batch({"a": 0.5, "b": 0.6})
    with pytest.raises(CommuteError, match="negative"):
        s.next_batch({"a": 1.5, "b": -0.5})
    assert s.step == 0 and sum(s.tokens_drawn.values()) == 0  # nothing consumed by a refused call


def test_sampler_is_cheap(three_domains) -> None:
    """Vectorised gathering: a 32x128 batch in well under a millisecond-scale budget (generous bound)."""
    import time

    big = {
        k: TokenizedDomain(
            k, np.random.default_rng(0).integers(0, 256, 10**6).astype(np.uint8), np.zeros(300, np.uint8)
        )
        for k in "ab"
    }
    s = MixtureSampler(big, 32, 128, seed=0)
    s.next_batch({"a": 0.5, "b": 0.5})
    t = time.perf_counter()
    for _ in range(200):
        s.next_batch({"a": 0.5, "b": 0.5})
    per = (time.perf_counter() - t) / 200
    assert per < 5e-3, per


# --- fortunes --------------------------------------------------------------------------------------

FAKE_FORTUNE = (
    "First fortune, one line.\n"
    "%\n"
    "A two-line\tfortune   with  spaces\n"
    "\n"
    "and a blank line.\n"
    '\t\t-- Some Author, "A Title",\n'
    "\t\t   Publisher, 1999\n"
    "%\n"
    "%\n"
    "   \n"
    "%\n"
    "Under_\x08l_\x08i_\x08n_\x08e text and \x1b[1mbold\x1b[0m.\n"
    "%\n"
    "Body with a closing attribution.\n"
    "-- Unindented Author\n"
    "%\n"
    "Q: A dialogue?\n"
    "-- not an attribution: lower case\n"
    "%\n"
    "First fortune, one line.\n"
)


def test_parse_fortunes_keeps_text_and_drops_the_rest() -> None:
    assert parse_fortunes(FAKE_FORTUNE) == [
        "First fortune, one line.",
        "A two-line fortune with spaces\nand a blank line.",
        "Underline text and bold.",
        "Body with a closing attribution.",
        "Q: A dialogue?\n-- not an attribution: lower case",
        "First fortune, one line.",
    ]


def test_prepare_fortunes_from_a_fake_package_tree(tmp_path) -> None:
    base = tmp_path / "pkg" / "usr" / "share" / "games" / "fortunes"
    (base / "ru" / "off").mkdir(parents=True)
    (base / "sk").mkdir()
    koi = "Привет, мир!\n%\nВторая печенька.\n\t\t-- Автор\n".encode("koi8-r")
    (base / "ru" / "koi").write_bytes(koi)
    (base / "ru" / "utf").write_text("Третья.\n%\nПривет, мир!\n", encoding="utf-8")
    (base / "ru" / "utf.dat").write_bytes(b"\x00\x00\x00\x02binary index")
    (base / "ru" / "utf.u8").symlink_to("utf")
    (base / "ru" / "off" / "rude").write_text("offensive\n")
    (base / "sk" / "other").write_text("iný jazyk\n")
    docs, files = prepare_fortunes([tmp_path / "pkg"], "ru")
    assert docs == ["Привет, мир!", "Вторая печенька.", "Третья."]  # KOI8-R decoded, deduplicated
    assert files == ["usr/share/games/fortunes/ru/koi", "usr/share/games/fortunes/ru/utf"]


def test_cp1251_is_told_apart_from_koi8r() -> None:
    from commute.data import decode_text

    text = "Съешь же ещё этих мягких французских булок, да выпей чаю."
    assert decode_text(text.encode("cp1251"), "ru") == text
    assert decode_text(text.encode("koi8-r"), "ru") == text
    assert decode_text(text.encode("utf-8"), "ru") == text


def test_fetch_without_apt_says_how_to_use_own_files(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(CommuteError) as info:
        fetch_fortunes(["ru"], cache_dir=tmp_path)
    msg = str(info.value)
    assert "apt-get" in msg and "your own text" in msg and "\n" not in msg


def _apt_works() -> str | None:
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        return "apt-get/dpkg-deb not installed"
    try:
        r = subprocess.run(["apt-cache", "policy", "fortunes-ru"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"apt-cache failed: {exc}"
    if "Candidate:" not in r.stdout and (not hasattr(os, "geteuid") or os.geteuid() != 0):
        return "fortunes-ru unknown to apt and not root (cannot apt-get update)"
    return None


@pytest.mark.slow
@pytest.mark.skipif(_apt_works() is not None, reason=f"cannot fetch Debian packages: {_apt_works()}")
def test_fetch_fortunes_ru_from_debian(tmp_path) -> None:
    try:
        path = fetch_fortunes(["ru"], cache_dir=tmp_path)["ru"]
    except CommuteError as exc:  # offline machine with apt-get installed
        if "failed" in str(exc) or "no package" in str(exc):
            pytest.skip(f"Debian archive unreachable: {exc}")
        raise
    meta = json.loads(path.with_suffix(".json").read_text())
    docs = read_documents("fortunes:ru", cache_dir=tmp_path)
    assert len(docs) == meta["documents"] > 1000
    letters = [ch for ch in path.read_text(encoding="utf-8") if ch.isalpha()]
    assert sum("а" <= ch.lower() <= "я" or ch.lower() == "ё" for ch in letters) > 0.9 * len(letters)
    assert not any(
        line.lstrip().startswith("-- ") and line[:1].isspace() for d in docs for line in d.split("\n")
    )
    assert all(d == d.strip() and "\n\n" not in d for d in docs)
    assert not any(f.endswith(".dat") or "/off/" in f for f in meta["files"])
    # second call is served from the cache (no apt-get)
    import commute.data as data_mod

    orig = data_mod._apt_download
    data_mod._apt_download = None  # type: ignore[assignment]
    try:
        assert fetch_fortunes(["ru"], cache_dir=tmp_path)["ru"] == path
    finally:
        data_mod._apt_download = orig


# --- CLI -------------------------------------------------------------------------------------------


def test_cli_info_and_errors(tmp_path, monkeypatch, capsys) -> None:
    from commute.cli import main

    monkeypatch.setenv("COMMUTE_CACHE", str(tmp_path / "default-cache"))
    src = tmp_path / "c.txt"
    docs = make_docs(60)
    src.write_text("\n\n".join(docs))
    out = tmp_path / "info.json"
    cache = str(tmp_path / "cache")
    assert main(["data", "info", f"mine={src}", "--cache-dir", cache, "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert rows[0]["name"] == "mine" and rows[0]["docs_train"] + rows[0]["docs_val"] == 60
    n_tr, n_va = rows[0]["docs_train"], rows[0]["docs_val"]
    # byte tokens: each document's bytes plus a 2-byte "\n\n" separator between documents of a split
    n_bytes = sum(len(d.encode()) for d in docs) + 2 * (n_tr + n_va - 2)
    assert rows[0]["tokens_train"] + rows[0]["tokens_val"] == n_bytes
    assert "mine" in capsys.readouterr().out

    assert main(["data", "info", str(tmp_path / "nope.txt")]) == 2
    err = " ".join(capsys.readouterr().err.split())  # rich wraps long lines
    assert "does not exist" in err and "Traceback" not in err

    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert main(["data", "fetch", "ru", "--cache-dir", str(tmp_path / "c2")]) == 2
    assert "your own text" in " ".join(capsys.readouterr().err.split())
