"""voxc: a TVM compiler and streaming runtime for Voxtral Mini 4B Realtime."""
from voxc.errors import VoxcError

__version__ = "0.1.0"


def load(artifact_dir, device: str | None = None):
    """Load a compiled artifact (``voxc build`` output) for transcription; see :class:`voxc.runtime.model.CompiledModel`."""
    from voxc.runtime.model import CompiledModel
    return CompiledModel.load(artifact_dir, device=device)


__all__ = ["VoxcError", "load", "__version__"]
