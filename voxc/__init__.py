"""voxc: a TVM compiler and streaming runtime for Voxtral Mini 4B Realtime."""
from voxc.errors import VoxcError

__version__ = "0.1.0"


def load(artifact_dir, device: str | None = None, *, max_streams: int = 1, progress: bool = False,
         verify: str = "auto"):
    """Load a compiled artifact (``voxc build`` output).

    ``max_streams``: how many streams may be open at once (each holds a KV-cache slot).
    ``verify``: ``auto`` (sizes always, SHA-256 on the first load), ``full`` or ``size``.
    See :class:`voxc.runtime.model.CompiledModel`.
    """
    from voxc.runtime.model import CompiledModel   # imported here: `import voxc` stays light
    return CompiledModel.load(artifact_dir, device=device, max_streams=max_streams, progress=progress, verify=verify)


__all__ = ["VoxcError", "load", "__version__"]
