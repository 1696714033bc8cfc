"""What both Python tools do with an agent's code (`python` in WebAssembly,
`python-data` in the jail): run it with the last expression as the result,
keep a capped copy of what it prints, show only its own frames in a
traceback, and make its result something JSON can carry.

Copied into each tool's build by scripts/build-interpreters."""

import ast
import io
import json
import sys
import traceback


class CappedStdout(io.TextIOBase):
    """Printed output kept up to `cap` characters; the rest counted and
    dropped, so that a flood cannot crowd out the result."""

    def __init__(self, cap):
        self.cap, self.parts, self.kept, self.dropped = cap, [], 0, 0

    def writable(self):
        return True

    def write(self, text):
        room = self.cap - self.kept
        if len(text) > room:
            self.dropped += len(text) - max(room, 0)
            text = text[: max(room, 0)]
        self.parts.append(text)
        self.kept += len(text)
        return len(text)

    def getvalue(self):
        return "".join(self.parts)


def run(code, scope):
    """Runs `code` in `scope` and answers the value of its last statement when
    that is an expression (the REPL's and Jupyter's rule), else None."""
    tree = ast.parse(code, "<code>", "exec")
    last = None
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        last = ast.Expression(tree.body.pop().value)
    exec(compile(tree, "<code>", "exec"), scope)
    return eval(compile(last, "<code>", "eval"), scope) if last is not None else None


def code_traceback():
    """The exception being handled, with the frames of the agent's code only."""
    kind, error, frames = sys.exc_info()
    while frames is not None and frames.tb_frame.f_code.co_filename != "<code>":
        frames = frames.tb_next
    return "".join(traceback.format_exception(kind, error, frames))


def finite(value):
    """`value` with NaN and infinities (JSON has no words for them) as null."""
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def to_json(value, cap=None):
    """`value` itself when JSON can carry it (NaN and infinities as null),
    else its repr; with `cap`, a value whose JSON is longer comes back as
    {"truncated": true, "repr": the first `cap` characters of its repr}."""
    try:
        text = json.dumps(value, allow_nan=False)
    except TypeError:
        return repr(value)[:cap]
    except ValueError:
        try:
            value = finite(value)
            text = json.dumps(value, allow_nan=False)
        except (TypeError, ValueError, RecursionError):
            return repr(value)[:cap]
    if cap is not None and len(text) > cap:
        return {"truncated": True, "repr": repr(value)[:cap]}
    return value
