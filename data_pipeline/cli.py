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


USER_ERROR = 2
"""Exit status of every user error (bad config, value, file or package): launchers do not retry it."""
_OMEGACONF_DETAIL = ("full_key:", "reference_type", "object_type", "Set the environment variable HYDRA_FULL_ERROR")


def one_line(err: BaseException) -> str:
    """An error (and the OmegaConf error that caused a Hydra one) as one line, without OmegaConf's detail lines."""
    from omegaconf.errors import MissingMandatoryValue

    if isinstance(err, MissingMandatoryValue) and getattr(err, "full_key", None):
        return f"{err.full_key} has no value: set {err.full_key}=... on the command line or in the experiment"

    def lines(e: BaseException) -> str:
        text = str(e).split("Config search path:")[0]  # Hydra appends its search path to a missing option
        kept = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith(_OMEGACONF_DETAIL)]
        return " ".join(kept)

    msg, cause = lines(err), err.__cause__
    if cause is not None and lines(cause) and lines(cause) not in msg:
        msg = f"{msg} ({lines(cause)})"
    return msg


def say_error(err: BaseException) -> None:
    """Print `error: ...` once per node: on local rank 0 (every rank of a job meets the same config error)."""
    if os.environ.get("LOCAL_RANK", "0") == "0":
        print(f"error: {one_line(err)}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def user_errors():
    """Turn a user-facing error (bad value, missing file or package, a config OmegaConf rejects) into one
    `error: ...` line and exit status USER_ERROR (2).

    HANGANG_DEBUG=1 re-raises with the traceback.
    """
    from omegaconf.errors import OmegaConfBaseException

    try:
        yield
    except (*USER_ERRORS, OmegaConfBaseException) as err:
        if os.environ.get("HANGANG_DEBUG"):
            raise
        say_error(err)
        sys.exit(USER_ERROR)


def run_hydra_main(main) -> None:
    """Call a `@hydra.main` function so that Hydra's own errors (unknown key, wrong type, unknown config option)
    are one `error: ...` line with exit status 2 too, instead of Hydra's multi-line report and status 1.

    HYDRA_FULL_ERROR=1 or HANGANG_DEBUG=1 keeps the traceback.
    """
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    keep = bool(os.environ.get("HYDRA_FULL_ERROR") or os.environ.get("HANGANG_DEBUG"))
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra then re-raises instead of printing and exiting 1
    try:
        main()
    except (HydraException, OmegaConfBaseException) as err:
        if keep:
            raise
        say_error(err)
        sys.exit(USER_ERROR)


def hydra_quote(value: str) -> str:
    """`value` as one quoted Hydra override value: spaces, commas or brackets stay in it.

    Hydra unescapes only backslashes before a quote or at the end of a quoted value.
    """
    return "'" + re.sub(r"(\\*)('|$)", lambda m: m[1] * 2 + ("\\" + m[2] if m[2] else ""), value) + "'"
