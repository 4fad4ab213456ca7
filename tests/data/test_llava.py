"""LLaVA-Instruct -> MLLM conversion: role mapping, per-reason skip counts, no silent overwrite."""

import json

import pytest

from mmfuse.cli.main import main
from mmfuse.data.llava import convert_file
from mmfuse.data.mllm import load_samples


def _llava(tmp_path):
    root = tmp_path / "coco"
    root.mkdir()
    (root / "1.jpg").write_bytes(b"x")
    records = [
        {"id": "ok", "image": "1.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A cat."},
            {"from": "human", "value": "Colour?"}, {"from": "gpt", "value": "Black."}]},
        {"id": "sys", "conversations": [
            {"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hi."}]},
        {"id": "nofile", "image": "2.jpg", "conversations": [
            {"from": "human", "value": "<image>x"}, {"from": "gpt", "value": "y"}]},
        {"id": "role", "image": "1.jpg", "conversations": [
            {"from": "robot", "value": "<image>x"}, {"from": "gpt", "value": "y"}]},
        {"id": "tags", "image": "1.jpg", "conversations": [
            {"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}]},
    ]
    src = tmp_path / "llava.json"
    src.write_text(json.dumps(records))
    return src, root


def test_conversion_maps_roles_keeps_system_and_counts_skips(tmp_path):
    src, root = _llava(tmp_path)
    result = convert_file(src, root, tmp_path / "out.json")
    assert result.converted == 2
    assert dict(result.report.counts) == {"missing_file": 1, "unknown_role": 1, "image_tag_mismatch": 1}
    assert "(id nofile)" in result.report.examples["missing_file"][0].where
    out = json.loads((tmp_path / "out.json").read_text())
    assert out[0] == {"images": ["1.jpg"], "messages": [
        {"role": "user", "content": "<image>\nWhat is this?"}, {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": "Colour?"}, {"role": "assistant", "content": "Black."}]}
    assert out[1]["images"] == [] and out[1]["messages"][0] == {"role": "system", "content": "Be brief."}
    loaded = load_samples(tmp_path / "out.json", dataset_dir=root)
    assert len(loaded) == 2 and loaded[1].system == "Be brief."


def test_existing_output_is_kept_unless_force(tmp_path):
    src, root = _llava(tmp_path)
    out = tmp_path / "out.json"
    out.write_text("keep me")
    with pytest.raises(FileExistsError, match="--force"):
        convert_file(src, root, out)
    assert out.read_text() == "keep me"
    assert convert_file(src, root, out, force=True).converted == 2
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_cli_converts_reports_and_refuses_overwrite(tmp_path, capsys):
    src, root = _llava(tmp_path)
    out = tmp_path / "out.jsonl"
    argv = ["data", "llava2mllm", "--input", str(src), "--image-root", str(root), "--output", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "converted: 2" in printed and "missing_file: 1" in printed and "dataset_dir" in printed
    assert len(out.read_text().splitlines()) == 2
    assert main(argv) == 2 and "--force" in capsys.readouterr().err
    assert main(argv + ["--force", "--absolute-paths"]) == 0
    assert json.loads(out.read_text().splitlines()[0])["images"] == [str((root / "1.jpg").resolve())]


def test_cli_help_explains_the_conversion(capsys):
    with pytest.raises(SystemExit) as info:
        main(["data", "llava2mllm", "--help"])
    assert info.value.code == 0
    assert "human -> user" in capsys.readouterr().out
