"""Pretrained tags (`--pretrained openai`): fail in seconds with one clear message when the weights are neither
cached nor downloadable, instead of building the model and then retrying a dead connection for a minute.

open_clip downloads a tag's weights from the Hugging Face hub (or, for a few tags, a plain URL) when the model is
built. Offline that means several retried requests, each warning twice, and a traceback at the end. Here the tag
is looked up first; weights already in the hub cache are used without any request (the hub's own offline switch,
`HF_HUB_OFFLINE`, turned on for that one load); otherwise the server is probed once with a short timeout.
"""

from __future__ import annotations

import contextlib
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from urllib.parse import urlsplit

import open_clip

from ttd.errors import TTDError

PROBE_TIMEOUT_S = 5.0
# what open_clip looks for in a hub repository named without a file (its HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME)
HUB_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
OFFLINE_HINT = ("where there is no internet, fetch the weights elsewhere and pass the file: --pretrained "
                "/path/to/weights.safetensors (docs/QUICKSTART.md, section 2)")


def pretrained_source(name: str, tag: str) -> dict:
    """open_clip's record for NAME/TAG; a clear error naming the known tags when there is none."""
    cfg = open_clip.get_pretrained_cfg(name, tag)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(name)
        known = f"its tags: {', '.join(tags)}" if tags else "open_clip has no pretrained weights for it"
        raise TTDError(f"model {name!r} has no pretrained tag {tag!r} ({known})")
    return cfg


def _cached_hub_file(repo_file: str) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    repo, filename = os.path.split(repo_file)
    for candidate in (filename,) if filename else HUB_FILES:
        found = try_to_load_from_cache(repo, candidate)
        if isinstance(found, str):
            return found
    return None


def _reachable(url: str) -> str | None:
    """None when a server answers at URL (any HTTP status counts); else why not, in a few words."""
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=PROBE_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        return None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return f"{type(reason).__name__}: {reason}" if str(reason) else type(reason).__name__
    return None


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True  # the cache has the file: no update check, no retries
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def weights_available(name: str, tag: str) -> contextlib.AbstractContextManager:
    """Check that NAME/TAG's weights can be had before the model is built; returns the context to build it in
    (offline when the hub cache holds them). Raises TTDError within about PROBE_TIMEOUT_S seconds otherwise."""
    cfg = pretrained_source(name, tag)
    if "file" in cfg:
        return contextlib.nullcontext()
    hub = cfg.get("hf_hub")
    if hub and open_clip.pretrained.has_hf_hub():
        if _cached_hub_file(hub):
            return _hub_offline()
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            raise TTDError(f"weights for {name}/{tag} are not in the hub cache and HF_HUB_OFFLINE is set; "
                           + OFFLINE_HINT)
        url = f"{constants.ENDPOINT}/{hub.rstrip('/')}"
    else:
        url = cfg.get("url", "")
    parts = urlsplit(url)
    problem = _reachable(f"{parts.scheme}://{parts.netloc}/")
    if problem:
        raise TTDError(f"cannot download weights for {name}/{tag}: {parts.netloc} is unreachable ({problem}); "
                       + OFFLINE_HINT)
    return contextlib.nullcontext()
