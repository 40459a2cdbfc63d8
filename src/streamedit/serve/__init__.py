"""Live streaming: ``streamedit serve`` (browser page over WebRTC) and ``streamedit live`` (camera).

Only click is imported here; the server stack (aiohttp, aiortc) and the optional live backends
(pyvirtualcam, a GUI build of OpenCV) are imported when a command runs, with one clear message
when they are missing.
"""

from .commands import serve_command
from .live import live_command

__all__ = ["serve_command", "live_command"]
