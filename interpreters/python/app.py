import contextlib
import io
import json
import traceback

# The standard library an agent's code reaches for, imported here so that it
# is in the pre-initialised image: a module not imported at build time is not
# in the component at all.
import base64, bisect, collections, copy, csv, dataclasses, datetime, decimal  # noqa: E401,F401
import difflib, enum, fractions, functools, hashlib, heapq, html, itertools  # noqa: E401,F401
import math, operator, os, pathlib, pprint, random, re, statistics, string  # noqa: E401,F401
import textwrap, time, typing, unicodedata, urllib.parse, uuid, zlib  # noqa: E401,F401
import socket, subprocess, urllib.request  # noqa: E401,F401  (present, and refused by the sandbox)

import wit_world
from componentize_py_types import Err

SCHEMA = {
    "type": "object",
    "properties": {
        "code": {"type": "string", "description": "Python source to run"},
        "args": {"type": "object", "description": "available to the code as `args`"},
    },
    "required": ["code"],
}


class WitWorld(wit_world.WitWorld):
    def describe(self) -> str:
        return json.dumps({
            "name": "python",
            "version": "0.1.0",
            "description": "Runs Python code in a fresh interpreter; prints and `result` come back.",
            "input_schema": SCHEMA,
        })

    def call(self, input: str) -> str:
        try:
            request = json.loads(input)
            code = request["code"]
        except Exception as e:
            raise Err(json.dumps({"code": "invalid_input", "message": f"expected {{\"code\": ...}}: {e}"}))
        scope = {"__name__": "__main__", "args": request.get("args", {})}
        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out):
                exec(compile(code, "<code>", "exec"), scope)
        except BaseException:
            raise Err(json.dumps({"code": "tool_error", "message": traceback.format_exc(), "stdout": out.getvalue()}))
        answer = {"stdout": out.getvalue()}
        if "result" in scope:
            try:
                json.dumps(scope["result"])
                answer["result"] = scope["result"]
            except (TypeError, ValueError):
                answer["result"] = repr(scope["result"])
        return json.dumps(answer)
