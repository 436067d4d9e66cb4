"""What both peer comparisons share: the SmolLM2 problem they run on and the paired NLL difference they
report. Imports only landscape, so each peer's own environment can use it."""

from __future__ import annotations

from landscape.data import TokenSet, calibration_set, heldout_set
from landscape.models import LoadedModel, load_model
from landscape.objectives import NLLResult
from landscape.stats import difference_interval

MODEL = "smollm2-135m"
CALIBRATION = (128, 256)  # sequences x tokens, seed 0: the study's calibration budget
HELDOUT = (16, 256)  # wiki held-out windows x tokens


def smollm2_problem() -> tuple[LoadedModel, TokenSet, TokenSet]:
    """SmolLM2-135M, its 128 x 256 calibration sequences (seed 0) and 16 x 256 held-out wiki tokens."""
    lm = load_model(MODEL)
    calib = calibration_set(lm.tokenizer, CALIBRATION[0], CALIBRATION[1], 0,
                            context_length=lm.info.context_length)
    held = heldout_set(lm.tokenizer, HELDOUT[1], "wiki", HELDOUT[0], context_length=lm.info.context_length)
    return lm, calib, held


def interval(a: NLLResult, b: NLLResult) -> dict:
    """``NLL(b) - NLL(a)`` with its paired 95 % bootstrap interval (:func:`difference_interval`'s B - A)."""
    gap = difference_interval(a.segment_nll_sum, a.segment_tokens, b.segment_nll_sum, b.segment_tokens,
                              paired=True)
    return {"value": gap.value, "low": gap.low, "high": gap.high}
