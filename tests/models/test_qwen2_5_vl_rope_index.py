"""M-RoPE position ids of packed streams equal transformers' get_rope_index per sample."""

import pytest
import torch

from mmfuse.models.qwen2_5_vl.rope_index import rope_position_ids
from tests.models.qwen_fixtures import hf_twin, mm_token_types, sample, tiny_config

CASES = {
    "text_only": [[11]],
    "one_image": [[5, ("image", (1, 4, 6)), 7]],
    "two_images_of_different_sizes": [[3, ("image", (1, 2, 2)), 4, ("image", (1, 6, 4)), 2]],
    "video": [[4, ("video", (3, 4, 4)), 5]],
    "mix_packed": [[6], [2, ("image", (1, 4, 2)), 3, ("video", (2, 2, 6)), 1], [3, ("image", (1, 2, 8)), 9]],
}


def _ours_and_hf(cfg, samples, seconds=None):
    gen = torch.Generator().manual_seed(0)
    hf = hf_twin(cfg)
    streams, img, vid = [], [], []
    for parts in samples:
        streams.append(torch.tensor(sample(cfg, parts, gen)))
        img += [p[1] for p in parts if not isinstance(p, int) and p[0] == "image"]
        vid += [p[1] for p in parts if not isinstance(p, int) and p[0] == "video"]
    ids = torch.cat(streams)
    cu = torch.tensor([0] + [len(s) for s in streams]).cumsum(0).to(torch.int32)
    img_t = torch.tensor(img) if img else None
    vid_t = torch.tensor(vid) if vid else None
    sec_t = torch.tensor(seconds) if seconds is not None else None
    ours = rope_position_ids(ids, cu, img_t, vid_t, sec_t, image_token_id=cfg.image_token_id,
                             video_token_id=cfg.video_token_id, spatial_merge_size=cfg.vision.spatial_merge_size,
                             tokens_per_second=cfg.vision.tokens_per_second)
    ref, i_img, i_vid = [], 0, 0
    for s in streams:                       # transformers, one sample at a time
        types = mm_token_types(cfg, s)
        k_img = int((types == 1).sum())
        k_vid = int((types == 2).sum())
        m2 = cfg.vision.spatial_merge_size ** 2
        g_img, g_vid = [], []
        while k_img > 0:
            g_img.append(img[i_img]); k_img -= img[i_img][0] * img[i_img][1] * img[i_img][2] // m2; i_img += 1
        while k_vid > 0:
            g_vid.append(vid[i_vid]); k_vid -= vid[i_vid][0] * vid[i_vid][1] * vid[i_vid][2] // m2; i_vid += 1
        sec = None if seconds is None else torch.tensor(seconds[i_vid - len(g_vid):i_vid])
        if not g_img and not g_vid:
            ref.append(torch.arange(len(s)).expand(3, -1))
            continue
        pos, _ = hf.model.get_rope_index(s[None], types[None], torch.tensor(g_img) if g_img else None,
                                         torch.tensor(g_vid) if g_vid else None, sec)
        ref.append(pos[:, 0])
    return ours, torch.cat(ref, dim=1)


@pytest.mark.parametrize("case", sorted(CASES))
def test_position_ids_equal_transformers_per_sample(case):
    ours, ref = _ours_and_hf(tiny_config(), CASES[case])
    assert torch.equal(ours, ref)


def test_video_seconds_per_grid_scale_the_temporal_stream():
    cfg = tiny_config()
    ours, ref = _ours_and_hf(cfg, [[2, ("video", (4, 2, 2)), 3], [1, ("video", (3, 4, 2))]], seconds=[0.5, 1.5])
    assert torch.equal(ours, ref)
    assert ours[0].max() > ours[1].max()   # the temporal stream really was scaled


def test_positions_restart_in_every_packed_sample():
    cfg = tiny_config()
    ids = torch.arange(10)
    pos = rope_position_ids(ids, torch.tensor([0, 4, 10], dtype=torch.int32), image_token_id=cfg.image_token_id,
                            video_token_id=cfg.video_token_id)
    assert pos[0].tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 4, 5]


def test_pad_run_shorter_than_its_grid_is_an_error():
    cfg = tiny_config()
    ids = torch.tensor([1, cfg.image_token_id, cfg.image_token_id, 2])
    with pytest.raises(ValueError, match="consecutive pad tokens"):
        rope_position_ids(ids, None, torch.tensor([[1, 4, 4]]), image_token_id=cfg.image_token_id,
                          video_token_id=cfg.video_token_id)


def test_grid_rows_without_spans_are_an_error():
    cfg = tiny_config()
    with pytest.raises(ValueError, match="image_grid_thw has 2 rows"):
        rope_position_ids(torch.tensor([1] + [cfg.image_token_id] * 4), None, torch.tensor([[1, 4, 4], [1, 2, 2]]),
                          image_token_id=cfg.image_token_id, video_token_id=cfg.video_token_id)
