"""SFT rows -> chat messages (formats: messages, sharegpt, alpaca, prompt_response) -> token ids + labels
(chat templates, which tokens train)."""

from __future__ import annotations

import logging
from pathlib import Path

from tokensel.errors import ConfigError, DataError

log = logging.getLogger(__name__)
IGNORE = -100


def _as_str(loc: str, row: dict, key: str, col: str) -> str:
    if col not in row:
        raise DataError(f"{loc}: missing column {col!r} (the {key}); columns are {sorted(row)}; "
                        f"set data.column_map.{key} to the right name")
    v = row[col]
    if not isinstance(v, str):
        raise DataError(f"{loc}: column {col!r} must be a string, got {type(v).__name__}")
    return v


def _read_template(spec: str | None) -> str | None:
    """`chat_template`: a template string, or a path to a file holding one."""
    if spec is None:
        return None
    if "{" not in spec:  # not Jinja: a file name
        path = Path(spec).expanduser()
        if not path.is_file():
            raise ConfigError(f"data.chat_template={spec!r}: no such file, and not a Jinja template string")
        return path.read_text(encoding="utf-8")
    return spec


SFT_FORMATS = ("auto", "prompt_response", "messages", "sharegpt", "alpaca")
# ShareGPT speaker names -> chat roles (LLaMA-Factory / FastChat conventions); `role_map` adds or overrides
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
                  "bing": "assistant", "bard": "assistant", "system": "system"}
ROLES = ("system", "user", "assistant")


def _detect_format(row: dict, column_map: dict[str, str]) -> str:
    """`format: auto`: messages if that column exists, else sharegpt (conversations), alpaca (instruction +
    output), else prompt_response."""
    if column_map.get("messages", "messages") in row:
        return "messages"
    if column_map.get("conversations", "conversations") in row:
        return "sharegpt"
    if column_map.get("instruction", "instruction") in row and column_map.get("output", "output") in row:
        return "alpaca"
    return "prompt_response"


def _turns(loc: str, turns, col: str, role_key: str, text_key: str, role_map: dict[str, str]) -> list[dict]:
    """A list of {role_key, text_key} objects -> [{role, content}], roles mapped and checked."""
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{loc}: column {col!r} must be a non-empty list of {{{role_key}, {text_key}}} objects")
    out = []
    for i, m in enumerate(turns):
        if not isinstance(m, dict) or not isinstance(m.get(role_key), str) or not isinstance(m.get(text_key), str):
            raise DataError(f"{loc}: message {i} of {col!r} needs string {role_key!r} and {text_key!r} fields, "
                            f"got {m!r:.80}")
        role = role_map.get(m[role_key], m[role_key])
        if role not in ROLES:
            known = sorted(k for k, v in role_map.items() if v in ROLES)
            raise DataError(f"{loc}: message {i} has role {m[role_key]!r}; use one of {known or list(ROLES)} or map "
                            f"it with data.init_args.role_map (e.g. {{{m[role_key]}: assistant}})")
        out.append({"role": role, "content": m[text_key]})
    if not any(m["role"] == "assistant" and m["content"].strip() for m in out):
        raise DataError(f"{loc}: no non-empty assistant message, so nothing to train on")
    return out


def _system(row: dict, column_map: dict[str, str]) -> list[dict]:
    scol = column_map.get("system", "system")
    return [{"role": "system", "content": row[scol]}] if isinstance(row.get(scol), str) and row[scol] else []


def parse_sft_row(loc: str, row, fmt: str, column_map: dict[str, str],
                  role_map: dict[str, str] | None = None) -> list[dict]:
    """Validate one SFT row and return it as chat messages [{role, content}, ...].

    Formats: `messages` ([{role, content}]), `sharegpt` (`conversations`: [{from, value}], speakers mapped by
    SHAREGPT_ROLES + `role_map`; a `system` column is prepended), `alpaca` (`instruction` + optional `input`,
    joined by a blank line, is the prompt; `output` the response; optional `system`), `prompt_response`.
    `column_map` renames any of these columns; `auto` picks by the columns present (`_detect_format`).
    """
    if not isinstance(row, dict):
        raise DataError(f"{loc}: each row must be a JSON object, got {type(row).__name__}")
    role_map = dict(role_map or {})
    if fmt == "auto":
        fmt = _detect_format(row, column_map)
    if fmt == "messages":
        mcol = column_map.get("messages", "messages")
        return _turns(loc, row.get(mcol), mcol, "role", "content", role_map)
    if fmt == "sharegpt":
        ccol = column_map.get("conversations", "conversations")
        if ccol not in row:
            raise DataError(f"{loc}: missing column {ccol!r} (format sharegpt); columns are {sorted(row)}; set "
                            f"data.column_map.conversations to the right name")
        turns = _turns(loc, row[ccol], ccol, "from", "value", {**SHAREGPT_ROLES, **role_map})
        return (_system(row, column_map) if turns[0]["role"] != "system" else []) + turns
    if fmt == "alpaca":
        instruction = _as_str(loc, row, "instruction", column_map.get("instruction", "instruction"))
        icol = column_map.get("input", "input")
        extra = row.get(icol)
        if extra is not None and not isinstance(extra, str):
            raise DataError(f"{loc}: column {icol!r} must be a string, got {type(extra).__name__}")
        prompt = f"{instruction}\n\n{extra}" if extra else instruction
        response = _as_str(loc, row, "output", column_map.get("output", "output"))
    else:
        prompt = _as_str(loc, row, "prompt", column_map.get("prompt", "prompt"))
        response = _as_str(loc, row, "response", column_map.get("response", "response"))
    if not response.strip():
        raise DataError(f"{loc}: empty response, so nothing to train on")
    return _system(row, column_map) + [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


TRAIN_ON = ("assistant", "last_assistant", "all")
_WARNED: set[str] = set()


def _warn_once(key: str, msg: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        log.warning(msg)


def _label_turns(render, messages: list[dict], turns: list[int]) -> tuple[list[int], list[int]] | None:
    """Ids and labels with the assistant turns `turns` labelled: each one's span is the template rendered
    through it minus the template rendered up to it with the generation prompt. None when the template is not
    prefix-consistent (rendering more turns changes the tokens of earlier ones)."""
    ids: list[int] = []
    labels: list[int] = []
    for i in turns:
        before, through = render(messages[:i], True), render(messages[: i + 1], False)
        if through[: len(before)] != before or before[: len(ids)] != ids:
            return None
        labels += [IGNORE] * (len(before) - len(ids)) + through[len(before):]
        ids = through
    tail = render(messages, False)
    if tail[: len(ids)] != ids:
        return None
    return tail, labels + [IGNORE] * (len(tail) - len(ids))  # later non-labelled turns: context only


def tokenize_chat(tokenizer, messages: list[dict], max_length: int, train_on: str = "assistant",
                  chat_template: str | None = None, template_kwargs: dict | None = None) -> dict | None:
    """Token ids with labels on the trained tokens; None if truncation leaves no labelled token.

    `train_on`: "assistant" (every assistant turn), "last_assistant" (the last one only) or "all" (every token).
    With a chat template (`chat_template` overrides the tokenizer's; `template_kwargs` go to
    `apply_chat_template`), each assistant turn's span is the difference between the template rendered up to
    the turn (with the generation prompt) and through it, so system/user text and the template's role headers
    never get a label. A template that rewrites earlier turns once later ones exist (Qwen3-style thinking
    blocks dropped from past assistant turns) cannot label every turn that way: then the last assistant turn
    alone is labelled, with one warning per run. Without a template, turns are joined with newlines and each
    response ends with the EOS token.
    """
    assistants = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    turns = assistants[-1:] if train_on == "last_assistant" else assistants
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if template:
        def render(msgs, gen):
            out = tokenizer.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen,
                                                chat_template=template, **(template_kwargs or {}))
            return list(out["input_ids"]) if isinstance(out, dict) or hasattr(out, "keys") else list(out)
        got = _label_turns(render, messages, turns)
        if got is None and len(turns) > 1:
            _warn_once("template-fallback", "tokensel data: the chat template rewrites earlier turns once later "
                       "ones exist (e.g. it drops thinking blocks from past assistant turns), so only the last "
                       "assistant turn of each multi-turn sample is labelled (as data.train_on: last_assistant)")
            got = _label_turns(render, messages, assistants[-1:])
        if got is None:
            raise ConfigError("the chat template is not prefix-consistent even for the last assistant turn; set "
                              "data.init_args.chat_template to one that is, or use data.format prompt_response "
                              "with a tokenizer without a chat template")
        ids, labels = got
    else:
        ids, labels = [], []
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        for i, m in enumerate(messages):
            piece = tokenizer(m["content"] + ("" if m["role"] == "assistant" else "\n"), add_special_tokens=False)
            piece = list(piece["input_ids"]) + (eos if m["role"] == "assistant" else [])
            ids += piece
            labels += piece if i in turns else [IGNORE] * len(piece)
    if train_on == "all":
        labels = list(ids)
    ids, labels = ids[:max_length], labels[:max_length]
    if all(x == IGNORE for x in labels[1:]):
        return None
    return {"input_ids": ids, "labels": labels}

