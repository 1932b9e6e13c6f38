"""Models by name: `model: deepseek-ai/DeepSeek-V3` as a dir of the local Hugging Face hub cache.

The cache is huggingface_hub's (`HF_HUB_CACHE`, else `HF_HOME/hub`, else ~/.cache/huggingface/hub:
`models--org--name/refs/main` names the revision, `snapshots/<revision>/` holds its files), read
first and offline. Only where the model is absent and the hub is not switched off (`HF_HUB_OFFLINE`)
is it downloaded, and then only what `flexorch prepare` reads (config, generation config, tokenizer,
safetensors weights and their index), after checking that the disk holds both the download and the
layerwise copy `prepare` makes of it; the sizes are said before the download starts.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from flexorch.contract.errors import UserError

# What `prepare` reads of a repo (orchestrator/prepare.py COPIED_FILES and its safetensors layouts).
NEEDED_PATTERNS = ("config.json", "generation_config.json", "tokenizer*", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "added_tokens.json", "chat_template.jinja", "*.safetensors",
                   "model.safetensors.index.json")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# Room left on a disk after the download and the copy: a full disk fails writes everywhere on it.
SPARE_BYTES = 2 * 10**9


@dataclass(frozen=True)
class DownloadPlan:
    repo_id: str
    files: tuple[tuple[str, int], ...]  # (path in the repo, bytes): what `prepare` needs

    @property
    def download_bytes(self) -> int:
        return sum(size for _, size in self.files)

    @property
    def weight_bytes(self) -> int:
        """What the layerwise copy takes: the weights, once more."""
        return sum(size for name, size in self.files if name.endswith(".safetensors"))


def is_hub_id(value) -> bool:
    """`org/name` that is not a path written relative (`./x/y`), as the hub names repos."""
    return isinstance(value, str) and bool(_HUB_ID.fullmatch(value)) and not value.startswith(("./", "../"))


def hub_cache_dir() -> Path:
    """huggingface_hub's cache, read from the environment when asked (its constants are fixed at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"
    return Path(home) / "hub"


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def cached_snapshot(repo_id: str, cache_dir: Path | None = None) -> Path | None:
    """The cached snapshot of `repo_id`'s main revision holding a config.json, or None."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        path = Path(snapshot_download(repo_id, cache_dir=cache_dir or hub_cache_dir(), local_files_only=True,
                                      allow_patterns=list(NEEDED_PATTERNS)))
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError):
        return None
    return path if (path / "config.json").is_file() else None


def resolve_hub_id(repo_id: str, layerwise_dir: Path, console=None, api=None) -> Path:
    """The local dir of hub model `repo_id`: its cached snapshot, else (online) downloaded into the
    cache once the disks are found to hold it and its layerwise copy under `layerwise_dir`."""
    cache = hub_cache_dir()
    found = cached_snapshot(repo_id, cache)
    if found is not None:
        return found
    if hub_offline():
        raise UserError(absent_message(repo_id, cache, offline=True))
    plan = download_plan(repo_id, api)
    check_space(plan, cache, layerwise_dir, shutil.disk_usage)
    say = console.print if console is not None else (lambda text: None)
    say(f"downloading {repo_id}: {_gb(plan.download_bytes)} in {len(plan.files)} files into {cache}; its layerwise "
        f"copy will take {_gb(plan.weight_bytes)} more under {layerwise_dir}")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id, cache_dir=cache, allow_patterns=[name for name, _ in plan.files]))


def download_plan(repo_id: str, api=None) -> DownloadPlan:
    """The repo's files `prepare` needs, with their sizes (one metadata request)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    try:
        info = (api or HfApi()).model_info(repo_id, files_metadata=True)
    except HfHubHTTPError as exc:
        raise UserError(f"model {repo_id!r}: the Hugging Face hub refused it ({str(exc).splitlines()[0]})") from None
    except _unreachable() as exc:  # no network: as offline
        raise UserError(absent_message(repo_id, hub_cache_dir(), offline=True)
                        .replace("HF_HUB_OFFLINE is set", f"the hub is unreachable ({exc})")) from None
    files = tuple((s.rfilename, int(s.size or 0)) for s in info.siblings
                  if any(fnmatch.fnmatch(s.rfilename, p) for p in NEEDED_PATTERNS) and "/" not in s.rfilename)
    if not any(name.endswith(".safetensors") for name, _ in files):
        raise UserError(f"model {repo_id!r}: the repo holds no safetensors weights at its top level (flexorch "
                        "downloads those; give a local dir or a .gguf file instead)")
    return DownloadPlan(repo_id, files)


def check_space(plan: DownloadPlan, cache: Path, layerwise_dir: Path, disk_usage) -> None:
    """Refuse, before a byte is fetched, a download that with its layerwise copy would fill a disk.
    `disk_usage`: shutil.disk_usage (its `free` read of the nearest existing dir)."""
    needs: dict[int, list] = {}
    for path, nbytes in ((cache, plan.download_bytes), (layerwise_dir, plan.weight_bytes)):
        existing = _existing_parent(path)
        device = existing.stat().st_dev
        needs.setdefault(device, [existing, 0])[1] += nbytes
    for existing, nbytes in needs.values():
        free = disk_usage(existing).free
        if free < nbytes + SPARE_BYTES:
            raise UserError(
                f"model {plan.repo_id!r}: downloading it and its layerwise copy needs {_gb(nbytes)} on the disk of "
                f"{existing} ({_gb(SPARE_BYTES)} spare), which has {_gb(free)} free (download "
                f"{_gb(plan.download_bytes)}, copy {_gb(plan.weight_bytes)}); free space or set HF_HUB_CACHE / "
                "FLEXORCH_CACHE to a larger disk")


def absent_message(repo_id: str, cache: Path, offline: bool) -> str:
    """One line: the model is not cached, and how to get it (a job never downloads: `prepare` does)."""
    fetch = f"`hf download {repo_id} --include '*.safetensors' '*.json' 'tokenizer*'`"
    if offline:
        return (f"model {repo_id!r} is not in the local Hugging Face cache ({cache}) and HF_HUB_OFFLINE is set: "
                f"download it with {fetch} where the hub is reachable, or give a local dir")
    return (f"model {repo_id!r} is not in the local Hugging Face cache ({cache}): `flexorch prepare {repo_id} DST` "
            f"downloads what it needs (saying how much first) and converts it, or download it with {fetch}")


def _unreachable() -> tuple[type[BaseException], ...]:
    """The errors of a hub that cannot be reached: huggingface_hub's HTTP client's transport errors
    (httpx2 in huggingface_hub 2, httpx in 1) and the OS's."""
    import importlib

    from huggingface_hub.errors import OfflineModeIsEnabled

    for client in ("httpx2", "httpx"):
        try:
            return (importlib.import_module(client).TransportError, OfflineModeIsEnabled, OSError)
        except (ImportError, AttributeError):
            continue
    return (OfflineModeIsEnabled, OSError)


def _existing_parent(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return path


def _gb(nbytes: int) -> str:
    return f"{nbytes / 1e9:.1f} GB"
