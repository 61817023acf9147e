"""refqwen.evaluate.agreement with a reference scored once (ScoredReference) equals agreement with the model."""

import numpy as np
import pytest

import refqwen
from refqwen.errors import RefqwenError
from refqwen.evaluate import agreement, score_reference


def test_a_scored_reference_gives_the_same_agreement():
    reference, candidate = refqwen.tiny_model(seed=0), refqwen.tiny_model(seed=1)
    ids = np.random.default_rng(0).integers(0, 128, 90)
    scored = score_reference(reference, ids, window=32, stride=16, progress=False)
    for other in (candidate, reference):
        assert agreement(scored, other, ids, window=32, stride=16, progress=False) == \
            agreement(reference, other, ids, window=32, stride=16, progress=False)
    assert agreement(scored, reference, ids, window=32, stride=16, progress=False).mean_kl == 0


@pytest.mark.parametrize("change", ["ids", "window", "stride"])
def test_a_scored_reference_refuses_other_ids_window_or_stride(change):
    model = refqwen.tiny_model()
    ids = np.random.default_rng(0).integers(0, 128, 60)
    scored = score_reference(model, ids, window=32, stride=16, progress=False)
    other = {"ids": dict(text_or_ids=ids[:-1]), "window": dict(window=24), "stride": dict(stride=8)}[change]
    args = {**dict(text_or_ids=ids, window=32, stride=16), **other}
    with pytest.raises(RefqwenError, match="the reference was scored on 60 ids with window 32 and stride 16"):
        agreement(scored, model, progress=False, **args)
