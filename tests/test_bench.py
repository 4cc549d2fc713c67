import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from edsd_hf.bench import BenchMethod, count_forward_passes, format_table, load_prompts, run_benchmark, save_report

from tiny_models import make_char_tokenizer


def test_load_prompts_formats(tmp_path):
    spec_bench = tmp_path / "questions.jsonl"
    spec_bench.write_text(
        json.dumps({"question_id": 81, "category": "writing", "turns": ["first turn", "second turn"]}) + "\n"
        + json.dumps({"question_id": 82, "category": "math", "turns": ["two plus two"]}) + "\n"
    )
    prompts = load_prompts(spec_bench)
    assert [(p.prompt_id, p.category, p.text) for p in prompts] == [("81", "writing", "first turn"), ("82", "math", "two plus two")]

    plain = tmp_path / "prompts.txt"
    plain.write_text("def main():\n\nimport os\n")
    assert [p.text for p in load_prompts(plain)] == ["def main():", "import os"]
    assert len(load_prompts(spec_bench, max_prompts=1)) == 1


def test_load_prompts_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_prompts(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "no known field"}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl:1 has none of the fields"):
        load_prompts(bad)


def test_shared_spec_bench_file_loads():
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "shared" / "data" / "spec_bench_questions.jsonl"
    if not path.exists():
        pytest.skip("Spec-Bench questions are not next to this checkout")
    prompts = load_prompts(path)
    assert len(prompts) == 480
    assert len({p.category for p in prompts}) == 13


def test_count_forward_passes():
    model = torch.nn.Linear(2, 2)
    with count_forward_passes(model) as counter:
        model(torch.zeros(1, 2))
        model(torch.zeros(1, 2))
    assert counter[0] == 2


def test_benchmark_report(trained_llama_pair, tmp_path):
    target, draft = trained_llama_pair
    tokenizer = make_char_tokenizer()
    assistant = LlamaForCausalLM(LlamaConfig(**{**target.config.to_dict(), "num_hidden_layers": 1})).eval()
    methods = [
        BenchMethod("plain", "plain"),
        BenchMethod("stock-assisted", "assisted", assistant),
        BenchMethod("prompt-lookup", "prompt_lookup"),
        BenchMethod("edsd", "edsd", draft),
    ]
    prompts = load_prompts_from_texts(["abcab", "hello world", "the cat sat"])
    results = run_benchmark(target, tokenizer, methods, prompts, max_new_tokens=12, temperatures=(0.0, 1.0), repeats=1)

    assert len(results) == 2 * 3 * 4
    greedy = [r for r in results if r.temperature == 0.0]
    assert all(r.identical_to_plain for r in greedy)
    assert all(r.new_tokens == 12 for r in greedy)
    plain = [r for r in greedy if r.method == "plain"]
    assert all(r.target_forwards == r.new_tokens for r in plain), "plain decoding runs one forward per token"
    edsd = [r for r in greedy if r.method == "edsd"]
    assert sum(r.target_forwards for r in edsd) < sum(r.new_tokens for r in edsd), "no draft token was accepted"

    report = save_report(results, tmp_path, {"machine": "test"})
    assert (tmp_path / "bench.png").stat().st_size > 0
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["metadata"] == {"machine": "test"}
    rows = {(row["method"], row["temperature"]): row for row in report["overall"]}
    assert rows[("plain", 0.0)]["speedup"] == pytest.approx(1.0)
    assert rows[("plain", 0.0)]["tau"] == pytest.approx(1.0)
    assert rows[("edsd", 0.0)]["tau"] > 1.0
    assert tuple(rows[("edsd", 0.0)]["identical_to_plain"]) == (3, 3)
    assert rows[("edsd", 1.0)]["identical_to_plain"] is None
    assert "edsd" in format_table(report["overall"])


def test_benchmark_needs_plain_first(trained_llama_pair):
    target, draft = trained_llama_pair
    with pytest.raises(ValueError, match="must be plain decoding"):
        run_benchmark(target, make_char_tokenizer(), [BenchMethod("edsd", "edsd", draft)], load_prompts_from_texts(["ab"]))


def load_prompts_from_texts(texts):
    from edsd_hf.bench import BenchPrompt

    return [BenchPrompt(str(i), "all", text) for i, text in enumerate(texts)]


def test_bench_command_sweeps_draft_lengths(trained_llama_pair, tmp_path):
    from edsd_hf.cli import main

    target, draft = trained_llama_pair
    target.save_pretrained(tmp_path / "target")
    make_char_tokenizer().save_pretrained(tmp_path / "target")
    draft.save_pretrained(tmp_path / "draft")
    (tmp_path / "prompts.txt").write_text("abcab\nthe cat sat\n")
    arguments = [
        "bench", "--target", str(tmp_path / "target"), "--edsd-draft", f"edsd={tmp_path / 'draft'}",
        "--num-assistant-tokens", "1", "4", "--prompts", str(tmp_path / "prompts.txt"),
        "--max-new-tokens", "10", "--temperatures", "0", "--repeats", "1", "--no-chat-template",
        "--output", str(tmp_path / "report"),
    ]
    assert main(arguments) == 0

    report = json.loads((tmp_path / "report" / "bench.json").read_text())
    rows = {row["method"]: row for row in report["overall"]}
    assert set(rows) == {"plain", "edsd@1", "edsd@4"}
    assert report["metadata"]["num_assistant_tokens"] == [1, 4]
    # One drafted token per round caps tau at 2. Four drafted tokens let this draft go past it.
    assert 1.0 < rows["edsd@1"]["tau"] <= 2.0
    assert rows["edsd@4"]["tau"] > rows["edsd@1"]["tau"]
    assert all(tuple(row["identical_to_plain"]) == (2, 2) for row in rows.values())


def test_bench_command_rejects_zero_draft_length(tmp_path):
    from edsd_hf.cli import main

    # The target path does not exist: the draft length must be rejected before any model is loaded.
    arguments = [
        "bench", "--target", str(tmp_path / "missing"), "--num-assistant-tokens", "0", "--prompts", "unused",
        "--output", str(tmp_path / "report"),
    ]
    with pytest.raises(ValueError, match="Invalid --num-assistant-tokens \\[0\\]"):
        main(arguments)
