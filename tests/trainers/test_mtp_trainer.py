import json
import os
from concurrent.futures import Future
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects
from transformers import AutoTokenizer, TrainerCallback

from bebop_trl import MTPConfig, MTPHead, MTPTrainer
from bebop_trl.modeling.hub import load_tensors
from bebop_trl.modeling.teacher_forcing import (
    completion_token_mask,
    drafting_slots,
    final_hidden_states,
    unroll_teacher_forced,
)
from bebop_trl.ops import LOSS_TYPES, mtp_loss
from bebop_trl.trainers import mtp_data
from bebop_trl.trainers.head_loss import teacher_forced_head_loss
from bebop_trl.trainers.mtp_data import self_distill, tokenize_dataset


HEAD_REPO_FILES = ["README.md", "config.json", "model.safetensors", "training_args.json"]
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def is_pickle(path: Path) -> bool:
    """Whether a file is, or may be, a pickle: by its name, or by its first bytes."""
    if path.suffix in PICKLE_SUFFIXES:
        return True
    if path.suffix == ".safetensors":
        # Its first 8 bytes are a header length, which may begin with any byte: read it as safetensors instead.
        try:
            load_tensors(str(path))
        except OSError:
            return True
        return False
    # A bare pickle starts with the PROTO opcode; torch.save writes a zip archive holding data.pkl.
    magic = path.read_bytes()[:4]
    return magic.startswith(b"\x80") or magic == b"PK\x03\x04"


class FakeHub:
    """Stands in for `hf_api()`: records what each `upload_folder` would upload, filtering the folder as
    huggingface_hub does, at the time of the call (pushes during training run in the background there)."""

    def __init__(self):
        self.created = []
        self.uploads = []

    def create_repo(self, repo_id, *, token=None, private=None, exist_ok=False):
        self.created.append(repo_id)
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def upload_folder(self, *, repo_id, folder_path, allow_patterns=None, ignore_patterns=None, **kwargs):
        ignore = [ignore_patterns] if isinstance(ignore_patterns, str) else list(ignore_patterns or [])
        present = [p.relative_to(folder_path).as_posix() for p in Path(folder_path).glob("**/*") if p.is_file()]
        files = sorted(
            filter_repo_objects(
                present, allow_patterns=allow_patterns, ignore_patterns=ignore + DEFAULT_IGNORE_PATTERNS
            )
        )
        upload = dict(kwargs, repo_id=repo_id, files=files)
        upload["pickles"] = [name for name in files if is_pickle(Path(folder_path, name))]
        if "README.md" in files:
            upload["card"] = Path(folder_path, "README.md").read_text()
        if "model.safetensors" in files:
            upload["weights"] = load_tensors(os.path.join(folder_path, "model.safetensors"))
        self.uploads.append(upload)
        if kwargs.get("run_as_future"):
            future = Future()
            future.set_result("commit")
            return future
        return "commit"


@pytest.fixture
def fake_hub(monkeypatch) -> FakeHub:
    hub = FakeHub()
    # Trainer.init_hf_repo creates the repo through transformers' hf_api; MTPTrainer uploads through its own import.
    monkeypatch.setattr("transformers.trainer.hf_api", lambda: hub)
    monkeypatch.setattr("bebop_trl.trainers.mtp_trainer.hf_api", lambda: hub)
    return hub


def config(tmp_path, **overrides) -> MTPConfig:
    settings = dict(
        output_dir=str(tmp_path),
        max_steps=20,
        per_device_train_batch_size=8,
        learning_rate=3e-3,
        num_mtp_steps=3,
        num_speculative_tokens=2,
        eval_num_prompts=12,
        eval_max_new_tokens=16,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        logging_steps=5,
        disable_tqdm=True,
        seed=0,
    )
    settings.update(overrides)
    return MTPConfig(**settings)


@pytest.fixture
def tokenizer(tiny_checkpoints):
    return AutoTokenizer.from_pretrained(tiny_checkpoints["llama"])


@pytest.fixture(scope="module")
def tokenizer_module(tiny_checkpoints):
    return AutoTokenizer.from_pretrained(tiny_checkpoints["llama"])


def loss_test_config(tmp_path, loss_type="e2e_tv") -> MTPConfig:
    # k = 1: every draft measures step-1 acceptance; all 48 held-out prompts, so that about 1500 drafts pin it down
    # (standard error about 0.013). No KL warm start: each loss must improve the head on its own.
    return config(
        tmp_path,
        loss_type=loss_type,
        kl_warm_start=0,
        max_steps=30,
        learning_rate=5e-3,
        num_speculative_tokens=1,
        eval_num_prompts=48,
        eval_max_new_tokens=48,
    )


@pytest.fixture(scope="module")
def untrained_metrics(load_tiny, tokenizer_module, distilled_train, distilled_held_out, tmp_path_factory):
    """Evaluation of the untrained head on held-out data (the same for every loss type)."""
    args = loss_test_config(tmp_path_factory.mktemp("untrained"))
    trainer = MTPTrainer(load_tiny("llama"), args, distilled_train, distilled_held_out, tokenizer_module)
    return trainer.evaluate()


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_training_raises_expected_and_measured_acceptance(
    loss_type, load_tiny, tokenizer, distilled_train, distilled_held_out, untrained_metrics, tmp_path
):
    policy = load_tiny("llama")
    args = loss_test_config(tmp_path, loss_type)
    trainer = MTPTrainer(policy, args, distilled_train, distilled_held_out, tokenizer)
    frozen = {k: v.clone() for k, v in policy.state_dict().items()}
    trainer.train()
    after, before = trainer.evaluate(), untrained_metrics

    # The untrained head starts as the identity (q = the policy's current next-token distribution, acceptance about
    # 0.5 on this tiny model); every loss improves on it on held-out data, ce least on the analytic figures.
    assert after["eval_expected_accepted_length"] > before["eval_expected_accepted_length"] + 0.01
    assert after["eval_acceptance/step_1"] > before["eval_acceptance/step_1"] + 0.004
    # The real engine on held-out prompts (seeded, so the comparison is deterministic).
    measured = "eval_measured_acceptance_probabilistic"
    assert after[measured] > before[measured] + 0.02
    for name in ("eval_measured_acceptance_greedy", "eval_measured_accepted_length_greedy", "eval_tv/step_3"):
        assert name in after
    for name, tensor in policy.state_dict().items():
        assert torch.equal(tensor, frozen[name]), f"the frozen policy changed: {name}"
    assert not any(p.requires_grad for p in policy.parameters())


def test_policy_stays_in_eval_mode(load_tiny, tokenizer, distilled, tmp_path):
    trainer = MTPTrainer(load_tiny("llama"), config(tmp_path), distilled, processing_class=tokenizer)
    trainer.model.train()
    assert trainer.head.training and not trainer.policy.training


@pytest.mark.parametrize("completion_only_loss", [True, False])
def test_loss_scores_the_slots_the_engine_drafts(load_tiny, tokenizer, distilled, tmp_path, completion_only_loss):
    trainer = MTPTrainer(
        load_tiny("llama"),
        config(tmp_path, completion_only_loss=completion_only_loss),
        distilled,
        processing_class=tokenizer,
    )
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["prompt_length"].shape == (8,) and (batch["prompt_length"] > 0).all()
    assert set(batch["prompt_length"].tolist()) <= set(distilled["prompt_length"])
    module = trainer.model
    with torch.no_grad():
        out = module(**batch)
        hidden = final_hidden_states(module.policy, batch["input_ids"], batch["attention_mask"])
        slots = unroll_teacher_forced(module.head, batch["input_ids"], hidden, batch["attention_mask"], 3)
        mask = slots.mask
        if completion_only_loss:
            mask = mask & drafting_slots(completion_token_mask(batch["attention_mask"], batch["prompt_length"]), 3)
            assert mask.sum() < slots.mask.sum()
        expected = mtp_loss(slots.draft_hidden, slots.target_hidden, module.head.lm_head_weight, mask=mask)
    torch.testing.assert_close(out.loss, expected.loss)
    torch.testing.assert_close(out.acceptance, expected.acceptance)


class StopAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_resume_gives_the_same_head_as_an_uninterrupted_run(load_tiny, tokenizer, distilled, tmp_path):
    settings = dict(max_steps=8, save_strategy="steps", save_steps=4, logging_steps=1)
    uninterrupted = MTPTrainer(
        load_tiny("llama"), config(tmp_path / "a", **settings), distilled, processing_class=tokenizer
    )
    uninterrupted.train()

    interrupted = MTPTrainer(
        load_tiny("llama"),
        config(tmp_path / "b", **settings),
        distilled,
        processing_class=tokenizer,
        callbacks=[StopAt(4)],
    )
    interrupted.train()
    checkpoint = tmp_path / "b" / "checkpoint-4"
    assert sorted(os.listdir(checkpoint)) == [
        "README.md",
        "config.json",
        "model.safetensors",
        "optimizer.pt",
        "rng_state.pth",
        "scheduler.pt",
        "trainer_state.json",
        "training_args.json",
    ]
    stored = load_tensors(str(checkpoint / "model.safetensors"))
    assert stored.keys() == interrupted.head.state_dict().keys(), "a checkpoint holds the head only"

    resumed = MTPTrainer(load_tiny("llama"), config(tmp_path / "b", **settings), distilled, processing_class=tokenizer)
    with torch.no_grad():
        for param in resumed.head.parameters():
            param.add_(1.0)  # resuming must overwrite these with the checkpoint's values
    resumed.train(resume_from_checkpoint=str(checkpoint))
    for name, tensor in uninterrupted.head.state_dict().items():
        torch.testing.assert_close(resumed.head.state_dict()[name], tensor, rtol=1e-6, atol=1e-7, msg=name)
    losses = [e["loss"] for e in uninterrupted.state.log_history if "loss" in e]
    resumed_losses = [e["loss"] for e in resumed.state.log_history if "loss" in e]
    assert resumed_losses[-4:] == pytest.approx(losses[-4:], rel=1e-5)


def test_final_save_is_an_adapter_with_recipe_and_measured_acceptance(load_tiny, tokenizer, distilled, tmp_path):
    policy = load_tiny("llama")
    args = config(tmp_path, max_steps=2, hub_token="hf_secret")
    trainer = MTPTrainer(policy, args, distilled, distilled.select(range(4)), tokenizer)
    trainer.train()
    trainer.evaluate()
    trainer.save_model()
    # The head repo and nothing else: no tokenizer, no training_args.bin.
    assert sorted(os.listdir(tmp_path)) == HEAD_REPO_FILES
    assert not [name for name in os.listdir(tmp_path) if is_pickle(tmp_path / name)]
    trainer.create_model_card()
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["recipe"]["loss_type"] == "e2e_tv" and saved["recipe"]["num_mtp_steps"] == 3
    assert 0.0 <= saved["metrics"]["measured_acceptance_probabilistic"] <= 1.0
    card = (tmp_path / "README.md").read_text()
    assert "| loss_type | e2e_tv |" in card and "measured_acceptance_greedy" in card
    training_args = (tmp_path / "training_args.json").read_text()
    assert "hf_secret" not in training_args
    assert json.loads(training_args) == json.loads(args.to_json_string())
    assert json.loads(training_args)["hub_token"] == "<HUB_TOKEN>"
    head = MTPHead.from_pretrained(tmp_path, policy=policy)
    for name, tensor in trainer.head.state_dict().items():
        assert torch.equal(head.state_dict()[name], tensor)


def test_nan_loss_is_reported_with_step_and_batch(load_tiny, tokenizer, distilled, tmp_path):
    trainer = MTPTrainer(load_tiny("llama"), config(tmp_path, max_steps=2), distilled, processing_class=tokenizer)
    with torch.no_grad():
        trainer.head.fc.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match=r"MTP loss is nan at global step 0 .* batch of 8 sequences"):
        trainer.train()


def test_dataset_without_usable_columns(load_tiny, tokenizer, tmp_path):
    bad = Dataset.from_dict({"question": ["a"], "label": [1]})
    with pytest.raises(
        ValueError, match=r"columns \['label', 'question'\].*'input_ids'.*'text'.*'messages'.*'prompt'"
    ):
        MTPTrainer(load_tiny("llama"), config(tmp_path), bad, processing_class=tokenizer)


def test_mismatched_head_is_refused(load_tiny, tokenizer, distilled, tmp_path):
    qwen_head = MTPHead.from_model(load_tiny("qwen3"))
    with pytest.raises(ValueError, match="architecture 'qwen3'"):
        MTPTrainer(load_tiny("llama"), config(tmp_path), distilled, processing_class=tokenizer, head=qwen_head)


def test_config_validation(tmp_path):
    with pytest.raises(ValueError, match="Unknown loss_type 'js'"):
        MTPConfig(str(tmp_path), loss_type="js")
    with pytest.raises(ValueError, match="num_mtp_steps"):
        MTPConfig(str(tmp_path), num_mtp_steps=0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        MTPConfig(str(tmp_path), temperature=0.0)
    with pytest.raises(ValueError, match="lk_kl_scale must lie in"):
        MTPConfig(str(tmp_path), loss_type="lk_lambda", lk_kl_scale=2.0)


def test_self_distillation_is_cached_and_reused(load_tiny, tokenizer, tmp_path, monkeypatch):
    policy = load_tiny("llama")
    prompts = [tokenizer("1+1=")["input_ids"], tokenizer("2+2=")["input_ids"]]
    kwargs = dict(max_new_tokens=8, samples_per_prompt=2, cache_dir=tmp_path, log=lambda m: None)
    first = self_distill(policy, tokenizer, prompts, **kwargs)
    assert len(first) == 4 and first["prompt_length"] == [4, 4, 4, 4]
    assert all(row[:4] in prompts for row in first["input_ids"])

    def no_sampling(*args, **kwargs):
        raise AssertionError("the cached completions should have been reused")

    monkeypatch.setattr(mtp_data, "sample_completions", no_sampling)
    assert self_distill(policy, tokenizer, prompts, **kwargs)["input_ids"] == first["input_ids"]
    with pytest.raises(AssertionError, match="reused"):
        self_distill(policy, tokenizer, prompts, **{**kwargs, "max_new_tokens": 9})


def test_prompt_only_conversations_are_self_distilled(load_tiny, tokenizer, tmp_path):
    prompts = Dataset.from_dict({"messages": [[{"role": "user", "content": f"{i}*2?"}] for i in range(4)]})
    trainer = MTPTrainer(
        load_tiny("llama"),
        config(tmp_path, distill_max_new_tokens=6, distill_cache_dir=str(tmp_path / "cache")),
        prompts,
        processing_class=tokenizer,
    )
    prompt = tokenizer.apply_chat_template(prompts[0]["messages"], add_generation_prompt=True, tokenize=True)[
        "input_ids"
    ]
    row = trainer.train_dataset[0]
    assert row["input_ids"][: len(prompt)] == prompt and row["prompt_length"] == len(prompt)
    assert len(prompt) < len(row["input_ids"]) <= len(prompt) + 6
    assert os.listdir(tmp_path / "cache")


def test_tokenize_formats(tokenizer):
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    prompt_ids = tokenizer.apply_chat_template(chat[:1], add_generation_prompt=True, tokenize=True)["input_ids"]
    full_ids = tokenizer.apply_chat_template(chat, tokenize=True)["input_ids"]
    cases = {
        "text": (Dataset.from_dict({"text": ["abc"]}), tokenizer("abc")["input_ids"], 0),
        "messages": (Dataset.from_dict({"messages": [chat]}), full_ids, len(prompt_ids)),
        "prompt_completion": (
            Dataset.from_dict({"prompt": [chat[:1]], "completion": [chat[1:]]}),
            full_ids,
            len(prompt_ids),
        ),
        "plain_prompt_completion": (
            Dataset.from_dict({"prompt": ["ab"], "completion": ["cd"]}),
            tokenizer("abcd")["input_ids"],
            2,
        ),
        "input_ids": (Dataset.from_dict({"input_ids": [[5, 6, 7]], "prompt_length": [1]}), [5, 6, 7], 1),
    }
    for name, (dataset, ids, prompt_length) in cases.items():
        row = tokenize_dataset(dataset, tokenizer)[0]
        assert row["input_ids"] == ids, name
        assert row["prompt_length"] == prompt_length, name
    truncated = tokenize_dataset(Dataset.from_dict({"text": ["abcdef", "a"]}), tokenizer, max_length=4)
    assert truncated["input_ids"] == [tokenizer("abcd")["input_ids"]], "truncated, and 1-token rows dropped"


def test_push_to_hub_uploads_the_head_and_its_card(load_tiny, tokenizer, distilled_train, tmp_path, fake_hub):
    trainer = MTPTrainer(
        load_tiny("llama"), config(tmp_path, max_steps=1, hub_token="t"), distilled_train, processing_class=tokenizer
    )
    trainer.train()
    # Files other tools leave in output_dir never reach the head repo.
    tokenizer.save_pretrained(tmp_path)
    torch.save(trainer.args, tmp_path / "training_args.bin")
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "events.out").write_text("logs")
    trainer.hub_model_id = "org/tiny-head"  # as init_hf_repo sets it when push_to_hub=True
    assert trainer.push_to_hub(revision="dev") == "commit"
    (upload,) = fake_hub.uploads
    assert upload["repo_id"] == "org/tiny-head"
    assert upload["files"] == HEAD_REPO_FILES
    assert upload["pickles"] == []
    assert upload["commit_message"] == "End of training" and upload["token"] == "t" and upload["revision"] == "dev"
    assert upload["run_as_future"] is False
    assert "library_name: bebop-trl" in upload["card"] and "| loss_type | e2e_tv |" in upload["card"]
    assert upload["weights"].keys() == trainer.head.state_dict().keys()
    assert fake_hub.created == [], "the repo id was already set"


@pytest.mark.parametrize("hub_strategy", ["every_save", "checkpoint"])
def test_push_during_training_uploads_the_head_only(
    hub_strategy, load_tiny, tokenizer, distilled_train, tmp_path, fake_hub
):
    args = config(
        tmp_path,
        max_steps=2,
        save_strategy="steps",
        save_steps=1,
        push_to_hub=True,
        hub_model_id="org/tiny-head",
        hub_strategy=hub_strategy,
        hub_token="t",
        hub_revision="dev",
    )
    trainer = MTPTrainer(load_tiny("llama"), args, distilled_train, processing_class=tokenizer)
    assert fake_hub.created == ["org/tiny-head"]
    trainer.train()
    trainer.push_to_hub()

    head_pushes = [u for u in fake_hub.uploads if u.get("path_in_repo") is None]
    assert [u["commit_message"] for u in head_pushes] == [
        "Training in progress, step 1",
        "Training in progress, step 2",
        "End of training",
    ]
    for upload in head_pushes:
        assert upload["repo_id"] == "org/tiny-head" and upload["token"] == "t" and upload["revision"] == "dev"
        assert upload["files"] == HEAD_REPO_FILES, upload["commit_message"]
        assert upload["pickles"] == [], upload["commit_message"]
    assert [u["run_as_future"] for u in head_pushes] == [True, True, False]
    # The last push during training and the final one carry the trained head.
    for upload in head_pushes[1:]:
        assert upload["weights"].keys() == trainer.head.state_dict().keys()
        for name, tensor in trainer.head.state_dict().items():
            assert torch.equal(upload["weights"][name], tensor), name

    checkpoint_pushes = [u for u in fake_hub.uploads if u.get("path_in_repo") is not None]
    if hub_strategy == "every_save":
        assert checkpoint_pushes == []
    else:
        # The resumable checkpoint (trainer state included) goes to its own folder of the repo, as in transformers.
        assert [u["path_in_repo"] for u in checkpoint_pushes] == ["last-checkpoint", "last-checkpoint"]
        assert [u["commit_message"] for u in checkpoint_pushes] == [
            "Training in progress, step 1, checkpoint",
            "Training in progress, step 2, checkpoint",
        ]
        assert set(HEAD_REPO_FILES) < set(checkpoint_pushes[-1]["files"])
    # What transformers would have written into output_dir during the pushes is not there.
    assert not {"training_args.bin", "tokenizer.json", "tokenizer_config.json"} & set(os.listdir(tmp_path))


def test_kl_warm_start_trains_the_first_steps_with_kl(load_tiny, tokenizer, distilled_train, tmp_path):
    def train(name, **overrides):
        settings = dict(max_steps=4, logging_steps=1, eval_strategy="no")
        trainer = MTPTrainer(
            load_tiny("llama"),
            config(tmp_path / name, **settings, **overrides),
            distilled_train,
            processing_class=tokenizer,
        )
        trainer.train()
        return trainer

    warm = train("warm", loss_type="e2e_tv", kl_warm_start=0.5)
    assert [e["kl_warm_start"] for e in warm.state.log_history if "loss" in e] == [1.0, 1.0, 0.0, 0.0]
    # A warm start over the whole run is a kl run; another loss type ignores the setting.
    all_kl = train("all-kl", loss_type="tv", kl_warm_start=4)
    kl = train("kl", loss_type="kl")
    for a, b in zip(all_kl.head.parameters(), kl.head.parameters(), strict=True):
        assert torch.equal(a, b)
    ce = train("ce", loss_type="ce", kl_warm_start=4)
    assert all(e["kl_warm_start"] == 0.0 for e in ce.state.log_history if "loss" in e)
    with pytest.raises(ValueError, match="kl_warm_start"):
        config(tmp_path, kl_warm_start=-1)


def test_evaluate_measures_each_named_eval_set(load_tiny, tokenizer, distilled, tmp_path):
    args = config(tmp_path, max_steps=1, eval_num_prompts=2, eval_max_new_tokens=4)
    eval_sets = {"easy": distilled.select(range(4)), "hard": distilled.select(range(4, 8))}
    trainer = MTPTrainer(load_tiny("llama"), args, distilled, eval_sets, tokenizer)
    metrics = trainer.evaluate()
    for name in eval_sets:
        assert f"eval_{name}_loss" in metrics
        assert 0.0 <= metrics[f"eval_{name}_measured_acceptance_probabilistic"] <= 1.0
    assert not any(key.startswith("eval_measured") for key in metrics)  # nothing unlabelled


def test_draft_vocab_head_is_chosen_from_the_data_trained_and_logged(load_tiny, tokenizer, distilled, tmp_path):
    policy = load_tiny("llama")
    args = config(tmp_path, max_steps=4, logging_steps=2, loss_type="tv", kl_warm_start=0, draft_vocab_size=48)
    distilled_train = distilled.select(range(64))
    trainer = MTPTrainer(policy, args, distilled_train, distilled.select(range(64, 72)), tokenizer)
    head = trainer.head
    assert head.config.draft_vocab_size == 48 and len(head.draft_vocab) == 48
    special = {i for i in (*tokenizer.all_special_ids, policy.generation_config.eos_token_id) if i is not None}
    assert special <= set(head.draft_vocab.tolist())
    # The most frequent completion tokens are in; the head's rows are the policy's for them.
    counts = torch.bincount(
        torch.tensor(
            [
                t
                for ids, n in zip(distilled_train["input_ids"], distilled_train["prompt_length"], strict=True)
                for t in ids[n:]
            ]
        ),
        minlength=128,
    )
    assert set(counts.topk(20).indices.tolist()) <= set(head.draft_vocab.tolist())
    assert torch.equal(head.draft_lm_head_weight, policy.lm_head.weight[head.draft_vocab])

    batch = trainer.data_collator([distilled_train[i] for i in range(4)])
    module = trainer.model
    out = module(batch["input_ids"], batch["attention_mask"], batch["prompt_length"])
    with torch.no_grad():
        hidden = final_hidden_states(policy, batch["input_ids"], batch["attention_mask"])
    slots = unroll_teacher_forced(head, batch["input_ids"], hidden, batch["attention_mask"], 3)
    mask = slots.mask & drafting_slots(completion_token_mask(batch["attention_mask"], batch["prompt_length"]), 3)
    expected = mtp_loss(
        slots.draft_hidden,
        slots.target_hidden,
        head.lm_head_weight,
        mask=mask,
        loss_type="tv",
        draft_lm_head_weight=head.draft_lm_head_weight,
        draft_vocab=head.draft_vocab,
    )
    torch.testing.assert_close(out.loss, expected.loss)
    assert (out.acceptance <= 1 - out.target_mass_outside_draft_vocab + 1e-6).all()

    trainer.train()
    logged = [entry["target_mass_outside_draft_vocab"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 2 and all(0 < mass < 1 for mass in logged)
    metrics = trainer.evaluate()
    assert 0 < metrics["eval_target_mass_outside_draft_vocab"] < 1
    assert 0 <= metrics["eval_measured_acceptance_probabilistic"] <= 1
    trainer.save_model()
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["draft_vocab_size"] == 48 and saved["recipe"]["draft_vocab_size"] == 48
    assert 0.5 < saved["recipe"]["draft_vocab_train_mass"] <= 1
    reloaded = MTPHead.from_pretrained(tmp_path, policy=policy)
    assert torch.equal(reloaded.draft_vocab, head.draft_vocab)
    assert torch.equal(reloaded.draft_lm_head_weight, head.draft_lm_head_weight)


def test_draft_vocab_size_must_match_a_given_head(load_tiny, tokenizer, distilled, tmp_path):
    policy = load_tiny("llama")
    with pytest.raises(ValueError, match="draft_vocab_size=48 builds a new head, but the head given has draft"):
        MTPTrainer(
            policy,
            config(tmp_path, draft_vocab_size=48),
            distilled,
            processing_class=tokenizer,
            head=MTPHead.from_model(policy),
        )
    with pytest.raises(ValueError, match="draft_vocab_size must be None or >= 1"):
        MTPConfig(str(tmp_path), draft_vocab_size=0)


@pytest.mark.parametrize("loss_type", ["ce", "kl", "e2e_tv"])
@pytest.mark.parametrize("draft_vocab", [False, True])
def test_head_loss_with_per_position_normalisers_matches_the_slotwise_loss(load_tiny, loss_type, draft_vocab):
    policy = load_tiny("llama")
    head = MTPHead.from_model(policy)
    if draft_vocab:
        head = head.with_draft_vocab(torch.arange(0, policy.config.vocab_size, 3))
    ids = torch.randint(4, 100, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0
    hidden = final_hidden_states(policy, ids, mask)
    out = teacher_forced_head_loss(head, ids, hidden, mask, num_steps=3, loss_type=loss_type, temperature=0.8)
    slots = unroll_teacher_forced(head, ids, hidden, mask, 3)
    is_ce = loss_type == "ce"
    expected = mtp_loss(
        slots.draft_hidden, slots.target_hidden, head.lm_head_weight, loss_type=loss_type, temperature=0.8,
        mask=slots.label_mask if is_ce else slots.mask, labels=slots.labels if is_ce else None,
        draft_lm_head_weight=head.draft_lm_head_weight, draft_vocab=head.draft_vocab,
    )  # fmt: skip
    torch.testing.assert_close(out.loss, expected.loss, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.acceptance, expected.acceptance, atol=1e-5, rtol=0)
    (grad,) = torch.autograd.grad(out.loss, head.fc.weight)
    (expected_grad,) = torch.autograd.grad(expected.loss, head.fc.weight)
    torch.testing.assert_close(grad, expected_grad, atol=1e-5, rtol=1e-4)
