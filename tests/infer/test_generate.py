"""Generation with the key/value cache returns what transformers' generate(do_sample=False) returns:
text, images, videos and packed batches; end tokens stop a sequence and the rest go on unchanged;
sampling is filtered and seeded as documented."""

import pytest
import torch

from mmfuse.data.packing import ProcessedSample
from mmfuse.infer import GenerationConfig, generate
from mmfuse.infer.generate import next_tokens
from mmfuse.models.common.kv_cache import KVCache
from mmfuse.models.qwen2_5_vl import Qwen2_5_VL
from tests.models.qwen_fixtures import hf_twin, mm_token_types, pixels_for, sample, tiny_config
from tests.models.test_qwen2_5_vl_model import CASES   # text, images, a video, a packed mix

NEW_TOKENS = 12


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(hf, ours, cfg). Matrices are scaled up from the 0.02 init: with near-uniform logits a random
    model repeats one token, and a wrong position or cache entry would go unseen."""
    torch.manual_seed(0)
    cfg = tiny_config()
    hf = hf_twin(cfg)
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() == 2:
                p.mul_(10)
    d = tmp_path_factory.mktemp("hf_gen")
    hf.save_pretrained(d)
    return hf, Qwen2_5_VL.from_pretrained(d), cfg


def _prompts(cfg, case, seed=1):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for parts in CASES[case]:
        ids = torch.tensor(sample(cfg, parts, gen))
        grid = [p[1] for p in parts if not isinstance(p, int) and p[0] == "image"]
        vgrid = [p[1] for p in parts if not isinstance(p, int) and p[0] == "video"]
        out.append(ProcessedSample(
            input_ids=ids, labels=torch.full_like(ids, -100),
            pixel_values=pixels_for(cfg, grid, gen) if grid else None,
            image_grid_thw=torch.tensor(grid) if grid else None,
            pixel_values_videos=pixels_for(cfg, vgrid, gen) if vgrid else None,
            video_grid_thw=torch.tensor(vgrid) if vgrid else None))
    return out


def _hf_generate(hf, cfg, p: ProcessedSample, n: int, eos=None) -> list[int]:
    kw = dict(input_ids=p.input_ids[None], mm_token_type_ids=mm_token_types(cfg, p.input_ids)[None],
              max_new_tokens=n, do_sample=False)
    if p.image_grid_thw is not None:
        kw.update(pixel_values=p.pixel_values, image_grid_thw=p.image_grid_thw)
    if p.video_grid_thw is not None:
        kw.update(pixel_values_videos=p.pixel_values_videos, video_grid_thw=p.video_grid_thw)
    if eos is not None:
        kw.update(eos_token_id=eos, pad_token_id=eos)
    with torch.no_grad():
        return hf.generate(**kw)[0, len(p.input_ids):].tolist()


@pytest.mark.parametrize("case", sorted(CASES))
def test_greedy_equals_transformers_generate(pair, case):
    hf, ours, cfg = pair
    prompts = _prompts(cfg, case)
    got = generate(ours, prompts, GenerationConfig(max_new_tokens=NEW_TOKENS))   # all prompts in one batch
    for p, g in zip(prompts, got):
        ref = _hf_generate(hf, cfg, p, NEW_TOKENS)
        assert g.tokens == ref
        assert not g.finished
    assert len({t for g in got for t in g.tokens}) > NEW_TOKENS // 2   # the test model does not repeat itself


def test_greedy_with_the_triton_kernels_equals_transformers_generate(pair, monkeypatch):
    """The same generation through the Triton kernels (on a GPU when there is one, else in Triton's
    interpreter): prefill with packed prompts, decode steps over cache buffers with query-less tails."""
    hf, ours, cfg = pair
    prompts = _prompts(cfg, "packed_mix")
    if torch.cuda.is_available():
        import copy

        model = copy.deepcopy(ours).to("cuda")
    else:
        monkeypatch.setenv("MMFUSE_BACKEND", "triton")
        model = ours
    got = generate(model, prompts, GenerationConfig(max_new_tokens=5))
    for p, g in zip(prompts, got):
        assert g.tokens == _hf_generate(hf, cfg, p, 5)


def test_greedy_equals_recomputing_the_whole_sequence_each_step(pair):
    """The cached path against a plain forward over prompt + tokens so far (no cache), per step."""
    _, ours, cfg = pair
    p = _prompts(cfg, "one_image")[0]
    got = generate(ours, [p], GenerationConfig(max_new_tokens=6))[0].tokens
    ids = p.input_ids.tolist()
    with torch.no_grad():
        for _ in range(6):
            logits = ours(torch.tensor(ids), pixel_values=p.pixel_values, image_grid_thw=p.image_grid_thw).logits
            ids.append(int(logits[-1].argmax()))
    assert got == ids[len(p.input_ids):]


def test_an_end_token_stops_its_sequence_and_the_others_go_on(pair):
    hf, ours, cfg = pair
    prompts = _prompts(cfg, "packed_mix")
    free = generate(ours, prompts, GenerationConfig(max_new_tokens=NEW_TOKENS))
    eos = free[1].tokens[3]                      # the second prompt's 4th token ends it
    got = generate(ours, prompts, GenerationConfig(max_new_tokens=NEW_TOKENS, eos_token_ids=(eos,)))
    for p, g, f in zip(prompts, got, free):
        stop = f.tokens.index(eos) + 1 if eos in f.tokens else NEW_TOKENS
        assert g.tokens == f.tokens[:stop]
        assert g.finished == (eos in f.tokens)
        assert g.tokens == _hf_generate(hf, cfg, p, NEW_TOKENS, eos=eos)[:len(g.tokens)]
    assert got[1].finished and len(got[1].tokens) <= 4
    assert any(not g.finished for g in got)     # the batch shrank and went on


def test_on_tokens_sees_every_step_of_the_unfinished_prompts(pair):
    _, ours, cfg = pair
    prompts = _prompts(cfg, "packed_mix")
    free = generate(ours, prompts, GenerationConfig(max_new_tokens=NEW_TOKENS))
    eos = free[1].tokens[3]
    seen = [[] for _ in prompts]

    def on_tokens(rows, tokens):
        assert len(rows) == len(tokens)
        for r, t in zip(rows, tokens):
            seen[r].append(t)

    got = generate(ours, prompts, GenerationConfig(max_new_tokens=NEW_TOKENS, eos_token_ids=(eos,)), on_tokens)
    assert seen == [g.tokens for g in got]


def test_bf16_model_generates_and_mostly_agrees_with_fp32(pair):
    _, ours, cfg = pair
    prompts = _prompts(cfg, "one_image")
    ref = generate(ours, prompts, GenerationConfig(max_new_tokens=4))[0].tokens
    bf = Qwen2_5_VL(cfg)
    bf.load_state_dict(ours.state_dict())
    bf.to(torch.bfloat16)
    bf_prompts = [ProcessedSample(**{**p.__dict__, "pixel_values": p.pixel_values.bfloat16()}) for p in prompts]
    got = generate(bf, bf_prompts, GenerationConfig(max_new_tokens=4))[0].tokens
    assert len(got) == 4
    assert got[0] == ref[0]


def test_seeded_sampling_repeats_and_top_k_1_is_greedy(pair):
    _, ours, cfg = pair
    prompts = _prompts(cfg, "packed_mix")
    greedy = [g.tokens for g in generate(ours, prompts, GenerationConfig(max_new_tokens=8))]
    sampled = GenerationConfig(max_new_tokens=8, temperature=1.5, seed=7)
    a = [g.tokens for g in generate(ours, prompts, sampled)]
    b = [g.tokens for g in generate(ours, prompts, sampled)]
    assert a == b
    assert a != greedy
    top1 = GenerationConfig(max_new_tokens=8, temperature=1.0, top_k=1, seed=3)
    assert [g.tokens for g in generate(ours, prompts, top1)] == greedy


def test_top_k_and_top_p_keep_only_the_tokens_they_should():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(4000, 4)
    gen = torch.Generator().manual_seed(0)
    draws = next_tokens(logits, GenerationConfig(temperature=1.0, top_k=2), gen)
    assert set(draws.tolist()) == {0, 1}
    draws = next_tokens(logits, GenerationConfig(temperature=1.0, top_p=0.7), gen)   # 0.5 < 0.7 <= 0.8
    assert set(draws.tolist()) == {0, 1}
    draws = next_tokens(logits, GenerationConfig(temperature=1.0, top_p=0.5), gen)
    assert set(draws.tolist()) == {0}
    draws = next_tokens(logits, GenerationConfig(temperature=1.0), gen)
    assert set(draws.tolist()) == {0, 1, 2, 3}
    share = float((draws == 0).float().mean())
    assert abs(share - 0.5) < 0.05


@pytest.mark.parametrize("bad, msg", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_k=-2), "top_k"),
    (dict(top_p=0.0), "top_p"),
])
def test_bad_generation_settings_are_named(pair, bad, msg):
    _, ours, cfg = pair
    with pytest.raises(ValueError, match=msg):
        generate(ours, _prompts(cfg, "text_only"), GenerationConfig(**bad))


def test_an_empty_prompt_is_an_error(pair):
    _, ours, _ = pair
    empty = ProcessedSample(input_ids=torch.zeros(0, dtype=torch.int64), labels=torch.zeros(0, dtype=torch.int64),
                            where="q.jsonl[3]")
    with pytest.raises(ValueError, match=r"q.jsonl\[3\] has no tokens"):
        generate(ours, [empty], GenerationConfig())


def test_kv_cache_grows_keeps_rows_and_checks_the_batch():
    cache = KVCache(num_layers=1, batch=2)
    layer = cache.layers[0]
    q = torch.randn(40, 2, 8)
    k = torch.randn(40, 1, 8)
    v = torch.randn(40, 1, 8)
    cu = torch.tensor([0, 30, 40], dtype=torch.int32)
    layer.attend(q, k, v, cu)          # past the initial capacity of 16
    assert cache.lengths == [30, 10]
    cache.keep([1])
    out = layer.attend(q[:1], k[:1], v[:1], torch.tensor([0, 1], dtype=torch.int32))
    assert cache.lengths == [11]
    keys = torch.cat([k[30:40], k[:1]])
    vals = torch.cat([v[30:40], v[:1]])
    q_h, k_h, v_h = (x.double().transpose(0, 1) for x in (q[:1], keys, vals))   # [heads, tokens, d]
    ref = torch.softmax(q_h @ k_h.transpose(1, 2) / 8 ** 0.5, -1) @ v_h      # the one kv head serves both
    torch.testing.assert_close(out.double(), ref.transpose(0, 1), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="cache holds 1"):
        layer.attend(q[:2], k[:2], v[:2], torch.tensor([0, 1, 2], dtype=torch.int32))
