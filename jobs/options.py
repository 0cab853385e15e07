"""The options of a study run, written once: `StudyOptions`.

`bplab run`'s arguments are built from it (`add_arguments`: flag, type, default and help,
the help being the docstring under each field) and `jobs.study.run_study(suite, out, **options)`
takes the same names as keyword arguments. Every check of an option's value is in
`StudyOptions.check`; a bad value is a one-line UserError naming the flag, raised before
anything is read or started. No Ray, no TensorFlow here.
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass
from typing import Annotated, Any, Optional, get_args

from pydantic import BaseModel, BeforeValidator, ConfigDict, Strict, ValidationError

from workers.errors import UserError


@dataclass(frozen=True)
class Flag:
    """How an option appears on the command line, where the field's name and type do not say it."""

    flag: str | None = None  # default: --field-name; "" for a positional argument
    metavar: str | None = None
    nargs: str | None = None  # "?", "+"
    action: str | None = None  # "append", "store_true", "store_false"


def _fspath(value):
    """A path-like value as its text (run_study(out=Path(...)))."""
    return os.fspath(value) if isinstance(value, os.PathLike) else value


PathText = Annotated[Optional[str], BeforeValidator(_fspath)]
Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]
Bool = Annotated[bool, Strict()]


class StudyOptions(BaseModel):
    """What to run, where, and how (`bplab run` and `run_study` take the same options)."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True,
                              arbitrary_types_allowed=True)

    suite: Annotated[Any, BeforeValidator(_fspath), Flag("", nargs="?")] = None
    """Built-in suite name or a YAML file (optional with --resume: the run's own cases); from
    Python also a jobs.suites.Suite."""
    address: Annotated[Optional[str], Flag(metavar="ADDR")] = None
    """Ray address ('auto' inside a cluster); default (or 'local'): start a private local Ray."""
    out: Annotated[PathText, Flag(metavar="DIR")] = None
    """Run directory: a path or a pyarrow.fs URI (default runs/SUITE-TIME)."""
    resume: Annotated[PathText, Flag(metavar="RUN")] = None
    """Continue this run: whatever is not done, plus new cases."""
    max_retries: Annotated[Int, Flag(metavar="N")] = 2
    """Retries per case after a lost worker or node."""
    commit_every: Annotated[Float, Flag(metavar="SECONDS")] = 30.0
    """Commit a running case's rows with a checkpoint at most this often (and at its end, and on Ctrl-C)."""
    checkpoint_every: Annotated[Int, Flag(metavar="STEPS")] = 0
    """Also commit every N steps (0, the default: by time only)."""
    fresh_worker_per_case: Annotated[Bool, Flag(action="store_true")] = False
    """A new worker process for every case (default: workers run cases one after another)."""
    worker_max_cases: Annotated[Int, Flag(metavar="N")] = 50
    """Recycle a worker after N cases."""
    worker_max_memory_mb: Annotated[Float, Flag(metavar="MB")] = 0.0
    """Recycle a worker whose resident memory is above this after a case (0: no limit)."""
    progress_every: Annotated[Float, Flag(metavar="SECONDS")] = 10.0
    """Print the progress table this often (0: never)."""
    report: Annotated[Bool, Flag("--no-report", action="store_false")] = True
    """Write the report at the end (--no-report: do not)."""
    gpus_per_case: Annotated[Optional[Float], Flag(metavar="N")] = None
    """GPUs per case (default: 1 if the cluster has GPUs, else 0)."""
    cpus_per_case: Annotated[Float, Flag(metavar="N")] = 1.0
    """CPUs per case (TensorFlow's thread pools are sized to it)."""
    overrides: Annotated[tuple[str, ...], Flag("--set", metavar="KEY=VALUE", action="append")] = ()
    """Override a setting of every case, e.g. --set epochs=3 --set data.path=~/data (CASE.key: one case's)."""
    only: Annotated[tuple[str, ...], Flag(metavar="CASE", nargs="+")] = ()
    """Run only these cases: names, groups or globs ('fast-*')."""

    @classmethod
    def of(cls, **values) -> "StudyOptions":
        """Checked options from keyword arguments (UserError, one line, for a wrong name, type or value)."""
        unknown = sorted(set(values) - set(cls.model_fields))
        if unknown:
            raise UserError(f"unknown option {unknown[0]!r}; the options are {', '.join(cls.model_fields)}")
        try:
            options = cls(**values)
        except ValidationError as error:
            first = error.errors(include_url=False)[0]
            name, given = str(first["loc"][0]), first.get("input")
            shown = _short(repr(given) if isinstance(given, str) else given)
            raise UserError(f"{flag_of(name)} {shown}: {first['msg'][0].lower()}{first['msg'][1:]}") from None
        options.check()
        return options

    def check(self) -> None:
        """Every check of the options' values and of how they combine (UserError, one line)."""
        number = _number
        number("max_retries", self.max_retries, 0, integer=True)
        number("checkpoint_every", self.checkpoint_every, 0, integer=True)
        number("cpus_per_case", self.cpus_per_case, 0, strict=True)
        number("gpus_per_case", self.gpus_per_case, 0, optional=True)
        if self.gpus_per_case is not None and self.gpus_per_case > 1 and not float(self.gpus_per_case).is_integer():
            raise UserError(f"--gpus-per-case {self.gpus_per_case:g}: above 1 it must be a whole number")
        number("progress_every", self.progress_every, 0)
        number("commit_every", self.commit_every, 0)
        number("worker_max_cases", self.worker_max_cases, 1, integer=True)
        number("worker_max_memory_mb", self.worker_max_memory_mb, 0)
        if self.resume and self.out:
            raise UserError("--out and --resume: the resumed run is written where it is")
        if self.suite is None and not self.resume:
            raise UserError(missing_suite("run", self.only))
        if self.suite is None and self.overrides:
            raise UserError("--set needs a suite: a resumed run keeps the settings it was started with")
        if self.overrides and not isinstance(self.suite, str):
            raise UserError("--set applies to a suite file or name, not to a Suite object")
        check_address(self.address)


def missing_suite(command: str, only=()) -> str:
    """The refusal of `bplab run` or `bplab plan` without a suite. --only takes every word after
    it, so `bplab run --only a quick` reads `quick` as a case: the message says so."""
    text = f"{command}: give a SUITE (see `bplab cases`)" + (" or --resume RUN" if command == "run" else "")
    if only:
        words = " ".join(str(word) for word in only)
        text += (f"; --only took every word after it ({_short(words)}): put the suite before --only, "
                 f"e.g. bplab {command} {_short(str(only[-1]), 40)} --only ...")
    return text


def flag_of(name: str) -> str:
    """The command-line flag of option `name` (max_retries -> --max-retries)."""
    info = StudyOptions.model_fields[name]
    flag = next((m for m in info.metadata if isinstance(m, Flag)), Flag())
    if flag.flag == "":
        return name.upper()
    return flag.flag or "--" + name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser, names=None, help: dict | None = None, required=()) -> None:
    """Add the options `names` (default: all) to `parser`: flag, type, default, metavar, and
    the field's docstring as help (or `help[name]`); a positional one in `required` must be given."""
    for name in names or StudyOptions.model_fields:
        info = StudyOptions.model_fields[name]
        flag = next((m for m in info.metadata if isinstance(m, Flag)), Flag())
        text = (help or {}).get(name) or " ".join((info.description or "").split())
        kwargs: dict = {"help": text.rstrip(".").replace("%", "%%")}
        if flag.flag == "":
            nargs = None if name in required else flag.nargs
            parser.add_argument(name, nargs=nargs, default=info.default, metavar=name.upper(), **kwargs)
            continue
        if flag.action in ("store_true", "store_false"):
            kwargs["action"] = flag.action
        else:
            kind = _scalar_type(info.annotation)
            kwargs.update(type=kind, metavar=flag.metavar)
            if flag.nargs:
                kwargs["nargs"] = flag.nargs
            if flag.action:
                kwargs["action"] = flag.action
        default = info.default
        kwargs["default"] = list(default) if isinstance(default, tuple) else default
        parser.add_argument(flag_of(name), dest=name, **kwargs)


def from_arguments(args: argparse.Namespace, names=None, **extra) -> StudyOptions:
    """The checked options of a parsed command line."""
    return StudyOptions.of(**{name: getattr(args, name) for name in names or StudyOptions.model_fields}, **extra)


def _scalar_type(annotation) -> type:
    """int, float or str: what argparse converts one command-line value to (Optional[float] -> float)."""
    stack = [annotation]
    while stack:
        kind = stack.pop(0)
        if kind in (int, float):
            return kind
        stack.extend(get_args(kind))
    return str


def _number(name, value, low, *, integer=False, strict=False, optional=False):
    if value is None and optional:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if strict else value >= low) and (not integer or float(value).is_integer())
    if not ok:
        kind = "an integer" if integer else "a finite number"
        raise UserError(f"{flag_of(name)} {_short(value)}: must be {kind} {'>' if strict else '>='} {low:g}")


def is_local(address: str | None) -> bool:
    """True where `address` asks for a private local Ray (none given, or 'local'), which bplab
    starts, uses alone and stops; any other address names a running cluster."""
    return address is None or address == "local"


def check_address(address: str | None, timeout: float = 5.0) -> None:
    """UserError (one line, within `timeout` seconds) if `address` is malformed or nothing listens there.

    None and 'local' (a private local Ray, see is_local) and 'auto' are not probed; 'HOST:PORT'
    and 'ray://HOST:PORT' are probed with a TCP connection first, so an unreachable address
    fails at once instead of Ray retrying for minutes."""
    import socket

    from workers.errors import one_line

    if is_local(address) or address == "auto":
        return
    if not isinstance(address, str) or not address.strip() or len(address) > 1000:
        raise UserError(f"--address {_short(address)}: expected HOST:PORT, ray://HOST:PORT, auto or local")
    target = address.strip()
    if "://" in target:
        scheme, target = target.split("://", 1)
        if scheme != "ray":
            raise UserError(f"--address {_short(address)}: expected HOST:PORT, ray://HOST:PORT, auto or local")
    host, _, port_text = target.rstrip("/").rpartition(":")
    host = host.strip("[]")
    if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise UserError(f"--address {_short(address)}: expected HOST:PORT with a port in 1..65535")
    try:
        with socket.create_connection((host, int(port_text)), timeout=timeout):
            pass
    except OSError as error:
        reason = one_line(error) if not isinstance(error, socket.timeout) else f"no answer in {timeout:g} s"
        raise UserError(f"--address {_short(address)}: cannot reach a Ray cluster there ({reason})") from None


def _short(value, limit: int = 80) -> str:
    from workers.errors import shorten

    return shorten(value, limit)
