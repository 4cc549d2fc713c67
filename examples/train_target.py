"""Train the `small` target (about 15 minutes on 2 CPU cores) and a draft LM that shares its tokenizer.

Usage: python examples/train_target.py [CACHE_DIR]

A second run reuses the finished checkpoints in CACHE_DIR (default: runs/targets).
"""

import sys

from transformers import AutoModelForCausalLM, AutoTokenizer

from edsd_hf.recipes import load_or_train_target, read_report

cache_dir = sys.argv[1] if len(sys.argv) > 1 else "runs/targets"

target_dir = load_or_train_target("small", cache_dir)
# The draft must share the target's vocabulary for assisted generation, so it reuses the target's tokenizer.
draft_dir = load_or_train_target("draft-lm", cache_dir, tokenizer_dir=target_dir)

for checkpoint_dir in (target_dir, draft_dir):
    heldout = read_report(checkpoint_dir)["heldout"]
    print(
        f"{checkpoint_dir}: held-out loss {heldout['loss_nats_per_token']:.3f} nats/token, "
        f"median entropy {heldout['entropy_nats']['median']:.2f} nats"
    )

tokenizer = AutoTokenizer.from_pretrained(target_dir)
target = AutoModelForCausalLM.from_pretrained(target_dir)
draft = AutoModelForCausalLM.from_pretrained(draft_dir)
input_ids = tokenizer("def read_config(path):\n", return_tensors="pt")["input_ids"]
output_ids = target.generate(input_ids, assistant_model=draft, max_new_tokens=40, do_sample=False)
print(tokenizer.decode(output_ids[0]))
