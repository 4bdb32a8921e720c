"""The training loop: completion-only log-probs, schedule, saved adapters, resume, warm start,
KTO, DDP, and (slow) a real SmolLM2 run that moves the held-out preference margin."""

from __future__ import annotations

import json
import math
import os
import socket
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from tests.trainer.conftest import write_pairs
from trainer.data import Tokens, collate, collate_pairs, data_kind, load_examples
from trainer.distributed import Dist
from trainer.dpo import (
    TrainConfig,
    get_lr,
    kto_lambdas,
    main,
    train,
)
from trainer.logps import completion_logps
from trainer.model import load_policy

TINY = TrainConfig(epochs=2, batch_size=4, lr=1e-3, max_length=128, checkpoint_every=0)


def _train_lines(out: Path) -> list[dict]:
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [x for x in lines if x["split"] == "train"]


def _adapter_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path / "adapter_model.safetensors")


# --- log-probs over completion tokens only ----------------------------------------------------


def _naive_logps(model, seqs, pad_id: int) -> torch.Tensor:
    """The plain way: each sequence on its own row, full logits, log-softmax, completion mask."""
    width = max(len(s.ids) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.bool)
    for row, s in enumerate(seqs):
        ids[row, : len(s.ids)] = torch.tensor(s.ids)
        attn[row, : len(s.ids)] = 1
        mask[row, s.prompt_len : len(s.ids)] = True
    logits = model(input_ids=ids, attention_mask=attn).logits
    token_logps = logits[:, :-1].log_softmax(-1).gather(2, ids[:, 1:, None])[..., 0]
    return (token_logps * mask[:, 1:]).sum(1)


@pytest.mark.parametrize("shared_prompt", [True, False])
def test_completion_logps_match_full_logits(
    shared_prompt: bool, tiny_llama_dir: Path, pairs_file: Path
) -> None:
    """Our path (prompt run once per pair, hidden states gathered at completion positions,
    chunked LM head, gradient computed in the forward) against the plain one."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    examples, _ = load_examples(pairs_file, tok, kind="pairs", max_length=128)
    pairs = [examples[i] for i in (0, 3, 4)]  # different lengths, so there is padding
    seqs = [e.chosen for e in pairs] + [e.rejected for e in pairs]
    batch = collate_pairs(pairs, tok.pad_token_id) if shared_prompt else collate(seqs, 2)
    model = load_policy(tiny_llama_dir, None, replace(TINY, lora_r=4), torch.device("cpu"))
    with torch.no_grad():  # a non-trivial adapter, so gradients reach LoRA through it
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)

    ours, counts = completion_logps(model, batch, chunk=7)  # chunk boundaries mid-sequence
    ours.sum().backward()
    ours_grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    naive = _naive_logps(model, seqs, tok.pad_token_id)
    naive.sum().backward()
    naive_grads = [p.grad for p in model.parameters() if p.requires_grad]

    assert counts.tolist() == [s.completion_len for s in seqs], "prompt tokens are not scored"
    assert_close(ours, naive, atol=1e-5, rtol=1e-5)
    # Gradients sum thousands of float32 terms in a different order on each path: 1e-5 was
    # exceeded (1.9e-5) once in ~1 of 10 runs; a wrong gradient is off by far more.
    for a, b in zip(ours_grads, naive_grads, strict=True):
        assert_close(a, b, atol=5e-5, rtol=1e-4)


def test_prompt_tokens_do_not_count(tiny_llama_dir: Path, pairs_file: Path) -> None:
    """Counting one more token as completion changes the sum by exactly that token's log-prob."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    examples, _ = load_examples(pairs_file, tok, kind="pairs", max_length=128)
    seq = examples[0].chosen
    p = seq.prompt_len
    model = load_policy(tiny_llama_dir, None, TINY, torch.device("cpu"))
    with torch.no_grad():
        base, _ = completion_logps(model, collate([seq], tok.pad_token_id))
        wider, _ = completion_logps(model, collate([Tokens(seq.ids, p - 1)], tok.pad_token_id))
        logits = model(input_ids=torch.tensor([seq.ids])).logits[0, p - 2].log_softmax(-1)
    assert_close(wider - base, logits[seq.ids[p - 1]].reshape(1))


def test_lr_schedule_warms_up_then_decays() -> None:
    cfg = TrainConfig(lr=1.0, warmup_ratio=0.1, min_lr_ratio=0.1)
    lrs = [get_lr(s, 100, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False)), "decays monotonically"
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3)


# --- a whole run on the tiny model ------------------------------------------------------------


def test_train_writes_a_peft_adapter_with_manifest(
    tiny_llama_dir: Path, pairs_file: Path, tmp_path: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "v1"
    seen = []
    result = train(
        TINY,
        pairs=pairs_file,
        base=tiny_llama_dir,
        out=out,
        on_progress=lambda step, total, m: seen.append((step, total, m["loss"])),
        progress_bar=False,
    )
    assert result.out == out
    assert {"adapter_config.json", "adapter_model.safetensors", "manifest.json"} <= {
        p.name for p in out.iterdir()
    }
    assert not any(p.name.endswith(".partial") for p in tmp_path.iterdir()), "no leftovers"

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["lr"] == TINY.lr and manifest["parent"] is None
    assert manifest["base_model"] == str(tiny_llama_dir) and len(manifest["data"]["sha256"]) == 64
    assert manifest["metrics"]["examples"] == {"train": 22, "heldout": 2, "dropped": 0}
    ev = manifest["metrics"]["eval"]
    assert ev["before"]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert ev["after"]["margin"] > ev["before"]["margin"]

    lines = _train_lines(out)
    assert [x["step"] for x in lines] == list(range(1, 13))  # 22 pairs / 4 -> 6 steps x 2 epochs
    assert lines[0]["loss"] == pytest.approx(math.log(2), abs=1e-5), "policy == reference at start"
    assert {"loss", "rewards/chosen", "rewards/rejected", "accuracy", "margin"} <= lines[0].keys()
    assert [s for s, _, _ in seen] == list(range(1, 13)) and seen[0][1] == 12

    # peft loads the directory unchanged, and it holds the trained weights.
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    loaded = PeftModel.from_pretrained(base, out)
    trained = {n: p for n, p in result.model.named_parameters() if "lora_" in n}
    for name, p in loaded.named_parameters():
        if "lora_" in name:
            assert_close(p, trained[name])

    with pytest.raises(FileExistsError):
        train(TINY, pairs=pairs_file, base=tiny_llama_dir, out=out, progress_bar=False)


def test_resume_gives_the_same_losses(
    tiny_llama_dir: Path, pairs_file: Path, tmp_path: Path
) -> None:
    cfg = replace(TINY, checkpoint_every=2)
    full = train(cfg, pairs=pairs_file, base=tiny_llama_dir, out=tmp_path / "a", progress_bar=False)

    class Crash(Exception):
        pass

    def crash_at_5(step: int, total: int, metrics: dict) -> None:
        if step == 5:
            raise Crash  # after step 5 was taken; the last checkpoint is from step 4

    with pytest.raises(Crash):
        train(
            cfg,
            pairs=pairs_file,
            base=tiny_llama_dir,
            out=tmp_path / "b",
            on_progress=crash_at_5,
            progress_bar=False,
        )
    assert (tmp_path / ".b.partial" / "checkpoint.pt").exists()
    resumed = train(
        cfg,
        pairs=pairs_file,
        base=tiny_llama_dir,
        out=tmp_path / "b",
        resume=True,
        progress_bar=False,
    )
    a, b = _train_lines(full.out), _train_lines(resumed.out)
    assert [x["step"] for x in b] == list(range(1, 13))
    for x, y in zip(a, b, strict=True):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-6), x["step"]
    ta, tb = _adapter_tensors(full.out), _adapter_tensors(resumed.out)
    for name in ta:
        assert_close(ta[name], tb[name], atol=1e-6, rtol=0)


def test_warm_start_refers_to_the_parent_adapter(
    tiny_llama_dir: Path, pairs_file: Path, tmp_path: Path
) -> None:
    parent = train(
        TINY, pairs=pairs_file, base=tiny_llama_dir, out=tmp_path / "v1", progress_bar=False
    )
    child = train(
        replace(TINY, epochs=1),
        pairs=pairs_file,
        base=tiny_llama_dir,
        out=tmp_path / "v2",
        init_adapter=parent.out,
        progress_bar=False,
    )
    lines = _train_lines(child.out)
    # The policy starts from the parent and the reference *is* the parent: log 2 at step 1.
    assert lines[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    manifest = json.loads((child.out / "manifest.json").read_text())
    assert manifest["parent"] == str(parent.out)
    pa, ch = _adapter_tensors(parent.out), _adapter_tensors(child.out)
    assert pa.keys() == ch.keys() and any(not torch.equal(pa[k], ch[k]) for k in pa)


@pytest.mark.parametrize("loss", ["cdpo", "robust", "ipo", "hinge"])
def test_paired_variants_train(
    loss: str, tiny_llama_dir: Path, pairs_file: Path, tmp_path: Path
) -> None:
    cfg = replace(TINY, loss=loss, epochs=1, beta=0.5)
    result = train(
        cfg, pairs=pairs_file, base=tiny_llama_dir, out=tmp_path / loss, progress_bar=False
    )
    lines = _train_lines(result.out)
    assert all(math.isfinite(x["loss"]) for x in lines)
    assert lines[-1]["margin"] > 0


def test_rpo_and_weights(tiny_llama_dir: Path, tmp_path: Path) -> None:
    path = write_pairs(tmp_path / "p.jsonl", 8)
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    weighted = tmp_path / "w.jsonl"
    weighted.write_text("".join(json.dumps(r | {"weight": 0.0}) + "\n" for r in rows))
    cfg = replace(TINY, epochs=1, rpo_alpha=1.0)
    rpo = train(cfg, pairs=path, base=tiny_llama_dir, out=tmp_path / "rpo", progress_bar=False)
    assert _train_lines(rpo.out)[0]["loss"] > math.log(2) + 1, "the NLL term is added"
    # Zero weights: no gradient at all, so the adapter stays at its initial value (B = 0).
    zero = train(cfg, pairs=weighted, base=tiny_llama_dir, out=tmp_path / "w0", progress_bar=False)
    assert all(
        torch.count_nonzero(t) == 0 for n, t in _adapter_tensors(zero.out).items() if "lora_B" in n
    )


def test_rpo_span_diverged_counts_only_what_the_edit_added(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    """An operator's edit appends a line to the model's answer: with rpo_span "diverged" the NLL
    is the mean over the appended tokens only (policy == reference, so the DPO part is log 2)."""
    from transformers import AutoTokenizer

    from trainer.data import PairExample
    from trainer.dpo import batch_losses

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    prompt = [{"role": "user", "content": "How do I reset it?"}]
    answer = "Hold the button for ten seconds."
    tmp = tmp_path / "edit.jsonl"
    tmp.write_text(json.dumps({
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": answer + "\n\n-- Acme Support"}],
        "rejected": [{"role": "assistant", "content": answer}],
    }) + "\n")  # fmt: skip
    [pair], _ = load_examples(tmp, tok, kind="pairs", max_length=128)
    assert isinstance(pair, PairExample)
    p = pair.chosen.prompt_len
    shared = 0
    while pair.chosen.ids[p + shared] == pair.rejected.ids[p + shared]:
        shared += 1
    assert 0 < shared < pair.chosen.completion_len  # the answer is shared, the sign-off is not

    batch = collate_pairs([pair], tok.pad_token_id)
    flags = batch.score_diverged.tolist()
    c = pair.chosen.completion_len
    assert flags[:c] == [k >= shared for k in range(c)]
    assert flags[c:] == [k >= shared for k in range(pair.rejected.completion_len)]

    model = load_policy(tiny_llama_dir, None, TINY, torch.device("cpu"))
    d = Dist(0, 1, torch.device("cpu"))
    with torch.no_grad():
        ids = torch.tensor([pair.chosen.ids])
        token_logps = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
        token_logps = token_logps.gather(1, ids[0, 1:, None])[:, 0][p - 1 :]  # completion tokens
        ref = torch.stack(completion_logps(model, batch)[0].chunk(2), dim=1)
        losses = {}
        for span in ("chosen", "diverged"):
            cfg = replace(TINY, rpo_alpha=1.0, rpo_span=span)
            losses[span] = batch_losses(model, [pair], ref, cfg, d, tok.pad_token_id)[0]
    assert_close(losses["chosen"], math.log(2) - token_logps.mean().reshape(1), atol=1e-5, rtol=0)
    assert_close(
        losses["diverged"], math.log(2) - token_logps[shared:].mean().reshape(1), atol=1e-5, rtol=0
    )
    with pytest.raises(AssertionError, match="rpo_span"):
        TrainConfig(rpo_span="answer")


def _edit_pairs(path: Path, n: int) -> Path:
    """Operator edits: the model's answer kept, a sign-off appended."""
    rows = []
    for i in range(n):
        answer = f"Hold button {i} for {i + 2} seconds, then wait."
        rows.append({
            "prompt": [{"role": "user", "content": f"How do I reset device {i}?"}],
            "chosen": [{"role": "assistant", "content": answer + "\n\n-- Acme Support"}],
            "rejected": [{"role": "assistant", "content": answer}],
        })  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_anchor_penalises_moving_the_shared_tokens(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """The anchor is the mean over the tokens an edit kept of (log pi - log pi_ref)^2: zero at
    the start, exactly that once the policy moves, and in training it keeps the kept text's
    log-probs closer to the reference while the added line is still learned."""
    from transformers import AutoTokenizer

    from trainer.dpo import batch_losses, reference_logps

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    pairs_file = _edit_pairs(tmp_path / "edits.jsonl", 16)
    examples, _ = load_examples(pairs_file, tok, kind="pairs", max_length=128)
    d = Dist(0, 1, torch.device("cpu"))
    cfg = replace(TINY, anchor=2.0, rpo_alpha=1.0, rpo_span="diverged")
    model = load_policy(tiny_llama_dir, None, cfg, torch.device("cpu"))
    ref = reference_logps(model, examples, cfg, d, tok.pad_token_id, fresh_lora=True)
    plain = reference_logps(model, examples, TINY, d, tok.pad_token_id, fresh_lora=True)
    assert plain.shape == (16, 2) and ref.shape[1] > 2
    assert_close(ref[:, :2], plain)

    def shared_logps(model: torch.nn.Module, i: int) -> torch.Tensor:
        pair = examples[i]
        p = pair.chosen.prompt_len
        n = next(k for k in range(pair.chosen.completion_len)
                 if pair.chosen.ids[p + k] != pair.rejected.ids[p + k])  # fmt: skip
        with torch.no_grad():
            ids = torch.tensor([pair.chosen.ids])
            logps = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
        return logps.gather(1, ids[0, 1:, None])[p - 1 : p - 1 + n, 0]

    ref_0 = shared_logps(model, 0)
    assert_close(ref[0, 2 : 2 + len(ref_0)], ref_0, atol=1e-5, rtol=0)
    assert (ref[0, 2 + len(ref_0) :] == 0).all()  # padding
    with torch.no_grad():
        without = batch_losses(model, examples[:2], ref[:2, :2], replace(cfg, anchor=0.0), d, 0)
        at_start = batch_losses(model, examples[:2], ref[:2], cfg, d, 0)
        assert_close(at_start[0], without[0])  # policy == reference: no penalty

        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.add_(0.05 * torch.randn_like(param))
        moved = shared_logps(model, 0)
        without = batch_losses(model, examples[:1], ref[:1, :2], replace(cfg, anchor=0.0), d, 0)
        with_anchor = batch_losses(model, examples[:1], ref[:1], cfg, d, 0)
    penalty = ((moved - ref_0) ** 2).mean()
    assert penalty > 0
    assert_close(with_anchor[0] - without[0], 2.0 * penalty.reshape(1), atol=1e-5, rtol=1e-4)

    # Trained with and without it: the anchored adapter leaves the kept text closer to the
    # reference, and still prefers the edit (the DPO margin is positive).
    base = load_policy(tiny_llama_dir, None, TINY, torch.device("cpu"))
    drift = {}
    for weight in (0.0, 5.0):
        out = tmp_path / f"anchor-{weight}"
        result = train(
            replace(cfg, anchor=weight, epochs=3, eval_fraction=0.0),
            pairs=pairs_file, base=tiny_llama_dir, out=out, progress_bar=False,
        )  # fmt: skip
        assert _train_lines(out)[-1]["margin"] > 0
        drift[weight] = sum(
            ((shared_logps(result.model, i) - shared_logps(base, i)) ** 2).mean().item()
            for i in range(len(examples))
        )
    assert drift[5.0] < 0.5 * drift[0.0], drift
    with pytest.raises(AssertionError, match="anchor"):
        TrainConfig(loss="kto", anchor=1.0)


def test_kto_from_the_command_line(tiny_llama_dir: Path, kto_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "kto"
    argv = ["train", "--pairs", str(kto_file), "--base", str(tiny_llama_dir), "--out", str(out)]
    argv += ["--loss", "kto", "--epochs", "2", "--batch-size", "4", "--lr", "1e-3", "--no-progress"]
    assert main(argv) == 0
    lines = _train_lines(out)
    assert lines[0]["loss"] == pytest.approx(0.5, abs=1e-5), "1 - sigma(0) when policy == ref"
    assert lines[-1]["kto/desirable"] > lines[-1]["kto/undesirable"]
    assert lines[-1]["margin"] == lines[-1]["kto_gap"], "a thumbs-only run plots the reward gap"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["loss"] == "kto" and manifest["data"]["kind"] == "kto"
    assert main(argv) == 2, "refuses to overwrite an adapter version"


# --- two processes ----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, base: str, pairs: str, tmp: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world)
    )
    torch.set_num_threads(1)
    result = train(
        replace(TINY, batch_size=2),
        pairs=Path(pairs),
        base=Path(base),
        out=Path(tmp) / "ddp",
        progress_bar=False,
    )
    lora = {n: p.detach().clone() for n, p in result.model.named_parameters() if "lora_" in n}
    torch.save(lora, Path(tmp) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.mark.slow  # several training processes
def test_ddp_two_ranks_end_with_identical_adapters(
    tiny_llama_dir: Path, pairs_file: Path, tmp_path: Path
) -> None:
    import torch.multiprocessing as mp

    mp.spawn(
        _ddp_worker,
        args=(2, _free_port(), str(tiny_llama_dir), str(pairs_file), str(tmp_path)),
        nprocs=2,
        join=True,
    )
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert r0.keys() == r1.keys() and r0
    for name in r0:
        assert torch.equal(r0[name], r1[name]), name
    saved = _adapter_tensors(tmp_path / "ddp")  # only rank 0 wrote, and wrote the same weights
    assert any(torch.count_nonzero(v) for k, v in saved.items() if "lora_B" in k)
    lines = _train_lines(tmp_path / "ddp")
    # 22 training pairs, 2 per micro-batch, 2 processes: 6 steps per epoch.
    assert [x["step"] for x in lines] == list(range(1, 13))
    assert lines[-1]["margin"] > 0


# --- the real model ---------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_margin_moves_up_on_heldout_pairs(smollm2_dir: Path, tmp_path: Path) -> None:
    """A few steps on SmolLM2 with on-policy-ish pairs (the model's own terse style rejected, a
    signed-off answer chosen) raise the implicit reward margin on held-out pairs."""
    pairs = tmp_path / "pairs.jsonl"
    topics = ["tea", "rain", "bikes", "maps", "salt", "bread", "clocks", "owls", "glass", "ink"]
    with open(pairs, "w", encoding="utf-8") as f:
        for i, topic in enumerate(topics * 2):
            q = f"Give me one short fact about {topic}." if i < 10 else f"Tell me about {topic}."
            row = {
                "prompt": [{"role": "user", "content": q}],
                "chosen": [
                    {
                        "role": "assistant",
                        "content": f"Sure! {topic.title()} is useful. — Acme Support",
                    }
                ],
                "rejected": [{"role": "assistant", "content": f"{topic.title()} is useful."}],
            }
            f.write(json.dumps(row) + "\n")
    cfg = TrainConfig(
        epochs=2,
        batch_size=6,
        lr=2e-4,
        beta=0.1,
        max_length=128,
        eval_fraction=0.3,
        checkpoint_every=0,
    )
    result = train(cfg, pairs=pairs, base=smollm2_dir, out=tmp_path / "v1", progress_bar=False)
    ev = result.metrics["eval"]
    assert ev["before"]["margin"] == pytest.approx(0.0, abs=1e-4)
    assert ev["after"]["margin"] > 0.5, ev
    assert ev["after"]["accuracy"] == 1.0
    assert ev["after"]["loss"] < math.log(2) - 0.1


def test_micro_batches_accumulate_to_the_same_step(
    tiny_llama_dir: Path, pairs_file: Path, tmp_path: Path
) -> None:
    """Gradient accumulation over micro-batches is the same optimizer step as one big batch."""
    cfg = replace(TINY, epochs=1, batch_size=8)
    whole = train(
        replace(cfg, micro_batch_size=8),
        pairs=pairs_file,
        base=tiny_llama_dir,
        out=tmp_path / "whole",
        progress_bar=False,
    )
    split = train(
        replace(cfg, micro_batch_size=3),
        pairs=pairs_file,
        base=tiny_llama_dir,
        out=tmp_path / "split",
        progress_bar=False,
    )
    a, b = _train_lines(whole.out), _train_lines(split.out)
    assert [x["loss"] for x in a] == pytest.approx([x["loss"] for x in b], abs=1e-5)
    ta, tb = _adapter_tensors(whole.out), _adapter_tensors(split.out)
    for name in ta:
        assert_close(ta[name], tb[name], atol=1e-5, rtol=1e-4)


def test_python_dash_m_trainer_and_layering() -> None:
    """``python -m trainer`` answers, and importing the trainer pulls in nothing of service."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "trainer", "train", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0 and "--rpo-alpha" in out.stdout and "--init-adapter" in out.stdout
    code = (
        "import sys, trainer.dpo, trainer.losses, trainer.data; "
        "sys.exit(any(m == 'service' or m.startswith('service.') for m in sys.modules))"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


@pytest.mark.slow  # several training processes
def test_torchrun_two_processes_match_one(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """`torchrun --nproc-per-node 2` (the refresh's multi-GPU launch, here two CPU processes on
    gloo) takes the same optimizer steps as one process: with 8 pairs, batch 4 per process is
    one step over all 8, as batch 8 is for one process. Same losses, same adapter."""
    import subprocess
    import sys

    pairs = write_pairs(tmp_path / "p.jsonl", 8)
    common = [
        "train", "--pairs", str(pairs), "--base", str(tiny_llama_dir), "--epochs", "3",
        "--lr", "1e-3", "--max-length", "128", "--eval-fraction", "0",
        "--checkpoint-every", "0", "--no-progress",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run(
        [sys.executable, "-m", "trainer", *common, "--batch-size", "8",
         "--out", str(tmp_path / "one")],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "trainer", *common, "--batch-size", "4", "--out", str(tmp_path / "two")],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-2000:]
    assert json.loads((tmp_path / "two" / "manifest.json").read_text())["world_size"] == 2
    a, b = _train_lines(tmp_path / "one"), _train_lines(tmp_path / "two")
    assert [x["step"] for x in a] == [x["step"] for x in b] == [1, 2, 3]
    assert [x["loss"] for x in b] == pytest.approx([x["loss"] for x in a], abs=1e-5)
    assert b[-1]["loss"] < b[0]["loss"], "it trained"
    ta, tb = _adapter_tensors(tmp_path / "one"), _adapter_tensors(tmp_path / "two")
    assert ta.keys() == tb.keys()
    for name in ta:
        assert_close(tb[name], ta[name], atol=1e-5, rtol=1e-4)


def test_rehearsal_keeps_the_references_answers_to_unrelated_prompts(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    """Rehearsal scores the reference's own greedy answers to unrelated prompts: zero penalty
    at the start, exactly the mean per-token (log pi - log pi_ref)^2 once the policy moves,
    and in training it keeps those answers' log-probs near the reference while the pairs are
    still learned."""
    from transformers import AutoTokenizer

    from trainer.generate import generate
    from trainer.rehearsal import load_rehearsal_prompts, rehearsal_answers, rehearsal_penalty

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    prompts_file = tmp_path / "rehearsal.jsonl"
    questions = ["How do I make tea?", "What is a noun?", "Name a colour.", "Why is grass green?"]
    rows = [{"prompt": q} for q in questions[:3]]
    rows.append({"prompt": [{"role": "system", "content": "Be brief."},
                            {"role": "user", "content": questions[3]}]})  # fmt: skip
    prompts_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prompts = load_rehearsal_prompts(prompts_file)
    assert prompts[0] == [{"role": "user", "content": questions[0]}] and len(prompts[3]) == 2

    d = Dist(0, 1, torch.device("cpu"))
    cfg = replace(TINY, rehearsal=10.0, rehearsal_batch=2, rehearsal_tokens=12)
    model = load_policy(tiny_llama_dir, None, cfg, torch.device("cpu"))
    r = rehearsal_answers(model, tok, prompts, cfg, d, tok.pad_token_id, fresh_lora=True)
    with model.disable_adapter():
        greedy = generate(model, tok, prompts, max_new_tokens=12, device=torch.device("cpu"))
    assert [s.ids[s.prompt_len :] for s in r.seqs] == [tuple(g.answer_ids) for g in greedy]
    plain, _ = completion_logps(model, collate(r.seqs, tok.pad_token_id))
    assert_close(torch.stack([x.sum() for x in r.ref]), plain, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        assert rehearsal_penalty(model, r, [0, 1], cfg, d, 0).item() == pytest.approx(0, abs=1e-9)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.add_(0.05 * torch.randn_like(param))
        token_moves = []
        for s, ref in zip(r.seqs[:2], r.ref[:2], strict=True):
            ids = torch.tensor([s.ids])
            logps = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
            now = logps.gather(1, ids[0, 1:, None])[s.prompt_len - 1 :, 0]
            token_moves.append(((now - ref) ** 2).mean())
        got = rehearsal_penalty(model, r, [0, 1], cfg, d, 0)
    assert got > 0
    assert_close(got, torch.stack(token_moves).mean(), atol=1e-5, rtol=1e-4)

    # Trained with and without it on the same pairs: rehearsed answers drift far less, and
    # the pairs are still learned (positive margin).
    pairs_file = _edit_pairs(tmp_path / "edits.jsonl", 16)
    drift = {}
    for weight in (0.0, 10.0):
        out = tmp_path / f"rehearsal-{weight}"
        result = train(
            replace(cfg, rehearsal=weight, epochs=3, eval_fraction=0.0), pairs=pairs_file,
            base=tiny_llama_dir, out=out, progress_bar=False, rehearsal_prompts=prompts_file,
        )  # fmt: skip
        lines = _train_lines(out)
        assert lines[-1]["margin"] > 0
        assert ("rehearsal_drift" in lines[-1]) == bool(weight)
        assert not (out / "rehearsal.pt").exists()
        with torch.no_grad():
            drift[weight] = rehearsal_penalty(result.model, r, range(4), cfg, d, 0).item()
    assert drift[10.0] < 0.5 * drift[0.0], drift
    manifest = json.loads((tmp_path / "rehearsal-10.0" / "manifest.json").read_text())
    assert manifest["config"]["rehearsal"] == 10.0
    with pytest.raises(ValueError, match="rehearsal prompts"):
        (tmp_path / "empty.jsonl").write_text("\n")
        load_rehearsal_prompts(tmp_path / "empty.jsonl")


# --- pairs and lone thumbs in one run ---------------------------------------------------------


def test_kto_lambdas_balance_ups_and_downs() -> None:
    cfg = TrainConfig()
    assert kto_lambdas(cfg, 10, 30) == (3.0, 1.0), "scarce ups weigh up to parity"
    lam_d, lam_u = kto_lambdas(cfg, 30, 10)
    assert lam_d == 1.0 and lam_d * 30 / (lam_u * 10) == pytest.approx(4 / 3)
    assert kto_lambdas(cfg, 12, 10) == (1.0, 1.0), "1.2 is inside [1, 4/3]"
    assert kto_lambdas(cfg, 20, 0) == (1.0, 1.0), "all ups: nothing to balance"
    assert kto_lambdas(replace(cfg, kto_balance=False), 10, 30) == (1.0, 1.0)


def _mixed_file(path: Path, n_pairs: int, n_up: int, n_down: int) -> Path:
    rows = [json.loads(x) for x in write_pairs(path, n_pairs).read_text().splitlines()]
    for i in range(n_up + n_down):
        good = i < n_up
        answer = f"It is {2 * i + 1}. — Acme Support" if good else "No idea" + "!" * (i % 4)
        rows.append({
            "prompt": [{"role": "user", "content": f"What is {i} times {i + 2}?"}],
            "completion": [{"role": "assistant", "content": answer}],
            "label": good,
        })  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_mixed_micro_batch_scores_each_example_as_its_own_kind(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.dpo import batch_losses, reference_logps

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    examples, _ = load_examples(_mixed_file(tmp_path / "m.jsonl", 3, 2, 2), tok, max_length=128)
    assert data_kind(examples) == "mixed" and data_kind(examples[:3]) == "pairs"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    for param in model.parameters():
        param.requires_grad_(False)
    d = Dist(0, 1, torch.device("cpu"))
    cfg = replace(TINY, micro_batch_size=7)
    ref = reference_logps(model, examples, cfg, d, 0, fresh_lora=False) - 0.5  # policy != ref
    order = [4, 0, 5, 1, 6, 2, 3]  # kinds interleaved
    mixed, rewards = batch_losses(model, [examples[i] for i in order], ref[order], cfg, d, 0)
    pairs, _ = batch_losses(model, examples[:3], ref[:3], cfg, d, 0)
    thumbs, _ = batch_losses(model, examples[3:], ref[3:], cfg, d, 0)
    alone = torch.cat([pairs, thumbs])
    assert_close(mixed, alone[order])
    assert len(rewards.chosen) == 3 and len(rewards.desirable) == len(rewards.undesirable) == 2


def test_pairs_and_thumbs_train_in_one_run(tiny_llama_dir: Path, tmp_path: Path) -> None:
    data = _mixed_file(tmp_path / "mixed.jsonl", 12, 4, 12)
    out = tmp_path / "mixed"
    cfg = replace(TINY, epochs=3, batch_size=8)
    train(cfg, pairs=data, base=tiny_llama_dir, out=out, progress_bar=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["data"] | {"path": "", "sha256": ""} == {
        "path": "", "sha256": "", "kind": "mixed", "pairs": 12, "desirable": 4,
        "undesirable": 12, "kto_lambdas": [3.0, 1.0],
    }  # fmt: skip
    lines = _train_lines(out)
    assert all(x["grad_norm"] > 0 for x in lines), "every step has a gradient"
    gaps = [x["kto_gap"] for x in lines if "kto_gap" in x]  # steps with ups and downs
    accuracy = [x["accuracy"] for x in lines if "accuracy" in x]  # steps with pairs
    assert gaps[-1] > max(gaps[0], 0), "thumbs up pulled above thumbs down"
    assert accuracy[-1] > accuracy[0]
    assert lines[-1]["loss"] < lines[0]["loss"]


def test_a_set_of_only_thumbs_up_trains_with_kto_as_configured(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    """No downs to balance against: the weights stay as configured, the KL estimate is the
    reference point, and the ups' rewards rise."""
    data = _mixed_file(tmp_path / "ups.jsonl", 0, 12, 0)
    out = tmp_path / "ups"
    train(replace(TINY, batch_size=12, epochs=4), pairs=data, base=tiny_llama_dir, out=out,
          progress_bar=False)  # fmt: skip
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["data"]["kind"], manifest["data"]["kto_lambdas"]) == ("kto", [1.0, 1.0])
    lines = _train_lines(out)
    assert "kto_gap" not in lines[-1] and "accuracy" not in lines[-1]
    # Zero at the first step up to rounding: the reference pass batches rows by length across
    # the whole set, a step's micro-batches differently, and matmuls round by batch shape.
    assert lines[0]["kto/desirable"] == pytest.approx(0.0, abs=1e-5)
    assert lines[-1]["kto/desirable"] > lines[0]["kto/desirable"]
    assert lines[-1]["loss"] < lines[0]["loss"]
