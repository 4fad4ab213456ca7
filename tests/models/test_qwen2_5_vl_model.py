"""mmfuse's Qwen2.5-VL computes what transformers' Qwen2_5_VLForConditionalGeneration computes:
logits and loss on text, images of different sizes, videos and packed mixes, in fp32 and bf16."""

import pytest
import torch

from mmfuse.models.qwen2_5_vl import Qwen2_5_VL
from tests.models.qwen_fixtures import hf_twin, mm_token_types, pixels_for, sample, tiny_config

FP32_RTOL = 1e-4


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(hf, ours, cfg): a random transformers model and mmfuse's model loaded from its save_pretrained."""
    torch.manual_seed(0)
    cfg = tiny_config()
    hf = hf_twin(cfg)
    d = tmp_path_factory.mktemp("hf_tiny")
    hf.save_pretrained(d)
    return hf, Qwen2_5_VL.from_pretrained(d), cfg


def _rel(got, ref):
    return float((got.double() - ref.double()).abs().max() / ref.double().abs().max())


def _hf_sample(hf, cfg, ids, pix, grid, vpix, vgrid, seconds=None, labels=None):
    kw = dict(input_ids=ids[None], mm_token_type_ids=mm_token_types(cfg, ids)[None], labels=labels)
    if grid:
        kw.update(pixel_values=pix, image_grid_thw=torch.tensor(grid))
    if vgrid:
        kw.update(pixel_values_videos=vpix, video_grid_thw=torch.tensor(vgrid))
        if seconds is not None:
            kw.update(second_per_grid_ts=torch.tensor(seconds))
    with torch.no_grad():
        out = hf(**kw)
    return out.logits[0], out.loss


def _build(cfg, samples, gen):
    """Packed stream + per-sample pieces for a list of samples (parts as in qwen_fixtures.sample)."""
    per = []
    for parts in samples:
        ids = torch.tensor(sample(cfg, parts, gen))
        grid = [p[1] for p in parts if not isinstance(p, int) and p[0] == "image"]
        vgrid = [p[1] for p in parts if not isinstance(p, int) and p[0] == "video"]
        per.append((ids, pixels_for(cfg, grid, gen) if grid else None, grid,
                    pixels_for(cfg, vgrid, gen) if vgrid else None, vgrid))
    return per


def _packed(per):
    ids = torch.cat([p[0] for p in per])
    cu = torch.tensor([0] + [len(p[0]) for p in per]).cumsum(0).to(torch.int32)
    pix = [p[1] for p in per if p[1] is not None]
    vpix = [p[3] for p in per if p[3] is not None]
    grid = [g for p in per for g in p[2]]
    vgrid = [g for p in per for g in p[4]]
    return dict(input_ids=ids, cu_seqlens=cu, pixel_values=torch.cat(pix) if pix else None,
                image_grid_thw=torch.tensor(grid) if grid else None,
                pixel_values_videos=torch.cat(vpix) if vpix else None,
                video_grid_thw=torch.tensor(vgrid) if vgrid else None)


CASES = {
    "text_only": [[23]],
    "one_image": [[5, ("image", (1, 6, 10)), 7]],
    "two_images_of_different_sizes": [[3, ("image", (1, 4, 4)), 4, ("image", (1, 10, 6)), 2]],
    "video": [[4, ("video", (2, 4, 6)), 5]],
    "packed_mix": [[9], [2, ("image", (1, 4, 8)), 3, ("video", (2, 2, 4)), 1], [3, ("image", (1, 12, 4)), 6]],
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_equal_transformers_fp32(pair, case):
    hf, ours, cfg = pair
    per = _build(cfg, CASES[case], torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = ours(**_packed(per)).logits
    ref = torch.cat([_hf_sample(hf, cfg, *p)[0] for p in per])
    assert got.shape == ref.shape
    assert _rel(got, ref) <= FP32_RTOL


def test_unpadded_batch_equals_transformers(pair):
    hf, ours, cfg = pair
    ids = torch.randint(0, 400, (3, 17))
    with torch.no_grad():
        assert _rel(ours(ids).logits, hf(input_ids=ids).logits) <= FP32_RTOL


@pytest.mark.parametrize("case", ["text_only", "two_images_of_different_sizes", "video"])
def test_loss_equals_transformers(pair, case):
    hf, ours, cfg = pair
    per = _build(cfg, CASES[case], torch.Generator().manual_seed(2))
    ids = per[0][0]
    labels = ids.clone()
    labels[:4] = -100
    labels[(ids == cfg.image_token_id) | (ids == cfg.video_token_id)] = -100
    _, ref = _hf_sample(hf, cfg, *per[0], labels=labels[None])
    with torch.no_grad():
        got = ours(**_packed(per), labels=labels).loss
    assert abs(float(got) - float(ref)) <= 1e-5 * abs(float(ref))


def test_packed_loss_is_the_token_weighted_mean_of_sample_losses(pair):
    _, ours, cfg = pair
    per = _build(cfg, CASES["packed_mix"], torch.Generator().manual_seed(3))
    batch = _packed(per)
    labels = batch["input_ids"].clone()
    with torch.no_grad():
        packed = ours(**batch, labels=labels)
        sums, counts = 0.0, 0
        for p in per:
            one = ours(**_packed([p]), labels=p[0].clone())
            sums += float(one.loss_sum)
            counts += one.num_label_tokens
    assert packed.num_label_tokens == counts == len(labels) - len(per)
    assert abs(float(packed.loss) - sums / counts) <= 1e-5 * sums / counts


def test_bf16_logits_within_twice_the_transformers_bf16_error(pair):
    hf, ours, cfg = pair
    per = _build(cfg, CASES["packed_mix"], torch.Generator().manual_seed(4))
    ref64 = torch.cat([_hf_sample(hf.double(), cfg, p[0], *(None if x is None else x.double() if torch.is_tensor(x)
                                                                 else x for x in p[1:]))[0] for p in per])
    hf.float()
    hf_bf = hf_twin_copy(hf).to(torch.bfloat16)
    ref_bf = torch.cat([_hf_sample(hf_bf, cfg, p[0], *(x.bfloat16() if torch.is_tensor(x) else x for x in p[1:]))[0]
                        for p in per])
    ours_bf = Qwen2_5_VL(cfg)
    ours_bf.load_state_dict(ours.state_dict())
    ours_bf.to(torch.bfloat16)
    batch = _packed(per)
    for k in ("pixel_values", "pixel_values_videos"):
        batch[k] = batch[k].bfloat16()
    with torch.no_grad():
        got = ours_bf(**batch).logits
    hf_err = float((ref_bf.double() - ref64).abs().max())
    our_err = float((got.double() - ref64).abs().max())
    assert our_err <= 2 * hf_err + 1e-6, (our_err, hf_err)


def hf_twin_copy(hf):
    import copy
    return copy.deepcopy(hf)


def test_image_embeddings_and_pad_tokens_must_agree(pair):
    _, ours, cfg = pair
    per = _build(cfg, [[3, ("image", (1, 4, 4)), 2]], torch.Generator().manual_seed(5))
    batch = _packed(per)
    batch["image_grid_thw"] = torch.tensor([[1, 4, 8]])
    batch["pixel_values"] = torch.randn(32, cfg.vision.patch_dim)
    with pytest.raises(ValueError, match="pad tokens"):
        ours(**batch)
