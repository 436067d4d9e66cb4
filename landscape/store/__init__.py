"""HDF5 result stores: one file per run, every finished point kept, provenance in JSON attributes.

A store holds a grid of *points* (``grid_shape``, e.g. the ``(21,)`` coefficients of a 1-D scan, the
``(21, 21)`` of a 2-D one, or the ``(16,)`` directions of a basin-radius run). Each point array
(declared at creation as ``name -> (point_shape, dtype)``) is a dataset of shape
``grid_shape + point_shape``, keyed by name; a ``/`` in a name makes groups, so per-layer values live
at ``layer_mse/<layer name>``. A boolean ``done`` dataset marks finished points. Small finished
results go in with :meth:`ResultStore.write_array` and :meth:`ResultStore.write_table`.

Layout and guarantees (see FIELD_NOTES.md on HDF5):

* While running, the file is ``<path>.partial``; it appears only once its empty layout is written and
  closed (it is created under a temporary name and renamed), and every :meth:`~ResultStore.write_point`
  writes the values, then the done flag, then flushes, so a run killed at any instant keeps every
  finished point and resumes where it stopped. :meth:`~ResultStore.finish` moves the file to ``<path>``
  atomically (``os.replace``): a reader of ``<path>`` never sees a half-written run, and reading a run
  that has not finished (only the partial file exists, or its writer holds the file) raises
  :class:`StoreInProgressError`.
* An output location that cannot be written, or an existing store without ``resume``, is refused by
  :func:`check_store_path` before any work (entry points call it first).
* Root attributes: ``landscape_store`` (format version), ``grid_shape``, ``point_arrays`` (JSON list of
  names) and ``provenance`` (one JSON object: model and its weights fingerprint, data hash, NLL
  convention, direction specs, code version, creation date...).
  Resuming a store whose provenance, grid or arrays differ from the run's raises
  :class:`StoreMismatchError` naming every differing key, before any work starts; an unreadable,
  truncated or foreign file raises :class:`StoreError`.
* Float point arrays start as NaN, integer ones as 0, booleans as False; trust ``done``, not the values.
"""

from landscape.store.files import (
    RUN_SPECIFIC_KEYS,
    MemoryStore,
    ResultStore,
    check_store_path,
    code_version,
    finish_run,
    interrupted_runs,
    normalize_provenance,
    start_run,
)
from landscape.store.hdf5 import (
    DONE,
    PARTIAL_SUFFIX,
    STORE_FORMAT_VERSION,
    ArraySpec,
    StoreData,
    StoreError,
    StoreInProgressError,
    StoreMismatchError,
    StoreWriteError,
    partial_path,
    read_store,
)
from landscape.store.records import (
    StoreRecord,
    merge_stores,
    model_provenance,
    provenance,
    run_tasks,
    with_shard,
    write_record,
)

__all__ = ["DONE", "PARTIAL_SUFFIX", "RUN_SPECIFIC_KEYS", "STORE_FORMAT_VERSION", "ArraySpec", "MemoryStore",
           "ResultStore", "StoreData", "StoreError", "StoreInProgressError", "StoreMismatchError",
           "StoreRecord", "StoreWriteError", "check_store_path", "code_version", "finish_run",
           "interrupted_runs", "merge_stores", "model_provenance", "normalize_provenance", "partial_path",
           "provenance", "read_store", "run_tasks", "start_run", "with_shard", "write_record"]
