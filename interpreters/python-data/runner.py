"""The `python-data` tool: an agent's Python with numpy, pandas and
matplotlib, run by the host's /usr/bin/python3 in the native jail, one
process per call, started before the call when it is warm (below);
scripts/build-interpreters python-data builds its packages.

Input on stdin:  {"code": "...", "args": {...}}
Output on stdout, one JSON document:
    {"stdout": what the code printed,
     "result": the variable `result` if set, else the last expression's value
               (a DataFrame or Series as {"type", "shape", "columns", "records", "text"}),
     "images": [{"format": "png", "data": base64, "width", "height"}] for the
               figures open at the end (plt.show() leaves them open)}
An exception: the traceback on stderr, what was printed on stdout, exit 1.

Warm (IMAGENTX_WARM=1): the jail starts this before its call arrives. It
imports the stack, writes the ready line on stderr and blocks reading stdin;
meanwhile the sandbox attaches the caller's directory at /data. Once the input
is read it changes into /data and, when IMAGENTX_LANDLOCK is set, applies the
jail's Landlock rules to itself (they could not be made before /data was
attached) before any of the caller's code runs: the process must then be
single-threaded, or it refuses to run the code.

A session (the first line ends with `session`): after the same steps, one
step after another in one scope, each a frame in and a frame out (`session`).
"""

import atexit
import base64
import contextlib
import gc
import io
import json
import os
import sys
import weakref

HERE = os.path.dirname(os.path.abspath(__file__))
# `python3 -I` puts neither this directory nor the packages on the path.
sys.path[:0] = [HERE, os.path.join(HERE, "site")]
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("MPLCONFIGDIR", "/tmp/.matplotlib")


def seed_matplotlib_cache():
    """Copies the font cache made at build time into this call's (writable)
    matplotlib directory, so that importing matplotlib does not rebuild it."""
    made = os.path.join(HERE, "mplconfig")
    target = os.environ["MPLCONFIGDIR"]
    if not os.path.isdir(made) or os.path.exists(target):
        return
    try:
        os.makedirs(target)
        for name in os.listdir(made):
            if name.endswith(".json"):
                with open(os.path.join(made, name), "rb") as src, open(os.path.join(target, name), "wb") as dst:
                    dst.write(src.read())
    except OSError:
        pass  # matplotlib then builds its cache itself


seed_matplotlib_cache()

from agent_code import CappedStdout, code_traceback, run, to_json  # noqa: E402  (beside this file)
from confine import landlock  # noqa: E402

# Printed output kept; the rest is counted and dropped.
STDOUT_CAP = 256 * 1024
# Pictures: at most this many, each at most this many pixels a side, and
# their base64 together under this (the whole answer must fit the sandbox's
# 1 MiB output cap).
MAX_IMAGES = 8
MAX_SIDE_PX = 4096
IMAGES_CAP = 640 * 1024
# A DataFrame result: rows as records, and a text rendering.
MAX_RECORDS = 100
TEXT_CAP = 32 * 1024
# Any other result: its JSON at most this long (else its repr, cut).
RESULT_CAP = 256 * 1024


def table(value):
    """A DataFrame or Series as records and text, both capped."""
    import pandas as pd

    frame = value.to_frame() if isinstance(value, pd.Series) else value
    head = frame.head(MAX_RECORDS)
    records = json.loads(head.reset_index().to_json(orient="records", date_format="iso", default_handler=str))
    text = frame.to_string(max_rows=60, max_cols=20)
    return {
        "type": "dataframe" if isinstance(value, pd.DataFrame) else "series",
        "shape": list(value.shape),
        "columns": [str(c) for c in frame.columns],
        "records": records,
        "records_truncated": len(frame) > MAX_RECORDS,
        "text": text[:TEXT_CAP],
    }


def result_json(value):
    """A DataFrame or Series as a table; anything else as JSON can carry it."""
    mod = type(value).__module__
    if mod.startswith("pandas") and type(value).__name__ in ("DataFrame", "Series"):
        return table(value)
    if mod.startswith("numpy") and hasattr(value, "tolist"):
        value = value.tolist()
    return to_json(value, RESULT_CAP)


def pictures(answer):
    """The figures open now, as PNGs, capped in number, size and bytes."""
    if "matplotlib.pyplot" not in sys.modules:
        return
    plt = sys.modules["matplotlib.pyplot"]
    images, notes, total = [], [], 0
    numbers = plt.get_fignums()
    for number in numbers:
        if len(images) == MAX_IMAGES:
            notes.append(f"{len(numbers) - MAX_IMAGES} more figures were not rendered (at most {MAX_IMAGES})")
            break
        fig = plt.figure(number)
        width, height = (int(round(v)) for v in fig.get_size_inches() * fig.dpi)
        if width > MAX_SIDE_PX or height > MAX_SIDE_PX or width <= 0 or height <= 0:
            notes.append(f"figure {number} is {width}x{height} pixels, over {MAX_SIDE_PX} a side: not rendered")
            continue
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
        data = base64.b64encode(buffer.getvalue()).decode("ascii")
        if total + len(data) > IMAGES_CAP:
            notes.append(f"figure {number} would pass the {IMAGES_CAP}-byte cap on images: not included")
            continue
        total += len(data)
        images.append({"format": "png", "data": data, "width": width, "height": height})
    if images:
        answer["images"] = images
    if notes:
        answer["images_truncated"] = True
        answer["images_note"] = "; ".join(notes)


def set_limits(line):
    """Lowers this process's resource limits to a call's: the sandbox's
    "imagentx-limits nofile=S:H nproc=S:H fsize=S:H core=S:H [session]" line.
    Answers a session's answer cap (`frame=N`) when a session's steps follow
    (rather than one call's input), else None."""
    import resource

    words = line.split()
    if not words or words[0] != "imagentx-limits":
        raise ValueError(f"no limits line: {line[:80]!r}")
    names = {"nofile": resource.RLIMIT_NOFILE, "nproc": resource.RLIMIT_NPROC,
             "fsize": resource.RLIMIT_FSIZE, "core": resource.RLIMIT_CORE}
    for word in words[1:]:
        if word == "session":
            continue
        name, values = word.split("=", 1)
        if name == "frame":
            continue
        soft, hard = (int(v) for v in values.split(":"))
        resource.setrlimit(names[name], (soft, hard))
    if "session" not in words[1:]:
        return None
    caps = [int(w.split("=", 1)[1]) for w in words[1:] if w.startswith("frame=")]
    return caps[0] if caps else 1 << 20


def warm_up():
    """Pays before the call what a first analysis pays: the imports, and the
    first use of what loads lazily (the CSV parser, groupby, a figure drawn to
    PNG with its fonts, a table's text), in code of ours on data of ours.
    Then says so on stderr."""
    import ctypes  # noqa: F401  (Landlock, once the call comes)
    import resource  # noqa: F401

    import matplotlib.pyplot as plt
    import numpy  # noqa: F401
    import pandas as pd

    frame = pd.read_csv(io.StringIO("region,amount\nnorth,1.5\nsouth,2\nnorth,3\n"))
    means = frame.groupby("region")["amount"].mean()
    means.plot.bar(title="warm-up")
    answer = {"result": result_json(run("means", {"means": means}))}
    pictures(answer)
    plt.close("all")
    sys.stderr.write("imagentx-warm-ready\n")
    sys.stderr.flush()


def confine():
    """In a warm jail, once the caller's /data is attached: into it, and the
    jail's Landlock rules on this process, before any of the caller's code."""
    os.chdir("/data")
    rules = os.environ.pop("IMAGENTX_LANDLOCK", None)
    os.environ.pop("IMAGENTX_WARM", None)
    if rules:
        landlock(rules)


def one_step(code, scope):
    """Runs `code` in `scope`: (answer, None), or (what it printed, its
    traceback) when it raised."""
    out = CappedStdout(STDOUT_CAP)
    try:
        with contextlib.redirect_stdout(out):
            value = run(code, scope)
            answer = {"stdout": out.getvalue()}
            if "result" in scope:
                answer["result"] = result_json(scope["result"])
            elif value is not None:
                answer["result"] = result_json(value)
            pictures(answer)
    except BaseException:
        return out.getvalue(), code_traceback()
    if out.dropped:
        answer["stdout_truncated"] = True
    return answer, None


def parse_request(data):
    request = json.loads(data or b"null")
    if not isinstance(request, dict) or not isinstance(request.get("code"), str):
        raise TypeError('expected {"code": "..."} (code a string)')
    return request


# Files the caller's code opened, flushed after each step and at the end.
OPEN_FILES = weakref.WeakSet()
FILE_KINDS = (io.TextIOWrapper, io.BufferedWriter, io.BufferedRandom)


def flush_files():
    """Flushes the files the caller's code left open: those among the objects
    made since `gc.freeze()` (before the caller's first code: what is older is
    ours) join OPEN_FILES, then every one still open is flushed."""
    for generation in range(3):
        for obj in gc.get_objects(generation):
            if isinstance(obj, FILE_KINDS):
                OPEN_FILES.add(obj)
    for file in list(OPEN_FILES):
        try:
            if not file.closed:
                file.flush()
        except BaseException:
            pass


def send_frame(frames, frame, cap):
    """Writes `frame` as a frame (length, newline, JSON) on `frames`; an
    answer over `cap` bytes is replaced by a step error saying so."""
    payload = json.dumps(frame).encode()
    if len(payload) > cap:
        note = f"the step's answer was {len(payload)} bytes, over the {cap}-byte output cap: print less, or return a smaller result"
        payload = json.dumps({"ok": False, "stdout": "", "traceback": note + "\n"}).encode()
    view = memoryview(b"%d\n" % len(payload) + payload)
    while view:
        view = view[os.write(frames, view):]


def session(frames, cap):
    """A session's steps: a frame in (length, newline, `{"code", "args"}`),
    a frame out (`{"ok": true, "answer"}` or `{"ok": false, "stdout",
    "traceback"}`, at most `cap` bytes) on the descriptor `frames`, in one
    scope that lives on. A first frame says the session is ready."""
    scope = {"__name__": "__main__"}
    stdin = sys.stdin.buffer
    send_frame(frames, {"ok": True, "ready": True}, cap)
    while True:
        header = stdin.readline()
        if not header:
            return 0
        body = stdin.read(int(header))
        try:
            request = parse_request(body)
        except Exception as e:
            frame = {"ok": False, "stdout": "", "traceback": f"{e}\n"}
        else:
            scope["args"] = request.get("args") or {}
            # A result is this step's: one left by an earlier step is not.
            scope.pop("result", None)
            answer, traceback = one_step(request["code"], scope)
            frame = {"ok": True, "answer": answer} if traceback is None else {"ok": False, "stdout": answer, "traceback": traceback}
        if "matplotlib.pyplot" in sys.modules:
            sys.modules["matplotlib.pyplot"].close("all")
        flush_files()
        send_frame(frames, frame, cap)


def main():
    warm = os.environ.get("IMAGENTX_WARM") == "1"
    in_session = None
    if warm:
        warm_up()
        # The sandbox's first line: the call's resource limits.
        try:
            in_session = set_limits(sys.stdin.buffer.readline().decode())
        except Exception as e:
            print(f"the warm jail could not take its call's limits: {e}", file=sys.stderr)
            return 3
    if in_session is not None:
        try:
            confine()
        except Exception as e:
            print(f"the warm jail could not confine itself: {e}", file=sys.stderr)
            return 3
        # Frames go out on a descriptor of their own; what the code writes
        # to descriptor 1 goes to stderr.
        frames = os.dup(1)
        os.dup2(2, 1)
        gc.freeze()
        return session(frames, in_session)
    try:
        request = parse_request(sys.stdin.buffer.read())
    except Exception as e:
        print(f'expected {{"code": ...}} on stdin: {e}', file=sys.stderr)
        return 2
    if warm:
        # /data is the caller's now; nothing of theirs has run yet.
        try:
            confine()
        except Exception as e:
            print(f"the warm jail could not confine itself: {e}", file=sys.stderr)
            return 3
    scope = {"__name__": "__main__", "args": request.get("args") or {}}
    # What exists now is ours: `leave` looks only at what the caller's code makes.
    gc.freeze()
    answer, traceback = one_step(request["code"], scope)
    if traceback is not None:
        sys.stdout.write(answer)
        sys.stderr.write(traceback)
        return 1
    sys.stdout.write(json.dumps(answer))
    return 0


def leave(code):
    """Ends the process without the interpreter's teardown, which takes about
    0.1 s with pandas and matplotlib loaded: what the teardown would do for
    the caller's code is done first (threads joined, atexit handlers run, the
    files it left open flushed), then os._exit."""
    try:
        if "threading" in sys.modules:
            sys.modules["threading"]._shutdown()
        atexit._run_exitfuncs()
    except BaseException:
        pass
    flush_files()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass
    os._exit(code)


if __name__ == "__main__":
    leave(main())
