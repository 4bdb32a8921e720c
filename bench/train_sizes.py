"""Peak GPU memory and training throughput of `trainer.dpo.train` for model shapes of several
sizes, for the README's sizing table. Needs a CUDA GPU; the models are randomly initialised in
the real shapes (speed and memory do not depend on the weights), with a small tokenizer trained
here, so nothing is downloaded.

    python bench/train_sizes.py [--shapes 135M 1.2B 8B] [--pairs 64] [--micro 2 8]
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trainer.dpo import TrainConfig, train  # noqa: E402

# hidden, intermediate, layers, heads, kv heads, vocab, tied embeddings
SHAPES = {
    "tiny": (64, 128, 2, 4, 2, 4000, True),  # a smoke test, runs on CPU too
    "135M": (576, 1536, 30, 9, 3, 49152, True),  # SmolLM2-135M
    "1.2B": (2048, 8192, 16, 32, 8, 128256, True),  # Llama-3.2-1B
    "8B": (4096, 14336, 32, 32, 8, 128256, False),  # Llama-3.1-8B
}


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    words = [f"w{i}" for i in range(5000)]
    tok.train_from_iterator(
        words, trainers.BpeTrainer(vocab_size=4000, special_tokens=["<unk>", "<s>", "</s>"])
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", eos_token="</s>", pad_token="<unk>",
        bos_token="<s>",
    )  # fmt: skip
    fast.chat_template = (
        "{% for m in messages %}{{m.role}}:{{m.content}}</s>{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    return fast


def write_pairs(path: Path, n: int, words: int = 120) -> Path:
    with path.open("w") as f:
        for i in range(n):

            def msg(step: int, role: str, i: int = i) -> list[dict]:
                text = " ".join(f"w{(i * step + j) % 5000}" for j in range(words))
                return [{"role": role, "content": text}]

            row = {"prompt": msg(3, "user"), "chosen": msg(5, "assistant"),
                   "rejected": msg(7, "assistant")}  # fmt: skip
            f.write(json.dumps(row) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["135M", "1.2B", "8B"], choices=list(SHAPES))
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--micro", nargs="+", type=int, default=[2, 8])
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    assert cuda or args.shapes == ["tiny"], "this benchmark needs a CUDA GPU (or --shapes tiny)"
    from transformers import LlamaConfig, LlamaForCausalLM

    tmp = Path(tempfile.mkdtemp(prefix="train-sizes-"))
    pairs = write_pairs(tmp / "pairs.jsonl", args.pairs)
    tok = tokenizer()
    device = torch.cuda.get_device_name() if cuda else "CPU"
    print(f"{device}; {args.pairs} pairs, batch 8, max_length 512, 1 epoch")
    for name in args.shapes:
        h, inter, layers, heads, kv, vocab, tied = SHAPES[name]
        config = LlamaConfig(
            hidden_size=h, intermediate_size=inter, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
            tie_word_embeddings=tied,
        )  # fmt: skip
        with torch.device("cuda" if cuda else "cpu"):
            model = LlamaForCausalLM(config).to(torch.bfloat16)
        base = tmp / f"model-{name}"
        model.save_pretrained(base)
        tok.save_pretrained(base)
        del model
        for micro in args.micro:
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            cfg = TrainConfig(epochs=1, batch_size=8, micro_batch_size=micro, max_length=512,
                              eval_fraction=0.0, checkpoint_every=0)  # fmt: skip
            result = train(cfg, pairs=pairs, base=base, out=tmp / f"out-{name}-{micro}",
                           progress_bar=False)  # fmt: skip
            seconds = result.metrics["seconds"]
            print(json.dumps({
                "model": name, "micro_batch": micro,
                "peak_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 1) if cuda else None,
                "tokens_per_s": round(result.metrics["tokens_per_second"]),
                "train_s": round(seconds["train"], 1),
                "reference_s": round(seconds["reference"], 1),
                "wall_s": round(time.perf_counter() - t0, 1),
            }), flush=True)  # fmt: skip
            del result


if __name__ == "__main__":
    main()
