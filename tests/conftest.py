"""Shared test set-up: no test may reach the network, and every run is deterministic."""

import os

# Set before transformers or huggingface_hub are imported anywhere in the session.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def trained_llama_pair():
    """A tiny Llama target and an EDSD draft distilled on it briefly, shared by the tests that need
    accepted draft tokens (training it takes the longest part of the generation tests)."""
    from tiny_models import distill_draft, make_draft, make_target

    target = make_target("llama")
    draft = distill_draft(target, make_draft(target), num_steps=250)
    return target, draft
