"""Training-state checkpoints through accelerate, written atomically, the last K kept.

A checkpoint is `RUN/checkpoints/step-<global step, 8 digits>/`, written by `accelerator.save_state` into a hidden
temporary folder and renamed into place when complete, so a run killed at any moment leaves either
a whole checkpoint or none. `--resume` takes the newest.

A checkpoint holds the model's tensors that the base checkpoints cannot give back (`save_model_subset`: the
trainer's selection goes through accelerate's save/load pre-hooks into `model.safetensors`), the optimizer,
scheduler and RNG states, `progress.json`, the resolved config and `base_checkpoints.json`, the fingerprints of
the base folders the left-out tensors are rebuilt from (`train.fingerprints`).

Nothing of a checkpoint is unpickled: the run's progress is `progress.json` (nothing is registered
with `accelerator.register_for_checkpointing`), the weights are safetensors, and before accelerate
loads its own pickle-format files (optimizer, scheduler, sampler, RNG states) `check_safe_to_load`
opens each with `weights_only=True` and refuses the checkpoint, naming the file, if one needs more.
Sharded state (torch.distributed.checkpoint folders, written by accelerate's FSDP or by `train.sharding`)
is checked too: torch reads a `.metadata` file with a plain `pickle.load` and non-tensor entries with
`weights_only=False`, so the metadata is unpickled with an allowlist of the classes torch writes there and
every non-tensor entry is opened with `weights_only=True` before torch reads the folder.
"""

from __future__ import annotations

import io
import json
import pickle
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import safetensors.torch
import torch
from accelerate import Accelerator
from accelerate.utils import SAFE_MODEL_NAME
from accelerate.utils import load as accelerate_load
from torch import nn
from torch.distributed.checkpoint import metadata as dcp_metadata

from models.files import write_json
from train.fingerprints import BASES_NAME

PREFIX = "step-"
RESOLVED_CONFIG = "config.yaml"  # RUN/config.yaml, copied into every checkpoint


@dataclass
class TrainingProgress:
    """Where a run is; saved with every checkpoint as progress.json."""

    stage: int = 0  # index into train.stages
    epoch: int = 0  # epoch within the stage
    batches_done: int = 0  # batches of the current epoch already consumed (data position)
    stage_step: int = 0  # optimizer steps within the stage
    global_step: int = 0  # optimizer steps in the whole run
    best_metric: float | None = None  # best validation macro-F1 so far
    best_step: int | None = None
    bad_epochs: int = 0  # epochs without improvement in this stage (early stopping)
    stage_stopped_early: bool = False
    finished: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)  # per-epoch validation metrics
    metric_lines: int = 0  # lines of RUN/metrics.jsonl that belong to this state
    step_lines: int = 0  # lines of RUN/steps.jsonl that belong to this state
    # Running sums over all processes, so a resumed run logs what an uninterrupted one would have:
    epoch_loss_sum: float = 0.0  # sum of loss x batch size in the current epoch
    epoch_samples: float = 0.0
    window_loss_sum: float = 0.0  # the same since the last RUN/steps.jsonl row
    window_samples: float = 0.0
    window_grad_norm_sum: float = 0.0  # sum of the optimizer steps' gradient norms since the last row
    window_steps: int = 0
    skipped_images: int = 0  # bad images skipped so far in the run
    stage_seconds: dict[str, float] = field(default_factory=dict)  # stage index -> training wall time
    # stage index -> [seconds of its first optimizer step, seconds of the later ones, how many later ones]
    stage_step_seconds: dict[str, list[float]] = field(default_factory=dict)
    stage_peak_mib: dict[str, float] = field(default_factory=dict)  # stage index -> peak memory of training steps

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def checkpoint_root(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders are never listed)."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def read_progress(checkpoint: Path) -> TrainingProgress:
    """The progress saved beside a checkpoint, readable before any model is set up."""
    progress = TrainingProgress()
    progress.load_state_dict(json.loads((checkpoint / "progress.json").read_text()))
    return progress


PICKLE_SUFFIXES = (".bin", ".pkl", ".pt", ".pth")  # what accelerate writes with torch.save
DCP_METADATA = ".metadata"  # the index of a torch.distributed.checkpoint folder (a pickle)
# What torch writes into a .metadata file besides the classes of torch.distributed.checkpoint.metadata.
_METADATA_GLOBALS = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
                     ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("collections", "OrderedDict")}


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file would need full unpickling (it could run code) to load."""


def check_safe_to_load(checkpoint: Path) -> None:
    """Open every pickle-format file of `checkpoint` (subfolders included) without running code from it.

    accelerate loads optimizer, scheduler and sampler states with weights_only=True already, but skips RNG
    states that fail to load with only an INFO line, and would fully unpickle `custom_checkpoint_*.pkl`;
    torch.distributed.checkpoint unpickles `.metadata` and its non-tensor entries in full.

    Raises:
        UnsafeCheckpointError: one line naming the file that cannot be loaded safely.
    """
    for path in sorted(checkpoint.rglob("*")):
        if path.name == DCP_METADATA:
            _check_dcp_folder(path)
        elif path.suffix in PICKLE_SUFFIXES and path.name.startswith("custom_checkpoint_"):
            raise UnsafeCheckpointError(f"refusing to resume: {path} is a pickled custom state (it could run code); "
                                        f"this project keeps its progress in progress.json")
        elif path.suffix in PICKLE_SUFFIXES:
            try:
                accelerate_load(path, map_location="cpu")  # weights_only=True, with accelerate's numpy allowances
            except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as exc:
                raise _refusal(path, "does not load with weights_only=True", exc) from exc


def _refusal(path: Path, what: str, exc: BaseException) -> UnsafeCheckpointError:
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return UnsafeCheckpointError(f"refusing to resume: {path} {what} ({reason})")


class _MetadataUnpickler(pickle.Unpickler):
    """Builds only the classes torch.distributed.checkpoint puts into `.metadata` (dataclasses, enums, dtypes)."""

    def find_class(self, module: str, name: str) -> object:
        found = super().find_class(module, name) if module in ("torch", dcp_metadata.__name__) else None
        if (module, name) in _METADATA_GLOBALS or isinstance(found, torch.dtype) or (
                module == dcp_metadata.__name__ and isinstance(found, type)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not checkpoint metadata")


def _check_dcp_folder(metadata_path: Path) -> None:
    """Unpickle a `.metadata` with the allowlist, then open each non-tensor entry it lists with weights_only=True."""
    try:
        with metadata_path.open("rb") as handle:
            metadata = _MetadataUnpickler(handle).load()
        if not isinstance(metadata, dcp_metadata.Metadata):
            raise pickle.UnpicklingError(f"holds a {type(metadata).__name__}, not checkpoint metadata")
    except (pickle.UnpicklingError, AttributeError, EOFError, ImportError, IndexError, TypeError, ValueError) as exc:
        raise _refusal(metadata_path, "is not plain torch.distributed.checkpoint metadata", exc) from exc
    for index, info in (metadata.storage_data or {}).items():
        if not isinstance(metadata.state_dict_metadata.get(index.fqn), dcp_metadata.BytesStorageMetadata):
            continue  # tensors: torch reads them with weights_only=True itself
        data = metadata_path.parent / info.relative_path
        try:
            if info.transform_descriptors:  # compression or other stream transforms: not written here
                raise ValueError(f"entry {index.fqn!r} has stream transforms {list(info.transform_descriptors)}")
            with data.open("rb") as handle:
                handle.seek(info.offset)
                torch.load(io.BytesIO(handle.read(info.length)), weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as exc:
            raise _refusal(data, f"entry {index.fqn!r} does not load with weights_only=True", exc) from exc


def save_model_subset(accelerator: Accelerator, select: Callable[[], set[int]]) -> None:
    """Make `accelerator.save_state` write, and `load_state` read, only the model tensors `select()` picks.

    Args:
        select: the ids of the tensors to keep, as `model.state_dict(keep_vars=True)` holds them (parameters and
            buffers); called at every save and load, so it can follow the stages.

    On load, `model.safetensors` must hold at least those tensors (a checkpoint written whole loads whole); the
    model's other tensors keep the values it was built with. Models that accelerate saves itself (FSDP,
    DeepSpeed) never reach these hooks: their checkpoints stay whole.
    """
    def save_hook(models: list[nn.Module], weights: list[dict[str, torch.Tensor]], output_dir: str) -> None:
        keep = select()
        for model, state in zip(models, weights):
            held = model.state_dict(keep_vars=True)  # the same names as `state`, with the live tensors
            for name in [n for n in state if id(held[n]) not in keep]:
                del state[name]

    def load_hook(models: list[nn.Module], input_dir: str) -> None:
        keep = select()
        for index, model in enumerate(models):
            load_model_subset(model, Path(input_dir) / f"{SAFE_MODEL_NAME}{f'_{index}' if index else ''}.safetensors",
                              keep)
        models.clear()  # loaded here: accelerate must not load them again (strictly, which would fail)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def load_model_subset(model: nn.Module, path: Path, keep: set[int]) -> None:
    """Load the safetensors file `path` into `model`; it must hold every tensor whose id is in `keep`.

    Raises:
        ValueError: tensors of `keep` missing from the file, or tensors the model does not have (named).
    """
    held = model.state_dict(keep_vars=True)
    state = safetensors.torch.load_file(path)
    missing = sorted(name for name, tensor in held.items() if id(tensor) in keep and name not in state)
    unknown = sorted(set(state) - set(held))
    if missing or unknown:
        raise ValueError(f"{path} does not fit the model: missing {len(missing)} tensors {missing[:3]}, "
                         f"{len(unknown)} unknown {unknown[:3]}")
    model.load_state_dict(state, strict=False)


def save_checkpoint(accelerator: Accelerator, run_dir: Path, progress: TrainingProgress, keep_last: int,
                    bases: dict[str, Any], save_more: Callable[[Path], None] | None = None) -> Path:
    """Save the training state atomically; every process must call this.

    Args:
        bases: the fingerprints of the base checkpoints (`train.fingerprints.base_fingerprints`), saved as
            `BASES_NAME`.
        save_more: called on every process with the unfinished folder after accelerate's state is in it,
            for state accelerate does not hold (the shards of a model the trainer sharded itself).
    """
    root = checkpoint_root(run_dir)
    final = root / f"{PREFIX}{progress.global_step:08d}"
    tmp = root / f".tmp-{final.name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if save_more is not None:
        save_more(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "progress.json").write_text(json.dumps(progress.state_dict(), indent=1))
        write_json(tmp / BASES_NAME, bases)
        shutil.copy2(run_dir / RESOLVED_CONFIG, tmp / RESOLVED_CONFIG)  # the config this state belongs to
        if final.exists():  # the same step saved again (an epoch end right after a periodic save)
            shutil.rmtree(final)
        tmp.rename(final)
        for old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def remove_stale_temporaries(run_dir: Path) -> None:
    """Drop half-written checkpoints left by a killed run."""
    root = checkpoint_root(run_dir)
    if root.is_dir():
        for tmp in root.glob(".tmp-*"):
            shutil.rmtree(tmp, ignore_errors=True)
