"""System users of the native stack: one per component that must be told apart or must not
run as root (the pipeline's services, the broker, Elasticsearch).

SPIRE's `unix` workload attestor tells workloads apart by the uid of the process calling the
Workload API, so each service runs as its own user (`pipeline-ingester`, ...) and gets only
its own SVID. Users are created once with useradd when the stack runs as root; a stack run
by an ordinary user cannot switch users, so everything runs as that user (see
`deploy/local/spire_stack.py` for what that means for identities).
"""

from __future__ import annotations

import os
import pwd
import subprocess
from collections.abc import Sequence
from pathlib import Path

from deploy.local.processes import StackError


def switching_users() -> bool:
    """Whether this stack can run components as their own system users (it runs as root)."""
    return os.geteuid() == 0


def ensure_system_user(name: str, comment: str) -> pwd.struct_passwd | None:
    """As root, the system user `name` (created once, no home, no login shell); otherwise
    None: the component runs as we do."""
    if not switching_users():
        return None
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pass
    result = subprocess.run(
        [
            "useradd",
            "--system",
            "--user-group",
            "--no-create-home",
            "--home-dir",
            "/nonexistent",
            "--shell",
            "/usr/sbin/nologin",
            "--comment",
            comment,
            name,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    try:  # another stack may have created it at the same moment: that is fine too
        return pwd.getpwnam(name)
    except KeyError:
        raise StackError(f"creating the OS user {name} failed: {result.stderr.strip()}") from None


def as_user(user: pwd.struct_passwd | None) -> list[str]:
    """The argv prefix that runs a command as `user` (nothing for None).

    setpriv execs in place (no PAM session, no extra process): a pid file names the program
    itself, and its uid, gid and groups are all the user's (Popen's user= keeps root's gid)."""
    if user is None:
        return []
    return ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--init-groups", "--"]


def own(paths: Sequence[Path], user: pwd.struct_passwd | None) -> None:
    """Make `user` the owner of each path (not following symlinks); nothing for None."""
    if user is None:
        return
    ids = (user.pw_uid, user.pw_gid)
    for path in paths:
        st = os.lstat(path)
        if (st.st_uid, st.st_gid) != ids:
            os.lchown(path, *ids)


def own_tree(top: Path, user: pwd.struct_passwd | None) -> None:
    """`user` owns `top` and everything under it."""
    if user is not None:
        own([top, *(Path(d) / n for d, dirs, files in os.walk(top) for n in (*dirs, *files))], user)


def can_run(user: pwd.struct_passwd | None, argv: Sequence[str]) -> bool:
    """Whether `argv` succeeds as `user` (e.g. a probe that the interpreter is reachable)."""
    return subprocess.run([*as_user(user), *argv], capture_output=True, check=False).returncode == 0
