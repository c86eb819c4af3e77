"""``lmforge data stats``: what a prepared directory holds and what was removed on the way.

Knows the manifest and report files; prints a table or one JSON object.
"""
from __future__ import annotations

import json
from pathlib import Path

from .shards import load_manifest


def collect(path: str | Path) -> dict:
    p = Path(path)
    m = load_manifest(p)
    rp = p / "report.json"
    report = json.loads(rp.read_text()) if rp.exists() else {}
    splits = {}
    for name, sp in m["splits"].items():
        splits[name] = {"documents": sp["documents"], "bytes": sp["bytes"], "tokens": sp["tokens"],
                        "shards": len(sp["shards"]),
                        "bytes_per_token": round(sp["bytes"] / sp["tokens"], 4) if sp["tokens"] else None}
    tot = {k: sum(s[k] for s in splits.values()) for k in ("documents", "bytes", "tokens")}
    tot["bytes_per_token"] = round(tot["bytes"] / tot["tokens"], 4) if tot["tokens"] else None
    removals = {}
    if report:
        e = report["emptied_by_cleaning"]
        removals["empty_after_cleaning"] = {"documents": e["docs"], "bytes": e["bytes"]}
        for rule, f in report["filters"].items():
            removals[rule] = {"documents": f["docs"], "bytes": f["bytes"], "examples": f.get("examples", [])}
        d = report["decontamination"]
        if d.get("docs") and d.get("action") == "drop":
            removals["decontamination"] = {"documents": d["docs"], "bytes": d["bytes"],
                                           "examples": d.get("examples", [])}
        removals["exact_duplicates"] = {k: report["dedup"]["exact"][k] for k in ("documents", "bytes")}
        removals["near_duplicates"] = {k: report["dedup"]["near"][k] for k in ("documents", "bytes")}
    return {
        "path": str(p), "documents": tot["documents"], "bytes": tot["bytes"], "tokens": tot["tokens"],
        "bytes_per_token": tot["bytes_per_token"], "splits": splits,
        "tokenizer": m["tokenizer"], "dtype": m["dtype"],
        "input": {"documents": report.get("documents_in"), "bytes": report.get("bytes_in")},
        "removals": removals,
        "near_duplicate_clusters": report.get("dedup", {}).get("near", {}).get("clusters", []),
        "exact_duplicate_clusters": report.get("dedup", {}).get("exact", {}).get("clusters", []),
        "pii": report.get("pii", {}), "decontamination": report.get("decontamination", {}),
        "heldout": report.get("heldout", {}), "heldout_overlap": report.get("heldout_overlap", {}),
        "problems": report.get("problems", []), "clean": report.get("clean", {}),
        "seconds": report.get("seconds", {}), "mb_per_s": report.get("mb_per_s"),
    }


def _mb(b) -> str:
    return f"{b / 1e6:,.2f} MB" if b is not None else "-"


def format_text(s: dict) -> str:
    lines = [f"{s['path']}: {s['documents']:,} documents, {_mb(s['bytes'])}, {s['tokens']:,} tokens, "
             f"{s['bytes_per_token']} bytes/token ({s['dtype']}, tokenizer {s['tokenizer']['kind']} "
             f"vocab {s['tokenizer']['vocab_size']:,})", ""]
    lines.append(f"{'split':<8}{'documents':>11}{'bytes':>14}{'tokens':>13}{'bytes/token':>13}{'shards':>8}")
    for name, sp in s["splits"].items():
        lines.append(f"{name:<8}{sp['documents']:>11,}{sp['bytes']:>14,}{sp['tokens']:>13,}"
                     f"{sp['bytes_per_token'] or 0:>13.3f}{sp['shards']:>8}")
    names = {"val": "validation", "test": "test"}
    if s.get("heldout"):
        lines.append("")
    for name, h in s.get("heldout", {}).items():
        ids = h["ids"]
        shown = ", ".join(ids[:6]) + (f", ... ({len(ids) - 6} more)" if len(ids) > 6 else "")
        lines.append(f"{names[name]}: {h['byte_share']:.1%} of the kept bytes, by {h['chosen_by']}: {shown or '-'}")
        if "warning" in h:
            lines.append(f"  WARNING: {h['warning']}")
    ov = s.get("heldout_overlap", {})
    if ov:
        lines += ["", f"shared {ov['ngram']}-grams between splits ({ov['action']}"
                      f"{', sampled' if ov.get('sampled') else ''}):"]
        for pair in ("test-vs-train", "val-vs-train", "test-vs-val"):
            rec = ov.get(pair)
            if not rec:
                lines.append(f"  {pair}: none")
                continue
            lines.append(f"  {pair}: {rec['ngrams']:,} n-grams in {rec['documents']} document(s)")
            for p in rec["pairs"][:3]:
                ex = p["examples"][0] if p["examples"] else ""
                lines.append(f"    {p['heldout']} ~ {p['other']}: {p['ngrams']} n-grams, {p['passages']} passage(s), "
                             f"e.g. {ex[:70]!r}")
            if len(rec["pairs"]) > 3:
                lines.append(f"    ... {len(rec['pairs']) - 3} more pairs in report.json")
        if ov.get("dropped"):
            lines.append(f"  dropped from training: {len(ov['dropped'])} document(s)")
    if s["removals"]:
        inp = s["input"]
        lines += ["", f"input: {inp['documents']:,} documents, {_mb(inp['bytes'])}", "",
                  f"{'removed by':<32}{'documents':>11}{'bytes':>14}"]
        for rule, r in s["removals"].items():
            lines.append(f"{rule:<32}{r['documents']:>11,}{r['bytes']:>14,}")
            for ex in r.get("examples", [])[:1]:
                v = f" (value {ex['value']})" if "value" in ex else ""
                lines.append(f"    e.g. {ex['id']}{v}: {ex['snippet'][:60]!r}")
    if s["near_duplicate_clusters"]:
        lines += ["", "near-duplicate clusters (kept <- removed, estimated Jaccard):"]
        for c in s["near_duplicate_clusters"]:
            removed = ", ".join(f"{r['id']} ({r['jaccard']:.2f})" for r in c["removed"])
            lines.append(f"  {c['kept']} <- {removed}")
    pii = s["pii"].get("replacements", {})
    if pii:
        lines += ["", "PII replaced: " + ", ".join(f"{k} {v}" for k, v in sorted(pii.items()))
                  + f" in {s['pii']['documents']} documents"]
    d = s["decontamination"]
    if d.get("eval_files"):
        lines += ["", f"decontamination ({d['ngram']}-grams, {d['action']}): {d.get('docs', 0)} documents "
                      f"share n-grams with the evaluation texts"]
    if s["problems"]:
        lines += ["", f"input problems ({len(s['problems'])}):"]
        for pr in s["problems"][:20]:
            where = f"{pr['file']}:{pr['line']}" if pr["line"] else pr["file"]
            lines.append(f"  {where}: {pr['kind']} ({pr['action']}) {pr['detail']}")
        if len(s["problems"]) > 20:
            lines.append(f"  ... {len(s['problems']) - 20} more in report.json")
    if s["seconds"]:
        lines += ["", "time: " + ", ".join(f"{k} {v:.1f}s" for k, v in s["seconds"].items())
                  + f"; {s['mb_per_s']} MB/s end to end"]
    return "\n".join(lines)


def to_json(s: dict) -> str:
    return json.dumps(s, ensure_ascii=False)
