"""A tool-using exchange, stored as the chat path stores it (`storage.turns`), is rated over
real HTTP and compiled into a pair whose prompt and answers carry the tools, the calls and the
results as text the trainer renders with the base model's template; the trainer tokenizes it.

The embedded engine refuses tools (test_openai_compat.py) and the tiny vLLM-CPU model rarely
calls one by itself, so the exchange is written here with the same functions the chat path
calls; test_engine_vllm.py stores real ones."""

from __future__ import annotations

import json

from sqlmodel import select

from service.core.identity import Principal, Role
from service.storage import turns
from service.storage.tables import Message, PreferencePair
from tests.conftest import BOTH_DATABASES
from tests.service.conftest import Live

pytestmark = BOTH_DATABASES

TOOLS = {
    "tools": [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ],
    "tool_choice": "auto",
}
CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
}
PROMPT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Is it warm in Paris today?"},
    {"role": "assistant", "content": "", "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
]


def store_exchange(live: Live) -> tuple[str, list[str]]:
    """A completion with two answers: a (second) tool call, and text."""
    caller = Principal(key_id=None, name="dev", role=Role.admin, tenant="default")
    again = {**CALL, "id": "call_2", "function": {"name": "get_weather", "arguments": "{}"}}
    with live.session() as s:
        turn = turns.start_completion(
            s, caller=caller, user_id="alice", conversation_id=None, parent_id=None,
            messages=PROMPT,
            spec=turns.CompletionSpec(
                "tiny", "tiny", None, params={"max_tokens": 16}, stream=False, tools=TOOLS
            ),
        )  # fmt: skip
        assert turn.prompt == PROMPT
        ids = ["msg-call", "msg-text"]
        turns.finish_completion(
            s,
            completion_id=turn.completion.id,
            choices=[
                turns.ChoiceRecord(ids[0], 0, "", "tool_calls", 9, [again]),
                turns.ChoiceRecord(ids[1], 1, "It is sunny and 21 C in Paris.", "stop", 12),
            ],
            status="succeeded", error=None, prompt_tokens=40, latency_ms=5.0,
        )  # fmt: skip
        cid = turn.completion.id
        s.commit()
    return cid, ids


def test_a_tool_call_answer_is_rated_and_compiled_into_a_pair(live: Live) -> None:
    cid, (call_id, text_id) = store_exchange(live)
    with live.session() as s:
        rows = {m.role + str(m.choice_index): m for m in s.exec(select(Message)).all()}
        assert rows["assistantNone"].tool_calls == [CALL]
        assert rows["toolNone"].tool_call_id == "call_1"
        assert rows["assistant0"].tool_calls[0]["id"] == "call_2"

    # The stored completion reads back in OpenAI's shape: a tool call with null content.
    got = live.http.get(f"/v1/chat/completions/{cid}").json()
    assert got["choices"][0]["message"] == {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {**CALL, "id": "call_2", "function": {**CALL["function"], "arguments": "{}"}}
        ],
    }
    assert got["choices"][0]["finish_reason"] == "tool_calls"

    for index, rating in ((0, -1), (1, 1)):  # the text answer is better than calling again
        r = live.feedback(completion_id=cid, choice_index=index, rating=rating, user="alice")
        assert r.status_code == 201, r.text
        assert r.json()["message_id"] == (call_id, text_id)[index]
    assert live.compile()["pairs"] >= 1

    with live.session() as s:
        pair = s.exec(select(PreferencePair).where(PreferencePair.kind == "pair")).one()
    system, user, called, result = pair.prompt
    assert system["role"] == "system" and system["content"].startswith("Be brief.")
    assert json.dumps(TOOLS["tools"][0]) in system["content"]
    assert user == {"role": "user", "content": "Is it warm in Paris today?"}
    assert called == {
        "role": "assistant",
        "content": "<tool_call>\n"
        + json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})
        + "\n</tool_call>",
    }
    assert result == {"role": "user", "content": "<tool_response>\nsunny, 21 C\n</tool_response>"}
    assert pair.chosen == "It is sunny and 21 C in Paris."
    assert pair.rejected == '<tool_call>\n{"name": "get_weather", "arguments": {}}\n</tool_call>'

    # The trainer renders and tokenizes it with the base model's own chat template.
    from transformers import AutoTokenizer

    from trainer.data import tokenize_sequence

    tokenizer = AutoTokenizer.from_pretrained(live.model_dir)
    tokens = tokenize_sequence(
        tokenizer, pair.prompt, [{"role": "assistant", "content": pair.rejected}], 512
    )
    assert tokens is not None
    assert "<tool_call>" in tokenizer.decode(tokens.ids[tokens.prompt_len :])
