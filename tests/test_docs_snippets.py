"""The documentation's code runs: the user-facing snippets of the README and the docs, executed as written on the tiny
models (Hub ids replaced by tiny checkpoints, budgets scaled down), so that the docs cannot drift from the code.

Snippets that need a GPU, vLLM or a 8B model stay out (the GPU guide, the vLLM pages); each snippet run here is named
by its file and its position among the file's Python blocks.
"""

import os
import re

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SNIPPETS = [
    ("README.md", 0),
    ("docs/index.md", 0),
    ("docs/mtp_trainer.md", 0),
    ("docs/grpo_trainer.md", 0),
    ("docs/mtp_heads.md", 1),
    ("docs/engine.md", 0),
]
# Budgets of the snippets, scaled down to seconds on the tiny models.
SCALED_DOWN = [
    (r"max_steps=\d+", "max_steps=2"),
    (r"range\(512\)", "range(4)"),
    (r'reasoning_gym_dataset\("basic_arithmetic", 1024', 'reasoning_gym_dataset("basic_arithmetic", 4'),
    (r"max_new_tokens=256", "max_new_tokens=16"),
]


def python_blocks(path: str) -> list[str]:
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return re.findall(r"```python\n(.*?)```", f.read(), re.S)


@pytest.fixture
def snippet_namespace(tiny_checkpoints, tmp_path, monkeypatch):
    """What the snippets assume exists (a policy, its tokenizer, prompts, a reward, a batch of prompt ids), in a
    working directory of their own, with the Hub id of the embedded model resolving to the tiny Llama."""
    monkeypatch.chdir(tmp_path)
    policy = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"])
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoints["llama"], padding_side="left")
    batch = tokenizer(["1+2=", "3*4="], return_tensors="pt", padding=True)

    def reward_funcs(completions, **kwargs):
        return [float(len(str(c))) for c in completions]

    return {
        "policy": policy,
        "tokenizer": tokenizer,
        "prompts": Dataset.from_dict({"prompt": ["1+2=", "3*4="]}),
        "reward_funcs": reward_funcs,
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
    }


@pytest.mark.parametrize(("path", "index"), SNIPPETS, ids=[f"{p}[{i}]" for p, i in SNIPPETS])
def test_documented_snippet_runs(path, index, snippet_namespace, tiny_checkpoints):
    code = python_blocks(path)[index]
    code = code.replace("HuggingFaceTB/SmolLM2-135M-Instruct", tiny_checkpoints["llama"])
    for pattern, replacement in SCALED_DOWN:
        code = re.sub(pattern, replacement, code)
    if "smollm2-mtp-head" in code or "outputs/smollm2-head" in code:
        # The snippet loads a head saved by the head-training snippet: save one for the tiny policy.
        from bebop_trl import MTPHead

        head = MTPHead.from_model(snippet_namespace["policy"])
        for folder in ("smollm2-mtp-head", "outputs/smollm2-head"):
            head.save_pretrained(folder)
    torch.manual_seed(0)
    exec(compile(code, f"{path}[{index}]", "exec"), dict(snippet_namespace))


def test_documented_head_config_is_the_shipped_one():
    """`docs/hub_adapters.md` shows the shipped head's config.json, abridged ("..."): every value shown is the
    shipped one."""
    import json

    from bebop_trl.embedded import SMOLLM2_HEAD_DIR

    with open(os.path.join(ROOT, "docs/hub_adapters.md"), encoding="utf-8") as f:
        (shown,) = [json.loads(block) for block in re.findall(r"```json\n(.*?)```", f.read(), re.S)]
    with open(os.path.join(SMOLLM2_HEAD_DIR, "config.json"), encoding="utf-8") as f:
        shipped = json.load(f)

    def check(shown_value, shipped_value, where):
        if isinstance(shown_value, dict):
            assert isinstance(shipped_value, dict), where
            for key, value in shown_value.items():
                if key != "...":
                    assert key in shipped_value, f"{where}.{key} is not in the shipped config"
                    check(value, shipped_value[key], f"{where}.{key}")
        else:
            assert shown_value == shipped_value, (
                f"{where}: the docs show {shown_value!r}, the head has {shipped_value!r}"
            )

    check(shown, shipped, "config")
