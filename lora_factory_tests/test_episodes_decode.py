"""Episode decoding: frames with their presentation times, and a clear verdict on every
kind of bad file (empty, not media, audio only, unknown codec, truncated, no frames)."""

import fractions
from pathlib import Path

import av
import numpy as np
import pytest

from lora_factory.episodes.decode import EpisodeReader, EpisodeRejected, probe_episode

SIZE = (128, 72)


def frame_picture(number: int) -> np.ndarray:
    """A grey gradient with a bright square that moves one step per frame."""
    width, height = SIZE
    picture = np.tile(np.linspace(40, 200, width, dtype=np.uint8), (height, 1))[:, :, None].repeat(3, axis=2)
    x = (number * 3) % (width - 16)
    picture[20:36, x:x + 16] = (250, 60, 30)
    return picture


def write_video(path: Path, frames: int = 48, container: str = "matroska", durations_ms: list[int] | None = None,
                keyframe_interval: int = 12, options: dict | None = None) -> Path:
    """`frames` frames at 24 fps, or with the given per-frame durations (variable rate)."""
    with av.open(str(path), mode="w", format=container, options=options or {}) as output:
        stream = output.add_stream("libx264", rate=24, options={"g": str(keyframe_interval), "preset": "ultrafast"})
        stream.width, stream.height = SIZE
        stream.pix_fmt = "yuv420p"
        if durations_ms is not None:
            stream.codec_context.time_base = fractions.Fraction(1, 1000)
        pts = 0
        for number in range(frames):
            frame = av.VideoFrame.from_ndarray(frame_picture(number), format="rgb24")
            if durations_ms is not None:
                frame.pts, frame.time_base = pts, fractions.Fraction(1, 1000)
                pts += durations_ms[number]
            for packet in stream.encode(frame):
                output.mux(packet)
        for packet in stream.encode():
            output.mux(packet)
    return path


def test_frames_come_in_order_with_their_times(tmp_path):
    video = write_video(tmp_path / "episode.mkv")
    reader = EpisodeReader(video, decoder_threads=1)
    assert (reader.info.codec, reader.info.width, reader.info.height) == ("h264", *SIZE)
    assert reader.info.duration_s == pytest.approx(2.0, abs=0.05)
    frames = list(reader)
    assert [f.index for f in frames] == list(range(48))
    assert [f.time for f in frames] == pytest.approx([i / 24 for i in range(48)], abs=1e-3)
    assert reader.damage == [] and reader.frames_decoded == 48
    image = frames[5].image()
    assert image.size == SIZE and image.mode == "RGB"
    assert frames[5].grey_thumbnail(32, 18).shape == (18, 32)
    # The moving square is where frame 5 drew it (H.264 keeps it within a few levels).
    assert np.abs(np.asarray(image, dtype=int)[28, 15 + 2] - (250, 60, 30)).max() < 40


def test_variable_frame_rate_times_come_from_each_frames_timestamp(tmp_path):
    durations = [20, 40, 60] * 10  # frames held for different times, as anime on twos and threes
    video = write_video(tmp_path / "vfr.mkv", frames=30, durations_ms=durations)
    times = [frame.time for frame in EpisodeReader(video, decoder_threads=1)]
    expected = np.concatenate([[0], np.cumsum(durations)[:-1]]) / 1000
    assert times == pytest.approx(list(expected), abs=1e-3)


def test_keyframes_only_mode_decodes_only_the_keyframes(tmp_path):
    video = write_video(tmp_path / "gop.mkv", frames=48, keyframe_interval=12)
    reader = EpisodeReader(video, keyframes_only=True, decoder_threads=1)
    frames = list(reader)
    assert [f.time for f in frames] == pytest.approx([0.0, 0.5, 1.0, 1.5], abs=1e-3)
    assert all(f.key_frame for f in frames)
    assert [f.index for f in frames] == [0, 12, 24, 36]  # numbered as in the whole episode
    assert reader.packets_read == 48 and reader.damage == []


def test_a_truncated_file_gives_the_frames_before_the_cut_and_says_so(tmp_path):
    whole = write_video(tmp_path / "whole.mkv").read_bytes()
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(whole[: len(whole) * 6 // 10])
    reader = EpisodeReader(cut, decoder_threads=1)
    frames = list(reader)
    assert 0 < len(frames) < 48
    assert [d.reason for d in reader.damage] == ["truncated"]
    assert reader.damage[0].last_good_time == pytest.approx(frames[-1].time)
    assert "declared 2.000 s" in reader.damage[0].detail


def test_damaged_bytes_inside_the_stream_do_not_stop_the_episode(tmp_path):
    data = bytearray(write_video(tmp_path / "whole.mkv", keyframe_interval=12).read_bytes())
    middle = len(data) // 2
    data[middle:middle + 400] = bytes(400)  # a scratched sector in the middle of the file
    damaged = tmp_path / "scratched.mkv"
    damaged.write_bytes(bytes(data))
    reader = EpisodeReader(damaged, decoder_threads=1)
    frames = list(reader)
    # Decoding goes on after the damage to the end of the episode.
    assert len(frames) >= 30 and frames[-1].time > 1.8


def rejection(path: Path) -> EpisodeRejected:
    with pytest.raises(EpisodeRejected) as caught:
        list(EpisodeReader(path))
    return caught.value


def test_empty_and_non_media_files_are_rejected(tmp_path):
    empty = tmp_path / "empty.mkv"
    empty.write_bytes(b"")
    assert rejection(empty).reason == "empty"
    noise = tmp_path / "noise.mkv"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 20000, dtype=np.uint8).tobytes())
    assert rejection(noise).reason == "not_media"
    header = bytearray(write_video(tmp_path / "good.mkv").read_bytes())
    header[:64] = bytes(64)
    broken = tmp_path / "broken_header.mkv"
    broken.write_bytes(bytes(header))
    assert rejection(broken).reason == "not_media"
    # An MP4 keeps its index (moov) at the end: cut before it, nothing can be read.
    mp4 = write_video(tmp_path / "good.mp4", container="mp4").read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(mp4[: len(mp4) // 2])
    assert rejection(cut).reason == "not_media"


def test_an_audio_only_file_is_rejected(tmp_path):
    path = tmp_path / "soundtrack.m4a"
    with av.open(str(path), mode="w", format="mp4") as output:
        stream = output.add_stream("aac", rate=16000, layout="mono")
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 16000), dtype=np.float32), format="fltp", layout="mono")
        frame.sample_rate = 16000
        for packet in [*stream.encode(frame), *stream.encode()]:
            output.mux(packet)
    rejected = rejection(path)
    assert rejected.reason == "no_video" and "audio" in rejected.detail


def test_a_codec_without_a_decoder_is_rejected(tmp_path):
    data = write_video(tmp_path / "good.mkv").read_bytes()
    # Matroska names the codec in a string: an unknown one of the same length keeps the
    # file well formed, and FFmpeg has no decoder for it.
    assert data.count(b"V_MPEG4/ISO/AVC") == 1
    unknown = tmp_path / "unknown_codec.mkv"
    unknown.write_bytes(data.replace(b"V_MPEG4/ISO/AVC", b"V_LFDEMO/NO/DEC"))
    assert rejection(unknown).reason == "unsupported_codec"
    with pytest.raises(EpisodeRejected, match="unsupported_codec"):
        probe_episode(unknown)


def test_a_file_with_no_decodable_frame_is_rejected_when_the_stream_ends(tmp_path):
    # Index at the front (faststart), media data cut inside the first frame.
    mp4 = write_video(tmp_path / "fast.mp4", container="mp4", options={"movflags": "+faststart"}).read_bytes()
    cut = tmp_path / "first_frame_cut.mp4"
    moov_end = mp4.index(b"mdat") + 64
    cut.write_bytes(mp4[:moov_end])
    reader = EpisodeReader(cut)  # the header is fine: probing accepts it
    with pytest.raises(EpisodeRejected) as caught:
        list(reader)
    assert caught.value.reason == "no_frames"
    assert "truncated" in caught.value.detail
