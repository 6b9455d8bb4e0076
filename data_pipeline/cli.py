"""Shared by every entry point (hence here, at the bottom of the import graph): strict config conversion and
one-line user errors."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import sys

from omegaconf import DictConfig, OmegaConf

USER_ERRORS = (ValueError, FileNotFoundError, ImportError)


def to_object_strict(cfg):
    """OmegaConf.to_object (runs each dataclass's __post_init__), refusing keys no schema declares.

    Hydra's `+key=value` force-adds keys even to structured configs, and to_object would then drop them silently:
    a misspelt `+train.max_stepz=3` must fail instead.
    """

    def walk(node: DictConfig, path: str) -> None:
        schema = OmegaConf.get_type(node)
        if dataclasses.is_dataclass(schema):
            fields = {f.name for f in dataclasses.fields(schema)}
            for key in node.keys():
                if key not in fields:
                    raise ValueError(
                        f"unknown config key {path}{key}: {schema.__name__} has no field {key!r} "
                        f"(valid: {', '.join(sorted(fields))})"
                    )
        for key in node.keys():
            child = node._get_node(key)
            if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
                walk(child, f"{path}{key}.")

    walk(cfg, "")
    return OmegaConf.to_object(cfg)


@contextlib.contextmanager
def user_errors():
    """Turn a user-facing error (bad value, missing file or package) into one `error: ...` line and exit status 2.

    HANGANG_DEBUG=1 re-raises with the traceback.
    """
    try:
        yield
    except USER_ERRORS as err:
        if os.environ.get("HANGANG_DEBUG"):
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def hydra_quote(value: str) -> str:
    """`value` as one quoted Hydra override value: spaces, commas or brackets stay in it.

    Hydra unescapes only backslashes before a quote or at the end of a quoted value.
    """
    return "'" + re.sub(r"(\\*)('|$)", lambda m: m[1] * 2 + ("\\" + m[2] if m[2] else ""), value) + "'"
