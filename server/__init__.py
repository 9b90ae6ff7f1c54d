"""tensorgate's inference server.

    from tensorgate.server import ServerSettings, TensorgateServer
    app = TensorgateServer(ServerSettings(model_repository=Path("examples/models"), grpc_port=0))
    port = await app.start()
    ...
    await app.stop()

The heavy parts (onnxruntime, grpc servers) are imported on first use, so that light users of submodules such as
the codec do not pay for them.
"""

from __future__ import annotations

from importlib import metadata
from typing import TYPE_CHECKING, Any

try:
    __version__ = metadata.version("tensorgate")
except metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"

if TYPE_CHECKING:
    from tensorgate.server.app import TensorgateServer, serve
    from tensorgate.server.settings import ServerSettings

__all__ = ["ServerSettings", "TensorgateServer", "__version__", "serve"]


def __getattr__(name: str) -> Any:
    if name in ("TensorgateServer", "serve"):
        from tensorgate.server import app

        return getattr(app, name)
    if name == "ServerSettings":
        from tensorgate.server.settings import ServerSettings

        return ServerSettings
    raise AttributeError(f"module 'tensorgate.server' has no attribute {name!r}")
