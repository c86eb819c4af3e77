"""Checkpoints: model, optimizers, data-loader position and RNG, written atomically.

Knows the on-disk layout of a training checkpoint; knows nothing about the loop.
A checkpoint is a directory ``checkpoints/step-NNNNNNN/`` holding an ordinary
lmforge model directory (``config.json``, ``model.safetensors``, tokenizer) plus
``optim.safetensors`` (every optimizer tensor), ``trainer.json`` (step, tokens,
elapsed time, loader state, optimizer hyper-parameters, Python and torch RNG
state). It is written under a temporary name and renamed, then
``checkpoints/latest.json`` is replaced; a crash mid-write leaves the previous
checkpoint as ``latest``. No pickle anywhere.

``state_summary`` describes the optimizer state a run holds (per optimizer: how
many parameters have state, its step counter, a digest of its tensors), so a
resumed run can show, and a test can check, that what it restored is what the
checkpoint saved: ``file_state_summary`` computes the same from a checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import torch

from .._io import write_json


def _fsync_dir(d: Path) -> None:
    for p in d.iterdir():
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def save_checkpoint(run_dir: str | os.PathLike, model, optimizers, state: dict, tokenizer=None,
                    keep: int = 2, tokens=None) -> Path:
    from safetensors.torch import save_file

    from ..model import save as save_model

    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{state['step']:07d}"
    tmp = root / f".tmp-{name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    save_model(model, tmp, tokenizer, tokens=tokens)
    tensors, opt_meta = {}, []
    for k, opt in enumerate(optimizers):
        sd = opt.state_dict()
        scalars = {}
        for idx, st in sd["state"].items():
            for key, v in st.items():
                if torch.is_tensor(v):
                    tensors[f"opt{k}.{idx}.{key}"] = v.detach().contiguous().cpu()
                else:
                    scalars[f"{idx}.{key}"] = v
        opt_meta.append({"param_groups": sd["param_groups"], "scalars": scalars})
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    save_file(tensors, str(tmp / "optim.safetensors"))
    py_state = random.getstate()
    write_json(tmp / "trainer.json", {**state, "optimizers": opt_meta,
                                      "python_rng": [py_state[0], list(py_state[1]), py_state[2]]}, indent=1)
    _fsync_dir(tmp)
    final = root / name
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    write_json(root / "latest.json", {"step": state["step"], "path": name})
    old = sorted(p for p in root.glob("step-*") if p.is_dir() and p != final)
    for p in old[: max(0, len(old) - (keep - 1))]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def _summarize(name: str, tensors: dict, scalars: dict) -> dict:
    """``tensors``/``scalars``: ``"{param index}.{key}" -> value`` of one optimizer's state."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().contiguous().cpu()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)}\n".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    params = {k.split(".", 1)[0] for k in (*tensors, *scalars)}
    steps = {int(v.item()) if torch.is_tensor(v) else int(v) for k, v in (*tensors.items(), *scalars.items())
             if k.split(".", 1)[1] == "step"}
    return {"name": name, "params_with_state": len(params), "step": max(steps) if steps else None,
            "sha256": h.hexdigest()[:16]}


def state_summary(optimizers) -> list[dict]:
    """What each optimizer holds now: ``name``, ``params_with_state`` (0: no state, a fresh
    optimizer), ``step`` (its step counter, where it keeps one, e.g. AdamW; None for Muon's
    momentum or a weight average) and ``sha256`` (of every state tensor, by name)."""
    out = []
    for opt in optimizers:
        tensors, scalars = {}, {}
        for idx, st in opt.state_dict()["state"].items():
            for key, v in st.items():
                (tensors if torch.is_tensor(v) else scalars)[f"{idx}.{key}"] = v
        out.append(_summarize(type(opt).__name__, tensors, scalars))
    return out


def file_state_summary(ck: str | os.PathLike) -> list[dict]:
    """``state_summary`` of the optimizers saved in checkpoint ``ck``, read from its files (names
    are the optimizers' positions: the files do not record classes)."""
    from safetensors.torch import load_file

    ck = Path(ck)
    tensors = load_file(str(ck / "optim.safetensors"))
    metas = json.loads((ck / "trainer.json").read_text())["optimizers"]
    out = []
    for k, meta in enumerate(metas):
        mine = {n.split(".", 1)[1]: v for n, v in tensors.items() if n.startswith(f"opt{k}.")}
        out.append(_summarize(f"opt{k}", mine, meta["scalars"]))
    return out


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    root = Path(run_dir) / "checkpoints"
    p = root / "latest.json"
    if not p.exists():
        return None
    ck = root / json.loads(p.read_text())["path"]
    return ck if ck.exists() else None


def load_checkpoint(ck: str | os.PathLike, model, optimizers) -> dict:
    """Restore model weights, optimizer states and RNG from ``ck``; return the trainer state."""
    from safetensors.torch import load_file

    from ..model.hf import load_state, read_safetensors

    ck = Path(ck)
    sd = read_safetensors(ck)
    if model.cfg.tie_embeddings and "tok_emb.weight" in sd:
        sd["lm_head.weight"] = sd["tok_emb.weight"]
    load_state(model, sd, str(ck))
    state = json.loads((ck / "trainer.json").read_text())
    tensors = load_file(str(ck / "optim.safetensors"))
    if len(state["optimizers"]) != len(optimizers):
        raise ValueError(f"{ck}: saved with {len(state['optimizers'])} optimizer state(s), this run has "
                         f"{len(optimizers)} (a different --set optimizer, or ema switched on or off?)")
    for k, (opt, meta) in enumerate(zip(optimizers, state["optimizers"])):
        st: dict = {}
        for name, v in tensors.items():
            if name.startswith(f"opt{k}."):
                _, idx, key = name.split(".", 2)
                st.setdefault(int(idx), {})[key] = v
        for name, v in meta["scalars"].items():
            idx, key = name.split(".", 1)
            st.setdefault(int(idx), {})[key] = v
        opt.load_state_dict({"state": st, "param_groups": meta["param_groups"]})
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    v, internal, gauss = state.pop("python_rng")
    random.setstate((v, tuple(internal), gauss))
    state.pop("optimizers")
    return state
