"""Speed and memory benchmarks of landscape (issue #8): ``make bench`` runs ``python -m bench.run --quick``.

One script per benchmark (``scan``, ``gptq``, ``hessian``, ``memory``, ``scaling``), each runnable alone as
``python -m bench.<name> --profile quick``; ``python -m bench.run`` runs them in fresh one-thread worker
processes and writes ``bench/RESULTS.md`` and ``bench/results.json``.
"""
