"""SFT rows -> chat messages (formats: messages, sharegpt, alpaca, prompt_response) -> token ids + labels
(chat templates, which tokens train)."""

from __future__ import annotations

import hashlib
import json
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


def _sha_text(s: str | None) -> str | None:
    return hashlib.sha256(s.encode()).hexdigest()[:16] if s else None


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
# (`function_call`: an assistant tool call whose value is the call as JSON; `observation`: the tool's result)
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
                  "bing": "assistant", "bard": "assistant", "system": "system", "function_call": "assistant",
                  "observation": "tool", "tool": "tool"}
ROLES = ("system", "user", "assistant", "tool")
# message fields kept besides role and content (chat templates read them; other fields are dropped)
MESSAGE_FIELDS = ("tool_calls", "tool_call_id", "name", "reasoning_content")


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


def _json_value(loc: str, what: str, v):
    """A JSON-bearing field: parsed when it is a string (LLaMA-Factory stores tools and calls as JSON text)."""
    if isinstance(v, str):
        try:
            return json.loads(v)
        except json.JSONDecodeError as e:
            raise DataError(f"{loc}: {what} is not valid JSON ({e.msg} at column {e.colno})") from None
    return v


def _tool_calls(loc: str, i: int, calls) -> list[dict]:
    """Assistant tool calls -> [{type: function, function: {name, arguments}}] (the form chat templates read)."""
    calls = _json_value(loc, f"message {i} tool_calls", calls)
    calls = [calls] if isinstance(calls, dict) else calls
    if not isinstance(calls, list) or not calls:
        raise DataError(f"{loc}: message {i}: tool_calls must be a non-empty list of {{name, arguments}} objects")
    out = []
    for c in calls:
        fn = c.get("function", c) if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise DataError(f"{loc}: message {i}: each tool call needs a function name, got {c!r:.80}")
        args = fn.get("arguments", {})
        args = _json_value(loc, f"message {i} tool call arguments", args) if isinstance(args, str) else args
        out.append({**({"id": c["id"]} if isinstance(c, dict) and "id" in c else {}), "type": "function",
                    "function": {"name": fn["name"], "arguments": args}})
    return out


def _turns(loc: str, turns, col: str, role_key: str, text_key: str, role_map: dict[str, str]) -> list[dict]:
    """A list of {role_key, text_key} objects -> [{role, content, (tool fields)}], roles mapped and checked.
    An assistant turn may carry `tool_calls` (then its text may be empty); a sharegpt `function_call` turn's
    value is the call itself."""
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{loc}: column {col!r} must be a non-empty list of {{{role_key}, {text_key}}} objects")
    out = []
    for i, m in enumerate(turns):
        if not isinstance(m, dict) or not isinstance(m.get(role_key), str):
            raise DataError(f"{loc}: message {i} of {col!r} needs a string {role_key!r} field, got {m!r:.80}")
        raw = m[role_key]
        role = role_map.get(raw, raw)
        if role not in ROLES:
            known = sorted(k for k, v in role_map.items() if v in ROLES)
            raise DataError(f"{loc}: message {i} has role {raw!r}; use one of {known or list(ROLES)} or map "
                            f"it with data.init_args.role_map (e.g. {{{raw}: assistant}})")
        text = m.get(text_key)
        msg = {"role": role}
        if raw == "function_call" and role == "assistant":  # sharegpt: the value is the call
            msg.update(content="", tool_calls=_tool_calls(loc, i, text))
        else:
            if text is None and role == "assistant" and m.get("tool_calls"):
                text = ""
            if not isinstance(text, str):
                raise DataError(f"{loc}: message {i} of {col!r} needs a string {text_key!r} field, got {m!r:.80}")
            msg["content"] = text
            for k in MESSAGE_FIELDS:
                if m.get(k) is not None:
                    msg[k] = _tool_calls(loc, i, m[k]) if k == "tool_calls" else m[k]
        if "tool_calls" in msg and role != "assistant":
            raise DataError(f"{loc}: message {i} has tool_calls but role {role!r}; only assistant turns call tools")
        out.append(msg)
    if not any(m["role"] == "assistant" and (m["content"].strip() or m.get("tool_calls")) for m in out):
        raise DataError(f"{loc}: no non-empty assistant message, so nothing to train on")
    return out


def row_tools(loc: str, row: dict, column_map: dict[str, str]) -> list | None:
    """The row's tool (function) schemas, for the chat template's `tools`; None when it has none."""
    col = column_map.get("tools", "tools")
    v = row.get(col)
    if v is None or v == "" or v == []:
        return None
    v = _json_value(loc, f"column {col!r}", v)
    if not isinstance(v, list) or not all(isinstance(x, dict) for x in v):
        raise DataError(f"{loc}: column {col!r} must be a list of tool schemas (objects), got {type(v).__name__}")
    return v


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


def plain_format(tokenizer, messages: list[dict], turns: list[int]) -> tuple[list[int], list[int]]:
    """The format for a tokenizer without a chat template: BOS (when the tokenizer has one), then each turn's
    text in order; a system, user or tool turn is followed by a newline, an assistant turn (its text, then any
    tool calls as one JSON line each) by EOS. The labelled turns' text and EOS train; BOS and the other
    turns are context. No role names are written, so the model learns the turn boundaries from EOS alone:
    fine for prompt/response pairs, lossy for multi-party chats (give those a `chat_template`)."""
    bos = [tokenizer.bos_token_id] if getattr(tokenizer, "bos_token_id", None) is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids, labels = list(bos), [IGNORE] * len(bos)
    for i, m in enumerate(messages):
        text = m["content"]
        if m["role"] == "assistant":
            calls = [json.dumps(c["function"], ensure_ascii=False) for c in m.get("tool_calls", ())]
            text = "\n".join(([text] if text else []) + calls)
        else:
            text += "\n"
        piece = list(tokenizer(text, add_special_tokens=False)["input_ids"]) + (eos if m["role"] == "assistant"
                                                                               else [])
        ids += piece
        labels += piece if i in turns else [IGNORE] * len(piece)
    return ids, labels


def tokenize_chat(tokenizer, messages: list[dict], max_length: int, train_on: str = "assistant",
                  chat_template: str | None = None, template_kwargs: dict | None = None,
                  tools: list | None = None) -> dict | None:
    """Token ids with labels on the trained tokens; None if truncation leaves no labelled token.

    `train_on`: "assistant" (every assistant turn), "last_assistant" (the last one only) or "all" (every token).
    With a chat template (`chat_template` overrides the tokenizer's; `template_kwargs` go to
    `apply_chat_template`; `tools` are the row's tool schemas), each assistant turn's span is the difference
    between the template rendered up to the turn (with the generation prompt) and through it, so system, user
    and tool text and the template's role headers never get a label, while an assistant's tool calls do. A
    template that rewrites earlier turns once later ones exist (Qwen3-style thinking blocks dropped from past
    assistant turns) cannot label every turn that way: then the last assistant turn alone is labelled, with
    one warning per run. Without a template, `plain_format` (with one warning per run).
    """
    assistants = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    turns = assistants[-1:] if train_on == "last_assistant" else assistants
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if template:
        extra = dict(template_kwargs or {})
        if tools:
            extra["tools"] = tools

        def render(msgs, gen):
            out = tokenizer.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen,
                                                chat_template=template, **extra)
            return list(out["input_ids"]) if isinstance(out, dict) or hasattr(out, "keys") else list(out)
        got = _label_turns(render, messages, turns)
        if got is None and len(turns) > 1:
            _warn_once("template-fallback", "tokensel data: the chat template rewrites earlier turns once later "
                       "ones exist (e.g. it drops thinking blocks from past assistant turns), so only the last "
                       "assistant turn of each multi-turn sample is labelled (as data.train_on: last_assistant)")
            got = _label_turns(render, messages, assistants[-1:])
        if got is None:
            raise ConfigError("the chat template is not prefix-consistent even for the last assistant turn; set "
                              "data.init_args.chat_template to one that is")
        ids, labels = got
    else:
        _warn_once("plain-format", f"tokensel data: the tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no "
                   "chat template, so SFT samples use the plain format (BOS, turns in order, EOS after each "
                   "assistant turn; see tokensel.trainer.data.formats.plain_format); set data.init_args.chat_template "
                   "to train in the model's own chat format")
        ids, labels = plain_format(tokenizer, messages, turns)
    if train_on == "all":
        labels = list(ids)
    ids, labels = ids[:max_length], labels[:max_length]
    if all(x == IGNORE for x in labels[1:]):
        return None
    return {"input_ids": ids, "labels": labels}
