"""The analysis scripts behind ``make figures``: one script per headline figure, and ``run_all.py``.

Each script is a short composition of library calls: it measures into HDF5 stores under
``<out>/data`` (skipping every store that already exists), then builds its figure from the stores only
(:mod:`landscape.plots`) and writes ``<out>/<figure>.html`` (and a PNG when a static exporter is
available). Profiles of sizes (``--quick``, ``--full``, ``--tiny``) live in :mod:`analyses.common`.
"""
