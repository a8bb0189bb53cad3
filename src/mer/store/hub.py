"""Checkpoint sources given as a Hugging Face Hub repository id ("owner/name").

Only what conversion needs is downloaded (configs, safetensors, tokenizer
files), into the usual Hugging Face cache, so a second conversion reuses it.
Without network the user is told plainly that the model is not available and
how to pass a local directory instead.
"""

from __future__ import annotations

import re
from pathlib import Path

from mer.errors import ConvertError

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.jinja", "*.model"]


def resolve_source(src: str | Path) -> Path:
    """A local checkpoint directory for `src`: itself, or a Hub repository's download."""
    path = Path(src)
    if path.exists() or not REPO_ID.match(str(src)):
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    repo = str(src)
    try:
        return Path(snapshot_download(repo, allow_patterns=PATTERNS))
    except LocalEntryNotFoundError:
        raise ConvertError(
            f"{repo}: not available: the Hugging Face Hub cannot be reached and the model is "
            f"not in the local cache; download it where there is network "
            f"(`hf download {repo} --local-dir DIR`) and pass that directory instead"
        ) from None
    except GatedRepoError:
        raise ConvertError(
            f"{repo}: gated on the Hub; accept its terms and `hf auth login`"
        ) from None
    except RepositoryNotFoundError:
        raise ConvertError(f"{repo}: no such model on the Hugging Face Hub (private ones need "
                           "`hf auth login`), and no such local directory") from None  # fmt: skip
    except HfHubHTTPError as e:
        raise ConvertError(f"{repo}: download from the Hugging Face Hub failed ({e})") from None
