"""Where fit's jobs run: each (fold, head) in this process (``cv.run_local``), or as Ray tasks (``RayFolds``).

``fit --engine ray`` sends every (fold, head) job of every seed, and of each encoder's store with
several encoders, as a Ray task to the cluster ``embed --engine ray`` uses. A task gets plain data
(the run folder, the encoder, the training images and labels, its fold's images and seed), reads
its bags from the store itself (slide by slide, as a streamed fit does: ``models.heads.stored``),
fits the head, saves it in the head's own files under ``run/.fit-ray-<id>/`` and returns its
outputs on the evaluated bags; the driver loads each head back and places the outputs exactly as
the local loop does. The run folder must therefore be on storage every node sees. Same rows, same
arithmetic, same seeds: the out-of-fold file, metrics and models are the local engine's.

Scale fusion ``concat`` and encoder fusion ``concat`` build their rows in the driver, not in a
store, so they are fitted with ``--engine local``.
"""

from __future__ import annotations

import contextlib
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from histoembed.core import cpus, feature_store, memory
from histoembed.core.config import FitSettings
from histoembed.core.errors import UserError
from histoembed.core.feature_store import bags as slides
from histoembed.inputs import patch_flags
from histoembed.models.heads import Bags
from histoembed.models.heads import get as get_head
from histoembed.models.heads import stored
from histoembed.stages.fit.cv import FoldJob, fit_one, run_local, select_fold


@dataclass
class FoldTask:
    """What one Ray task needs, as plain data."""

    run: str
    encoder: str | None
    settings: dict          # FitSettings.model_dump()
    image_ids: list[str]    # the training images, in the fit's order
    y: np.ndarray
    classes: list[str]
    width: int
    job: FoldJob
    out: str                # folder the fitted head is saved in


_SOURCES: dict[tuple, Bags] = {}   # per worker process: the bags of the last store read


def task_bags(task: FoldTask, settings: FitSettings) -> Bags:
    """The training bags of the task's store, read slide by slide (once per worker process and store)."""
    store_dir = feature_store.find_feature_store(Path(task.run), task.encoder)
    key = (str(store_dir), tuple(task.image_ids), tuple(settings.keep_artifacts))
    if key not in _SOURCES:
        _SOURCES.clear()
        left_out, _ = patch_flags.left_out_crops(task.run, "train", settings.keep_artifacts)
        source = stored.open_source(slides.slide_index(store_dir, "train"), task.image_ids,
                                    memory.memory_budget(settings.memory_gb), left_out)
        source.scan()   # the driver checked the store already
        _SOURCES[key] = source.bags()
    return _SOURCES[key]


def fold_task(task: FoldTask) -> dict:
    """One (fold, head) in a Ray task: fitted, saved under ``task.out``; its outputs and fitted info returned."""
    settings = FitSettings.model_validate(task.settings)
    cpus.use_threads(settings.threads)
    memory.return_large_blocks()
    bags = task_bags(task, settings)
    head, outputs = fit_one(select_fold(bags, task.job), np.asarray(task.y), settings, task.width, task.job)
    head.save(Path(task.out), task.classes)
    return {"outputs": np.asarray(outputs), "info": head.fitted_info()}


class RayFolds:
    """``fit_heads``' runner for ``fit --engine ray``: the jobs as Ray tasks, results in the jobs' order."""

    def __init__(self, run: Path, encoder: str | None, settings: FitSettings, image_ids: list[str],
                 classes: list[str]):
        if settings.scale_fusion != "crops" or (settings.encoder_fusion == "concat" and encoder and "," in encoder):
            raise UserError("fit --engine ray reads each task's bags from one store: scale fusion concat and "
                            "encoder fusion concat are built in this process", hint="use --engine local for them")
        self.run, self.encoder, self.settings = Path(run), encoder, settings
        self.image_ids, self.classes = list(image_ids), list(classes)

    def for_encoder(self, encoder: str) -> RayFolds:
        """The same runner on another encoder's store (``fit --encoder A,B``)."""
        return RayFolds(self.run, encoder, self.settings, self.image_ids, self.classes)

    def __call__(self, bags: Bags, y: np.ndarray, settings: FitSettings, width: int, jobs: list[FoldJob]):
        from histoembed import engines

        ray = engines.pick("ray")
        work = self.run / f".fit-ray-{uuid.uuid4().hex[:12]}"
        tasks = [FoldTask(str(self.run.resolve()), self.encoder, settings.model_dump(mode="json"), self.image_ids,
                          np.asarray(y), self.classes, width, job, str((work / f"{i:05d}-{job.head}").resolve()))
                 for i, job in enumerate(jobs)]
        try:
            with ray.map_ordered(fold_task, tasks, workers=0) as results:
                for task, result in zip(tasks, results):
                    head = get_head(task.job.head).load(Path(task.out))
                    # The task's fitted info (stopping NLL, epochs), which the head's files need not all hold.
                    head.fitted_info = lambda info=result["info"]: info
                    yield head, result["outputs"]
        finally:
            shutil.rmtree(work, ignore_errors=True)


def session(settings: FitSettings):
    """The Ray connection of ``fit --engine ray`` (nothing for the local engine)."""
    if settings.engine != "ray":
        return contextlib.nullcontext()
    from histoembed import engines

    return engines.pick("ray").session(settings.ray_address)


def runner_for(run: Path, encoder: str | None, settings: FitSettings, image_ids: list[str], classes: list[str]):
    """``fit_heads``' runner for ``settings.engine``."""
    return RayFolds(run, encoder, settings, image_ids, classes) if settings.engine == "ray" else run_local
