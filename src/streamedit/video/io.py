"""Video file I/O on PyAV: the one import path for the reader (video/reader.py) and the writer (video/writer.py).

``open_video`` / ``VideoSource`` decode any input to working-size RGB frames, upright; ``VideoWriter``
encodes results back at the input's size, timestamps and audio, through a temporary file renamed on
success. Each module's docstring has the details.
"""

from __future__ import annotations

from .reader import READ_AHEAD, VideoInfo, VideoSource, _ffmpeg_reason, _open_input, open_video, read_ahead
from .writer import (
    VIDEO_CODECS,
    VideoWriter,
    _add_video_stream,
    _open_output,
    _signals_deferred,
    _temp_beside,
    _to_av_frame,
    check_output,
)

# the public names, and the helpers that video/clips.py, scale/ and tests import from here
__all__ = ["READ_AHEAD", "VIDEO_CODECS", "VideoInfo", "VideoSource", "VideoWriter", "check_output", "open_video",
           "read_ahead", "_add_video_stream", "_ffmpeg_reason", "_open_input", "_open_output", "_signals_deferred",
           "_temp_beside", "_to_av_frame"]
