"""Tests of the stdlib corpus, the BPE tokenizer and the `tiny` target-training recipe."""

import argparse
import json
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from edsd_hf.recipes.cli import add_subcommands, format_report_summary
from edsd_hf.recipes.corpus import (
    EOS_TOKEN,
    build_lm_blocks,
    collect_stdlib_files,
    read_source,
    stdlib_root,
    train_tokenizer,
)
from edsd_hf.recipes.target import (
    COMPLETE_MARKER_FILE,
    REPORT_FILE,
    TARGET_SIZES,
    evaluate_checkpoint,
    is_complete_checkpoint,
    learning_rate_at,
    load_or_train_target,
    read_report,
    train_target,
)

TEST_DIR_NAMES = {"test", "tests", "idle_test", "site-packages"}


@pytest.fixture
def single_thread():
    # The tiny model runs faster on one thread, and two OpenMP threads stall when another process
    # occupies a core of a 2-core machine.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(collect_stdlib_files("train", max_files=8), vocab_size=400, output_dir=output_dir)
    return output_dir


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """Train `tiny` twice with seed 0: once through the cache and once into a separate directory."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cache_dir = tmp_path_factory.mktemp("cache")
        cached = load_or_train_target("tiny", cache_dir, seed=0)
        repeat = train_target("tiny", tmp_path_factory.mktemp("repeat"), seed=0)
    finally:
        torch.set_num_threads(previous)
    return {"cache_dir": cache_dir, "cached": cached, "repeat": repeat}


# ----------------------------------------------------------------------------------------------------
# Corpus


def relative_paths(files):
    root = stdlib_root()
    return [path.relative_to(root) for path in files]


def test_corpus_excludes_test_suites():
    for split in ("train", "heldout"):
        for relative_path in relative_paths(collect_stdlib_files(split)):
            assert not TEST_DIR_NAMES & set(relative_path.parts[:-1]), relative_path
            assert not relative_path.name.startswith("test_"), relative_path
            assert relative_path.suffix == ".py", relative_path


def test_corpus_contains_library_modules():
    all_paths = {path.as_posix() for split in ("train", "heldout") for path in relative_paths(collect_stdlib_files(split))}
    assert len(all_paths) > 100
    assert "json/decoder.py" in all_paths
    assert "collections/__init__.py" in all_paths


def test_corpus_excludes_generated_codec_tables():
    all_paths = {path.as_posix() for split in ("train", "heldout") for path in relative_paths(collect_stdlib_files(split))}
    assert "encodings/cp1252.py" not in all_paths
    assert "encodings/utf_8.py" in all_paths


def test_heldout_files_never_in_train():
    train = set(collect_stdlib_files("train"))
    heldout = set(collect_stdlib_files("heldout"))
    assert heldout
    assert not train & heldout
    heldout_fraction = len(heldout) / (len(train) + len(heldout))
    assert 0.005 < heldout_fraction < 0.05, heldout_fraction


def test_collection_order_is_deterministic():
    first = collect_stdlib_files("train")
    second = collect_stdlib_files("train")
    assert first == second
    assert relative_paths(first) == sorted(relative_paths(first), key=lambda path: path.as_posix())


def test_max_files_takes_spread_subset():
    all_files = collect_stdlib_files("train")
    subset = collect_stdlib_files("train", max_files=10)
    assert len(subset) == 10
    assert set(subset) <= set(all_files)
    # An evenly spaced subset reaches the second half of the sorted list.
    assert all_files.index(subset[-1]) > len(all_files) // 2


@pytest.mark.parametrize("kwargs", [{"split": "validation"}, {"max_files": 0}])
def test_collect_rejects_invalid_arguments(kwargs):
    with pytest.raises(ValueError):
        collect_stdlib_files(**kwargs)


# ----------------------------------------------------------------------------------------------------
# Tokenizer and blocks


def test_tokenizer_round_trips_text(tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    texts = [
        read_source(collect_stdlib_files("heldout")[0]),
        "def f(x):\n\treturn x  # naïve ünïcode, emoji \U0001f600 and trailing spaces   \n",
        "",
    ]
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text


def test_tokenizer_loads_offline_with_eos(tokenizer_dir):
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert len(tokenizer) == 400
    assert tokenizer.eos_token == EOS_TOKEN
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    assert tokenizer.bos_token_id == tokenizer.eos_token_id
    # Plain encoding adds no special tokens, so prompts stay exactly as written.
    assert tokenizer.eos_token_id not in tokenizer("import os\n")["input_ids"]


def test_tokenizer_rejects_too_small_vocab(tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(collect_stdlib_files("train", max_files=2), vocab_size=100, output_dir=tmp_path)


def test_lm_blocks_shape_and_separators(tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    files = collect_stdlib_files("heldout", max_files=3)
    blocks = build_lm_blocks(files, tokenizer, block_size=32, max_tokens=1000)
    assert blocks.dtype == torch.long
    assert blocks.shape == (1000 // 32, 32)
    # Every document starts with EOS, so the stream starts with it.
    assert blocks[0, 0].item() == tokenizer.eos_token_id


def test_lm_blocks_reject_short_corpus(tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    files = collect_stdlib_files("heldout", max_files=1)
    with pytest.raises(ValueError, match="fewer than one block"):
        build_lm_blocks(files, tokenizer, block_size=64, max_tokens=10)


# ----------------------------------------------------------------------------------------------------
# Training recipe


def test_learning_rate_schedule():
    size = TARGET_SIZES["small"]
    warmup_end = (size.warmup_steps - 1) / size.max_steps
    assert learning_rate_at(0.0, size) == pytest.approx(size.learning_rate / size.warmup_steps)
    assert learning_rate_at(warmup_end, size) == pytest.approx(size.learning_rate)
    assert learning_rate_at(0.5, size) < size.learning_rate
    assert learning_rate_at(1.0, size) == pytest.approx(size.learning_rate * size.min_lr_ratio)


def test_learning_rate_rises_then_falls():
    size = TARGET_SIZES["small"]
    rates = [learning_rate_at(step / size.max_steps, size) for step in range(size.max_steps + 1)]
    peak_step = rates.index(max(rates))
    assert peak_step in (size.warmup_steps - 1, size.warmup_steps)
    assert all(a <= b for a, b in zip(rates[:peak_step], rates[1 : peak_step + 1]))
    assert all(a >= b for a, b in zip(rates[peak_step:], rates[peak_step + 1 :]))


def test_tiny_checkpoint_loads_with_auto_classes(tiny_runs):
    checkpoint_dir = tiny_runs["cached"]
    assert (checkpoint_dir / "model.safetensors").is_file()
    model = AutoModelForCausalLM.from_pretrained(checkpoint_dir)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint_dir)
    assert model.config.model_type == "llama"
    assert model.config.vocab_size == len(tokenizer)

    input_ids = tokenizer("import os\n", return_tensors="pt")["input_ids"]
    output_ids = model.generate(input_ids, max_new_tokens=4, do_sample=False)
    assert output_ids.shape == (1, input_ids.shape[1] + 4)


def test_tiny_report_fields(tiny_runs):
    report = read_report(tiny_runs["cached"])
    assert report["size"] == "tiny"
    assert report["training"]["steps"] == TARGET_SIZES["tiny"].max_steps
    assert report["training"]["stopped_by"] == "steps"
    heldout = report["heldout"]
    assert heldout["tokens"] > 0
    assert heldout["loss_nats_per_token"] > 0
    assert 0.0 <= heldout["top1_accuracy"] <= 1.0
    entropy = heldout["entropy_nats"]
    assert entropy["p10"] <= entropy["p25"] <= entropy["median"] <= entropy["p75"] <= entropy["p90"]
    assert len(report["samples"]) >= 1
    assert all(isinstance(sample["completion"], str) for sample in report["samples"])
    assert "held-out loss" in format_report_summary(report)


def test_tiny_training_lowers_loss(tiny_runs):
    report = read_report(tiny_runs["cached"])
    curve = [loss for _, loss in report["training"]["train_loss_curve"]]
    first, last = sum(curve[:5]) / 5, sum(curve[-5:]) / 5
    assert last < first - 0.3, (first, last)
    # Better than a uniform guess over the vocabulary.
    uniform_loss = torch.log(torch.tensor(float(report["corpus"]["vocab_size"]))).item()
    assert report["heldout"]["loss_nats_per_token"] < uniform_loss - 0.3


def test_tiny_training_is_deterministic(tiny_runs):
    cached = load_file(tiny_runs["cached"] / "model.safetensors")
    repeat = load_file(tiny_runs["repeat"] / "model.safetensors")
    assert cached.keys() == repeat.keys()
    for name in cached:
        assert torch.equal(cached[name], repeat[name]), name


def test_load_or_train_reuses_finished_run(tiny_runs):
    weights_path = tiny_runs["cached"] / "model.safetensors"
    modified_before = weights_path.stat().st_mtime_ns
    reused = load_or_train_target("tiny", tiny_runs["cache_dir"], seed=0)
    assert reused == tiny_runs["cached"]
    assert weights_path.stat().st_mtime_ns == modified_before
    marker = json.loads((reused / COMPLETE_MARKER_FILE).read_text())
    assert marker["seed"] == 0
    assert (reused / REPORT_FILE).is_file()


def test_evaluate_checkpoint_on_heldout(tiny_runs, single_thread):
    metrics = evaluate_checkpoint(tiny_runs["cached"], max_heldout_tokens=2048, batch_size=8)
    block_size = TARGET_SIZES["tiny"].block_size
    assert metrics["tokens"] == (2048 // block_size) * (block_size - 1)
    assert 0 < metrics["loss_nats_per_token"] < 10
    assert metrics["entropy_nats"]["p25"] <= metrics["entropy_nats"]["median"]


def test_draft_lm_shares_tokenizer(tiny_runs, tmp_path, single_thread):
    # A tiny-shaped run that reuses the cached target's tokenizer, as draft-lm does with a real target.
    draft_dir = train_target("tiny", tmp_path / "draft", tokenizer_dir=tiny_runs["cached"])
    target_tokenizer = AutoTokenizer.from_pretrained(tiny_runs["cached"])
    draft_tokenizer = AutoTokenizer.from_pretrained(draft_dir)
    assert draft_tokenizer.get_vocab() == target_tokenizer.get_vocab()


def test_load_or_train_rejects_other_vocabulary(tiny_runs, tokenizer_dir, tmp_path):
    # The 400-entry test tokenizer differs from the 512-entry vocabulary the tiny run was trained with.
    assert is_complete_checkpoint(tiny_runs["cached"], TARGET_SIZES["tiny"], seed=0, tokenizer_dir=tiny_runs["cached"])
    assert not is_complete_checkpoint(tiny_runs["cached"], TARGET_SIZES["tiny"], seed=0, tokenizer_dir=tokenizer_dir)
    assert not is_complete_checkpoint(tiny_runs["cached"], TARGET_SIZES["tiny"], seed=1)
    assert not is_complete_checkpoint(tmp_path, TARGET_SIZES["tiny"], seed=0)


def test_cli_parses_train_target_options():
    parser = argparse.ArgumentParser()
    add_subcommands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["train-target", "--size", "draft-lm", "--output", "out", "--seed", "3", "--max-minutes", "2.5", "--tokenizer", "tok"]
    )
    assert args.size == "draft-lm"
    assert args.seed == 3
    assert args.max_minutes == 2.5
    assert args.tokenizer == "tok"
    assert callable(args.func)


def test_unknown_size_raises(tmp_path):
    with pytest.raises(ValueError, match="Unknown target size"):
        train_target("huge", tmp_path)
