"""Render a model's own Jinja chat template, in a sandbox, the way transformers does."""

import json
from datetime import datetime
from functools import lru_cache

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from refqwen.errors import RefqwenError


def render_chat_template(template: str, messages: list[dict], add_generation_prompt: bool = True,
                         **context) -> str:
    """The prompt text for `messages` ([{"role": ..., "content": ...}, ...])."""
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise RefqwenError(f"messages[{i}] must be a dict with a 'role' and 'content', got {m!r}")
    try:
        return _compile(template).render(messages=messages, add_generation_prompt=add_generation_prompt, **context)
    except jinja2.TemplateError as e:
        raise RefqwenError(f"the chat template failed: {e}") from None


def _raise_exception(message):
    raise jinja2.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes HTML characters; chat templates expect plain JSON
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=8)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise RefqwenError(f"the chat template is not valid Jinja: {e}") from None
