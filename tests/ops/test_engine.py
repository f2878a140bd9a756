"""Tests of ops/engine.py on a tiny random Llama (fast) and the embedded SmolLM2 (slow)."""

import asyncio
import math
import os
import time
from collections import Counter

import pytest
import torch
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from ops.engine import Engine, EngineConfig, QueueFullError, Request, sample
from ops.model import DEFAULT_MODEL, embedded_gguf, load_model
from tests.references import beam_search

os.environ.setdefault("HF_HUB_OFFLINE", "1")
PROMPTS = [
    "Hello, my name is",
    "The capital of France is a large city that is known for",
    "def fibonacci(n):",
    "1 2 3",
]


@pytest.fixture(scope="session")
def tokenizer():
    gguf = embedded_gguf(DEFAULT_MODEL)
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


@pytest.fixture(scope="session")
def tiny_model(tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def engine(tiny_model, tokenizer):
    with Engine(tiny_model, tokenizer, EngineConfig(max_batch_size=4, max_seq_len=512)) as eng:
        yield eng


def hf_greedy(model, tokenizer, prompt: str, n: int) -> list[int]:
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, ids.input_ids.shape[1]:].tolist()


def test_greedy_matches_hf_generate_batched(engine, tiny_model, tokenizer):
    assert engine.backend == "llama"
    outs = engine.generate_sync([Request(prompt=p, max_tokens=64, ignore_eos=True) for p in PROMPTS])
    for prompt, out in zip(PROMPTS, outs):
        assert out.token_ids == hf_greedy(tiny_model, tokenizer, prompt, 64)


LONG_PROMPT = " ".join(f"Passage {i}: the river runs past mill number {i * 7} and the town." for i in range(12))


@pytest.mark.parametrize("chunk", [3, 16])
def test_chunked_prefill_matches_hf_generate(tiny_model, tokenizer, chunk):
    """Prompts prefilled a few tokens per step, interleaved with the others' decode steps, say what generate says."""
    # the first prompt runs while the long one is prefilled in chunks (alone it would be prefilled whole)
    prompts = [PROMPTS[0], LONG_PROMPT, *PROMPTS[1:]]
    assert len(tokenizer(LONG_PROMPT)["input_ids"]) > 8 * chunk
    with Engine(tiny_model, tokenizer, EngineConfig(max_batch_size=3, max_seq_len=512,
                                                    prefill_chunk_tokens=chunk)) as eng:
        outs = eng.generate_sync([Request(prompt=p, max_tokens=24, ignore_eos=True) for p in prompts])
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == hf_greedy(tiny_model, tokenizer, prompt, 24)


def test_running_stream_keeps_producing_tokens_while_a_long_prompt_is_prefilled(tiny_model, tokenizer):
    chunk = 8
    with Engine(tiny_model, tokenizer, EngineConfig(max_batch_size=2, max_seq_len=512,
                                                    prefill_chunk_tokens=chunk)) as eng:
        calls: list[tuple[str, int]] = []
        prefill, decode = eng.runner.prefill, eng.runner.decode_one_token

        def record_prefill(row, ids, **kwargs):
            calls.append(("prefill", ids.shape[0]))
            return prefill(row, ids, **kwargs)

        def record_decode(tokens, positions, *args):
            calls.append(("decode", tokens.shape[0]))
            return decode(tokens, positions, *args)

        eng.runner.prefill, eng.runner.decode_one_token = record_prefill, record_decode
        running = eng.stream_sync(Request(prompt=PROMPTS[0], max_tokens=400, ignore_eos=True))
        next(running)  # the first stream is decoding
        calls.clear()
        long = eng.generate_sync([Request(prompt=LONG_PROMPT, max_tokens=2, ignore_eos=True)])[0]
        running.close()
    chunks = [i for i, (kind, n) in enumerate(calls) if kind == "prefill"]
    assert len(chunks) == -(-long.prompt_tokens // chunk) >= 8
    assert all(calls[i][1] <= chunk for i in chunks)
    # one decode step of the running stream after every chunk but the last
    for before, after in zip(chunks, chunks[1:]):
        assert [c for c in calls[before + 1:after]] == [("decode", 1)]


def _record_prefill_sizes(eng: Engine) -> list[int]:
    """The token count of every prefill call the engine makes from now on (appended as they happen)."""
    sizes: list[int] = []
    prefill = eng.runner.prefill

    def record_prefill(row, ids, **kwargs):
        sizes.append(ids.shape[0])
        return prefill(row, ids, **kwargs)

    eng.runner.prefill = record_prefill
    return sizes


@pytest.mark.parametrize("stall, tight", [(1.001, True), (1000.0, False)])
def test_prefill_stall_sizes_chunks_from_measured_steps(tiny_model, tokenizer, stall, tight):
    """A tight stall budget takes the smallest chunk once a chunk has been measured; a loose one the
    largest; the outputs are generate's either way."""
    with Engine(tiny_model, tokenizer, EngineConfig(max_batch_size=2, max_seq_len=512, prefill_chunk_tokens=16,
                                                    prefill_stall=stall)) as eng:
        sizes = _record_prefill_sizes(eng)
        running = eng.stream_sync(Request(prompt=PROMPTS[0], max_tokens=400, ignore_eos=True))
        for _ in range(3):
            next(running)  # decoding, and a decode step has been timed
        sizes.clear()
        long = eng.generate_sync([Request(prompt=LONG_PROMPT, max_tokens=4, ignore_eos=True)])[0]
        running.close()
        assert eng._budget.decode_ms > 0 and eng._budget.ms_per_unit > 0
    assert sum(sizes) == long.prompt_tokens > 64
    if tight:  # the running stream's prompt was measured: every chunk is the floor of 8
        assert all(n == 8 for n in sizes[:-1]) and len(sizes) == -(-sum(sizes) // 8)
    else:
        assert all(n == 16 for n in sizes[:-1])
    assert long.token_ids == hf_greedy(tiny_model, tokenizer, LONG_PROMPT, 4)


def test_a_prompt_with_no_stream_running_is_prefilled_in_one_forward(tiny_model, tokenizer):
    with Engine(tiny_model, tokenizer, EngineConfig(max_batch_size=2, max_seq_len=512,
                                                    prefill_chunk_tokens=8)) as eng:
        sizes = _record_prefill_sizes(eng)
        out = eng.generate_sync([Request(prompt=LONG_PROMPT, max_tokens=2, ignore_eos=True)])[0]
    assert sizes == [out.prompt_tokens] and out.prompt_tokens > 8


def test_hf_fallback_matches_generate(tokenizer):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=49152, n_embd=64, n_layer=2, n_head=2, n_positions=256)).eval()
    # chunks of 4: the HF forward continues a request's DynamicCache chunk by chunk
    with Engine(model, tokenizer, EngineConfig(max_batch_size=2, max_seq_len=256, prefill_chunk_tokens=4)) as eng:
        assert eng.backend == "hf"
        outs = eng.generate_sync([Request(prompt=p, max_tokens=16, ignore_eos=True) for p in PROMPTS[:2]])
    for prompt, out in zip(PROMPTS, outs):
        assert out.token_ids == hf_greedy(model, tokenizer, prompt, 16)


def test_lora_model_applies_adapter(tiny_model, tokenizer):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    base = LlamaForCausalLM(tiny_model.config).eval()
    base.load_state_dict(tiny_model.state_dict())
    lora = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).eval()
    with Engine(lora, tokenizer, EngineConfig(max_batch_size=2, max_seq_len=256)) as eng:
        out = eng.generate_sync([Request(prompt=PROMPTS[1], max_tokens=16, ignore_eos=True)])[0]
    assert out.token_ids == hf_greedy(lora, tokenizer, PROMPTS[1], 16)
    assert out.token_ids != hf_greedy(tiny_model, tokenizer, PROMPTS[1], 16)


def test_concurrent_requests_with_stops_get_their_own_answer(engine):
    full = engine.generate_sync([Request(prompt=p, max_tokens=24, ignore_eos=True) for p in PROMPTS])
    requests = []
    for i, (prompt, out) in enumerate(zip(PROMPTS, full)):
        stop = [out.text[len(out.text) // 2:][:3]] if i % 2 else []
        requests.append(Request(prompt=prompt, max_tokens=12 + 4 * i, stop=stop, ignore_eos=True))

    async def run_all():
        return await asyncio.gather(*(engine.generate(r) for r in requests))

    outs = asyncio.run(run_all())
    for request, ref, out in zip(requests, full, outs):
        if request.stop:
            stop = request.stop[0]
            assert out.finish_reason == "stop"
            assert out.text == ref.text[: ref.text.find(stop)]
            assert stop not in out.text
        else:
            assert out.finish_reason == "length"
            assert out.token_ids == ref.token_ids[: request.max_tokens]
            assert out.completion_tokens == request.max_tokens


def test_eos_ends_request(tiny_model, tokenizer):
    ref = hf_greedy(tiny_model, tokenizer, PROMPTS[0], 16)
    eos = ref[5]
    tiny_model.generation_config.eos_token_id = eos
    try:
        with Engine(tiny_model, tokenizer, EngineConfig(max_batch_size=2, max_seq_len=256)) as eng:
            out = eng.generate_sync([Request(prompt=PROMPTS[0], max_tokens=16)])[0]
    finally:
        tiny_model.generation_config.eos_token_id = tokenizer.eos_token_id
    assert out.finish_reason == "stop"
    assert out.token_ids == ref[: ref.index(eos) + 1]
    assert out.text == tokenizer.decode(ref[: ref.index(eos)], skip_special_tokens=True)


def test_seeded_sampling_is_reproducible(engine):
    sampled = Request(prompt=PROMPTS[0], max_tokens=16, temperature=0.8, top_p=0.9, top_k=50, seed=7)
    other = Request(prompt=PROMPTS[1], max_tokens=16, temperature=1.0, seed=3)
    a = engine.generate_sync([sampled])[0]
    b, _ = engine.generate_sync([sampled, other])
    c = engine.generate_sync([Request(**{**sampled.__dict__, "seed": 8})])[0]
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_top_k_one_is_greedy(engine):
    greedy, top1 = engine.generate_sync([
        Request(prompt=PROMPTS[2], max_tokens=8, ignore_eos=True),
        Request(prompt=PROMPTS[2], max_tokens=8, temperature=1.5, top_k=1, seed=0, ignore_eos=True),
    ])
    assert top1.token_ids == greedy.token_ids


# Fixed next-token logits for the sampler tests: probabilities 0.40, 0.25, 0.15, 0.10, 0.06, 0.04
# placed at shuffled token ids, so that a nucleus mapped back to the wrong ids would show.
PROBS = {5: 0.40, 1: 0.25, 6: 0.15, 0: 0.10, 3: 0.06, 7: 0.04, 2: 0.0, 4: 0.0}
LOGITS = torch.tensor([math.log(PROBS[i]) if PROBS[i] else -30.0 for i in range(8)])
DRAWS = 4000


def draw(request: Request, n: int = DRAWS) -> Counter:
    generator = torch.Generator().manual_seed(1234)
    return Counter(sample(LOGITS.clone(), request, generator) for _ in range(n))


def assert_frequencies(counts: Counter, expected: dict[int, float], n: int = DRAWS) -> None:
    """Each token's empirical frequency within 5 standard errors of its expected probability:
    a correct sampler fails this with probability < 1e-5 per token for any seed."""
    for token, p in expected.items():
        bound = 5 * math.sqrt(max(p * (1 - p), 1e-4) / n)
        assert abs(counts[token] / n - p) <= bound, (token, counts[token] / n, p)


def softmax(values: dict[int, float], temperature: float = 1.0) -> dict[int, float]:
    weights = {t: math.exp(v / temperature) for t, v in values.items()}
    total = sum(weights.values())
    return {t: w / total for t, w in weights.items()}


@pytest.mark.parametrize("top_p, nucleus", [
    (0.3, {5}),              # the most likely token alone already covers 0.3
    (0.6, {5, 1}),           # 0.40 < 0.6: the token that crosses top_p (0.25 more) is kept
    (0.75, {5, 1, 6}),       # 0.65 < 0.75, and 0.80 of mass lies before token 0
    (0.95, {5, 1, 6, 0, 3}),  # 0.90 < 0.95 < 0.96
])
def test_top_p_samples_only_the_nucleus_in_proportion(top_p, nucleus):
    counts = draw(Request(prompt="x", temperature=1.0, top_p=top_p))
    assert set(counts) == nucleus  # every nucleus token drawn, nothing outside it
    mass = sum(PROBS[t] for t in nucleus)
    assert_frequencies(counts, {t: PROBS[t] / mass for t in nucleus})


def test_top_k_samples_only_the_k_most_likely_in_proportion():
    counts = draw(Request(prompt="x", temperature=1.0, top_k=3))
    assert set(counts) == {5, 1, 6}
    assert_frequencies(counts, {t: PROBS[t] / 0.80 for t in (5, 1, 6)})


def test_temperature_one_samples_the_softmax():
    counts = draw(Request(prompt="x", temperature=1.0))
    assert_frequencies(counts, {t: p for t, p in PROBS.items()})


def test_low_temperature_concentrates_on_the_argmax():
    # 0.01 scales the 0.47 logit gap between the two most likely tokens to 47: exp(-47) ~ 4e-21.
    counts = draw(Request(prompt="x", temperature=0.01), n=500)
    assert counts == Counter({5: 500})


def test_high_temperature_spreads_to_softmax_of_scaled_logits():
    support = {t: float(LOGITS[t]) for t, p in PROBS.items() if p}
    hot = softmax(support, temperature=2.5)
    # The test can tell T=2.5 from T=1: the least likely token is 2.5x as likely here.
    assert hot[7] > 2 * PROBS[7]
    counts = draw(Request(prompt="x", temperature=2.5))
    assert_frequencies(counts, hot)
    assert counts[2] + counts[4] < 5  # exp(-30 / 2.5) ~ 6e-6 each


def test_chat_template_applied(engine, tokenizer):
    messages = [{"role": "user", "content": "What is 2+2?"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    chat, raw = engine.generate_sync([
        Request(messages=messages, max_tokens=8, ignore_eos=True),
        Request(prompt=text, max_tokens=8, ignore_eos=True),
    ])
    assert chat.prompt_tokens == len(tokenizer(text, add_special_tokens=False)["input_ids"])
    assert chat.token_ids == raw.token_ids


def test_streaming_deltas_concatenate_and_timings(engine):
    async def consume():
        deltas = [d async for d in engine.stream(Request(prompt=PROMPTS[1], max_tokens=20, stop=["zz"]))]
        return deltas

    deltas = asyncio.run(consume())
    completion = deltas[-1].completion
    assert completion is not None and all(d.completion is None for d in deltas[:-1])
    assert "".join(d.text for d in deltas) == completion.text
    assert completion.prompt_tokens > 0 and 0 < completion.completion_tokens <= 20
    assert 0 < completion.time_to_first_token_s <= completion.latency_s
    assert completion.tokens_per_s > 0


def test_a_consumer_that_fell_behind_gets_the_backlog_as_one_delta(engine):
    async def consume():
        stream = engine.stream(Request(prompt=PROMPTS[1], max_tokens=20, ignore_eos=True))
        while engine.num_running or engine.num_waiting:  # the whole answer queues up unread
            await asyncio.sleep(0.01)  # poll interval
        await asyncio.sleep(0)  # the engine thread's last call_soon_threadsafe runs
        return [d async for d in stream]

    deltas = asyncio.run(consume())
    (last,) = deltas  # 20 tokens' events, merged: the first read takes everything queued
    assert last.completion is not None and last.completion.completion_tokens == 20
    assert last.text == last.completion.text


def test_a_stream_interval_sends_the_first_tokens_at_once_then_merges_until_the_completion(engine):
    """The first delta goes out when the consumer first reads (with what was decoded by then, as
    without an interval); within the interval after it every token waits and merges, and the
    completion goes out when it is decoded, not at the end of the interval."""
    async def consume():
        started = time.monotonic()
        deltas, arrivals = [], []
        async for d in engine.stream(Request(prompt=PROMPTS[1], max_tokens=60, ignore_eos=True), interval_s=30.0):
            deltas.append(d)
            arrivals.append(time.monotonic() - started)
        return deltas, arrivals

    deltas, arrivals = asyncio.run(consume())
    first, last = deltas
    assert last.completion is not None and last.completion.completion_tokens == 60
    assert first.completion is None
    assert first.text + last.text == last.completion.text
    assert arrivals[-1] < 30.0


def test_queue_bound_raises(tiny_model, tokenizer):
    with Engine(tiny_model, tokenizer, EngineConfig(max_batch_size=1, max_queue=1, max_seq_len=512)) as eng:
        long = Request(prompt=PROMPTS[0], max_tokens=400, ignore_eos=True)
        first = eng.stream_sync(long)
        next(first)  # now running
        second = eng.stream_sync(long)
        with pytest.raises(QueueFullError, match="max_queue=1"):
            eng.stream_sync(long)
        first.close()
        second.close()


def test_cancellation_frees_the_slot(tiny_model, tokenizer):
    with Engine(tiny_model, tokenizer, EngineConfig(max_batch_size=1, max_seq_len=512)) as eng:

        async def run():
            stream = eng.stream(Request(prompt=PROMPTS[0], max_tokens=450, ignore_eos=True))
            async for _ in stream:
                break
            await stream.aclose()
            return await asyncio.wait_for(eng.generate(Request(prompt=PROMPTS[1], max_tokens=4)), 30)

        out = asyncio.run(run())
        assert out.completion_tokens <= 4
        assert eng.num_running == 0 and eng.num_waiting == 0


def test_a_generate_that_times_out_cancels_its_request(tiny_model, tokenizer):
    with Engine(tiny_model, tokenizer, EngineConfig(max_batch_size=1, max_seq_len=512)) as eng:
        cancelled, cancel = [], eng.cancel
        eng.cancel = lambda request_id: (cancelled.append(request_id), cancel(request_id))

        async def run():
            long = eng.generate(Request(prompt=PROMPTS[0], max_tokens=450, ignore_eos=True))
            while not eng.num_running:  # admitted and decoding
                await asyncio.sleep(0.01)  # poll interval
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(long, 0.05)
            assert long.cancelled()
            # the only row is free again: a new request runs to its end
            return await asyncio.wait_for(eng.generate(Request(prompt=PROMPTS[1], max_tokens=4, ignore_eos=True)), 30)

        out = asyncio.run(run())
        assert len(cancelled) == 1  # the timed-out future cancelled its request, which gave the row back
        assert out.completion_tokens == 4 and out.finish_reason == "length"
        assert eng.num_running == 0 and eng.num_waiting == 0


def test_request_validation_names_bad_value(engine):
    with pytest.raises(ValueError, match="top_p"):
        Request(prompt="x", top_p=0)
    with pytest.raises(ValueError, match="max_seq_len=512"):
        engine.generate_sync([Request(prompt="x", max_tokens=600)])


@pytest.mark.slow
def test_greedy_matches_hf_generate_on_embedded_model(embedded_storage, tokenizer):
    model = load_model(DEFAULT_MODEL, storage=embedded_storage)
    prompts = PROMPTS[:3]
    with Engine(model, tokenizer, EngineConfig(max_batch_size=4, max_seq_len=256)) as eng:
        assert eng.backend == "llama"
        outs = eng.generate_sync([Request(prompt=p, max_tokens=64, ignore_eos=True) for p in prompts])
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == hf_greedy(model, tokenizer, prompt, 64)


def test_fused_weight_only_projections_match_unfused(tiny_model, tokenizer):
    from ops.quantization import quantize

    model = quantize(tiny_model, "weight_only_int4")
    outs = {}
    for fuse in (True, False):
        with Engine(model, tokenizer, EngineConfig(max_batch_size=4, max_seq_len=128, fuse_qkv=fuse)) as eng:
            assert all(f is not None for f in eng.runner.qkv + eng.runner.gate_up) == fuse
            outs[fuse] = [c.token_ids for c in eng.generate_sync(
                [Request(prompt=p, max_tokens=16, ignore_eos=True) for p in PROMPTS])]
    assert outs[True] == outs[False]


def test_single_stream_threads_keeps_greedy_output(tiny_model, tokenizer):
    threads = torch.get_num_threads()
    cfg = EngineConfig(max_batch_size=4, max_seq_len=128, num_threads=threads, single_stream_threads=1)
    with Engine(tiny_model, tokenizer, cfg) as eng:
        out = eng.generate_sync([Request(prompt=PROMPTS[0], max_tokens=16, ignore_eos=True)])[0]
    assert out.token_ids == hf_greedy(tiny_model, tokenizer, PROMPTS[0], 16)
    with pytest.raises(ValueError, match="single_stream_threads"):
        EngineConfig(single_stream_threads=0)


@pytest.mark.slow  # torch.compile builds two graphs: minutes on 2 CPUs
def test_compiled_decode_matches_hf_generate(tiny_model, tokenizer):
    """The compiled decode graphs (1 request / a batch of different lengths) say what the model says."""
    cfg = EngineConfig(max_batch_size=4, max_seq_len=128, compile=True)
    with Engine(tiny_model, tokenizer, cfg) as eng:
        eng.warmup()
        assert eng.compiled, eng.warmup_error
        single = eng.generate_sync([Request(prompt=PROMPTS[1], max_tokens=24, ignore_eos=True)])[0]
        batched = eng.generate_sync([Request(prompt=p, max_tokens=24, ignore_eos=True) for p in PROMPTS])
    assert single.token_ids == hf_greedy(tiny_model, tokenizer, PROMPTS[1], 24)
    for prompt, out in zip(PROMPTS, batched):
        assert out.token_ids == hf_greedy(tiny_model, tokenizer, prompt, 24)


@pytest.mark.slow  # torch.compile builds two graphs
def test_background_compile_serves_eagerly_then_switches_without_recompiling(tiny_model, tokenizer):
    """Graphs built on a scratch KV cache off-thread serve this engine's rows: no recompile, same tokens."""
    from torch._dynamo.utils import counters

    cfg = EngineConfig(max_batch_size=4, max_seq_len=128, compile=True, compile_background=True)
    with Engine(tiny_model, tokenizer, cfg) as eng:
        eng.warmup(timeout=30)  # ready at once: the graphs are built by the helper thread
        during = eng.generate_sync([Request(prompt=p, max_tokens=24, ignore_eos=True) for p in PROMPTS])
        assert eng.wait_compiled(timeout=600), eng.warmup_error
        assert not eng.compiling
        graphs = counters["stats"]["unique_graphs"]
        single = eng.generate_sync([Request(prompt=PROMPTS[1], max_tokens=24, ignore_eos=True)])[0]
        assert eng.runner.compiled  # switched on the first step after the build
        batched = eng.generate_sync([Request(prompt=p, max_tokens=24, ignore_eos=True) for p in PROMPTS])
        assert counters["stats"]["unique_graphs"] == graphs  # the real cache's shapes fit the scratch's graphs
    assert single.token_ids == hf_greedy(tiny_model, tokenizer, PROMPTS[1], 24)
    for prompt, eager, out in zip(PROMPTS, during, batched):
        assert eager.token_ids == out.token_ids == hf_greedy(tiny_model, tokenizer, prompt, 24)


def test_background_compile_failure_keeps_serving_eagerly(tiny_model, tokenizer, monkeypatch):
    cfg = EngineConfig(max_batch_size=2, max_seq_len=128, compile=True, compile_background=True)
    with Engine(tiny_model, tokenizer, cfg) as eng:
        def broken(*args, **kwargs):
            raise RuntimeError("no C++ compiler")
        monkeypatch.setattr(eng.runner, "_compiled_layer", broken)
        assert not eng.wait_compiled(timeout=60)
        assert "no C++ compiler" in str(eng.warmup_error)
        out = eng.generate_sync([Request(prompt=PROMPTS[0], max_tokens=8, ignore_eos=True)])[0]
        assert not eng.runner.compiled
    assert out.token_ids == hf_greedy(tiny_model, tokenizer, PROMPTS[0], 8)


def test_compile_failure_falls_back_to_eager(tiny_model, tokenizer, monkeypatch):
    cfg = EngineConfig(max_batch_size=2, max_seq_len=128, compile=True)
    with Engine(tiny_model, tokenizer, cfg) as eng:
        def broken(*args, **kwargs):
            raise RuntimeError("no C++ compiler")
        monkeypatch.setattr(eng.runner, "_compiled_layer", broken)
        eng.warmup()
        assert not eng.compiled and "no C++ compiler" in str(eng.warmup_error)
        out = eng.generate_sync([Request(prompt=PROMPTS[0], max_tokens=8, ignore_eos=True)])[0]
    assert out.token_ids == hf_greedy(tiny_model, tokenizer, PROMPTS[0], 8)


def test_release_openmp_workers_frees_this_threads_team_and_torch_rebuilds_it():
    from ops.engine import release_openmp_workers

    maps = open("/proc/self/maps").read() if os.path.exists("/proc/self/maps") else ""
    if "libgomp" not in maps:
        pytest.skip("no libgomp in this process (not a Linux torch wheel): the release is a no-op here")

    def threads() -> int:
        return len(os.listdir("/proc/self/task"))

    a, b = torch.randn(256, 256), torch.randn(256, 256)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        before = a @ b  # this thread's OpenMP team: one worker thread beside this one
        with_team = threads()
        assert release_openmp_workers() is True
        released = threads()
        assert released <= with_team - 1, "the worker thread is still alive"
        assert torch.equal(a @ b, before)
        assert threads() == released + 1  # the team is rebuilt on demand
    finally:
        torch.set_num_threads(previous)



# ------------------------------------------------------------------------------------------- beam search


@pytest.mark.parametrize("settings", [{}, {"prefill_chunk_tokens": 4, "prefix_cache_mb": 1, "prefix_block_tokens": 2}],
                         ids=["whole-prompts", "chunked-prefix-cached"])
def test_beam_search_matches_reference_next_to_greedy_requests(tiny_model, tokenizer, settings):
    """Beam searches share the batch with greedy requests: rows are forked, reordered and retired
    among the others', and every request gets its own answer."""
    with Engine(tiny_model, tokenizer, EngineConfig(max_batch_size=8, max_seq_len=512, **settings)) as eng:
        requests = [Request(prompt=PROMPTS[0], max_tokens=10, beams=3, ignore_eos=True),
                    Request(prompt=PROMPTS[1], max_tokens=12, ignore_eos=True),
                    Request(prompt=PROMPTS[2], max_tokens=7, beams=4),
                    Request(prompt=PROMPTS[3], max_tokens=9, ignore_eos=True)]
        outs = eng.generate_sync(requests)
        if settings:  # again, the prompts' blocks now from the prefix cache
            assert eng.generate_sync(requests)[0].token_ids == outs[0].token_ids
            assert eng.prefix_cache_stats()["hit_tokens"] > 0
        assert eng.num_running == 0
    for request, out in zip(requests, outs):
        if request.beams == 1:
            assert out.token_ids == hf_greedy(tiny_model, tokenizer, request.prompt, request.max_tokens)
        else:
            assert out.token_ids == beam_search(tiny_model, tokenizer(request.prompt)["input_ids"], request.beams,
                                                request.max_tokens, eng.eos_token_ids, ignore_eos=request.ignore_eos)
            assert out.text == tokenizer.decode(out.token_ids, skip_special_tokens=True)
    assert outs[0].finish_reason == "length" and outs[0].completion_tokens == 10


def test_beam_search_differs_from_greedy_where_a_later_token_outweighs(tiny_model, tokenizer):
    """What a beam is for: some prompt's best-scoring sequence does not start with greedy's choice."""
    def logprob(prompt: str, toks: list[int]) -> float:
        ids = tokenizer(prompt)["input_ids"]
        with torch.inference_mode():
            lp = torch.log_softmax(tiny_model(torch.tensor([ids + toks])).logits[0].float(), -1)
        return sum(float(lp[len(ids) - 1 + i, t]) for i, t in enumerate(toks))

    with Engine(tiny_model, tokenizer, EngineConfig(max_batch_size=4, max_seq_len=512)) as eng:
        prompts = [f"{p} {i}" for p in PROMPTS for i in range(3)]
        beam = eng.generate_sync([Request(prompt=p, max_tokens=6, beams=4, ignore_eos=True) for p in prompts])
        greedy = eng.generate_sync([Request(prompt=p, max_tokens=6, ignore_eos=True) for p in prompts])
    gains = [logprob(p, b.token_ids) - logprob(p, g.token_ids) for p, b, g in zip(prompts, beam, greedy)]
    assert all(g > -1e-4 for g in gains), gains  # never worse than greedy here...
    assert any(g > 1e-3 for g in gains), gains  # ...and better on some prompt


def test_beam_search_under_a_span_constraint_matches_reference(tiny_model, tokenizer):
    from ops.extractive import SpanConstraint, normalize

    passages = ["Notre Dame's official colors are Navy Blue and Gold Rush, chosen in 1920.",
                "The Grotto of Our Lady of Lourdes was built in 1896."]
    prompts = [f"Question {i}: what colour?" for i in range(3)]
    with Engine(tiny_model, tokenizer, EngineConfig(max_batch_size=4, max_seq_len=512)) as eng:
        outs = eng.generate_sync([Request(prompt=p, max_tokens=10, beams=4, extract_from=passages) for p in prompts])
        eos = eng.eos_token_ids
    sources = [f" {normalize(p)} " for p in passages]
    for prompt, out in zip(prompts, outs):
        constraint = SpanConstraint(passages, tokenizer, eos)
        assert out.token_ids == beam_search(tiny_model, tokenizer(prompt)["input_ids"], 4, 10, eos, constraint)
        assert any(f" {normalize(out.text)}" in s for s in sources), out.text


def test_beam_search_ranked_by_question_support_matches_reference(tiny_model, tokenizer):
    """With support_weight the engine's beam ranks its final answers as the reference does (likelihood +
    weight x question support) and searches on until no open hypothesis could outrank the best."""
    from ops.extractive import SpanConstraint

    passages = ["Notre Dame's official colors are Navy Blue and Gold Rush, chosen in 1920. The Grotto was "
                "built in 1896 next to the lake.", "The marching band plays before every home game in the stadium."]
    question = "What are the official colors of Notre Dame?"
    prompts = [f"Question {i}: {question}" for i in range(3)]
    with Engine(tiny_model, tokenizer, EngineConfig(max_batch_size=4, max_seq_len=512)) as eng:
        outs = {w: eng.generate_sync([Request(prompt=p, max_tokens=8, beams=4, extract_from=passages,
                                              question=question, support_weight=w) for p in prompts])
                for w in (0.0, 5.0)}
        eos = eng.eos_token_ids
    for w, done in outs.items():
        for prompt, out in zip(prompts, done):
            constraint = SpanConstraint(passages, tokenizer, eos, question=question, support_weight=w)
            assert out.token_ids == beam_search(tiny_model, tokenizer(prompt)["input_ids"], 4, 8, eos, constraint)
            assert out.support_weight == w


def test_beam_search_waits_for_its_rows_and_a_cancelled_one_frees_them(tiny_model, tokenizer):
    with Engine(tiny_model, tokenizer, EngineConfig(max_batch_size=4, max_seq_len=512)) as eng:
        outs = eng.generate_sync([Request(prompt=p, max_tokens=5, beams=4, ignore_eos=True) for p in PROMPTS[:2]])
        assert [o.completion_tokens for o in outs] == [5, 5]  # one after the other: each needs all four rows

        async def run():
            long = eng.generate(Request(prompt=PROMPTS[0], max_tokens=400, beams=4, ignore_eos=True))
            while eng.num_running < 4:  # admitted, four hypotheses decoding
                await asyncio.sleep(0.01)  # poll interval
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(long, 0.05)
            return await asyncio.wait_for(eng.generate(Request(prompt=PROMPTS[1], max_tokens=4, beams=4,
                                                               ignore_eos=True)), 30)

        assert asyncio.run(run()).completion_tokens == 4
        assert eng.num_running == 0 and eng.num_waiting == 0


def test_beam_request_validation(engine, tokenizer):
    with pytest.raises(ValueError, match="temperature 0"):
        Request(prompt="x", beams=2, temperature=0.5)
    with pytest.raises(ValueError, match="stop strings"):
        Request(prompt="x", beams=2, stop=["."])
    with pytest.raises(ValueError, match="beams must be >= 1"):
        Request(prompt="x", beams=0)
    with pytest.raises(ValueError, match="support_weight must be >= 0"):
        Request(prompt="x", beams=2, extract_from=["a b"], question="q?", support_weight=-1)
    for missing in ({"beams": 1}, {"extract_from": None}, {"question": " "}):  # nothing to rank, or nothing to rank by
        with pytest.raises(ValueError, match="needs extract_from, beams > 1 and a question"):
            Request(**{"prompt": "x", "beams": 2, "extract_from": ["a b"], "question": "q?", "support_weight": 5,
                       **missing})
    with pytest.raises(ValueError, match="max_batch_size=4"):
        engine.generate_sync([Request(prompt="x", beams=5)])
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=49152, n_embd=32, n_layer=1, n_head=2, n_positions=128)).eval()
    with Engine(gpt2, tokenizer, EngineConfig(max_batch_size=4, max_seq_len=128)) as hf:
        with pytest.raises(ValueError, match="HF fallback"):
            hf.generate_sync([Request(prompt="x", max_tokens=4, beams=2)])
