"""Qwen2-VL image processor: exact parity with transformers' PIL processor on images, smart_resize
parity, video flattening against an explicit per-patch formula, grid/token helpers, config I/O
and error messages."""

import json
import random

import numpy as np
import PIL.Image
import pytest
import torch

from mmfuse.data.image_processor import Qwen2VLImageProcessor, num_image_tokens, smart_resize

hf_pil = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")
HFProcessor = hf_pil.Qwen2VLImageProcessorPil

QWEN25_PIXELS = dict(min_pixels=3136, max_pixels=12845056)  # the released Qwen2.5-VL preprocessor_config.json


def _rng(seed=0):
    return np.random.default_rng(seed)


def _pil(rng, h, w, mode):
    channels = {"RGB": 3, "RGBA": 4, "L": 1, "LA": 2}
    if mode == "P":  # palette image with a transparent index: HF composites it onto white
        im = PIL.Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), "L").convert("P")
        im.info["transparency"] = 7
        return im
    a = rng.integers(0, 256, (h, w, channels[mode]), dtype=np.uint8)
    return PIL.Image.fromarray(a[..., 0] if mode == "L" else a, mode)


def _hf(images, **kwargs):
    out = HFProcessor(**kwargs)(images, return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"]


# ---- smart_resize ---------------------------------------------------------------------------------

def test_smart_resize_equals_hf_on_many_sizes():
    rnd = random.Random(0)
    sizes = [(1, 1), (1, 200), (200, 1), (13, 13), (14, 14), (27, 29), (28, 28), (42, 42), (70, 70),
             (56, 56), (55, 57), (10000, 50), (50, 10000), (4000, 3000), (3000, 4000), (1001, 1003),
             (224, 224), (1080, 1920), (20000, 20000), (3, 599)]
    sizes += [(rnd.randint(1, 5000), rnd.randint(1, 5000)) for _ in range(3000)]
    sizes += [(rnd.randint(1, 60), rnd.randint(1, 60)) for _ in range(500)]
    for kwargs in ({}, QWEN25_PIXELS, dict(factor=32, min_pixels=1024, max_pixels=4096 * 32)):
        for h, w in sizes:
            if max(h, w) / min(h, w) > 200:
                continue
            assert smart_resize(h, w, **kwargs) == hf_pil.smart_resize(h, w, **kwargs), (h, w, kwargs)


@pytest.mark.parametrize("h, w", [(1, 201), (201, 1), (2, 401), (5, 20000)])
def test_smart_resize_rejects_aspect_ratio_over_200_like_hf(h, w):
    with pytest.raises(ValueError):
        hf_pil.smart_resize(h, w)
    with pytest.raises(ValueError, match=rf"aspect ratio .* {h}x{w} .*exceeds 200"):
        smart_resize(h, w)


def test_smart_resize_accepts_ratio_exactly_200_and_rejects_nonpositive():
    assert smart_resize(1, 200) == hf_pil.smart_resize(1, 200)
    with pytest.raises(ValueError, match="must be positive"):
        smart_resize(0, 10)


# ---- images: exact parity with Qwen2VLImageProcessorPil -------------------------------------------

def _mixed_images():
    rng = _rng(1)
    return [
        _pil(rng, 37, 91, "RGB"), _pil(rng, 200, 33, "RGBA"), _pil(rng, 512, 300, "L"),
        _pil(rng, 30, 41, "LA"), _pil(rng, 45, 29, "P"),
        _pil(rng, 5, 7, "RGB"),                        # below min_pixels: scaled up
        _pil(rng, 1300, 1100, "RGB"),                  # above max_pixels: scaled down
        _pil(rng, 28, 84, "RGB"),                      # already on the grid: not resampled
        rng.integers(0, 256, (45, 60, 3), dtype=np.uint8),
        rng.integers(0, 256, (61, 33, 4), dtype=np.uint8),   # alpha blended in float64 like HF
        rng.integers(0, 256, (19, 100, 1), dtype=np.uint8),
    ]


def test_pixel_values_equal_hf_pil_processor_exactly():
    images = _mixed_images()
    ref, ref_grid = _hf(images)
    out = Qwen2VLImageProcessor()(images)
    assert out["pixel_values"].dtype == torch.float32 and out["image_grid_thw"].dtype == torch.int64
    assert torch.equal(out["image_grid_thw"], ref_grid)
    assert torch.equal(out["pixel_values"], ref)  # bit-exact: max abs diff 0


@pytest.mark.parametrize("kwargs", [
    QWEN25_PIXELS,
    dict(do_rescale=False, do_normalize=False),
    dict(do_normalize=False, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5]),
    dict(min_pixels=64 * 28 * 28, max_pixels=256 * 28 * 28, temporal_patch_size=1),
])
def test_settings_match_hf(kwargs):
    rng = _rng(2)
    images = [_pil(rng, 900, 1250, "RGB"), _pil(rng, 37, 91, "RGBA")]
    ref, ref_grid = _hf(images, **kwargs)
    out = Qwen2VLImageProcessor(**kwargs)(images)
    assert torch.equal(out["image_grid_thw"], ref_grid)
    assert torch.equal(out["pixel_values"], ref)


def test_grayscale_2d_array_equals_single_channel_array():
    a = _rng(3).integers(0, 256, (40, 50), dtype=np.uint8)
    proc = Qwen2VLImageProcessor()
    assert torch.equal(proc(a)["pixel_values"], proc(a[..., None])["pixel_values"])


# ---- videos ---------------------------------------------------------------------------------------

def _explicit_video_rows(frames_THWC, proc):
    """Reference flattening written patch by patch: HF's normalisation, the last frame repeated to
    a multiple of temporal_patch_size, rows in (t, merged row, merged col, row, col) order, each
    row ordered (channel, frame, y, x)."""
    p, m, tp = proc.patch_size, proc.merge_size, proc.temporal_patch_size
    x = (frames_THWC.astype(np.float64) * (1 / 255)).astype(np.float32)
    x = (x - np.array(proc.image_mean, np.float32)) / np.array(proc.image_std, np.float32)
    while len(x) % tp:
        x = np.concatenate([x, x[-1:]])
    T, H, W, _ = x.shape
    rows = []
    for t in range(T // tp):
        for bh in range(H // p // m):
            for bw in range(W // p // m):
                for mh in range(m):
                    for mw in range(m):
                        y0, x0 = (bh * m + mh) * p, (bw * m + mw) * p
                        cube = x[t * tp:(t + 1) * tp, y0:y0 + p, x0:x0 + p, :]  # frame, y, x, channel
                        rows.append(cube.transpose(3, 0, 1, 2).reshape(-1))
    return np.stack(rows), (T // tp, H // p, W // p)


def test_video_rows_match_explicit_formula_with_last_frame_padding():
    # 3 frames on the 28-grid (no resampling): padded to 4 frames, grid (2, 4, 6).
    proc = Qwen2VLImageProcessor()
    video = _rng(4).integers(0, 256, (3, 56, 84, 3), dtype=np.uint8)
    ref, grid = _explicit_video_rows(video, proc)
    out = proc(videos=[video])
    assert out["video_grid_thw"].tolist() == [list(grid)] == [[2, 4, 6]]
    assert torch.equal(out["pixel_values_videos"], torch.from_numpy(ref))
    assert "pixel_values" not in out


def test_video_frames_are_resized_like_hf_images():
    # Each frame of a resized video equals HF's processing of that frame as an image.
    rng = _rng(5)
    frames = [_pil(rng, 37, 91, "RGB"), _pil(rng, 37, 91, "RGBA")]
    out = Qwen2VLImageProcessor()(videos=[frames])
    vid = out["pixel_values_videos"].reshape(-1, 3, 2, 14, 14)
    for k, frame in enumerate(frames):
        ref, ref_grid = _hf([frame])
        assert torch.equal(out["video_grid_thw"], ref_grid)
        assert torch.equal(vid[:, :, k], ref.reshape(-1, 3, 2, 14, 14)[:, :, 0])


def test_video_inputs_agree_and_still_video_equals_image():
    rng = _rng(6)
    video = rng.integers(0, 256, (2, 50, 70, 3), dtype=np.uint8)
    proc = Qwen2VLImageProcessor()
    as_array = proc(videos=video)  # one [T, H, W, C] array alone is one video
    as_frames = proc(videos=[[PIL.Image.fromarray(f) for f in video]])
    assert torch.equal(as_array["pixel_values_videos"], as_frames["pixel_values_videos"])
    still = proc(images=[video[0]], videos=[np.stack([video[0], video[0]])])
    assert torch.equal(still["pixel_values"], still["pixel_values_videos"])
    assert torch.equal(still["image_grid_thw"], still["video_grid_thw"])


# ---- grid and token helpers -----------------------------------------------------------------------

def test_grid_helpers_agree_with_processing():
    proc = Qwen2VLImageProcessor(**QWEN25_PIXELS)
    hf = HFProcessor(**QWEN25_PIXELS)
    rng = _rng(7)
    images = [_pil(rng, h, w, "RGB") for h, w in [(37, 91), (5, 7), (300, 512), (28, 5000)]]
    out = proc(images)
    grids = [proc.image_grid_for_size(im.height, im.width) for im in images]
    assert out["image_grid_thw"].tolist() == [list(g) for g in grids]
    tokens = num_image_tokens(out["image_grid_thw"], proc.merge_size)
    assert sum(tokens) * proc.merge_size ** 2 == len(out["pixel_values"])
    assert tokens == [proc.num_tokens(g) for g in grids]
    assert [t * 4 for t in tokens] == [hf.get_number_of_image_patches(im.height, im.width) for im in images]

    video = rng.integers(0, 256, (5, 40, 60, 3), dtype=np.uint8)
    vout = proc(videos=[video])
    assert vout["video_grid_thw"].tolist() == [list(proc.video_grid_for_size(5, 40, 60))] == [[3, 4, 6]]
    assert num_image_tokens(vout["video_grid_thw"][0]) * 4 == len(vout["pixel_values_videos"])


def test_num_image_tokens_forms():
    assert num_image_tokens((1, 4, 6)) == 6
    assert num_image_tokens([[1, 4, 6], [2, 2, 2]], merge_size=2) == [6, 2]
    assert num_image_tokens(torch.tensor([[1, 8, 8]]), merge_size=1) == [64]
    with pytest.raises(ValueError, match="multiples of merge_size"):
        num_image_tokens((1, 3, 4))


# ---- config ---------------------------------------------------------------------------------------

def test_reads_released_config_and_round_trips(tmp_path):
    released = {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2,
                "merge_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_std": [0.26862954, 0.26130258, 0.27577711],
                "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor"}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(released))
    proc = Qwen2VLImageProcessor.from_pretrained(tmp_path)
    assert proc == Qwen2VLImageProcessor(**QWEN25_PIXELS)
    sized = Qwen2VLImageProcessor.from_dict({"size": {"shortest_edge": 1000, "longest_edge": 2000}})
    assert (sized.min_pixels, sized.max_pixels) == (1000, 2000)
    legacy = Qwen2VLImageProcessor.from_dict({"size": {"min_pixels": 10, "max_pixels": 20}})
    assert (legacy.min_pixels, legacy.max_pixels) == (10, 20)

    custom = Qwen2VLImageProcessor(min_pixels=4096, max_pixels=300000, do_convert_rgb=False)
    saved = custom.save_pretrained(tmp_path / "out")
    assert Qwen2VLImageProcessor.from_pretrained(saved) == custom
    # transformers reads the saved dict into the same settings.
    image = _pil(_rng(8), 700, 650, "RGB")
    ref, _ = _hf(image, **{k: v for k, v in custom.to_dict().items() if k != "image_processor_type"})
    assert torch.equal(custom(image)["pixel_values"], ref)
    assert HFProcessor.from_dict(custom.to_dict()).size["longest_edge"] == 300000


def test_invalid_config_names_the_fields():
    with pytest.raises(ValueError, match="min_pixels 10 exceeds max_pixels 5"):
        Qwen2VLImageProcessor(min_pixels=10, max_pixels=5)
    with pytest.raises(ValueError, match="image_std has a zero"):
        Qwen2VLImageProcessor(image_std=(1.0, 0.0, 1.0))


# ---- errors ---------------------------------------------------------------------------------------

def _ok():
    return np.zeros((30, 30, 3), np.uint8)


@pytest.mark.parametrize("call, error, message", [
    (lambda p: p(), ValueError, "pass images and/or videos"),
    (lambda p: p([]), ValueError, "images is empty"),
    (lambda p: p([_ok(), PIL.Image.new("RGB", (0, 5))]), ValueError, r"image 1 has zero size \(height 5, width 0\)"),
    (lambda p: p(np.zeros((0, 4, 3), np.uint8)), ValueError, "image 0 has zero size"),
    (lambda p: p([_ok(), np.zeros((1, 300, 3), np.uint8)]), ValueError, r"image 1: .*aspect ratio 300 .*1x300"),
    (lambda p: p(np.zeros((8, 8, 3), np.float32)), TypeError, "image 0: expected a uint8 array, got dtype float32"),
    (lambda p: p(np.zeros((8, 8, 2), np.uint8)), ValueError, r"image 0: expected a channels-last .*\(8, 8, 2\)"),
    (lambda p: p(np.zeros((2, 8, 8, 3), np.uint8)), ValueError, "4-D array .* is ambiguous"),
    (lambda p: p(torch.zeros(8, 8, 3)), TypeError, "image 0: expected a PIL image or a uint8 numpy array"),
    (lambda p: p(videos=[PIL.Image.new("RGB", (8, 8))]), TypeError, "video 0: a video is a list of frames"),
    (lambda p: p(videos=[[]]), ValueError, "video 0 has no frames"),
    (lambda p: p(videos=[[_ok(), np.zeros((31, 30, 3), np.uint8)]]), ValueError, "video 0: frames differ in size"),
    (lambda p: p(videos=[[_ok(), np.zeros((8, 8), np.int16)]]), TypeError, "video 0, frame 1: expected a uint8"),
])
def test_errors_name_the_input(call, error, message):
    with pytest.raises(error, match=message):
        call(Qwen2VLImageProcessor())


def test_no_resize_requires_grid_sizes_and_no_rgb_requires_three_channels():
    with pytest.raises(ValueError, match="multiples of 28"):
        Qwen2VLImageProcessor(do_resize=False)(np.zeros((30, 56, 3), np.uint8))
    out = Qwen2VLImageProcessor(do_resize=False)(np.zeros((28, 56, 3), np.uint8))
    assert out["image_grid_thw"].tolist() == [[1, 2, 4]]
    with pytest.raises(ValueError, match="must already be 3-channel"):
        Qwen2VLImageProcessor(do_convert_rgb=False)(PIL.Image.new("L", (30, 30)))
