"""The embedded default, SmolLM2-135M-Instruct (Llama architecture, GGUF), served offline."""
from __future__ import annotations

import pytest
import torch
from mistral_common.protocol.instruct.messages import UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from conftest import MISTRAL_DATA
from server import LLM, SamplingParams

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def default_llm():
    return LLM()


def test_the_default_model_answers_paris(default_llm):
    output = default_llm.chat(QUESTION, SamplingParams(temperature=0, max_tokens=20),
                              use_tqdm=False)[0]
    assert "Paris" in output.outputs[0].text
    assert output.outputs[0].finish_reason == "stop"  # it ends its turn with <|im_end|>
    assert output.prompt.startswith("<|im_start|>")


def test_the_default_model_greedy_tokens_equal_transformers(default_llm, smollm2_transformers_model):
    prompt = default_llm.get_tokenizer().apply_chat_template(QUESTION)
    ours = default_llm.generate([prompt], SamplingParams(temperature=0, max_tokens=16,
                                                         ignore_eos=True), use_tqdm=False)[0]
    expected = smollm2_transformers_model.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False,
                              eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert ours.outputs[0].token_ids == expected


def test_mistral_chat_is_templated_as_mistral_common_encodes_it(mistral_v03_dir):
    llm = LLM(mistral_v03_dir)
    messages = [{"role": "user", "content": "Bonjour, comment ça va ?"}]
    output = llm.chat(messages, SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)[0]
    reference = MistralTokenizer.from_file(
        str(MISTRAL_DATA / "mistral_instruct_tokenizer_240323.model.v3"))
    expected = reference.encode_chat_completion(ChatCompletionRequest(
        messages=[UserMessage(content="Bonjour, comment ça va ?")])).tokens
    assert output.prompt_token_ids == expected
