"""Schemathesis hooks (SCHEMATHESIS_HOOKS): the rules between fields that a JSON schema cannot
state, applied to the bodies it generates as valid, so that they are valid and reach generation.

Each rule here is one the server enforces with a 422 (server/api/validation.py, the tokenizer,
the chat template); the field bounds themselves come from the published schema. Invalid bodies
(schemathesis's negative mode) are left as generated.
"""
from __future__ import annotations

import os

import schemathesis

MAX_TOTAL = int(os.environ.get("FUZZ_MAX_TOTAL_TOKENS", "128"))
VOCAB = int(os.environ.get("FUZZ_VOCAB_SIZE", "32768"))
MAX_PROMPTS = 4  # --max-client-batch-size
PROMPT_CHARS = 12  # a prompt's characters: at most 4 tokens each (byte fallback) and BOS
MAX_NEW = MAX_TOTAL - 4 * PROMPT_CHARS - 8  # so that prompt + new tokens fit --max-total-tokens


@schemathesis.hook
def map_case(context, case):
    body = case.body
    if case.meta is None or not case.meta.generation.mode.is_positive or not isinstance(body, dict):
        return case
    path = case.operation.path
    if "inputs" in body:
        valid_generate(body, stream=path == "/generate_stream" or (path == "/" and body.get("stream")))
    elif "messages" in body:
        valid_chat(body)
    elif "prompt" in body:
        valid_completion(body)
    return case


def valid_generate(body: dict, stream: bool) -> None:
    body["inputs"] = body["inputs"][:PROMPT_CHARS]
    p = body.get("parameters")
    if not isinstance(p, dict):
        return
    for field in ("grammar", "adapter_id"):  # a grammar must compile; adapters: none are loaded
        p.pop(field, None)
    if p.get("max_new_tokens") is not None:
        p["max_new_tokens"] = min(p["max_new_tokens"], MAX_NEW)
    if stream:  # neither works on a stream
        p.pop("best_of", None)
        p.pop("decoder_input_details", None)
    if (p.get("best_of") or 1) > 1:  # best_of samples, and a seed would make its samples equal
        p["do_sample"], p["seed"] = True, None


def sampling(body: dict, n: int) -> None:
    for field in ("max_tokens", "max_completion_tokens"):
        if body.get(field) is not None:
            body[field] = min(body[field], MAX_NEW)
    for field in ("guided_json", "guided_regex"):  # vLLM's grammars: they must compile
        body.pop(field, None)
    if body.get("min_tokens"):  # at most the tokens asked for
        cap = body.get("max_completion_tokens", body.get("max_tokens"))
        body["min_tokens"] = min(body["min_tokens"], 1 if cap is None else cap)
    if n > 1 and body.get("temperature") == 0:  # n samples need sampling
        body["temperature"] = 1.0
    if isinstance(body.get("logit_bias"), dict):  # keys are ids of this vocabulary
        body["logit_bias"] = {k: v for k, v in body["logit_bias"].items() if int(k) < VOCAB}


def valid_chat(body: dict) -> None:
    # Mistral's template wants turns that alternate and end with the user's; tools and
    # response formats must be well formed, which their free-form schemas do not say.
    text = next((m.get("content") for m in body["messages"] if isinstance(m.get("content"), str)), None)
    body["messages"] = [{"role": "user", "content": (text or "hi")[:PROMPT_CHARS]}]
    for field in ("tools", "tool_choice", "tool_prompt", "response_format"):
        body.pop(field, None)
    sampling(body, body.get("n") or 1)


def valid_completion(body: dict) -> None:
    prompt = body["prompt"]
    if isinstance(prompt, str):
        prompt = prompt[:PROMPT_CHARS] or "hi"
    elif prompt and all(isinstance(p, str) for p in prompt):
        prompt = [p[:PROMPT_CHARS] or "hi" for p in prompt[:MAX_PROMPTS]]
    elif prompt and all(isinstance(p, int) for p in prompt):
        prompt = [t % VOCAB for t in prompt[:PROMPT_CHARS]]
    elif prompt and all(isinstance(p, list) for p in prompt):
        prompt = [[t % VOCAB for t in p[:PROMPT_CHARS]] or [1] for p in prompt[:MAX_PROMPTS]]
    else:
        prompt = "hi"
    body["prompt"] = prompt
    n = body.get("n") or 1
    if body.get("best_of") is not None:
        body["best_of"] = max(body["best_of"], n)
    sampling(body, max(n, body.get("best_of") or 1))
