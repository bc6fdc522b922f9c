"""Haystack text for the generated tasks: several kinds of real text that ship with Python or Debian, in splits.

Each source is a sequence of passages read from the machine (nothing downloads), each with
a split: defaults are chosen on ``tuning`` sources and reported on ``heldout`` ones.

=================  ==========  ===========================================================
source             split       text
=================  ==========  ===========================================================
python-reference   tuning      Python's language reference (``pydoc_data.topics``)
python-docstrings  tuning      docstrings of pure-Python standard-library modules
licenses           heldout     legal prose: ``/usr/share/common-licenses`` (Debian base-files)
changelogs         heldout     Debian package changelogs (``/usr/share/doc/*/changelog*.gz``)
manpages           heldout     section-1 manual pages, roff markup stripped (``/usr/share/man``)
debian-docs        validation  Debian package documentation (``/usr/share/doc``: READMEs, text,
                               markdown, html), not changelogs or copyright files
=================  ==========  ===========================================================

``validation`` text is for choosing among trained models (``kvforge train``): neither a training corpus nor held
out, worded with the ``tuning`` phrasings. The ``tuning`` sources are the shipped models' training text, so a
model that fits it better wins there whether or not it compresses other text better. Files that are or may be
held-out text in another form are left out (see ``_debian_docs``).

A haystack is consecutive passages from a seeded starting passage, cut to a token length at
a sentence end, followed by the text that comes next (for continuation KL).
"""

from __future__ import annotations

import gzip
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

from ..errors import ConfigError

SPLITS = ("tuning", "heldout", "validation")
CONTINUATION_TOKENS = 64
MAX_PASSAGE_CHARS = 40_000  # one long file must not be the whole haystack of every task that starts on it

# pure-Python standard-library modules whose docstrings are prose (importing them has no side effects)
_DOC_MODULES = ("abc argparse ast asyncio base64 bisect calendar cmd codecs collections configparser contextlib "
                "copy csv dataclasses datetime decimal difflib email enum fnmatch fractions ftplib functools "
                "getopt gettext glob gzip heapq hmac html http imaplib inspect ipaddress json logging mailbox "
                "numbers operator optparse pathlib pickle pprint queue random re sched secrets selectors shelve "
                "shlex shutil smtplib socketserver statistics string subprocess tarfile tempfile textwrap "
                "threading timeit tokenize tomllib trace traceback typing unittest urllib uuid warnings wave "
                "weakref zipfile zipimport").split()


@dataclass(frozen=True)
class Source:
    """A named kind of real text: ``passage(i)`` for i in ``range(count())``, read lazily from the machine."""

    name: str
    split: str
    description: str
    paths: Callable[[], list]  # the passages' keys (files, topics), sorted; empty when absent
    read: Callable[[object], str]
    needs: str = ""  # what to install when the source is absent

    def keys(self) -> list:
        return _keys(self.name)

    @property
    def wording(self) -> str:
        """The needle wording set of this source's split: held-out text gets held-out wordings, the rest tuning."""
        return "heldout" if self.split == "heldout" else "tuning"

    def passage(self, i: int) -> str:
        key = self.keys()[i]
        return _passage(self.name, str(key))


def _clean(text: str) -> str:
    text = re.sub(r"[ \t]+\n", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()[:MAX_PASSAGE_CHARS]


def _topics() -> list[str]:
    import pydoc_data.topics as topics

    return sorted(topics.topics)


def _topic(key) -> str:
    import pydoc_data.topics as topics

    return re.sub(r"\n{3,}", "\n\n", topics.topics[key]).strip()  # exactly what the first task suite used


def _docstring(name) -> str:
    import importlib
    import inspect

    module = importlib.import_module(name)
    parts = [inspect.getdoc(module) or ""]
    for attr in sorted(getattr(module, "__all__", None) or dir(module)):
        obj = getattr(module, attr, None)
        if attr.startswith("_") or getattr(obj, "__module__", None) != name:
            continue
        doc = inspect.getdoc(obj)
        if doc and len(doc) > 80:
            parts.append(f"{attr}: {doc}")
    return _clean("\n\n".join(p for p in parts if p))


def _files(pattern: str, root: str, min_bytes: int = 2000) -> Callable[[], list]:
    def find() -> list:
        base = Path(root)
        if not base.is_dir():
            return []
        return sorted(str(p) for p in base.glob(pattern) if p.is_file() and p.stat().st_size >= min_bytes)
    return find


def _read_text(path) -> str:
    return _clean(Path(path).read_text(encoding="utf-8", errors="replace"))


def _read_gz(path) -> str:
    with gzip.open(path, "rt", encoding="utf-8", errors="replace") as fh:
        return _clean(fh.read(4 * MAX_PASSAGE_CHARS))


_DOC_NAMES = ("README*", "*.txt", "*.txt.gz", "*.md", "*.md.gz", "*.html")
_NOT_DOCS = re.compile(r"changelog|copyright|news|relnotes|release", re.I)  # the changelogs' kind of text


def _debian_docs() -> list:
    """Debian's package documentation files of at least 6 KB, leaving out what is or may be held-out text:
    changelog-like files (changelogs, NEWS, release notes), copyright notices, a file named as a section-1 man
    page (``git-subtree.txt`` is ``git-subtree.1`` in another markup), and a file that shares a 12-word run
    (probed every 150 words) with one of the licenses; an html page beside its own markdown or text is dropped
    as a duplicate."""
    base = Path("/usr/share/doc")
    if not base.is_dir():
        return []
    def stem(p: Path) -> str:
        return p.name.split(".")[0]
    man1 = {stem(p) for p in Path("/usr/share/man/man1").glob("*.1.gz")}
    found = {p for pattern in _DOC_NAMES for p in base.rglob(pattern)
             if p.is_file() and p.stat().st_size >= 6000 and not _NOT_DOCS.search(str(p.relative_to(base)))
             and stem(p) not in man1 and not p.name.startswith("API")}  # API*.html: identifier lists
    texts = {(p.parent, stem(p)) for p in found if p.suffix != ".html"}
    found = sorted(str(p) for p in found  # an html page beside its own markdown or text is the same text twice
                   if not (p.suffix == ".html" and (p.parent, stem(p)) in texts))
    licenses = flat_text(["licenses"])
    return [path for path in found if not shares_run(_read_doc(path), licenses)]


def _read_doc(path) -> str:
    """A documentation file as text: gzip undone, html tags dropped and entities decoded."""
    import html

    path = str(path)
    text = _read_gz(path) if path.endswith(".gz") else Path(path).read_text(encoding="utf-8", errors="replace")
    if path.endswith(".html"):
        text = re.sub(r"(?is)<(script|style)\b.*?</\1>", "", text)
        text = html.unescape(re.sub(r"<[^>]+>", " ", text))
        text = re.sub(r"[ \t]{2,}", " ", text)
    return _clean(text)


_ROFF_FONT = re.compile(r"\\f(\[[^\]]*\]|\(..|.)")
_ROFF_ESCAPE = re.compile(r"\\(\(..|\[[^\]]*\]|[-&|^e0 ])")


def _read_man(path) -> str:
    """A roff page as plain text: requests dropped (their arguments kept for headings), escapes undone."""
    with gzip.open(path, "rt", encoding="utf-8", errors="replace") as fh:
        raw = fh.read(4 * MAX_PASSAGE_CHARS)
    lines = []
    for line in raw.splitlines():
        if line.startswith(('.\\"', "'\\\"", '.\\\\"')):
            continue
        if line.startswith((".", "'")):
            request, _, rest = line[1:].partition(" ")
            if request in ("SH", "SS", "B", "I", "BI", "BR", "IR", "RB", "RI", "IB", "TP", "IP", "TQ"):
                line = rest.replace('"', "")
            else:
                continue
        line = _ROFF_FONT.sub("", line)
        line = _ROFF_ESCAPE.sub(lambda m: {"\\-": "-", "\\e": "\\", "\\ ": " "}.get(m.group(0), ""), line)
        lines.append(line)
    return _clean("\n".join(lines))


SOURCES: dict[str, Source] = {s.name: s for s in [
    Source("python-reference", "tuning", "Python's language reference (pydoc_data.topics)", _topics, _topic),
    Source("python-docstrings", "tuning", "docstrings of pure-Python standard-library modules",
           lambda: list(_DOC_MODULES), _docstring),
    Source("licenses", "heldout", "legal prose in /usr/share/common-licenses",
           _files("*", "/usr/share/common-licenses"), _read_text, "Debian's base-files"),
    Source("changelogs", "heldout", "Debian package changelogs",
           _files("*/changelog*.gz", "/usr/share/doc", 4000), _read_gz, "Debian packages with their /usr/share/doc"),
    Source("manpages", "heldout", "section-1 manual pages, roff stripped",
           _files("*.1.gz", "/usr/share/man/man1", 6000), _read_man, "Debian's man pages (package manpages)"),
    Source("debian-docs", "validation", "Debian package documentation in /usr/share/doc, not changelogs",
           _debian_docs, _read_doc, "Debian packages with their /usr/share/doc"),
]}


@lru_cache(maxsize=None)
def _keys(name: str) -> list:
    return SOURCES[name].paths()


@lru_cache(maxsize=256)
def _passage(name: str, key: str) -> str:
    return SOURCES[name].read(key)


def flat_text(names) -> str:
    """Every passage of the named sources on this machine, whitespace-normalized, one per line (for
    :func:`shares_run`)."""
    return "\n".join(" ".join(SOURCES[n].read(k).split()) for n in names for k in SOURCES[n].keys())


def shares_run(text: str, flat: str, start: int = 0, run: int = 12, every: int = 150) -> bool:
    """Whether ``text`` shares a ``run``-word stretch with ``flat`` (:func:`flat_text`), probed every ``every``
    words from word ``start``: how text that must not be eval text is kept apart from it."""
    words = text.split()
    return any(" ".join(words[i:i + run]) in flat for i in range(start, max(len(words) - run, start + 1), every))


def of_split(split: str) -> list[str]:
    """The sources of a split, in table order."""
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    return [s.name for s in SOURCES.values() if s.split == split]


def check_sources(names) -> list[str]:
    """The named sources, each known and present on this machine; a ConfigError says what to install."""
    names = list(names)
    unknown = [n for n in names if n not in SOURCES]
    if unknown:
        raise ConfigError(f"unknown text sources {unknown}; known: {', '.join(SOURCES)}")
    for n in names:
        if not SOURCES[n].keys():
            raise ConfigError(f"text source {n} ({SOURCES[n].description}) is not on this machine; "
                              f"install {SOURCES[n].needs}, or choose other --sources")
    return names


def haystack(tokenizer, n_tokens: int, rng, source: str = "python-reference") -> tuple[str, str]:
    """About ``n_tokens`` tokens of contiguous text of ``source`` from a seeded starting passage, cut at a
    sentence end, and the text that follows it (``CONTINUATION_TOKENS`` tokens)."""
    src = SOURCES[source]
    keys = src.keys()
    start = rng.randrange(len(keys))
    parts, total = [], 0
    i = start
    while total < (n_tokens + CONTINUATION_TOKENS) * 1.3 and i < start + len(keys):
        text = src.passage(i % len(keys))
        if text:
            parts.append(text)
            total += len(text) // 3
        i += 1
    ids = tokenizer("\n\n".join(parts), add_special_tokens=False)["input_ids"][: n_tokens + CONTINUATION_TOKENS]
    full = tokenizer.decode(ids)
    text = tokenizer.decode(ids[:n_tokens])
    cut = text.rfind(". ")
    cut = cut + 1 if cut > len(text) // 2 else len(text)
    return full[:cut], full[cut:].lstrip()
