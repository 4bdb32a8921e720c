"""Training throughput, MFU and peak memory per mode, and peak memory against sequence length.

    .venv/bin/python bench/train_scale.py                     # CPU, small shapes: a few minutes
    .venv/bin/python bench/train_scale.py --part length       # only memory against length
    python bench/train_scale.py --shape llama-8b              # CUDA: bf16 MFU (target >= 45%)
    python bench/train_scale.py --shape llama-70b --quantize nf4 --steps 3   # CUDA: QLoRA memory

Random weights from a config built here (no hub); SmolLM2's tokenizer (``prefloop prepare``)
turns the synthetic pairs into ids. Every run is its own process, so its peak memory is its own
(``ru_maxrss``, the largest over ranks; ``torch.cuda.max_memory_allocated`` on GPU).

**Modes.** Each mode is a ``trainer.dpo.train`` run, end to end (load, reference pass, loop), on a
saved random-weight model: precision fp32 / bf16 (``base_dtype``) / QLoRA (``quantize`` nf4,
bf16 base), one process or two under torchrun with ``distributed`` ddp / fsdp2. A mode whose
``TrainConfig`` field does not exist is skipped with a message. Tokens count both answers of a
pair with their prompt (TRL's count; we run each prompt once, so we do less work than counted).

    MFU = (6 N T_train + 2 N T_ref) / seconds / peak FLOP/s

with N every parameter of the model (frozen base included: the backward still runs through it),
T_train the tokens trained (forward + backward, 6 N per token), T_ref the tokens of the reference
pass (forward only, 2 N per token), seconds the reference pass plus the loop. Attention's
L^2 FLOPs are left out (the standard, conservative count). Peak: the GPU's dense bf16 rate from
its name; on CPU, a measured fp32 matmul rate (so CPU MFU is against what this CPU sustains).

**Length.** One sequence of L tokens, all of them scored (the worst case for logits), through a
shallow model with SmolLM2's 49k vocabulary (depth is not what this measures): our chunked
log-probs (``trainer.logps.token_logps``, at most ``logits_chunk`` rows of logits at a time)
against ``model(...).logits.log_softmax(-1)`` (full (L, vocab) logits, and their gradient).

``--shape llama-70b --quantize nf4`` builds the model layer by layer on the GPU, quantizing each
layer before the next exists (a 70B bf16 model fits neither the GPU nor the disk), then trains a
few steps with the recipe's own functions and reports peak memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TOKENIZER = Path("~/.cache/prefloop/models/SmolLM2-135M-Instruct").expanduser()
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")

# Known shapes. SmolLM2-135M is the CPU default (``--layers`` cuts its depth to keep CPU runs
# short); the Llama shapes are Llama-3.1's published configs.
SHAPES = {
    "smollm2": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, intermediate_size=1536, vocab_size=49152,
                    tie_word_embeddings=True, rope_theta=100000.0),
    "llama-8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, intermediate_size=14336, vocab_size=128256,
                     tie_word_embeddings=False, rope_theta=500000.0),
    "llama-70b": dict(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64,
                      num_key_value_heads=8, intermediate_size=28672, vocab_size=128256,
                      tie_word_embeddings=False, rope_theta=500000.0),
}  # fmt: skip

# Dense bf16 peak FLOP/s by GPU name (vendor data sheets, SXM parts).
GPU_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}

PRECISIONS = {
    "fp32": {"base_dtype": "fp32"},
    "bf16": {"base_dtype": "bf16"},
    "qlora": {"base_dtype": "bf16", "quantize": "nf4"},
}
LAYOUTS = {"single": {}, "ddp": {"distributed": "ddp"}, "fsdp2": {"distributed": "fsdp2"}}


def llama_config(shape: str, layers: int | None):
    from transformers import LlamaConfig

    fields = dict(SHAPES[shape], max_position_embeddings=131072, pad_token_id=2)
    if layers:
        fields["num_hidden_layers"] = layers
    return LlamaConfig(**fields)


def n_params(config) -> int:
    """Parameters of a Llama config (embeddings counted once when tied)."""
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    return config.num_hidden_layers * layer + v * h * (1 if config.tie_word_embeddings else 2) + h


def peak_flops(device: str) -> tuple[float, str]:
    import torch

    if device == "cuda":
        name = torch.cuda.get_device_name()
        for key, flops in GPU_PEAK_BF16.items():
            if key in name:
                return flops, f"{name}, dense bf16 data-sheet peak"
        raise SystemExit(f"no peak bf16 FLOP/s known for {name}: add it to GPU_PEAK_BF16")
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b
    start, reps = time.perf_counter(), 20
    for _ in range(reps):
        a @ b
    rate = reps * 2 * 1024**3 / (time.perf_counter() - start)
    return rate, "this CPU's measured fp32 1024x1024 matmul rate"


def peak_memory_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def make_pairs(path: Path, n: int, words: int) -> None:
    """``n`` pairs whose answers are about ``words`` words each."""
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            body = " ".join(f"w{(i * 31 + k) % 997}" for k in range(words))
            row = {
                "prompt": [{"role": "user", "content": f"Question {i}: say something."}],
                "chosen": [{"role": "assistant", "content": "Yes. " + body}],
                "rejected": [{"role": "assistant", "content": "No. " + body[::-1]}],
            }
            f.write(json.dumps(row) + "\n")


def save_random_model(config, out: Path, device: str) -> None:
    """Random weights of ``config`` plus SmolLM2's tokenizer, as a model directory."""
    import torch
    from transformers import LlamaForCausalLM

    if not (TOKENIZER / "tokenizer.json").exists():
        raise SystemExit(f"{TOKENIZER}: no tokenizer; run `prefloop prepare` first")
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (TOKENIZER / name).exists():
            shutil.copy(TOKENIZER / name, out / name)


# --- modes --------------------------------------------------------------------------------------


def missing_fields(options: dict) -> list[str]:
    from trainer.dpo import TrainConfig

    have = {f.name for f in dataclasses.fields(TrainConfig)}
    return [k for k in options if k not in have]


def mode_child(args: argparse.Namespace) -> None:
    import torch

    from trainer.dpo import TrainConfig, train

    options = json.loads(args.options)
    cfg = TrainConfig(
        epochs=1, batch_size=args.batch_size, micro_batch_size=args.micro_batch_size,
        max_length=args.max_length, eval_fraction=0.0, checkpoint_every=0, **options,
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        result = train(
            cfg, pairs=args.pairs_file, base=args.model, out=Path(tmp) / "a", progress_bar=False
        )
    m = result.metrics
    peak = torch.tensor([peak_memory_mb()])
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
        rank = torch.distributed.get_rank()
        torch.distributed.destroy_process_group()
        if rank != 0:
            return
    out = {
        "tokens_per_second": m["tokens_per_second"],
        "seconds_reference": m["seconds"]["reference"],
        "seconds_train": m["seconds"]["train"],
        "peak_mb": peak.item(),
        "loss": m["train"].get("loss"),
    }
    print("RESULT " + json.dumps(out), flush=True)


def run_child(cmd: list[str], timeout: float) -> dict | str:
    env = dict(os.environ, TQDM_DISABLE="1", TRANSFORMERS_VERBOSITY="error")
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return f"timed out after {timeout:.0f} s"
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = [x for x in proc.stderr.strip().splitlines() if x.strip()][-1:]
        return "failed: " + (tail[0][:160] if tail else f"exit {proc.returncode}")
    return json.loads(lines[-1][len("RESULT ") :])


def run_modes(args: argparse.Namespace, work: Path, device: str) -> None:
    config = llama_config(args.shape, args.layers)
    model_dir = work / "model"
    save_random_model(config, model_dir, device)
    pairs = work / "pairs.jsonl"
    make_pairs(pairs, args.pairs, args.answer_words)
    n = n_params(config)
    peak, peak_what = peak_flops(device)
    precisions = args.precisions or (["qlora"] if args.quantize == "nf4" else list(PRECISIONS))
    print(
        f"\nmodes: shape={args.shape} layers={config.num_hidden_layers} params={n / 1e6:.0f}M "
        f"pairs={args.pairs} batch={args.batch_size} micro={args.micro_batch_size} "
        f"device={device}\npeak for MFU: {peak / 1e12:.2f} TFLOP/s ({peak_what})"
    )
    print(f"{'mode':18s}{'tokens/s':>10s}{'MFU':>8s}{'peak MB':>10s}{'loss':>9s}")
    child = [sys.executable, __file__, "--child", "mode", "--model", str(model_dir),
             "--pairs-file", str(pairs), "--batch-size", str(args.batch_size),
             "--micro-batch-size", str(args.micro_batch_size),
             "--max-length", str(args.max_length)]  # fmt: skip
    for precision in precisions:
        for layout in args.layouts:
            name = f"{precision}/{layout}"
            options = PRECISIONS[precision] | LAYOUTS[layout]
            if device == "cpu" and precision == "fp32":
                options = options | {"bf16": False}
            missing = missing_fields(options)
            if missing:
                print(f"{name:18s}skipped: TrainConfig has no field {', '.join(missing)}")
                continue
            cmd = child + ["--options", json.dumps(options)]
            if layout != "single":
                cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                       "--master-port", str(29500 + os.getpid() % 1000)] + cmd[1:]  # fmt: skip
            r = run_child(cmd, args.timeout)
            if isinstance(r, str):
                print(f"{name:18s}{r}")
                continue
            seconds = r["seconds_reference"] + r["seconds_train"]
            t_train = r["tokens_per_second"] * r["seconds_train"]
            ranks = 1 if layout == "single" else 2
            flops = 6 * n * t_train + 2 * n * t_train  # one epoch: the reference saw T_train
            mfu = flops / seconds / (peak * ranks)
            print(
                f"{name:18s}{t_train / seconds:10.0f}{mfu:8.1%}{r['peak_mb']:10.0f}"
                f"{r['loss']:9.4f}",
                flush=True,
            )


# --- memory against length ----------------------------------------------------------------------


def length_child(args: argparse.Namespace) -> None:
    import torch
    from transformers import LlamaForCausalLM

    from trainer.data import Tokens, collate
    from trainer.logps import token_logps

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = llama_config("smollm2", args.layers)
    torch.manual_seed(0)
    with device:
        model = LlamaForCausalLM(config)
    model.config.use_cache = False
    model.requires_grad_(False)
    for layer in model.model.layers:  # a trainable piece in every layer, as LoRA has
        layer.self_attn.o_proj.weight.requires_grad_(True)
    ids = torch.randint(3, config.vocab_size, (args.length,)).tolist()
    batch = collate([Tokens(tuple(ids), 1)], 0).to(device)
    loaded = peak_memory_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if args.method == "ours":
        logps = token_logps(model, batch, 1024).sum()
    else:
        logits = model(input_ids=batch.input_ids, use_cache=False).logits
        logps = logits[0, :-1].log_softmax(-1).gather(1, batch.input_ids[0, 1:, None]).sum()
    logps.backward()
    print("RESULT " + json.dumps({"peak_mb": peak_memory_mb(), "loaded_mb": loaded}), flush=True)


def run_lengths(args: argparse.Namespace) -> None:
    print(
        f"\nmemory against length: SmolLM2 shape, {args.length_layers} layers, vocab 49152, "
        "one sequence, every token scored, forward + backward"
    )
    print(f"{'tokens':>8s}{'ours MB':>10s}{'full-logits MB':>16s}{'(L, vocab) fp32 MB':>20s}")
    for length in args.lengths:
        row = {}
        for method in ("ours", "full"):
            cmd = [sys.executable, __file__, "--child", "length", "--method", method,
                   "--length", str(length), "--layers", str(args.length_layers)]  # fmt: skip
            row[method] = run_child(cmd, args.timeout)
        cells = [
            f"{r['peak_mb']:.0f}" if isinstance(r, dict) else r for r in (row["ours"], row["full"])
        ]
        logits_mb = length * 49152 * 4 / 2**20
        print(f"{length:8d}{cells[0]:>10s}{cells[1]:>16s}{logits_mb:20.0f}", flush=True)


# --- a model too big to save: built layer by layer -------------------------------------------


def build_quantized(config, device, quantize: str):
    """Random bf16 weights, one decoder layer at a time, each layer's linears quantized to NF4
    (torchao, QLoRA's 64-weight blocks) before the next layer exists."""
    import torch
    from transformers import LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    outer = [model.model.embed_tokens, model.model.norm, model.lm_head]
    for module in [*outer, *model.model.layers]:
        module.to_empty(device=device)
        with torch.no_grad():
            for name, p in module.named_parameters():
                p.fill_(1.0) if "norm" in name else p.normal_(0, 0.02)
        if module in outer or quantize != "nf4":
            continue
        from torchao.quantization import to_nf4

        for linear in module.modules():
            if isinstance(linear, torch.nn.Linear):
                w = linear.weight.detach()  # small test shapes: fewer scales per block
                nf4 = to_nf4(w, 64, math.gcd(256, w.numel() // 64))
                linear.weight = torch.nn.Parameter(nf4, requires_grad=False)
    model.model.rotary_emb = LlamaRotaryEmbedding(config).to(device)
    model.config.use_cache = False
    return model


def built_child(args: argparse.Namespace) -> None:
    """A few optimizer steps with the recipe's functions on a model built in memory."""
    import torch
    from peft import LoraConfig, get_peft_model

    from trainer.config import LORA_TARGETS, TrainConfig
    from trainer.data import PairExample, Tokens
    from trainer.distributed import Dist
    from trainer.dpo import batch_losses, reference_logps

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = llama_config(args.shape, args.layers)
    model = build_quantized(config, device, args.quantize)
    torch.manual_seed(0)
    lora = LoraConfig(r=16, lora_alpha=32, target_modules=list(LORA_TARGETS), lora_dropout=0.0)
    model = get_peft_model(model, lora)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()  # LoRA weights and their AdamW state in fp32
    if device.type == "cuda":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    cfg = TrainConfig(batch_size=args.micro_batch_size, micro_batch_size=args.micro_batch_size,
                      max_length=args.max_length, bf16=True)  # fmt: skip
    d = Dist(0, 1, device)
    gen = torch.Generator().manual_seed(0)
    prompt, answer = 64, (args.max_length - 64) // 2

    def ids(n: int) -> tuple[int, ...]:
        return tuple(torch.randint(3, config.vocab_size, (n,), generator=gen).tolist())

    examples = []
    for _ in range(args.steps * args.micro_batch_size):
        p = ids(prompt)
        examples.append(
            PairExample(Tokens(p + ids(answer), prompt), Tokens(p + ids(answer), prompt))
        )
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    start = time.perf_counter()
    ref = reference_logps(model, examples, cfg, d, 0, fresh_lora=True)
    model.train()
    for step in range(args.steps):
        idx = list(range(step * args.micro_batch_size, (step + 1) * args.micro_batch_size))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            per_example, _ = batch_losses(model, [examples[i] for i in idx], ref[idx], cfg, d, 0)
        per_example.mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    tokens = len(examples) * 2 * (prompt + answer)
    n = n_params(config)
    peak, _ = peak_flops(device.type)
    print("RESULT " + json.dumps({
        "peak_mb": peak_memory_mb(), "seconds": seconds, "tokens_per_second": tokens / seconds,
        "mfu": 8 * n * tokens / seconds / peak, "loss": per_example.mean().item(),
    }), flush=True)  # fmt: skip


# --- entry --------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=["all", "modes", "length"], default="all")
    p.add_argument("--shape", choices=list(SHAPES), default="smollm2")
    p.add_argument("--layers", type=int, help="cut the shape's depth (CPU default: 4)")
    p.add_argument("--quantize", choices=["none", "nf4"], default="none")
    p.add_argument("--precisions", nargs="+", choices=list(PRECISIONS))
    p.add_argument("--layouts", nargs="+", choices=list(LAYOUTS), default=list(LAYOUTS))
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--answer-words", type=int, default=60, help="words per answer")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--steps", type=int, help="llama-70b: optimizer steps")
    p.add_argument("--lengths", nargs="+", type=int, default=[512, 2048, 8192])
    p.add_argument("--length-layers", type=int, default=2)
    p.add_argument("--timeout", type=float, default=900, help="seconds per run")
    p.add_argument("--child", choices=["mode", "length", "built"], help=argparse.SUPPRESS)
    p.add_argument("--options", help=argparse.SUPPRESS)
    p.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--pairs-file", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--length", type=int, help=argparse.SUPPRESS)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if args.child == "mode":
        mode_child(args)
        return
    if args.child == "length":
        length_child(args)
        return
    if args.child == "built":
        built_child(args)
        return

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and args.shape != "smollm2":
        raise SystemExit(f"--shape {args.shape} needs a CUDA GPU")
    if device == "cpu" and args.layers is None:
        args.layers = 4
    print(f"device={device} threads={torch.get_num_threads()} torch={torch.__version__}")
    if args.shape == "llama-70b":
        cmd = [sys.executable, __file__, "--child", "built", "--shape", args.shape,
               "--quantize", args.quantize, "--steps", str(args.steps or 3),
               "--micro-batch-size", str(args.micro_batch_size),
               "--max-length", str(args.max_length)]  # fmt: skip
        r = run_child(cmd, args.timeout)
        print(f"llama-70b, quantize {args.quantize}: {r}")
        return
    work = Path(tempfile.mkdtemp(prefix="prefloop-scale-"))
    try:
        if args.part in ("all", "modes"):
            run_modes(args, work, device)
        if args.part in ("all", "length"):
            run_lengths(args)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
