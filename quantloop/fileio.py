"""Files on disk: atomic writes (every output goes to a temporary path and is renamed into place), hashes,
and the cheap integrity checks of a transformers checkpoint folder."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from pydantic import BaseModel

from quantloop import faults
from quantloop.errors import InputError

TMP_MARK = ".tmp-"  # a temporary file or folder is .NAME.tmp-PID-RANDOM, next to NAME


def tmp_prefix(name: str) -> str:
    """The prefix of a temporary beside `name`: it carries the writer's process id, so sweep_temporaries can tell
    one a live process is writing from one a killed process left behind."""
    return f".{name}{TMP_MARK}{os.getpid()}-"


def write_text_atomic(path: str | Path, text: str, fault: str = "") -> Path:
    """Write `text` to a temporary file beside `path` and rename it into place. `fault`: the kind of write, for the
    fault-injection point write:<fault> (quantloop.faults), reached with half of the text written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=tmp_prefix(path.name))
    try:
        with os.fdopen(fd, "w") as f:
            if fault:
                f.write(text[:len(text) // 2])
                f.flush()
                faults.point(f"write:{fault}")
                text = text[len(text) // 2:]
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def write_json_atomic(path: str | Path, data: BaseModel | dict | list, fault: str = "") -> Path:
    if isinstance(data, BaseModel):
        text = data.model_dump_json(indent=2)
    else:
        text = json.dumps(data, indent=2)
    return write_text_atomic(path, text + "\n", fault)


@contextlib.contextmanager
def atomic_output(final: str | Path, is_dir: bool = False, fault: str = "") -> Iterator[Path]:
    """Yield a temporary path next to `final`; rename it into place on success.

    On any exception (or Ctrl-C) the temporary path is removed, so no
    half-written file or folder is ever left under the final name. `fault`: the kind of write, for the
    fault-injection point write:<fault>, reached when everything is written and nothing renamed yet.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=tmp_prefix(final.name)))
    target = tmp if is_dir else tmp / final.name
    try:
        yield target
        if fault:
            faults.point(f"write:{fault}")
        if is_dir:
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        else:
            os.replace(target, final)
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def orphaned(tmp: Path, started_before: float) -> bool:
    """A temporary whose writer is gone: its process id (in the name) is no live process, or, in the older form
    without one, it is older than `started_before` (a time.time())."""
    rest = tmp.name.split(TMP_MARK, 1)[1]
    pid, sep, _ = rest.partition("-")
    if sep and pid.isdigit():
        return int(pid) != os.getpid() and not pid_alive(int(pid))
    try:
        return tmp.lstat().st_mtime < started_before
    except FileNotFoundError:
        return False


def sweep_temporaries(folder: str | Path, started_before: float, recursive: bool = True) -> list[Path]:
    """Remove the temporaries (.NAME.tmp-*) a killed process left under `folder`; a live process's are kept.
    Returns what was removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = folder.rglob(f".*{TMP_MARK}*") if recursive else folder.glob(f".*{TMP_MARK}*")
    removed = []
    for tmp in sorted(found):
        if TMP_MARK in tmp.name and orphaned(tmp, started_before):
            if tmp.is_dir() and not tmp.is_symlink():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
            removed.append(tmp)
    return removed


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_hf_config(hf_dir: Path) -> dict:
    """config.json of a transformers checkpoint folder, or one error line naming what is wrong."""
    path = hf_dir / "config.json"
    if not path.is_file():
        raise InputError(hf_dir, "no config.json: not a Hugging Face checkpoint folder", "pass a folder written by save_pretrained")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InputError(path, "not valid JSON", "re-create the checkpoint") from None


def check_hf_dir(hf_dir: Path) -> None:
    """Cheap checks before transformers sees the folder: readable config, weights present, safetensors headers intact."""
    try:
        config = json.loads((hf_dir / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InputError(hf_dir / "config.json", "not valid JSON", "re-create the checkpoint") from None
    if "model_type" not in config:
        raise InputError(hf_dir / "config.json", "no 'model_type' field", "is this a transformers checkpoint?")
    weights = sorted(hf_dir.glob("*.safetensors")) + sorted(hf_dir.glob("pytorch_model*.bin"))
    if not weights:
        raise InputError(hf_dir, "no weights (*.safetensors or pytorch_model*.bin)", "save the model with save_pretrained")
    from safetensors import safe_open  # deferred: safetensors

    for w in weights:
        if w.suffix != ".safetensors":
            continue
        try:
            with safe_open(str(w), framework="pt") as f:
                keys = list(f.keys())
        except Exception as e:
            raise InputError(w, f"corrupt safetensors file ({str(e)[:100]})", "re-create the checkpoint") from None
        if not keys:
            raise InputError(w, "safetensors file holds no tensors", "re-create the checkpoint")
        size = w.stat().st_size
        # safetensors does not check that the data section is complete; a truncated file fails later.
        with safe_open(str(w), framework="pt") as f:
            last = keys[-1]
            try:
                f.get_slice(last)
            except Exception as e:
                raise InputError(w, f"corrupt safetensors file ({str(e)[:100]})", "re-create the checkpoint") from None
        header_len = int.from_bytes(open(w, "rb").read(8), "little")
        meta = json.loads(open(w, "rb").read(8 + header_len)[8:])
        end = max((v["data_offsets"][1] for k, v in meta.items() if k != "__metadata__"), default=0)
        if 8 + header_len + end > size:
            raise InputError(w, f"truncated safetensors file ({size} bytes, header promises {8 + header_len + end})", "re-create the checkpoint")
