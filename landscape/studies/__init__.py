"""The studies, each a composition of the floors below: the methods x formats table
(:mod:`~landscape.studies.quant_table`), the displacement comparison (:mod:`~landscape.studies.compare`, its
result in :mod:`~landscape.studies.comparison`), the misalignment candidates
(:mod:`~landscape.studies.candidates`) and their rank correlations
(:mod:`~landscape.studies.misalignment`), and the PTQ-difficulty predictor
(:mod:`~landscape.studies.predict`)."""
