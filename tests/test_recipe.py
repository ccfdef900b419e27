"""``Recipe.validate``: components that cannot work together fail before round 1."""

from __future__ import annotations

import pytest
from torch import nn

from fedtransfer import CompatibilityError, Recipe


def test_recipe_validate_rejects_codec_that_changes_model_dtype():
    with pytest.raises(CompatibilityError, match=r"dtype torch\.float64"):
        Recipe().validate(nn.Linear(2, 2).double())
