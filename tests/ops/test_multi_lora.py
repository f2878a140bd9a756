"""Unmerged multi-LoRA in the engine: each row's adapter applied in a shared batch equals PEFT's model."""

import copy
import os

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from ops.engine import Engine, EngineConfig, Request
from ops.model import DEFAULT_MODEL, embedded_gguf

os.environ.setdefault("HF_HUB_OFFLINE", "1")
PROMPTS = ["Hello, my name is", "The capital of France is a large city that is known for", "def fibonacci(n):",
           "1 2 3"]
NEW = 16


@pytest.fixture(scope="module")
def tokenizer():
    gguf = embedded_gguf(DEFAULT_MODEL)
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


@pytest.fixture(scope="module")
def base(tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id)
    return LlamaForCausalLM(config).eval()


def make_adapter(base, directory, seed: int, r: int, targets: list[str], alpha: float):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft = get_peft_model(copy.deepcopy(base), LoraConfig(r=r, lora_alpha=alpha, target_modules=targets,
                                                          init_lora_weights=False))
    peft.save_pretrained(directory)
    return peft.eval()


@pytest.fixture(scope="module")
def adapters(base, tmp_path_factory):
    """Two adapters of different ranks and targets: {name: (directory, PEFT model)}."""
    out = {}
    for name, seed, r, targets, alpha in (("a", 1, 4, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                          "up_proj", "down_proj"], 8.0),
                                          ("b", 2, 8, ["q_proj", "v_proj", "down_proj"], 4.0)):
        directory = tmp_path_factory.mktemp(f"adapter-{name}")
        out[name] = (directory, make_adapter(base, directory, seed, r, targets, alpha))
    return out


def hf_greedy(model, tokenizer, prompt: str, n: int = NEW) -> list[int]:
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, ids.input_ids.shape[1]:].tolist()


def engine_for(base, tokenizer, adapters, **kwargs) -> Engine:
    cfg = EngineConfig(**{"max_batch_size": 4, "max_seq_len": 256, "max_lora_rank": 8, "max_adapters": 2, **kwargs})
    engine = Engine(base, tokenizer, cfg)
    for name, (directory, _) in adapters.items():
        engine.add_adapter(name, directory)
    return engine


def test_unmerged_adapter_alone_matches_peft_generate(base, tokenizer, adapters):
    with engine_for(base, tokenizer, adapters) as eng:
        out = eng.generate_sync([Request(prompt=PROMPTS[1], max_tokens=NEW, ignore_eos=True, adapter="a")])[0]
    assert out.token_ids == hf_greedy(adapters["a"][1], tokenizer, PROMPTS[1])
    assert out.token_ids != hf_greedy(base, tokenizer, PROMPTS[1])  # the adapter changes the answer


@pytest.mark.parametrize("native", [True, False], ids=["lora_bgmv", "torch"])  # the decode step's LoRA update
@pytest.mark.parametrize("chunk", [256, 3])  # 3: prompts prefilled in chunks between the others' decode steps
def test_batch_mixing_adapters_and_base_rows_matches_peft(base, tokenizer, adapters, chunk, native, request):
    mix = ["a", "b", None, "a"]
    if native:
        request.getfixturevalue("native_ops")  # skips (or fails under CI) without the compiled ops
    with engine_for(base, tokenizer, adapters, prefill_chunk_tokens=chunk) as eng:
        eng.runner.lora._native = native
        outs = eng.generate_sync([Request(prompt=p, max_tokens=NEW, ignore_eos=True, adapter=a)
                                  for p, a in zip(PROMPTS, mix)])
        assert eng.adapter_stats()["loads"] == 2
    for prompt, adapter, out in zip(PROMPTS, mix, outs):
        model = base if adapter is None else adapters[adapter][1]
        assert out.token_ids == hf_greedy(model, tokenizer, prompt), (prompt, adapter)


def test_eviction_and_reload_give_the_same_tokens(base, tokenizer, adapters):
    with engine_for(base, tokenizer, adapters, max_adapters=1) as eng:
        runs = [eng.generate_sync([Request(prompt=PROMPTS[0], max_tokens=NEW, ignore_eos=True, adapter=a)])[0]
                for a in ("a", "b", "a")]
        stats = eng.adapter_stats()
        # both adapters in one batch with one slot: the second waits for the first to finish
        both = eng.generate_sync([Request(prompt=PROMPTS[0], max_tokens=NEW, ignore_eos=True, adapter=a)
                                  for a in ("a", "b")])
    assert runs[0].token_ids == runs[2].token_ids != runs[1].token_ids
    assert stats["loads"] == 3 and stats["evictions"] == 2 and stats["resident"] == ["a"]
    assert [c.token_ids for c in both] == [runs[0].token_ids, runs[1].token_ids]


def test_adapter_errors_name_the_problem(base, tokenizer, adapters, tmp_path):
    with engine_for(base, tokenizer, {"a": adapters["a"]}, max_lora_rank=4) as eng:
        with pytest.raises(ValueError, match="max_lora_rank=4"):
            eng.add_adapter("b", adapters["b"][0])
        with pytest.raises(ValueError, match="not registered"):
            eng.submit(Request(prompt="x", adapter="nope"), lambda e: None)
        with pytest.raises(ValueError, match="adapter_config.json"):
            eng.add_adapter("empty", tmp_path)
    with Engine(base, tokenizer, EngineConfig(max_seq_len=64)) as plain, pytest.raises(ValueError, match="no LoRA"):
        plain.add_adapter("a", adapters["a"][0])


@pytest.mark.slow
def test_compiled_mixed_adapters_match_peft_without_recompiling(base, tokenizer, adapters):
    """One compiled graph per batch kind serves any adapter mix: a new mix does not recompile."""
    from torch._dynamo.utils import counters

    with engine_for(base, tokenizer, adapters, compile=True) as eng:
        eng.warmup()
        assert eng.compiled, eng.warmup_error
        frames = counters["stats"]["unique_graphs"]
        mixes = (["a", "b", None, "a"], [None, "b", "b", "a"], ["a"], [None])
        outs = [eng.generate_sync([Request(prompt=p, max_tokens=NEW, ignore_eos=True, adapter=a)
                                   for p, a in zip(PROMPTS, mix)]) for mix in mixes]
        assert counters["stats"]["unique_graphs"] == frames
    for mix, run in zip(mixes, outs):
        for prompt, adapter, out in zip(PROMPTS, mix, run):
            model = base if adapter is None else adapters[adapter][1]
            assert out.token_ids == hf_greedy(model, tokenizer, prompt), (prompt, adapter)


def test_prefix_cache_is_kept_per_adapter_and_invisible(base, tokenizer, adapters):
    """Base and adapter requests share a prompt prefix but not its KV; every answer is PEFT's own."""
    shared = "Passage: the mill on the river was built in 1821 and ground wheat for the town. " * 2
    prompts = [shared + "Question: when?", shared + "Question: what?"]
    mix = [None, "a", None, "a"]
    with engine_for(base, tokenizer, adapters, max_batch_size=1, prefix_cache_mb=4, prefix_block_tokens=8,
                    prefill_chunk_tokens=8) as eng:
        outs = eng.generate_sync([Request(prompt=p, max_tokens=NEW, ignore_eos=True, adapter=a)
                                  for p, a in zip(prompts * 2, mix)])
        stats = eng.prefix_cache_stats()
    assert stats["hit_tokens"] >= 2 * 8 * (len(tokenizer(shared)["input_ids"]) // 8)  # the 3rd and 4th hit
    for prompt, adapter, out in zip(prompts * 2, mix, outs):
        model = base if adapter is None else adapters[adapter][1]
        assert out.token_ids == hf_greedy(model, tokenizer, prompt), (prompt, adapter)


def _random_slots(lora, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for t in (*lora.A.values(), *lora.B.values()):
        t[1:].copy_(torch.randn(t[1:].shape, generator=gen))
    lora.scale[1:] = torch.rand(lora.scale.numel() - 1, generator=gen) + 0.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rows, slots", [(5, [0, 1, 2, 1, 0]), (3, [2, 2, 2]), (1, 1), (2, 2), (8, 1)])
def test_lora_bgmv_equals_the_torch_update(base, native_ops, rows, slots, dtype):
    """The compiled op against the torch formulation it replaces, for every group, mixed rows
    (slot 0 = no adapter), and one adapter on every row (1, 2 or 8 rows)."""
    from ops.multi_lora import MultiLora

    lora = MultiLora(base, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), 2, 8,
                     dtype)
    _random_slots(lora)
    for group in lora.groups:
        k = lora.A[f"{group}.0"].shape[-1]
        x = torch.randn(rows, 1, k, generator=torch.Generator().manual_seed(1))
        arg = torch.tensor(slots) if isinstance(slots, list) else slots
        lora._native = True
        got = lora.delta(group, 1, x, arg)
        lora._native = False
        want = lora.delta(group, 1, x, arg)
        assert got.shape == want.shape == (rows, 1, lora._bgmv_args[(group, 1)][2])
        # unit-variance weights: updates of size ~10 summed in another order than torch's matmul
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        if isinstance(slots, list):
            assert not got[torch.tensor(slots) == 0].any()  # base rows get no update


@pytest.mark.parametrize("native", [True, False], ids=["lora_bgmv", "torch"])
@pytest.mark.parametrize("slots", [[0, 2, 1], 1])
def test_add_delta_adds_the_update_to_the_base_output_in_place(base, native_ops, native, slots):
    from ops.multi_lora import MultiLora

    lora = MultiLora(base, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), 2, 8)
    _random_slots(lora)
    lora._native = native
    arg = torch.tensor(slots) if isinstance(slots, list) else slots
    for group in lora.groups:
        x = torch.randn(3, lora.A[f"{group}.0"].shape[-1])
        out = torch.randn(3, lora._bgmv_args[(group, 0)][2])
        want = out + lora.delta(group, 0, x[:, None], arg)[:, 0]
        storage = out.data_ptr()
        lora.add_delta_(group, 0, x, arg, out)
        assert out.data_ptr() == storage
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def test_slots_store_bfloat16_where_the_base_computes_in_it(base):
    from ops.multi_lora import slot_dtype
    from ops.quantization import quantize

    assert slot_dtype(base) == torch.float32  # PEFT's arithmetic for a float base
    assert slot_dtype(quantize(base, "weight_only_int4", group_size=32)) == torch.bfloat16
    assert slot_dtype(quantize(base, "weight_only_int4", group_size=32, compute_dtype="float32")) == torch.float32
    assert slot_dtype(base, "bfloat16") == torch.bfloat16
    with pytest.raises(ValueError, match="valid: auto, float32, bfloat16"):
        slot_dtype(base, "fp8")


def test_lora_bgmv_refuses_a_slot_it_does_not_have(base, native_ops):
    from ops.multi_lora import MultiLora

    lora = MultiLora(base, ("q_proj",), 1, 4)
    a, bs, width = lora._bgmv_args[("qkv", 0)]
    with pytest.raises(RuntimeError, match="slot out of range"):
        torch.ops.raylm.lora_bgmv(torch.empty(1, width), torch.randn(1, a.shape[-1]), a, bs, torch.tensor([5]),
                                  lora.scale, lora.max_rank)
