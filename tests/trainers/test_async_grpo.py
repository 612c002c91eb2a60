"""BebopAsyncGRPOTrainer without vLLM: the CPU tree attention against plain forwards, the file weight transfer and the
acceptance logging against a stand-in server, and a short training run with a stand-in rollout worker."""

import json
import os
import queue
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

import numpy as np
import pytest
import torch
from accelerate import PartialState
from datasets import Dataset
from safetensors.torch import load_file
from transformers import AttentionInterface, AutoModelForCausalLM
from trl.experimental.async_grpo.async_grpo_trainer import DataCollatorForRollout
from trl.experimental.async_grpo.async_rollout_worker import RolloutSample
from trl.experimental.async_grpo.packing import TREE_ATTENTION, TreeRow, register_tree_attention

from bebop_trl import BebopAsyncGRPOConfig, BebopAsyncGRPOTrainer, MTPHead
from bebop_trl.modeling.vllm_export import vllm_draft_weights
from bebop_trl.rollout.file_weight_transfer import FileWeightTransfer
from bebop_trl.rollout.nccl_draft_transfer import NCCLDraftWeightTransfer
from bebop_trl.speculative.exactness import completion_logprobs
from bebop_trl.trainers.async_grpo_trainer import check_server_drafts, unpack_tree_row, with_response_parser
from bebop_trl.trainers.tree_attention import sdpa_tree_attention


pytestmark = pytest.mark.usefixtures("one_torch_thread")

K = 3


# ---------------------------------------------------------------------------------------------- tree attention


def packed_samples(seed: int = 0) -> list[dict]:
    """Three samples of one prompt (two share a longer prefix) and one of another prompt."""
    rng = np.random.default_rng(seed)
    prompt, other = rng.integers(3, 60, 6), rng.integers(3, 60, 4)
    middle = rng.integers(3, 60, 3)
    completions = [
        np.concatenate([prompt, middle, rng.integers(3, 60, 4)]),
        np.concatenate([prompt, middle, rng.integers(3, 60, 2)]),
        np.concatenate([prompt, rng.integers(3, 60, 5)]),
        np.concatenate([other, rng.integers(3, 60, 6)]),
    ]
    prompt_lengths = [6, 6, 6, 4]
    return [
        {
            "input_ids": torch.tensor(ids),
            "completion_mask": torch.tensor([0] * n + [1] * (len(ids) - n)),
            "old_log_probs": torch.zeros(len(ids)),
            "advantage": 1.0,
            "group_id": i // 3,
            "metrics": {},
        }
        for i, (ids, n) in enumerate(zip(completions, prompt_lengths, strict=True))
    ]


def test_sdpa_tree_attention_matches_plain_forwards_in_values_and_gradients(tiny_checkpoints):
    samples = packed_samples()
    row = TreeRow()
    for sample in samples:
        row.add(sample)
    packed = row.pack()
    assert len(packed["input_ids"]) < sum(len(s["input_ids"]) for s in samples)  # prefixes are shared

    register_tree_attention()
    AttentionInterface.register(TREE_ATTENTION, sdpa_tree_attention)
    tree_model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"], attn_implementation=TREE_ATTENTION)
    plain_model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"], attn_implementation="eager")

    logits = tree_model(
        input_ids=packed["input_ids"].unsqueeze(0),
        position_ids=packed["position_ids"].unsqueeze(0),
        tree_kv_index=packed["tree_kv_index"],
        tree_cu_seqlens_q=packed["tree_cu_seqlens_q"],
        tree_cu_seqlens_k=packed["tree_cu_seqlens_k"],
        tree_max_seqlen_q=int(packed["tree_max_seqlens"][0]),
        tree_max_seqlen_k=int(packed["tree_max_seqlens"][1]),
    ).logits[0]
    targets = packed["shift_labels"][packed["token_index"]]
    tree_logps = logits.log_softmax(-1)[packed["token_index"], targets]

    plain_logps = []
    for sample in samples:
        ids, mask = sample["input_ids"], sample["completion_mask"].bool()
        sample_logps = plain_model(input_ids=ids.unsqueeze(0)).logits[0, :-1].log_softmax(-1)
        plain_logps.append(sample_logps[torch.arange(len(ids) - 1), ids[1:]][mask[1:]])
    plain_logps = torch.cat(plain_logps)
    torch.testing.assert_close(tree_logps, plain_logps, atol=1e-5, rtol=1e-5)

    tree_logps.sum().backward()
    plain_logps.sum().backward()
    plain_params = dict(plain_model.named_parameters())
    for name, param in tree_model.named_parameters():
        torch.testing.assert_close(param.grad, plain_params[name].grad, atol=1e-5, rtol=1e-4, msg=name)


def test_unpack_tree_row_gives_back_the_packed_samples(tiny_checkpoints):
    samples = packed_samples(seed=1)
    row = TreeRow()
    for sample in samples:
        row.add(sample)
    batch = DataCollatorForRollout(pad_token_id=0)([[row]])
    input_ids, attention_mask, is_completion = unpack_tree_row(batch)

    unpacked = {
        tuple(ids[mask.bool()].tolist()): completion[mask.bool()].tolist()
        for ids, mask, completion in zip(input_ids, attention_mask, is_completion, strict=True)
    }
    expected = {tuple(s["input_ids"].tolist()): s["completion_mask"].bool().tolist() for s in samples}
    assert unpacked == expected
    assert (attention_mask.sum(1) == torch.tensor([len(ids) for ids in unpacked])).all()


def test_sdpa_tree_attention_refuses_softcapping():
    q = torch.zeros(1, 2, 3, 4)
    with pytest.raises(ValueError, match="softcap"):
        sdpa_tree_attention(
            None, q, q, q, None, tree_kv_index=torch.arange(3), tree_cu_seqlens_q=torch.tensor([0, 3]),
            tree_cu_seqlens_k=torch.tensor([0, 3]), softcap=30.0,
        )  # fmt: skip


# ---------------------------------------------------------------------------------------------- stand-in server


def prometheus_text(drafts: int, accepted: list[int]) -> str:
    lines = [
        f"vllm:spec_decode_num_drafts_total {drafts}",
        f"vllm:spec_decode_num_draft_tokens_total {drafts * K}",
        f"vllm:spec_decode_num_accepted_tokens_total {sum(accepted)}",
    ]
    lines += [
        f'vllm:spec_decode_num_accepted_tokens_per_pos_total{{position="{j}"}} {a}' for j, a in enumerate(accepted)
    ]
    return "\n".join(lines) + "\n"


class StandInServer:
    """Answers the routes the trainer and the weight transfer use, as `bebop-trl vllm-serve` would, and records
    the weight-update calls with the files they name."""

    def __init__(
        self,
        backend: str = "bebop_file",
        draft_sample_method: str = "probabilistic",
        policy: torch.nn.Module | None = None,
        logprob_error: float = 0.0,
    ):
        self.calls: list[tuple[str, dict]] = []
        self.loaded: list[dict[str, torch.Tensor]] = []
        self.counters = (0, [0] * K)
        self.info = {
            "vllm_config": {
                "weight_transfer_config": {"backend": backend},
                "speculative_config": {"num_speculative_tokens": K, "draft_sample_method": draft_sample_method},
            }
        }
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _answer(self, body: str, content_type: str = "application/json") -> None:
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.end_headers()
                self.wfile.write(body.encode())

            def do_GET(self):
                route = urlparse(self.path).path
                if route == "/metrics":
                    self._answer(prometheus_text(*server.counters), "text/plain")
                elif route == "/server_info":
                    self._answer(json.dumps(server.info))
                elif route == "/v1/models":
                    self._answer(json.dumps({"data": [{"id": "tiny"}]}))
                else:
                    self._answer("{}")

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                route = urlparse(self.path).path
                server.calls.append((route, body))
                if route == "/update_weights" and "path" in body["update_info"]:
                    server.loaded.append(load_file(os.path.join(body["update_info"]["path"], "model.safetensors")))
                if route == "/v1/completions":
                    self._answer(json.dumps(server.complete(body)))
                    return
                self._answer("{}")

        self.policy, self.logprob_error = policy, logprob_error
        self._http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._http.server_address[1]}"
        threading.Thread(target=self._http.serve_forever, daemon=True).start()

    def complete(self, body: dict) -> dict:
        """A fixed completion, with the log-probs of `policy` (off by `logprob_error`)."""
        tokens = [5, 6, 7]
        (logprobs,) = completion_logprobs(self.policy, [body["prompt"]], [tokens], temperature=body["temperature"])
        logprobs = [value + self.logprob_error for value in logprobs]
        return {"choices": [{"token_ids": tokens, "logprobs": {"token_logprobs": logprobs}}]}

    def routes(self) -> list[str]:
        return [route for route, _ in self.calls]

    def close(self) -> None:
        self._http.shutdown()


@pytest.fixture
def server(load_tiny):
    stand_in = StandInServer(policy=load_tiny("llama"))
    yield stand_in
    stand_in.close()


def test_file_weight_transfer_writes_each_sync_and_the_server_loads_it(server, tmp_path):
    head_weights = {"fc.weight": torch.full((2, 2), 7.0)}
    transfer = FileWeightTransfer(server.url, tmp_path / "sync", timeout=10, draft_weights=lambda: head_weights)
    transfer.init_weight_transfer()
    policy = {"model.embed_tokens.weight": torch.arange(6.0).view(3, 2)}

    transfer.pause()
    transfer.send_weights(iter(policy.items()))
    transfer.resume()
    transfer.head_updated()
    transfer.pause()
    transfer.send_weights(iter({"model.embed_tokens.weight": policy["model.embed_tokens.weight"] + 1}.items()))
    transfer.resume()

    assert server.routes() == [
        "/init_weight_transfer_engine",
        "/pause", "/start_weight_update", "/update_weights", "/finish_weight_update", "/reset_prefix_cache",
        "/resume",
        "/pause", "/start_weight_update", "/update_weights", "/finish_weight_update",
        "/start_draft_weight_update", "/update_weights", "/finish_weight_update", "/reset_prefix_cache",
        "/resume",
    ]  # fmt: skip
    assert dict(server.calls)["/pause"] == {} and server.calls[1][0] == "/pause"
    torch.testing.assert_close(server.loaded[0]["model.embed_tokens.weight"], policy["model.embed_tokens.weight"])
    torch.testing.assert_close(server.loaded[1]["model.embed_tokens.weight"], policy["model.embed_tokens.weight"] + 1)
    torch.testing.assert_close(server.loaded[2]["fc.weight"], head_weights["fc.weight"])
    # Only the latest folders stay.
    assert sorted(os.listdir(tmp_path / "sync")) == ["draft-2", "policy-2"]
    transfer.destroy()
    assert not os.path.exists(tmp_path / "sync")


def test_file_weight_transfer_refuses_a_server_without_the_file_engine(tmp_path):
    stand_in = StandInServer(backend="nccl")
    try:
        with pytest.raises(ValueError, match="--weight_transfer file"):
            FileWeightTransfer(stand_in.url, tmp_path, timeout=10).init_weight_transfer()
    finally:
        stand_in.close()


@pytest.fixture
def nccl_recorder(monkeypatch):
    """TRL's NCCL weight transfer with the broadcast recorded instead of sent (no GPU, no vLLM here): every
    broadcast's group and tensors, in order."""
    from trl.experimental.async_grpo import weight_transfer as trl_weight_transfer

    broadcasts: list[tuple[object, list[torch.Tensor]]] = []

    def record(iterator, group, src, post_iter_func):
        assert src == 0
        broadcasts.append((group, [post_iter_func(item).clone() for item in iterator]))

    monkeypatch.setattr(trl_weight_transfer, "is_vllm_available", lambda *args, **kwargs: True)
    monkeypatch.setattr(trl_weight_transfer, "_HAS_STATEFUL_TRAINER_ENGINE", True)
    monkeypatch.setattr(trl_weight_transfer, "packed_nccl_broadcast_producer", record, raising=False)
    return broadcasts


def test_nccl_transfer_sends_an_updated_head_over_the_policy_group(server, nccl_recorder):
    from trl.experimental.async_grpo.vllm_client import VLLMClient
    from trl.experimental.async_grpo.weight_transfer import WeightTransferClient

    PartialState()  # TRL's client logs through accelerate, as in a trainer
    policy = {"model.embed_tokens.weight": torch.arange(6.0).view(3, 2)}
    head = {"fc.weight": torch.full((2, 4), 7.0), "norm.weight": torch.ones(2, dtype=torch.bfloat16)}
    policy_transfer = WeightTransferClient(
        VLLMClient(server.url),
        {"names": list(policy), "dtype_names": ["float32"], "shapes": [[3, 2]]},
        weight_sync_timeout=10,
    )
    group = object()  # the group `init_weight_transfer` would open with the server
    policy_transfer.model_update_group = group
    transfer = NCCLDraftWeightTransfer(policy_transfer, draft_weights=lambda: head)

    transfer.pause()
    transfer.send_weights(iter(policy.items()))
    transfer.resume()
    transfer.head_updated()
    transfer.pause()
    transfer.send_weights(iter(policy.items()))
    transfer.resume()

    assert server.routes() == [
        "/pause", "/start_weight_update", "/update_weights", "/finish_weight_update", "/resume",
        "/pause", "/start_weight_update", "/update_weights", "/finish_weight_update",
        "/start_draft_weight_update", "/update_weights", "/finish_weight_update",
        "/resume",
    ]  # fmt: skip
    draft_info = [body for route, body in server.calls if route == "/update_weights"][-1]["update_info"]
    assert draft_info == {"names": ["fc.weight", "norm.weight"], "dtype_names": ["float32", "bfloat16"],
                          "shapes": [[2, 4], [2]]}  # fmt: skip
    assert [sent_group for sent_group, _ in nccl_recorder] == [group, group, group]
    for sent, expected in zip(nccl_recorder[2][1], head.values(), strict=True):
        torch.testing.assert_close(sent, expected)
    # A head pushed once is not sent again until it changes.
    transfer.pause()
    transfer.send_weights(iter(policy.items()))
    assert server.routes().count("/start_draft_weight_update") == 1


def test_a_server_that_drafts_otherwise_is_refused():
    check_server_drafts({"num_speculative_tokens": 3, "draft_sample_method": "probabilistic"}, 3, "probabilistic", "u")
    with pytest.raises(ValueError, match="--num_speculative_tokens 3 --draft_sampling probabilistic"):
        check_server_drafts({"num_speculative_tokens": 3, "draft_sample_method": "greedy"}, 3, "probabilistic", "u")
    with pytest.raises(ValueError, match="does not draft"):
        check_server_drafts(None, 3, "probabilistic", "u")


# ---------------------------------------------------------------------------------------------- training


class StandInWorker:
    """TRL's `RolloutWorkerProtocol` with fixed samples; each `start` or version update also advances the
    stand-in server's counters, as generation would."""

    def __init__(self, server: StandInServer):
        self.rollout_buffer = queue.Queue()
        self.metrics_queue = queue.Queue()
        self.server = server
        self.versions: list[int] = []

    def start(self) -> None:
        rng = np.random.default_rng(0)
        for group in range(64):
            for _ in range(2):
                ids = rng.integers(3, 60, 10)
                self.rollout_buffer.put(
                    RolloutSample(
                        prompt=[], completion=[], input_ids=ids, completion_mask=np.array([0] * 5 + [1] * 5),
                        old_log_probs=np.full(10, -4.0, np.float32), advantage=float(rng.normal()),
                        model_version=0, group_id=group, metrics={"reward": 0.5},
                    )
                )  # fmt: skip

    def stop(self) -> None:
        pass

    def update_model_version(self, model_version: int) -> None:
        self.versions.append(model_version)
        drafts, accepted = self.server.counters
        # 10 cycles per version: position 1 accepted 6 times, position 2 three times, position 3 once.
        self.server.counters = (drafts + 10, [a + n for a, n in zip(accepted, (6, 3, 1), strict=True)])

    def check_health(self, stale_after_s: float) -> None:
        pass


def online_head_trainer(tiny_checkpoints, load_tiny, server, tmp_path, transfer=None, **config):
    """A BebopAsyncGRPOTrainer on the tiny Llama with online updates of a new head, against the stand-in server."""
    head_dir = str(tmp_path / "head")
    MTPHead.from_model(load_tiny("llama")).save_pretrained(head_dir)
    args = BebopAsyncGRPOConfig(
        output_dir=str(tmp_path / "run"),
        vllm_server_base_url=server.url,
        mtp_head=head_dir,
        mtp_online_loss="tv",
        report_to="none",
        **config,
    )
    return BebopAsyncGRPOTrainer(
        tiny_checkpoints["llama"],
        reward_funcs=lambda completions, **kwargs: [0.0] * len(completions),
        args=args,
        train_dataset=Dataset.from_dict({"prompt": ["1+1="] * 8}),
        rollout_worker=StandInWorker(server),
        weight_transfer=transfer,
    )


def test_async_trainer_trains_on_cpu_syncs_through_files_and_logs_server_acceptance(
    tiny_checkpoints, server, tmp_path
):
    worker = StandInWorker(server)
    args = BebopAsyncGRPOConfig(
        output_dir=str(tmp_path),
        vllm_server_base_url=server.url,
        weight_transfer="file",
        max_steps=3,
        per_device_train_batch_size=2,
        token_budget=64,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        num_speculative_tokens=K,
    )
    assert args.bf16 is False
    trainer = BebopAsyncGRPOTrainer(
        tiny_checkpoints["llama"],
        reward_funcs=lambda completions, **kwargs: [0.0] * len(completions),
        args=args,
        train_dataset=Dataset.from_dict({"prompt": ["1+1="] * 8}),
        rollout_worker=worker,
    )
    initial = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()

    # One cold sync and one per step, each loading the policy as it was then.
    assert worker.versions == [1, 2, 3, 4]
    assert server.routes().count("/update_weights") == 4
    final = dict(trainer.model.named_parameters())
    changed = [name for name in initial if not torch.equal(initial[name], final[name].detach())]
    assert changed, "the policy did not train"
    last = server.loaded[-1]
    for name, tensor in last.items():
        torch.testing.assert_close(tensor, final[name].detach())

    steps = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(steps) == 3
    for entry in steps:
        assert entry["rollout/acceptance_position_1"] == pytest.approx(0.6)
        assert entry["rollout/acceptance_position_3"] == pytest.approx(0.1)
        assert entry["rollout/accepted_drafts_per_cycle"] == pytest.approx(1.0)
        assert entry["rollout/acceptance_rate"] == pytest.approx(10 / 30)
    # One point of the acceptance-entropy fit per logged step: the step's policy entropy, the window's acceptance.
    fit = json.loads((tmp_path / "acceptance_entropy_fit.json").read_text())
    assert fit["points"]["acceptance"] == pytest.approx([10 / 30] * 3)
    assert fit["points"]["entropy"] == pytest.approx([entry["entropy"] for entry in steps])


def test_online_head_updates_reach_the_server_with_the_next_sync(tiny_checkpoints, load_tiny, server, tmp_path):
    trainer = online_head_trainer(
        tiny_checkpoints, load_tiny, server, tmp_path, weight_transfer="file", mtp_online_learning_rate=1e-2,
        max_steps=2, per_device_train_batch_size=2, token_budget=64, logging_steps=1, save_strategy="no",
    )  # fmt: skip
    initial = {name: value.clone() for name, value in vllm_draft_weights(trainer.mtp_head).items()}
    trainer.train()

    # The cold sync sends the policy alone; each step's update reaches the drafter with the sync that follows it.
    routes = server.routes()
    assert routes.count("/start_draft_weight_update") == 2
    assert routes.index("/start_draft_weight_update") > routes.index("/update_weights")
    sent = server.loaded[-1]
    final = vllm_draft_weights(trainer.mtp_head)
    assert sent.keys() == final.keys()
    for name, value in final.items():
        torch.testing.assert_close(sent[name], value.detach().cpu())
    assert any(not torch.equal(initial[name], final[name]) for name in final)
    logged = [entry for entry in trainer.state.log_history if "mtp_online/loss" in entry]
    assert len(logged) == 2
    saved = MTPHead.from_pretrained(str(tmp_path / "run" / "mtp_head"))
    torch.testing.assert_close(saved.fc.weight.float(), trainer.mtp_head.fc.weight)


def test_online_head_updates_need_the_head(tmp_path):
    with pytest.raises(ValueError, match="set mtp_head"):
        BebopAsyncGRPOConfig(output_dir=str(tmp_path), mtp_online_loss="tv", weight_transfer="file")


def test_online_head_updates_ride_on_trls_nccl_transfer(tiny_checkpoints, load_tiny, server, nccl_recorder, tmp_path):
    trainer = online_head_trainer(tiny_checkpoints, load_tiny, server, tmp_path)
    assert isinstance(trainer.weight_transfer, NCCLDraftWeightTransfer)
    assert trainer.weight_transfer.policy_transfer.vllm.server_url == server.url
    final = vllm_draft_weights(trainer.mtp_head)
    assert trainer.weight_transfer._draft_weights().keys() == final.keys()


def test_online_head_updates_refuse_a_transfer_that_cannot_send_the_head(
    tiny_checkpoints, load_tiny, server, tmp_path
):
    class PolicyOnly:
        def init_weight_transfer(self): ...
        def pause(self): ...
        def send_weights(self, iterator): ...
        def resume(self): ...
        def destroy(self): ...

    with pytest.raises(TypeError, match="PolicyOnly cannot send it"):
        online_head_trainer(tiny_checkpoints, load_tiny, server, tmp_path, transfer=PolicyOnly())


def test_chatml_templates_trl_does_not_know_get_a_response_parser(tiny_checkpoints):
    from transformers import AutoTokenizer
    from trl.chat_template_utils import parse_response

    other = AutoTokenizer.from_pretrained(tiny_checkpoints["llama"])
    other.chat_template = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
    with pytest.raises(ValueError, match="Unrecognized chat template"):
        with_response_parser(other)  # not ChatML: TRL's own error, which names the fix
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoints["llama"])  # ChatML, unknown to TRL
    tokenizer = with_response_parser(tokenizer)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "1+1="}], add_generation_prompt=True, return_dict=False
    )
    completion = tokenizer("2<|im_end|>", add_special_tokens=False)["input_ids"]
    assert parse_response(tokenizer, completion, prefix=prompt) == {"role": "assistant", "content": "2"}


def test_a_server_that_samples_another_law_is_refused_at_start(tiny_checkpoints, load_tiny, tmp_path):
    stand_in = StandInServer(policy=load_tiny("llama"), logprob_error=1.0)
    try:
        args = BebopAsyncGRPOConfig(
            output_dir=str(tmp_path), vllm_server_base_url=stand_in.url, weight_transfer="file", max_steps=1,
            per_device_train_batch_size=2, token_budget=64, save_strategy="no", report_to="none",
        )  # fmt: skip
        trainer = BebopAsyncGRPOTrainer(
            tiny_checkpoints["llama"],
            reward_funcs=lambda completions, **kwargs: [0.0] * len(completions),
            args=args,
            train_dataset=Dataset.from_dict({"prompt": ["1+1="] * 8}),
            rollout_worker=StandInWorker(stand_in),
        )
        with pytest.raises(RuntimeError, match="does not sample from the policy's law"):
            trainer.train()
    finally:
        stand_in.close()
