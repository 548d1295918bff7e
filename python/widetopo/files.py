"""Writing a file so that readers see the old or the new version, never half of one."""
from __future__ import annotations

import os
from typing import Union


def atomic_write(path, data: Union[bytes, bytearray, memoryview, str], what: str = "", *, durable: bool = False) -> None:
    """Write `data` to a temporary file beside `path` and rename it into place (os.replace).

    On failure (a full disk) the temporary is removed and the OSError keeps its errno and names
    `what` and the path. durable=True also fsyncs before the rename (journals that must survive
    a power cut; a checkpoint rewritten every round does not need it)."""
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    text = isinstance(data, str)
    try:
        with open(tmp, "w" if text else "wb", **({"encoding": "utf-8", "newline": ""} if text else {})) as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        label = f"{what} " if what else ""
        raise OSError(exc.errno, f"cannot write {label}{path!r} ({exc.strerror or exc}, errno {exc.errno}); "
                                 f"the previous version, if any, is intact") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
