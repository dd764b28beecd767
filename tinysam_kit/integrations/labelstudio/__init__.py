"""Label Studio ML backend: TinySAM answers smart keypoint/rectangle clicks with brush masks and
pre-labels whole projects. A thin HTTP adapter over `tinysam_kit.inference`.

`create_app(settings)` builds the FastAPI application; `tinysam serve-ls` runs it with uvicorn.
"""

from __future__ import annotations

__all__ = ["BackendSettings", "create_app"]


def __getattr__(name: str):
    # imported on first use: the task image loader (`fetch`), which Ray and worker processes unpickle, stays
    # free of PyTorch
    if name == "BackendSettings":
        from tinysam_kit.integrations.labelstudio.settings import BackendSettings

        return BackendSettings
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def create_app(settings=None, backend=None):
    from tinysam_kit.integrations.labelstudio.app import create_app as _create_app  # FastAPI is an optional dependency

    return _create_app(settings, backend)
