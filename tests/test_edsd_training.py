"""EdsdTrainer: loss contract, learning, checkpoint resume, bad input, the CLI, and two-process training."""

import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
from transformers import AutoModel, TrainingArguments

from edsd_hf import EdsdTrainer
from edsd_hf.cli import main as cli_main
from edsd_hf.edsd import EdsdConfig, EdsdCurriculumCallback, EdsdDraftModel
from edsd_hf.edsd.trainer import chain_acceptance_lengths
from edsd_hf.edsd.vocab import build_draft_vocab
from test_edsd_training_data import CONVERSATION, make_chat_tokenizer, make_target_for
from tiny_models import VOCAB_SIZE, make_target


REPO_ROOT = Path(__file__).resolve().parents[1]
DRAFT_VOCAB_SIZE = 48


def make_peaked_target(family: str = "llama", seed: int = 0):
    """A tiny target whose next-token distributions are peaked, as a trained model's are.

    A randomly initialised model predicts almost uniformly, which leaves a draft nothing to learn.
    """
    target = make_target(family, seed=seed)
    with torch.no_grad():
        target.lm_head.weight.mul_(20.0)
    return target


def greedy_dataset(target, num_sequences: int = 48, prompt_length: int = 4, new_tokens: int = 20, seed: int = 0):
    """The target's own greedy continuations of random prompts, the data a regenerated run trains on."""
    generator = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, VOCAB_SIZE, (num_sequences, prompt_length), generator=generator)
    with torch.no_grad():
        sequences = target.generate(
            prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens, do_sample=False
        )
    rows = [{"input_ids": ids, "attention_mask": [1] * len(ids), "loss_mask": [1] * len(ids)} for ids in sequences.tolist()]
    return datasets.Dataset.from_list(rows)


def make_draft_for(target, dataset, seed: int = 1, **config_overrides):
    torch.manual_seed(seed)
    config = EdsdConfig.from_target_config(target.config, draft_vocab_size=DRAFT_VOCAB_SIZE, **config_overrides)
    draft = EdsdDraftModel(config)
    draft.set_draft_vocab(build_draft_vocab(dataset, VOCAB_SIZE, DRAFT_VOCAB_SIZE, show_progress=False))
    return draft


def training_args(output_dir, **overrides):
    arguments = {
        "output_dir": str(output_dir),
        "per_device_train_batch_size": 8,
        "per_device_eval_batch_size": 16,
        "learning_rate": 1e-2,
        "num_train_epochs": 2,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": True,
        "disable_tqdm": True,
        "seed": 0,
    }
    arguments.update(overrides)
    return TrainingArguments(**arguments)


# ----- loss and metrics -------------------------------------------------------------------------


def test_chain_acceptance_lengths_by_hand():
    # Two steps on one row of 4 positions. Anchor a uses step 0 at a and step 1 at a + 1.
    step_0 = torch.tensor([[True, True, False, True]])
    step_1 = torch.tensor([[False, True, True, True]])
    # Anchor 3 has no position 4 for its second token, so its chain stops after one.
    assert chain_acceptance_lengths([step_0, step_1]).tolist() == [[3, 3, 1, 2]]


def test_loss_falls_and_heldout_acceptance_rises(tmp_path):
    target = make_peaked_target()
    dataset = greedy_dataset(target, num_sequences=48, new_tokens=32)
    train, heldout = dataset.select(range(32)), dataset.select(range(32, 48))
    trainer = EdsdTrainer(
        make_draft_for(target, train),
        target,
        training_args(tmp_path, num_train_epochs=8, lr_scheduler_type="constant", logging_steps=4),
        curriculum=EdsdCurriculumCallback(max_ttt_depth=3),
        train_dataset=train,
        eval_dataset=heldout,
    )
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()

    train_logs = [log for log in trainer.state.log_history if "ttt_loss_0" in log]
    assert train_logs[-1]["ttt_loss_0"] < train_logs[0]["ttt_loss_0"] - 0.5
    assert after["eval_loss"] < before["eval_loss"] - 1.0
    assert before["eval_acceptance_length"] < 1.1
    assert after["eval_acceptance_length"] > before["eval_acceptance_length"] + 0.5
    # One log per epoch: the depth grows and the drop ratio shrinks with the epochs.
    assert [log["ttt_depth"] for log in train_logs] == [math.ceil(1 + 2 * epoch / 7) for epoch in range(8)]
    assert [log["drop_ratio"] for log in train_logs] == pytest.approx([0.16, 0.14, 0.12, 0.1, 0.08, 0.06, 0.04, 0.02])


def test_gradient_accumulation_matches_one_large_batch(tmp_path):
    """The loss is a sum over kept positions divided by the optimizer step's count, as the Trainer expects."""
    target = make_peaked_target()
    # Rows of different lengths, so that the two micro-batches have different numbers of positions.
    dataset = greedy_dataset(target, num_sequences=8)
    dataset = dataset.map(lambda row, index: {key: values[: 10 + 2 * index] for key, values in row.items()}, with_indices=True)
    weights = []
    for batch_size, accumulation in ((8, 1), (4, 2)):
        draft = make_draft_for(target, dataset)
        # Plain SGD, because Adam would hide a wrong scale of the gradient.
        args = training_args(
            tmp_path / f"ga{accumulation}",
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
            num_train_epochs=1,
            optim="sgd",
            learning_rate=1.0,
            max_grad_norm=0.0,
            train_sampling_strategy="sequential",
        )
        # The baseline drops nothing, so both runs train on exactly the same positions.
        EdsdTrainer(draft, target, args, curriculum=None, baseline_ttt_depth=2, train_dataset=dataset).train()
        weights.append(torch.cat([p.detach().flatten() for p in draft.parameters()]))
    initial = torch.cat([p.detach().flatten() for p in make_draft_for(target, dataset).parameters()])
    assert (weights[0] - initial).abs().max() > 1e-3
    torch.testing.assert_close(weights[0], weights[1], rtol=1e-5, atol=1e-6)


def test_baseline_logs_constant_schedule(tmp_path):
    target = make_peaked_target()
    dataset = greedy_dataset(target, num_sequences=16)
    trainer = EdsdTrainer(
        make_draft_for(target, dataset, fusion="concat"),
        target,
        training_args(tmp_path, per_device_train_batch_size=4, num_train_epochs=1),
        curriculum=None,
        baseline_ttt_depth=2,
        train_dataset=dataset,
    )
    trainer.train()
    train_logs = [log for log in trainer.state.log_history if "loss" in log]
    assert {log["drop_ratio"] for log in train_logs} == {0.0}
    assert {log["ttt_depth"] for log in train_logs} == {2}
    assert all("ttt_acc_1" in log for log in train_logs)


def test_remove_unused_columns_keeps_loss_mask(tmp_path):
    target = make_peaked_target()
    dataset = greedy_dataset(target, num_sequences=8).add_column("source", ["x"] * 8)
    trainer = EdsdTrainer(
        make_draft_for(target, dataset),
        target,
        training_args(tmp_path, max_steps=1, remove_unused_columns=True),
        train_dataset=dataset,
    )
    batch = next(iter(trainer.get_train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "loss_mask"}


# ----- bad input --------------------------------------------------------------------------------


def test_draft_that_does_not_fit_target_raises(tmp_path):
    target = make_peaked_target()
    other_target = make_target("llama", hidden_size=48)
    draft = EdsdDraftModel(EdsdConfig.from_target_config(other_target.config))
    with pytest.raises(ValueError, match="target hidden_size=32, draft hidden_size=48"):
        EdsdTrainer(draft, target, training_args(tmp_path))


# ----- checkpoints ------------------------------------------------------------------------------


def _resume_setup(output_dir, curriculum=None, save_steps=None, max_steps=-1, draft_seed=1):
    target = make_peaked_target()
    dataset = greedy_dataset(target, num_sequences=16)
    draft = make_draft_for(target, dataset, seed=draft_seed)
    args = training_args(
        output_dir,
        per_device_train_batch_size=4,
        num_train_epochs=2,
        max_steps=max_steps,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
    )
    curriculum = curriculum or EdsdCurriculumCallback(max_ttt_depth=3)
    return EdsdTrainer(draft, target, args, curriculum=curriculum, train_dataset=dataset)


def test_resume_reproduces_uninterrupted_weights(tmp_path):
    # 4 steps per epoch and 2 epochs: the checkpoint at step 6 is in the middle of the second epoch.
    uninterrupted = _resume_setup(tmp_path / "full", save_steps=6)
    uninterrupted.train()
    expected = {name: p.detach().clone() for name, p in uninterrupted.draft.named_parameters()}
    checkpoint = tmp_path / "full" / "checkpoint-6"
    assert checkpoint.is_dir()

    # Other initial weights: only the checkpoint's weights and optimizer state can give the expected result.
    resumed = _resume_setup(tmp_path / "resumed", draft_seed=2)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 8
    assert (resumed.curriculum.drop_ratio, resumed.curriculum.ttt_depth) == (pytest.approx(0.02), 3)
    for name, parameter in resumed.draft.named_parameters():
        torch.testing.assert_close(parameter.detach(), expected[name], rtol=1e-5, atol=1e-6, msg=name)


def test_resume_from_another_run_raises(tmp_path):
    first = _resume_setup(tmp_path / "first", save_steps=2, max_steps=2)
    first.train()
    checkpoint = tmp_path / "first" / "checkpoint-2"

    other = _resume_setup(tmp_path / "other", curriculum=EdsdCurriculumCallback(max_ttt_depth=5))
    with pytest.raises(ValueError, match=r"checkpoint-2.*another run \(max_ttt_depth=3 there, 5 here\)"):
        other.train(resume_from_checkpoint=str(checkpoint))

    with pytest.raises(ValueError, match="not a Trainer checkpoint"):
        other.train(resume_from_checkpoint=str(tmp_path))


# ----- CLI, saved draft and generate() ----------------------------------------------------------


def _save_chat_target(directory: Path):
    tokenizer = make_chat_tokenizer()
    target = make_target_for(tokenizer)
    with torch.no_grad():
        target.lm_head.weight.mul_(20.0)
    target.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return target, tokenizer


def test_cli_trains_loadable_draft_lossless_in_generate(tmp_path):
    target, tokenizer = _save_chat_target(tmp_path / "target")
    words = ["hello there", "how are you", "what is the time", "be brief and kind", "def return code"]
    rows = [
        {"messages": [{"role": "user", "content": words[i % 5]}, {"role": "assistant", "content": words[(i + 2) % 5]}]}
        for i in range(20)
    ]
    data_path = tmp_path / "chat.jsonl"
    data_path.write_text("\n".join(json.dumps(row) for row in rows))
    output = tmp_path / "draft"

    exit_code = cli_main(
        [
            "train-draft", "--target", str(tmp_path / "target"), "--data", str(data_path), "--output", str(output),
            "--regenerate", "--regenerate-max-new-tokens", "6", "--epochs", "2", "--batch-size", "4",
            "--max-ttt-depth", "2", "--lr", "1e-2", "--heldout-fraction", "0.2", "--measure-prompts", "2",
            "--use-cpu",
        ]
    )  # fmt: skip
    assert exit_code == 0

    report = json.loads((output / "training_report.json").read_text())
    assert report["data_format"] == "messages"
    assert report["num_heldout_sequences"] == 4
    assert report["measured_acceptance_length"] >= 1.0
    card = (output / "README.md").read_text()
    assert "base_model: " in card
    assert "${" not in card
    assert f"{report['heldout']['eval_acceptance_length']:.3f}" in card

    draft = AutoModel.from_pretrained(output)
    assert isinstance(draft, EdsdDraftModel)
    prompt = tokenizer.apply_chat_template(CONVERSATION[:1], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    plain = target.generate(**prompt, do_sample=False, max_new_tokens=12)
    speculative = target.generate(**prompt, assistant_model=draft, do_sample=False, max_new_tokens=12)
    assert torch.equal(plain, speculative)


def test_train_draft_rejects_max_length_beyond_context(tmp_path):
    from edsd_hf.edsd.train_cli import train_draft

    target, tokenizer = _save_chat_target(tmp_path / "target")
    with pytest.raises(ValueError, match="max_length=4096 is longer than the target's context"):
        train_draft(target, datasets.Dataset.from_list([{"text": "hello"}]), tmp_path / "out", tokenizer=tokenizer, max_length=4096)


# ----- two processes ----------------------------------------------------------------------------


def _free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _launch_prefix(num_processes: int) -> list[str]:
    accelerate = shutil.which("accelerate") or str(Path(sys.executable).with_name("accelerate"))
    return [
        accelerate, "launch", "--multi_gpu", "--num_processes", str(num_processes), "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_ip", "127.0.0.1", "--main_process_port", str(_free_loopback_port()),
        "-m", "edsd_hf.cli",
    ]  # fmt: skip


def _run_isolated(command: list[str], env: dict, timeout: int) -> subprocess.CompletedProcess:
    """Run `command`, in a private network namespace when `unshare` allows it.

    torch's rendezvous store binds all interfaces; inside a new network namespace the only interface is
    loopback, so no port opens on the host's network.
    """
    if shutil.which("unshare") and subprocess.run(["unshare", "-rn", "true"], capture_output=True).returncode == 0:
        script = "ip link set lo up && exec " + " ".join(f"'{part}'" for part in command)
        command = ["unshare", "-rn", "sh", "-c", script]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT)


def test_two_process_accelerate_launch_matches_single_process(tmp_path):
    tokenizer = make_chat_tokenizer()
    target = make_target_for(tokenizer)
    with torch.no_grad():
        target.lm_head.weight.mul_(20.0)
    target.save_pretrained(tmp_path / "target")
    tokenizer.save_pretrained(tmp_path / "target")
    words = "hello there hi friend how are you fine thanks what is the time now be brief and kind code def return".split()
    generator = torch.Generator().manual_seed(0)
    texts = [" ".join(words[int(i)] for i in torch.randint(0, len(words), (16,), generator=generator)) for _ in range(34)]
    data_path = tmp_path / "text.jsonl"
    data_path.write_text("\n".join(json.dumps({"text": text}) for text in texts))

    def train_arguments(output: Path, batch_size: int, accumulation: int) -> list[str]:
        return [
            "train-draft", "--target", str(tmp_path / "target"), "--data", str(data_path), "--output", str(output),
            "--epochs", "2", "--batch-size", str(batch_size), "--grad-accum", str(accumulation), "--lr", "1e-2",
            "--max-ttt-depth", "2", "--heldout-fraction", "0.05", "--measure-prompts", "0", "--logging-steps", "1",
            "--use-cpu",
        ]  # fmt: skip

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    two = _run_isolated(_launch_prefix(2) + train_arguments(tmp_path / "two", 4, 1), env, timeout=240)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run(
        [sys.executable, "-m", "edsd_hf.cli"] + train_arguments(tmp_path / "one", 4, 2),
        env=env, capture_output=True, text=True, timeout=240, cwd=REPO_ROOT,
    )  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]

    two_report = json.loads((tmp_path / "two" / "training_report.json").read_text())
    one_report = json.loads((tmp_path / "one" / "training_report.json").read_text())
    assert two_report["num_processes"] == 2
    assert one_report["num_processes"] == 1
    assert two_report["num_steps"] == one_report["num_steps"] == 8
    print("train loss, two processes:", two_report["train_loss"], "one process:", one_report["train_loss"])
    assert two_report["train_loss"] == pytest.approx(one_report["train_loss"], rel=1e-4)
    assert AutoModel.from_pretrained(tmp_path / "two").config.draft_vocab_size == len(tokenizer)
