"""The analysis scripts behind ``make figures``: one script per headline figure, the study scripts, and
``run_all``, each run as ``python -m analyses.NAME`` (``--help`` lists its settings).

Each script is a short composition of library calls: it measures into HDF5 stores under ``<out>/data``
(skipping every store that already exists), then builds its figure from the stores only
(:mod:`landscape.plots`) and writes ``<out>/<figure>.html`` (and a PNG when a static exporter is available).
What they share, in three floors: :mod:`analyses.profiles` (the sizes of the ``--quick``, ``--full`` and
``--tiny`` protocols), :mod:`analyses.session` (store paths, models, data, publishing, arguments) and
:mod:`analyses.plan` (costs, the measurement steps that several figures share, executing what the stores
lack). No figure script imports another.
"""
