"""A curvature result as it sits in a curvature store, read back as the :class:`~landscape.store.StoreRecord`
its ``to_record()`` wrote: the inverse of :func:`landscape.store.run_tasks` for one task.

A curvature store (written by :func:`~landscape.store.run_tasks`: ``landscape spectrum``, figure 6, the
curvature study) has one point per task; a task's arrays are at ``<task>/<name>`` and its JSON attributes (the
record's provenance) at ``<task>/attrs``. The tasks are named ``spectrum``, ``trace``, ``density`` and
``path/<label>``.
"""

from __future__ import annotations

import json
import os
from typing import ClassVar

from landscape.curvature.space import CurvatureError
from landscape.store import StoreData, StoreRecord, read_store

ATTRS = "attrs"  # the array holding a task's JSON attributes


def store_data(source: str | os.PathLike | StoreData) -> StoreData:
    """A store's contents: ``source`` itself, or the store read at that path."""
    return source if isinstance(source, StoreData) else read_store(source)


def has_task(data: StoreData, task: str) -> bool:
    """Whether the store holds a finished task of that name (its attributes were written last)."""
    return f"{task}/{ATTRS}" in data.arrays


def task_record(data: StoreData, task: str, kind: str) -> StoreRecord:
    """The record task ``task`` stored: its decoded JSON attributes as provenance, its arrays without the
    ``<task>/`` prefix.

    Raises:
        CurvatureError: no such task, or one whose attributes say it holds another ``kind`` of result.
    """
    if not has_task(data, task):
        tasks = sorted(name[: -len(ATTRS) - 1] for name in data.arrays if name.endswith(f"/{ATTRS}"))
        raise CurvatureError(f"the store has no curvature task {task!r} (its tasks: {tasks})")
    try:
        provenance = json.loads(str(data.arrays[f"{task}/{ATTRS}"]))
    except ValueError:
        provenance = None
    if not isinstance(provenance, dict):
        raise CurvatureError(f"the store is damaged: task {task!r}'s attributes ({task}/{ATTRS}) are not a "
                             f"JSON object; recompute the store")
    if provenance.get("kind") != kind:
        raise CurvatureError(f"task {task!r} holds a {provenance.get('kind')!r} result, not a {kind!r} one")
    prefix = f"{task}/"
    arrays = {name[len(prefix):]: array for name, array in data.arrays.items()
              if name.startswith(prefix) and name != f"{task}/{ATTRS}"}
    return StoreRecord(provenance, arrays=arrays)


class StoredTask:
    """``from_data`` and ``from_store`` of a result stored as one task of a curvature store: a result type
    names the ``KIND`` its attributes carry and its usual ``TASK`` (``None``: the task must be named, e.g.
    ``path/<label>``), and defines ``from_record``."""

    KIND: ClassVar[str]
    TASK: ClassVar[str | None] = None

    @classmethod
    def from_data(cls, data: StoreData, task: str | None = None):
        """The result stored as task ``task`` (default :attr:`TASK`) of a curvature store's contents."""
        if task is None and cls.TASK is None:
            raise CurvatureError(f"name the task of the {cls.KIND} result to read (e.g. 'path/<label>')")
        return cls.from_record(task_record(data, task or cls.TASK, cls.KIND))

    @classmethod
    def from_store(cls, path: str | os.PathLike, task: str | None = None):
        """The result stored as task ``task`` (default :attr:`TASK`) of the curvature store at ``path``."""
        return cls.from_data(store_data(path), task)
