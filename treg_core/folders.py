"""Output folders treg owns: it writes only into a folder that is new, empty, or already its own.

The first time a command uses a folder it writes a marker file, `.treg`, naming the command. A
folder with files but without that marker belongs to someone else and is never written into; a
folder marked by the other command (a scoring folder given to treg-train as --output, say) is
refused too.
"""

from __future__ import annotations

from pathlib import Path

from treg_core.errors import UserError

MARKER = ".treg"


def check_folder(path: str | Path, command: str) -> bool:
    """Raise unless `command` may write into `path`; True when `command` wrote there before."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{path} is a file; give a folder")
    marker = path / MARKER
    if marker.is_file():
        owner = marker.read_text(encoding="utf-8").strip()
        if owner != command:
            raise UserError(f"{path} holds {owner} output; give {command} a folder of its own")
        return True
    entries = sorted(p.name for p in path.iterdir()) if path.exists() else []
    if entries:
        raise UserError(f"{path} already holds files treg did not write ({', '.join(entries[:3])}"
                        f"{', ...' if len(entries) > 3 else ''}); give a new or empty folder")
    return False


def claim_folder(path: str | Path, command: str) -> bool:
    """check_folder, then create `path` if needed and mark it as `command`'s. True when it was already."""
    path = Path(path)
    if check_folder(path, command):
        return True
    try:
        path.mkdir(parents=True, exist_ok=True)
        (path / MARKER).write_text(command + "\n", encoding="utf-8")
    except OSError as err:
        raise UserError(f"cannot write into {path}: {err.strerror or err}") from None
    return False
