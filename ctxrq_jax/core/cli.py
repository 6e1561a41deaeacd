"""How every command runs: quiet by default, one-line errors for a user's mistakes, help without importing JAX.

    if __name__ == "__main__":
      cli.run(main, define_flags)

* Output: library chatter (absl INFO of orbax, jax, grain; TensorFlow's C++ log) is off unless `--verbosity` asks for
  it (`--verbosity=0` shows INFO, 1 adds DEBUG). What a command prints itself is its progress lines and results.
* Errors: a mistake in what the user asked for (a misspelt config key, a class id out of range, a missing workdir,
  T_draft > N, ...) prints one line `error: ...` on stderr and exits 2; the traceback only with `--verbosity=1`
  (absl itself reports a usage error, `app.UsageError`, with the command's usage and exit code 1 then).
* Speed: this module imports no JAX; commands import the library inside `main`, so `--help` answers at once.
"""

from __future__ import annotations

import logging as py_logging
import os
import sys
from typing import Any, Callable, Mapping, Optional, Sequence

from absl import app
from absl import flags
from absl import logging

# The kinds of exception that describe bad input rather than a bug in the library. ConfigError is a ValueError.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, app.UsageError,
               flags.Error)
_ERROR_EXIT = 2


def _verbosity() -> int:
  f = flags.FLAGS
  return int(f.verbosity) if f.is_parsed() and f["verbosity"].present else -1


class _PlainFormatter(py_logging.Formatter):
  """`warning: message` for the library's own log lines (no timestamps or thread ids)."""

  def format(self, record: py_logging.LogRecord) -> str:
    return f"{record.levelname.lower()}: {record.getMessage()}"


# Dependency loggers whose warnings stay on by default: JAX's backend set-up says there when it finds a GPU or TPU it
# cannot use and falls back to the CPU (a GPU host without the `cuda` extra would otherwise train on the CPU unsaid).
KEPT_WARNINGS = ("jax._src.xla_bridge",)


def _plain_handler() -> py_logging.Handler:
  handler = py_logging.StreamHandler(sys.stderr)
  handler.setFormatter(_PlainFormatter())
  handler._ctxrq = True  # pylint: disable=protected-access
  return handler


def quiet_dependencies(verbosity: int) -> None:
  """Logging for this process. Default (`verbosity` < 0): the library's warnings as `warning: ...` lines, nothing
  from dependencies below ERROR but the warnings of `KEPT_WARNINGS`, TensorFlow's C++ log off. 0 shows INFO of
  everything, 1 adds DEBUG."""
  level = py_logging.DEBUG if verbosity >= 1 else py_logging.INFO if verbosity == 0 else py_logging.WARNING
  if verbosity < 0:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    logging.set_verbosity(logging.ERROR)  # absl's logger: orbax, grain and jax log through it
  else:
    logging.set_verbosity(logging.DEBUG if verbosity >= 1 else logging.INFO)
  for name in ("jax", "orbax", "grain", "etils", "tensorflow"):
    py_logging.getLogger(name).setLevel(py_logging.ERROR if verbosity < 0 else level)
  ours = py_logging.getLogger("ctxrq_jax")
  ours.setLevel(level)
  for logger in (ours, *(py_logging.getLogger(name) for name in KEPT_WARNINGS)):
    if verbosity < 0 and not any(getattr(h, "_ctxrq", False) for h in logger.handlers):
      logger.setLevel(level)
      logger.addHandler(_plain_handler())
      logger.propagate = False


def error(message: Any, code: int = _ERROR_EXIT) -> None:
  """Prints `error: message` (its first line) on stderr and exits with `code`."""
  text = str(message).strip() or type(message).__name__
  sys.stderr.write(f"error: {text.splitlines()[0]}\n")
  sys.stderr.flush()
  sys.exit(code)


def _command_names(program: str, commands: Sequence[str]) -> str:
  """`convert inception / clip`, or with the bare program among them (""), `sample` or `sample inpaint`."""
  if all(commands):
    return f"`{program} {' / '.join(commands)}`"
  return " or ".join(f"`{program} {c}`" if c else f"`{program}`" for c in commands)


def check_flags(program: str, command: str, flag_commands: Mapping[str, Sequence[str]]) -> None:
  """UsageError naming each flag of `flag_commands` given on the command line (`FLAGS[name].present`, whatever its
  value) that `command` of `program` does not read, and the commands that do.

  `flag_commands` maps a flag to the subcommands that read it ("" for the program without one); flags it does not
  name apply to every subcommand. A flag accepted and silently ignored looks like it did something: `sample --class=3`
  (for `--classes=3`) drew every class.
  """
  wrong = []
  for name, commands in flag_commands.items():
    if flags.FLAGS[name].present and command not in commands:
      given = f"--no{name}" if flags.FLAGS[name].value is False else f"--{name}"
      wrong.append(f"{given} applies to {_command_names(program, commands)} only")
  if wrong:
    raise app.UsageError(f"{'; '.join(wrong)}, not to {_command_names(program, (command,))}")


def _last_line(text: Any) -> str:
  lines = [line.strip() for line in str(text).splitlines() if line.strip()]
  return lines[-1] if lines else ""


def _check_config_flags(argv: Sequence[str]) -> None:
  """ml_collections defers a config file's load error until the config is first used (a traceback deep inside the
  command, after hours of stage-1 training in the demo's case): report it now, naming the flag and the file."""
  for name in flags.FLAGS:
    flag = flags.FLAGS[name]
    value = getattr(flag, "_value", None)
    if type(value).__name__ == "_ErrorConfig":  # ml_collections' placeholder for a config that failed to load
      given = next((a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")), "")
      error(f"--{name}={given} could not be loaded: {_last_line(getattr(value, '_error', ''))}")


def _parse_flags(argv: Sequence[str]) -> list[str]:
  try:
    rest = flags.FLAGS(list(argv))
  except flags.Error as e:
    text = str(e)
    if "Traceback (most recent call last)" in text:  # a config file's own error: the flag, then what it raised
      error(f"{text.splitlines()[0]} {_last_line(text)}")
    error(e)
  except (AttributeError, KeyError) as e:  # a --config.a.b=... override naming no key of the (locked) config
    if isinstance(e, AttributeError) and "get_config" in str(e):  # a file that parses as Python but defines none
      error("a --config must be a Python file with get_config(), e.g. configs/demo.py; the one given defines none")
    error(f"a config override names no config key: {' '.join(str(e).replace(chr(92) + 'n', ' ').split())}")
  except Exception as e:  # noqa: BLE001 - e.g. a --config file that is not Python fails inside its parser
    error(f"could not parse the command line ({type(e).__name__}: {_last_line(e)}); a --config must be a Python "
          "file with get_config(), e.g. configs/demo.py")
  else:
    _check_config_flags(argv)
    return rest
  return []


def run(main: Callable[[list[str]], Any], define_flags: Optional[Callable[[], None]] = None) -> None:
  """absl's `app.run(main)` with the behaviour described in the module doc."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  if define_flags is not None:
    define_flags()

  def wrapped(argv: list[str]) -> None:
    verbosity = _verbosity()
    quiet_dependencies(verbosity)
    try:
      main(argv)
    except FloatingPointError as e:  # a run that diverged: reported, not a traceback
      if verbosity >= 1:
        raise
      error(e, code=1)
    except USER_ERRORS as e:
      if verbosity >= 1:
        raise
      error(e)

  app.run(wrapped, flags_parser=_parse_flags)
