"""The server's pure parts without a server: request checking (host/serve_api.py), stop sequences and
streamed text (host/completion_text.py), server-sent event framing."""

from __future__ import annotations

import json

import pytest

from conftest import KJV_TOKENIZER
from gpt_fpga.host.completion_text import CompletionText, StopScanner
from gpt_fpga.host.generate import Sampling
from gpt_fpga.host.serve_api import (ApiError, ModelFacts, parse_completion_request, parse_json_object, sse_event)
from gpt_fpga.quantize.tokenizer import TextCodec

CODEC = TextCodec(KJV_TOKENIZER)
FACTS = ModelFacts("m", vocab_size=4096, n_ctx=32, encode=CODEC.encode)


def parse(**fields):
    return parse_completion_request({"prompt": "And God said", **fields}, FACTS)


def refused(status=400, **fields) -> ApiError:
    with pytest.raises(ApiError) as info:
        parse(**fields)
    assert info.value.status == status, info.value.message
    return info.value


# ---- request checking ------------------------------------------------------------------------------
def test_defaults_are_openais():
    r = parse()
    assert r.prompt_ids == CODEC.encode("And God said")
    assert r.max_tokens == 16 and not r.stream and r.stop == []
    assert r.sampling == Sampling(temperature=1.0, top_k=None, top_p=1.0, seed=None) and not r.sampling.greedy


def test_fields_reach_the_sampling():
    r = parse(temperature=0, top_p=0.5, top_k=7, seed=3, max_tokens=5, stop="\n", stream=True,
              stream_options={"include_usage": True}, user="me", n=1, echo=False, presence_penalty=0)
    assert r.sampling == Sampling(0.0, 7, 0.5, 3) and r.sampling.greedy
    assert (r.max_tokens, r.stop, r.stream, r.include_usage) == (5, ["\n"], True, True)


def test_context_limit_counts_the_prompts_tokens():
    n = len(CODEC.encode("And God said"))
    assert parse(max_tokens=32 - n).max_tokens == 32 - n
    e = refused(max_tokens=33 - n)
    assert e.param == "max_tokens" and e.code == "context_length_exceeded" and "context of 32" in e.message


@pytest.mark.parametrize("fields,param", [
    (dict(max_tokens=True), "max_tokens"), (dict(max_tokens="4"), "max_tokens"),
    (dict(temperature="hot"), "temperature"), (dict(temperature=2.01), "temperature"),
    (dict(temperature=float("inf")), "temperature"), (dict(top_p=1.5), "top_p"), (dict(top_p=-0.1), "top_p"),
    (dict(top_k=0), "top_k"), (dict(top_k=4097), "top_k"), (dict(top_k=2.0), "top_k"), (dict(seed=1.5), "seed"),
    (dict(seed=2 ** 63), "seed"), (dict(stop=""), "stop"), (dict(stop=[1]), "stop"), (dict(stream="yes"), "stream"),
    (dict(stream_options={"include_usage": True}), "stream_options"),
    (dict(stream=True, stream_options={"x": 1}), "stream_options"),
    (dict(n=True), "n"), (dict(echo=True), "echo"), (dict(best_of=3), "best_of"), (dict(suffix="end"), "suffix"),
    (dict(frequency_penalty=0.5), "frequency_penalty"), (dict(logit_bias={"5": 1}), "logit_bias"),
    (dict(user=5), "user"), (dict(prompt=[1, True]), "prompt"), (dict(prompt=None), "prompt"),
    (dict(prompt=[[1, 2]]), "prompt"), (dict(whatever=1), "whatever"),
])
def test_each_bad_field_is_named(fields, param):
    e = refused(**fields)
    assert e.param == param
    body = e.body()["error"]
    assert body["type"] == "invalid_request_error" and body["param"] == param and f"'{param}'" in body["message"]


def test_unknown_model_is_404():
    assert "not served here" in refused(404, model="other").message
    assert parse(model="m").max_tokens == 16


def test_token_id_prompts_need_no_tokenizer():
    facts = ModelFacts("m", 64, 32, encode=None)
    assert parse_completion_request({"prompt": [0, 63]}, facts).prompt_ids == [0, 63]
    with pytest.raises(ApiError, match="no tokenizer"):
        parse_completion_request({"prompt": "text"}, facts)
    with pytest.raises(ApiError, match="token id 64 is out of range"):
        parse_completion_request({"prompt": [64]}, facts)


@pytest.mark.parametrize("raw,needle", [(b"{", "not valid JSON"), (b'"text"', "got str"), (b"", "not valid JSON"),
                                        (b"\xc3\x28", "not valid JSON")])
def test_parse_json_object(raw, needle):
    with pytest.raises(ApiError, match=needle):
        parse_json_object(raw)
    assert parse_json_object(b'{"a": 1}') == {"a": 1}


def test_sse_event_framing():
    assert sse_event("[DONE]") == b"data: [DONE]\n\n"
    event = sse_event({"text": "two\nlines"})
    assert event.startswith(b"data: ") and event.endswith(b"\n\n") and event.count(b"\n") == 2
    assert json.loads(event[6:]) == {"text": "two\nlines"}


# ---- stop sequences ---------------------------------------------------------------------------------
def scan(stops, pieces) -> tuple[list[str], bool]:
    s = StopScanner(stops)
    out = [s.push(p) for p in pieces]
    out.append(s.flush())
    return out, s.stopped


def test_stop_split_across_pieces_never_shows():
    out, stopped = scan(["END"], ["abc E", "N", "D tail"])
    assert out == ["abc ", "", "", ""] and stopped


def test_held_back_text_that_was_no_stop_comes_out():
    out, stopped = scan(["END"], ["abc E", "N", "x"])
    assert "".join(out) == "abc ENx" and out[:2] == ["abc ", ""] and not stopped
    out, stopped = scan(["END"], ["abc EN"])
    assert out == ["abc ", "EN"] and not stopped  # the end of generation releases the held-back tail


def test_earliest_of_several_stops_wins():
    out, stopped = scan(["world", "lo"], ["hello world"])
    assert "".join(out) == "hel" and stopped


def test_no_stops_passes_everything():
    out, stopped = scan([], ["a", "b\n"])
    assert out == ["a", "b\n", ""] and not stopped


# ---- completion text --------------------------------------------------------------------------------
def test_completion_text_matches_decode_and_drops_eos():
    prompt = CODEC.encode("And God said")
    ids = CODEC.encode(" unto Moses, Go") + [0] + CODEC.encode(" never")
    text = CompletionText(CODEC, prompt, [], eos=0)
    out = "".join(text.push(t) for t in ids) + text.finish()
    assert out == " unto Moses, Go" and text.stopped


def test_completion_text_multibyte_characters_arrive_whole():
    ids = CODEC.encode(" “Selah” ä")
    text = CompletionText(CODEC, CODEC.encode("x"), [], eos=None)
    pieces = [text.push(t) for t in ids] + [text.finish()]
    assert "".join(pieces) == " “Selah” ä" and not any("\ufffd" in p for p in pieces)


def test_completion_text_without_tokenizer_gives_ids():
    text = CompletionText(None, [1, 2], ["9 "], eos=None)
    assert [text.push(t) for t in (5, 17, 9, 4)] == ["5 ", "17 ", "", ""] and text.stopped
