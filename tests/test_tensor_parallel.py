"""Tensor parallelism over gloo on the CPU: 2 and 4 ranks give the tokens of one rank."""
from __future__ import annotations

import os
import re
import signal
import time

import httpx
import pytest
import torch

from server import LLM, SamplingParams
from server_process import ServerProcess

PROMPTS = [[1, 5, 9, 200, 300], [1] + list(range(100, 160)), [1, 42, 7]]
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=2, prompt_logprobs=1)
SEEDED = SamplingParams(temperature=0.9, top_p=0.9, seed=3, max_tokens=10, ignore_eos=True)


def run(model_dir, tp, params, **kwargs):
    kwargs = {"max_batch_total_tokens": 2048, "block_size": 8, **kwargs}
    llm = LLM(model_dir, tensor_parallel_size=tp, **kwargs)
    try:
        outputs = llm.generate(PROMPTS, params, use_tqdm=False)
        weights = sum(p.numel() for p in llm.engine.runner.model.parameters())
        return outputs, weights
    finally:
        llm.engine.shutdown()


@pytest.mark.parametrize("fixture, tp", [("mistral_v03_dir", 4), ("llama31_dir", 2)])
def test_ranks_give_the_tokens_of_one_rank(fixture, tp, request):
    # mistral: 4 heads, 2 KV heads, over 4 ranks (two ranks share each KV head); llama31: 8 heads,
    # 2 KV heads (one a rank), tied embeddings, llama3 rope. Chunked prefill (budget 16) and the
    # prefix cache run too.
    model_dir = request.getfixturevalue(fixture)
    for params in (GREEDY, SEEDED):
        expected, whole = run(model_dir, 1, params, max_batch_prefill_tokens=16)
        got, shard = run(model_dir, tp, params, max_batch_prefill_tokens=16)
        for ours, theirs in zip(got, expected):
            assert ours.outputs[0].token_ids == theirs.outputs[0].token_ids
            if params.logprobs:
                for a, b in zip(ours.outputs[0].logprobs + ours.prompt_logprobs[1:],
                                theirs.outputs[0].logprobs + theirs.prompt_logprobs[1:]):
                    assert a.keys() == b.keys()
                    assert all(abs(a[t] - b[t]) < 1e-4 for t in a)
    # Each rank holds about 1/tp of the weights (norms are replicated; with fewer KV heads
    # than ranks, K and V are too).
    assert shard < whole / tp * 1.35


def _execute_on_rank(rank: int, model_dir: str, port: int, results) -> None:
    from server.config import EngineArgs
    from server.runtime.model_runner import SequenceChunk
    from server.runtime.sampler import SamplingOptions
    from server.runtime.setup import leave_group, start_runner

    args = EngineArgs(model=model_dir, device="cpu", dtype="float32", tensor_parallel_size=2,
                      max_batch_total_tokens=256, block_size=8)
    runner = start_runner(args, rank, port).runner
    chunks = [SequenceChunk(PROMPTS[1], 0, list(range(8)), sampling=SamplingOptions())]
    first = runner.execute(chunks)
    second = runner.execute(chunks)
    leave_group()
    results.put((rank, [r.sampled and r.sampled.token_id for r in first + second]))


def test_every_rank_can_execute_a_step_in_lockstep(mistral_v03_dir):
    """What warm-up does on GPUs (the activation profile): each rank runs whole steps itself,
    so each must join exactly the collectives the others join (the LM head, the picks)."""
    import torch.multiprocessing as mp

    from server.runtime.workers import free_port

    context = mp.get_context("spawn")
    results, port = context.Queue(), free_port()
    ranks = [context.Process(target=_execute_on_rank, args=(rank, mistral_v03_dir, port, results))
             for rank in range(2)]
    for process in ranks:
        process.start()
    try:
        got = dict(results.get(timeout=120) for _ in ranks)
    finally:
        for process in ranks:
            process.join(30)
            if process.is_alive():
                process.kill()
    one = LLM(mistral_v03_dir, max_batch_total_tokens=256, block_size=8)
    alone = one.generate([PROMPTS[1]], SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)[0]
    assert got[0] == 2 * alone.outputs[0].token_ids  # rank 0 samples, twice the same
    assert got[1] == [None, None]  # the others only compute


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_two_gpus_over_nccl_give_the_tokens_of_one(mistral_v03_dir):
    # fp32, so that the all-reduce's other summation order cannot flip a greedy choice; decode
    # steps replay CUDA graphs that hold the NCCL all-reduces.
    for params in (GREEDY, SEEDED):
        expected, _ = run(mistral_v03_dir, 1, params, device="cuda", dtype="float32", block_size=16)
        got, _ = run(mistral_v03_dir, 2, params, device="cuda", dtype="float32", block_size=16)
        for ours, theirs in zip(got, expected):
            assert ours.outputs[0].token_ids == theirs.outputs[0].token_ids
            if params.logprobs:
                for a, b in zip(ours.outputs[0].logprobs, theirs.outputs[0].logprobs):
                    assert all(abs(a[t] - b[t]) < 1e-3 for t in a)


def test_guided_decoding_over_two_ranks_gives_the_tokens_of_one_rank(mistral_v03_dir, tiny_llm):
    from benchmarks.json_schemas import WEATHER

    params = SamplingParams(temperature=0.9, seed=4, max_tokens=40, guided_json=WEATHER)
    expected = [o.outputs[0].token_ids for o in tiny_llm.generate(PROMPTS, params, use_tqdm=False)]
    got, _ = run(mistral_v03_dir, 2, params)
    assert [o.outputs[0].token_ids for o in got] == expected


def sharded_server(model_dir, *args, launcher=()) -> ServerProcess:
    server = ServerProcess("--model-id", model_dir, "--max-batch-total-tokens", "2048", "--max-total-tokens", "256",
                           *args, launcher=launcher)
    try:
        return server.wait_ready()
    except BaseException:
        server.stop()
        raise


def assert_serves_the_engines_text(server, llm, prompt: str) -> None:
    expected = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)[0].outputs[0].text
    r = httpx.post(f"{server.url}/generate", json={"inputs": prompt, "parameters": {"max_new_tokens": 6}},
                   timeout=60)
    assert r.json()["generated_text"] == expected


def test_the_server_shards_over_two_ranks_and_dies_with_a_rank(mistral_v03_dir, tiny_llm):
    """With the engine in the server's process (with its own process, the engine's process dies
    instead: test_engine_process.py)."""
    server = sharded_server(mistral_v03_dir, "--num-shard", "2", "--engine-process", "false")
    try:
        assert_serves_the_engines_text(server, tiny_llm, "The quick brown fox")
        worker = int(re.search(r"rank 1 started \(pid (\d+)\)", server.log).group(1))
        os.kill(worker, signal.SIGKILL)
        start = time.monotonic()
        code = server.process.wait(timeout=15)
        assert code != 0 and time.monotonic() - start < 10
        assert "tensor-parallel rank 1" in server.log and "exited" in server.log
    finally:
        server.stop()


def test_ranks_started_by_torchrun_serve_together(mistral_v03_dir, tiny_llm):
    """The multi-machine path (torch.distributed's own rendezvous), on one machine."""
    from server_process import free_port

    launcher = ["-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port())]
    server = sharded_server(mistral_v03_dir, launcher=launcher)
    try:
        assert_serves_the_engines_text(server, tiny_llm, "Once upon a time")
        assert "rank 1 of 2" in server.log
        server.terminate()  # torchrun passes SIGTERM to every rank, and all of them end
        server.process.wait(timeout=30)
    finally:
        server.stop()


def rss_anon_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        line = next(line for line in status if line.startswith("RssAnon:"))
    return int(line.split()[1]) / 1024


def test_each_rank_holds_about_its_share_of_the_weights_in_memory(tmp_path):
    """A checkpoint of ~200 MB (fp32): the memory a rank's process owns after loading grows
    with 1/N of it, over a constant (the interpreter and torch)."""
    import shutil

    import torch
    from safetensors.torch import save_file
    from transformers import MistralConfig

    from conftest import MISTRAL_DATA

    config = MistralConfig(vocab_size=32768, hidden_size=512, intermediate_size=2048, num_hidden_layers=6,
                           num_attention_heads=8, num_key_value_heads=4, head_dim=64, max_position_embeddings=256,
                           tie_word_embeddings=False)
    config.save_pretrained(tmp_path)
    shapes = {"model.embed_tokens.weight": (32768, 512), "lm_head.weight": (32768, 512), "model.norm.weight": (512,)}
    for i in range(6):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (512, 512), p + "self_attn.k_proj.weight": (256, 512),
                       p + "self_attn.v_proj.weight": (256, 512), p + "self_attn.o_proj.weight": (512, 512),
                       p + "mlp.gate_proj.weight": (2048, 512), p + "mlp.up_proj.weight": (2048, 512),
                       p + "mlp.down_proj.weight": (512, 2048), p + "input_layernorm.weight": (512,),
                       p + "post_attention_layernorm.weight": (512,)})
    save_file({n: torch.randn(s) * 0.02 for n, s in shapes.items()}, str(tmp_path / "model.safetensors"))
    shutil.copy(MISTRAL_DATA / "tokenizer.model.v1", tmp_path / "tokenizer.model.v1")
    weights_mb = sum(torch.Size(s).numel() for s in shapes.values()) * 4 / 2**20
    held = {}
    for tp in (2, 4):
        llm = LLM(str(tmp_path), tensor_parallel_size=tp, max_batch_total_tokens=256, block_size=8)
        try:
            held[tp] = rss_anon_mb(llm.engine.workers.processes[0].pid)
        finally:
            llm.engine.shutdown()
    # Going from 2 to 4 ranks frees a quarter of the weights on each rank (within 25%).
    assert held[2] - held[4] == pytest.approx(weights_mb / 4, rel=0.25), (held, weights_mb)
