import contextlib
import json

# The standard library an agent's code reaches for, imported here so that it
# is in the pre-initialised image: a module not imported at build time is not
# in the component at all.
import base64, bisect, collections, copy, csv, dataclasses, datetime, decimal  # noqa: E401,F401
import difflib, enum, fractions, functools, hashlib, heapq, html, itertools  # noqa: E401,F401
import math, operator, os, pathlib, pprint, random, re, statistics, string  # noqa: E401,F401
import textwrap, time, typing, unicodedata, urllib.parse, uuid, zlib  # noqa: E401,F401
import socket, subprocess, urllib.request  # noqa: E401,F401  (present, and refused by the sandbox)

# The packages of requirements.txt, every module of them (the build lists them).
try:
    import importlib
    from _imagentx_baked import MODULES as _BAKED

    for _module in _BAKED:
        try:
            importlib.import_module(_module)
        except Exception:  # a module needing an optional dependency: left out
            pass
except ImportError:  # built without packages
    pass

import wit_world
from agent_code import CappedStdout, code_traceback, run, to_json
from componentize_py_types import Err

# Printed output kept per call; the rest is counted and dropped, so that a
# flood cannot crowd out `result` (the sandbox's default output cap is 1 MiB).
STDOUT_CAP = 512 * 1024


SCHEMA = {
    "type": "object",
    "properties": {
        "code": {
            "type": "string",
            "description": "Python source to run. The value of the last expression statement is the result "
            "(as in a notebook cell: `df.describe()` or `x * 2` as the last line), unless the code assigns "
            "`result`. Prints come back as `stdout`. In a session, variables and imports persist between steps.",
        },
        "args": {"type": "object", "description": "available to the code as `args`"},
    },
    "required": ["code"],
}


# The code's globals. An instance serves one call, or the steps of one session:
# so they are the session's state, and a one-shot call starts with them empty.
SCOPE = {"__name__": "__main__"}


class WitWorld(wit_world.WitWorld):
    def describe(self) -> str:
        return json.dumps({
            "name": "python",
            "version": "0.1.0",
            "description": "Runs Python code in a fresh interpreter (or a session's live one); prints and "
            "the last expression's value (or `result`) come back.",
            "input_schema": SCHEMA,
        })

    def call(self, input: str) -> str:
        try:
            request = json.loads(input)
            code = request["code"]
        except Exception as e:
            raise Err(json.dumps({"code": "invalid_input", "message": f"expected {{\"code\": ...}}: {e}"}))
        scope = SCOPE
        scope["args"] = request.get("args", {})
        # A result is this step's: one left by an earlier step of a session is not.
        scope.pop("result", None)
        out = CappedStdout(STDOUT_CAP)
        try:
            with contextlib.redirect_stdout(out):
                value = run(code, scope)
        except BaseException:
            raise Err(json.dumps({"code": "tool_error", "message": code_traceback(), "stdout": out.getvalue()}))
        answer = {"stdout": out.getvalue()}
        if out.dropped:
            answer["stdout_truncated"] = True
        if "result" in scope:
            answer["result"] = to_json(scope["result"])
        elif value is not None:
            answer["result"] = to_json(value)
        return json.dumps(answer)


# Everything made while the image is built (modules, the baked packages) goes
# to the collector's permanent generation: a call's collections never walk
# (and so never write to, and copy) those objects of the snapshot.
import gc  # noqa: E402

gc.freeze()
