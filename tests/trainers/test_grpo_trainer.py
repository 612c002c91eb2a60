"""BebopGRPOTrainer: a drop-in `trl.GRPOTrainer` whose rollouts are speculative, exact and on-policy.

Every run uses the tiny Llama (hidden size 64, 128-token vocabulary, character tokenizer), 2-3 optimizer steps and
completions of at most 10 tokens, on one CPU thread: with models this small, more threads only fight over the cores.
"""

import json
import math
import pathlib

import pytest
import torch
import trl
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoTokenizer
from trl import GRPOConfig, GRPOTrainer

from bebop_trl import BebopGRPOConfig, BebopGRPOTrainer, MTPHead
from bebop_trl.speculative import rejection

from ..speculative.helpers import chisquare_pvalue, perturbed_head
from .grpo_helpers import EXACT_PROMPTS, ROWS_PER_PROMPT, TokenReward, first_two_token_laws, grpo_config


PROMPTS = ["1+2=", "3*4=", "hello", "x", "abc:", "7-5=", "Q: 2+2?", "zz"]
TARGETS = ["3", "2", "l", "x", "a", "2", "4", "z"]
# Log entries that measure time, which two identical runs do not share.
TIMING_KEYS = {"step_time", "train_runtime", "train_samples_per_second", "train_steps_per_second"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def tokenizer(tiny_checkpoints):
    # A fresh tokenizer per test: trainers may adjust the tokenizer they are given.
    return AutoTokenizer.from_pretrained(tiny_checkpoints["llama"])


def dataset(conversational: bool = False) -> Dataset:
    prompts = [[{"role": "user", "content": p}] for p in PROMPTS] if conversational else PROMPTS
    return Dataset.from_dict({"prompt": prompts, "target": TARGETS})


def completion_text(completion) -> str:
    return completion if isinstance(completion, str) else completion[-1]["content"]


def distinct_characters(prompts, completions, **kwargs):
    return [float(len(set(completion_text(c)))) for c in completions]


def target_count(prompts, completions, target, **kwargs):
    # `target` is an extra dataset column: TRL hands it to the reward function as a keyword argument.
    return [float(completion_text(c).count(t)) for c, t in zip(completions, target, strict=True)]


def training_logs(trainer) -> list[dict]:
    return [entry for entry in trainer.state.log_history if "loss" in entry]


def parameters(model) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in model.named_parameters()}


@torch.no_grad()
def completion_logps(model, batch: dict, weights: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """[B, C] log-probs (temperature 1) of the batch's completion tokens under `model`, from one fresh forward
    pass; with `weights`, under those parameters and buffers instead of the model's own."""
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask)
    inputs["position_ids"] = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    if weights is None:
        logits = model(**inputs).logits
    else:
        logits = torch.func.functional_call(model, weights, (), inputs, strict=True).logits
    logits = logits[:, batch["prompt_ids"].shape[1] - 1 : -1].float()
    return logits.log_softmax(-1).gather(-1, batch["completion_ids"].unsqueeze(-1)).squeeze(-1)


# ---------------------------------------------------------------------------------------------------- drop-in runs

ROLLOUT_KEYS = (
    "rollout/acceptance_rate",
    "rollout/accepted_drafts_per_cycle",
    "rollout/draft_tokens",
    "rollout/tokens_per_second",
    "rollout/seconds",
    "acceptance_entropy/slope",
    "acceptance_entropy/intercept",
    "acceptance_entropy/r",
)

# name -> (conversational prompts, reward functions, config overrides, LoRA, generation rounds in 2 steps)
DROP_IN_CASES = {
    "conversational-two-rewards": (
        True,
        [distinct_characters, target_count],
        dict(reward_weights=[1.0, 0.5]),
        False,
        2,
    ),
    "num-iterations-2": (False, [distinct_characters], dict(num_iterations=2), False, 1),
    "steps-per-generation-2": (
        False,
        [distinct_characters, target_count],
        dict(steps_per_generation=2, gradient_accumulation_steps=2),
        False,
        2,
    ),
    "peft-lora": (True, [distinct_characters], {}, True, 2),
}


class TestDropIn:
    """The trainer runs TRL's GRPO configurations unchanged, with and without a draft head."""

    @pytest.mark.parametrize("with_head", [False, True], ids=["no-head", "head"])
    @pytest.mark.parametrize("case", list(DROP_IN_CASES))
    def test_training(self, case, with_head, load_tiny, tokenizer, tmp_path):
        conversational, reward_funcs, overrides, use_peft, expected_rounds = DROP_IN_CASES[case]
        k = 3
        policy = load_tiny("llama")
        head = None
        if with_head and case == "conversational-two-rewards":
            # Through the config, as a script would: a head saved by MTPHead.save_pretrained.
            MTPHead.from_model(load_tiny("llama")).save_pretrained(tmp_path / "head")
            overrides = {**overrides, "mtp_head": str(tmp_path / "head")}
        elif with_head:
            head = MTPHead.from_model(policy)
        args = grpo_config(tmp_path / "out", num_speculative_tokens=k, **overrides)
        peft_config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM") if use_peft else None
        trainer = BebopGRPOTrainer(
            policy,
            reward_funcs,
            args=args,
            train_dataset=dataset(conversational),
            processing_class=tokenizer,
            peft_config=peft_config,
            head=head,
        )
        assert (trainer.mtp_head is not None) == with_head
        before = parameters(trainer.model)

        trainer.train()

        logs = training_logs(trainer)
        assert [entry["step"] for entry in logs] == [1, 2]
        for entry in logs:
            for key in ("loss", "grad_norm", "entropy"):
                assert math.isfinite(entry[key]), (key, entry)
        # Rewards are logged at the steps that generate (with num_iterations=2, every other step).
        generating = [entry for entry in logs if "reward" in entry]
        assert len(generating) == expected_rounds
        for entry in generating:
            for key in ("reward", "reward_std", "completions/mean_length"):
                assert math.isfinite(entry[key]), (key, entry)
            for func in reward_funcs:
                assert math.isfinite(entry[f"rewards/{func.__name__}/mean"]), entry

        for name, param in trainer.model.named_parameters():
            changed = not torch.equal(before[name], param.detach())
            if use_peft:
                assert changed == ("lora_" in name), f"{name}: changed={changed}"
            else:
                assert changed, f"{name} did not change"
        if use_peft:
            assert any("lora_" in name for name in before)

        fit_file = pathlib.Path(args.output_dir) / "acceptance_entropy_fit.json"
        if not with_head:
            assert not any(key.startswith(("rollout/", "acceptance_entropy/")) for e in logs for key in e)
            assert not fit_file.exists()
            return

        assert fit_file.exists()
        rounds = [entry for entry in logs if "rollout/acceptance_rate" in entry]
        assert rounds == generating
        assert trainer._rollout.rounds == expected_rounds
        for entry in logs:
            assert 0.0 <= entry["rollout/share_of_step_time"] <= 1.0, entry
        for entry in rounds:
            for key in ROLLOUT_KEYS:
                assert math.isfinite(entry[key]), (key, entry)
            assert 0.0 <= entry["rollout/acceptance_rate"] <= 1.0
            assert entry["rollout/draft_tokens"] > 0
            assert entry["rollout/draft_tokens"] % k == 0
            assert entry["rollout/tokens_per_second"] > 0 and entry["rollout/seconds"] > 0
            assert -1.0 <= entry["acceptance_entropy/r"] <= 1.0
            positions = [entry[f"rollout/acceptance_position_{j}"] for j in range(1, k + 1)]
            assert f"rollout/acceptance_position_{k + 1}" not in entry
            assert all(0.0 <= p <= 1.0 for p in positions), positions
            assert positions == sorted(positions, reverse=True), positions
            # Accepted drafts per cycle: the sum over positions, and k times the per-token acceptance rate.
            assert entry["rollout/accepted_drafts_per_cycle"] == pytest.approx(sum(positions))
            assert entry["rollout/accepted_drafts_per_cycle"] == pytest.approx(k * entry["rollout/acceptance_rate"])


# ------------------------------------------------------------------------------------------- without a head: TRL


@pytest.mark.parametrize("config_class", [BebopGRPOConfig, GRPOConfig])
def test_without_head_matches_trl(config_class, load_tiny, tiny_checkpoints, tmp_path):
    def run(trainer_class, args_class):
        args = grpo_config(tmp_path / trainer_class.__name__, config_class=args_class, max_steps=3)
        trainer = trainer_class(
            load_tiny("llama"),
            [distinct_characters, target_count],
            args=args,
            train_dataset=dataset(),
            processing_class=AutoTokenizer.from_pretrained(tiny_checkpoints["llama"]),
        )
        trainer.train()
        return trainer

    reference = run(GRPOTrainer, GRPOConfig)
    bebop = run(BebopGRPOTrainer, config_class)

    assert bebop.mtp_head is None and bebop._rollout is None
    assert len(bebop.state.log_history) == len(reference.state.log_history) == 4
    for ours, theirs in zip(bebop.state.log_history, reference.state.log_history, strict=True):
        assert ours.keys() == theirs.keys()
        shared = sorted(ours.keys() - TIMING_KEYS)
        assert [ours[key] for key in shared] == [theirs[key] for key in shared], shared
    assert {"loss", "grad_norm", "reward", "entropy", "rewards/target_count/mean"} <= bebop.state.log_history[0].keys()
    # The runs really trained: the same weights at the end, but not the initial ones.
    initial = load_tiny("llama").state_dict()
    final, reference_final = bebop.model.state_dict(), reference.model.state_dict()
    assert final.keys() == reference_final.keys()
    for name, tensor in final.items():
        assert torch.equal(tensor, reference_final[name]), name
    assert not torch.equal(
        final["model.layers.0.self_attn.q_proj.weight"], initial["model.layers.0.self_attn.q_proj.weight"]
    )


def test_runs_with_a_head_are_reproducible(load_tiny, tokenizer, tmp_path):
    # Each round draws from a generator seeded by (seed, process, round): the same seed, the same run.
    def run(name):
        policy = load_tiny("llama")
        trainer = BebopGRPOTrainer(
            policy,
            distinct_characters,
            args=grpo_config(tmp_path / name, num_speculative_tokens=2),
            train_dataset=dataset(),
            processing_class=tokenizer,
            head=perturbed_head(policy, scale=0.05),
        )
        trainer.train()
        timing = [key for entry in trainer.state.log_history for key in entry if "second" in key or "share" in key]
        assert timing  # rollout/seconds, rollout/tokens_per_second, rollout/share_of_step_time, ...
        logs = [
            {k: v for k, v in e.items() if k not in TIMING_KEYS and k not in timing} for e in trainer.state.log_history
        ]
        assert any("rollout/acceptance_rate" in entry for entry in logs)
        return logs, trainer.model.state_dict()

    logs, weights = run("a")
    logs_again, weights_again = run("b")
    assert logs == logs_again
    assert all(torch.equal(weights[name], weights_again[name]) for name in weights)


# ------------------------------------------------------------------------------------ exactness of the rollouts


def speculative_rollouts(policy, head, tokenizer, output_dir, **sampling):
    """Generates ROWS_PER_PROMPT rollouts of each prompt in one generation round (no optimizer step).

    Returns:
        The rewards (token ids at positions 0 and 1), the batch dict and the trainer.
    """
    rewards = [TokenReward(0), TokenReward(1)]
    args = grpo_config(output_dir, max_completion_length=3, num_speculative_tokens=2, **sampling)
    trainer = BebopGRPOTrainer(
        policy, rewards, args=args, train_dataset=dataset(), processing_class=tokenizer, head=head
    )
    trainer.model.train()  # a training round, without the optimizer step
    batch = trainer._generate_and_score_completions(
        [{"prompt": prompt} for prompt in EXACT_PROMPTS for _ in range(ROWS_PER_PROMPT)]
    )
    assert trainer._rollout.rounds == 1
    return rewards, batch, trainer


# name -> (sampling settings, least acceptance rate of the first draft position). A greedy draft is accepted with
# probability p(draft), low for a policy this uncertain; a rejection resamples from p without the draft, which is
# what the test then checks.
EXACTNESS_CASES = {
    "T1-probabilistic": (dict(temperature=1.0, draft_sampling="probabilistic"), 0.2),
    "T0.7-greedy": (dict(temperature=0.7, draft_sampling="greedy"), 0.01),
    "T0.7-probabilistic-topk-topp": (
        dict(temperature=0.7, top_k=40, top_p=0.9, draft_sampling="probabilistic"),
        0.1,
    ),
}


@pytest.mark.parametrize("case", list(EXACTNESS_CASES))
def test_rollout_rewards_follow_the_policy_law(case, load_tiny, tokenizer, tmp_path):
    sampling, least_acceptance = EXACTNESS_CASES[case]
    policy = load_tiny("llama")
    rewards, batch, trainer = speculative_rollouts(
        policy, perturbed_head(policy, scale=0.05), tokenizer, tmp_path, **sampling
    )
    # The head drafts imperfectly: some drafts are accepted and some rejected.
    metrics = trainer._metrics["train"]
    assert least_acceptance < metrics["rollout/acceptance_position_1"][-1] < 0.9, dict(metrics)
    assert metrics["rollout/acceptance_position_2"][-1] > 0.0, dict(metrics)
    assert_rollouts_follow_the_policy_law(policy, tokenizer, rewards, batch, trainer, **sampling)


def test_adaptive_draft_length_keeps_the_policy_law(load_tiny, tokenizer, tmp_path):
    policy = load_tiny("llama")
    sampling = dict(temperature=1.0, draft_sampling="probabilistic")
    rewards, batch, trainer = speculative_rollouts(
        policy, perturbed_head(policy, scale=0.05), tokenizer, tmp_path, adaptive_draft_length=True, **sampling
    )
    # Calibrated once, on the first round, for up to num_speculative_tokens drafts; kept for the next rounds.
    draft_length = trainer._rollout._draft_length
    assert draft_length is not None and draft_length.max_draft_tokens == trainer.args.num_speculative_tokens == 2
    assert trainer._rollout._engine_kwargs()["draft_length"] is draft_length
    assert trainer._metrics["train"]["rollout/acceptance_position_1"][-1] > 0.2
    assert_rollouts_follow_the_policy_law(policy, tokenizer, rewards, batch, trainer, **sampling)


@pytest.mark.parametrize("with_head", [True, False])
def test_rollout_drafts_continuous_batching_and_block_verification_keep_the_policy_law(
    with_head, load_tiny, tokenizer, tmp_path
):
    policy = load_tiny("llama")
    sampling = dict(temperature=1.0, draft_sampling="probabilistic")
    options = dict(rollout_drafts=True, rollout_max_batch_size=256, rejection_sample_method="block")
    head = perturbed_head(policy, scale=0.05) if with_head else None
    rewards, batch, trainer = speculative_rollouts(policy, head, tokenizer, tmp_path, **options, **sampling)
    metrics = trainer._metrics["train"]
    # The group's rollouts drafted some of the cycles (all of them without a head), and were accepted at times.
    share = metrics["rollout/rollout_draft_share"][-1]
    assert (0.0 < share < 1.0) if with_head else share == 1.0, dict(metrics)
    assert metrics["rollout/rollout_draft_acceptance_rate"][-1] > 0.0
    assert_rollouts_follow_the_policy_law(policy, tokenizer, rewards, batch, trainer, **sampling)


def assert_rollouts_follow_the_policy_law(policy, tokenizer, rewards, batch, trainer, **sampling):
    """The first two tokens of each prompt's rollouts pass a chi-square test against the policy's processed law, and
    the sampling log-probs handed to TRL are that law's."""
    law_kwargs = {"temperature": sampling["temperature"], "top_k": sampling.get("top_k", 0)}
    law_kwargs["top_p"] = sampling.get("top_p", 1.0)
    first_tokens = batch["completion_ids"][:, 0]
    for index, prompt in enumerate(EXACT_PROMPTS):
        prompt_ids = tokenizer(prompt)["input_ids"]
        rows = slice(index * ROWS_PER_PROMPT, (index + 1) * ROWS_PER_PROMPT)
        assert (
            batch["prompt_ids"][rows][batch["prompt_mask"][rows].bool()]
            .view(ROWS_PER_PROMPT, -1)
            .eq(torch.tensor(prompt_ids))
            .all()
        )
        first_law, second_law = first_two_token_laws(policy, prompt_ids, trainer.eos_token_ids, **law_kwargs)
        for reward, law in zip(rewards, (first_law, second_law), strict=True):
            samples = torch.tensor(reward.given[prompt])
            assert len(samples) == ROWS_PER_PROMPT
            pvalue = chisquare_pvalue(samples, law)
            assert pvalue > 1e-3, f"{prompt!r}, {reward.__name__}: chi-square p-value {pvalue:.2e}"
        # The sampling log-probs handed to TRL are those of the processed distribution the tokens came from.
        torch.testing.assert_close(
            batch["sampling_per_token_logps"][rows, 0],
            first_law[first_tokens[rows]].log().float(),
            atol=1e-4,
            rtol=0,
        )


def test_exactness_check_detects_a_biased_sampler(load_tiny, tokenizer, tmp_path, monkeypatch):
    # Negative control: after a rejected draft, resample from p instead of norm(max(0, p - q)). Rejections happen
    # from the second token on, so the second token's law is off and the same chi-square test must reject it.
    monkeypatch.setattr(rejection, "_residual_probs", lambda target, draft, tokens: target)
    policy = load_tiny("llama")
    rewards, _, trainer = speculative_rollouts(policy, perturbed_head(policy, scale=0.05), tokenizer, tmp_path)
    for prompt in EXACT_PROMPTS:
        _, second_law = first_two_token_laws(policy, tokenizer(prompt)["input_ids"], trainer.eos_token_ids)
        pvalue = chisquare_pvalue(torch.tensor(rewards[1].given[prompt]), second_law)
        assert pvalue < 1e-6, f"{prompt!r}: the biased sampler passed with p-value {pvalue:.2e}"


# ------------------------------------------------------------------------------ rollouts use the current weights


@pytest.mark.parametrize("use_peft", [False, True], ids=["full", "lora"])
def test_each_round_samples_from_the_current_weights(use_peft, load_tiny, tokenizer, tmp_path):
    policy = load_tiny("llama")
    peft_config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM") if use_peft else None
    trainer = BebopGRPOTrainer(
        policy,
        distinct_characters,
        args=grpo_config(tmp_path, learning_rate=0.05, num_speculative_tokens=2),
        train_dataset=dataset(),
        processing_class=tokenizer,
        peft_config=peft_config,
        head=perturbed_head(policy, scale=0.05),
    )
    rounds = []
    generate_and_score = trainer._generate_and_score_completions

    def spy(inputs):
        batch = generate_and_score(inputs)
        model = trainer.accelerator.unwrap_model(trainer.model)
        weights = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        weights = {name: tensor.detach().clone() for name, tensor in weights.items()}
        # The log-probs of the tokens just sampled under the weights of this moment, and under the previous
        # round's weights (a deep copy would not do: TRL patches `forward` to call the original model's).
        rounds.append({"batch": batch, "weights": weights, "current": completion_logps(model, batch)})
        if len(rounds) > 1:
            rounds[-1]["previous"] = completion_logps(model, batch, weights=rounds[-2]["weights"])
        return batch

    trainer._generate_and_score_completions = spy
    trainer.train()

    assert len(rounds) == 2
    for round_ in rounds:
        batch, mask = round_["batch"], round_["batch"]["completion_mask"].bool()
        torch.testing.assert_close(batch["sampling_per_token_logps"][mask], round_["current"][mask], atol=1e-4, rtol=0)
    changed = [name for name, w in rounds[0]["weights"].items() if not torch.equal(w, rounds[1]["weights"][name])]
    assert changed, "the optimizer step changed no weight"
    batch = rounds[1]["batch"]
    mask = batch["completion_mask"].bool()
    gap = (rounds[1]["previous"] - batch["sampling_per_token_logps"])[mask].abs().max()
    assert gap > 1e-2, f"the first round's weights give the second round's log-probs within {gap:.1e}"


def test_each_training_round_draws_new_samples_reproducibly(load_tiny, tokenizer, tmp_path):
    policy = load_tiny("llama")
    trainer = BebopGRPOTrainer(
        policy,
        distinct_characters,
        args=grpo_config(tmp_path, num_speculative_tokens=2),
        train_dataset=dataset(),
        processing_class=tokenizer,
        head=perturbed_head(policy, scale=0.05),
    )
    prompt_ids = [tokenizer("hello")["input_ids"]] * 32

    def rollout_round():
        completions, logprobs = trainer._generate_single_turn(prompt_ids, None, {}, 4)
        assert [len(c) for c in completions] == [len(lp) for lp in logprobs]
        assert all(1 <= len(c) <= 10 for c in completions)
        return completions

    trainer.model.train()
    first, second = rollout_round(), rollout_round()
    assert trainer._rollout.rounds == 2
    # Same weights and prompts: a new round draws new samples, and a round's samples are fixed by the seed.
    assert first != second
    trainer._rollout.load_state_dict({"rollout_round": 0})
    assert rollout_round() == first
    # Evaluation rounds do not advance the training rounds.
    trainer.model.eval()
    rollout_round()
    assert trainer._rollout.rounds == 1


# --------------------------------------------------------------------------------------------- invalid settings


def multiply(a: int, b: int) -> int:
    """Multiplies two integers.

    Args:
        a: The first factor.
        b: The second factor.
    """
    return a * b


class CounterEnvironment:
    """A GRPO environment that exposes one tool method."""

    def reset(self, **kwargs):
        self.count = 0

    def increment(self, by: int) -> str:
        """Adds to the counter.

        Args:
            by: The increment.
        """
        self.count += by
        return str(self.count)


class SilentEnvironment:
    """A GRPO environment without tool methods."""

    def reset(self, **kwargs):
        return None


def tool_calling_tokenizer(tiny_checkpoints):
    """The tiny tokenizer with a chat template that TRL accepts for tools (Qwen3's, shipped with TRL)."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoints["llama"])
    tokenizer.chat_template = (pathlib.Path(trl.__file__).parent / "chat_templates" / "qwen3.jinja").read_text()
    return tokenizer


# option -> (config overrides, trainer keyword arguments)
UNSUPPORTED = {
    "min_p": (dict(min_p=0.1), {}),
    "repetition_penalty": (dict(repetition_penalty=1.2), {}),
    "generation_kwargs": (dict(generation_kwargs={"no_repeat_ngram_size": 2}), {}),
    "use_transformers_continuous_batching": (dict(use_transformers_continuous_batching=True), {}),
    "rollout_func": ({}, dict(rollout_func=lambda prompts, trainer: {})),
    "tools": ({}, dict(tools=[multiply])),
    "environment_factory": ({}, dict(environment_factory=SilentEnvironment)),
    "environment_factory-with-tools": ({}, dict(environment_factory=CounterEnvironment)),
}


@pytest.mark.parametrize(
    "option",
    list(UNSUPPORTED),
)
def test_unsupported_options_with_a_head_are_rejected(option, load_tiny, tiny_checkpoints, tmp_path):
    overrides, trainer_kwargs = UNSUPPORTED[option]
    name = option.removesuffix("-with-tools")

    def build(with_head=False, **config):
        policy = load_tiny("llama")
        return BebopGRPOTrainer(
            policy,
            distinct_characters,
            args=grpo_config(tmp_path, **overrides, **config),
            train_dataset=dataset(conversational=True),
            processing_class=tool_calling_tokenizer(tiny_checkpoints),
            head=MTPHead.from_model(policy) if with_head else None,
            **trainer_kwargs,
        )

    # TRL itself accepts the option: it is the speculative engine that does not implement it.
    assert build().mtp_head is None
    with pytest.raises(ValueError, match=f"do not support {name}\\."):
        build(with_head=True)
    with pytest.raises(ValueError, match=f"do not support {name}\\."):
        build(async_rollouts=True)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(use_vllm=True, mtp_head="my-org/head"), "use_vllm"),
        (dict(use_vllm=True, async_rollouts=True), "use_vllm"),
        (dict(draft_sampling="typical"), "draft_sampling"),
        (dict(num_speculative_tokens=0), "num_speculative_tokens"),
        (dict(max_staleness=0), "max_staleness"),
        (dict(rollout_backend="sglang"), "rollout_backend"),
        (dict(rollout_backend="vllm", async_rollouts=True), "async_rollouts"),
        (dict(rollout_backend="vllm", adaptive_draft_length=True), "adaptive_draft_length"),
        (dict(rollout_backend="vllm", rollout_drafts=True, mtp_head="my-org/head"), "rollout_drafts and a draft head"),
        (dict(mtp_online_loss="bogus", mtp_head="my-org/head"), "mtp_online_loss"),
        (dict(mtp_online_loss="tv"), "set mtp_head"),
        (dict(rejection_sample_method="typical"), "rejection_sample_method"),
        (dict(rollout_max_batch_size=0), "rollout_max_batch_size"),
        (dict(mtp_online_loss="tv", mtp_head="my-org/head", mtp_online_update_interval=0), "interval"),
    ],
)
def test_invalid_config_is_rejected(overrides, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        grpo_config(tmp_path, **overrides)


def test_valid_speculative_configs_are_accepted(tmp_path):
    # The counterpart of the rejections above: the same fields with valid values.
    grpo_config(tmp_path, use_vllm=True)
    assert grpo_config(tmp_path, rollout_backend="vllm", mtp_head="my-org/head").use_vllm
    grpo_config(tmp_path, rollout_backend="vllm", vllm_mode="server", mtp_head="my-org/head", mtp_online_loss="tv")
    grpo_config(tmp_path, async_rollouts=True, max_staleness=2)
    grpo_config(tmp_path, rollout_drafts=True, rollout_max_batch_size=8, rejection_sample_method="block")
    # vLLM: rollout drafts without a head; whether the installed vLLM verifies blocks is checked by the trainer.
    grpo_config(tmp_path, rollout_backend="vllm", rollout_drafts=True, rejection_sample_method="block")
    grpo_config(tmp_path, rollout_backend="vllm", vllm_mode="server", rollout_drafts=True)
    for loss_type in ("e2e_tv", "tv", "kl", "rkl", "ce"):
        grpo_config(tmp_path, mtp_head="my-org/head", mtp_online_loss=loss_type, mtp_online_update_interval=2)
    config = grpo_config(tmp_path, mtp_head="native", draft_sampling="greedy", num_speculative_tokens=1)
    assert (config.mtp_head, config.draft_sampling, config.num_speculative_tokens) == ("native", "greedy", 1)


def test_a_head_passed_with_rollout_drafts_in_vllm_is_rejected(load_tiny, tokenizer, tmp_path):
    # The config sees no head when it is passed to the trainer: the trainer refuses it, before vLLM is needed.
    policy = load_tiny("llama")
    with pytest.raises(ValueError, match="rollout_drafts and a draft head"):
        BebopGRPOTrainer(
            policy,
            distinct_characters,
            args=grpo_config(tmp_path, rollout_backend="vllm", rollout_drafts=True),
            train_dataset=dataset(),
            processing_class=tokenizer,
            head=MTPHead.from_model(policy),
        )


def test_a_head_for_another_policy_is_rejected(load_tiny, tokenizer, tmp_path):
    qwen3_head = MTPHead.from_model(load_tiny("qwen3"))
    qwen3_head.save_pretrained(tmp_path / "qwen3-head")

    def build(head=None, **overrides):
        return BebopGRPOTrainer(
            load_tiny("llama"),
            distinct_characters,
            args=grpo_config(tmp_path / "out", **overrides),
            train_dataset=dataset(),
            processing_class=tokenizer,
            head=head,
        )

    # Same hidden size and vocabulary, but another architecture: passed in, and loaded from a folder.
    with pytest.raises(ValueError, match=r"architecture 'qwen3'.*'llama'"):
        build(head=qwen3_head)
    with pytest.raises(ValueError, match=r"architecture 'qwen3'.*'llama'"):
        build(mtp_head=str(tmp_path / "qwen3-head"))
    assert build(head=MTPHead.from_model(load_tiny("llama"))).mtp_head is not None


def test_a_head_needs_a_bebop_config(load_tiny, tokenizer, tmp_path):
    policy = load_tiny("llama")
    with pytest.raises(ValueError, match="BebopGRPOConfig"):
        BebopGRPOTrainer(
            policy,
            distinct_characters,
            args=grpo_config(tmp_path, config_class=GRPOConfig),
            train_dataset=dataset(),
            processing_class=tokenizer,
            head=MTPHead.from_model(policy),
        )


# ---------------------------------------------------------------------------------------- acceptance-entropy fit


def test_acceptance_entropy_fit_is_written(load_tiny, tokenizer, tmp_path):
    policy = load_tiny("llama")
    trainer = BebopGRPOTrainer(
        policy,
        distinct_characters,
        args=grpo_config(tmp_path, num_speculative_tokens=2, run_name="fit-test"),
        train_dataset=dataset(),
        processing_class=tokenizer,
        head=perturbed_head(policy, scale=0.05),
    )
    trainer.train()

    saved = json.loads((tmp_path / "acceptance_entropy_fit.json").read_text())
    fit, points = saved["fit"], saved["points"]
    # Two rounds of 4 completions; one that never drafted (it ended at once) has no acceptance rate.
    assert 2 <= fit["num_points"] <= 8
    assert len(points["entropy"]) == len(points["acceptance"]) == len(points["weight"]) == fit["num_points"]
    assert sorted(set(points["step"])) == [0, 1]
    assert all(math.isfinite(fit[key]) for key in ("slope", "intercept", "r", "mean_entropy", "mean_acceptance"))
    assert -1.0 <= fit["r"] <= 1.0 and 0.0 <= fit["mean_acceptance"] <= 1.0 and fit["mean_entropy"] > 0
    assert all(0.0 <= a <= 1.0 for a in points["acceptance"]) and all(w > 0 for w in points["weight"])
    assert fit["total_weight"] == pytest.approx(sum(points["weight"]))
    # The fit over every point of the run is the one logged at the last step.
    last = training_logs(trainer)[-1]
    assert last["acceptance_entropy/slope"] == pytest.approx(fit["slope"])
    assert last["acceptance_entropy/r"] == pytest.approx(fit["r"])
    png = (tmp_path / "acceptance_entropy_fit.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000
