"""Where CSM's files come from: a local folder (reuse) or the Hugging Face hub (download).

``--model-path`` accepts either a folder holding ``config.json`` or a hub cache
folder such as ``~/.cache/huggingface/hub/models--sesame--csm-1b`` (the form
people copy from their cache); the latter resolves to the snapshot named by
``refs/main``, or else the newest complete snapshot.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


# What loading needs: config, processor and tokenizer files, the chat template and the safetensors weights.
# sesame/csm-1b also holds the original 6 GB ``ckpt.pt``, which transformers never reads: it is not fetched.
MODEL_FILES = ("*.json", "*.safetensors", "*.jinja", "*.txt", "*.model")


class ModelSourceError(Exception):
    """The model files cannot be had; the message says what to do."""


def resolve_local(path: str | Path) -> Path:
    """The folder with ``config.json`` for ``path``, or ``ModelSourceError`` naming the path."""
    root = Path(path).expanduser()
    if not root.exists():
        raise ModelSourceError(f"--model-path {str(root)!r} does not exist")
    if not root.is_dir():
        raise ModelSourceError(f"--model-path {str(root)!r} is not a folder")
    if (root / "config.json").is_file():
        return root
    snapshots = root / "snapshots"
    if snapshots.is_dir():
        ref = root / "refs" / "main"
        if ref.is_file():
            candidate = snapshots / ref.read_text().strip()
            if (candidate / "config.json").is_file():
                return candidate
        complete = [p for p in snapshots.iterdir() if (p / "config.json").is_file()]
        if complete:
            return max(complete, key=lambda p: p.stat().st_mtime)
        raise ModelSourceError(f"--model-path {str(root)!r} is a hub cache folder with no complete snapshot "
                               "(no snapshots/<revision>/config.json)")
    raise ModelSourceError(f"--model-path {str(root)!r} has no config.json and is not a hub cache folder "
                           "(models--<org>--<name> with snapshots/)")


def download(model_id: str, token: str | None, cache_dir: str | None = None) -> Path:
    """Fetch ``model_id`` with huggingface_hub (progress bars go to the log's stderr).

    Errors become one ``ModelSourceError`` sentence saying what to do; the token
    itself never appears in a message.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError,
    )

    log.info("Downloading %s from the Hugging Face hub (%s token)", model_id,
             "with a" if token else "without a")
    try:
        folder = snapshot_download(model_id, token=token or None, cache_dir=cache_dir, allow_patterns=list(MODEL_FILES))
    except GatedRepoError:
        raise ModelSourceError(
            f"{model_id} is gated: accept its terms on the hub page with your account, then set HF_TOKEN "
            "to a token of that account") from None
    except RepositoryNotFoundError:
        hint = "check --model-id" if token else "set HF_TOKEN (it may be private or gated) or check --model-id"
        raise ModelSourceError(f"{model_id} was not found or the token was refused: {hint}") from None
    except LocalEntryNotFoundError:
        raise ModelSourceError(
            f"no network to download {model_id} and no cached copy: connect to the internet, or use "
            "--mode reuse --model-path <folder>") from None
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status == 401:
            raise ModelSourceError(f"the hub refused HF_TOKEN for {model_id} (HTTP 401): "
                                   "create a new read token and set HF_TOKEN") from None
        raise ModelSourceError(f"downloading {model_id} failed (HTTP {status})") from None
    except OSError as exc:
        raise ModelSourceError(f"downloading {model_id} failed: {exc.__class__.__name__}: "
                               f"{_redact(str(exc), token)}") from None
    return Path(folder)


def _redact(text: str, secret: str | None) -> str:
    return text.replace(secret, "***") if secret else text
