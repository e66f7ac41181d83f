"""gateway.answers: llama-server's answer shapes into OpenAI's, streams assembled and replayed."""

from __future__ import annotations

import copy
import json
import random

import pytest
import requests

from gateway.answers import Assembler, UsageSum, choice_text, normalize_answer, normalize_event, stream_events
from gateway.testing import Harness


def token(text: str, logprob: float = -1.0, top: int = 1) -> dict:
    """One token's logprobs as llama-server sends them."""
    alternatives = [{"id": 1, "token": text, "bytes": list(text.encode()), "logprob": logprob},
                    {"id": 2, "token": "I", "bytes": [73], "logprob": -2.25}]
    return {"id": 1, "token": text, "bytes": list(text.encode()), "logprob": logprob,
            "top_logprobs": alternatives[:top]}


def test_normalize_answer_chat_adds_the_nullable_fields_openai_requires_and_keeps_timings():
    body = {"model": "models/x.gguf", "object": "chat.completion", "timings": {"cache_n": 0, "prompt_n": 3},
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "Ah"},
                         "logprobs": {"content": [token("Ah")]}},
                        {"index": 1, "finish_reason": "stop", "message": {"role": "assistant", "content": "Oh"}}]}
    normalize_answer(body, "smollm2")
    assert body["model"] == "smollm2" and body["timings"] == {"cache_n": 0, "prompt_n": 3}
    first, second = body["choices"]
    assert first["logprobs"] == {"content": [token("Ah")], "refusal": None}
    assert first["message"]["refusal"] is None
    assert second["logprobs"] is None and second["message"] == {"role": "assistant", "content": "Oh", "refusal": None}
    again = copy.deepcopy(body)
    normalize_answer(again, "smollm2")
    assert again == body


def test_normalize_answer_converts_legacy_completion_logprobs():
    body = {"model": "m", "object": "text_completion",
            "choices": [{"index": 0, "text": " the scene", "finish_reason": "length",
                         "logprobs": {"content": [token(" the", -1.5, 2), token(" scene", -3.0, 2)]}}]}
    normalize_answer(body, "smollm2")
    assert body["choices"][0]["logprobs"] == {
        "tokens": [" the", " scene"], "token_logprobs": [-1.5, -3.0],
        "top_logprobs": [{" the": -1.5, "I": -2.25}, {" scene": -3.0, "I": -2.25}],
        "text_offset": [0, 4],  # from the start of the generated text
    }
    again = copy.deepcopy(body)
    normalize_answer(again, "smollm2")
    assert again == body


def test_normalize_event_chat_and_completion_chunks():
    chat = {"model": "m", "object": "chat.completion.chunk",
            "choices": [{"index": 0, "finish_reason": None, "delta": {"content": "Ah"},
                         "logprobs": {"content": [token("Ah")]}}]}
    normalize_event(chat, "smollm2")
    assert chat["model"] == "smollm2"
    assert chat["choices"][0]["logprobs"] == {"content": [token("Ah")], "refusal": None}

    offsets: dict[int, int] = {}
    chunks = [{"object": "text_completion", "choices": [{"index": i, "text": t, "finish_reason": None,
                                                         "logprobs": {"content": [token(t)]}}]}
              for i, t in ((0, " a"), (1, " the"), (0, " time"), (1, " end"))]
    for chunk in chunks:
        normalize_event(chunk, "smollm2", offsets)
    assert [c["choices"][0]["logprobs"]["text_offset"] for c in chunks] == [[0], [0], [2], [4]]
    assert chunks[2]["choices"][0]["logprobs"]["tokens"] == [" time"]
    last = {"object": "text_completion", "choices": [{"index": 0, "text": "", "logprobs": None,
                                                     "finish_reason": "length"}]}
    normalize_event(last, "smollm2", offsets)
    assert last["choices"][0]["logprobs"] is None


def chat_chunk(index: int, delta: dict | None = None, finish: str | None = None, **extra) -> dict:
    choice = {"finish_reason": finish, "index": index, "delta": delta if delta is not None else {}}
    choice.update(extra)
    return {"choices": [choice], "created": 7, "id": "chatcmpl-1", "model": "smollm2",
            "system_fingerprint": "b0", "object": "chat.completion.chunk"}


def usage_chunk(completion: int, **extra) -> dict:
    return {"choices": [], "created": 7, "id": "chatcmpl-1", "model": "smollm2", "object": "chat.completion.chunk",
            "usage": {"completion_tokens": completion, "prompt_tokens": 31, "total_tokens": 31 + completion,
                      "prompt_tokens_details": {"cached_tokens": 30}}, **extra}


def test_assembler_builds_a_llama_server_stream_with_two_choices_logprobs_and_usage_per_choice():
    chunks = [
        chat_chunk(1, {"role": "assistant", "content": None}),
        chat_chunk(1, {"content": "Hello"}, logprobs={"content": [token("Hello")]}),
        chat_chunk(0, {"role": "assistant", "content": None}),
        chat_chunk(0, {"content": "Hi"}, logprobs={"content": [token("Hi")]}),
        chat_chunk(1, {"content": "!"}, logprobs={"content": [token("!")]}),
        chat_chunk(1, finish="length"),
        usage_chunk(2, timings={"predicted_n": 2, "cache_n": 30}),
        chat_chunk(0, {"content": " there"}, logprobs={"content": [token(" there")]}),
        chat_chunk(0, finish="length"),
        usage_chunk(2, timings={"predicted_n": 2, "cache_n": 31}),
    ]
    assembler = Assembler()
    for chunk in chunks:
        assembler.add(chunk)
    answer = assembler.answer()
    assert answer == {
        "id": "chatcmpl-1", "created": 7, "model": "smollm2", "system_fingerprint": "b0", "object": "chat.completion",
        "choices": [
            {"index": 0, "finish_reason": "length", "logprobs": {"content": [token("Hi"), token(" there")]},
             "message": {"role": "assistant", "content": "Hi there", "refusal": None}},
            {"index": 1, "finish_reason": "length", "logprobs": {"content": [token("Hello"), token("!")]},
             "message": {"role": "assistant", "content": "Hello!", "refusal": None}},
        ],
        "usage": {"prompt_tokens": 31, "completion_tokens": 4, "total_tokens": 35,
                  "prompt_tokens_details": {"cached_tokens": 30}},
        "timings": {"predicted_n": 2, "cache_n": 31},
    }
    # the chunks were not changed
    assert chunks[1]["choices"][0]["logprobs"] == {"content": [token("Hello")]}
    assert chunks[6]["usage"]["completion_tokens"] == 2


def test_assembler_builds_tool_calls_from_their_deltas():
    chunks = [
        chat_chunk(0, {"role": "assistant", "content": None}),
        chat_chunk(0, {"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                       "function": {"name": "get_weather", "arguments": ""}}]}),
        chat_chunk(0, {"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]}),
        chat_chunk(0, {"tool_calls": [{"index": 1, "id": "call_2", "type": "function",
                                       "function": {"name": "get_time", "arguments": "{}"}}]}),
        chat_chunk(0, {"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}),
        chat_chunk(0, finish="tool_calls"),
    ]
    assembler = Assembler()
    for chunk in chunks:
        assembler.add(chunk)
    message = assembler.answer()["choices"][0]["message"]
    assert message == {"role": "assistant", "content": None, "refusal": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
        {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
    ]}


@pytest.mark.parametrize("bad", [
    chat_chunk(0, {"audio": {"id": "a1"}}),                         # a delta field it does not know
    chat_chunk(0, {"function_call": {"name": "f"}}),
    chat_chunk(0, {"content": "x"}, annotations=[]),                # a choice field it does not know
    chat_chunk(0, {"tool_calls": [{"function": {"arguments": "{}"}}]}),  # a tool call without index
    chat_chunk(0, {"tool_calls": [{"index": 0, "type": "function", "function": {"arguments": "{}"}}]}),  # no name
    chat_chunk(0, {"content": 42}),
    chat_chunk(0, {"content": "x"}, logprobs={"content": "not a list"}),
])
def test_assembler_refuses_what_it_does_not_understand(bad):
    assembler = Assembler()
    for chunk in (chat_chunk(0, {"role": "assistant", "content": "ok"}), bad, chat_chunk(0, finish="stop")):
        assembler.add(chunk)
    assert assembler.answer() is None


def test_assembler_refuses_an_unfinished_choice():
    assembler = Assembler()
    for chunk in (chat_chunk(0, {"content": "a"}), chat_chunk(1, {"content": "b"}), chat_chunk(0, finish="stop")):
        assembler.add(chunk)
    assert assembler.answer() is None
    assembler.add(chat_chunk(1, finish="stop"))
    assert [c["message"]["content"] for c in assembler.answer()["choices"]] == ["a", "b"]
    assert Assembler().answer() is None


def test_assembler_concatenates_legacy_completion_chunks_of_either_shape():
    raw = Assembler()
    for text in (" a", " time"):
        raw.add({"object": "text_completion", "id": "c", "choices": [
            {"index": 0, "text": text, "logprobs": {"content": [token(text)]}, "finish_reason": None}]})
    raw.add({"object": "text_completion", "id": "c", "usage": {"prompt_tokens": 2, "completion_tokens": 2,
                                                                "total_tokens": 4},
             "choices": [{"index": 0, "text": "", "logprobs": None, "finish_reason": "length"}]})
    answer = raw.answer()
    assert answer["choices"][0]["text"] == " a time"
    assert answer["choices"][0]["logprobs"] == {"content": [token(" a"), token(" time")]}
    assert answer["usage"]["total_tokens"] == 4
    normalize_answer(answer, "smollm2")
    assert answer["choices"][0]["logprobs"]["text_offset"] == [0, 2]


def test_usage_sums_every_choices_completion_and_each_prompt_once():
    one = {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13,
           "prompt_tokens_details": {"cached_tokens": 9}}
    chat = UsageSum()  # chat: a usage chunk per choice, without an index, of the one prompt
    chat.add(one, {"choices": []})
    total = chat.add(dict(one, completion_tokens=5, total_tokens=15), {"choices": []})
    assert total == {"prompt_tokens": 10, "completion_tokens": 8, "total_tokens": 18,
                     "prompt_tokens_details": {"cached_tokens": 9}}
    assert one["completion_tokens"] == 3
    # a prompt list of two, n=2: choices 0 and 1 answer prompt 0, choices 2 and 3 prompt 1
    listed = UsageSum(per_prompt=2)
    for index, prompt in ((1, 10), (0, 10), (3, 4), (2, 4)):
        total = listed.add(dict(one, prompt_tokens=prompt), {"choices": [{"index": index, "text": ""}]})
    assert total == {"prompt_tokens": 14, "completion_tokens": 12, "total_tokens": 26,
                     "prompt_tokens_details": {"cached_tokens": 18}}


def random_logprobs(rng: random.Random) -> list:
    return [token(rng.choice(["a", " b", "é", ""]), -rng.random() * 5, rng.randint(0, 2))
            for _ in range(rng.randint(0, 3))]


def random_answer(rng: random.Random) -> dict:
    chat = rng.random() < 0.7
    choices = []
    for index in range(rng.randint(1, 3)):
        choice: dict = {"index": index, "finish_reason": rng.choice(["stop", "length", "tool_calls"])}
        if chat:
            message: dict = {"role": "assistant", "content": rng.choice([None, "", "Hello", "Bonjour à tous"]),
                             "refusal": rng.choice([None, None, "I can't help with that."])}
            if rng.random() < 0.5:
                message["tool_calls"] = [
                    {"id": f"call_{index}_{k}", "type": "function",
                     "function": {"name": rng.choice(["get_weather", "f"]),
                                  "arguments": rng.choice(["{}", '{"city":"Paris"}', ""])}}
                    for k in range(rng.randint(1, 3))]
            if rng.random() < 0.2:
                message["reasoning_content"] = "Let me think."
            choice["message"] = message
            choice["logprobs"] = rng.choice([
                None,
                {"content": random_logprobs(rng), "refusal": None},
                {"content": None, "refusal": random_logprobs(rng)},
                {"content": random_logprobs(rng), "refusal": random_logprobs(rng)},
            ])
        else:
            choice["text"] = rng.choice(["", " once", " upon a time"])
            choice["logprobs"] = rng.choice([None, {"tokens": [" upon", " a"], "token_logprobs": [-1.0, -0.5],
                                                    "top_logprobs": [{" upon": -1.0}, {" a": -0.5}],
                                                    "text_offset": [0, 5]}])
        choices.append(choice)
    answer = {"id": "chatcmpl-x", "created": 1700000000, "model": "smollm2", "system_fingerprint": "b0",
              "object": "chat.completion" if chat else "text_completion", "choices": choices,
              "usage": {"prompt_tokens": 7, "completion_tokens": 9, "total_tokens": 16}}
    if rng.random() < 0.5:
        answer["usage"]["prompt_tokens_details"] = {"cached_tokens": 3}
    if rng.random() < 0.5:
        answer["timings"] = {"cache_n": 3, "prompt_n": 4, "predicted_n": 9}
    return answer


def test_stream_events_then_assembler_round_trips():
    rng = random.Random(20240601)
    for case in range(300):  # several choices, tool calls, logprobs, refusal, usage, timings
        answer = random_answer(rng)
        original = copy.deepcopy(answer)
        for with_usage in (True, False):
            events = json.loads(json.dumps(stream_events(answer, with_usage)))  # as a client decodes them
            assembler = Assembler()
            for event in events:
                assembler.add(event)
            expected = dict(original) if with_usage else {k: v for k, v in original.items() if k != "usage"}
            assert assembler.answer() == expected, f"case {case}, with_usage={with_usage}: {original}"
        assert answer == original, f"case {case}: stream_events changed the answer"


def test_stream_events_sends_tool_calls_as_deltas_with_index():
    answer = {"id": "c", "object": "chat.completion", "created": 1, "model": "m", "choices": [
        {"index": 0, "finish_reason": "tool_calls", "logprobs": None,
         "message": {"role": "assistant", "content": None, "refusal": None, "tool_calls": [
             {"id": "call_0", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}}]}
    first, last = stream_events(answer, with_usage=False)
    assert first["object"] == "chat.completion.chunk"
    assert first["choices"][0]["delta"]["tool_calls"] == [
        {"index": 0, "id": "call_0", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    assert last["choices"][0]["finish_reason"] == "tool_calls" and last["choices"][0]["delta"] == {}


def test_choice_text():
    assert choice_text({"message": {"content": "a"}}) == "a"
    assert choice_text({"delta": {"content": "b"}}) == "b"
    assert choice_text({"delta": {}}) == ""
    assert choice_text({"text": "c"}) == "c"
    assert choice_text({"message": {"content": None, "tool_calls": []}}) == ""
    assert choice_text({}) == ""


def test_canned_backend_streams_like_llama_server_with_two_choices_and_timings(canned_url):
    body = {"messages": [{"role": "user", "content": "Hi"}], "stream": True, "n": 2, "timings_per_token": True,
            "logprobs": True, "top_logprobs": 2, "stream_options": {"include_usage": True}}
    raw = requests.post(canned_url + "/v1/chat/completions", json=body, timeout=5).content
    events = [json.loads(line[6:]) for line in raw.split(b"\n\n") if line.startswith(b"data: {")]
    usage_chunks = [e for e in events if e.get("usage")]
    assert [u["usage"]["completion_tokens"] for u in usage_chunks] == [5, 5]  # one per choice
    assert all("timings" in e for e in events)
    assert [e["timings"]["predicted_n"] for e in events if e["choices"] and e["choices"][0]["index"] == 0][:3] \
        == [1, 2, 3]
    assembler = Assembler()
    for event in events:
        assembler.add(event)
    answer = assembler.answer()
    assert [c["message"]["content"] for c in answer["choices"]] == ["Hello from the canned backend"] * 2
    assert answer["usage"] == {"prompt_tokens": 5, "completion_tokens": 10, "total_tokens": 15}
    assert answer["timings"] == {"prompt_n": 5, "cache_n": 0, "predicted_n": 5}
    tokens = answer["choices"][1]["logprobs"]["content"]
    assert "".join(t["token"] for t in tokens) == "Hello from the canned backend"
    assert [len(t["top_logprobs"]) for t in tokens] == [2] * 5


def test_the_relay_merges_usage_chunks_and_keeps_timings_to_itself():
    """llama-server sends one usage chunk per choice; OpenAI clients expect one, counting
    every choice. The per-chunk timings the gateway asks for are not the client's."""
    with Harness([]) as harness:
        result = harness.chat("Hi", stream=True, n=2, logprobs=True, top_logprobs=2,
                              stream_options={"include_usage": True})
    usage_chunks = [e for e in result.events if e.get("usage")]
    assert len(usage_chunks) == 1 and result.events[-1] is usage_chunks[0]
    assert usage_chunks[0]["usage"] == {"prompt_tokens": 5, "completion_tokens": 10, "total_tokens": 15}
    assert result.ctx.usage["completion_tokens"] == 10
    assert not any("timings" in e for e in result.events if e["choices"])
    assert result.events[0]["choices"][0]["logprobs"]["refusal"] is None  # the relay normalized the events

def test_canned_backend_tool_calls_streamed_and_not():
    calls = [{"name": "get_weather", "arguments": '{"city":"Paris"}'}]
    with Harness([]) as harness:
        whole = harness.chat("Weather?", canned={"tool_calls": calls})
        streamed = harness.chat("Weather?", stream=True, canned={"tool_calls": calls})
    message = whole.json["choices"][0]["message"]
    assert whole.json["choices"][0]["finish_reason"] == "tool_calls" and message["content"] is None
    fragments = [e["choices"][0]["delta"]["tool_calls"][0] for e in streamed.events
                 if e["choices"] and "tool_calls" in e["choices"][0]["delta"]]
    assert len(fragments) >= 3 and all("index" in f for f in fragments)
    assembler = Assembler()
    for event in streamed.events:
        assembler.add(event)
    assert assembler.answer()["choices"][0]["message"] == message


def test_completion_usage_on_each_choices_last_chunk_is_merged_into_one_usage_chunk():
    """llama-server's legacy completions put each choice's usage on its last chunk."""
    base = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m"}

    def chunk(index, text, finish=None, completion=None):
        event = dict(base, choices=[{"index": index, "text": text, "logprobs": None, "finish_reason": finish}])
        if completion is not None:
            event["usage"] = {"prompt_tokens": 3, "completion_tokens": completion, "total_tokens": 3 + completion}
        return event

    events = [chunk(1, "a"), chunk(0, "b"), chunk(1, "", "length", 2), chunk(0, "c"), chunk(0, "", "length", 4)]
    with Harness([]) as harness:
        for wants_usage in (True, False):
            harness.backend.script({"events": events})
            options = {"stream_options": {"include_usage": True}} if wants_usage else {}
            result = harness.request("POST", "/v1/completions", json={
                "model": harness.model, "prompt": "x", "stream": True, "n": 2, **options})
            assert result.ctx.usage == {"prompt_tokens": 3, "completion_tokens": 6, "total_tokens": 9}
            with_usage = [e for e in result.events if e.get("usage")]
            assert with_usage == ([dict(base, model=harness.model, choices=[], usage=result.ctx.usage)]
                                  if wants_usage else [])


@pytest.mark.parametrize("raw, expected", [
    (b'data: {"choices":[],"model":"m.gguf","timings":{"predicted_n":3}}', b'data: {"choices":[],"model":"pub"}'),
    (b'data: {"model":"a\\"b","choices":[]}', b'data: {"model":"pub","choices":[]}'),  # an escaped quote
    (b'data: {"model": "spaced","timings":{"a":1},"x":2}', b'data: {"model":"pub","x":2}'),  # not compact
    (b'data: {"choices":[{"delta":{"content":"\\"model\\":\\"x\\""}}],"model":"m"}',
     b'data: {"choices":[{"delta":{"content":"\\"model\\":\\"x\\""}}],"model":"pub"}'),  # look-alikes in text
])
def test_the_relay_rewrites_events_without_decoding_them(raw, expected):
    from gateway.web.streaming import model_field, rewrite_event

    assert rewrite_event(raw, model_field("pub")) == expected
    assert json.loads(rewrite_event(raw, model_field("pub"))[6:])["model"] == "pub"


def test_streams_give_their_backend_connection_back_to_the_pool():
    """The relay stopped reading at [DONE], so the chunked body's last chunk was never
    read and every stream closed its connection: the next paid a connect (and a name
    lookup in gevent's threadpool), a third of a stream's CPU."""
    with Harness([]) as harness:
        server = harness.backend._server
        accepted = []
        accept = server.get_request
        server.get_request = lambda: (accepted.append(1), accept())[1]
        for stream in (True, False, True, True, False):
            assert harness.chat("Hi", stream=stream).status == 200
        assert len(accepted) == 1


@pytest.mark.parametrize("body, usage", [
    ({"n": 3}, {"prompt_tokens": 4, "completion_tokens": 30, "total_tokens": 34}),  # one prompt, three choices
    ({"n": 1, "n_cmpl": 3}, {"prompt_tokens": 4, "completion_tokens": 30, "total_tokens": 34}),  # n_cmpl wins
    ({"prompt": ["a", "b", "c"]}, {"prompt_tokens": 12, "completion_tokens": 30, "total_tokens": 42}),  # 3 prompts
])
def test_the_tally_counts_every_choice_of_an_answer_cut_short(body, usage):
    from gateway.answers import Tally, choices_asked

    tally = Tally(*choices_asked(body))
    for step in range(1, 11):
        for index in range(3):
            tally.see(b'data: {"choices":[{"index":%d,"delta":{}}],"timings":{"cache_n":1,"prompt_n":3,'
                      b'"predicted_n":%d}}' % (index, step))
    assert tally.usage() == usage


@pytest.mark.parametrize("answer, usage", [
    ({"usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}}, (3, 4)),
    ({"type": "message", "usage": {"input_tokens": 1, "cache_read_input_tokens": 30, "output_tokens": 8}}, (31, 8)),
    ({"type": "message_start", "message": {"usage": {"input_tokens": 31, "output_tokens": 0}}}, (31, 0)),
    ({"type": "message_delta", "usage": {"output_tokens": 9}}, (0, 9)),
    ({"type": "response.completed", "response": {"usage": {"input_tokens": 5, "output_tokens": 6}}}, (5, 6)),
    ({"content": "x", "tokens_evaluated": 12, "tokens_predicted": 4}, (12, 4)),
    ({"usage": {"input_tokens": -3, "output_tokens": "many"}}, (0, 0)),
    ({"tokens": [1, 2]}, None), ([1], None), (None, None),
])
def test_usage_is_read_from_every_shape_llama_server_answers_in(answer, usage):
    from gateway.answers import usage_of

    found = usage_of(answer)
    assert (found and (found["prompt_tokens"], found["completion_tokens"])) == usage or found is usage is None
    if found:
        assert found["total_tokens"] == found["prompt_tokens"] + found["completion_tokens"]


def test_a_stream_in_another_shape_is_counted_by_its_usage_else_by_its_events():
    from gateway.answers import EventCount

    start = b'event: message_start\ndata: {"type":"message_start","message":{"usage":{"input_tokens":31,"output_tokens":0}}}'
    delta = b'event: content_block_delta\ndata: {"type":"content_block_delta","delta":{"text":"a"}}'
    left = EventCount()
    for raw in [start] + [delta] * 5:
        left.see(raw)
    assert left.usage() == {"prompt_tokens": 31, "completion_tokens": 6, "total_tokens": 37}  # an event a token
    whole = EventCount()
    for raw in [start] + [delta] * 5 + [b'event: message_delta\ndata: {"usage":{"output_tokens":5}}']:
        whole.see(raw)
    assert whole.usage() == {"prompt_tokens": 31, "completion_tokens": 5, "total_tokens": 36}  # as reported
    assert EventCount().usage() is None


@pytest.mark.parametrize("body, answers", [
    ({}, (1, 1)),
    ({"prompt": "Hi", "n": 3}, (3, 1)),
    ({"prompt": ["a", "b", "c"]}, (3, 3)),
    ({"prompt": [[1, 2], "b"], "n": 2}, (4, 2)),                 # token lists are prompts
    ({"prompt": [{"prompt_string": "a", "multimodal_data": []}, "b"]}, (2, 2)),
    ({"prompt": [1, 2, 3], "n_cmpl": 2, "n": 5}, (2, 1)),          # token ids: one prompt; n_cmpl wins
    ({"prompt": ["a", 1, "b"]}, (1, 1)),                          # mixed tokens and strings: one prompt
    ({"prompt": ["a", "b"], "n": 2.0}, (4, 2)),
    ({"prompt": [], "n": "2"}, (1, 1)),
])
def test_the_answers_a_request_makes_are_counted_as_llama_server_makes_them(body, answers):
    from gateway.answers import choices_asked

    assert choices_asked(body) == answers


def test_one_budget_covers_every_answer_and_the_prompts_bytes():
    from gateway.answers import completion_bound, token_bound

    body = {"prompt": ["a", "b", "c"], "n": 2, "n_predict": 10, "max_tokens": 99}
    assert completion_bound("/completion", body) == 60                     # n_predict x 3 prompts x n
    assert completion_bound("/v1/chat/completions", {"n": 3, "max_tokens": 7}) == 21
    assert completion_bound("/v1/chat/completions", {"n": 3}) is None       # no budget named
    assert completion_bound("/v1/chat/completions", {"n": 3}, unbudgeted=5) == 15
    assert completion_bound("/v1/embeddings", {"input": ["a", "b"]}, unbudgeted=5) == 0  # nothing generated
    assert completion_bound("/v1/rerank", {"documents": ["a"]}) == 0
    assert token_bound("/completion", body, 300, unbudgeted=64) == 360      # a token per byte, plus the answers
    assert token_bound("/embedding", {"content": ["a"]}, 40, unbudgeted=64) == 40


def test_a_list_answer_and_a_streamed_one_are_summed_per_choice():
    from gateway.answers import EventCount, usage_of

    answers = [{"index": i, "tokens_evaluated": e, "tokens_predicted": 8} for i, e in enumerate((3, 3, 5, 5))]
    assert usage_of(answers, per_prompt=2) == {"prompt_tokens": 8, "completion_tokens": 32, "total_tokens": 40}
    assert usage_of(answers[:2] + [{"index": 2}]) == {"prompt_tokens": 6, "completion_tokens": 16, "total_tokens": 22}
    assert usage_of([{"index": 0, "embedding": [0.1]}]) is None  # /embedding tells no tokens
    count = EventCount(4, 2)  # 2 prompts x n=2, streamed: each choice's counts grow apart
    for step in range(1, 9):
        for index, evaluated in enumerate((3, 3, 5, 5)):
            count.see(b'data: {"index":%d,"content":"x","tokens_predicted":%d,"tokens_evaluated":%d}'
                      % (index, step, evaluated))
    assert count.usage() == {"prompt_tokens": 8, "completion_tokens": 32, "total_tokens": 40}
