"""Landlock applied by a process to itself, for python-data's warm jails: the
jail cannot make the rules before the caller's /data is attached (a rule made
earlier would name the empty directory underneath, which Landlock never
consults again), so the runner applies them once it is, before any of the
caller's code runs. Standard library only (ctypes); the numbers are the
kernel's ABI (x86-64 and AArch64 share them).
"""

import ctypes
import os
import struct

LANDLOCK_CREATE_RULESET, LANDLOCK_ADD_RULE, LANDLOCK_RESTRICT_SELF = 444, 445, 446
LANDLOCK_RULE_PATH_BENEATH = 1


def landlock(rules):
    """Applies the jail's Landlock rules to this process: `rules` is
    "handled;/path=rights;..." (decimal), as the jail writes it. The process
    must be single-threaded: Landlock binds the calling thread (and what it
    starts), not the threads already running."""
    threads = os.listdir("/proc/self/task")
    if len(threads) != 1:
        raise RuntimeError(f"{len(threads)} threads: Landlock would bind only this one")
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long

    def call(*args):
        ret = libc.syscall(*args)
        if ret < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        return ret

    handled, *pairs = rules.split(";")
    attr = ctypes.create_string_buffer(struct.pack("=Q", int(handled)))
    ruleset = call(LANDLOCK_CREATE_RULESET, attr, ctypes.c_size_t(8), ctypes.c_uint32(0))
    try:
        for pair in pairs:
            path, rights = pair.rsplit("=", 1)
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            try:
                rule = ctypes.create_string_buffer(struct.pack("=Qi", int(rights), fd))
                kind = ctypes.c_int(LANDLOCK_RULE_PATH_BENEATH)
                call(LANDLOCK_ADD_RULE, ctypes.c_int(ruleset), kind, rule, ctypes.c_uint32(0))
            finally:
                os.close(fd)
        call(LANDLOCK_RESTRICT_SELF, ctypes.c_int(ruleset), ctypes.c_uint32(0))
    finally:
        os.close(ruleset)
