"""Shared fixtures: the real SmolLM2 model (prepared once into a shared cache) and tiny random
Llama models built from a config in code for fast tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests run torch in this process, servers and trainer subprocesses at once: spinning OpenMP
# waits would make them starve each other (see service.cli). Set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# The prepared model is cached across test runs (and CI steps) under this home.
TEST_HOME = Path(os.environ.get("PREFLOOP_TEST_HOME", "~/.cache/prefloop")).expanduser()


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2-135M-Instruct as a safetensors HF directory."""
    from service.modelprep import prepare_default_model

    return prepare_default_model(TEST_HOME / "models", progress=False)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Path:
    """A tiny random Llama (2 layers, hidden 64) with SmolLM2's tokenizer and chat template."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    out = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def make_adapter(base_dir: Path, out: Path, seed: int) -> Path:
    """A LoRA adapter with random, non-trivial weights (B is not zero) saved in PEFT layout:
    adapters made with different seeds answer differently, even greedily."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(
        r=8, lora_alpha=64, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False
    )
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(out)
    return out
