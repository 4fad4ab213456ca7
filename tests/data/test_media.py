"""Image and video reading before the processor: MindSpeed-MM's pixel bounds and size fixes;
video files through PyAV (a stand-in here), and a clear skip reason when PyAV is missing."""

import sys

import numpy as np
import pytest
from PIL import Image

from mmfuse.data.media import load_video, regularize_image, sample_indices
from mmfuse.data.report import SampleError
from tests.data.fakes import FakeAV


def test_large_images_are_scaled_under_max_pixels_and_small_ones_over_min_pixels():
    big = regularize_image(Image.new("RGB", (640, 480)), 0, 262144)
    assert big.size == (591, 443) and big.width * big.height <= 262144
    small = regularize_image(Image.new("RGB", (40, 30)), 56 * 56, 262144)
    assert small.size == (64, 48)


def test_mode_sides_and_aspect_ratio_are_fixed():
    assert regularize_image(Image.new("RGBA", (64, 64)), 0, 10**6).mode == "RGB"
    assert regularize_image(Image.new("L", (10, 64)), 0, 10**6).size == (28, 64)
    assert regularize_image(Image.new("RGB", (28 * 201, 28)), 0, 10**7).size == (28 * 180, 28)


def test_nearest_resampling_keeps_colours_exact():
    im = Image.new("RGB", (100, 100), (200, 10, 30))
    im.paste((0, 0, 255), (0, 0, 50, 100))
    out = regularize_image(im, 0, 50 * 50)
    colours = {tuple(c) for c in np.asarray(out).reshape(-1, 3).tolist()}
    assert colours == {(200, 10, 30), (0, 0, 255)}


def test_frame_folders_are_sampled_to_maxlen_and_made_even(tmp_path):
    for i in range(9):
        Image.new("RGB", (32, 32), (i, i, i)).save(tmp_path / f"{i:03d}.png")
    frames, fps = load_video(tmp_path, 0, 10**6, fps=2.0, maxlen=5)
    assert len(frames) == 6 and fps == 2.0
    assert [f.getpixel((0, 0))[0] for f in frames] == [0, 2, 4, 6, 8, 8]
    picked = sample_indices(100, 10.0, 2.0, 64)   # 10 s at 2 fps: 20 frames spread over 100
    assert len(picked) == 20 and picked[0] == 0 and picked[-1] == 99
    assert len(sample_indices(1000, 100.0, 2.0, 64)) == 64


def test_video_file_without_pyav_is_a_skip_reason_that_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)   # `import av` raises ImportError
    (tmp_path / "clip.mp4").write_bytes(b"video")
    with pytest.raises(SampleError) as err:
        load_video(tmp_path / "clip.mp4", 0, 10**6, fps=2.0, maxlen=64)
    assert err.value.reason == "video_decoder_missing"
    assert "pip install av" in err.value.detail and "folder of frame images" in err.value.detail


def test_video_file_is_decoded_at_fps_up_to_maxlen_through_pyav(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", FakeAV(frames=20, seconds=10.0))
    (tmp_path / "clip.mp4").write_bytes(b"video")
    frames, rate = load_video(tmp_path / "clip.mp4", 0, 10**6, fps=1.0, maxlen=64)
    # 10 s at 1 fps: 10 of the 20 frames, evenly spread; the rate is frames per second of video
    assert [f.getpixel((0, 0))[0] // 10 for f in frames] == [0, 2, 4, 6, 8, 10, 12, 14, 16, 19]
    assert rate == 1.0
    frames, _ = load_video(tmp_path / "clip.mp4", 0, 10**6, fps=1.0, maxlen=5)
    assert len(frames) == 6 and frames[-1] is frames[-2]     # 5 frames made even


def test_corrupt_video_file_is_an_unreadable_video(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", FakeAV())
    (tmp_path / "bad.mp4").write_bytes(b"garbage")
    with pytest.raises(SampleError) as err:
        load_video(tmp_path / "bad.mp4", 0, 10**6, fps=2.0, maxlen=64)
    assert err.value.reason == "unreadable_video" and "bad.mp4" in err.value.detail


def _encode_mp4(path, frames: int, fps: int, size=(64, 48)) -> None:
    """A real MPEG-4 file whose frame i is flat grey level 12*i (PyAV's bundled FFmpeg encodes it)."""
    import av
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for i in range(frames):
            image = np.full((size[1], size[0], 3), 12 * i, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def test_real_mp4_is_decoded_with_pyav_at_the_asked_fps(tmp_path):
    _encode_mp4(tmp_path / "clip.mp4", frames=20, fps=4)          # 5 s of video
    frames, rate = load_video(tmp_path / "clip.mp4", 0, 10**6, fps=2.0, maxlen=64)
    assert len(frames) == 10 and rate == 2.0 and frames[0].size == (64, 48)
    # 10 of 20 frames evenly spread (0, 2, ..., 19); a lossy codec: grey levels within a few units
    want = sample_indices(20, 5.0, 2.0, 64) * 12
    got = np.array([f.getpixel((10, 10))[0] for f in frames])
    assert np.abs(got - want).max() <= 6, (got, want)
    frames, _ = load_video(tmp_path / "clip.mp4", 0, 10**6, fps=2.0, maxlen=3)
    assert len(frames) == 4 and frames[-1] is frames[-2]


def test_truncated_mp4_is_an_unreadable_video_naming_the_file(tmp_path):
    _encode_mp4(tmp_path / "clip.mp4", frames=8, fps=4)
    (tmp_path / "cut.mp4").write_bytes((tmp_path / "clip.mp4").read_bytes()[:200])
    with pytest.raises(SampleError) as err:
        load_video(tmp_path / "cut.mp4", 0, 10**6, fps=2.0, maxlen=64)
    assert err.value.reason == "unreadable_video" and "cut.mp4" in err.value.detail
