"""The server's request parsing and image rules without a server (runtime/server/protocol.py, images.py)."""
from __future__ import annotations

import base64

import pytest
from phi3v_edge.runtime.chat_template import build_prompt
from phi3v_edge.runtime.server import images as I
from phi3v_edge.runtime.server import protocol as P

LIMITS = P.Limits(model_name="m", max_batch=4, max_length=1024, max_images=2)
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 16


def parse(**body):
    return P.parse_chat_request({"messages": [{"role": "user", "content": "hi"}], **body}, LIMITS)


def test_defaults_follow_openai_and_greedy_drops_the_sampling_filters():
    kw = parse().submit_kwargs  # temperature defaults to 1.0: sampling, as OpenAI does
    assert (kw["do_sample"], kw["temperature"], kw["max_new_tokens"], kw["n"], kw["logprobs"]) == (True, 1.0, None, 1,
                                                                                                   None)
    kw = parse(temperature=0, top_p=0.5, top_k=3, seed=7).submit_kwargs
    assert (kw["do_sample"], kw["top_p"], kw["top_k"], kw["seed"]) == (False, 1.0, 0, 7)
    kw = parse(temperature=0.7, top_p=0.5, top_k=3, repetition_penalty=1.1).submit_kwargs
    assert (kw["do_sample"], kw["temperature"], kw["top_p"], kw["top_k"], kw["repetition_penalty"]) == \
        (True, 0.7, 0.5, 3, 1.1)
    assert parse(max_tokens=9, max_completion_tokens=5).submit_kwargs["max_new_tokens"] == 5
    assert parse(logprobs=True).submit_kwargs["logprobs"] == 0
    assert parse(logprobs=True, top_logprobs=5).submit_kwargs["logprobs"] == 5
    assert parse(ignore_eos=True).submit_kwargs["stop_ids"] == ()
    assert "stop_ids" not in parse().submit_kwargs
    assert parse(stop="x").submit_kwargs["stop"] == ["x"]
    assert parse(frequency_penalty=0, presence_penalty=0.0, tools=[], user="u").n == 1  # no-ops are fine


@pytest.mark.parametrize("body,param", [
    ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": True}, "max_tokens"), ({"top_p": 0}, "top_p"),
    ({"temperature": "1"}, "temperature"), ({"n": 0}, "n"), ({"seed": 1.5}, "seed"), ({"seed": -1}, "seed"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"), ({"stop": [""]}, "stop"), ({"stop": 3}, "stop"),
    ({"stream_options": {"include_usage": True}}, "stream_options"), ({"num_crops": 17}, "num_crops"),
    ({"presence_penalty": 1.0}, "presence_penalty"), ({"logit_bias": {"1": 5}}, "logit_bias"),
    ({"response_format": {"type": "json_object"}}, "response_format"), ({"model": 3}, "model"),
])
def test_bad_fields_name_the_field(body, param):
    with pytest.raises(P.APIError) as e:
        parse(**body)
    assert (e.value.status, e.value.param) == (400, param)
    assert set(e.value.body()["error"]) == {"message", "type", "param", "code"}


def test_unknown_model_is_404():
    with pytest.raises(P.APIError) as e:
        parse(model="other")
    assert e.value.status == 404 and e.value.code == "model_not_found"
    assert parse(model="m").model == "m"


def test_messages_map_onto_the_chat_template():
    url = "data:image/png;base64," + base64.b64encode(PNG).decode()
    req = P.parse_chat_request({"messages": [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": url}},
                                     {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": None},
    ]}, LIMITS)
    assert [m["role"] for m in req.messages] == ["system", "user", "assistant"]
    assert req.messages[1]["content"] == "a\nb" and len(req.images) == 1
    assert req.images[0].param == "messages[1].content[1].image_url"
    req.messages[1]["images"] = ["IMG"]
    prompt, imgs = build_prompt(req.messages)
    assert prompt.startswith("<|system|>\nbe brief<|end|>\n<|user|>\n<|image_1|>\na\nb<|end|>\n") and imgs == ["IMG"]


@pytest.mark.parametrize("messages,param", [
    ([], "messages"), ("hi", "messages"), ([{"content": "x"}], "messages[0].role"),
    ([{"role": "tool", "content": "x"}], "messages[0].role"),
    ([{"role": "user"}], "messages[0].content"),
    ([{"role": "user", "content": "look <|image_1|>"}], "messages[0].content"),
    ([{"role": "user", "content": [{"type": "text", "text": 5}]}], "messages[0].content[0].text"),
    ([{"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}],
     "messages[0].content[0]"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "messages[0].content[0].image_url"),
])
def test_bad_messages(messages, param):
    with pytest.raises(P.APIError) as e:
        P.parse_chat_request({"messages": messages}, LIMITS)
    assert (e.value.status, e.value.param) == (400, param)


def test_image_count_limit():
    part = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    with pytest.raises(P.APIError) as e:
        P.parse_chat_request({"messages": [{"role": "user", "content": [part, part, part]}]}, LIMITS)
    assert e.value.code == "too_many_images"


def ref(url):
    return P.ImageRef(url, "p")


def test_data_urls_are_checked_by_their_bytes():
    ok = "data:image/jpeg;base64," + base64.b64encode(PNG).decode()  # the label may be wrong; the bytes decide
    assert I.resolve_image(ref(ok), allow_urls=False, max_bytes=100, timeout=1) == PNG
    wrapped = "data:image/png;base64," + "\n".join(base64.b64encode(PNG).decode())  # whitespace is dropped
    assert I.decode_data_url(ref(wrapped), 100) == PNG
    assert I.image_format(b"GIF89a...") == "gif" and I.image_format(b"RIFF\0\0\0\0WEBPVP8 ") == "webp"
    cases = {
        "data:text/plain;base64," + base64.b64encode(PNG).decode(): "invalid_image_url",
        "data:image/png," + "x": "invalid_image_url",
        "data:image/png;base64,%%%": "invalid_image_url",
        "data:image/png;base64," + base64.b64encode(b"BM" + b"\0" * 30).decode(): "invalid_image",  # BMP: no
        "data:image/png;base64," + base64.b64encode(PNG * 10).decode(): "image_too_large",
        "http://127.0.0.1:9/x.png": "image_urls_disabled",
        "file:///etc/passwd": "invalid_image_url",
        "/etc/passwd": "invalid_image_url",
    }
    for url, code in cases.items():
        with pytest.raises(P.APIError) as e:
            I.resolve_image(ref(url), allow_urls=False, max_bytes=100, timeout=1)
        assert (e.value.status, e.value.code) == (400, code), url


def test_unreachable_url_is_a_400_not_a_hang():
    with pytest.raises(P.APIError) as e:  # port 9 (discard) on loopback: nothing listens there
        I.resolve_image(ref("http://127.0.0.1:9/x.png"), allow_urls=True, max_bytes=100, timeout=2)
    assert e.value.code == "image_fetch_failed"


def test_logprob_token_text():
    class Tok:
        def id_to_token(self, i):
            return {1: "\u2581blue", 2: "<0x0A>", 3: "ab"}[i]

    assert P.token_text(Tok(), 1) == (" blue", list(b" blue"))
    assert P.token_text(Tok(), 2) == ("\n", [10])
    assert P.token_text(Tok(), 3) == ("ab", [97, 98])
