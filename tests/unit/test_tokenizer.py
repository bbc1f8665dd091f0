"""Tokenizer (GGUF / HF dir), chat template, incremental detokenizer and stop strings, on the real
embedded SmolLM2 GGUF."""
from __future__ import annotations

import os

import pytest

from engine_core.detokenizer import (
    MAX_PENDING_TOKENS,
    IncrementalDetokenizer,
    StopChecker,
    check_stop_strings,
    find_stop_string,
)
from engine_core.loader.model_source import embedded_gguf_path
from engine_core.tokenizer import Tokenizer, load_tokenizer

MULTIBYTE_TEXT = "Hi 👋! 你好，世界 🌍🎉 naïve café — ok ☃️ Ünïcödé ∑∞ done."
TEXTS = [
    "Hello world",
    "  leading spaces and trailing  ",
    "Numbers: 12345, 3.14159 and 2024-11-25.",
    "def f(x):\n    return x ** 2\n\n\tTabs\r\nCRLF",
    MULTIBYTE_TEXT,
    "<|im_start|>user\nhi<|im_end|>",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return load_tokenizer(embedded_gguf_path())


def _prompt_ids(tok: Tokenizer) -> list[int]:
    return tok.apply_chat_template([{"role": "user", "content": "Say something."}], tokenize=True)


# ----------------------------------------------------------------------------- loading


def test_gguf_metadata(tok):
    assert tok.vocab_size == 49152
    assert tok.eos_token_ids[0] == 2  # <|im_end|>: the chat end token, primary EOS
    assert tok.hf.convert_ids_to_tokens(2) == "<|im_end|>"
    assert 0 in tok.eos_token_ids  # <|endoftext|>
    assert tok.bos_token_id == 1  # <|im_start|>
    # GGUF says add_bos_token=False and HF's SmolLM2 tokenizer prepends nothing either.
    assert tok.add_bos_token is False
    assert tok.encode("Hello world") == [19556, 905]
    assert tok.encode("Hello world", add_special_tokens=False) == [19556, 905]
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    assert tok.name == "SmolLM2-135M-Instruct.Q4_1"


def test_matches_transformers_autotokenizer(tok):
    from transformers import AutoTokenizer

    path = embedded_gguf_path()
    ref = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    assert ref.backend_tokenizer.to_str() == tok.hf.backend_tokenizer.to_str()
    for text in TEXTS:
        assert tok.encode(text) == ref.encode(text)
        assert tok.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False)
        ids = ref.encode(text)
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True)
        assert tok.decode(ids, skip_special_tokens=False) == ref.decode(ids, skip_special_tokens=False)
    assert ref.chat_template == tok.chat_template
    assert (ref.bos_token_id, ref.eos_token_id) == (tok.bos_token_id, 2)


def test_roundtrip(tok):
    for text in TEXTS[:-1]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert tok.decode_raw(ids) == text
        assert tok.convert_tokens_to_string(tok.convert_ids_to_tokens(ids)) == text
    ids = tok.encode(TEXTS[-1])  # special tokens are single ids, skipped on decode by default
    assert ids[0] == 1 and ids[-1] == 2
    assert tok.decode(ids) == "user\nhi"
    assert tok.decode(ids, skip_special_tokens=False) == TEXTS[-1]


def test_digits_are_split_individually(tok):
    # llama.cpp's "smollm" pre-tokenizer and HF's SmolLM2 tokenizer.json split digits one by one;
    # transformers' GGUF converter does not, but the vocab has no multi-digit tokens, so ids agree.
    toks = tok.convert_ids_to_tokens(tok.encode("year 2024"))
    assert toks[-4:] == ["2", "0", "2", "4"]


def test_from_pretrained_dir(tok, tmp_path):
    tok.hf.save_pretrained(tmp_path)
    t2 = load_tokenizer(str(tmp_path))
    for text in TEXTS:
        assert t2.encode(text) == tok.encode(text)
    assert t2.chat_template == tok.chat_template
    assert t2.eos_token_ids[0] == 2 and t2.bos_token_id == 1 and not t2.add_bos_token


def test_load_tokenizer_missing_path(tmp_path):
    missing = str(tmp_path / "nope.gguf")
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        load_tokenizer(missing)


# ----------------------------------------------------------------------------- chat template


def test_chat_template_chatml(tok):
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
    ]
    body = "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
    assert tok.apply_chat_template(messages, add_generation_prompt=False) == body
    text = tok.apply_chat_template(messages)  # add_generation_prompt defaults to True
    assert text == body + "<|im_start|>assistant\n"

    ids = tok.apply_chat_template(messages, tokenize=True)
    assert ids == tok.encode(text, add_special_tokens=False)
    assert ids[0] == 1 and ids.count(2) == 2  # <|im_start|> first (no extra BOS), two <|im_end|>


def test_chat_template_default_system_and_parts(tok):
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    text = tok.apply_chat_template(parts)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert "<|im_start|>user\na\nb<|im_end|>\n<|im_start|>assistant\n" in text
    with pytest.raises(ValueError):
        tok.apply_chat_template([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}])


def test_no_chat_template_raises(tok):
    bare = Tokenizer(tok.hf, name="bare")
    bare.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        bare.apply_chat_template([{"role": "user", "content": "hi"}])
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}])  # shared HF object untouched


def test_slow_tokenizer_rejected():
    # The detokenizer steps a tokenizers.DecodeStream: only Rust-backed (fast) tokenizers work.
    class SlowTokenizer:
        name_or_path = "slow"

    with pytest.raises(ValueError, match="only fast"):
        Tokenizer(SlowTokenizer())


# ----------------------------------------------------------------------------- detokenizer


def _stream(detok: IncrementalDetokenizer, ids, chunk=1):
    deltas, stop = [], None
    for i in range(0, len(ids), chunk):
        stop = detok.update(ids[i : i + chunk])
        deltas.append(detok.get_next_delta(finished=stop is not None))
        if stop is not None:
            break
    if stop is None:
        deltas.append(detok.get_next_delta(finished=True))
    return deltas, stop


@pytest.mark.parametrize("chunk", [1, 3])
def test_incremental_multibyte(tok, chunk):
    ids = tok.encode(MULTIBYTE_TEXT, add_special_tokens=False)
    # The text really exercises split characters: some single tokens are partial UTF-8.
    assert sum("\ufffd" in tok.decode_raw([i]) for i in ids) >= 5
    detok = IncrementalDetokenizer(tok, _prompt_ids(tok))
    deltas, stop = _stream(detok, ids, chunk)
    assert stop is None
    assert "".join(deltas) == tok.decode(ids) == MULTIBYTE_TEXT
    assert detok.output_text == MULTIBYTE_TEXT
    assert not any("\ufffd" in d for d in deltas)
    assert detok.output_token_ids == ids


def test_incremental_special_tokens(tok):
    ids = tok.encode("Sure, here it is.", add_special_tokens=False) + [2]
    d1 = IncrementalDetokenizer(tok, _prompt_ids(tok))
    assert "".join(_stream(d1, ids)[0]) == "Sure, here it is." == tok.decode(ids)
    d2 = IncrementalDetokenizer(tok, _prompt_ids(tok), skip_special_tokens=False)
    assert "".join(_stream(d2, ids)[0]) == "Sure, here it is.<|im_end|>" == tok.decode(ids, False)


def test_incomplete_tail_flushed_on_finish(tok):
    ids = tok.encode("ok 🎉", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [])
    detok.update(ids[:-1])  # stop in the middle of the emoji
    assert detok.get_next_delta() == "ok"  # " " + partial emoji held back with it
    assert "\ufffd" not in detok.output_text
    assert detok.get_next_delta(finished=True) == tok.decode(ids[:-1])[2:]  # flushed as U+FFFD


MIXED_SCRIPT_PARTS = [
    MULTIBYTE_TEXT + " ",
    "def f(x):\n    return {'k': x ** 2}  # ← λ\n\t",
    "Привет, мир! مرحبا بالعالم. こんにちは世界。한국어 텍스트. ",
    "👨‍👩‍👧‍👦 🇫🇷 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ½ · ñ € 5 ",
    "Ελληνικά: αβγ. हिन्दी पाठ. ไทย ",
]


@pytest.mark.parametrize("chunk", [1, 7])
def test_incremental_equals_full_decode_long_mixed_script(tok, chunk):
    # 2,000 tokens of CJK, emoji (ZWJ sequences, flags), accents, RTL, Indic scripts and code, with
    # special tokens in between: the DecodeStream deltas add up to exactly what decode() gives.
    ids = tok.encode("".join(MIXED_SCRIPT_PARTS) * 10, add_special_tokens=False)
    ids[500:500] = [2, 1]  # <|im_end|> <|im_start|>: skipped by default
    assert len(ids) > 2000 and sum("\ufffd" in tok.decode_raw([i]) for i in ids) > 100
    assert "\ufffd" not in tok.decode(ids)
    for skip in (True, False):
        detok = IncrementalDetokenizer(tok, _prompt_ids(tok), skip_special_tokens=skip)
        deltas, stop = _stream(detok, ids, chunk)
        assert stop is None
        assert "".join(deltas) == detok.output_text == tok.decode(ids, skip_special_tokens=skip)
        assert not any("\ufffd" in d for d in deltas)
        assert detok.output_token_ids == ids


def test_prompt_cut_mid_character(tok):
    # Prompt ids ending inside a character (the emoji's first bytes): none of the prompt's text
    # leaks into the output, which reads like decode() of the output ids.
    ids = tok.encode("ok 🎉 yes", add_special_tokens=False)
    for k in range(1, len(ids)):
        detok = IncrementalDetokenizer(tok, ids[:k])
        detok.update(ids[k:])
        assert detok.get_next_delta(finished=True) == detok.output_text == tok.decode(ids[k:])


def test_garbage_bytes_are_not_held_back_forever(tok):
    # Lone UTF-8 lead bytes never complete a character: after MAX_PENDING_TOKENS they are emitted
    # (as U+FFFD, like decode) instead of growing the held-back tail for the rest of the stream.
    lead = tok.token_to_id("ð")  # GPT-2 byte-level symbol of byte 0xF0
    ids = [lead] * (MAX_PENDING_TOKENS + 4) + tok.encode(" ok", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [])
    detok.update(ids[:MAX_PENDING_TOKENS])
    assert detok.get_next_delta() == "\ufffd" * MAX_PENDING_TOKENS
    detok.update(ids[MAX_PENDING_TOKENS:])
    assert detok.get_next_delta(finished=True) == "\ufffd" * 4 + " ok"
    assert detok.output_text == tok.decode(ids)


# ----------------------------------------------------------------------------- stop strings


def test_stop_split_across_tokens(tok):
    text = "Hello world, the answer is 42. Bye."
    ids = tok.encode(text, add_special_tokens=False)
    stop = "answer is"
    assert stop not in "".join(tok.decode([i]) for i in ids if stop in tok.decode([i]))  # split
    detok = IncrementalDetokenizer(tok, _prompt_ids(tok), stop=[stop])
    deltas, matched = _stream(detok, ids)
    assert matched == stop and detok.stop_str == stop
    assert "".join(deltas) == detok.output_text == "Hello world, the "
    # Tokens after the one completing the stop string were not consumed.
    assert tok.decode(detok.output_token_ids).endswith("answer is")
    # A prefix of the stop string was never streamed out ahead of the match.
    emitted = ""
    for d in deltas:
        emitted += d
        assert "answer" not in emitted and "answ" not in emitted
    assert detok.update(tok.encode(" more")) is None  # ignored after the stop
    assert detok.output_text == "Hello world, the "


def test_stop_include_in_output(tok):
    ids = tok.encode("Hello world, the answer is 42. Bye.", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [], stop=["answer is"], include_stop_str_in_output=True)
    deltas, matched = _stream(detok, ids)
    assert matched == "answer is"
    assert "".join(deltas) == detok.output_text == "Hello world, the answer is"


@pytest.mark.parametrize("chunk", [1, 100])
def test_stop_earliest_of_several(tok, chunk):
    ids = tok.encode("one two END three STOP four", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [], stop=["STOP", "END", "never"])
    deltas, matched = _stream(detok, ids, chunk)
    assert matched == "END"
    assert "".join(deltas) == "one two "


def test_stop_multibyte(tok):
    ids = tok.encode("你好，世界！", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [], stop=["世界"])
    deltas, matched = _stream(detok, ids)
    assert matched == "世界" and "".join(deltas) == "你好，"
    assert not any("\ufffd" in d for d in deltas)


def test_stop_first_completed_wins():
    # All at once: "wor" completes before "hello world" does, as in a char-by-char stream.
    assert check_stop_strings("say hello world", 15, ["hello world", "wor"]) == ("wor", "say hello ")
    # Same end offset: the earlier-starting (longer) one.
    assert find_stop_string("abcd", ["cd", "bcd"]) == ("bcd", 1)
    # Only matches ending in the new text count.
    assert check_stop_strings("xSTOPyy", 2, ["STOP"]) is None
    assert check_stop_strings("xSTOPyy", 3, ["STOP"]) == ("STOP", "x")
    assert check_stop_strings("xSTOPyy", 3, ["STOP"], include_stop_str_in_output=True) == ("STOP", "xSTOP")


def test_stop_checker_holdback_char_stream():
    sc = StopChecker(["STOP", "EOS"])
    out = ""
    for ch in "abc STO STOP def":
        if sc.append(ch):
            out += sc.get_next_delta()
            break
        out += sc.get_next_delta()
        assert len(out) <= len("abc STO ")  # never a partial stop string ("STO" + a non-"P" is fine)
    assert sc.stop_str == "STOP" and out == sc.text == "abc STO "
    sc2 = StopChecker(["STOP"])
    sc2.append("no stop here, S")
    assert sc2.get_next_delta() == "no stop here"
    assert sc2.get_next_delta(finished=True) == ", S"
