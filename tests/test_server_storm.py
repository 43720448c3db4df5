"""A cancellation storm: hundreds of clients that give up mid-request leave nothing behind."""
from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from server_process import ServerProcess, metric, wait_until_idle


@pytest.mark.parametrize("engine_process", ["false", "true"], ids=["engine-thread", "engine-process"])
def test_two_hundred_abandoned_requests_free_every_block_and_the_next_is_served(mistral_v03_dir, engine_process):
    """With the engine in its own process, the aborts cross a pipe while the steps that still
    carry their requests come back the other way."""
    server = ServerProcess("--model-id", mistral_v03_dir, "--max-concurrent-requests", "256",
                           "--max-total-tokens", "256", "--max-input-tokens", "200",
                           "--max-batch-total-tokens", "65536", "--max-batch-prefill-tokens", "64",
                           "--engine-process", engine_process)
    try:
        server.wait_ready()
        long_prompt = "fox " * 90  # ~180 tokens  # prefilled over several steps: some aborts land during prefill
        bodies = []
        for i in range(200):
            kind = i % 4
            if kind == 0:
                bodies.append(("/generate_stream", {"inputs": "Once upon a time", "parameters": {"max_new_tokens": 200}}))
            elif kind == 1:
                bodies.append(("/generate_stream", {"inputs": long_prompt, "parameters": {"max_new_tokens": 40}}))
            elif kind == 2:
                bodies.append(("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 2,
                                                        "temperature": 1.0, "max_tokens": 200, "stream": True}))
            else:
                bodies.append(("/generate", {"inputs": "Hello", "parameters": {
                    "max_new_tokens": 200, "best_of": 2, "do_sample": True}}))

        async def storm():
            async with httpx.AsyncClient(base_url=server.url, timeout=30,
                                         limits=httpx.Limits(max_connections=300)) as client:
                async def one(route, body):
                    async with client.stream("POST", route, json=body) as response:
                        async for _ in response.aiter_lines():
                            pass

                async def give_up(route, body):
                    try:
                        await asyncio.wait_for(one(route, body), timeout=0.5)
                        return "finished"
                    except asyncio.TimeoutError:
                        return "abandoned"

                return await asyncio.gather(*(give_up(r, b) for r, b in bodies))

        outcomes = asyncio.run(storm())
        assert outcomes.count("abandoned") > 150
        wait_until_idle(server, within=20)  # every block freed after the storm
        start = time.monotonic()
        r = httpx.post(f"{server.url}/generate", json={"inputs": "Hello", "parameters": {"max_new_tokens": 5}},
                       timeout=30)
        assert r.status_code == 200 and time.monotonic() - start < 5
        assert metric(httpx.get(f"{server.url}/metrics").text, "tgi_request_failure", 'err="dropped"') > 150
    finally:
        server.stop()
