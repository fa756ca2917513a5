"""voxc: a TVM compiler and streaming runtime for Voxtral Mini 4B Realtime."""
from voxc.errors import VoxcError

__version__ = "0.1.0"


def load(artifact_dir, device: str | None = None, *, max_streams: int = 1, progress: bool = False,
         verify: str = "auto", kv_pages=None, kv_seconds: float | None = None):
    """Load a compiled artifact (``voxc build`` output).

    ``max_streams``: how many streams may be open at once (each holds a slot of the state; its KV
    cache takes pages of shared pools as it goes).  ``verify``: ``auto`` (sizes always, SHA-256 on
    the first load), ``full`` or ``size``.  ``kv_pages``: the KV pools' first size in pages (default:
    the first seconds of every stream; they grow as needed); or ``kv_seconds``: pools that hold that
    many seconds of audio for every one of ``max_streams`` streams from the start (a server's choice:
    no pool growth, and no step that waits for one, while its streams stay within it).
    See :class:`voxc.runtime.model.CompiledModel`.
    """
    from voxc.runtime.model import CompiledModel   # imported here: `import voxc` stays light
    return CompiledModel.load(artifact_dir, device=device, max_streams=max_streams, progress=progress, verify=verify,
                              kv_pages=kv_pages, kv_seconds=kv_seconds)


__all__ = ["VoxcError", "load", "__version__"]
