"""vision_rope_cos_sin (Qwen2.5-VL vision tower 2-D RoPE tables) against the reference and against
Hugging Face transformers' vision rotary embedding, position ids and apply_rotary_pos_emb_vision."""

import pytest
import torch

from mmfuse.ops import reference, rotary, vision_rope_cos_sin

GRIDS = [
    [[1, 4, 6], [2, 8, 4]],          # an image and a two-frame video
    [[1, 2, 2]],                     # one merge group
    [[3, 6, 10], [1, 14, 2], [1, 2, 16]],
    [[1, 0, 4], [1, 4, 4]],          # an empty image is skipped
]


@pytest.mark.parametrize("merge", [2, 1])
@pytest.mark.parametrize("grid", GRIDS)
def test_vectorised_tables_equal_the_per_image_reference(grid, merge):
    grid = torch.tensor(grid)
    cos, sin = vision_rope_cos_sin(grid, 80, spatial_merge_size=merge)
    ref_cos, ref_sin = reference.vision_rope_cos_sin(grid, 80, spatial_merge_size=merge)
    assert cos.shape == (int(grid.prod(-1).sum()), 40) and cos.dtype == torch.float32
    assert torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin)


def test_channels_rotate_by_row_then_column_in_merge_group_order():
    cos, sin = vision_rope_cos_sin(torch.tensor([[1, 4, 4]]), 16, theta=10000.0)
    angle = torch.atan2(sin, cos)                         # [16 patches, 8]; frequency 0 of each half is 1
    rows, cols = angle[:, 0].round(), angle[:, 4].round()
    # First 2x2 group is patches (0,0) (0,1) (1,0) (1,1), then the group to its right.
    assert rows[:8].tolist() == [0, 0, 1, 1, 0, 0, 1, 1]
    assert cols[:8].tolist() == [0, 1, 0, 1, 2, 3, 2, 3]


def test_list_grid_and_empty_grid():
    cos, _ = vision_rope_cos_sin([[1, 2, 4]], 80)
    assert cos.shape == (8, 40)
    cos, sin = vision_rope_cos_sin(torch.zeros(0, 3, dtype=torch.long), 80)
    assert cos.shape == sin.shape == (0, 40)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match=r"grid_thw must be \[N_images, 3\] \(t, h, w\), got \(3,\)"):
        vision_rope_cos_sin(torch.tensor([1, 4, 4]), 80)
    with pytest.raises(TypeError, match="grid_thw must hold integers, got torch.float32"):
        vision_rope_cos_sin(torch.tensor([[1.0, 4.0, 4.0]]), 80)
    with pytest.raises(ValueError, match="head_dim must be a positive multiple of 4"):
        vision_rope_cos_sin(torch.tensor([[1, 4, 4]]), 78)
    with pytest.raises(ValueError, match="h and w divisible by spatial_merge_size = 2"):
        vision_rope_cos_sin(torch.tensor([[1, 4, 5]]), 80)


# ---- parity with Hugging Face transformers ------------------------------------------------------

def _hf_vision_cos_sin(grid, head_dim, heads=2):
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLVisionRotaryEmbedding
    from transformers.vision_utils import get_vision_position_ids

    config = Qwen2_5_VLVisionConfig(hidden_size=head_dim * heads, num_heads=heads, depth=1, intermediate_size=32,
                                    out_hidden_size=32)
    emb = Qwen2_5_VLVisionRotaryEmbedding(config)
    position_ids = get_vision_position_ids(grid, config.spatial_merge_size)   # original patch order
    return emb(torch.empty(0), position_ids)                                  # [N, head_dim] each


@pytest.mark.parametrize("grid", [[[1, 4, 6], [2, 8, 4]], [[1, 16, 12]]])
def test_tables_match_hf_qwen2_5_vl_vision_rotary(grid):
    grid = torch.tensor(grid)
    cos_hf, sin_hf = _hf_vision_cos_sin(grid, 80)
    cos, sin = vision_rope_cos_sin(grid, 80)
    # HF repeats the 40 angles for the rotate-half partner; the fp32 values are computed identically.
    torch.testing.assert_close(torch.cat((cos, cos), -1), cos_hf, rtol=0, atol=0)
    torch.testing.assert_close(torch.cat((sin, sin), -1), sin_hf, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rotary_matches_hf_apply_rotary_pos_emb_vision(dtype):
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

    grid = torch.tensor([[1, 4, 6], [2, 8, 4]])
    cos_hf, sin_hf = _hf_vision_cos_sin(grid, 80)
    n = cos_hf.shape[0]
    q, k = torch.randn(n, 16, 80, dtype=dtype), torch.randn(n, 16, 80, dtype=dtype)
    q_hf, k_hf = apply_rotary_pos_emb_vision(q, k, cos_hf, sin_hf)    # fp32 math, cast back, as ours

    cos, sin = vision_rope_cos_sin(grid, 80)
    q_out, k_out = rotary(q, cos, sin), rotary(k, cos, sin)
    if dtype == torch.float32:
        torch.testing.assert_close(q_out, q_hf, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(k_out, k_hf, rtol=1e-6, atol=1e-6)
    else:  # one rounding of the same fp32 value: equal up to the fp32 rounding noise crossing a bf16 tie
        for got, want in ((q_out, q_hf), (k_out, k_hf)):
            ulp = torch.finfo(dtype).eps * want.float().abs().clamp_min(2 ** -10)
            assert ((got.float() - want.float()).abs() <= ulp).all()
            assert (got == want).float().mean() > 0.99
