import pytest
import torch
from transformers import AutoModelForCausalLM

from bebop_trl.testing import TINY_ARCHITECTURES, char_tokenizer, tiny_causal_lm, tiny_config


def test_char_tokenizer_round_trips_text_and_specials():
    tokenizer = char_tokenizer()
    text = "Q: 12+7=?\n\tA: 19<|im_end|>"
    ids = tokenizer(text)["input_ids"]
    assert len(ids) == len("Q: 12+7=?\n\tA: 19") + 1  # one id per character, one for the special token
    assert ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids) == text
    assert tokenizer.padding_side == "left" and tokenizer.pad_token_id != tokenizer.eos_token_id


def test_chat_template_ends_with_assistant_turn():
    tokenizer = char_tokenizer()
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("arch", [*TINY_ARCHITECTURES, "qwen3_5"])
def test_tiny_models_have_head_dim_32_and_fit_the_tokenizer(arch, tiny_checkpoints):
    config = tiny_config(arch)
    assert config.head_dim == 32 and config.hidden_size == 64
    assert config.vocab_size >= len(char_tokenizer())
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints[arch])
    reference = tiny_causal_lm(arch)
    ids = torch.tensor([[5, 6, 7]])
    torch.testing.assert_close(model(ids).logits, reference(ids).logits)


def test_unknown_tiny_architecture():
    with pytest.raises(ValueError, match="Unknown tiny architecture 'gpt2'"):
        tiny_config("gpt2")


def test_cli_requires_a_command(capsys):
    from bebop_trl.cli import main

    with pytest.raises(SystemExit):
        main([])
    assert "quickstart" in capsys.readouterr().err
