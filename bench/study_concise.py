"""Does one LoRA DPO update change held-out *greedy generations* towards what users prefer?

The simulated users prefer the more concise of two answers. Pairs are on-policy, as in the
service: for each training prompt the model samples two answers (temperature 1.0) and the
shorter complete one is chosen. After training, held-out prompts on unseen subjects are answered
greedily and we compare answer lengths with the base model's (not in CI; a few minutes on CPU).

    .venv/bin/python bench/study_concise.py [--grid lr=2e-4,epochs=2 lr=5e-5,epochs=2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from study_signoff import FORMS, SUBJECTS, greedy, parse_setting  # noqa: E402

DEFAULT_GRID = ["lr=5e-5,epochs=2", "lr=2e-4,epochs=1", "lr=2e-4,epochs=2"]


def sample_pairs(model, tok, prompts: list[str], max_new_tokens: int, seed: int) -> list[dict]:
    import torch

    torch.manual_seed(seed)
    rows = []
    for q in prompts:
        text = tok.apply_chat_template(
            [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
        )
        enc = tok(text, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=True, temperature=1.0,
                num_return_sequences=2, pad_token_id=tok.pad_token_id,
            )  # fmt: skip
        new = out[:, enc["input_ids"].shape[1] :]
        finished = (new == tok.eos_token_id).any(dim=1).tolist()
        a, b = (t.strip() for t in tok.batch_decode(new, skip_special_tokens=True))
        if not all(finished) or a == b or len(a) == len(b):
            continue  # the simulated user only compares two complete, different answers
        short, long = sorted((a, b), key=len)
        rows.append(
            {
                "prompt": [{"role": "user", "content": q}],
                "chosen": [{"role": "assistant", "content": short}],
                "rejected": [{"role": "assistant", "content": long}],
            }
        )
    return rows


def main() -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.dpo import TrainConfig, train

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    default_model = Path("~/.cache/prefloop/models/SmolLM2-135M-Instruct").expanduser()
    p.add_argument("--model", type=Path, default=default_model)
    p.add_argument("--heldout", type=int, default=20)
    p.add_argument("--answer-tokens", type=int, default=96)
    p.add_argument("--grid", nargs="+", default=DEFAULT_GRID)
    args = p.parse_args()

    prompts = [form.format(s) for form in FORMS for s in SUBJECTS]
    held_subjects = set(SUBJECTS[-args.heldout // 2 :])
    heldout = [q for q in prompts if any(s in q for s in held_subjects)][: args.heldout]
    train_prompts = [q for q in prompts if q not in heldout]

    tok = AutoTokenizer.from_pretrained(args.model)
    base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    t0 = time.perf_counter()
    rows = sample_pairs(base, tok, train_prompts, args.answer_tokens, seed=0)
    base_answers = [a for a, _ in greedy(base, tok, heldout, args.answer_tokens)]
    base_len = statistics.mean(len(a) for a in base_answers)
    print(
        f"{len(rows)} on-policy pairs from {len(train_prompts)} prompts "
        f"({time.perf_counter() - t0:.0f} s); base held-out mean answer {base_len:.0f} chars"
    )
    work = Path(tempfile.mkdtemp(prefix="prefloop-concise-"))
    pairs = work / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))

    base_cfg = TrainConfig(batch_size=8, max_length=192, eval_fraction=0.0, checkpoint_every=0)
    print(f"{'setting':26s}{'loss':>7s}{'mean chars':>12s}{'vs base':>9s}{'changed':>9s}{'s':>6s}")
    for setting in args.grid:
        cfg = parse_setting(base_cfg, setting)
        out = work / setting.replace(",", "_").replace("=", "-")
        result = train(cfg, pairs=pairs, base=args.model, out=out, progress_bar=False)
        model = PeftModel.from_pretrained(base, out).eval()
        answers = [a for a, _ in greedy(model, tok, heldout, args.answer_tokens)]
        base = model.unload()
        mean = statistics.mean(len(a) for a in answers)
        changed = sum(a != b for a, b in zip(answers, base_answers, strict=True))
        secs = result.metrics["seconds"]["reference"] + result.metrics["seconds"]["train"]
        print(
            f"{setting:26s}{result.metrics['train']['loss']:7.3f}{mean:12.0f}"
            f"{mean / base_len - 1:+9.0%}{changed:>5d}/{len(heldout):<3d}{secs:6.0f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
