"""nox sessions: tests (the suite, as scripts/test runs it), lint (ruff) and types (mypy)."""

import nox

nox.options.sessions = ["lint", "types", "tests"]
nox.options.reuse_existing_virtualenvs = True


def _install(session: nox.Session, *extras: str) -> None:
    session.install("-e", f".[{','.join(extras)}]" if extras else ".")


@nox.session
def tests(session: nox.Session) -> None:
    """The whole suite (needs root, /dev/fuse and loop devices; starts a loopback Swift)."""
    _install(session, "test")
    session.run("python", "scripts/pyfuse3-patch.py")  # discard and spliced reads
    session.run("pytest", "-p", "no:cacheprovider", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", "snapfs", "tests", "bench", "scripts", "noxfile.py")
    session.run("ruff", "format", "--check", ".")


@nox.session
def types(session: nox.Session) -> None:
    _install(session, "test")
    session.install("mypy")
    session.run("mypy", "snapfs")


@nox.session
def bench(session: nox.Session) -> None:
    """The benchmark command (scripts/bench), with its arguments."""
    _install(session)
    session.run("scripts/bench", *session.posargs, external=True)
