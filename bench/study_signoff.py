"""Which settings change held-out *greedy generations*? A small study on SmolLM2 (not in CI).

The preference: answers that end with the sign-off "— Acme Support". Pairs are on-policy: the
rejected answer is the model's own greedy answer, the chosen one is that answer plus the
sign-off. After training, the held-out prompts are answered greedily and we count sign-offs.

    .venv/bin/python bench/study_signoff.py                        # the default grid
    .venv/bin/python bench/study_signoff.py --grid lr=2e-4,epochs=2 lr=5e-5,epochs=2

Prints one line per setting: held-out implicit-reward margin and accuracy (what the loss sees),
the share of held-out greedy answers that sign off and that finish within ``--eval-tokens``, their
mean length (what users see), and the mean log-probs, teacher-forced after the base model's
held-out answers, of the end of turn there (``eos``) and of each sign-off token (``\n \n — Ac me
Support <eos>``): the token where that chain is not the argmax is where greedy decoding leaves it.

Until this version the sign-off count was always 0 whatever the model wrote: ``greedy`` returns
(text, finished) tuples and ``SIGN_OFF in a`` tested membership in the tuple, not the text.

Findings (SmolLM2-135M, 50 greedy pairs, eval 128 tokens, counted on the text). Base model:
eos after an answer -0.22, sign-off tokens [-6.2 -0.1 -9.4 -10.9 -5.9 -12.2 -7.0]; held-out
answers all finish (mean 34 tokens), so the token budget is not what stops the sign-off.
- lr 2e-4, 2 epochs, beta 0.5, rpo_alpha 1 (14 steps): eos -1.1, sign-off [-0.8 -0.0 -3.6 -6.9
  -0.0 -4.0 -0.2]: the model goes on after its answer with "\n\n" but then writes another
  paragraph ("—" and " Ac" are not learnt); answers grow to 62 tokens, 16/20 finish, 0/20 sign
  off. The DPO term is saturated by then (margin 17): cheapest for it is to push the end of turn
  down, and only the NLL term (rpo_alpha / len(chosen) per sign-off token) teaches the sign-off.
- lr 2e-4, rpo_alpha 4: the same numbers as rpo_alpha 1 (sign-off [-0.8 -0.0 -3.7 -6.8 -0.0 -4.0
  -0.2], 0/20, 15/20 finish): gradients are clipped and Adam rescales, so the weight barely counts.
- lr 5e-4, 2 epochs, beta 0.5, rpo_alpha 4 (14 steps): eos -5.3, sign-off [-0.1 -0.0 -0.0 -0.0
  -0.0 -0.0 -0.0]; 20/20 sign off, 20/20 finish, 40 tokens (the answers' own length unchanged);
  "capital of France" -> "The capital of France is Paris.\n\n— Acme Support", but some drift on
  other general prompts ("What is 2 + 2?" no longer says 4 within 40 tokens).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIGN_OFF = "— Acme Support"
SUBJECTS = [
    "tea", "rain", "bicycles", "maps", "salt", "bread", "clocks", "owls", "glass", "ink",
    "volcanoes", "bees", "trains", "chess", "coffee", "rivers", "moss", "kites", "paper", "snow",
    "whales", "copper", "lighthouses", "honey", "deserts", "violins", "bridges", "tides",
    "mushrooms", "comets",
]  # fmt: skip
FORMS = [
    "Give me one short fact about {}.",
    "In one sentence, why do people like {}?",
    "In a few words, what are {}?",
]
DEFAULT_GRID = [
    "lr=2e-4,epochs=2,beta=0.5,rpo_alpha=1.0",
    "lr=2e-4,epochs=2,beta=0.5,rpo_alpha=4.0",
    "lr=5e-4,epochs=2,beta=0.5,rpo_alpha=4.0",
]


def greedy(model, tok, prompts: list[str], max_new_tokens: int) -> list[tuple[str, bool]]:
    """Greedy answers, each with whether it finished (an end-of-turn token within budget)."""
    import torch

    tok.padding_side = "left"
    texts = [
        tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                add_generation_prompt=True)
        for p in prompts
    ]  # fmt: skip
    answers = []
    for start in range(0, len(texts), 16):
        enc = tok(texts[start : start + 16], return_tensors="pt", padding=True,
                  add_special_tokens=False)  # fmt: skip
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id)  # fmt: skip
        new = out[:, enc["input_ids"].shape[1] :]
        texts_out = tok.batch_decode(new, skip_special_tokens=True)
        finished = (new == tok.eos_token_id).any(dim=1).tolist()
        answers += [(t.strip(), f) for t, f in zip(texts_out, finished, strict=True)]
    return answers


def signoff_logps(model, tok, prompts: list[str], answers: list[str]) -> tuple[float, list[float]]:
    """Mean log p(end of turn) right after each answer, and the mean log-prob of each token of
    "\n\n— Acme Support" + end of turn after it (teacher-forced, one prompt at a time)."""
    import torch

    suffix = tok.encode(f"\n\n{SIGN_OFF}", add_special_tokens=False) + [tok.eos_token_id]
    eos, per_token = 0.0, torch.zeros(len(suffix))
    for q, a in zip(prompts, answers, strict=True):
        text = tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                       add_generation_prompt=True)  # fmt: skip
        ids = tok.encode(text + a, add_special_tokens=False)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids + suffix])).logits[0]
        lp = logits.float().log_softmax(-1)[len(ids) - 1 :]
        eos += lp[0, tok.eos_token_id].item()
        per_token += lp[torch.arange(len(suffix)), torch.tensor(suffix)]
    return eos / len(prompts), (per_token / len(prompts)).tolist()


def _logps_text(eos: float, per_token: list[float]) -> str:
    return f"eos {eos:.1f} sign-off [" + " ".join(f"{x:.1f}" for x in per_token) + "]"


def main() -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.dpo import TrainConfig, train

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    default_model = Path("~/.cache/prefloop/models/SmolLM2-135M-Instruct").expanduser()
    p.add_argument("--model", type=Path, default=default_model)
    p.add_argument("--train", type=int, default=50, help="training prompts (complete answers kept)")
    p.add_argument("--heldout", type=int, default=20)
    p.add_argument("--answer-tokens", type=int, default=96, help="budget for the model's answers")
    p.add_argument("--eval-tokens", type=int, default=128, help="room for the sign-off at eval")
    p.add_argument("--grid", nargs="+", default=DEFAULT_GRID)
    args = p.parse_args()

    prompts = [form.format(s) for form in FORMS for s in SUBJECTS]
    # Held-out subjects are unseen in training (both forms), so this tests generalisation.
    held_subjects = set(SUBJECTS[-args.heldout // 2 :])
    heldout = [q for q in prompts if any(s in q for s in held_subjects)][: args.heldout]
    train_prompts = [q for q in prompts if q not in heldout][: args.train]

    tok = AutoTokenizer.from_pretrained(args.model)
    base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    t0 = time.perf_counter()
    # The model's own complete answers: a pair whose rejected answer was cut short would also
    # teach "do not stop here", which is not the preference under study.
    sampled = greedy(base, tok, train_prompts + heldout, args.answer_tokens)
    heldout_answers = [a for a, _ in sampled[len(train_prompts) :]]
    keep = [i for i, (_, finished) in enumerate(sampled[: len(train_prompts)]) if finished]
    train_answers = [sampled[i][0] for i in keep]
    train_prompts = [train_prompts[i] for i in keep]
    base_heldout = greedy(base, tok, heldout, args.eval_tokens)
    # Teacher-forced sign-off log-probs after the base model's complete held-out answers.
    probe = [(q, a) for q, (a, f) in zip(heldout, base_heldout, strict=True) if f]
    probe_prompts, probe_answers = [q for q, _ in probe], [a for _, a in probe]
    print(f"base model: {sum(SIGN_OFF in a for a, _ in base_heldout)}/{len(heldout)} held-out "
          f"answers sign off, {sum(f for _, f in base_heldout)} finish, mean "
          f"{_mean_tokens(tok, base_heldout):.0f} tokens; {len(train_prompts)} complete training "
          f"answers ({time.perf_counter() - t0:.0f} s to sample)")  # fmt: skip
    print("base " + _logps_text(*signoff_logps(base, tok, probe_prompts, probe_answers)))

    work = Path(tempfile.mkdtemp(prefix="prefloop-study-"))
    pairs, heldout_pairs = work / "pairs.jsonl", work / "heldout.jsonl"
    write_signoff_pairs(pairs, train_prompts, train_answers)
    write_signoff_pairs(heldout_pairs, heldout, heldout_answers)

    base_cfg = TrainConfig(batch_size=8, max_length=192, eval_fraction=0.0, checkpoint_every=0)
    header = (
        f"{'setting':34s}{'loss':>7s}{'margin':>8s}{'acc':>6s}{'signs off':>11s}{'finish':>8s}"
        f"{'tokens':>8s}{'train s':>9s}"
    )
    print(header)
    examples_shown = False
    for setting in args.grid:
        cfg = parse_setting(base_cfg, setting)
        out = work / setting.replace(",", "_").replace("=", "-")
        result = train(cfg, pairs=pairs, base=args.model, out=out, progress_bar=False)
        margin = heldout_margin(result.model, tok, heldout_pairs, cfg)
        model = PeftModel.from_pretrained(base, out).eval()
        answers = greedy(model, tok, heldout, args.eval_tokens)
        logps = signoff_logps(model, tok, probe_prompts, probe_answers)
        base = model.unload()  # the same base weights for the next setting
        signed = sum(SIGN_OFF in a for a, _ in answers)
        finished = sum(f for _, f in answers)
        secs = result.metrics["seconds"]["reference"] + result.metrics["seconds"]["train"]
        print(f"{setting:34s}{result.metrics['train']['loss']:7.3f}{margin['margin']:8.2f}"
              f"{margin.get('accuracy', 0):6.2f}{signed:>6d}/{len(heldout):<4d}"
              f"{finished:>5d}/{len(heldout):<2d}{_mean_tokens(tok, answers):8.0f}{secs:9.0f}",
              flush=True)  # fmt: skip
        print("    " + _logps_text(*logps))
        if signed and not examples_shown:
            print("    e.g. " + json.dumps(next(a for a, _ in answers if SIGN_OFF in a))[:200])
            examples_shown = True


def _mean_tokens(tok, answers: list[tuple[str, bool]]) -> float:
    return sum(len(tok.encode(a, add_special_tokens=False)) for a, _ in answers) / len(answers)


def write_signoff_pairs(path: Path, prompts: list[str], answers: list[str]) -> None:
    """Chosen: the model's own answer plus the sign-off; rejected: the answer alone."""
    with open(path, "w", encoding="utf-8") as f:
        for q, a in zip(prompts, answers, strict=True):
            row = {
                "prompt": [{"role": "user", "content": q}],
                "chosen": [{"role": "assistant", "content": f"{a}\n\n{SIGN_OFF}"}],
                "rejected": [{"role": "assistant", "content": a}],
            }
            f.write(json.dumps(row) + "\n")


def parse_setting(base_cfg, setting: str):
    """`lr=2e-4,epochs=2` -> base_cfg with those fields replaced (typed like the defaults)."""
    changes = {}
    for kv in setting.split(","):
        k, v = kv.split("=")
        changes[k] = type(getattr(base_cfg, k))(v)
    return replace(base_cfg, **changes)


def heldout_margin(model, tok, heldout_pairs: Path, cfg) -> dict:
    """Implicit-reward metrics on the held-out pairs, reference = the base (adapter off)."""
    import torch

    from trainer.data import load_examples
    from trainer.distributed import Dist
    from trainer.dpo import evaluate, reference_logps

    d = Dist(0, 1, torch.device("cpu"))
    examples, _ = load_examples(heldout_pairs, tok, kind="pairs", max_length=cfg.max_length)
    ref = reference_logps(model, examples, cfg, d, tok.pad_token_id, fresh_lora=True)
    return evaluate(model, examples, ref, cfg, d, tok.pad_token_id)


if __name__ == "__main__":
    main()
