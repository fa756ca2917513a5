"""voxc: a TVM compiler and streaming runtime for Voxtral Mini 4B Realtime."""
from voxc.errors import VoxcError

__version__ = "0.1.0"


def load(artifact_dir, device: str | None = None, *, max_streams: int = 1, progress: bool = False):
    """Load a compiled artifact (``voxc build`` output).

    ``max_streams``: how many streams may be open at once (each holds a KV-cache slot).
    See :class:`voxc.runtime.model.CompiledModel`.
    """
    from voxc.runtime.model import CompiledModel
    return CompiledModel.load(artifact_dir, device=device, max_streams=max_streams, progress=progress)


__all__ = ["VoxcError", "load", "__version__"]
