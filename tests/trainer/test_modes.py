"""Training modes: a bf16 base, an NF4 (QLoRA) base, and FSDP2 across processes, each against
the fp32 single-process run on tiny random Llamas.

Tolerances. bf16 and NF4 change the frozen base, not the recipe: the reference log-probs come
from the same base as the policy, so the first loss is exactly log 2 in every mode, and after
that a step's loss differs from fp32's by what the base's rounding does to the gradients. bf16
keeps 8 bits of mantissa (relative rounding 2^-9, 0.2% per weight): losses within 2e-3 of fp32
(seen: 1.2e-4 after 12 steps). NF4 keeps 16 levels per weight, scaled per block of 64 (errors
of several percent per weight): within 2e-2 (seen: 3e-3). FSDP2 changes only where the numbers
live and the order of a few sums: 1e-5, as for DDP.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from tests.trainer.conftest import write_kto, write_pairs
from trainer.dpo import TrainConfig, main, train

TINY = TrainConfig(
    epochs=3, batch_size=4, lr=1e-3, max_length=128, eval_fraction=0, checkpoint_every=0
)
MODES = {
    "bf16": {"base_dtype": "bf16"},
    "nf4": {"base_dtype": "bf16", "quantize": "nf4"},  # QLoRA
}
TOLERANCE = {"bf16": 2e-3, "nf4": 2e-2}


def _train_lines(out: Path) -> list[dict]:
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [x for x in lines if x["split"] == "train"]


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(out / "adapter_model.safetensors")


def _assert_it_trained(lines: list[dict]) -> None:
    """Every step had a finite, non-zero gradient (the FSDP2 + 4-bit trap is loss 0 and NaN
    gradients), and the loss fell."""
    assert all(math.isfinite(x["grad_norm"]) and x["grad_norm"] > 1e-4 for x in lines), lines
    assert all(math.isfinite(x["loss"]) and x["loss"] > 0 for x in lines), lines
    assert lines[-1]["loss"] < lines[0]["loss"] - 0.05, "it trained"


@pytest.fixture(scope="module")
def fp32_run(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("fp32")
    pairs = write_pairs(tmp / "pairs.jsonl", 8)
    return train(TINY, pairs=pairs, base=tiny_llama_dir, out=tmp / "v1", progress_bar=False).out


@pytest.mark.parametrize("mode", sorted(MODES))
def test_bf16_and_nf4_train_like_fp32(
    mode: str, fp32_run: Path, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    from torchao.quantization import NF4Tensor

    pairs = write_pairs(tmp_path / "pairs.jsonl", 8)
    cfg = replace(TINY, **MODES[mode])
    result = train(cfg, pairs=pairs, base=tiny_llama_dir, out=tmp_path / "v1", progress_bar=False)

    base = result.model.get_base_model()
    q_proj = base.model.layers[0].self_attn.q_proj
    assert base.get_output_embeddings().weight.dtype == torch.bfloat16, "no fp32 copy kept"
    assert isinstance(q_proj.base_layer.weight, NF4Tensor) == (mode == "nf4")
    assert isinstance(base.model.layers[0].mlp.down_proj.base_layer.weight, NF4Tensor) == (
        mode == "nf4"
    )
    lora = [p for p in result.model.parameters() if p.requires_grad]
    assert lora and all(p.dtype == torch.float32 for p in lora), "LoRA (and AdamW state) fp32"

    ours, ref = _train_lines(result.out), _train_lines(fp32_run)
    assert ours[0]["loss"] == pytest.approx(math.log(2), abs=1e-6), "policy == reference"
    assert [x["loss"] for x in ours] == pytest.approx([x["loss"] for x in ref], abs=TOLERANCE[mode])
    _assert_it_trained(ours)
    # The same fp32 PEFT file as an fp32 run writes: what the serving side loads.
    mine, theirs = _adapter(result.out), _adapter(fp32_run)
    assert mine.keys() == theirs.keys()
    assert all(mine[k].dtype == torch.float32 == theirs[k].dtype for k in mine)
    assert all(mine[k].shape == theirs[k].shape for k in mine)
    manifest = json.loads((result.out / "manifest.json").read_text())
    assert manifest["config"]["base_dtype"] == "bf16"


@pytest.mark.parametrize("mode", sorted(MODES))
def test_chunked_logps_match_full_logits_in_every_mode(mode: str, tiny_llama_dir: Path) -> None:
    """The completion-only, chunked LM-head path against the model's own full-vocabulary
    logits, on the bf16 and NF4 bases (the fp32 case is in test_dpo)."""
    from trainer.data import Tokens, collate
    from trainer.logps import completion_logps
    from trainer.model import load_policy

    model = load_policy(tiny_llama_dir, None, replace(TINY, **MODES[mode]), torch.device("cpu"))
    seqs = [Tokens(tuple(range(5, 25)), 6), Tokens(tuple(range(40, 52)), 3)]
    batch = collate(seqs, 0)
    ours, _ = completion_logps(model, batch, chunk=5)
    ours.sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    with torch.no_grad():
        for row, s in enumerate(seqs):
            ids = torch.tensor([s.ids])
            logits = model(input_ids=ids).logits.float()
            full = logits[0, :-1].log_softmax(-1).gather(1, ids[0, 1:, None])[:, 0]
            # bf16 logits from the model's own head round to ~3 digits; ours are fp32.
            want = full[s.prompt_len - 1 :].sum().item()
            assert ours[row].item() == pytest.approx(want, rel=2e-2)


def test_the_modes_are_flags(tiny_llama_dir: Path, tmp_path: Path) -> None:
    pairs = write_pairs(tmp_path / "pairs.jsonl", 4)
    argv = ["train", "--pairs", str(pairs), "--base", str(tiny_llama_dir)]
    argv += ["--out", str(tmp_path / "v1")]
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--quantize", "int3"])
    assert exit_.value.code == 2
    with pytest.raises(SystemExit):
        main([*argv, "--distributed", "zero3"])
    assert not (tmp_path / "v1").exists()


# --- FSDP2: two processes (gloo) against one -------------------------------------------------


@pytest.fixture(scope="module")
def untied_llama_dir(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with its own LM head (as 8B and 70B Llamas have): FSDP2 shards the head."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig.from_pretrained(tiny_llama_dir)
    config.tie_word_embeddings = False
    torch.manual_seed(1)
    model = LlamaForCausalLM(config)
    out = tmp_path_factory.mktemp("untied-llama")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(out)
    return out


def _run(args: list[str], nproc: int) -> subprocess.CompletedProcess:
    launch = [sys.executable, "-m", "trainer"]
    if nproc > 1:
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                  "--nproc-per-node", str(nproc), "-m", "trainer"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*launch, *args], capture_output=True, text=True, env=env)


@pytest.mark.slow  # several training processes
@pytest.mark.parametrize(
    "model, flags",
    [("tied", []), ("untied", ["--base-dtype", "bf16", "--quantize", "nf4"])],
    ids=["tied-fp32", "untied-qlora"],
)
def test_fsdp2_two_processes_match_one(
    model: str, flags: list[str], tiny_llama_dir: Path, untied_llama_dir: Path, tmp_path: Path
) -> None:
    """`torchrun --nproc-per-node 2 ... --distributed fsdp2` (two CPU processes on gloo, every
    decoder layer, the LM head and LoRA sharded) takes the same optimizer steps as one process:
    8 pairs in batches of 4 per process is one step over all 8, as batch 8 is for one. Same
    losses and gradient norms, the same adapter, and it trains (QLoRA included: FSDP2 with NF4
    weights neither zeroes the loss nor makes the gradients NaN)."""
    base = tiny_llama_dir if model == "tied" else untied_llama_dir
    pairs = write_pairs(tmp_path / "p.jsonl", 8)
    common = ["train", "--pairs", str(pairs), "--base", str(base), "--epochs", "3",
              "--lr", "1e-3", "--max-length", "128", "--eval-fraction", "0",
              "--checkpoint-every", "0", "--no-progress", *flags]  # fmt: skip
    one = _run([*common, "--batch-size", "8", "--out", str(tmp_path / "one")], 1)
    assert one.returncode == 0, one.stderr[-2000:]
    two = _run(
        [*common, "--batch-size", "4", "--distributed", "fsdp2", "--out", str(tmp_path / "two")],
        2,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["config"]["distributed"] == "fsdp2"
    a, b = _train_lines(tmp_path / "one"), _train_lines(tmp_path / "two")
    assert [x["step"] for x in b] == [1, 2, 3]
    assert [x["loss"] for x in b] == pytest.approx([x["loss"] for x in a], abs=1e-5)
    assert [x["grad_norm"] for x in b] == pytest.approx([x["grad_norm"] for x in a], rel=1e-4)
    _assert_it_trained(b)
    ta, tb = _adapter(tmp_path / "one"), _adapter(tmp_path / "two")
    assert ta.keys() == tb.keys()
    for name in ta:
        assert_close(tb[name], ta[name], atol=1e-5, rtol=1e-4)


@pytest.mark.slow  # two processes
def test_fsdp2_refuses_a_mix_of_pairs_and_thumbs(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """Under FSDP2 every forward is a collective, so every process must run the same passes; a
    pair and a thumbs row take different ones. Refused up front, naming the alternative."""
    rows = write_pairs(tmp_path / "p.jsonl", 4).read_text()
    rows += write_kto(tmp_path / "k.jsonl", 4).read_text()
    (tmp_path / "mixed.jsonl").write_text(rows)
    args = ["train", "--pairs", str(tmp_path / "mixed.jsonl"), "--base", str(tiny_llama_dir),
            "--out", str(tmp_path / "v1"), "--distributed", "fsdp2", "--no-progress"]  # fmt: skip
    run = _run(args, 2)
    assert run.returncode != 0
    assert "use --distributed ddp" in run.stderr
    assert not (tmp_path / "v1").exists()


def _checkpoint_worker(rank: int, port: int, base: str, tmp: str) -> None:
    """Under FSDP2: a step, a checkpoint, a fresh sharded model and optimizer loaded from it,
    then one more step on each: the two must stay identical (weights and AdamW moments)."""
    from trainer.checkpoint import load_checkpoint, save_checkpoint
    from trainer.data import Tokens, collate
    from trainer.distributed import full_trainable_state, setup_distributed, shard_fsdp2
    from trainer.logps import completion_logps
    from trainer.model import load_policy

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2"
    )
    torch.set_num_threads(1)
    cfg = replace(TINY, distributed="fsdp2", quantize="nf4", base_dtype="bf16")
    d = setup_distributed(cfg.distributed)
    assert d.fsdp
    batch = collate([Tokens(tuple(range(5 + rank, 25)), 6)], 0)  # each rank its own data

    def fresh() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        model = load_policy(Path(base), None, cfg, d.device, place=False)
        shard_fsdp2(model, d)
        params = [p for p in model.parameters() if p.requires_grad]
        return model, torch.optim.AdamW(params, lr=1e-2)

    def step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        completion_logps(model, batch)[0].sum().neg().backward()
        optimizer.step()
        optimizer.zero_grad()

    path = Path(tmp) / "checkpoint.pt"
    model, optimizer = fresh()
    step(model, optimizer)
    save_checkpoint(path, 1, model, optimizer, torch.zeros(2), cfg, "sha", d)
    torch.distributed.barrier()
    again, again_optimizer = fresh()
    assert load_checkpoint(path, again, again_optimizer, cfg, "sha", d)[0] == 1
    step(model, optimizer)
    step(again, again_optimizer)
    a, b = full_trainable_state(model), full_trainable_state(again)
    if rank == 0:
        torch.save({"a": a, "b": b}, Path(tmp) / "states.pt")
    torch.distributed.destroy_process_group()


@pytest.mark.slow  # two processes
def test_fsdp2_checkpoints_resume_exactly(tiny_llama_dir: Path, tmp_path: Path) -> None:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(
        _checkpoint_worker, args=(port, str(tiny_llama_dir), str(tmp_path)), nprocs=2, join=True
    )
    states = torch.load(tmp_path / "states.pt")
    a, b = states["a"], states["b"]
    assert a.keys() == b.keys() and a
    assert any(torch.count_nonzero(v) for k, v in a.items() if "lora_B" in k), "it stepped"
    for name in a:
        assert torch.equal(a[name], b[name]), name
