"""The MLLM sample format of MindSpeed-MM (ShareGPT-style, LLaMA-Factory lineage):

    {"images": ["a.jpg"], "videos": [], "messages": [{"role": "user", "content": "<image>What is it?"},
                                                   {"role": "assistant", "content": "A cat."}]}

read from JSON (a list) or JSONL (one object per line) files, with column and role names mapped
through `DatasetAttr` (data.json `attr`) and media paths resolved against `dataset_dir`.
Every rule a sample breaks is reported as a SampleError with a countable reason:
bad_record, unknown_role, misplaced_system, empty_conversation, not_alternating, no_answer,
image_tag_mismatch, video_tag_mismatch, missing_file."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmfuse.data.report import SampleError, SkipReport

IMAGE_TAG = "<image>"
VIDEO_TAG = "<video>"


@dataclass
class DatasetAttr:
    """Column and role names of a data file (MindSpeed-MM data.json `attr`, LLaMA-Factory DatasetAttr)."""
    formatting: str = "sharegpt"          # only "sharegpt" (role/content message lists) is supported
    system: str | None = None             # column with the system prompt (None: none / a leading system message)
    images: str | None = "images"         # column with the image path list (None: no images)
    videos: str | None = "videos"         # column with the video path list (MindSpeed-MM's default is None)
    messages: str = "messages"            # column with the conversation
    role_tag: str = "role"                # key of a message's role
    content_tag: str = "content"          # key of a message's text
    user_tag: str = "user"                # role value of user turns
    assistant_tag: str = "assistant"      # role value of assistant turns
    system_tag: str | None = "system"     # role value of a leading system message (MindSpeed-MM's default is None)
    observation_tag: str | None = None    # tool results: not supported by the qwen2vl template here
    function_tag: str | None = None       # tool calls: not supported by the qwen2vl template here

    # data.json keys that LLaMA-Factory accepts and that change nothing for supervised sharegpt data
    _IGNORED = ("ranking", "pretrain", "packing", "tools", "audios", "chosen", "rejected", "kto_tag",
                "prompt", "query", "response", "history")

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None, where: str = "attr") -> "DatasetAttr":
        """Read a data.json `attr` block; unknown keys and unsupported settings raise ValueError."""
        d = dict(d or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names - set(cls._IGNORED))
        if unknown:
            raise ValueError(f"{where}: unknown keys {unknown}; known: {sorted(names)}")
        for flag in ("ranking", "pretrain"):
            if d.get(flag):
                raise ValueError(f"{where}.{flag} = true is not supported (supervised fine-tuning data only)")
        attr = cls(**{k: v for k, v in d.items() if k in names})
        if attr.formatting != "sharegpt":
            raise ValueError(f"{where}.formatting = {attr.formatting!r}: only 'sharegpt' is supported")
        if attr.observation_tag or attr.function_tag:
            raise ValueError(f"{where}: observation_tag/function_tag (tool use) are not supported; set them to null")
        return attr


@dataclass
class Message:
    """One conversation turn."""
    role: str       # "user" or "assistant"
    content: str    # text with <image>/<video> tags where the media go


@dataclass
class MLLMSample:
    """A validated sample: user/assistant turns alternating, ending with an assistant answer."""
    messages: list[Message]                               # user, assistant, user, assistant, ...
    images: list[str] = field(default_factory=list)       # resolved image paths, in tag order
    videos: list[str] = field(default_factory=list)       # resolved video paths, in tag order
    system: str | None = None                             # system prompt; None means the template's default
    source: str = ""                                      # file the sample came from
    index: int = -1                                       # 0-based record index in that file (JSONL: line - 1)

    @property
    def where(self) -> str:
        return f"{self.source}[{self.index}]"

    def to_record(self) -> dict[str, Any]:
        """The MLLM JSON object of this sample (system prompt as a leading system message)."""
        messages = ([{"role": "system", "content": self.system}] if self.system is not None else [])
        messages += [{"role": m.role, "content": m.content} for m in self.messages]
        return {"images": list(self.images), "videos": list(self.videos), "messages": messages}


def read_records(path: str | os.PathLike) -> list[Any]:
    """Records of a .json file (a list of objects) or a .jsonl file (one object per line; blank
    lines are kept as None so indices stay line numbers - 1). An unparsable JSONL line becomes a
    SampleError in its slot; an unparsable .json file raises ValueError naming the position."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        records: list[Any] = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                records.append(None)
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                records.append(SampleError("bad_record", f"line {lineno} is not valid JSON: {exc.msg}"))
        return records
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg} "
                         f"(a .json data file holds one list of samples; use .jsonl for one sample per line)") from exc
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of samples, found {type(data).__name__}")
    return data


def resolve_media(path: str, dataset_dir: str | os.PathLike | None) -> str | None:
    """MindSpeed-MM's lookup: `dataset_dir/path` if that exists, else `path` itself (absolute or
    relative to the working directory); None when neither exists."""
    if dataset_dir is not None and not os.path.isabs(path):
        joined = os.path.join(dataset_dir, path)
        if os.path.exists(joined):
            return joined
    return path if os.path.exists(path) else None


def _media_list(record: dict, column: str | None, kind: str) -> list[str]:
    if column is None:
        return []
    value = record.get(column)
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise SampleError("bad_record", f"'{column}' must be a list of {kind} paths, found {value!r:.80}")


def parse_sample(record: Any, attr: DatasetAttr, dataset_dir: str | os.PathLike | None = None,
                 source: str = "", index: int = -1, check_files: bool = True, need_answer: bool = True) -> MLLMSample:
    """Validate one record and return it as an MLLMSample; raise SampleError with the first rule broken.
    need_answer=False also accepts a conversation ending with a user turn (a prompt to answer)."""
    if isinstance(record, SampleError):
        raise record
    if not isinstance(record, dict):
        raise SampleError("bad_record", f"expected a JSON object, found {type(record).__name__}")
    raw = record.get(attr.messages)
    if not isinstance(raw, list):
        raise SampleError("bad_record", f"no '{attr.messages}' list (set attr.messages to the conversation column)")
    messages: list[tuple[str, str]] = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or not isinstance(m.get(attr.content_tag), str) or attr.role_tag not in m:
            raise SampleError("bad_record", f"message {i} needs '{attr.role_tag}' and a string "
                                            f"'{attr.content_tag}' (check attr.role_tag / attr.content_tag)")
        messages.append((m[attr.role_tag], m[attr.content_tag]))

    system = None
    if attr.system is not None and isinstance(record.get(attr.system), str):
        system = record[attr.system]
    if attr.system_tag is not None and messages and messages[0][0] == attr.system_tag:
        system = messages[0][1]
        messages = messages[1:]
    known = {attr.user_tag, attr.assistant_tag} | ({attr.system_tag} if attr.system_tag else set())
    for role, _ in messages:
        if role not in known:
            raise SampleError("unknown_role", f"message role {role!r} is not one of {sorted(known)} "
                                              f"(map it with attr.user_tag / attr.assistant_tag)")
        if role == attr.system_tag:
            raise SampleError("misplaced_system", "a system message is only allowed as the first message")
    if not messages:
        raise SampleError("empty_conversation", "no user/assistant messages")
    for i, (role, _) in enumerate(messages):
        expected = attr.user_tag if i % 2 == 0 else attr.assistant_tag
        if role != expected:
            raise SampleError("not_alternating", f"message {i} has role {role!r} where {expected!r} was expected "
                                                 f"(turns must alternate user, assistant, ...)")
    if len(messages) % 2 and need_answer:
        raise SampleError("no_answer", "the conversation ends with a user turn; the last message must be "
                                       "the assistant's answer")

    images = _media_list(record, attr.images, "image")
    videos = _media_list(record, attr.videos, "video")
    for tag, media, reason in ((IMAGE_TAG, images, "image_tag_mismatch"), (VIDEO_TAG, videos, "video_tag_mismatch")):
        n_tags = sum(content.count(tag) for _, content in messages)
        if n_tags != len(media):
            raise SampleError(reason, f"{n_tags} {tag} tags in the text but {len(media)} files listed "
                                      f"(each file needs exactly one tag where it goes)")
    if check_files:
        resolved = []
        for p in images + videos:
            found = resolve_media(p, dataset_dir)
            if found is None:
                tried = [os.path.join(dataset_dir, p)] if dataset_dir is not None and not os.path.isabs(p) else []
                tried.append(p)
                raise SampleError("missing_file", f"{p!r} not found (tried {', '.join(tried)}; "
                                                  f"check dataset_dir)")
            resolved.append(found)
        images, videos = resolved[:len(images)], resolved[len(images):]
    roles = {attr.user_tag: "user", attr.assistant_tag: "assistant"}
    return MLLMSample(messages=[Message(roles[r], c) for r, c in messages], images=images, videos=videos,
                      system=system, source=source, index=index)


def iter_samples(path: str | os.PathLike, attr: DatasetAttr | None = None,
                 dataset_dir: str | os.PathLike | None = None, check_files: bool = True,
                 max_samples: int | None = None, need_answer: bool = True) -> Iterator[MLLMSample | SampleError]:
    """Each record of a file (the first `max_samples` if given) as an MLLMSample or the SampleError
    saying why it is unusable; blank JSONL lines are passed over."""
    attr = attr or DatasetAttr()
    records = read_records(path)
    if max_samples is not None:
        records = records[:max_samples]
    for index, record in enumerate(records):
        if record is None:
            continue
        try:
            yield parse_sample(record, attr, dataset_dir, source=str(path), index=index, check_files=check_files,
                               need_answer=need_answer)
        except SampleError as err:
            yield SampleError(err.reason, err.detail, where=f"{path}[{index}]")


def load_samples(path: str | os.PathLike, attr: DatasetAttr | None = None,
                 dataset_dir: str | os.PathLike | None = None, check_files: bool = True,
                 max_samples: int | None = None, report: SkipReport | None = None,
                 need_answer: bool = True) -> list[MLLMSample]:
    """The usable samples of a file; the others are counted in `report` with file and index."""
    report = report if report is not None else SkipReport()
    good = []
    for item in iter_samples(path, attr, dataset_dir, check_files, max_samples, need_answer):
        if isinstance(item, SampleError):
            report.add_error(item)
        else:
            good.append(item)
    return good
