"""Chat templates rendered in a bounded sandbox: a checkpoint's template is code from the Hub.

Contract: `render_chat_template(template, messages, variables)` gives exactly the text transformers'
`apply_chat_template(messages, add_generation_prompt=True, tokenize=False)` gives (the same
`ImmutableSandboxedEnvironment` settings, filters, globals and extensions, copied from
transformers' own), or raises `TemplateBudgetError` (a `jinja2` `SecurityError`) as soon as the
template goes past its budget:

- MAX_TEMPLATE_STEPS steps, a step being one loop iteration (every `{% for %}` is counted, nested
  or not) or one call (of a macro, function, method or the sandbox's `range`);
- MAX_TEMPLATE_CHARS characters of output, and no `*` that would repeat a value past it, nor a `**`
  giving an integer of more than MAX_POWER_BITS bits.

Rendering is otherwise unchanged: jinja2's own sandbox keeps the template away from Python
internals and from mutating its inputs. A template whose two nested `range(100000)` loops would
run for hours stops within about a second.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterable, Iterator
from typing import Any

MAX_TEMPLATE_STEPS = 1_000_000  # a 4,096-message conversation takes a few tens of thousands
MAX_TEMPLATE_CHARS = 4 * 1024 * 1024  # user text reaches the template as short markers (prompt/prompting.py)
MAX_POWER_BITS = 1 << 16  # `**` chains (10 ** 64 ** 64 ** ...) grow past any budget in one step
LOOP_COUNTER = "__llava_counted_loop"


def render_chat_template(template: str, messages: list[dict[str, Any]], variables: dict[str, Any]) -> str:
    """The template's text for `messages`, ending with the generation prompt; `variables`: the special tokens."""
    compiled, budget = bounded_template(template)
    budget.reset()
    pieces, length = [], 0
    for piece in compiled.generate(
        messages=messages, tools=None, documents=None, add_generation_prompt=True, **variables
    ):
        length += len(piece)
        budget.check_output(length)
        pieces.append(piece)
    return "".join(pieces)


def template_budget_error() -> type[Exception]:
    from jinja2.exceptions import SecurityError

    class TemplateBudgetError(SecurityError):
        """The template went past its budget of steps or output."""

    return TemplateBudgetError


class Budget:
    """Steps of the rendering under way, counted per thread (one compiled template serves them all)."""

    def __init__(self) -> None:
        self.error = template_budget_error()
        self.counts = threading.local()

    def reset(self) -> None:
        self.counts.steps = 0

    def step(self) -> None:
        self.counts.steps += 1
        if self.counts.steps > MAX_TEMPLATE_STEPS:
            raise self.error(
                f"the chat template runs more than {MAX_TEMPLATE_STEPS:,} loop steps and calls; it is refused"
            )

    def check_output(self, length: int) -> None:
        if length > MAX_TEMPLATE_CHARS:
            raise self.error(f"the chat template writes more than {MAX_TEMPLATE_CHARS:,} characters; it is refused")

    def counted(self, iterable: Iterable[Any]) -> Iterator[Any]:
        for item in iterable:
            self.step()
            yield item


@functools.lru_cache(maxsize=8)
def bounded_template(template: str) -> tuple[Any, Budget]:
    """The template compiled in a `bounded_environment` with every loop's iterable counted."""
    from jinja2 import nodes

    budget = Budget()
    environment = bounded_environment(budget)
    tree = environment.parse(template)
    for loop in tree.find_all(nodes.For):
        loop.iter = nodes.Call(nodes.Name(LOOP_COUNTER, "load"), [loop.iter], [], None, None, lineno=loop.lineno)
    return environment.from_string(tree), budget


def bounded_environment(budget: Budget) -> Any:
    """transformers' chat-template environment (settings, filters, globals, extensions), with the budget."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from transformers.utils.chat_template_utils import _compile_jinja_template

    # A harmless template: compiling the checkpoint's own there would fold its constants unguarded ('x' * 10**10).
    reference = _compile_jinja_template("{{ '' }}").environment

    class BoundedSandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**"})

        def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
            budget.step()
            return super().call(__context, __obj, *args, **kwargs)

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            if operator == "**" and too_big_power(left, right):
                raise budget.error(f"the chat template raises a number to the power {right}; it is refused")
            if operator == "*" and too_long_product(left, right):
                raise budget.error(
                    f"the chat template builds a value of more than {MAX_TEMPLATE_CHARS:,} items; it is refused"
                )
            return super().call_binop(context, operator, left, right)

    environment = BoundedSandbox(
        trim_blocks=reference.trim_blocks,
        lstrip_blocks=reference.lstrip_blocks,
        extensions=[type(extension) for extension in reference.extensions.values()],
    )
    environment.filters.update(reference.filters)
    environment.tests.update(reference.tests)
    environment.globals.update(reference.globals)
    environment.policies.update(reference.policies)
    environment.globals[LOOP_COUNTER] = budget.counted
    return environment


def too_big_power(base: Any, exponent: Any) -> bool:
    """Whether `base ** exponent` is an integer of more than MAX_POWER_BITS bits."""
    if not isinstance(base, int) or not isinstance(exponent, int) or exponent <= 0:
        return False
    return max(base.bit_length(), 1) * exponent > MAX_POWER_BITS


def too_long_product(left: Any, right: Any) -> bool:
    """Whether `left * right` repeats a sequence into more than MAX_TEMPLATE_CHARS items."""
    for sequence, count in ((left, right), (right, left)):
        if (
            isinstance(sequence, (str, list, tuple))
            and isinstance(count, int)
            and len(sequence) * count > MAX_TEMPLATE_CHARS
        ):
            return True
    return False
