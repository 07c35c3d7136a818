"""Fixtures of the interpretability tests: one CPU thread, and each tiny model beside its TransformerLens twin
(interp_reference.py)."""

from __future__ import annotations

import pytest
import torch

from interp_reference import CONFIGS, VOCAB, hooked_transformer, random_model
from lmforge.model.transformer import Transformer


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: one thread is faster than several (and does not spin against other jobs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request: pytest.FixtureRequest) -> tuple[Transformer, object]:
    """(lmforge model, HookedTransformer with its weights), for each architecture."""
    model = random_model(CONFIGS[request.param])
    return model, hooked_transformer(model)


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
