"""An answer begun before its turn is confirmed: what it keeps, replays and closes (a real chat server on the wire)."""

from __future__ import annotations

import asyncio

from fake_chat import FakeChat

MESSAGES = [{"role": "user", "content": "Hello?"}]
REPLY = "Once upon a time, a boat sailed far away. It found an island of singing birds. The end."


async def test_what_was_written_before_it_was_adopted_is_replayed_then_the_rest_comes_live():
    from tts_server.core.preempt import Preemptive
    from tts_server.engines.chat import ChatModel

    with FakeChat(REPLY, delay=0.05) as chat:
        begun = Preemptive(ChatModel(chat.url, "m"), MESSAGES)
        await asyncio.sleep(0.3)  # part of it is written, unseen
        heard = [delta async for delta in begun.stream()]
    assert "".join(heard) == REPLY and len(chat.requests) == 1


async def test_it_keeps_no_more_than_an_answer_may_say_and_a_cancel_hangs_up():
    from tts_server.core.preempt import Preemptive
    from tts_server.engines.chat import ChatModel

    with FakeChat(REPLY, delay=0.01) as chat:
        capped = Preemptive(ChatModel(chat.url, "m"), MESSAGES, max_chars=20)
        kept = "".join([delta async for delta in capped.stream()])
    with FakeChat(REPLY, delay=0.01, idle=0.05) as chat:  # after its answer the stream stays open
        dropped = Preemptive(ChatModel(chat.url, "m"), MESSAGES)
        await asyncio.sleep(0.5)
        dropped.cancel()
        hung_up = await asyncio.to_thread(chat.hung_up.wait, 10)
    assert 20 < len(kept) <= 20 + max(map(len, REPLY.split())) + 1 and REPLY.startswith(kept)
    assert hung_up and dropped.cancelled
