"""Exec a command under the seccomp policy systemd builds from discoveryd.service.

    python sandbox_exec.py POLICY.json -- command args...

POLICY.json (written by tests/integration/test_systemd.py from the unit and
`systemd-analyze syscall-filter`): {"allow": [syscall names], "errno": N,
"families": [address family numbers], "mdwe": bool}. Loaded as systemd
loads them, one seccomp filter each (the kernel applies the strictest
answer of all):

- SystemCallFilter= (allow-list) with SystemCallErrorNumber=: every other
  syscall fails with that errno;
- RestrictAddressFamilies=: socket() with another family fails with EAFNOSUPPORT;
- MemoryDenyWriteExecute=: mmap with PROT_WRITE|PROT_EXEC, mprotect and
  pkey_mprotect adding PROT_EXEC, shmat with SHM_EXEC fail with EPERM.

Uses libseccomp's Python binding (Debian package python3-seccomp).
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import sys

sys.path.append("/usr/lib/python3/dist-packages")
import seccomp

SHM_EXEC = 0o100000
AF_MAX = 64


def load(policy: dict[str, object]) -> list[str]:
    """Load the filters; return the allowed names this kernel/arch does not know."""
    unknown: list[str] = []
    allow = seccomp.SyscallFilter(defaction=seccomp.ERRNO(int(policy["errno"])))  # type: ignore[call-overload]
    for name in policy["allow"]:  # type: ignore[attr-defined]
        try:
            allow.add_rule(seccomp.ALLOW, name)
        except (RuntimeError, ValueError):
            unknown.append(name)
    families = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
    for family in range(AF_MAX):
        if family not in policy["families"]:  # type: ignore[operator]
            families.add_rule(seccomp.ERRNO(errno.EAFNOSUPPORT), "socket", seccomp.Arg(0, seccomp.EQ, family))
    filters = [allow, families]
    if policy["mdwe"]:
        wx = mmap.PROT_WRITE | mmap.PROT_EXEC
        mdwe = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
        mdwe.add_rule(seccomp.ERRNO(errno.EPERM), "mmap", seccomp.Arg(2, seccomp.MASKED_EQ, wx, wx))
        for call in ("mprotect", "pkey_mprotect"):
            mdwe.add_rule(
                seccomp.ERRNO(errno.EPERM), call, seccomp.Arg(2, seccomp.MASKED_EQ, mmap.PROT_EXEC, mmap.PROT_EXEC)
            )
        mdwe.add_rule(seccomp.ERRNO(errno.EPERM), "shmat", seccomp.Arg(2, seccomp.MASKED_EQ, SHM_EXEC, SHM_EXEC))
        filters.append(mdwe)
    # The allow-list goes last: once it is in force, seccomp() itself is still allowed
    # (@system-service has it), but load the permissive ones first all the same.
    for f in reversed(filters):
        f.load()
    return unknown


def main() -> None:
    split = sys.argv.index("--")
    with open(sys.argv[1]) as f:
        policy = json.load(f)
    unknown = load(policy)
    if unknown:
        print(f"sandbox_exec: syscalls unknown here, left out: {' '.join(unknown)}", file=sys.stderr)
    command = sys.argv[split + 1 :]
    os.execv(command[0], command)


if __name__ == "__main__":
    main()
