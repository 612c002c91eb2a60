"""Online head updates and asynchronous rollouts of BebopGRPOTrainer, on the tiny Llama (CPU, a few steps each)."""

import math
import threading
import time

import pytest
import torch
import torch.nn.functional as F
import trl
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from bebop_trl import BebopGRPOTrainer, MTPHead
from bebop_trl.rollout.async_worker import AsyncRolloutWorker
from bebop_trl.trainers.grpo_trainer import HEAD_DIR, TRAINER_STATE_NAME, importance_sampling_ratio

from .grpo_helpers import grpo_config


PROMPTS = [f"q{i}:" for i in range(16)]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def char_sum_reward(prompts, completions, **kwargs):
    """Deterministic and different across completions, so that GRPO advantages are not all zero."""
    return [float(sum(map(ord, completion)) % 7) for completion in completions]


def make_trainer(tiny_checkpoints, output_dir, *, head="from_policy", callbacks=None, **overrides):
    """A trainer on the tiny Llama. `head`: "from_policy" (MTPHead.from_model), "random" (random init) or None."""
    path = tiny_checkpoints["llama"]
    policy = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    mtp_head = None
    if head is not None:
        torch.manual_seed(0)
        mtp_head = MTPHead.from_model(policy, init_from_policy=head == "from_policy")
        overrides.setdefault("mtp_head", "given")
    # A learning rate large enough that one optimizer step visibly changes the policy's log-probs.
    settings = {"max_steps": 3, "learning_rate": 1e-2, **overrides}
    return BebopGRPOTrainer(
        policy,
        char_sum_reward,
        args=grpo_config(output_dir, **settings),
        head=mtp_head,
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
        processing_class=tokenizer,
        callbacks=callbacks,
    )


def clone_state(module):
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


def states_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def step_logs(trainer):
    """The per-step entries of the log history (the final summary entry has no `loss`)."""
    return [entry for entry in trainer.state.log_history if "loss" in entry]


def fresh_batch(trainer, prompt="q3:"):
    """One round of scored rollouts, as `_generate_and_score_completions` returns them in training."""
    trainer.model.train()
    return trainer._generate_and_score_completions([{"prompt": prompt}] * trainer.args.num_generations)


def completion_logps(model, batch):
    """[B, T] log-probs of the completion tokens under `model` (an independent computation, no cache)."""
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    prompt_length = batch["prompt_ids"].shape[1]
    logps = F.log_softmax(logits[:, prompt_length - 1 : -1].double(), dim=-1)
    logps = logps.gather(-1, batch["completion_ids"].unsqueeze(-1)).squeeze(-1)
    return logps * batch["completion_mask"]


class RecordWeights(TrainerCallback):
    """Copies of the policy's (and head's) weights after every optimizer step; step 0 is the initial policy."""

    def __init__(self, trainer_ref):
        self.trainer_ref = trainer_ref
        self.policy, self.head, self.step_end_times = {}, {}, {}

    def _record(self, state, model):
        self.policy[state.global_step] = clone_state(model)
        head = self.trainer_ref[0].mtp_head if self.trainer_ref else None
        if head is not None:
            self.head[state.global_step] = clone_state(head)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._record(state, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.step_end_times[state.global_step] = time.perf_counter()
        self._record(state, model)


def recording_trainer(tiny_checkpoints, output_dir, **kwargs):
    """A trainer with a RecordWeights callback and its `_generate_and_score_completions` outputs recorded."""
    trainer_ref = []
    recorder = RecordWeights(trainer_ref)
    trainer = make_trainer(tiny_checkpoints, output_dir, callbacks=[recorder], **kwargs)
    trainer_ref.append(trainer)
    rounds = []
    original = trainer._generate_and_score_completions

    def generate_and_score(inputs):
        step = trainer.state.global_step
        output = original(inputs)
        if trainer.model.training:
            copy = {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in output.items()}
            rounds.append(dict(step=step, staleness=trainer._round_staleness, output=copy))
        return output

    trainer._generate_and_score_completions = generate_and_score
    return trainer, recorder, rounds


# ------------------------------------------------------------------------------------------------ online updates


@pytest.mark.parametrize(
    "head_init",
    [
        "from_policy",
        # A head whose projection reads the token embedding (every head but a fresh from_model one) would leak
        # gradient into the policy's embedding if the head's embedding were not detached.
        "random",
    ],
)
def test_online_update_does_not_change_the_policy_step(tiny_checkpoints, tmp_path, head_init):
    runs = {}
    for online in (None, "tv"):
        trainer = make_trainer(
            tiny_checkpoints,
            tmp_path / str(online),
            head=head_init,
            max_steps=1,
            mtp_online_loss=online,
            mtp_online_learning_rate=1e-2,
        )
        head_before = clone_state(trainer.mtp_head)
        trainer.train()
        runs[online] = (trainer, head_before)
    fixed, fixed_head_before = runs[None]
    online, online_head_before = runs["tv"]
    assert states_equal(fixed_head_before, online_head_before)  # round 1 is drafted by the same head
    fixed_log, online_log = step_logs(fixed)[0], step_logs(online)[0]
    assert "mtp_online/loss" in online_log and "mtp_online/loss" not in fixed_log
    assert not states_equal(clone_state(online.mtp_head), online_head_before)
    assert states_equal(clone_state(fixed.mtp_head), fixed_head_before)
    assert online_log["grad_norm"] > 0
    assert (online_log["loss"], online_log["grad_norm"]) == (fixed_log["loss"], fixed_log["grad_norm"])
    assert states_equal(clone_state(online.model), clone_state(fixed.model))


def test_update_head_online_changes_only_the_head(tiny_checkpoints, tmp_path):
    trainer = make_trainer(tiny_checkpoints, tmp_path, mtp_online_loss="tv", mtp_online_learning_rate=1e-2)
    batch = fresh_batch(trainer)
    policy_before, head_before = clone_state(trainer.model), clone_state(trainer.mtp_head)
    trainer.model.train()
    trainer._update_head_online(batch)
    assert states_equal(clone_state(trainer.model), policy_before)
    assert all(m.training for m in trainer.model.modules())  # the policy is back in training mode
    changed = [k for k, v in clone_state(trainer.mtp_head).items() if not torch.equal(v, head_before[k])]
    assert "fc.weight" in changed and any(k.startswith("model.layers.0.") for k in changed)
    # The head is frozen again between updates and the policy still trains.
    assert not any(p.requires_grad for p in trainer.mtp_head.parameters())
    assert all(p.requires_grad for p in trainer.model.parameters())


def test_update_head_online_leaves_policy_gradients_untouched(tiny_checkpoints, tmp_path):
    trainer = make_trainer(tiny_checkpoints, tmp_path, head="random", mtp_online_loss="tv")
    batch = fresh_batch(trainer)
    policy = trainer.model
    # Gradients the policy has accumulated for its own step, as in the middle of gradient accumulation.
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    policy(input_ids=input_ids).logits.float().square().mean().backward()
    grads_before = {n: p.grad.clone() for n, p in policy.named_parameters()}
    trainer._update_head_online(batch)
    assert all(torch.equal(p.grad, grads_before[n]) for n, p in policy.named_parameters())
    # Parameters without a gradient do not get one.
    policy.zero_grad(set_to_none=True)
    trainer._update_head_online(batch)
    assert [n for n, p in policy.named_parameters() if p.grad is not None] == []


# AdamW moves each weight by about the learning rate per step whatever the gradient's scale: 3e-3 moves the head's
# weights (init scale ~0.15) by a few percent over a dozen steps, enough to fit one batch visibly without the
# oscillations 1e-2 shows; the default 1e-5 is meant for one small step per fresh round and would barely move.
@pytest.mark.parametrize("loss_type", ["tv", "ce"])
def test_repeated_online_updates_lower_the_head_loss(tiny_checkpoints, tmp_path, loss_type):
    trainer = make_trainer(tiny_checkpoints, tmp_path, mtp_online_loss=loss_type, mtp_online_learning_rate=3e-3)
    batch = fresh_batch(trainer)
    metrics = trainer._metrics["train"]
    metrics.clear()
    for _ in range(12):
        trainer._update_head_online(batch)
    losses = metrics["mtp_online/loss"]
    assert len(losses) == len(metrics["mtp_online/grad_norm"]) == 12
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.8 * losses[0], losses
    assert sorted(k for k in metrics if k.startswith("mtp_online/acceptance_step_")) == [
        f"mtp_online/acceptance_step_{j}" for j in (1, 2, 3)
    ]
    if loss_type == "tv":  # TV is one minus the step-1 acceptance the head is trained for
        acceptance = metrics["mtp_online/acceptance_step_1"]
        assert acceptance[-1] > acceptance[0]


def test_update_interval_updates_on_even_rounds_only(tiny_checkpoints, tmp_path):
    trainer, recorder, _ = recording_trainer(
        tiny_checkpoints,
        tmp_path,
        max_steps=4,
        mtp_online_loss="tv",
        mtp_online_update_interval=2,
        mtp_online_learning_rate=1e-2,
    )
    trainer.train()
    logs = step_logs(trainer)
    assert [entry["step"] for entry in logs] == [1, 2, 3, 4]
    assert ["mtp_online/loss" in entry for entry in logs] == [False, True, False, True]
    heads = recorder.head
    assert states_equal(heads[1], heads[0])
    assert not states_equal(heads[2], heads[1])
    assert states_equal(heads[3], heads[2])
    assert not states_equal(heads[4], heads[3])
    assert trainer._rollout.rounds == 4


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_resume_restores_head_optimizer_and_rollout_round(tiny_checkpoints, tmp_path):
    settings = dict(
        max_steps=4,
        save_strategy="steps",
        save_steps=2,
        mtp_online_loss="tv",
        mtp_online_learning_rate=1e-3,
    )
    straight = make_trainer(tiny_checkpoints, tmp_path / "straight", **settings)
    straight.train()

    interrupted = make_trainer(tiny_checkpoints, tmp_path / "resumed", callbacks=[StopAt(2)], **settings)
    interrupted.train()
    checkpoint = tmp_path / "resumed" / "checkpoint-2"
    assert interrupted.state.global_step == 2 and not (tmp_path / "resumed" / "checkpoint-4").exists()
    saved = torch.load(checkpoint / TRAINER_STATE_NAME, weights_only=True)
    assert saved["rollout_round"] == 2 and "head_optimizer" in saved and "fit" in saved
    checkpoint_head = MTPHead.from_pretrained(checkpoint / HEAD_DIR, dtype=torch.float32)
    assert states_equal(clone_state(checkpoint_head), clone_state(interrupted.mtp_head))

    resumed = make_trainer(tiny_checkpoints, tmp_path / "resumed", **settings)
    assert not states_equal(clone_state(resumed.mtp_head), clone_state(interrupted.mtp_head))
    resumed.train(resume_from_checkpoint=str(checkpoint))

    assert resumed._rollout.rounds == straight._rollout.rounds == 4
    assert states_equal(clone_state(resumed.mtp_head), clone_state(straight.mtp_head))
    assert states_equal(clone_state(resumed.model), clone_state(straight.model))
    assert [e["loss"] for e in step_logs(resumed)][2:] == [e["loss"] for e in step_logs(straight)][2:]
    for run in ("straight", "resumed"):
        final = MTPHead.from_pretrained(tmp_path / run / HEAD_DIR, dtype=torch.float32)
        assert states_equal(clone_state(final), clone_state(straight.mtp_head))


@pytest.fixture(scope="module")
def async_resumed_run(tiny_checkpoints, tmp_path_factory):
    """An async run without a head, stopped at its checkpoint after 2 of 4 steps and resumed from it."""
    output_dir = tmp_path_factory.mktemp("async-resume")
    settings = dict(head=None, async_rollouts=True, max_steps=4, save_strategy="steps", save_steps=2)
    make_trainer(tiny_checkpoints, output_dir, callbacks=[StopAt(2)], **settings).train()
    resumed = make_trainer(tiny_checkpoints, output_dir, **settings)
    resumed.train(resume_from_checkpoint=str(output_dir / "checkpoint-2"))
    return resumed


def test_async_resume_without_head_restores_the_rollout_round(async_resumed_run):
    assert async_resumed_run._rollout.rounds == 4


def test_async_rollouts_continue_after_a_resume(async_resumed_run):
    staleness = [entry["rollout/staleness"] for entry in step_logs(async_resumed_run)]
    # Step 3 is generated at once (the round pending at the checkpoint is gone); step 4 comes from the worker.
    assert staleness == [0.0, 1.0, 0.0, 1.0]


# ------------------------------------------------------------------------------------------------- async rollouts


def test_async_rounds_come_from_the_previous_step_snapshot(tiny_checkpoints, load_tiny, tmp_path):
    trainer, recorder, rounds = recording_trainer(
        tiny_checkpoints, tmp_path, async_rollouts=True, max_steps=4, mtp_online_loss="tv"
    )
    trainer.train()
    assert [r["step"] for r in rounds] == [0, 1, 2, 3]
    assert [r["staleness"] for r in rounds] == [0, 1, 1, 1]
    assert [e["rollout/staleness"] for e in step_logs(trainer)] == [0.0, 1.0, 1.0, 1.0]
    reference = load_tiny("llama")
    for r in rounds:
        step, batch = r["step"], r["output"]
        sampling = batch["sampling_per_token_logps"].double() * batch["completion_mask"]
        logps = {}
        for version in {max(step - 1, 0), step}:
            reference.load_state_dict(recorder.policy[version])
            logps[version] = completion_logps(reference, batch)
        if r["staleness"] == 0:
            torch.testing.assert_close(sampling, logps[step], atol=1e-4, rtol=0)
            continue
        previous, current = logps[step - 1], logps[step]
        # The weights moved enough between the two versions for the comparison to tell them apart.
        assert (previous - current).abs().max() > 1e-2
        torch.testing.assert_close(sampling, previous, atol=1e-4, rtol=0)
        # The correction is computed against the policy being trained.
        torch.testing.assert_close(batch["old_per_token_logps"].double(), current, atol=1e-4, rtol=0)


def reference_ratio(current, sampling, mask, mode, clip_min, clip_max):
    """The importance-sampling ratio, element by element."""
    granularity, constraint = mode.split("_")
    rows = []
    for b in range(current.shape[0]):
        diffs = [
            current[b, t].item() - sampling[b, t].item()
            if mask[b, t] and not math.isnan(sampling[b, t].item())
            else 0.0
            for t in range(current.shape[1])
        ]
        ratios = [math.exp(sum(diffs))] if granularity == "sequence" else [math.exp(d) for d in diffs]
        row = []
        for ratio in ratios:
            below = clip_min is not None and ratio < clip_min
            above = clip_max is not None and ratio > clip_max
            if constraint == "truncate":
                ratio = clip_min if below else clip_max if above else ratio
            elif below or above:
                ratio = 0.0
            row.append(ratio)
        rows.append(row)
    return torch.tensor(rows, dtype=torch.float64)


IS_MODES = ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"]


@pytest.mark.parametrize(
    "mode,clip_min,clip_max",
    [(mode, lo, hi) for mode in IS_MODES for lo, hi in [(None, 3.0), (0.5, 2.0), (0.9, None)]]
    + [("token_mask", None, None), ("sequence_mask", None, None)]
    + [("token_truncate", None, None), ("sequence_truncate", None, None)],
)
def test_importance_sampling_ratio_matches_reference(mode, clip_min, clip_max):
    nan = float("nan")
    current = torch.tensor(
        [
            [-1.0, -2.0, -0.5, -3.0, -1.0, -0.2],
            [-0.3, -1.2, -2.2, -0.7, -1.5, -0.4],
            [-2.0, -0.1, -0.9, -1.1, -0.6, -1.3],
            [-0.5, -0.5, -0.5, -0.5, -0.5, -0.5],
        ],
        dtype=torch.float64,
    )
    # Token log-ratios from -1.4 to +1.3 (ratios 0.25 .. 3.7) and sequence ratios below and above every bound.
    sampling = current - torch.tensor(
        [
            [0.2, -0.4, 1.3, 0.1, 50.0, -50.0],  # the last two are padding: huge differences must not count
            [-1.4, 0.05, 0.0, 0.3, 0.0, 0.0],
            [0.6, nan, 0.7, -0.2, 0.1, 0.0],  # a NaN sampling log-prob at a completion token counts as ratio 1
            [-0.6, -0.5, -0.4, 0.0, 0.0, nan],
        ],
        dtype=torch.float64,
    )
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0]])
    ratio = importance_sampling_ratio(current, sampling, mask, mode, clip_min, clip_max)
    expected = reference_ratio(current, sampling, mask, mode, clip_min, clip_max)
    assert ratio.shape == ((4, 1) if mode.startswith("sequence") else (4, 6))
    assert not ratio.isnan().any()
    torch.testing.assert_close(ratio, expected, rtol=1e-12, atol=0)
    # Masked tokens are ignored whatever they hold.
    garbage = torch.where(mask.bool(), sampling, torch.full_like(sampling, 123.0))
    torch.testing.assert_close(importance_sampling_ratio(current, garbage, mask, mode, clip_min, clip_max), ratio)
    # The case is not vacuous: the bounds are active.
    unbounded = reference_ratio(current, sampling, mask, mode, None, None)
    if clip_min is not None or clip_max is not None:
        assert not torch.equal(expected, unbounded)


def test_importance_sampling_ratio_rejects_unknown_modes():
    x = torch.zeros(1, 2)
    for mode in ("token", "sequence_clip", "row_mask"):
        with pytest.raises(ValueError):
            importance_sampling_ratio(x, x, torch.ones(1, 2), mode, None, 3.0)


@pytest.mark.parametrize("mode", ["sequence_mask", "token_truncate"])
def test_stale_rounds_scale_the_advantages_by_the_ratio(tiny_checkpoints, tmp_path, monkeypatch, mode):
    trl_advantages = []
    trl_method = trl.GRPOTrainer._generate_and_score_completions

    def record_trl(self, inputs):
        output = trl_method(self, inputs)
        if self.model.training:
            trl_advantages.append(output["advantages"].clone())
        return output

    monkeypatch.setattr(trl.GRPOTrainer, "_generate_and_score_completions", record_trl)
    clip_min, clip_max = (None, 3.0) if mode == "sequence_mask" else (0.8, 1.25)
    trainer, _, rounds = recording_trainer(
        tiny_checkpoints,
        tmp_path,
        head=None,
        async_rollouts=True,
        learning_rate=3e-2,
        vllm_importance_sampling_mode=mode,
        vllm_importance_sampling_clip_min=clip_min,
        vllm_importance_sampling_clip_max=clip_max,
    )
    loss_inputs = []
    compute_loss = trainer._compute_loss

    def record_loss_inputs(model, inputs):
        loss_inputs.append({k: v.detach().clone() for k, v in inputs.items() if torch.is_tensor(v)})
        return compute_loss(model, inputs)

    trainer._compute_loss = record_loss_inputs
    trainer.train()

    assert [r["staleness"] for r in rounds] == [0, 1, 1] and len(trl_advantages) == len(loss_inputs) == 3
    logs = step_logs(trainer)
    assert "sampling/importance_sampling_ratio/mean" not in logs[0]
    ratios = []
    for r, trl_adv, log, loss_batch in zip(rounds, trl_advantages, logs, loss_inputs, strict=True):
        batch = r["output"]
        if r["staleness"] == 0:
            assert torch.equal(batch["advantages"], trl_adv)
            continue
        ratio = reference_ratio(
            batch["old_per_token_logps"],
            batch["sampling_per_token_logps"],
            batch["completion_mask"],
            mode,
            clip_min,
            clip_max,
        ).float()
        ratios.append(ratio)
        torch.testing.assert_close(batch["advantages"], trl_adv.unsqueeze(-1) * ratio, rtol=1e-5, atol=1e-6)
        valid = ratio.expand_as(batch["completion_mask"])[batch["completion_mask"].bool()]
        assert log["sampling/importance_sampling_ratio/mean"] == pytest.approx(valid.mean().item(), rel=1e-5)
        assert log["sampling/importance_sampling_ratio/min"] == pytest.approx(valid.min().item(), rel=1e-5)
        assert log["sampling/importance_sampling_ratio/max"] == pytest.approx(valid.max().item(), rel=1e-5)
        # The loss receives these advantages (TRL shuffles the rows of a round before splitting it).
        for row in range(loss_batch["completion_ids"].shape[0]):
            match = (batch["completion_ids"] == loss_batch["completion_ids"][row]).all(-1).nonzero()
            assert len(match) >= 1
            torch.testing.assert_close(loss_batch["advantages"][row], batch["advantages"][match[0, 0]])
    # The correction is not the identity in these runs.
    assert any((ratio - 1).abs().max() > 1e-3 for ratio in ratios)


def train_async(tiny_checkpoints, output_dir, **overrides):
    trainer = make_trainer(tiny_checkpoints, output_dir, async_rollouts=True, **overrides)
    calls = []
    generate_now = trainer._rollout._generate_now

    def count_generate_now(policy, prompt_ids, round_index):
        calls.append(round_index)
        return generate_now(policy, prompt_ids, round_index)

    trainer._rollout._generate_now = count_generate_now
    trainer.train()
    return trainer, calls


def test_async_runs_are_reproducible(tiny_checkpoints, tmp_path):
    settings = dict(max_steps=4, max_staleness=2, mtp_online_loss="tv", mtp_online_learning_rate=1e-2)
    first, first_calls = train_async(tiny_checkpoints, tmp_path / "a", **settings)
    second, second_calls = train_async(tiny_checkpoints, tmp_path / "b", **settings)
    # A lag of one step is within max_staleness: only the first round is generated on the spot.
    assert first_calls == second_calls == [0]
    assert [e["rollout/staleness"] for e in step_logs(first)] == [0.0, 1.0, 1.0, 1.0]
    keys = ("loss", "grad_norm", "reward", "mtp_online/loss", "sampling/importance_sampling_ratio/mean")
    history = [[entry.get(k) for k in keys] for entry in step_logs(first)]
    assert history == [[entry.get(k) for k in keys] for entry in step_logs(second)]
    assert any(entry["grad_norm"] > 0 for entry in step_logs(first))
    assert states_equal(clone_state(first.model), clone_state(second.model))
    assert states_equal(clone_state(first.mtp_head), clone_state(second.mtp_head))


@pytest.mark.parametrize("max_staleness,expected", [(1, [0.0, 0.0, 0.0]), (2, [0.0, 2.0, 2.0])])
def test_rounds_staler_than_max_staleness_are_regenerated(tiny_checkpoints, tmp_path, max_staleness, expected):
    # Two optimizer steps per generation round: the worker's rollouts lag two steps behind when taken.
    trainer, calls = train_async(
        tiny_checkpoints,
        tmp_path,
        head=None,
        max_steps=6,
        steps_per_generation=2,
        max_staleness=max_staleness,
    )
    staleness = [e.get("rollout/staleness") for e in step_logs(trainer)][::2]
    assert staleness == expected
    assert calls == ([0, 1, 2] if max_staleness == 1 else [0])


def test_missing_async_rollouts_fall_back_to_synchronous_generation(tiny_checkpoints, tmp_path, monkeypatch):
    taken = []
    original_take = AsyncRolloutWorker.take

    def take_nothing(self, prompt_ids):
        taken.append(original_take(self, prompt_ids))  # waits for the round, then drops it
        return None

    monkeypatch.setattr(AsyncRolloutWorker, "take", take_nothing)
    settings = dict(max_steps=3, mtp_online_loss="tv", mtp_online_learning_rate=1e-2)
    fallback, calls = train_async(tiny_checkpoints, tmp_path / "async", **settings)
    assert calls == [0, 1, 2]
    assert sum(rollout is not None for rollout in taken) == 2  # rounds 2 and 3 were generated and dropped
    logs = step_logs(fallback)
    assert [e["rollout/staleness"] for e in logs] == [0.0, 0.0, 0.0]
    assert not any("sampling/importance_sampling_ratio/mean" in e for e in logs)
    # Regenerated rounds use the round's own seed, and the worker leaves the trainer's random stream alone: the
    # run is the synchronous run.
    sync = make_trainer(tiny_checkpoints, tmp_path / "sync", **settings)
    sync.train()
    assert [e["loss"] for e in logs] == [e["loss"] for e in step_logs(sync)]
    assert states_equal(clone_state(fallback.model), clone_state(sync.model))
    assert states_equal(clone_state(fallback.mtp_head), clone_state(sync.mtp_head))


def test_background_generation_overlaps_training(tiny_checkpoints, tmp_path, monkeypatch):
    # A handshake between the trainer's loss of round n (at global step n - 1) and the background generation of round
    # n + 1 (submitted at that step): each side signals, then waits for the other. Both only succeed if round n + 1
    # is being generated on another thread while the trainer trains on round n; generating it on the trainer's
    # thread, or only when it is taken, makes a side time out.
    loss_started = {step: threading.Event() for step in range(10)}
    generation_started = {step: threading.Event() for step in range(10)}
    generations, losses = [], []
    original_generate = AsyncRolloutWorker._generate

    def held_generate(self, prompt_ids, version, generator, kwargs):
        record = dict(version=version, thread=threading.current_thread(), started=time.perf_counter())
        generation_started[version].set()
        record["saw_loss"] = loss_started[version].wait(timeout=15)
        rollout = original_generate(self, prompt_ids, version, generator, kwargs)
        record["finished"] = time.perf_counter()
        generations.append(record)
        return rollout

    monkeypatch.setattr(AsyncRolloutWorker, "_generate", held_generate)
    trainer, recorder, _ = recording_trainer(tiny_checkpoints, tmp_path, async_rollouts=True, max_steps=3)
    compute_loss = trainer.compute_loss

    def held_compute_loss(*args, **kwargs):
        step = trainer.state.global_step
        record = dict(step=step, started=time.perf_counter())
        loss_started[step].set()
        record["saw_generation"] = generation_started[step].wait(timeout=15)
        losses.append(record)
        return compute_loss(*args, **kwargs)

    trainer.compute_loss = held_compute_loss
    trainer.train()

    # Rounds 2, 3 and 4 (the last one is submitted at the last step and dropped at the end of training).
    assert [g["version"] for g in generations] == [0, 1, 2]
    assert [loss["step"] for loss in losses] == [0, 1, 2]
    for g, loss in zip(generations, losses, strict=True):
        assert g["saw_loss"] and loss["saw_generation"], (g, loss)
        assert g["thread"] is not threading.main_thread() and g["thread"].name.startswith("bebop-rollouts")
        # Round n + 1 started before the trainer finished training on round n, and ended after that training began.
        assert g["started"] < recorder.step_end_times[loss["step"] + 1]
        assert loss["started"] < g["finished"]
    assert [e["rollout/staleness"] for e in step_logs(trainer)] == [0.0, 1.0, 1.0]
