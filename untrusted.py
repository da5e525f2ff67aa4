"""Text that came from outside (archive member names, hub listings, CivitAI's API) made safe to log.

A name can hold a newline that would forge a log line of its own, terminal escapes, right-to-left
overrides or lone surrogates that no encoder accepts. `printable` writes each such character as a
backslash escape, so what is logged is one line that says exactly what was received.
"""

from __future__ import annotations

MAX_CHARS = 200  # a name in a log line or an error message, not a document


def printable(text: object, limit: int = MAX_CHARS) -> str:
    """`text` on one line: non-printable characters (controls, line and paragraph separators, format
    characters, lone surrogates) and backslashes escaped; cut to `limit` characters with "…"."""
    text = str(text)
    cut = len(text) > limit
    out = []
    for char in text[:limit]:
        if char == "\\":
            out.append("\\\\")
        elif char.isprintable() or char == " ":
            out.append(char)
        else:
            out.append(char.encode("unicode_escape").decode("ascii"))
    return "".join(out) + ("…" if cut else "")
