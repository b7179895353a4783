"""Held-out English sentences from the Python standard library's docstrings.

These are reserved for evaluation: nothing in mpocompress is trained, calibrated or tuned on them.
The sentences are the first sentence of the docstring of every public function and class of a
fixed list of pure-Python standard library modules, kept when they read as prose (6-40 words,
capitalised, ending with a full stop), de-duplicated, in a deterministic order.

    python benchmarks/heldout.py -o stdlib.txt     # writes one sentence per line
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import re
from pathlib import Path

MODULES = (
    "argparse", "ast", "asyncio", "base64", "bisect", "calendar", "collections", "configparser", "contextlib",
    "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "email", "enum", "fnmatch", "fractions",
    "functools", "getopt", "gettext", "glob", "gzip", "hashlib", "heapq", "hmac", "html", "http.client",
    "imaplib", "inspect", "io", "ipaddress", "json", "logging", "mailbox", "mimetypes", "numbers", "operator",
    "optparse", "os", "pathlib", "pickle", "pkgutil", "platform", "plistlib", "pprint", "queue", "quopri",
    "random", "re", "sched", "secrets", "selectors", "shelve", "shlex", "shutil", "smtplib", "socket",
    "socketserver", "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading",
    "timeit", "tokenize", "traceback", "types", "typing", "unittest", "urllib.parse", "urllib.request", "uuid",
    "warnings", "wave", "weakref", "xml.dom.minidom", "zipfile", "zipimport",
)  # fmt: skip
_SENTENCE = re.compile(r"^(.+?\.)(\s|$)", re.S)


def sentences(limit: int | None = None) -> list[str]:
    seen, out = set(), []
    for name in MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        for attr in sorted(dir(module)):
            if attr.startswith("_"):
                continue
            obj = getattr(module, attr, None)
            if not (inspect.isfunction(obj) or inspect.isclass(obj)) or getattr(obj, "__module__", "") != module.__name__:
                continue
            doc = inspect.getdoc(obj) or ""
            m = _SENTENCE.match(" ".join(doc.split()))
            if not m:
                continue
            s = m.group(1).strip()
            words = s.split()
            if 6 <= len(words) <= 40 and s[0].isupper() and sum(c.isalpha() for c in s) > 0.7 * len(s) and s not in seen:
                seen.add(s)
                out.append(s)
    return out[:limit] if limit else out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-o", "--out", required=True)
    args = ap.parse_args()
    lines = sentences()
    Path(args.out).write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"{len(lines)} sentences -> {args.out}")
