"""Generate with an EDSD draft and check the output against plain greedy decoding.

    python examples/speculative_generate.py TARGET_DIR DRAFT_DIR "def parse_args(argv):"

TARGET_DIR and DRAFT_DIR are any saved target and EDSD draft, for example the ones `edsd-hf demo`
leaves in ~/.cache/edsd_hf/targets/small-seed0 and ~/.cache/edsd_hf/drafts/small-seed0/edsd.
"""

import argparse
import time

import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

import edsd_hf  # noqa: F401  (registers EdsdDraftModel and the generate() integration)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target")
    parser.add_argument("draft")
    parser.add_argument("prompt")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.target)
    target = AutoModelForCausalLM.from_pretrained(args.target).eval()
    draft = AutoModel.from_pretrained(args.draft).eval()
    inputs = tokenizer(args.prompt, return_tensors="pt")

    with torch.inference_mode():
        start = time.perf_counter()
        plain = target.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
        plain_seconds = time.perf_counter() - start

        start = time.perf_counter()
        speculative = target.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False, assistant_model=draft)
        speculative_seconds = time.perf_counter() - start

    print(tokenizer.decode(speculative[0], skip_special_tokens=True))
    print(f"\nidentical to plain greedy: {plain.tolist() == speculative.tolist()}")
    print(f"mean acceptance length: {draft.speculation_stats.mean_acceptance_length:.2f}")
    print(f"plain {plain_seconds:.2f} s, speculative {speculative_seconds:.2f} s, speedup {plain_seconds / speculative_seconds:.2f}x")


if __name__ == "__main__":
    main()
