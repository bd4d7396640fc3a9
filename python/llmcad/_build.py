"""Version and build/runtime capabilities of the compiled extension."""
from importlib import metadata

try:
    __version__ = metadata.version("llmcad")
except metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+source"


def _ext():
    try:
        from llmcad import _C
    except ImportError as exc:  # pragma: no cover - only without a build
        raise ImportError(
            f"llmcad's compiled extension is missing ({exc}); install the package with "
            "`pip install .` or build it with cmake (see README)"
        ) from exc
    return _C


def build_info() -> dict:
    """What was compiled into the extension and what is usable on this machine.

    Returns a dict with ``version``, ``cuda_compiled``, ``cuda_available``, ``io_uring_compiled``,
    ``io_uring_available``, ``cuda_architectures`` and ``cuda_debug`` (every CUDA kernel checked with a
    sync: the LLMCAD_CUDA_DEBUG build option).
    """
    ext = _ext()
    return {
        "version": __version__,
        "cuda_compiled": bool(ext.cuda_compiled()),
        "cuda_available": bool(ext.cuda_available()),
        "cuda_architectures": ext.cuda_architectures(),
        "cuda_debug": bool(ext.cuda_debug_checks()) if hasattr(ext, "cuda_debug_checks") else False,
        "io_uring_compiled": bool(ext.io_uring_compiled()),
        "io_uring_available": bool(ext.io_uring_available()),
    }
