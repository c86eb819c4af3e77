"""Distributed checkpoints: every rank writes its shards with ``torch.distributed.checkpoint`` (DCP),
keyed by parameter name, so a checkpoint loads into any strategy at any world size.

Knows the layout of a distributed checkpoint, how a strategy's state (``Strategy.dcp_state``) maps
onto DCP's flat keys and back, the checks that make a wrong checkpoint a clear error on every rank
before any collective, resuming from the single-process format, and consolidating to an ordinary
lmforge model directory. Knows nothing of how any strategy shards (its ``dcp_state`` /
``load_dcp_state`` say that) nor of the loop (it hands the trainer state in and gets it back).

Layout of ``<run>/checkpoints/step-NNNNNNN/`` (written under ``.tmp-step-NNNNNNN`` and renamed by
rank 0 once every rank's files are on disk, then ``checkpoints/latest.json`` is replaced, as in
``lmforge.train.checkpoint``; a crash mid-save leaves the previous checkpoint as latest)::

    config.json, tokenizer.lmforge.json   the model directory minus its weights (rank 0)
    dcp/.metadata, dcp/__R_0.distcp       DCP: "model.<name>" and "optim.<k>.<name>.<key>" tensors,
                                          each rank writing its shards (a replicated tensor once)
    trainer.json                          step, tokens, elapsed, loader position, config, the optimizers'
                                          groups and non-tensor state, rank 0's RNG, the strategy and
                                          world size that wrote it (rank 0)

Only tensors go into DCP (DCP stores them with ``torch.save`` and loads them with
``weights_only=True``; its ``.metadata`` index is torch's own pickle, read only from checkpoints
this run's user wrote). Hyper-parameters and scalars are JSON in ``trainer.json``.

A strategy's state is ``{"model": {name: tensor}, "optim": [one optimizer state dict per optimizer,
in the form of torch.distributed.checkpoint.state_dict.get_optimizer_state_dict: {"state": {name:
{key: value}}, "param_groups": [{..., "params": [names]}]}]}``; tensors may be DTensors (FSDP2, TP:
DCP writes and reads each rank's shard) or whole tensors (DDP, ZeRO: one copy is written). The
merged form ``get_state_dict`` gives (one ``{"state", "param_groups"}`` for all optimizers) is also
accepted, split by the optimizers' group counts; it cannot hold two optimizers over the same
parameter (AdamW and the weight average: one name, two states), so such a strategy is asked, and
loaded, once per optimizer (its model state gathered each time): the list is the better form.

Resharding: loading asks the run's strategy for its state (its tensors are the targets, with the
run's placements), matches every name and global shape against the checkpoint, and DCP reads into
each target the slice of the saved whole tensor that rank owns, whatever sharding wrote it.
Optimizer state missing from the targets (fresh optimizers hold none) is created in the form the
strategy gives its parameter's model entry (a DTensor entry: DTensor state with its placements; a
whole tensor: a whole tensor) or, for a scalar such as AdamW's step, as a plain tensor.
"""
from __future__ import annotations

import base64
import json
import os
import random
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

from .._io import write_json

FORMAT = "lmforge.dist_checkpoint"
DCP_DIR = "dcp"


@contextmanager
def _one_process_is_meant():
    """DCP warns on every call without a process group; one process is a case this module means."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is (disabled|unavailable)")
        yield


# ---- the strategy's state ----

def _named_groups(model, opt) -> list[dict]:
    """``opt``'s param_groups with parameter names in place of the parameters."""
    names = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), n)
    out = []
    for g in opt.param_groups:
        missing = [i for i, p in enumerate(g["params"]) if id(p) not in names]
        if missing:
            raise ValueError(f"{type(opt).__name__}: parameter {missing[0]} of a group is not the model's "
                             "(an optimizer over copies needs its strategy's own dcp_state)")
        out.append({**{k: v for k, v in g.items() if k != "params"}, "params": [names[id(p)] for p in g["params"]]})
    return out


def default_dcp_state(model, opts: list) -> dict:
    """{"model": name-keyed state (DTensors where the strategy shards), "optim": [per optimizer, name-keyed]}
    through torch's ``get_model_state_dict`` / ``get_optimizer_state_dict`` (plain modules, DDP's module,
    FSDP2, TP). An optimizer without state (a weight average not started, a run before its first step)
    gives ``{"state": {}, ...}``: it is not stepped to make state, as torch would, which would change
    the run."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    optim = []
    for opt in opts:
        if opt.state:
            optim.append(get_optimizer_state_dict(model, opt))
        else:
            optim.append({"state": {}, "param_groups": _named_groups(model, opt)})
    return {"model": get_model_state_dict(model), "optim": optim}


def default_load_dcp_state(model, opts: list, state: dict) -> None:
    """Load ``default_dcp_state``'s form (filled from a checkpoint of any strategy and world size)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    set_model_state_dict(model, state["model"], options=StateDictOptions(strict=True))
    for opt, osd in zip(opts, state["optim"]):
        if not osd["state"]:  # saved without state: the optimizer stays fresh, with the saved hyper-parameters
            for g, saved in zip(opt.param_groups, osd["param_groups"]):
                g.update({k: v for k, v in saved.items() if k != "params"})
            continue
        set_optimizer_state_dict(model, opt, osd, options=StateDictOptions(strict=False))


def _split_merged(optim: dict, opts: list) -> list[dict]:
    """The merged form (one {"state", "param_groups"} for every optimizer) as one view per optimizer,
    by the optimizers' group counts; the views share their group and per-parameter dicts with it."""
    groups, at, views = list(optim.get("param_groups", [])), 0, []
    for opt in opts:
        mine = groups[at:at + len(opt.param_groups)]
        at += len(opt.param_groups)
        names = [n for g in mine for n in g["params"]]
        views.append({"state": {n: optim["state"][n] for n in names if n in optim["state"]}, "param_groups": mine})
    if at != len(groups):
        raise ValueError(f"dcp_state gave {len(groups)} parameter groups for optimizers holding {at}")
    return views


def _merge_back(optim: dict, views: list[dict]) -> None:
    optim["state"] = {}
    for v in views:
        optim["state"].update(v["state"])


def _overlap(optim: dict) -> bool:
    """Whether a name is in two groups of the merged form (AdamW and the weight average over one parameter,
    whatever tensors each holds for it)."""
    names = [n for g in optim.get("param_groups", []) for n in g["params"]]
    return len(set(names)) < len(names)


def _strategy_state(strategy, model, opts: list):
    """(the strategy's ``dcp_state`` with "optim" as one state per optimizer, a function that hands the
    filled state back to ``load_dcp_state``). A strategy giving the merged form for optimizers that
    share parameters (whose states would overwrite each other under one name) is asked once per
    optimizer, and loaded once per optimizer."""
    sd = strategy.dcp_state(model, opts)
    optim = sd["optim"]
    if isinstance(optim, (list, tuple)):
        if len(optim) != len(opts):
            raise ValueError(f"{strategy.name}: dcp_state gave {len(optim)} optimizer states for {len(opts)} "
                             "optimizers")
        sd["optim"] = list(optim)
        return sd, lambda: strategy.load_dcp_state(model, opts, sd)
    if not _overlap(optim):
        views = _split_merged(optim, opts)

        def back():
            _merge_back(optim, views)
            strategy.load_dcp_state(model, opts, sd)

        return {"model": sd["model"], "optim": views}, back
    parts = [sd] if len(opts) == 1 else [strategy.dcp_state(model, [o]) for o in opts]
    views = [_split_merged(p["optim"], [o])[0] for p, o in zip(parts, opts)]
    state = {"model": parts[0]["model"], "optim": views}

    def back_each():
        for p, v, o in zip(parts, views, opts):
            _merge_back(p["optim"], [v])
            strategy.load_dcp_state(model, [o], {**p, "model": state["model"]})

    return state, back_each


def _jsonable(v, where: str):
    if isinstance(v, tuple):
        return list(v)
    if isinstance(v, (list, dict, str, int, float, bool)) or v is None:
        return v
    if torch.is_tensor(v) and v.numel() == 1:
        return v.item()
    raise ValueError(f"{where}: {type(v).__name__} value {v!r} cannot be written to trainer.json")


def _flatten(sd: dict, opts: list) -> tuple[dict, list[dict]]:
    """``sd``: a state with one optimizer state per optimizer (``_strategy_state``). ({DCP key: tensor}, per optimizer {"class", "param_groups", "scalars"} for trainer.json)."""
    tensors = {f"model.{k}": v for k, v in sd["model"].items() if torch.is_tensor(v)}
    views = sd["optim"]
    metas = []
    for k, (opt, osd) in enumerate(zip(opts, views)):
        scalars = {}
        for name, st in osd["state"].items():
            for key, v in st.items():
                if torch.is_tensor(v):
                    tensors[f"optim.{k}.{name}.{key}"] = v
                else:
                    scalars.setdefault(name, {})[key] = _jsonable(v, f"optimizer {k} state {name}.{key}")
        groups = [{gk: _jsonable(gv, f"optimizer {k} group {gk}") for gk, gv in g.items()} for g in osd["param_groups"]]
        metas.append({"class": type(opt).__name__, "param_groups": groups, "scalars": scalars,
                      "params_with_state": len(osd["state"])})
    return tensors, metas


# ---- reading a checkpoint ----

def is_dist_checkpoint(ck) -> bool:
    """Whether ``ck`` is a checkpoint this module wrote (it has a ``dcp/`` directory)."""
    return (Path(ck) / DCP_DIR).is_dir()


def _trainer_json(ck: Path) -> dict:
    p = ck / "trainer.json"
    if not p.exists():
        raise FileNotFoundError(f"{ck}: no trainer.json (not a training checkpoint, or an unfinished one)")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: not valid JSON ({e}); the checkpoint is damaged") from None


def _metadata(ck: Path):
    """DCP's index of ``ck/dcp``, with every file it names present and long enough: a missing or
    truncated file is a ValueError here, on every rank alike, before any collective."""
    from torch.distributed.checkpoint import FileSystemReader

    d = ck / DCP_DIR
    if not (d / ".metadata").exists():
        raise ValueError(f"{ck}: {DCP_DIR}/.metadata is missing (a save that did not finish?)")
    try:
        md = FileSystemReader(str(d)).read_metadata()
    except Exception as e:
        raise ValueError(f"{ck}: cannot read {DCP_DIR}/.metadata ({type(e).__name__}: {e}); the file is "
                         "truncated or damaged") from None
    need: dict[str, int] = {}
    for info in (md.storage_data or {}).values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    for rel, n in sorted(need.items()):
        f = d / rel
        if not f.exists():
            raise ValueError(f"{ck}: {DCP_DIR}/{rel} is missing (the checkpoint's index names it)")
        size = f.stat().st_size
        if size < n:
            raise ValueError(f"{ck}: {DCP_DIR}/{rel} is truncated ({size} bytes; the index needs {n})")
    return md


def _saved_shapes(md) -> dict[str, tuple[tuple, torch.dtype]]:
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    return {k: (tuple(v.size), v.properties.dtype) for k, v in md.state_dict_metadata.items()
            if isinstance(v, TensorStorageMetadata)}


def _match(ck: Path, targets: dict, opts: list, metas: list[dict], saved: dict) -> dict:
    """Check the run's state (``targets``, a strategy's ``dcp_state``) against the checkpoint (``saved``:
    DCP key -> (shape, dtype); ``metas``: trainer.json's optimizers) and prepare it to be filled:
    optimizer state the checkpoint holds but the targets lack is created, state it lacks is removed,
    the saved groups' hyper-parameters and scalars are put in (``targets``: ``_strategy_state``'s form).
    Returns {DCP key: target tensor}."""
    own = {k: v for k, v in targets["model"].items() if torch.is_tensor(v)}
    in_ck = {k[len("model."):] for k in saved if k.startswith("model.")}
    missing, extra = sorted(set(own) - in_ck), sorted(in_ck - set(own))
    if missing or extra:
        raise ValueError(f"{ck}: a checkpoint of another model: this model's {missing[:4]} not in it, its "
                         f"{extra[:4]} not in this model")
    flat = {}
    for name, t in own.items():
        shape = saved[f"model.{name}"][0]
        if tuple(t.shape) != shape:
            raise ValueError(f"{ck}: parameter {name!r} has shape {shape} in the checkpoint, {tuple(t.shape)} in "
                             "this model (a checkpoint of another model configuration)")
        flat[f"model.{name}"] = t
    views = targets["optim"]
    if len(metas) != len(opts):
        raise ValueError(f"{ck}: saved with {len(metas)} optimizer state(s), this run has {len(opts)} "
                         "(a different optimizer setting, or ema switched on or off?)")
    for k, (opt, osd, meta) in enumerate(zip(opts, views, metas)):
        label = f"{ck}: optimizer {k} ({meta.get('class')} in the checkpoint, {type(opt).__name__} here)"
        groups = osd["param_groups"]
        if len(groups) != len(meta["param_groups"]):
            raise ValueError(f"{label}: {len(meta['param_groups'])} parameter groups saved, {len(groups)} here "
                             "(a different optimizer setting?)")
        params: dict[str, torch.Tensor] = {}
        for g, sg, og in zip(groups, meta["param_groups"], opt.param_groups):
            if sorted(g["params"]) != sorted(sg["params"]):
                diff = sorted(set(g["params"]) ^ set(sg["params"]))
                raise ValueError(f"{label}: group {sg.get('name', '?')!r} holds other parameters ({diff[:4]} in "
                                 "only one of them: a different optimizer setting or model?)")
            g.update({key: v for key, v in sg.items() if key != "params"})
            params.update(zip(g["params"], og["params"]))
        prefix = f"optim.{k}."
        saved_state: dict[str, dict] = {}
        for key, (shape, dtype) in saved.items():
            if key.startswith(prefix):
                name, sk = key[len(prefix):].rsplit(".", 1)
                saved_state.setdefault(name, {})[sk] = (shape, dtype)
        for name, st in meta.get("scalars", {}).items():
            for sk, v in st.items():
                saved_state.setdefault(name, {})[sk] = v
        for name in list(osd["state"]):
            if name not in saved_state:
                del osd["state"][name]
        for name, entries in saved_state.items():
            if name not in params:
                raise ValueError(f"{label}: the checkpoint has state for {name!r}, which this optimizer does not "
                                 "hold (a different optimizer setting or model?)")
            st = osd["state"].setdefault(name, {})
            for sk in list(st):
                if sk not in entries:
                    del st[sk]
            for sk, e in entries.items():
                if not isinstance(e, tuple):  # a scalar from trainer.json
                    st[sk] = e
                    continue
                shape, dtype = e
                t = st.get(sk)
                if not torch.is_tensor(t):
                    st[sk] = t = _new_state(own.get(name, params[name]), shape, dtype)
                if tuple(t.shape) != shape:
                    raise ValueError(f"{label}: state {name}.{sk} has shape {shape} in the checkpoint, "
                                     f"{tuple(t.shape)} here")
                flat[f"{prefix}{name}.{sk}"] = t
    return flat


def _new_state(like: torch.Tensor, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    """A target for saved optimizer state of ``shape``: shaped like its parameter, it takes the form the
    strategy gives that parameter's model entry ``like`` (a DTensor: the same placements; a whole tensor,
    as ZeRO's or TP's regrouped matrices are: whole); else (a step counter) a plain tensor."""
    if tuple(like.shape) != shape:
        return torch.zeros(shape, dtype=dtype)
    from torch.distributed.tensor import DTensor

    if isinstance(like, DTensor):
        return torch.zeros_like(like, dtype=dtype)
    return torch.zeros(shape, dtype=dtype, device=like.device)


def _restore_rng(tr: dict) -> None:
    rng = tr.get("rng") or {}
    if "torch" in rng:
        torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(rng["torch"])), dtype=torch.uint8))
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(rng["cuda"])), dtype=torch.uint8))
    if "python" in rng:
        v, internal, gauss = rng["python"]
        random.setstate((v, tuple(internal), gauss))


def _trainer_state(tr: dict) -> dict:
    return {k: v for k, v in tr.items() if k not in ("optimizers", "rng", "python_rng", "format")}


def load_dist_checkpoint(ck, strategy, model, opts: list) -> dict:
    """Restore weights, optimizer states (by parameter name) and rank 0's RNG from ``ck`` into this run's
    ``strategy`` at its world size; returns the trainer state (as ``train.checkpoint.load_checkpoint``
    does: step, tokens, elapsed, loader, config, ..., and ``saved_by``: the strategy and world size that
    wrote it). Collective: every rank calls it. ``ck`` may also be a single-process checkpoint
    (``model.safetensors`` + ``optim.safetensors``). A checkpoint of another model or optimizer
    setting, or a missing or truncated file: a ValueError naming ``ck`` (and the parameter and both
    shapes), raised on every rank."""
    ck = Path(ck)
    if not ck.is_dir():
        raise FileNotFoundError(f"{ck}: no such checkpoint directory")
    if not is_dist_checkpoint(ck):
        return _load_single(ck, strategy, model, opts)
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint import load as dcp_load
    from torch.distributed.checkpoint.api import CheckpointException

    tr = _trainer_json(ck)
    md = _metadata(ck)
    targets, give_back = _strategy_state(strategy, model, opts)
    flat = _match(ck, targets, opts, tr.get("optimizers", []), _saved_shapes(md))
    try:
        with _one_process_is_meant():
            dcp_load(flat, storage_reader=FileSystemReader(str(ck / DCP_DIR)))
    except CheckpointException as e:  # (a BaseException: on every rank, with each failed rank's error)
        raise ValueError(f"{ck}: cannot read the distributed checkpoint: {e}") from None
    give_back()
    _restore_rng(tr)
    return _trainer_state(tr)


def _load_single(ck: Path, strategy, model, opts: list) -> dict:
    """A single-process checkpoint into this run: the whole tensors, each rank keeping its part."""
    from safetensors.torch import load_file

    from ..model.hf import read_safetensors

    tr = _trainer_json(ck)
    if not (ck / "optim.safetensors").exists():
        raise ValueError(f"{ck}: neither a distributed checkpoint (no {DCP_DIR}/) nor a single-process one "
                         "(no optim.safetensors)")
    sd = read_safetensors(ck)
    tied = "lm_head.weight" not in sd and "tok_emb.weight" in sd
    try:
        otensors = load_file(str(ck / "optim.safetensors"))
    except Exception as e:
        raise ValueError(f"{ck}: cannot read optim.safetensors ({type(e).__name__}: {e}); truncated?") from None
    targets, give_back = _strategy_state(strategy, model, opts)
    views = targets["optim"]
    # the single-process file numbers each optimizer's parameters in its groups' order; the run's
    # optimizers (same model, same setting) name them in that order
    src: dict[str, torch.Tensor] = {f"model.{k}": v for k, v in sd.items()}
    if tied and "lm_head.weight" in targets["model"]:
        src["model.lm_head.weight"] = sd["tok_emb.weight"]
    metas = []
    saved_opts = tr.get("optimizers", [])
    for k, meta in enumerate(saved_opts):
        groups = meta["param_groups"]
        names = [n for g in views[k]["param_groups"] for n in g["params"]] if k < len(views) else []
        n_saved = sum(len(g["params"]) for g in groups)
        if k < len(views) and n_saved != len(names):
            raise ValueError(f"{ck}: optimizer {k} holds {n_saved} parameters in the checkpoint, {len(names)} "
                             "here (a different optimizer setting or model?)")
        name_of = dict(enumerate(names))
        scalars: dict[str, dict] = {}
        for key, v in meta.get("scalars", {}).items():
            idx, sk = key.split(".", 1)
            scalars.setdefault(name_of.get(int(idx), idx), {})[sk] = v
        for key, v in otensors.items():
            if key.startswith(f"opt{k}."):
                _, idx, sk = key.split(".", 2)
                src[f"optim.{k}.{name_of.get(int(idx), idx)}.{sk}"] = v
        metas.append({"class": f"opt{k}", "scalars": scalars,
                      "param_groups": [{**g, "params": [name_of.get(i, str(i)) for i in g["params"]]} for g in groups]})
    saved = {k: (tuple(v.shape), v.dtype) for k, v in src.items()}
    flat = _match(ck, targets, opts, metas, saved)
    with torch.no_grad():
        for key, t in flat.items():
            _copy_whole(t, src[key])
    give_back()
    rng = {"torch": base64.b64encode(otensors["rng.torch"].numpy().tobytes()).decode()} if "rng.torch" in otensors else {}
    if "python_rng" in tr:
        rng["python"] = tr["python_rng"]
    _restore_rng({"rng": rng})
    st = _trainer_state(tr)
    st["saved_by"] = {"strategy": "none", "world_size": 1, "format": "single-process"}
    return st


def _copy_whole(target: torch.Tensor, whole: torch.Tensor) -> None:
    """Copy the whole tensor ``whole`` into ``target`` (a DTensor: its local part; no communication)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(target, DTensor):
        part = distribute_tensor(whole.to(target.device, target.dtype), target.device_mesh, target.placements,
                                 src_data_rank=None)
        target.to_local().copy_(part.to_local())
    else:
        target.copy_(whole.to(target.device, target.dtype))


# ---- writing ----

def _write_model_files(d: Path, model, tokenizer, tokens) -> None:
    """The model directory's config.json and tokenizer, without weights (``lmforge.model.save``'s other files)."""
    from ..model import FORMAT as MODEL_FORMAT

    cfg = getattr(model, "cfg", None)
    if not hasattr(cfg, "to_dict"):
        return
    meta = {"format": MODEL_FORMAT, "model": cfg.to_dict()}
    if tokenizer is not None:
        from ..tokenize.special import TokenSpec

        tokenizer.save(d / "tokenizer.lmforge.json")
        tokens = tokens or TokenSpec.for_tokenizer(tokenizer)
        tokens.check(tokenizer, cfg.vocab_size)
        meta["tokens"] = tokens.to_dict()
    write_json(d / "config.json", meta, indent=1)


def _fsync_tree(d: Path) -> None:
    for p in d.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def save_dist_checkpoint(run_dir, strategy, model, opts: list, state: dict, tokenizer=None, tokens=None,
                         keep: int = 2) -> Path:
    """Write ``<run_dir>/checkpoints/step-NNNNNNN/`` (the layout in this module's docstring) and point
    ``checkpoints/latest.json`` at it; keep the newest ``keep``. Collective: every rank calls it with its
    own ``model`` / ``opts``; ``state`` (rank 0's is written) is the trainer state. Returns the directory."""
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint import save as dcp_save

    root = Path(run_dir) / "checkpoints"
    name = f"step-{int(state['step']):07d}"
    tmp, final = root / f".tmp-{name}", root / name
    main = strategy.is_main
    if main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        (tmp / DCP_DIR).mkdir(parents=True)
    strategy.barrier()
    tensors, metas = _flatten(_strategy_state(strategy, model, opts)[0], opts)
    # returns on every rank once every rank's files are written and synced and rank 0 wrote the index
    with _one_process_is_meant():
        dcp_save(tensors, storage_writer=FileSystemWriter(str(tmp / DCP_DIR), sync_files=True))
    if main:
        _write_model_files(tmp, model, tokenizer, tokens)
        py = random.getstate()
        rng = {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
               "python": [py[0], list(py[1]), py[2]]}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rng["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
        saved_by = {"strategy": strategy.name, "world_size": strategy.world_size, **strategy.describe()}
        write_json(tmp / "trainer.json", {**state, "format": FORMAT, "saved_by": saved_by, "optimizers": metas,
                                          "rng": rng}, indent=1)
        _fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        write_json(root / "latest.json", {"step": int(state["step"]), "path": name})
        old = sorted(p for p in root.glob("step-*") if p.is_dir() and p != final)
        for p in old[: max(0, len(old) - (keep - 1))]:
            shutil.rmtree(p, ignore_errors=True)
        for p in root.glob(".tmp-step-*"):  # what an earlier save that died left
            shutil.rmtree(p, ignore_errors=True)
    strategy.barrier()
    return final


# ---- consolidation ----

def consolidate(ck, out) -> Path:
    """A distributed checkpoint ``ck`` as an ordinary lmforge model directory ``out`` (model.safetensors,
    config.json, tokenizer), which ``lmforge.load`` opens and ``lmforge export`` exports. One process;
    reads only the model's tensors (not the optimizer state)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint import load as dcp_load

    from ..model import FORMAT as MODEL_FORMAT
    from ..model import ModelConfig, load_tokens, save
    from ..model.hf import load_state
    from ..model.transformer import Transformer

    ck = Path(ck)
    if not is_dist_checkpoint(ck):
        raise ValueError(f"{ck}: not a distributed checkpoint (no {DCP_DIR}/ directory)")
    cpath = ck / "config.json"
    if not cpath.exists():
        raise ValueError(f"{ck}: no config.json (the run's model is not an lmforge Transformer)")
    c = json.loads(cpath.read_text())
    if c.get("format") != MODEL_FORMAT:
        raise ValueError(f"{cpath}: format {c.get('format')!r}, expected {MODEL_FORMAT!r}")
    cfg = ModelConfig.from_dict(c["model"])
    md = _metadata(ck)
    shapes = _saved_shapes(md)
    targets = {k: torch.empty(shape, dtype=dtype) for k, (shape, dtype) in shapes.items() if k.startswith("model.")}
    if not targets:
        raise ValueError(f"{ck}: the checkpoint holds no model tensors")
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with _one_process_is_meant():
            dcp_load(targets, storage_reader=FileSystemReader(str(ck / DCP_DIR)), no_dist=True)
    except CheckpointException as e:
        raise ValueError(f"{ck}: cannot read the distributed checkpoint: {e}") from None
    sd = {k[len("model."):]: v for k, v in targets.items()}
    if cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
        if "tok_emb.weight" in sd:
            sd["lm_head.weight"] = sd["tok_emb.weight"]
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to_empty(device="cpu")
    load_state(model, sd, str(ck))
    tok = None
    if (ck / "tokenizer.lmforge.json").exists():
        from ..tokenize import load as load_tok

        tok = load_tok(ck / "tokenizer.lmforge.json")
    return save(model, out, tok, tokens=load_tokens(ck, tok) if tok is not None else None)


# ---- what a run holds, comparable across world sizes ----

def state_summary(strategy, model, opts: list) -> list[dict]:
    """``lmforge.train.checkpoint.state_summary`` for a distributed run: per optimizer its class,
    ``params_with_state``, ``step`` and a ``sha256`` of its whole state tensors by parameter name, the
    same for one state whatever the strategy and world size that hold it (a resumed run on 4 ranks
    shows the digest the 2-rank run saved). Collective: sharded tensors are gathered one at a time."""
    import hashlib

    from torch.distributed.tensor import DTensor

    state, _ = _strategy_state(strategy, model, opts)
    out = []
    for opt, osd in zip(opts, state["optim"]):
        h, steps = hashlib.sha256(), set()
        for name in sorted(osd["state"]):
            for key in sorted(osd["state"][name]):
                v = osd["state"][name][key]
                if torch.is_tensor(v):
                    t = (v.full_tensor() if isinstance(v, DTensor) else v).detach().contiguous().cpu()
                    h.update(f"{name}.{key}:{t.dtype}:{tuple(t.shape)}\n".encode())
                    h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
                    v = t.item() if t.numel() == 1 else None
                if key == "step" and v is not None:
                    steps.add(int(v))
        out.append({"name": type(opt).__name__, "params_with_state": len(osd["state"]),
                    "step": max(steps) if steps else None, "sha256": h.hexdigest()[:16]})
    return out
