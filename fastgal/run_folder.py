"""The run folder of `fastgal train`: named, checked before anything is claimed, made fresh or kept for --resume,
and a --resume's settings compared with the interrupted run's config.json.

    from fastgal.run_folder import check_out, prepare_out, check_resume, default_run_dir
    check_out(cfg, Path("runs/r1"))      # the refusals (a finished run without --overwrite, --resume of nothing, ...)

fastgal.run calls these, in this order, under the folder's lock (util.OutLock); `fastgal train --resume` in cli
reads CHECKPOINT and default_run_dir to say what it resumes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from fastgal.options import TrainConfig
from fastgal.util import check_writable, is_url

CHECKPOINT = "checkpoint.pth"
# config.json entries a --resume must not change: the TrainConfig fields but these, and what they resolved to
# (the preset is only where the values came from: the values it resolved to are compared)
NOT_SETTINGS = {"shards", "out", "overwrite", "resume", "quiet", "workers", "device", "preset"}
RESOLVED = ("crop", "targets", "precision", "loader_backend", "world_size", "n_train", "n_valid", "shards_sha256")


def default_run_dir(shards: Path) -> Path:
    # a URL's last path component, never its query (a signed token)
    name = str(shards).partition("?")[0].rstrip("/").rsplit("/", 1)[-1] if is_url(shards) else Path(shards).resolve().name
    return Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def check_out(cfg: TrainConfig, out: Path) -> None:
    """What prepare_out refuses, before the folder is claimed (so a refused command makes no folder)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a folder; pass a folder path for the run")
    prepare_out(cfg, out, check_only=True)


def prepare_out(cfg: TrainConfig, out: Path, check_only: bool = False) -> None:
    """A fresh run folder, or (--resume) the interrupted run's, left as it is. A folder whose run finished no
    epoch (a command that failed or was stopped before its first result) holds nothing to keep or resume:
    the same command, corrected, replaces it without --overwrite. check_only: the refusals, nothing changed."""
    check_writable(out, "choose another --out")  # before any work: not an OSError at the first epoch's end
    started = (out / "config.json").is_file()
    trained = (out / CHECKPOINT).is_file() or (out / "metrics.json").is_file()
    if cfg.resume:
        if cfg.overwrite:
            raise ValueError("--resume continues the run in --out and --overwrite replaces it: pass one of them")
        if (out / "metrics.json").is_file():
            raise ValueError(f"{out} holds a finished run, there is nothing to resume; pass --overwrite to train it again")
        if not started:
            raise ValueError(f"{out} holds no run to resume; drop --resume to start one")
        if not trained:
            raise ValueError(f"{out} holds a run that finished no epoch: there is nothing to resume; "
                             "run the same command without --resume")
        return
    if started and trained and not cfg.overwrite:
        raise ValueError(f"{out} already holds a run; pass --overwrite, --resume (to continue an interrupted one) "
                         "or choose another --out")
    if check_only:
        return
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("metrics.json", CHECKPOINT, "best.pth", "calibration.json"):  # a finished marker or an old state must not survive
        (out / stale).unlink(missing_ok=True)


def check_resume(out: Path, config: dict) -> None:
    """--resume: the settings must be the interrupted run's, or the result would be neither run."""
    old = json.loads((out / "config.json").read_text())
    fields = TrainConfig.__dataclass_fields__
    for k in [*(k for k in fields if k not in NOT_SETTINGS), *RESOLVED]:
        if k == "world_size" and old.get(k) is not None and old.get(k) != config.get(k):
            # another process count (a 2-node job requeued on 1 node) is another run: the global batch (bs x
            # processes), the permutation's deal to ranks, each rank's augmentation seed (seed + rank) and the steps
            # per epoch all follow from it, so the rest would be neither the interrupted run nor a fresh one
            was, now = old.get(k), config.get(k)
            raise ValueError(f"--resume: {out} was trained by {was} processes and this resume has {now}: the global "
                             f"batch ({was} x --bs {config.get('bs')}), each process's data and augmentation draws "
                             f"follow from it; resume with {was} processes (torchrun --nnodes N --nproc-per-node G, "
                             f"N x G = {was}), or train into a new --out")
        # a setting newer than the interrupted run's fastgal (e.g. --calib-pct) was its default there
        was = old.get(k, fields[k].default if k in fields else None)
        if was != config.get(k):
            raise ValueError(f"--resume: {out} was trained with {k} = {was!r}, not {config.get(k)!r}; "
                             "resume with the same settings, or train into a new --out")
