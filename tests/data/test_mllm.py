"""The MLLM sample format: parsing, attr column mapping, and one countable reason per broken rule."""

import json

import pytest

from mmfuse.data.mllm import DatasetAttr, load_samples, parse_sample
from mmfuse.data.report import SampleError, SkipReport


def _sample(images=("a.png",), messages=None, **extra):
    messages = messages or [{"role": "user", "content": "<image>What is it?"},
                            {"role": "assistant", "content": "A square."}]
    return {"images": list(images), "messages": messages, **extra}


@pytest.fixture
def media_dir(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
    (tmp_path / "v.mp4").write_bytes(b"x")
    return tmp_path


def test_valid_sample_parses_with_media_resolved_against_dataset_dir(media_dir):
    s = parse_sample(_sample(), DatasetAttr(), media_dir, source="f.json", index=3)
    assert s.images == [str(media_dir / "a.png")] and s.videos == [] and s.system is None
    assert [(m.role, m.content) for m in s.messages] == [("user", "<image>What is it?"), ("assistant", "A square.")]
    assert s.where == "f.json[3]"


def test_media_path_falls_back_to_the_raw_path_like_mindspeed(media_dir, tmp_path_factory):
    other = tmp_path_factory.mktemp("elsewhere")
    s = parse_sample(_sample(images=[str(media_dir / "a.png")]), DatasetAttr(), other)
    assert s.images == [str(media_dir / "a.png")]


def test_leading_system_message_becomes_the_system_prompt(media_dir):
    rec = _sample(messages=[{"role": "system", "content": "Be brief."},
                            {"role": "user", "content": "<image>Hi"}, {"role": "assistant", "content": "Hello"}])
    s = parse_sample(rec, DatasetAttr(), media_dir)
    assert s.system == "Be brief." and len(s.messages) == 2
    assert s.to_record()["messages"][0] == {"role": "system", "content": "Be brief."}


U, A = "user", "assistant"


@pytest.mark.parametrize("record, reason", [
    ("not an object", "bad_record"),
    ({"images": []}, "bad_record"),
    (_sample(messages=[{"role": "bot", "content": "<image>x"}, {"role": A, "content": "y"}]), "unknown_role"),
    (_sample(messages=[{"role": U, "content": "<image>x"}, {"role": "system", "content": "s"},
                       {"role": A, "content": "y"}]), "misplaced_system"),
    (_sample(images=[], messages=[{"role": "system", "content": "s"}]), "empty_conversation"),
    (_sample(messages=[{"role": A, "content": "<image>x"}, {"role": U, "content": "y"}]), "not_alternating"),
    (_sample(messages=[{"role": U, "content": "<image>x"}, {"role": A, "content": "y"},
                       {"role": U, "content": "z"}]), "no_answer"),
    (_sample(images=["a.png", "a.png"]), "image_tag_mismatch"),
    (_sample(videos=["v.mp4"]), "video_tag_mismatch"),
    (_sample(images=["gone.png"]), "missing_file"),
])
def test_each_broken_rule_has_its_own_reason(media_dir, record, reason):
    with pytest.raises(SampleError) as info:
        parse_sample(record, DatasetAttr(), media_dir)
    assert info.value.reason == reason


def test_attr_maps_other_column_and_role_names(media_dir):
    attr = DatasetAttr.from_dict({"images": "image", "messages": "conversations", "role_tag": "from",
                                  "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt"})
    rec = {"image": "a.png", "conversations": [{"from": "human", "value": "<image>x"}, {"from": "gpt", "value": "y"}]}
    s = parse_sample(rec, attr, media_dir)
    assert [m.role for m in s.messages] == ["user", "assistant"] and len(s.images) == 1


def test_attr_rejects_unknown_keys_and_tool_roles():
    with pytest.raises(ValueError, match="imagez"):
        DatasetAttr.from_dict({"imagez": "images"})
    with pytest.raises(ValueError, match="observation_tag"):
        DatasetAttr.from_dict({"observation_tag": "observation"})


def test_file_loading_counts_bad_samples_with_file_and_index(media_dir):
    path = media_dir / "d.jsonl"
    lines = [json.dumps(_sample()), "{not json", "", json.dumps(_sample(images=["gone.png"])), json.dumps(_sample())]
    path.write_text("\n".join(lines))
    report = SkipReport()
    good = load_samples(path, dataset_dir=media_dir, report=report)
    assert [s.index for s in good] == [0, 4]
    assert dict(report.counts) == {"bad_record": 1, "missing_file": 1}
    assert report.examples["missing_file"][0].where == f"{path}[3]"
    assert "gone.png" in report.format()


def test_max_samples_takes_the_first_records(media_dir):
    path = media_dir / "d.json"
    path.write_text(json.dumps([_sample()] * 5))
    assert len(load_samples(path, dataset_dir=media_dir, max_samples=2)) == 2


def test_malformed_json_file_error_names_file_and_line(tmp_path):
    path = tmp_path / "d.json"
    path.write_text("[\n{}\n,,]")
    with pytest.raises(ValueError, match=r"d.json: invalid JSON at line 3"):
        load_samples(path)
