"""``python -m tts_server.references``: manage emotion clips and default voices offline.

    add EMOTION FILE --text "..." [--speaker N]   normalise FILE to 24 kHz mono and add it to the map
    import ravdess|cremad|emodb DIR [--limit-per-emotion N]
    voice SPEAKER FILE --text "..."               set a speaker's default voice
    list                                          emotions, clip counts, voices
    check                                         validate both maps as the server would (exit 1 on errors)

All commands take ``--references DIR`` (default: the server's references folder).
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

from . import (DEFAULT_REFERENCES, ReferenceError, add_emotion_clip, load_emotions, load_voices, read_audio,
               save_voice, write_wav_atomic)
from .datasets import PARSERS


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in text).strip("-") or "clip"


def cmd_add(root: Path, emotion: str, file: Path, text: str, speaker: int | None, source: str | None = None) -> str:
    audio = read_audio(file, str(file))
    relative = f"{_slug(emotion)}/{_slug(file.stem)}.wav"
    write_wav_atomic(root / relative, audio)
    add_emotion_clip(root, emotion, relative, text, speaker, source)
    return relative


def cmd_import(root: Path, dataset: str, folder: Path, limit: int | None) -> tuple[Counter, int, int]:
    parse = PARSERS[dataset]
    added: Counter = Counter()
    unknown = failed = 0
    for file in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() == ".wav"):
        parsed = parse(file.name)
        if parsed is None:
            unknown += 1
            continue
        emotion, text = parsed
        if limit is not None and added[emotion] >= limit:
            continue
        try:
            cmd_add(root, emotion, file, text, None, dataset)
        except ReferenceError as exc:
            print(f"skipped {file}: {exc}", file=sys.stderr)
            failed += 1
            continue
        added[emotion] += 1
    return added, unknown, failed


def cmd_check(root: Path) -> int:
    emotions, warnings = load_emotions(root)
    voices, voice_warnings = load_voices(root)
    for warning in warnings + voice_warnings:
        print(f"error: {warning}", file=sys.stderr)
    print(f"{sum(len(c) for c in emotions.values())} emotion clips in {len(emotions)} emotions, "
          f"{len(voices)} default voices")
    return 1 if warnings or voice_warnings else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tts_server.references", description=__doc__.split("\n")[0])
    parser.add_argument("--references", type=Path, default=DEFAULT_REFERENCES)
    sub = parser.add_subparsers(dest="command", required=True)
    add = sub.add_parser("add", help="add one clip to an emotion")
    add.add_argument("emotion")
    add.add_argument("file", type=Path)
    add.add_argument("--text", required=True)
    add.add_argument("--speaker", type=int)
    imp = sub.add_parser("import", help="import a local copy of a dataset")
    imp.add_argument("dataset", choices=sorted(PARSERS))
    imp.add_argument("folder", type=Path)
    imp.add_argument("--limit-per-emotion", type=int)
    voice = sub.add_parser("voice", help="set a speaker's default voice")
    voice.add_argument("speaker", type=int)
    voice.add_argument("file", type=Path)
    voice.add_argument("--text", required=True)
    sub.add_parser("list", help="list emotions and voices")
    sub.add_parser("check", help="validate the maps; exit 1 on errors")
    args = parser.parse_args(argv)
    root: Path = args.references
    try:
        if args.command == "add":
            print(f"added {cmd_add(root, args.emotion, args.file, args.text, args.speaker)}")
        elif args.command == "import":
            added, unknown, failed = cmd_import(root, args.dataset, args.folder, args.limit_per_emotion)
            for emotion, count in sorted(added.items()):
                print(f"{emotion}: {count} clips")
            print(f"imported {sum(added.values())}, skipped {unknown} unknown names, {failed} unusable files")
        elif args.command == "voice":
            audio = read_audio(args.file, str(args.file))
            print(f"speaker {args.speaker}: {save_voice(root, args.speaker, audio, args.text, 'cli')}")
        elif args.command == "list":
            emotions, _ = load_emotions(root)
            voices, _ = load_voices(root)
            for name, clips in sorted(emotions.items()):
                print(f"{name}: {len(clips)} clips")
            for speaker, clip in sorted(voices.items()):
                print(f"voice {speaker}: {clip.path} ({clip.duration_s:.1f} s) {clip.text!r}")
        else:
            return cmd_check(root)
    except ReferenceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
