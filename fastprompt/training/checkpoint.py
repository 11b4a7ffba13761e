"""Training checkpoints: every tensor in safetensors, everything else in JSON, committed by
one atomic rename.

A checkpoint of run directory DIR is two files:
- `DIR/checkpoint.json`: the commit record: format, epoch, the name and id of its tensor
  file, and every value that is not a tensor (config, metrics, optimiser hyper-parameters
  and step counts, RNG states of Python, numpy and torch as JSON numbers, the CLIP weights
  and data ids the run trained on);
- `DIR/checkpoint-EEEE-ID.safetensors`: every tensor (prompts, optimiser buffers), with the
  same id in its metadata.
Saving writes the tensor file under a new name (atomically), then replaces checkpoint.json
(atomically), then deletes tensor files no longer named. So a crash at any moment leaves
checkpoint.json naming a complete tensor file: the previous checkpoint's until the json
rename, the new one's after it. Loading checks the pair (file present, ids equal).
A `checkpoint.pt` of fastprompt before this format is refused with what to do, without
reading it: nothing in a run directory is ever unpickled.
"""

from __future__ import annotations

import json
import logging
import uuid
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fastprompt.errors import FastpromptError
from fastprompt.files import atomic_write, write_json
from fastprompt.training.hooks import kill_point
from fastprompt.training.runfiles import CHECKPOINT

log = logging.getLogger(__name__)

FORMAT = 2  # 1: checkpoint.pt (torch.save pickle), no longer read
RECORD = CHECKPOINT  # checkpoint.json (named in runfiles, where torch-free readers find it)
LEGACY = "checkpoint.pt"


# ------------------------------------------------------------------ JSON forms of states
def rng_to_json(state: dict) -> dict:
    """`fastprompt.runtime.rng_state()` as JSON values (torch states as byte lists)."""
    kind, keys, pos, has_gauss, cached = state["numpy"]
    version, internal, gauss_next = state["python"]
    return {"torch": state["torch"].tolist(), "cuda": [s.tolist() for s in state["cuda"]],
            "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
            "python": [version, list(internal), gauss_next]}


def rng_from_json(state: dict) -> dict:
    """The inverse of `rng_to_json`: what `fastprompt.runtime.set_rng_state` takes."""
    kind, keys, pos, has_gauss, cached = state["numpy"]
    version, internal, gauss_next = state["python"]
    return {"torch": torch.tensor(state["torch"], dtype=torch.uint8),
            "cuda": [torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]],
            "numpy": (kind, np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached)),
            "python": (int(version), tuple(int(x) for x in internal), gauss_next)}


def optimizer_to_parts(state: dict, tensors: dict[str, torch.Tensor]) -> dict:
    """An optimiser `state_dict()` as JSON; its tensors go into `tensors` as `optimizer.I.KEY`."""
    per_param = {}
    for index, entry in state["state"].items():
        values = {}
        for key, value in entry.items():
            if torch.is_tensor(value):
                name = f"optimizer.{index}.{key}"
                tensors[name] = value.detach().cpu().contiguous()
                values[key] = {"tensor": name}
            else:
                values[key] = value
        per_param[str(index)] = values
    return {"state": per_param, "param_groups": state["param_groups"]}


def optimizer_from_parts(parts: dict, tensors: dict[str, torch.Tensor]) -> dict:
    """The inverse of `optimizer_to_parts`: a `state_dict()` for `optimizer.load_state_dict`."""
    state = {}
    for index, entry in parts["state"].items():
        state[int(index)] = {key: tensors[value["tensor"]] if isinstance(value, dict) and "tensor" in value else value
                             for key, value in entry.items()}
    return {"state": state, "param_groups": parts["param_groups"]}


# ------------------------------------------------------------------ saving and loading
def save(directory: Path, record: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Write the checkpoint `record` (JSON values) with its `tensors`, committed atomically."""
    directory = Path(directory)
    ident = uuid.uuid4().hex
    name = f"checkpoint-{int(record['epoch']):04d}-{ident[:12]}.safetensors"
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write(directory / name, lambda tmp: save_file(tensors, tmp, metadata={"checkpoint_id": ident}))
    kill_point("checkpoint-tensors")  # test hook: the tensors are written, their record not
    write_json(directory / RECORD, {**record, "format": FORMAT, "tensors": name, "checkpoint_id": ident},
               kill_point="checkpoint-rename", indent=None)  # the commit; one line (read by programs, written every epoch)
    for old in directory.glob("checkpoint-*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)


def read_record(directory: Path) -> Optional[dict]:
    """The committed checkpoint record of `directory` (None when it has none)."""
    path = Path(directory) / RECORD
    if not path.is_file():
        if (Path(directory) / LEGACY).is_file():
            raise FastpromptError(
                f"{directory} holds {LEGACY} from an older fastprompt, whose format is no longer read (it is never "
                "unpickled); pass --restart to train this run again from the start, or use another --out"
            )
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise FastpromptError(f"{path} is unreadable ({err}); delete it and the checkpoint-*.safetensors beside it, "
                              "or use another --out") from None
    if not isinstance(record, dict):
        raise FastpromptError(f"{path} is not a checkpoint record (not a JSON object); pass --restart to train the run "
                              "again from the start, or use another --out")
    if record.get("format") != FORMAT:
        raise FastpromptError(f"{path} has checkpoint format {record.get('format')!r}, this fastprompt reads {FORMAT}; "
                              "use another --out")
    return record


def load(directory: Path) -> Optional[tuple[dict, dict[str, torch.Tensor]]]:
    """(record, tensors) of the committed checkpoint of `directory`, checked as a pair; None
    when the directory has no checkpoint."""
    record = read_record(directory)
    if record is None:
        return None
    path = Path(directory) / str(record.get("tensors"))
    fix = f"pass --restart to train {directory} again from the start, or use another --out"
    try:
        with safe_open(str(path), framework="pt") as f:
            ident = (f.metadata() or {}).get("checkpoint_id")
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as err:  # missing, truncated or not safetensors
        raise FastpromptError(f"checkpoint tensors {path} are unreadable ({type(err).__name__}); {fix}") from None
    if ident != record.get("checkpoint_id"):
        raise FastpromptError(f"{path} does not belong to {RECORD} (checkpoint ids differ); {fix}")
    return record, tensors
