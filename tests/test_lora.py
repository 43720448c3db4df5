"""Multi-LoRA serving: adapters in PEFT's real format, each request with its own adapter or
none, held to transformers + peft on the same base (float32, CPU)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from server import LLM, LoRARequest, SamplingParams
from server.models.lora import parse_lora_adapters, read_adapter

PROMPTS = ["The quick brown fox", "Once upon a time", "In the beginning was"]
# transformers + peft on the CPU in float32; on a GPU machine the engine's products run in TF32.
TOL = 1e-4 if not torch.cuda.is_available() else 3e-2
ADAPTERS = {  # name -> peft LoraConfig arguments
    "qv": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "all": dict(r=8, lora_alpha=16, use_rslora=True,
                target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "mlp": dict(r=2, lora_alpha=4, target_modules=["o_proj", "gate_proj", "down_proj"], layers_to_transform=[1]),
}


def write_adapter(base_dir: str, path: Path, seed: int, **config) -> Path:
    """An adapter as PEFT saves it, with random A and B (PEFT starts B at zero: a no-op)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
                           LoraConfig(init_lora_weights=False, **config))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(0.0, 0.2)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def adapters(mistral_v03_dir, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("adapters")
    return {name: str(write_adapter(mistral_v03_dir, root / name, seed, **config))
            for seed, (name, config) in enumerate(ADAPTERS.items())}


@pytest.fixture(scope="module")
def lora_llm(mistral_v03_dir, adapters):
    return LLM(mistral_v03_dir, lora_adapters=adapters, max_batch_total_tokens=4096)


def peft_greedy(base_dir: str, adapter_dir: str | None, prompt_ids: list[int], max_tokens: int):
    """transformers (+ peft): greedy tokens and each one's logprob."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    ids = list(prompt_ids)
    logprobs = []
    with torch.no_grad():
        for _ in range(max_tokens):
            logits = model(torch.tensor([ids])).logits[0, -1].float()
            token = int(logits.argmax())
            logprobs.append(torch.log_softmax(logits, -1)[token].item())
            ids.append(token)
    return ids[len(prompt_ids):], logprobs


@pytest.mark.parametrize("name", [None, *ADAPTERS])
def test_each_adapter_alone_equals_transformers_and_peft(lora_llm, mistral_v03_dir, adapters, name):
    prompt_ids = lora_llm.get_tokenizer().encode(PROMPTS[0])
    expected, expected_logprobs = peft_greedy(mistral_v03_dir, adapters.get(name), prompt_ids, 10)
    lora = LoRARequest(name) if name else None
    out = lora_llm.generate([prompt_ids], SamplingParams(temperature=0, max_tokens=10, logprobs=0,
                                                         ignore_eos=True), use_tqdm=False, lora_request=lora)[0]
    completion = out.outputs[0]
    assert completion.token_ids == expected
    got = [entry[token] for entry, token in zip(completion.logprobs, completion.token_ids)]
    assert got == pytest.approx(expected_logprobs, abs=TOL)


def test_a_mixed_batch_gives_each_request_what_it_gives_alone(lora_llm):
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    requests = [(p, name) for p in PROMPTS for name in (None, "qv", "all", "mlp")]
    alone = [lora_llm.generate(p, params, use_tqdm=False, lora_request=LoRARequest(n) if n else None)[0]
             for p, n in requests]
    together = lora_llm.generate([p for p, _ in requests], params, use_tqdm=False,
                                 lora_request=[LoRARequest(n) if n else None for _, n in requests])
    assert [o.outputs[0].token_ids for o in together] == [o.outputs[0].token_ids for o in alone]
    texts = {n: o.outputs[0].text for (p, n), o in zip(requests, together) if p == PROMPTS[0]}
    assert len(set(texts.values())) == 4  # every adapter changes the answer


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="Mistral-7B's shapes: on the GPU only")
@pytest.mark.parametrize("rows", [1, 7, 256, 4096])
@pytest.mark.parametrize("in_features, out_features, rank", [(4096, 6144, 48), (4096, 28672, 32), (14336, 4096, 16)])
def test_the_lora_kernels_on_mistral_shapes(rows, in_features, out_features, rank):
    """qkv (three pieces of rank 16), gate/up (two) and down, eight adapters and the base model
    mixed, from a decode step of one row to a prefill of 4,096, in bfloat16."""
    from server.kernels.lora import lora_expand, lora_reference, lora_rows, lora_shrink

    generator = torch.Generator(device="cuda").manual_seed(rows)
    x = torch.randn(rows, in_features, generator=generator, device="cuda").bfloat16()
    a = (torch.randn(8, rank, in_features, generator=generator, device="cuda") * 0.02).bfloat16()
    b = (torch.randn(8, out_features, rank, generator=generator, device="cuda") * 0.02).bfloat16()
    slots = torch.randint(-1, 8, (rows,), generator=generator, device="cuda")
    out = torch.randn(rows, out_features, generator=generator, device="cuda").bfloat16()
    expected = lora_reference(x, a, b, slots, out.clone())
    ordered = lora_rows(slots, 8)
    lora_expand(lora_shrink(x, a, ordered), b, ordered, out)
    assert torch.allclose(out.float(), expected.float(), atol=0.05, rtol=0.02)


def test_the_kernels_give_each_request_what_torch_gives_it(lora_llm, monkeypatch):
    """A mixed batch (prompts of several tokens, then decode steps) with the updates through
    the Triton kernels, as on a GPU (interpreted here), against the torch products per adapter."""
    params = SamplingParams(temperature=0, max_tokens=6, logprobs=0, ignore_eos=True)
    requests = [(p, name) for p in PROMPTS[:2] for name in ("all", None, "mlp", "qv")]
    loras = [LoRARequest(n) if n else None for _, n in requests]
    torch_path = lora_llm.generate([p for p, _ in requests], params, use_tqdm=False, lora_request=loras)
    monkeypatch.setattr(lora_llm.engine.runner, "lora_kernels", True)
    kernels = lora_llm.generate([p for p, _ in requests], params, use_tqdm=False, lora_request=loras)
    for got, expected in zip(kernels, torch_path):
        tokens = expected.outputs[0].token_ids
        assert got.outputs[0].token_ids == tokens
        logprobs = [[entry[t] for entry, t in zip(out.outputs[0].logprobs, tokens)] for out in (got, expected)]
        assert logprobs[0] == pytest.approx(logprobs[1], abs=1e-4)


def test_fp8_weights_take_the_adapters_updates_through_the_kernels_as_through_torch(mistral_v03_dir, adapters,
                                                                                   monkeypatch):
    """--quantize fp8 with adapters: the products' updates through the kernels (interpreted
    here; on a GPU a decode step's come in the fp8 gemv's epilogue) give what the torch
    products per adapter give."""
    llm = LLM(mistral_v03_dir, lora_adapters=adapters, quantization="fp8", max_batch_total_tokens=4096)
    params = SamplingParams(temperature=0, max_tokens=4, logprobs=0, ignore_eos=True)
    names = ["all", None, "mlp"]
    loras = [LoRARequest(n) if n else None for n in names]
    torch_path = llm.generate([PROMPTS[0]] * 3, params, use_tqdm=False, lora_request=loras)
    monkeypatch.setattr(llm.engine.runner, "lora_kernels", True)
    kernels = llm.generate([PROMPTS[0]] * 3, params, use_tqdm=False, lora_request=loras)
    assert len({tuple(o.outputs[0].token_ids) for o in torch_path}) == 3  # each adapter changes the answer
    for got, expected in zip(kernels, torch_path):
        tokens = expected.outputs[0].token_ids
        assert got.outputs[0].token_ids == tokens
        logprobs = [[entry[t] for entry, t in zip(out.outputs[0].logprobs, tokens)] for out in (got, expected)]
        assert logprobs[0] == pytest.approx(logprobs[1], abs=1e-4)


def test_the_prefix_cache_keeps_each_adapters_blocks_apart(lora_llm):
    prompt = " ".join(["word"] * 40)  # several full blocks
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    base = lora_llm.generate(prompt, params, use_tqdm=False)[0]
    adapted = lora_llm.generate(prompt, params, use_tqdm=False, lora_request=LoRARequest("all"))[0]
    again = lora_llm.generate(prompt, params, use_tqdm=False, lora_request=LoRARequest("all"))[0]
    assert adapted.num_cached_tokens == 0 and again.num_cached_tokens > 0
    assert adapted.outputs[0].token_ids == again.outputs[0].token_ids != base.outputs[0].token_ids


def test_an_unknown_adapter_is_refused_naming_it(lora_llm):
    with pytest.raises(ValueError, match="LoRA adapter 'nope' is not loaded"):
        lora_llm.generate(PROMPTS[0], SamplingParams(max_tokens=2), use_tqdm=False, lora_request=LoRARequest("nope"))
    assert not lora_llm.engine.has_unfinished_requests()


def test_tgis_adapter_syntax():
    assert parse_lora_adapters("org/a, org/b@v2,mine=/data/x") == {
        "org/a": "org/a", "org/b": "org/b@v2", "mine": "/data/x"}
    with pytest.raises(ValueError, match="given twice"):
        parse_lora_adapters("a=/x,a=/y")


def edited(adapters: dict, tmp_path: Path, **changes) -> str:
    import shutil

    target = tmp_path / "edited"
    shutil.copytree(adapters["qv"], target)
    config = json.loads((target / "adapter_config.json").read_text())
    (target / "adapter_config.json").write_text(json.dumps({**config, **changes}))
    return str(target)


@pytest.mark.parametrize("changes, message", [
    (dict(modules_to_save=["lm_head"]), "modules_to_save"),
    (dict(use_dora=True), "DoRA"),
    (dict(bias="all"), "bias"),
    (dict(alpha_pattern={"q_proj": 4}), "alpha_pattern"),
])
def test_what_plain_lora_cannot_express_is_refused(adapters, tmp_path, changes, message):
    with pytest.raises(ValueError, match=message):
        read_adapter("x", edited(adapters, tmp_path, **changes), None, 64)


def test_an_adapter_over_the_rank_limit_is_refused(adapters):
    with pytest.raises(ValueError, match="rank 8 .* up to 4"):
        read_adapter("all", adapters["all"], None, 4)


def test_a_missing_adapter_says_what_it_needs(tmp_path):
    with pytest.raises(ValueError, match="adapter_config.json and adapter_model.safetensors"):
        read_adapter("x", str(tmp_path), None, 64)


@pytest.mark.parametrize("ranks", [2, 4])  # 4: two ranks share each of the 2 KV heads
def test_ranks_over_gloo_give_the_tokens_of_one_rank(lora_llm, mistral_v03_dir, adapters, ranks):
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    loras = [LoRARequest(n) if n else None for n in (None, "qv", "all", "mlp")]
    expected = lora_llm.generate([PROMPTS[1]] * 4, params, use_tqdm=False, lora_request=loras)
    sharded = LLM(mistral_v03_dir, tensor_parallel_size=ranks, lora_adapters=adapters, max_batch_total_tokens=2048)
    try:
        got = sharded.generate([PROMPTS[1]] * 4, params, use_tqdm=False, lora_request=loras)
    finally:
        sharded.engine.shutdown()
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in expected]


@pytest.fixture(scope="module")
def lora_server(mistral_v03_dir, adapters):
    from server_process import ServerProcess

    spec = ",".join(f"{name}={path}" for name, path in adapters.items())
    server = ServerProcess("--model-id", mistral_v03_dir, "--max-total-tokens", "256", "--max-input-tokens", "200",
                           "--max-batch-total-tokens", "4096", "--lora-adapters", spec)
    try:
        yield server.wait_ready()
    finally:
        server.stop()


def expected_text(llm, prompt: str, name: str | None, chat: bool = False) -> str:
    params = SamplingParams(temperature=0, max_tokens=8)
    lora = LoRARequest(name) if name else None
    if chat:
        return llm.chat([{"role": "user", "content": prompt}], params, use_tqdm=False, lora_request=lora)[0].outputs[0].text
    return llm.generate(prompt, params, use_tqdm=False, lora_request=lora)[0].outputs[0].text


def test_tgi_clients_choose_an_adapter_by_adapter_id(lora_server, lora_llm):
    import httpx
    from huggingface_hub import InferenceClient

    client = InferenceClient(base_url=lora_server.url)
    for name in ("qv", "all", None):
        expected = expected_text(lora_llm, PROMPTS[0], name)
        assert client.text_generation(PROMPTS[0], max_new_tokens=8, adapter_id=name) == expected
        body = {"inputs": PROMPTS[0], "parameters": {"max_new_tokens": 8, "adapter_id": name}}
        assert httpx.post(f"{lora_server.url}/generate", json=body, timeout=60).json()["generated_text"] == expected


def test_openai_clients_choose_an_adapter_by_model(lora_server, lora_llm, mistral_v03_dir):
    from openai import OpenAI

    client = OpenAI(base_url=f"{lora_server.url}/v1", api_key="unused")
    for model, name in (("mlp", "mlp"), ("tgi", None), (mistral_v03_dir, None)):
        reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPTS[1]}],
                                               max_tokens=8, temperature=0)
        assert reply.choices[0].message.content == expected_text(lora_llm, PROMPTS[1], name, chat=True)
    reply = client.completions.create(model="all", prompt=PROMPTS[2], max_tokens=8, temperature=0)
    assert reply.choices[0].text == expected_text(lora_llm, PROMPTS[2], "all")
    assert [m.id for m in client.models.list().data] == [mistral_v03_dir, "qv", "all", "mlp"]


def test_an_unknown_adapter_is_422_naming_it(lora_server, mistral_v03_dir):
    import httpx

    r = httpx.post(f"{lora_server.url}/generate", json={"inputs": "Hi", "parameters": {"adapter_id": "nope"}})
    assert r.status_code == 422
    assert r.json() == {"error": f"Input validation error: adapter `nope` is not loaded (the base model is "
                                 f"`{mistral_v03_dir}`; LoRA adapters: `qv`, `all`, `mlp`)", "error_type": "validation"}
    r = httpx.post(f"{lora_server.url}/v1/chat/completions", json={
        "model": "nope", "messages": [{"role": "user", "content": "Hi"}]})
    assert r.status_code == 422 and "model `nope` is not loaded" in r.json()["error"]


def test_info_and_metrics_know_the_adapters(lora_server):
    import httpx

    from server_process import metric

    assert httpx.get(f"{lora_server.url}/info").json()["lora_adapters"] == ["qv", "all", "mlp"]
    before = metric(httpx.get(f"{lora_server.url}/metrics").text, "tgi_request_adapter_count", 'adapter="qv"')
    body = {"inputs": "Hi", "parameters": {"max_new_tokens": 2, "adapter_id": "qv"}}
    assert httpx.post(f"{lora_server.url}/generate", json=body, timeout=60).status_code == 200
    after = metric(httpx.get(f"{lora_server.url}/metrics").text, "tgi_request_adapter_count", 'adapter="qv"')
    assert after - before == 1


# bfloat16 on a GPU only: the interpreter's products of bfloat16 tiles are wrong (Triton 3.6)
HALF = torch.bfloat16 if torch.cuda.is_available() else torch.float32


@pytest.mark.parametrize("rows, rank, splits, runs, dtype", [
    (1, 4, None, None, torch.float32), (5, 16, 3, 1, torch.float32), (9, 48, None, 2, torch.float32),
    (70, 16, 2, None, HALF)])
def test_the_lora_kernels_equal_their_reference(rows, rank, splits, runs, dtype):
    """Rows of several slots in any order (70 rows: blocks of 32, one slot's rows over three
    blocks), partial sums over runs of the inputs, a piece of a wider output, its tiles one a
    program or walked in runs (one run: all three tiles, the last one partial)."""
    from server.kernels.lora import lora_expand, lora_reference, lora_rows, lora_shrink

    device = "cuda" if torch.cuda.is_available() else "cpu"
    generator = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 300, generator=generator).to(device, dtype)
    a = torch.randn(3, rank, 300, generator=generator).to(device, dtype)
    b = torch.randn(3, 130, rank, generator=generator).to(device, dtype)
    slots = torch.tensor([(i * 7 % 5) - 1 for i in range(rows)], device=device).clamp(max=2)  # -1: no adapter
    out = torch.randn(rows, 200, generator=generator).to(device, dtype)
    view = out[:, 50:180]  # a piece of a wider output, as a merged projection's
    expected = lora_reference(x, a, b, slots, view.clone())
    ordered = lora_rows(slots, 3)
    assert sorted(ordered.order[ordered.starts[0]:].tolist()) == (slots >= 0).nonzero().flatten().tolist()
    t = lora_shrink(x, a, ordered, splits)
    assert t.shape[0] == (splits or t.shape[0])
    lora_expand(t, b, ordered, view, runs)
    tolerance = dict(atol=1e-3, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.5, rtol=0.02)
    assert torch.allclose(view.float(), expected.float(), **tolerance)
    assert torch.equal(out[slots < 0, 50:180], expected[slots < 0])


@pytest.mark.parametrize("rows, config, gated", [
    (1, None, False), (3, dict(block_n=8, block_k=32, num_stages=2, split_k=3), True),
    (16, dict(block_n=16, block_k=32, dot=True), False), (5, dict(block_n=32, block_k=64, dot=True, split_k=2), True)])
def test_the_decode_product_adds_each_rows_update_in_its_epilogue(rows, config, gated):
    """A decode batch's product (gemv) with the rows' updates added before its outputs are
    rounded: rows of three adapters and of none, one row or a tile of 16 on the tensor cores,
    K split or not, and a gated down projection whose shrink reads [gate | up] itself."""
    from server.kernels.gemv import GemvConfig, gemv
    from server.kernels.lora import LoRAUpdate, lora_reference, lora_rows, lora_shrink
    from server.kernels.reference import silu_and_mul_reference

    device = "cuda" if torch.cuda.is_available() else "cpu"
    generator = torch.Generator().manual_seed(rows)
    K, N, rank = 96, 72, 24
    x = torch.randn(rows, 2 * K if gated else K, generator=generator).to(device, HALF)
    weight = (torch.randn(N, K, generator=generator) / K ** 0.5).to(device, HALF)
    a = (torch.randn(3, rank, K, generator=generator) / K ** 0.5).to(device, HALF)
    b = torch.randn(3, N, rank, generator=generator).to(device, HALF)
    slots = torch.tensor([((i + 1) * 7 % 5) - 1 for i in range(rows)], device=device).clamp(max=2)  # row 0: slot 1
    real_x = silu_and_mul_reference(x) if gated else x
    expected = lora_reference(real_x, a, b, slots, (real_x.float() @ weight.float().T).to(HALF))
    ordered = lora_rows(slots, 3)
    update = LoRAUpdate(lora_shrink(x, a, ordered, splits=2, gated=gated), b, ordered, slots)
    out = gemv(x, weight, GemvConfig(**config) if config else None, gated=gated, lora=update)
    tolerance = dict(atol=1e-3, rtol=1e-4) if HALF == torch.float32 else dict(atol=0.1, rtol=0.02)
    torch.testing.assert_close(out.float(), expected.float(), **tolerance)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="Mistral-7B's shapes: on the GPU only")
@pytest.mark.parametrize("rows", [1, 2, 7, 16])
@pytest.mark.parametrize("in_features, out_features, rank, gated",
                         [(4096, 6144, 48, False), (4096, 28672, 32, False), (14336, 4096, 16, True)])
def test_the_decode_products_epilogue_on_mistral_shapes(rows, in_features, out_features, rank, gated):
    """qkv, gate/up and the gated down projection of a decode step with its tiles as chosen for
    Mistral-7B, eight adapters and the base model mixed, in bfloat16."""
    from server.kernels.gemv import gemv
    from server.kernels.lora import LoRAUpdate, lora_reference, lora_rows, lora_shrink
    from server.kernels.reference import silu_and_mul_reference

    generator = torch.Generator(device="cuda").manual_seed(rows)
    x = torch.randn(rows, 2 * in_features if gated else in_features, generator=generator, device="cuda").bfloat16()
    weight = (torch.randn(out_features, in_features, generator=generator, device="cuda") * 0.02).bfloat16()
    a = (torch.randn(8, rank, in_features, generator=generator, device="cuda") * 0.02).bfloat16()
    b = (torch.randn(8, out_features, rank, generator=generator, device="cuda") * 0.02).bfloat16()
    slots = torch.randint(-1, 8, (rows,), generator=generator, device="cuda")
    real_x = silu_and_mul_reference(x) if gated else x
    expected = lora_reference(real_x, a, b, slots, (real_x.float() @ weight.float().T).bfloat16())
    ordered = lora_rows(slots, 8)
    out = gemv(x, weight, gated=gated, lora=LoRAUpdate(lora_shrink(x, a, ordered, gated=gated), b, ordered, slots))
    assert torch.allclose(out.float(), expected.float(), atol=0.05, rtol=0.02)


@pytest.mark.parametrize("rows", [1, 16, 17])
def test_a_decode_batchs_projection_takes_one_launch_more_for_its_adapters(rows, monkeypatch):
    """Each row's slot on the device, as on a GPU: a projection of a decode batch (1-16 rows,
    the gemv kernel, here on the CPU) launches the shrink and its product, which adds the
    update itself (no expand), and the gated down projection makes silu(gate) * up inside both
    (no silu_and_mul); a larger batch's product is followed by the expand. Each gives what the
    base product plus torch's update gives."""
    from server.kernels import lora as lora_kernels
    from server.kernels.lora import lora_reference
    from server.kernels.reference import silu_and_mul_reference
    from server.layers import linear
    from server.layers import lora as lora_layers

    # gemv's rows on any device (the CPU's in the interpreter), in float32
    monkeypatch.setattr(linear, "suits", lambda x: x.dim() == 2 and 0 < x.shape[0] <= 16 and x.stride(1) == 1)
    launched, silu_calls = [], []
    kernel_type = type(lora_kernels._shrink_kernel)
    run = kernel_type.run
    monkeypatch.setattr(kernel_type, "run",
                        lambda self, *a, **k: launched.append(self.fn.__name__) or run(self, *a, **k))
    for module in (linear, lora_layers):
        silu = module.silu_and_mul
        monkeypatch.setattr(module, "silu_and_mul", lambda x, *a, silu=silu: silu_calls.append(1) or silu(x, *a))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    generator = torch.Generator().manual_seed(rows)
    qkv = linear.MergedColumnParallelLinear(64, [(48, 1), (16, 1)])
    down = linear.RowParallelLinear(48, 40, gated=True)
    qkv.load_piece(0, torch.randn(48, 64, generator=generator) / 8)
    qkv.load_piece(1, torch.randn(16, 64, generator=generator) / 8)
    down.load(torch.randn(40, 48, generator=generator) / 8)
    bank = lora_layers.LoRABank()
    slots = torch.tensor([((i + 1) * 7 % 5) - 1 for i in range(rows)], device=device).clamp(max=2)  # -1: none
    bank.use_rows(slots)
    for layer, width in ((qkv.to(device), 64), (down.to(device), 96)):
        layer.lora = lora_layers.LoRASlots.for_layer(layer, bank, 3, 4, torch.float32)
        layer.lora.A.copy_(torch.randn(layer.lora.A.shape, generator=generator))
        layer.lora.B.copy_(torch.randn(layer.lora.B.shape, generator=generator))
        x = torch.randn(rows, width, generator=generator).to(device)
        launched.clear(), silu_calls.clear()
        out = layer(x)
        real_x = silu_and_mul_reference(x) if layer is down else x
        expected = lora_reference(real_x, layer.lora.A, layer.lora.B, slots, real_x @ layer.weight.T)
        torch.testing.assert_close(out, expected, **(dict(atol=1e-4, rtol=1e-4) if device == "cpu" else
                                                     dict(atol=0.05, rtol=0.01)))  # TF32 products on a GPU
        fused = rows <= 16
        assert launched == (["_shrink_kernel", "_gemv_kernel"] if fused else ["_shrink_kernel", "_expand_kernel"])
        assert len(silu_calls) == (0 if fused or layer is qkv else 1)  # the larger batch's product needs it
