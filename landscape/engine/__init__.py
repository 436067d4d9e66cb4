"""The perturbation engine: directions around w0 (:mod:`~landscape.engine.directions`), objectives measured
at ``w0 + a u (+ b v)`` in place (:mod:`~landscape.engine.perturb`), the basin radius R(w0)
(:mod:`~landscape.engine.basin`), and how a sweep runs: its store, resume and shard
(:mod:`~landscape.engine.sweep`)."""
