"""A conversation held without a WebSocket: a real ``Service`` with the tiny CSM, and a peer that records the events
it is sent and reads each job's replies itself.  What the WebSocket's protocol tests prove through frames holds for
any interface that gives a ``Conversation`` a ``Peer``."""

from __future__ import annotations

import pytest
import pytest_asyncio

from audio_fixtures import audio_bytes, speechlike
from conftest import csm_slot, running_server
from tts_server.core.conversation import Conversation
from tts_server.core.events import Audio, Cancelled, SessionBound, Truncated, TurnSaved
from tts_server.core.jobs import END, Job
from tts_server.engines.request import SynthesisRequest

pytestmark = pytest.mark.asyncio(loop_scope="module")
OWNER = "an owner"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def service(tiny_model_dir):
    async with running_server(csm_slot(tiny_model_dir)) as server:
        yield server.service


class RecordingPeer:
    """An interface in a few lines: it keeps what the conversation sends, and lets the test read the jobs."""

    def __init__(self, service, key=("192.0.2.7", 4711)) -> None:
        self.service, self.key = service, key
        self.sent: list = []
        self.jobs: list[Job] = []

    async def send(self, *frames) -> None:
        self.sent.extend(frames)

    def enqueue(self, job: Job) -> None:
        self.jobs.append(job)

    def schedule(self, job: Job) -> None:
        self.service.scheduler.submit(job)

    def gone(self) -> bool:
        return False


@pytest.fixture
def peer(service):
    peer = RecordingPeer(service)
    assert service.admission.admit(peer.key, peer.key[0]) is None  # its turn on the shared threads
    yield peer
    service.admission.release(peer.key)


async def bound(service, peer) -> tuple[Conversation, str]:
    conversation = Conversation(service, peer, owner=OWNER)
    await conversation.bind(None)
    bound_to = peer.sent.pop()
    assert isinstance(bound_to, SessionBound) and bound_to.turns == 0
    return conversation, bound_to.session


async def test_a_turn_sent_whole_is_kept_in_the_history_and_the_bound_session(service, peer):
    conversation, session = await bound(service, peer)
    await conversation.turn(1, "Hello there.", audio_bytes(speechlike(1.0)))
    assert peer.sent == [TurnSaved(1, "Hello there.", 1.0, 1)]
    assert [(turn.speaker, turn.text) for turn in conversation.history] == [(1, "Hello there.")]
    stored = await service.sessions.turns(session, OWNER)
    assert [(turn.speaker, turn.text) for turn in stored] == [(1, "Hello there.")]
    resumed = Conversation(service, RecordingPeer(service), owner=OWNER)
    await resumed.bind(session)  # any holder of the owner's key resumes it
    assert resumed.peer.sent == [SessionBound(session, 1)]
    assert [turn.text for turn in resumed.history] == ["Hello there."]


async def test_a_reply_interrupted_while_it_runs_keeps_what_was_heard_once_it_ends(service, peer):
    """Barge-in 400 ms into a reply still being generated: it is cancelled, and once its last reply is out only its
    first five whole 80 ms frames stay, in the history and the session (``Truncated``)."""
    conversation, session = await bound(service, peer)
    job = conversation.job(SynthesisRequest(text="The first sentence goes on a while.", request_id="reply", seed=3,
                                            stream=True, format="pcm"))
    peer.enqueue(job)
    peer.schedule(job)
    received = 0
    while received < 0.64 * 24000 * 2:  # 640 ms of it has arrived; the listener heard 400 ms
        frames = await job.outbox.get()
        received += sum(len(frame.data) for frame in frames if isinstance(frame, Audio))
    await conversation.barge_in("reply", 400, job)
    assert peer.sent == []  # nothing is cut before the reply has ended
    last = None
    while (frames := await job.outbox.get()) is not END:
        last = frames
    assert isinstance(last[-1], Cancelled)
    await conversation.ended(job)
    assert peer.sent == [Truncated("reply", 0.4)]
    assert [turn.duration_s for turn in conversation.history] == [0.4]
    stored = await service.sessions.turns(session, OWNER)
    assert [(turn.speaker, round(turn.duration_s, 3)) for turn in stored] == [(0, 0.4)]
    assert "The first sentence goes on a while.".startswith(stored[0].text)  # the words heard


async def test_a_barge_in_on_an_unknown_reply_is_refused(service, peer):
    from tts_server.engines.errors import ErrorCode, Refusal

    conversation = Conversation(service, peer)
    with pytest.raises(Refusal) as refused:
        await conversation.barge_in("never-sent", 400, None)
    assert refused.value.code == ErrorCode.UNKNOWN_REQUEST and refused.value.request_id == "never-sent"
