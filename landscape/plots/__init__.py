"""Plotly figures of the seven headline results, built from result stores only (never a model).

Every builder takes :class:`~landscape.store.StoreData` (what :func:`~landscape.store.read_store` returns)
and returns a ``plotly.graph_objects.Figure`` with axis labels in stated units, a legend, and a caption
below the plot computed from the stores' provenance: the model and its caveat, the NLL convention, the
calibration budget, the settings that define the numbers. Each ``reading_*`` function writes a short
paragraph from the same stored numbers (for ``figures/index.html``).

Conventions shared by all figures:

* **NLL**: token-mean negative log-likelihood, nats per scored token, over disjoint held-out windows
  (the convention is printed in every caption; numbers from different conventions are never mixed on one
  axis: a subset NLL is recomputed from the stored per-segment sums of the same windows).
* **Distances**: Euclidean norm over every weight of the quantized decoder linears (weight units), the
  units of ``||w_q - w0||`` and of the basin radius R(w0).
* **Intervals**: 95 % bootstrap over held-out segments (paired for differences), from the stored sums.

Modules: :mod:`~landscape.plots.common` (labels, colours, reading quantization tables, captions),
:mod:`~landscape.plots.quantization` (figures 1-3), :mod:`~landscape.plots.geometry` (figures 4-7),
:mod:`~landscape.plots.predictor` (the predictor study). Write the
figures with :func:`landscape.figio.write_figure` (offline HTML, optional PNG).
"""

from landscape.plots.common import (
    CAPTION_WIDTH,
    CORPUS_TITLES,
    DISTANCE_AXIS,
    LABEL_SIDE,
    METHOD_COLORS,
    METHOD_LABELS,
    NLL_AXIS,
    QUANTIZED_METHODS,
    PlotError,
    add_caption,
    caption_of,
    corpus_title,
    find_row,
    gap_interval,
    granularity_of,
    in_domain,
    merged_rows,
    model_of,
    model_sentence,
    nll_convention_sentence,
    num,
    quant_rows,
    require_kind,
    require_same_evaluation,
    subset_nll,
    table_convention,
    wrap,
)
from landscape.plots.geometry import (
    basin_summary,
    curvature,
    model_size,
    radial_profiles,
    reading_curvature,
    reading_model_size,
    reading_radial,
    reading_slices,
    size_points,
    slices,
)
from landscape.plots.predictor import predictor_cases_markdown, predictors, reading_predictors
from landscape.plots.quantization import (
    misalignment,
    model_size_mib,
    nll_vs_bits,
    pareto,
    pareto_front,
    reading_misalignment,
    reading_nll_vs_bits,
    reading_pareto,
)

__all__ = ['CAPTION_WIDTH', 'CORPUS_TITLES', 'DISTANCE_AXIS', 'LABEL_SIDE', 'METHOD_COLORS', 'METHOD_LABELS',
           'NLL_AXIS', 'PlotError', 'QUANTIZED_METHODS', 'add_caption', 'basin_summary', 'caption_of',
           'corpus_title', 'curvature', 'find_row', 'gap_interval', 'granularity_of', 'in_domain',
           'merged_rows', 'misalignment',
           'model_of', 'model_sentence', 'model_size', 'model_size_mib', 'nll_convention_sentence',
           'nll_vs_bits', 'num', 'pareto', 'pareto_front', 'predictor_cases_markdown', 'predictors',
           'quant_rows', 'radial_profiles', 'reading_predictors',
           'reading_curvature', 'reading_misalignment', 'reading_model_size', 'reading_nll_vs_bits',
           'reading_pareto', 'reading_radial', 'reading_slices', 'require_kind', 'require_same_evaluation',
           'size_points', 'slices', 'subset_nll', 'table_convention', 'wrap']
