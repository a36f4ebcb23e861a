"""Whether a file someone sent is text: UTF-8, no NUL, and (for documents) JSON lines with a
"text" string each, or plain text. Standard library only (no torch), so that the check of a
large file can run in a process of its own: `python -m btm.textcheck PATH [NAME]
[--no-documents] [--nice N]` prints {"documents": n} or {"error": "..."}. btm.data re-exports
check_text_file."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from btm.errors import DataError


def check_text_file(path: str | os.PathLike, name: str | None = None, documents: bool = True) -> int:
    """Check that a file someone sent is UTF-8 text (and, with `documents`, JSON lines with a
    "text" string each, or plain text): no binary, no pickle. Returns the number of documents.
    `name` is how errors call the file."""
    path = Path(path)
    label = name or str(path)
    n = 0
    kind = None  # "jsonl" or "text", decided by the first non-blank line
    try:
        # strict: bytes that are not UTF-8 mean a binary file (reported below)
        with open(path, encoding="utf-8", errors="strict", newline="") as f:
            for lineno, line in enumerate(f, 1):
                _reject_nul(label, lineno, line)
                if not documents or not line.strip():
                    continue
                if kind is None:
                    kind = "jsonl" if line.lstrip().startswith("{") else "text"
                if kind == "jsonl":
                    n += _jsonl_line_has_text(label, lineno, line)
    except UnicodeDecodeError as e:
        raise DataError(f"{label}: not UTF-8 text (byte {e.start} of a line cannot be decoded); a binary file?") from None
    if documents:
        _require_documents(label, kind, n)
    return n if kind == "jsonl" else int(documents)


def _reject_nul(label: str, lineno: int, line: str) -> None:
    """A NUL byte is valid UTF-8 but never occurs in text: the file is binary."""
    if "\x00" in line:
        raise DataError(f"{label}:{lineno}: a NUL byte; this is a binary file, not text")


def _jsonl_line_has_text(label: str, lineno: int, line: str) -> bool:
    """Check one line of JSON lines is a {"text": str} object; True if its text is non-empty."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError:
        raise DataError(f"{label}:{lineno}: not valid JSON; JSON lines need one "
                        '{"text": ...} object per line') from None
    if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
        raise DataError(f'{label}:{lineno}: expected a JSON object with a "text" string')
    return bool(obj["text"])


def _require_documents(label: str, kind: str | None, n: int) -> None:
    """A documents file must hold some text, and JSON lines at least one non-empty "text"."""
    if kind is None:
        raise DataError(f"{label}: the file holds no text")
    if kind == "jsonl" and n == 0:
        raise DataError(f'{label}: every "text" is empty')


def main(argv: list[str]) -> int:
    documents = "--no-documents" not in argv
    args = [a for a in argv if a != "--no-documents"]
    if "--nice" in args:  # a check beside a server takes the CPU its requests leave
        i = args.index("--nice")
        os.nice(int(args[i + 1]))
        del args[i:i + 2]
    try:
        n = check_text_file(args[0], args[1] if len(args) > 1 else None, documents)
    except DataError as e:
        print(json.dumps({"error": str(e)}))
        return 0
    print(json.dumps({"documents": n}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
