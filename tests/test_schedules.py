"""zoo.train.schedules.warmup_cosine: the one warmup + cosine shape, both warmup starts, and its three callers."""
import math

import pytest

from byol import lr_schedule
from lm.modules.optim import lr_at
from zoo.eval.linear import cosine_factor
from zoo.train.schedules import warmup_cosine


def test_warmup_starts_and_cosine_shape():
    # "zero": step 0 has lr 0, the peak is reached at step == warmup (BYOL)
    assert [warmup_cosine(s, 10, 4, 2.0) for s in range(5)] == [0.0, 0.5, 1.0, 1.5, 2.0]
    # "one": the first step already moves, the last warmup step reaches the peak (LM)
    assert [warmup_cosine(s, 10, 4, 2.0, warmup_start="one") for s in range(4)] == [0.5, 1.0, 1.5, 2.0]
    # cosine from peak to final over [warmup, total), final from then on
    assert warmup_cosine(7, 10, 4, 2.0, final=0.5) == pytest.approx(0.5 + 1.5 * 0.5 * (1 + math.cos(math.pi * 3 / 6)))
    assert warmup_cosine(10, 10, 4, 2.0, final=0.5) == warmup_cosine(99, 10, 4, 2.0, final=0.5) == 0.5
    assert warmup_cosine(6, 10, 4, 3.0, final=3.0) == 3.0  # final == peak: warmup then constant (SimSiam predictor)
    with pytest.raises(ValueError, match="warmup_start"):
        warmup_cosine(0, 10, 2, warmup_start="first")


def test_callers_are_the_one_schedule_with_their_conventions():
    for s in range(0, 130):
        assert lr_schedule(s, 120, 10, 3.2) == warmup_cosine(s, 120, 10, 3.2)
        assert lr_at(s, 1.0, 10, 110, 0.1) == warmup_cosine(s, 110, 10, 1.0, final=0.1, warmup_start="one")
        assert cosine_factor(s, 120) == warmup_cosine(s, 120)
        # the probe's old closed form, to the last bits that matter
        assert cosine_factor(s, 120) == pytest.approx(0.5 * (1 + math.cos(math.pi * min(s, 120) / 120)), abs=1e-15)
