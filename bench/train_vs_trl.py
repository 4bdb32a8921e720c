"""Our DPO loop against TRL's ``DPOTrainer``, side by side on the same model, pairs and settings.

    .venv/bin/python bench/train_vs_trl.py                       # 32 pairs, 4 steps: a few minutes
    .venv/bin/python bench/train_vs_trl.py --pairs 200 --steps 25 --repeats 2

Contenders, each in its own subprocess (so peak memory is that run's alone, read from
``ru_maxrss``, or ``torch.cuda.max_memory_allocated`` on GPU), run in alternation when
``--repeats`` > 1 because a shared machine is noisy:

* ``ours``: ``trainer.dpo.train`` (reference log-probs once up front, then one forward per step);
* ``ours-unfused``: ``ours`` with ``--no-fused``: the stock PEFT/transformers layers instead of
  ``trainer.fused``'s kernels (what those save);
* ``trl-accum``: ``DPOTrainer`` with a PEFT model, reference log-probs pre-computed, and our
  micro-batch size with gradient accumulation to the same batch. Same settings as ours: this is
  the headline comparison;
* ``trl``: ``DPOTrainer`` at its defaults for the batch (the whole batch in one forward, the
  reference being the disabled adapter, run every step);
* ``trl-precompute``: ``trl`` with ``precompute_ref_log_probs=True``.

Every contender runs with glibc's default allocator settings. (A fixed mmap threshold,
``MALLOC_MMAP_THRESHOLD_=131072``, cuts ours' peak by about a quarter but makes its epoch about
1.7x slower: not worth it by default.)

Reported per contender: time per epoch including the reference pass (model loading and
tokenisation excluded on both sides; TRL pre-computes inside ``DPOTrainer.__init__``, so that
call's reference pass is timed on its own and added), tokens per second, peak memory. Then the
loss of one batch under a non-trivial adapter (random LoRA B), computed by both implementations
on the same pairs. Same LoRA (r, alpha, all projections, no dropout), batch size, max length,
lr schedule, steps.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


HEADLINE_ORDER = ["trl-accum", "trl", "trl-precompute", "ours-unfused"]
TOPICS = ["tea", "rain", "bikes", "maps", "salt", "bread", "clocks", "owls", "glass", "ink"]


def make_pairs(path: Path, n: int) -> None:
    """Template pairs of mixed lengths (a long answer now and then, as in real chats)."""
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            topic = TOPICS[i % len(TOPICS)]
            detail = f" It matters because {topic} shows up in daily life." * (1 + (i * 7) % 9)
            row = {
                "prompt": [{"role": "user", "content": f"Question {i}: tell me about {topic}."}],
                "chosen": [
                    {"role": "assistant", "content": f"{topic.title()} is useful.{detail} — Acme"}
                ],
                "rejected": [
                    {"role": "assistant", "content": f"No idea about {topic}." * (1 + i % 3)}
                ],
            }
            f.write(json.dumps(row) + "\n")


def plain_model_dir(model: Path, work: Path) -> Path:
    """The model with ``quantization_config`` dropped from its config.

    The prepared SmolLM2 directory holds plain fp32 safetensors but keeps the GGUF
    ``quantization_config`` of its source, and HF ``Trainer`` refuses to train "GGUF-quantised"
    models. Other files are symlinked, so both sides load exactly the same weights.
    """
    config = json.loads((model / "config.json").read_text())
    if "quantization_config" not in config:
        return model
    out = work / model.name
    out.mkdir()
    for f in model.iterdir():
        if f.name != "config.json":
            (out / f.name).symlink_to(f.resolve())
    del config["quantization_config"]
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def peak_memory_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def lora_config(args: argparse.Namespace):
    from peft import LoraConfig

    from trainer.config import LORA_TARGETS

    return LoraConfig(
        r=args.lora_r,
        lora_alpha=2 * args.lora_r,
        lora_dropout=0.0,
        target_modules=list(LORA_TARGETS),
        task_type="CAUSAL_LM",
    )


def our_config(args: argparse.Namespace, fused: bool = True):
    from trainer.dpo import TrainConfig

    return TrainConfig(
        fused=fused,
        epochs=args.epochs,
        batch_size=args.batch_size,
        micro_batch_size=args.micro_batch_size,
        lr=args.lr,
        beta=0.1,
        max_length=args.max_length,
        lora_r=args.lora_r,
        lora_alpha=2 * args.lora_r,
        eval_fraction=0.0,
        checkpoint_every=0,
    )


def trl_config(args: argparse.Namespace, out: Path, precompute: bool, accumulate: bool = False):
    import torch
    from trl import DPOConfig

    cuda = torch.cuda.is_available()
    # "trl-accum": TRL given our micro-batching, the same batch by gradient accumulation.
    micro = args.micro_batch_size if accumulate else args.batch_size
    return DPOConfig(
        output_dir=str(out),
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=args.batch_size // micro,
        max_steps=args.steps,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=0.1,  # a float is a ratio of the total
        beta=0.1,
        max_length=args.max_length,
        precompute_ref_log_probs=precompute,
        precompute_ref_batch_size=args.batch_size,
        gradient_checkpointing=cuda,
        bf16=cuda,
        use_cpu=not cuda,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )


def trl_dataset(path: Path):
    from datasets import Dataset

    rows = [json.loads(x) for x in path.read_text().splitlines()]
    return Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])


def run_ours(args: argparse.Namespace, fused: bool = True) -> dict:
    from trainer.dpo import train

    with tempfile.TemporaryDirectory() as tmp:
        result = train(
            our_config(args, fused),
            pairs=args.pairs_file,
            base=args.model,
            out=Path(tmp) / "adapter",
            progress_bar=False,
        )
    seconds = result.metrics["seconds"]
    return {
        "epoch_seconds": (seconds["reference"] + seconds["train"]) / args.epochs,
        "reference_seconds": seconds["reference"],
        "final_loss": result.metrics["train"]["loss"],
    }


def run_trl(args: argparse.Namespace, precompute: bool, accumulate: bool = False) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOTrainer

    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    # TRL pre-computes the reference log-probs inside DPOTrainer.__init__, next to tokenisation:
    # time that pass on its own so that both sides' epochs include their reference pass.
    reference = {"seconds": 0.0}
    precompute_ref = DPOTrainer._precompute_ref_logps

    def timed_precompute(self, *a, **kw):
        start = time.perf_counter()
        try:
            return precompute_ref(self, *a, **kw)
        finally:
            reference["seconds"] += time.perf_counter() - start

    DPOTrainer._precompute_ref_logps = timed_precompute
    with tempfile.TemporaryDirectory() as tmp:
        trainer = DPOTrainer(
            model=model,
            args=trl_config(args, Path(tmp), precompute, accumulate),
            train_dataset=trl_dataset(args.pairs_file),
            processing_class=tok,
            peft_config=lora_config(args),
        )
        start = time.perf_counter()
        out = trainer.train()
        seconds = time.perf_counter() - start + reference["seconds"]
    return {
        "epoch_seconds": seconds / args.epochs,
        "reference_seconds": reference["seconds"],
        "final_loss": out.training_loss,
    }


def loss_check(args: argparse.Namespace) -> dict:
    """One batch, one non-trivial adapter, both implementations' losses.

    TRL builds the LoRA from ``peft_config`` (so its reference is the disabled adapter, as ours
    is for a fresh adapter); then LoRA B gets random values and both compute the loss of the first
    ``batch_size`` pairs on that very model object.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOTrainer

    from trainer.data import load_examples
    from trainer.distributed import Dist
    from trainer.dpo import batch_losses, reference_logps

    tok = AutoTokenizer.from_pretrained(args.model)
    base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = DPOTrainer(
            model=base,
            args=trl_config(args, Path(tmp), precompute=False),
            train_dataset=trl_dataset(args.pairs_file),
            processing_class=tok,
            peft_config=lora_config(args),
        )
    model = trainer.model
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    model.eval()

    cols = ("prompt_ids", "chosen_ids", "rejected_ids")
    rows = [{k: trainer.train_dataset[i][k] for k in cols} for i in range(args.batch_size)]
    with torch.no_grad():
        theirs = trainer.compute_loss(model, trainer.data_collator(rows))

    cfg = our_config(args)
    d = Dist(0, 1, torch.device("cpu"))
    examples, _ = load_examples(args.pairs_file, tok, kind="pairs", max_length=args.max_length)
    batch = examples[: args.batch_size]
    ref = reference_logps(model, batch, cfg, d, tok.pad_token_id, fresh_lora=True)
    with torch.no_grad():
        ours, _ = batch_losses(model, batch, ref, cfg, d, tok.pad_token_id)
    same_tokens = all(
        tuple(r["prompt_ids"] + r["chosen_ids"])[: args.max_length] == e.chosen.ids
        and tuple(r["prompt_ids"] + r["rejected_ids"])[: args.max_length] == e.rejected.ids
        for r, e in zip(rows, batch, strict=True)
    )
    return {"ours": ours.mean().item(), "trl": theirs.item(), "same_tokens": same_tokens}


def count_tokens(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from trainer.data import load_examples

    tok = AutoTokenizer.from_pretrained(args.model)
    examples, _ = load_examples(args.pairs_file, tok, kind="pairs", max_length=args.max_length)
    return sum(len(e.chosen.ids) + len(e.rejected.ids) for e in examples)


def child(args: argparse.Namespace) -> None:
    import torch

    torch.manual_seed(0)
    if args.side in ("ours", "ours-unfused"):
        result = run_ours(args, fused=args.side == "ours")
    elif args.side == "losscheck":
        result = loss_check(args)
    else:
        result = run_trl(args, precompute=args.side != "trl", accumulate=args.side == "trl-accum")
    result["peak_mb"] = peak_memory_mb()
    print("RESULT " + json.dumps(result), flush=True)


def spawn(args: argparse.Namespace, side: str) -> dict:
    cmd = [sys.executable, __file__, "--child", side, "--pairs-file", str(args.pairs_file)]
    for name in ("model", "batch_size", "micro_batch_size", "max_length", "steps", "lr",
                 "lora_r", "pairs"):  # fmt: skip
        cmd += ["--" + name.replace("_", "-"), str(getattr(args, name))]
    env = dict(os.environ, TQDM_DISABLE="1", TRANSFORMERS_VERBOSITY="error")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{side} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    default_model = Path("~/.cache/prefloop/models/SmolLM2-135M-Instruct").expanduser()
    p.add_argument("--model", type=Path, default=default_model)
    p.add_argument("--pairs", type=int, default=32, help="number of template pairs")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps (pairs*epochs/batch)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--micro-batch-size", type=int, default=2, help="ours, and trl-accum")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--repeats", type=int, default=1, help="alternating rounds; medians reported")
    p.add_argument(
        "--sides",
        nargs="+",
        default=["ours", "trl-accum", "trl"],
        choices=["ours", "ours-unfused", "trl", "trl-precompute", "trl-accum"],
        help="trl-accum: TRL with precomputed reference and our micro-batch size, accumulated",
    )
    p.add_argument("--child", dest="side", help=argparse.SUPPRESS)
    p.add_argument("--pairs-file", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    per_epoch = args.pairs // args.batch_size
    assert args.pairs % args.batch_size == 0 and args.steps % per_epoch == 0, (
        f"--steps must be a whole number of epochs: a multiple of pairs / batch size ({per_epoch})"
    )
    args.epochs = args.steps // per_epoch
    return args


def main() -> None:
    args = parse_args()
    if args.side:
        child(args)
        return

    work = Path(tempfile.mkdtemp(prefix="prefloop-bench-"))
    args.pairs_file = work / "pairs.jsonl"
    make_pairs(args.pairs_file, args.pairs)
    args.model = plain_model_dir(args.model, work)
    tokens = count_tokens(args)
    print(
        f"model={args.model.name} pairs={args.pairs} steps={args.steps} epochs={args.epochs} "
        f"batch={args.batch_size} max_length={args.max_length} lora_r={args.lora_r} "
        f"tokens/epoch={tokens} threads={os.cpu_count()}"
    )
    runs: dict[str, list[dict]] = {side: [] for side in args.sides}
    for round_ in range(args.repeats):
        order = args.sides if round_ % 2 == 0 else args.sides[::-1]
        for side in order:
            r = spawn(args, side)
            runs[side].append(r)
            print(
                f"  round {round_ + 1} {side:15s} {r['epoch_seconds']:7.1f} s/epoch  "
                f"peak {r['peak_mb']:7.0f} MB",
                flush=True,
            )

    med = {
        side: {k: statistics.median(r[k] for r in rs) for k in ("epoch_seconds", "peak_mb")}
        for side, rs in runs.items()
    }
    print(f"\n{'':16s}{'s/epoch':>10s}{'tokens/s':>10s}{'peak MB':>10s}")
    for side, m in med.items():
        print(
            f"{side:16s}{m['epoch_seconds']:10.1f}{tokens / m['epoch_seconds']:10.0f}"
            f"{m['peak_mb']:10.0f}"
        )
    if "ours" in med:
        # The fair comparison first: TRL given our micro-batching (same batch, same memory knob).
        others = sorted((side for side in med if side != "ours"), key=HEADLINE_ORDER.index)
        for side in others:
            speed = med[side]["epoch_seconds"] / med["ours"]["epoch_seconds"]
            memory = med["ours"]["peak_mb"] / med[side]["peak_mb"]
            label = "HEADLINE ours vs" if side == "trl-accum" else "ours vs"
            print(
                f"{label} {side}: {speed:.2f}x epoch speed (target >= 2), "
                f"{memory:.2f}x peak memory (target <= 0.5)"
            )
        spread = {
            side: (max(r["epoch_seconds"] for r in rs) - min(r["epoch_seconds"] for r in rs))
            / med[side]["epoch_seconds"]
            for side, rs in runs.items()
        }
        print("run-to-run spread of s/epoch (max-min)/median: "
              + ", ".join(f"{k} {v:.0%}" for k, v in spread.items()))  # fmt: skip

    check = spawn(args, "losscheck")
    diff = abs(check["ours"] - check["trl"])
    print(
        f"\nloss on one batch, random LoRA B ~ N(0, 0.02): ours {check['ours']:.6f}  "
        f"TRL {check['trl']:.6f}  |diff| {diff:.2e} (target <= 1e-4)  "
        f"same tokens: {check['same_tokens']}"
    )


if __name__ == "__main__":
    main()
