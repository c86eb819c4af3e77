"""Checkpoints: model, optimizers, data-loader position and RNG, written atomically.

Knows the on-disk layout of a training checkpoint; knows nothing about the loop.
A checkpoint is a directory ``checkpoints/step-NNNNNNN/`` holding an ordinary
lmforge model directory (``config.json``, ``model.safetensors``, tokenizer) plus
``optim.safetensors`` (every optimizer tensor), ``trainer.json`` (step, tokens,
elapsed time, loader state, optimizer hyper-parameters, Python and torch RNG
state). It is written under a temporary name and renamed, then
``checkpoints/latest.json`` is replaced; a crash mid-write leaves the previous
checkpoint as ``latest``. No pickle anywhere.
"""
from __future__ import annotations

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
                    keep: int = 2) -> Path:
    from safetensors.torch import save_file

    from ..model import save as save_model

    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{state['step']:07d}"
    tmp = root / f".tmp-{name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    save_model(model, tmp, tokenizer)
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
