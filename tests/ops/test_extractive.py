"""Tests of ops/extractive.py: the span constraint on its own and inside the engine."""

import os

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from ops.engine import Engine, EngineConfig, Request
from ops.extractive import SpanConstraint, normalize, question_support
from ops.model import DEFAULT_MODEL, embedded_gguf

os.environ.setdefault("HF_HUB_OFFLINE", "1")
PASSAGES = ["Notre Dame's official colors are Navy Blue and Gold Rush, chosen in 1920.",
            "The Grotto of Our Lady of Lourdes was built in 1896."]


@pytest.fixture(scope="module")
def tokenizer():
    gguf = embedded_gguf(DEFAULT_MODEL)
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_normalize_is_squads_with_a_trailing_space():
    assert normalize("  The Navy,\n Blue ") == "navy blue "
    assert normalize("Navy") == "navy"
    assert normalize("   ") == ""


def test_allows_a_span_of_one_passage_and_refuses_what_no_passage_says(tokenizer):
    c = SpanConstraint(PASSAGES, tokenizer, [tokenizer.eos_token_id])
    navy = ids(tokenizer, " Navy Blue")
    assert c.allows([], navy[0]) and c.allows(navy[:1], navy[1])
    assert not c.allows([], ids(tokenizer, " Dragon")[0])
    # a span that crosses from one passage into the next is in neither
    assert not c.allows(ids(tokenizer, " 1920."), ids(tokenizer, " Grotto")[0])
    # case, punctuation and articles do not matter; a span starts at a word
    assert c.allows([], ids(tokenizer, "NAVY")[0])
    assert c.allows(ids(tokenizer, "the official"), ids(tokenizer, " colors")[0])
    assert not c.allows([], ids(tokenizer, "avy")[0])
    # EOS only once there is an answer

    assert not c.allows([], tokenizer.eos_token_id) and c.allows(navy, tokenizer.eos_token_id)
    assert not c.allows(ids(tokenizer, " the,"), tokenizer.eos_token_id)  # no word yet
    assert not c.allows(ids(tokenizer, " Gro"), tokenizer.eos_token_id)  # inside a word
    # whitespace only between words, once
    newline = ids(tokenizer, "\n")[0]
    assert not c.allows([], newline) and not c.allows(ids(tokenizer, "Navy\n"), newline)


def test_mask_keeps_the_best_allowed_tokens(tokenizer):
    c = SpanConstraint(PASSAGES, tokenizer, [tokenizer.eos_token_id])
    dragon, navy, grotto = ids(tokenizer, " Dragon")[0], ids(tokenizer, " Navy")[0], ids(tokenizer, " Grotto")[0]
    logits = torch.zeros(len(tokenizer))
    logits[[dragon, navy, grotto]] = torch.tensor([5.0, 4.0, 3.0])
    assert int(c.mask(logits, [], first_only=True).argmax()) == navy
    kept = torch.isfinite(c.mask(logits, [])).nonzero().flatten().tolist()
    assert navy in kept and grotto in kept and dragon not in kept
    # nothing likely continues "Navy Blue and Gold Rush, chosen in 1920." except ending the answer
    done = ids(tokenizer, " chosen in 1920.")
    logits = torch.zeros(len(tokenizer))
    logits[dragon] = 9.0
    masked = c.mask(logits, done)
    assert int(masked.argmax()) == tokenizer.eos_token_id


def test_an_answer_stopped_inside_a_word_finishes_the_word(tokenizer):
    """Nothing likely continues "Navy Blue and Go": the answer goes on from the passage ("Gold"), not "Go"."""
    c = SpanConstraint(PASSAGES, tokenizer, [tokenizer.eos_token_id])
    partial = ids(tokenizer, " Navy Blue and Go")
    assert tokenizer.decode(partial).strip() == "Navy Blue and Go" and c.allows(partial[:-1], partial[-1])
    assert not c.allows(partial, tokenizer.eos_token_id)
    # articles add nothing to a word SQuAD compares: only where the passage has them, as they stand
    assert not c.allows(partial, ids(tokenizer, " an")[0]) and not c.allows(partial, ids(tokenizer, " A")[0])
    latin = SpanConstraint(["founded by the Congregation of Holy Cross (Congregatio a Sancta Cruce) in 1842"],
                           tokenizer, [tokenizer.eos_token_id])
    answer = ids(tokenizer, "the Congregatio")
    assert latin.allows(answer, ids(tokenizer, " a")[0])  # the passage's own "a", after the answer's "the"
    assert not latin.allows(answer, ids(tokenizer, " the")[0])
    rest = [t for t in range(len(tokenizer)) if tokenizer.decode([*partial, t]).strip() == "Navy Blue and Gold"]
    assert rest
    logits = torch.full((len(tokenizer),), -10.0)
    logits[ids(tokenizer, " Dragon")[0]] = 9.0
    logits[tokenizer.eos_token_id] = 8.0
    logits[rest[0]] = 1.0  # below the candidates checked first
    narrow = SpanConstraint(PASSAGES, tokenizer, [tokenizer.eos_token_id], candidates=2)
    assert int(narrow.mask(logits, partial, first_only=True).argmax()) == rest[0]


def test_question_support_is_the_share_of_the_question_in_the_answers_sentence():
    passages = ["Zahm was a professor. In 1899 Jerome Green became the first American to send a wireless message. "
                "Albert Zahm built an early wind tunnel.", "The band plays before every home game."]
    question = "Who was the first American to send a wireless message?"
    # content words: first, american, send, wireless, message (stop and question words aside)
    assert question_support(question, "Jerome Green", passages) == 1.0
    assert question_support(question, "Albert Zahm", passages) == 0.0  # its sentence is about a wind tunnel
    assert question_support(question, "Zahm", passages) == 0.0  # best of its sentences, both off the question
    assert question_support(question, "not in any passage", passages) == 0.0
    assert question_support(question, "1899", passages) == 1.0
    # the answer's own words are not evidence ("American" answers "Which American ..." from any sentence)
    assert question_support("Which American sent a wireless message first?", "the first American", passages) == 2 / 3
    # an answer spanning two sentences is in none of them
    assert question_support(question, "professor In 1899", passages) == 0.0
    assert question_support("", "Jerome Green", passages) == 0.0


def test_question_support_stems_as_bm25_does():
    import Stemmer

    passages = ["The university was founded by Father Sorin in 1842."]
    stem = Stemmer.Stemmer("english")
    assert question_support("Who is the founder of the university?", "Father Sorin", passages) == 0.5
    assert question_support("Who founded the university?", "Father Sorin", passages, stem) == 1.0


def test_rank_adds_the_weighted_support_to_the_likelihood(tokenizer):
    passages = ["In 1899 Jerome Green sent the first wireless message. Albert Zahm built a wind tunnel."]
    question = "Who sent the first wireless message?"
    plain = SpanConstraint(passages, tokenizer, [2])
    ranked = SpanConstraint(passages, tokenizer, [2], question=question, support_weight=5.0)
    green, zahm = ids(tokenizer, "Jerome Green"), ids(tokenizer, "Albert Zahm")
    assert plain.rank(-3.0, green) == -3.0 and plain.max_bonus == 0.0
    assert ranked.max_bonus == 5.0
    assert ranked.rank(-3.0, green) == pytest.approx(2.0)  # full support: + 5
    assert ranked.rank(-1.0, zahm) == -1.0  # likelier, but from a sentence the question is not about
    with pytest.raises(ValueError, match="needs a question"):
        SpanConstraint(passages, tokenizer, [2], support_weight=1.0)
    with pytest.raises(ValueError, match="support_weight must be >= 0"):
        SpanConstraint(passages, tokenizer, [2], question=question, support_weight=-1.0)


def test_refuses_no_passage(tokenizer):
    with pytest.raises(ValueError, match="non-empty passage"):
        SpanConstraint(["  "], tokenizer, [0])
    with pytest.raises(ValueError, match="non-empty passage"):
        Request(prompt="q", extract_from=[""])


def test_engine_output_is_a_span_of_the_passages(tokenizer):
    """A random model says nothing sensible; constrained, each answer is still copied text."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id)
    model = LlamaForCausalLM(config).eval()
    sources = [f" {normalize(p)} " for p in PASSAGES]
    with Engine(model, tokenizer, EngineConfig(max_batch_size=4, max_seq_len=256)) as engine:
        requests = [Request(prompt=f"Question {i}: what colour?", max_tokens=12, extract_from=PASSAGES,
                            temperature=t, seed=i) for i, t in enumerate((0.0, 0.0, 1.0, 1.0))]
        free = engine.generate_sync([Request(prompt="Question 0: what colour?", max_tokens=12)])[0]
        outs = engine.generate_sync(requests)
    def copied(text):
        return bool(normalize(text)) and any(f" {normalize(text)}" in s for s in sources)

    assert not copied(free.text)  # unconstrained it drifts off the passages
    for out in outs:
        assert copied(out.text), out.text


def test_partial_utf8_needs_a_non_ascii_character_next(tokenizer):
    c = SpanConstraint(["Zahm (1851\u20131921) wrote it."], tokenizer, [tokenizer.eos_token_id])
    dash = ids(tokenizer, "1851\u2013")
    assert all(c.allows(dash[:i], dash[i]) for i in range(len(dash)))
    byte = next(t for t in range(len(tokenizer)) if tokenizer.decode([t]) == "\ufffd")
    assert not c.allows(ids(tokenizer, "Zahm"), byte)  # "zahm" is followed by a space, not a multi-byte character


def test_table_borders_are_no_answer(tokenizer):
    """Documentation passages hold tables; their borders are text of the passage, not an answer."""
    c = SpanConstraint(["+---------------+ | Python object | JSON |\n+===============+ | dict | object |",
                        "It costs $400m (about \u20ac350m), said \"Kate\"."], tokenizer, [tokenizer.eos_token_id])
    border = ids(tokenizer, "+---------------+ | Python object")
    assert not c.allows([], border[0])  # "+" opens no answer
    assert not c.allows([], ids(tokenizer, "===")[0])  # nor does a rule
    assert not c.allows(ids(tokenizer, "+"), ids(tokenizer, " |")[0])  # "+ |": two characters before a word
    words = ids(tokenizer, "Python object")
    assert all(c.allows(words[:i], words[i]) for i in range(len(words)))
    for answer in ("$400m", "(about \u20ac350m)", "\"Kate\""):  # one opening character is fine
        tokens = ids(tokenizer, answer)
        assert all(c.allows(tokens[:i], tokens[i]) for i in range(len(tokens))), answer
    logits = torch.zeros(len(tokenizer))
    logits[border[0]], logits[words[0]] = 9.0, 1.0
    assert int(c.mask(logits, [], first_only=True).argmax()) == words[0]
