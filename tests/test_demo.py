"""The demo pipeline end to end on the `tiny` recipe: every stage leaves a loadable artifact."""

import json

import pytest
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

from edsd_hf.cli import main
from edsd_hf.edsd import EdsdDraftModel


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory):
    cache_dir = tmp_path_factory.mktemp("demo")
    arguments = [
        "demo", "--cache-dir", str(cache_dir),
        "--target-size", "tiny", "--draft-lm-size", "tiny",
        "--draft-rows", "24", "--draft-steps", "2", "--draft-batch-size", "4", "--draft-vocab-size", "256",
        "--regenerate-tokens", "6", "--max-prompts", "2", "--prompt-lines", "2", "--max-new-tokens", "8", "--repeats", "1",
    ]
    assert main(arguments) == 0
    return cache_dir, arguments


def test_demo_writes_loadable_models(demo_cache):
    cache_dir, _ = demo_cache
    target_dir = cache_dir / "targets" / "tiny-seed0"
    assert isinstance(AutoModelForCausalLM.from_pretrained(target_dir), object)
    assert AutoTokenizer.from_pretrained(target_dir).eos_token == "<|endoftext|>"
    for name in ("edsd", "eagle3"):
        draft = AutoModel.from_pretrained(cache_dir / "drafts" / "tiny-seed0" / name)
        assert isinstance(draft, EdsdDraftModel)
        assert (cache_dir / "drafts" / "tiny-seed0" / name / "README.md").is_file()
    assert AutoModel.from_pretrained(cache_dir / "drafts" / "tiny-seed0" / "eagle3").config.fusion == "concat"


def test_demo_report_is_well_formed(demo_cache):
    cache_dir, _ = demo_cache
    report_dir = cache_dir / "bench" / "tiny-seed0"
    report = json.loads((report_dir / "bench.json").read_text())
    assert (report_dir / "bench.png").stat().st_size > 0

    methods = {row["method"] for row in report["overall"]}
    assert methods == {"plain", "stock-draft-lm", "prompt-lookup", "eagle3-style", "edsd"}
    for row in report["overall"]:
        assert row["tau"] >= 1.0
        assert row["tokens_per_second"] > 0
        if row["temperature"] == 0.0:
            assert tuple(row["identical_to_plain"]) == (2, 2), row["method"]
    assert report["metadata"]["num_prompts"] == 2


def test_demo_reuses_cached_artifacts(demo_cache):
    cache_dir, arguments = demo_cache
    draft_weights = cache_dir / "drafts" / "tiny-seed0" / "edsd" / "model.safetensors"
    target_weights = cache_dir / "targets" / "tiny-seed0" / "model.safetensors"
    before = (draft_weights.stat().st_mtime_ns, target_weights.stat().st_mtime_ns)
    assert main(arguments) == 0
    assert (draft_weights.stat().st_mtime_ns, target_weights.stat().st_mtime_ns) == before
