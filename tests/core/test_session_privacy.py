"""The SQLite session file keeps what the README promises: only its owner can read it, and a deleted or expired
session's text is gone from the bytes on disk (database and write-ahead log), expired ones within a minute."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

import numpy as np

from conftest import csm_slot, running_server
from tts_server.core.sessions import SessionStore, StoredTurn, owner_of

SECRET = "my-bank-pin-is-zebra-4417"


def on_disk(db: Path) -> bytes:
    return b"".join(p.read_bytes() for p in (db, Path(f"{db}-wal")) if p.exists())


def stored(store: SessionStore) -> str:
    me = owner_of(None)
    session = store.create(me)
    store.append(session, me, StoredTurn(1, SECRET, 0.8, np.arange(10 * 32).reshape(10, 32)))
    return session


def test_the_files_are_private_and_a_deleted_sessions_text_is_gone_from_them(tmp_path):
    db = tmp_path / "s.db"
    store = SessionStore.open(f"sqlite:///{db}")
    session = stored(store)
    modes = {p.name: stat.S_IMODE(os.stat(p).st_mode) for p in tmp_path.iterdir()}
    written = SECRET.encode() in on_disk(db)
    store.delete(session, owner_of(None))
    left = on_disk(db)
    store.close()
    assert modes == {"s.db": 0o600, "s.db-wal": 0o600, "s.db-shm": 0o600}
    assert written and SECRET.encode() not in left


async def test_expired_sessions_are_swept_from_the_file_without_waiting_for_a_new_one(tiny_model_dir, tmp_path):
    db = tmp_path / "s.db"
    async with running_server(csm_slot(tiny_model_dir), wait_loaded=False, session_store=f"sqlite:///{db}",
                              session_ttl=1, session_sweep_seconds=0.2) as server:
        stored(server.service.sessions.store)
        for _ in range(100):  # the sweep runs every 0.2 s here (every 30 s by default)
            if SECRET.encode() not in on_disk(db):
                break
            await asyncio.sleep(0.1)
        left = on_disk(db)
    assert SECRET.encode() not in left
