"""How a setting is declared: once, on the frozen dataclass that holds it.

`setting(default, help=..., minimum=..., env=...)` is a `dataclasses.field` whose metadata says
everything else there is to know about the key: its bounds, the ROUTER_* variable that
overrides it, a one-line help for the README table, and an optional `validate` step. The type
comes from the annotation. config.reader walks these fields to parse a section and
config.table walks them to render the documentation, so neither restates a key.

It lives here, not in config/, because the balancing policies declare their own settings with it
and balancers must not import config/ (config sits beside balancers, and imports them).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

METADATA_KEY = "setting"

# Turns a converted value into the final one, or raises ValueError with the full message
# (key path included): for checks the type cannot express (a known strategy, a file that exists).
Validator = Callable[[Any, str], Any]


@dataclass(frozen=True, slots=True)
class Setting:
    """What the dataclass field itself cannot say about a key."""

    help: str
    minimum: float | None = 0  # numbers are non-negative unless a declaration says otherwise
    maximum: float | None = None
    positive: bool = False  # strictly above zero (weights); replaces `minimum`
    choices: Collection[str] = ()
    env: str | None = None
    validate: Validator | None = None
    shown: str | None = None  # the default as the README shows it, when the value says too little
    each: str = "[]"  # how one item of a list or mapping of sections is written in a key path


def setting(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    minimum: float | None = 0,
    maximum: float | None = None,
    positive: bool = False,
    choices: Collection[str] = (),
    env: str | None = None,
    validate: Validator | None = None,
    shown: str | None = None,
    each: str = "[]",
    factory: Callable[[], Any] | None = None,
) -> Any:
    """A dataclass field declaring one key. `factory` makes a mutable default (a dict). Without
    either the field is required: the code reading the section fills it (an endpoint's URL)."""
    spec = Setting(help, minimum, maximum, positive, tuple(choices), env, validate, shown, each)
    metadata = {METADATA_KEY: spec}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def declared(field: dataclasses.Field[Any]) -> Setting | None:
    """The declaration behind a field, or None for a field that is not a key."""
    spec = field.metadata.get(METADATA_KEY)
    return spec if isinstance(spec, Setting) else None
