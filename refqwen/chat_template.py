"""Render a model's own Jinja chat template, in a sandbox, the way transformers does.

A chat template comes with the checkpoint, so it is untrusted code: it runs in Jinja's immutable
sandbox (no attribute escapes, no mutation), and its rendering is bounded (docs/security.md): at most
MAX_SECONDS of work, at most MAX_CHARS of output, no `**` with a huge exponent and no `*` that builds a
huge string or list. Any failure inside the template is one RefqwenError.
"""

import json
import operator
import re
import string
import time
from contextvars import ContextVar
from datetime import datetime
from functools import lru_cache

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError, safe_range

from refqwen.errors import RefqwenError

MAX_SECONDS = 5.0  # real templates render in milliseconds
MAX_CHARS = 8 * 1024 ** 2  # ~2M tokens of prompt, above every Qwen2 context window
MAX_EXPONENT = 1024
_deadline: ContextVar[float] = ContextVar("chat_template_deadline", default=float("inf"))


def render_chat_template(template: str, messages: list[dict], add_generation_prompt: bool = True,
                         **context) -> str:
    """The prompt text for `messages` ([{"role": ..., "content": ...}, ...]).

    `content` may be a string, None (an assistant turn that only calls tools) or, as chat APIs send it,
    a list of text parts [{"type": "text", "text": ...}], which are joined into one string."""
    messages = [_checked_message(i, m) for i, m in enumerate(_as_list(messages))]
    if not isinstance(template, str):
        raise RefqwenError(f"the chat template must be a string, got {type(template).__name__}")
    compiled = _compile(template)
    token = _deadline.set(time.monotonic() + MAX_SECONDS)
    try:
        pieces, size = [], 0
        for piece in compiled.generate(messages=messages, add_generation_prompt=add_generation_prompt, **context):
            size += len(piece)
            if size > MAX_CHARS:
                raise RefqwenError(f"the chat template's output passed {MAX_CHARS:,} characters; refusing to "
                                   f"render more")
            _check_time()
            pieces.append(piece)
        return "".join(pieces)
    except RefqwenError:
        raise
    except Exception as e:  # the template is code from the checkpoint: any failure in it is its own
        raise RefqwenError(f"the chat template failed: {type(e).__name__}: {e}") from None
    finally:
        _deadline.reset(token)


def _as_list(messages) -> list:
    if isinstance(messages, (str, bytes, dict)) or not hasattr(messages, "__iter__"):
        raise RefqwenError(f"messages must be a list of {{'role': ..., 'content': ...}} dicts, got {messages!r:.100}")
    return list(messages)


def _checked_message(i: int, m) -> dict:
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
        raise RefqwenError(f"messages[{i}] must be a dict with a string 'role' and a 'content', got {m!r:.200}")
    content = m.get("content")
    if isinstance(content, list):
        return dict(m, content=_text_of_parts(i, content))
    if content is not None and not isinstance(content, str):
        raise RefqwenError(f"messages[{i}]['content'] must be a string, a list of text parts or None, "
                           f"got {type(content).__name__}")
    return m


def _text_of_parts(i: int, parts: list) -> str:
    """[{"type": "text", "text": "a"}, {"type": "text", "text": "b"}] -> "ab" (Qwen2 models read text only)."""
    texts = []
    for j, part in enumerate(parts):
        if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
            raise RefqwenError(f"messages[{i}]['content'][{j}]: refqwen runs text-only models; expected "
                               f"{{'type': 'text', 'text': ...}}, got {part!r:.200}")
        texts.append(part["text"])
    return "".join(texts)


def _check_time():
    if time.monotonic() > _deadline.get():
        raise RefqwenError(f"the chat template ran for more than {MAX_SECONDS:g} s; refusing to render it")


def _bounded(iterable):
    for i, x in enumerate(iterable):
        if i % 1024 == 0:
            _check_time()
        yield x


class _BoundedRange:
    """Jinja's safe range (at most 100000 items), checking the deadline as a loop walks it, so nested
    loops that print nothing still stop."""

    def __init__(self, *args):
        self.range = safe_range(*args)

    def __iter__(self):
        return _bounded(self.range)

    def __reversed__(self):
        return _bounded(reversed(self.range))

    def __len__(self):
        return len(self.range)

    def __getitem__(self, i):
        return self.range[i]

    def __contains__(self, x):
        return x in self.range


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**", "%"})

    def call_binop(self, context, operator_name, left, right):
        if operator_name == "%":  # printf-style formatting: its widths and precisions size the output
            if isinstance(left, str):
                _check_spec_numbers("".join(_PRINTF_SPEC.findall(left)))
            return operator.mod(left, right)
        if operator_name == "**":
            if isinstance(right, int) and abs(right) > MAX_EXPONENT and abs(left) > 1:
                raise SecurityError(f"exponent {right} is above the template limit of {MAX_EXPONENT}")
            return operator.pow(left, right)
        for seq, n in ((left, right), (right, left)):
            if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_CHARS:
                raise SecurityError(f"repeating a sequence of {len(seq)} items {n} times is above the template "
                                    f"limit of {MAX_CHARS} items")
        if isinstance(left, int) and isinstance(right, int) and left.bit_length() + right.bit_length() > 1 << 16:
            raise SecurityError("an integer product above the template limit")
        return operator.mul(left, right)

    def wrap_str_format(self, value):
        """str.format and format_map: a width or precision in the format string sizes the output too."""
        wrapper = super().wrap_str_format(value)
        if wrapper is None:
            return None
        for _, _, spec, _ in string.Formatter().parse(value.__self__):
            _check_spec_numbers(spec or "")
        return wrapper

    def call(self, context, obj, *args, **kwargs):
        _check_time()
        if any(isinstance(a, int) and a > MAX_CHARS for a in (*args, *kwargs.values())):
            raise SecurityError(f"an argument above the template limit of {MAX_CHARS} (a width or a count?)")
        return super().call(context, obj, *args, **kwargs)

    def getattr(self, obj, attribute):
        _check_time()
        return super().getattr(obj, attribute)

    def getitem(self, obj, argument):
        _check_time()
        return super().getitem(obj, argument)


_PRINTF_SPEC = re.compile(r"%[-#0 +]*[0-9]*(?:\.[0-9]*)?")  # "%08.3" of "%08.3f"


def _check_spec_numbers(spec: str) -> None:
    if any(int(n) > MAX_CHARS for n in re.findall(r"[0-9]+", spec)):
        raise SecurityError(f"a format width or precision above the template limit of {MAX_CHARS} ({spec!r})")


def _raise_exception(message):
    raise jinja2.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes HTML characters; chat templates expect plain JSON
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _width_checked(jinja_filter):
    def checked(*args, **kwargs):
        if any(isinstance(a, int) and a > MAX_CHARS for a in (*args[1:], *kwargs.values())):
            raise SecurityError(f"a width above the template limit of {MAX_CHARS}")
        return jinja_filter(*args, **kwargs)

    return checked


def _printf_checked(jinja_filter):
    def checked(value, *args, **kwargs):
        if isinstance(value, str):
            _check_spec_numbers("".join(_PRINTF_SPEC.findall(value)))
        return jinja_filter(value, *args, **kwargs)

    return checked


@lru_cache(maxsize=8)
def _compile(template: str) -> jinja2.Template:
    env = _BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["range"] = _BoundedRange
    for name in ("center", "indent", "truncate", "wordwrap"):  # their width argument sizes the output
        env.filters[name] = _width_checked(env.filters[name])
    env.filters["format"] = _printf_checked(env.filters["format"])
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise RefqwenError(f"the chat template is not valid Jinja: {e}") from None
    except Exception as e:  # e.g. RecursionError on deeply nested expressions
        raise RefqwenError(f"the chat template cannot be compiled: {type(e).__name__}: {e}") from None
