"""A video jitter buffer that hands a frame to the decoder as soon as its last packet is in.

aiortc's video buffer (``aiortc.jitterbuffer.JitterBuffer``) knows a frame is complete only when the first
packet of the *next* frame arrives, so every received frame waits one frame interval (33 ms at 30 fps) before
it is decoded: once at the server for the camera frame and once at the viewer for the stylized one. The RTP
marker bit (RFC 3550 §5.1; set on a video frame's last packet by browsers and by aiortc's own sender) says the
same thing a frame earlier. A frame is released when its packets run without a gap from the buffer's start to
a marked packet; a lost marker falls back to upstream's rule (the next frame's timestamp). Loss, NACK and PLI
handling are upstream's, unchanged.
"""

from __future__ import annotations

import logging
from typing import Optional

from aiortc.jitterbuffer import JitterBuffer, JitterFrame

log = logging.getLogger(__name__)

_ATTR = "_RTCRtpReceiver__jitter_buffer"  # aiortc keeps the buffer in a private attribute of the receiver


class FrameJitterBuffer(JitterBuffer):
    """Upstream's video buffer (prefetch 0), releasing a frame at its marked last packet."""

    def __init__(self, capacity: int = 512) -> None:
        super().__init__(capacity=capacity, prefetch=0, is_video=True)

    def _remove_frame(self, sequence_number: int) -> Optional[JitterFrame]:
        packets = []
        for count in range(self.capacity):
            packet = self._packets[(self._origin + count) % self._capacity]
            if packet is None:  # a gap: wait for it (NACK asks for it again)
                return None
            if packets and packet.timestamp != packets[0].timestamp:  # marker lost: the next frame began
                return self._release(packets, count)
            packets.append(packet)
            if packet.marker:
                return self._release(packets, count + 1)
        return None

    def _release(self, packets: list, count: int) -> JitterFrame:
        frame = JitterFrame(data=b"".join(p._data for p in packets), timestamp=packets[0].timestamp)
        self.remove(count)
        return frame


def decode_on_marker(pc, track) -> bool:
    """Give the receiver of ``track`` (a remote video track of ``pc``) a :class:`FrameJitterBuffer`.

    Call it from the ``track`` event, before media flows. Returns False (and changes nothing) when this aiortc
    keeps its buffer differently; frames then come a frame interval later, as upstream delivers them.
    """
    for transceiver in pc.getTransceivers():
        receiver = transceiver.receiver
        if receiver is None or receiver.track is not track:
            continue
        current = getattr(receiver, _ATTR, None)
        if type(current) is not JitterBuffer or current._origin is not None:  # unknown layout, or media began
            break
        setattr(receiver, _ATTR, FrameJitterBuffer(current.capacity))
        return True
    log.debug("kept aiortc's jitter buffer for %s", getattr(track, "id", track))
    return False
