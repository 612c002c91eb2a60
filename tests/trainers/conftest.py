import pytest
from transformers import AutoTokenizer

from bebop_trl.trainers.mtp_data import self_distill


PROMPTS = [f"{a}{op}{b}=" for a in range(10) for b in range(10) for op in "+*"][:176]


@pytest.fixture(scope="session")
def distilled(tiny_checkpoints, load_tiny, tmp_path_factory):
    """The tiny Llama's own samples on 176 short prompts (input_ids + prompt_length), made once per session."""
    policy = load_tiny("llama")
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoints["llama"])
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    return self_distill(
        policy,
        tokenizer,
        prompts,
        max_new_tokens=24,
        batch_size=48,
        cache_dir=tmp_path_factory.mktemp("distill"),
        log=lambda message: None,
    ).shuffle(seed=0)


@pytest.fixture(scope="session")
def distilled_train(distilled):
    return distilled.select(range(128))


@pytest.fixture(scope="session")
def distilled_held_out(distilled):
    return distilled.select(range(128, 176))
