"""Stream the frames of a local episode file with PyAV (FFmpeg), one frame at a time.

`probe_episode` opens the file and refuses what cannot give frames with an
`EpisodeRejected` carrying a stable reason (`REJECT_REASONS`): zero bytes, not a media
file (or a broken header, or an MP4 cut before its index), no video stream (audio only),
a codec this FFmpeg build cannot decode. `EpisodeReader` then yields `EpisodeFrame`s in
presentation order; a file that gives no frame at all is refused (`no_frames`) when the
stream ends. Damage that still leaves frames does not stop the episode: packets that fail
to decode are skipped, and a stream that ends early (a file cut mid-stream) ends the
iteration; both are reported in `EpisodeReader.damage` with the last good time.

Times come from each frame's pts * time_base, so variable frame rates are exact.
A frame is converted to RGB only when asked (`EpisodeFrame.image`): keyframe selection
looks at small grey thumbnails that FFmpeg's scaler makes straight from the decoded
YUV picture, which is most of the saving on 1080p episodes. Nothing holds more than
the frame in hand, so memory does not grow with the episode's length.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
from PIL import Image

REJECT_REASONS = ("empty", "not_media", "no_video", "unsupported_codec", "no_frames")
DAMAGE_REASONS = ("truncated", "corrupt_packets", "unreadable")
# A stream that ends this close to its declared duration is complete: containers round
# durations, and the last frame's own duration is not always known.
END_TOLERANCE_FRAMES = 2
END_TOLERANCE_S = 0.25


class EpisodeRejected(Exception):
    """An episode file that cannot give frames; `reason` is one of REJECT_REASONS."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class EpisodeInfo:
    path: Path
    container: str
    codec: str
    width: int
    height: int
    duration_s: float | None  # as the container declares it; None when unknown
    average_rate: float | None  # frames per second; None when unknown
    declared_frames: int | None  # None when the container does not say
    audio_streams: int


@dataclass(frozen=True)
class Damage:
    """Something wrong inside an episode that still gave frames."""

    reason: str  # one of DAMAGE_REASONS
    detail: str
    last_good_time: float | None  # seconds: the time of the last frame decoded before it


class EpisodeFrame:
    """One decoded frame; pixels are converted only when asked."""

    def __init__(self, frame: av.VideoFrame, index: int, time: float):
        self._frame = frame
        self.index = index
        self.time = time
        self.key_frame = bool(frame.key_frame)
        self.width = frame.width
        self.height = frame.height

    def image(self) -> Image.Image:
        """The frame as an RGB picture at its full size."""
        return self._frame.to_image()

    def grey_thumbnail(self, width: int, height: int) -> np.ndarray:
        """[height, width] uint8 luma, scaled by FFmpeg straight from the decoded picture."""
        small = self._frame.reformat(width=width, height=height, format="gray", interpolation="AREA")
        return small.to_ndarray()

    def __repr__(self) -> str:
        return f"EpisodeFrame(index={self.index}, time={self.time:.3f}, key_frame={self.key_frame})"


def _open(path: Path) -> av.container.InputContainer:
    try:
        return av.open(str(path), mode="r")
    except FileNotFoundError:
        raise
    except av.error.FFmpegError as error:
        raise EpisodeRejected("not_media", f"FFmpeg cannot read {path.name}: {error}") from None


def probe_episode(path: Path | str) -> EpisodeInfo:
    """What the episode holds, or `EpisodeRejected` when it cannot give frames."""
    path = Path(path)
    if path.stat().st_size == 0:
        raise EpisodeRejected("empty", f"{path.name} has zero bytes")
    container = _open(path)
    try:
        return _info(path, container)
    finally:
        container.close()


def _info(path: Path, container: av.container.InputContainer) -> EpisodeInfo:
    streams = list(container.streams)
    audio = len(container.streams.audio)
    if not streams:
        # An MP4 whose index (moov) sits at the end and was cut off opens with no streams.
        raise EpisodeRejected("not_media", f"{path.name} declares no streams (a file cut before its index?)")
    if not container.streams.video:
        kinds = sorted({stream.type for stream in streams})
        raise EpisodeRejected("no_video", f"{path.name} has no video stream, only {', '.join(kinds)}")
    stream = container.streams.video[0]
    context = stream.codec_context
    if context is None or context.codec is None:
        raise EpisodeRejected(
            "unsupported_codec",
            f"{path.name}'s video stream uses a codec this FFmpeg build has no decoder for "
            f"(container {container.format.name})",
        )
    if not context.width or not context.height:
        raise EpisodeRejected("not_media", f"{path.name}'s video stream declares no picture size")
    duration = None
    if stream.duration is not None and stream.time_base is not None:
        duration = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        duration = container.duration / av.time_base
    rate = stream.average_rate or stream.guessed_rate
    return EpisodeInfo(
        path=path,
        container=container.format.name,
        codec=context.codec.name,
        width=context.width,
        height=context.height,
        duration_s=duration,
        average_rate=float(rate) if rate else None,
        declared_frames=stream.frames or None,
        audio_streams=audio,
    )


class EpisodeReader:
    """Iterate over an episode's frames; read `damage` afterwards.

    `keyframes_only` asks the decoder to skip every frame that is not a keyframe
    (`skip_frame = "NONKEY"`): non-key frames are still read from the file but never
    decoded, so a long GOP costs a fraction of full decoding. `decoder_threads` = 0 lets
    FFmpeg choose.
    """

    def __init__(self, path: Path | str, keyframes_only: bool = False, decoder_threads: int = 0):
        self.path = Path(path)
        self.info = probe_episode(self.path)
        self.keyframes_only = keyframes_only
        self.decoder_threads = decoder_threads
        self.damage: list[Damage] = []
        self.frames_decoded = 0
        self.packets_read = 0
        self.last_good_time: float | None = None

    def __iter__(self) -> Iterator[EpisodeFrame]:
        self.damage, self.frames_decoded, self.packets_read, self.last_good_time = [], 0, 0, None
        container = _open(self.path)
        try:
            yield from self._frames(container)
        finally:
            container.close()
        if self.frames_decoded == 0:
            notes = "; ".join(f"{d.reason}: {d.detail}" for d in self.damage)
            raise EpisodeRejected("no_frames", f"{self.path.name} gave no decodable frame" + (f" ({notes})" if notes else ""))

    def _frames(self, container: av.container.InputContainer) -> Iterator[EpisodeFrame]:
        stream = container.streams.video[0]
        context = stream.codec_context
        context.thread_count = self.decoder_threads
        if self.decoder_threads != 1:
            context.thread_type = "AUTO"
        if self.keyframes_only:
            context.skip_frame = "NONKEY"
        time_base = stream.time_base
        start = stream.start_time or 0
        failed, first_failure = 0, ""
        stream_end = None  # the end time of the last packet read
        rate = self.info.average_rate
        try:
            for packet in container.demux(stream):
                if packet.size:
                    self.packets_read += 1
                    if packet.pts is not None:
                        end = packet.pts + (packet.duration or 0)
                        stream_end = end if stream_end is None else max(stream_end, end)
                try:
                    frames = packet.decode()
                except av.error.FFmpegError as error:
                    # The decoder recovers at the next keyframe; the frames in between are lost.
                    failed += 1
                    first_failure = first_failure or f"{error} after {self._last_good()}"
                    continue
                for frame in frames:
                    pts = frame.pts if frame.pts is not None else frame.dts
                    if pts is None:  # no timestamp at all: continue from the last one
                        time = (self.last_good_time or 0.0) + (1.0 / rate if rate else 0.0)
                    else:
                        time = float((pts - start) * time_base)
                    index = self.frames_decoded if not self.keyframes_only or not rate else round(time * rate)
                    self.frames_decoded += 1
                    self.last_good_time = time
                    yield EpisodeFrame(frame, index, time)
        except av.error.FFmpegError as error:
            self.damage.append(Damage("unreadable", f"reading stopped: {error}", self.last_good_time))
        if failed:
            self.damage.append(
                Damage("corrupt_packets", f"{failed} packet(s) failed to decode (first: {first_failure})",
                       self.last_good_time)
            )
        self._check_length(None if stream_end is None else float((stream_end - start) * time_base))

    def _last_good(self) -> str:
        return "the start" if self.last_good_time is None else f"{self.last_good_time:.3f} s"

    def _check_length(self, stream_end: float | None) -> None:
        """A stream whose packets end well before the declared duration was cut."""
        declared = self.info.duration_s
        if declared is None or not math.isfinite(declared):
            return
        frame = 1.0 / self.info.average_rate if self.info.average_rate else 0.0
        tolerance = max(END_TOLERANCE_FRAMES * frame, END_TOLERANCE_S)
        reached = stream_end if stream_end is not None else self.last_good_time
        if reached is None or reached < declared - tolerance:
            reached_text = "nothing" if reached is None else f"{reached:.3f} s"
            self.damage.append(
                Damage("truncated", f"the stream ends at {reached_text} of a declared {declared:.3f} s",
                       self.last_good_time)
            )


def iter_frames(path: Path | str, keyframes_only: bool = False, decoder_threads: int = 0) -> Iterator[EpisodeFrame]:
    """The frames of an episode (`EpisodeReader` without the damage report)."""
    yield from EpisodeReader(path, keyframes_only, decoder_threads)
