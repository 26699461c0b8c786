"""A BEIR-format set of long documents with natural questions: whole pages of the Python documentation.

Each document is one page of the Python 3.11 documentation (tutorial, how-tos, language reference, "Using
Python", "Extending and Embedding", and the library pages with at least 1,000 words of prose): 99 pages,
274k words, 100 to 9,000 words each, so most span several 512-word chunks and a question is answered by
a passage somewhere inside a long page. The prose is extracted as for the FAQ set
(`bench/datasets/pydocs.py`: code blocks and API directives dropped, inline markup unwrapped).

The questions were written by hand for this set: questions a reader of the documentation would ask, in
their own words rather than the page's, each judged against the extracted pages. A page that answers the
question is graded 2; another page that also answers it, less directly, is graded 1. Every question
carries an evidence phrase that must occur in its grade-2 page's extracted text, so a question whose
answer was lost in extraction fails the build instead of scoring as a miss.

    apt-get download python3.11-doc && dpkg-deb -x python3.11-doc_*.deb /tmp/pydoc
    python bench/datasets/pydocs_long.py /tmp/pydoc/usr/share/doc/python3.11/html/_sources .eval-cache/pydocs-long
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# The FAQ set's extractor (beside this script), so that both sets read the documentation the same way.
import pydocs

# (part, least prose words): the pages kept as documents.
PARTS = (("tutorial", 400), ("howto", 400), ("reference", 400), ("using", 400), ("extending", 400), ("library", 1000))

# (question, {page: grade}, evidence phrase in the grade-2 page)
QUESTIONS: list[tuple[str, dict[str, int], str]] = [
    (
        "How do I create a virtual environment for my project and install packages into it?",
        {"tutorial/venv": 2},
        "virtual environment",
    ),
    (
        "What happens to the else clause of a for loop when the loop is left with break?",
        {"tutorial/controlflow": 2, "reference/compound_stmts": 1},
        "else clause",
    ),
    (
        "Why does adding 0.1 and 0.2 not give exactly 0.3?",
        {"tutorial/floatingpoint": 2, "library/decimal": 1},
        "binary fraction",
    ),
    (
        "Why does a function with a list as default argument keep the items from earlier calls?",
        {"tutorial/controlflow": 2, "reference/compound_stmts": 1},
        "evaluated only once",
    ),
    (
        "What is a package, and what is the __init__.py file for?",
        {"tutorial/modules": 2, "reference/import": 1},
        "__init__.py",
    ),
    (
        "How can one except clause handle several kinds of exceptions?",
        {"tutorial/errors": 2, "reference/compound_stmts": 1},
        "parenthesized tuple",
    ),
    (
        "How do I print a number with a fixed number of digits after the decimal point using f-strings?",
        {"tutorial/inputoutput": 2, "library/string": 1},
        "formatted string literals",
    ),
    (
        "Why do all instances of my class see the same list when I append to it?",
        {"tutorial/classes": 2},
        "shared by all",
    ),
    (
        "How do list comprehensions replace a loop that appends to a list?",
        {"tutorial/datastructures": 2, "howto/functional": 1},
        "list comprehension",
    ),
    (
        "What should I use instead of a list when I need a fast first-in first-out queue?",
        {"tutorial/datastructures": 2, "library/collections": 1},
        "collections.deque",
    ),
    (
        "What does a for loop call behind the scenes to get the next item from an object?",
        {"tutorial/classes": 2, "howto/functional": 1, "library/stdtypes": 1},
        "__next__",
    ),
    (
        "How do I sort a list of records by one of their fields?",
        {"howto/sorting": 2, "library/stdtypes": 1},
        "key function",
    ),
    (
        "Do records with equal keys keep their original order after sorting?",
        {"howto/sorting": 2, "library/stdtypes": 1},
        "stable",
    ),
    (
        "How can an attribute check every value assigned to it, like a range check, with a descriptor?",
        {"howto/descriptor": 2, "reference/datamodel": 1},
        "validator",
    ),
    ("How do I make an enumeration whose members compare equal to plain integers?", {"howto/enum": 2}, "IntEnum"),
    (
        "How do I write log messages to a file rather than to the console?",
        {"howto/logging": 2, "library/logging": 1, "howto/logging-cookbook": 1},
        "basicConfig",
    ),
    (
        "How can several processes log to one file without corrupting it?",
        {"howto/logging-cookbook": 2},
        "multiple processes",
    ),
    (
        "How can I add extra context, such as the current user, to every log record?",
        {"howto/logging-cookbook": 2, "library/logging": 1},
        "LoggerAdapter",
    ),
    (
        "What is the difference between greedy and non-greedy repetition in a regular expression?",
        {"howto/regex": 2, "library/re": 1},
        "greedy",
    ),
    (
        "How can a regular expression require that something follows without consuming it?",
        {"howto/regex": 2, "library/re": 1},
        "lookahead",
    ),
    (
        "Why do I get a UnicodeDecodeError when reading a text file, and how do encodings work?",
        {"howto/unicode": 2, "library/codecs": 1, "library/io": 1},
        "UnicodeDecodeError",
    ),
    (
        "What is the difference between a Unicode code point and the bytes used to store it?",
        {"howto/unicode": 2, "library/codecs": 1},
        "code point",
    ),
    (
        "What does select do for a program that talks to many sockets without blocking?",
        {"howto/sockets": 2, "library/socket": 1},
        "select",
    ),
    (
        "Why does a server socket call listen and accept while a client only calls connect?",
        {"howto/sockets": 2, "library/socket": 1},
        "accept",
    ),
    (
        "How do I download a web page and find out that the server answered 404?",
        {"howto/urllib2": 2, "library/urllib.request": 1},
        "HTTPError",
    ),
    (
        "How do I send a user name and password to a site that asks for basic authentication?",
        {"howto/urllib2": 2, "library/urllib.request": 1},
        "Basic Authentication",
    ),
    (
        "How do I give my command-line script a required argument and an optional flag?",
        {"howto/argparse": 2, "library/argparse": 1, "library/optparse": 1},
        "optional argument",
    ),
    ("How do I make my old Python 2 code run on Python 3?", {"howto/pyporting": 2}, "Python 3"),
    ("How do I write coloured text at a given row and column of the terminal?", {"howto/curses": 2}, "color"),
    (
        "What is the safest way to read the type annotations of a function or class?",
        {"howto/annotations": 2, "library/typing": 1},
        "get_annotations",
    ),
    ("How can I check whether an IP address belongs to a network?", {"howto/ipaddress": 2}, "network"),
    ("How do map, filter and reduce fit into a functional style of programming?", {"howto/functional": 2}, "reduce"),
    (
        "Why should a C extension module keep its state per module instead of in C globals?",
        {"howto/isolating-extensions": 2, "extending/newtypes": 1},
        "per-module state",
    ),
    (
        "How does Argument Clinic generate the argument parsing code of a builtin function?",
        {"howto/clinic": 2},
        "Argument Clinic",
    ),
    (
        "How can I trace function calls in the running interpreter with DTrace or SystemTap?",
        {"howto/instrumentation": 2},
        "SystemTap",
    ),
    (
        "When a class inherits from several bases, in what order are they searched for a method?",
        {"tutorial/classes": 2, "reference/datamodel": 1},
        "depth-first",
    ),
    (
        "How can a nested function rebind a variable of the function that encloses it?",
        {"reference/simple_stmts": 2, "reference/executionmodel": 1, "tutorial/classes": 1},
        "nonlocal",
    ),
    (
        "How does Python decide which scope a name refers to inside a function?",
        {"reference/executionmodel": 2, "tutorial/classes": 1},
        "scope",
    ),
    (
        "Which method should my container class define so that the in operator works?",
        {"reference/datamodel": 2, "reference/expressions": 1},
        "__contains__",
    ),
    ("How can I stop instances from getting a __dict__ and save memory?", {"reference/datamodel": 2}, "__slots__"),
    ("How does import find a module: what are finders and loaders?", {"reference/import": 2}, "finder"),
    (
        "Does not bind more tightly than and, and where do comparisons fit in the precedence?",
        {"reference/expressions": 2},
        "precedence",
    ),
    ("Is a < b < c the same as a < b and b < c?", {"reference/expressions": 2}, "arbitrarily"),
    (
        "How do I match an object against a class pattern in a match statement?",
        {"reference/compound_stmts": 2, "tutorial/controlflow": 1},
        "class pattern",
    ),
    (
        "What does the r prefix do to a string literal, and which backslash escapes are recognised?",
        {"reference/lexical_analysis": 2},
        "raw string",
    ),
    ("How is indentation turned into INDENT and DEDENT tokens?", {"reference/lexical_analysis": 2}, "DEDENT"),
    (
        "What exactly happens when a with block is entered and left?",
        {"reference/compound_stmts": 2, "reference/datamodel": 1, "library/contextlib": 1},
        "__exit__",
    ),
    (
        "When are assert statements skipped, and what does a failing one raise?",
        {"reference/simple_stmts": 2},
        "AssertionError",
    ),
    ("How do I choose between Python versions on Windows with the py launcher?", {"using/windows": 2}, "launcher"),
    (
        "How do I run Python code from inside my own C program?",
        {"extending/embedding": 2, "extending/extending": 1},
        "embedding",
    ),
    (
        "Who owns a reference in the C API, and when must I call Py_DECREF?",
        {"extending/extending": 2, "extending/newtypes_tutorial": 1},
        "Py_DECREF",
    ),
    (
        "How do I define a new object type in C with its own methods and data members?",
        {"extending/newtypes_tutorial": 2, "extending/newtypes": 1},
        "tp_methods",
    ),
    (
        "How can an extension type take part in cyclic garbage collection or be weakly referenced?",
        {"extending/newtypes": 2, "extending/newtypes_tutorial": 1},
        "weak reference",
    ),
    (
        "Can my command-line parser read its arguments from a file instead of the command line?",
        {"library/argparse": 2},
        "fromfile_prefix_chars",
    ),
    ("How do I count how many times each word occurs?", {"library/collections": 2}, "Counter"),
    ("How do I make a tuple whose fields can be read by name?", {"library/collections": 2}, "namedtuple"),
    ("How do I read the settings of an INI-style configuration file?", {"library/configparser": 2}, "INI"),
    (
        "How can I write a context manager as a generator instead of a class?",
        {"library/contextlib": 2},
        "contextmanager",
    ),
    (
        "How do I call a function from a DLL or shared library without writing C code?",
        {"library/ctypes": 2},
        "shared libraries",
    ),
    ("How do I give a dataclass field a list as its default value?", {"library/dataclasses": 2}, "default_factory"),
    (
        "What is the difference between aware and naive datetime objects, and how are time zones handled?",
        {"library/datetime": 2},
        "naive",
    ),
    (
        "How can I compute money amounts exactly and control the rounding?",
        {"library/decimal": 2, "tutorial/floatingpoint": 1, "tutorial/stdlib2": 1},
        "rounding",
    ),
    (
        "How can the interactive examples in my docstrings be checked automatically?",
        {"library/doctest": 2},
        "docstring",
    ),
    ("How do I translate my program's messages into other languages?", {"library/gettext": 2}, "translation"),
    ("How do I compute a SHA-256 digest, and how should passwords be hashed?", {"library/hashlib": 2}, "sha256"),
    (
        "How do I keep the smallest item of a changing collection quickly accessible, like a priority queue?",
        {"library/heapq": 2},
        "priority queue",
    ),
    ("How do I set breakpoints and step through code in IDLE?", {"library/idle": 2}, "debugger"),
    (
        "How can my program find out which version of an installed package it is running with?",
        {"library/importlib.metadata": 2},
        "version",
    ),
    (
        "What is the difference between text and binary streams, and how is buffering involved?",
        {"library/io": 2, "tutorial/inputoutput": 1},
        "binary",
    ),
    (
        "How do I configure logging from a dictionary instead of code?",
        {"library/logging.config": 2, "howto/logging": 1},
        "dictConfig",
    ),
    (
        "How do I spread work over several CPU cores with a pool of worker processes?",
        {"library/multiprocessing": 2},
        "Pool",
    ),
    ("Why is unpickling data from an untrusted source dangerous?", {"library/pickle": 2}, "untrusted"),
    ("How can I find out which functions of my program take the most time?", {"library/profile": 2}, "cProfile"),
    ("How do I open a low-level TCP connection with a timeout?", {"library/socket": 2, "howto/sockets": 1}, "timeout"),
    (
        "How do I pass values into an SQL query safely instead of building the string myself?",
        {"library/sqlite3": 2},
        "placeholders",
    ),
    (
        "How do I make sure the server's certificate is checked when I wrap a socket in TLS?",
        {"library/ssl": 2},
        "certificate",
    ),
    (
        "Which values count as false when an object is tested in an if statement?",
        {"library/stdtypes": 2},
        "considered false",
    ),
    (
        "How do I pad and align values in a format string?",
        {"library/string": 2, "tutorial/inputoutput": 1},
        "alignment",
    ),
    (
        "How do I turn integers into bytes in big-endian order for a binary file format?",
        {"library/struct": 2},
        "byte order",
    ),
    ("How do I run another program and capture what it prints?", {"library/subprocess": 2}, "stdout"),
    ("How do I stop two threads from changing the same data at the same time?", {"library/threading": 2}, "lock"),
    (
        "How do I build a small window with a button in Python?",
        {"library/tkinter": 2, "library/tkinter.ttk": 1},
        "widget",
    ),
    ("What does a type variable do in a generic function's type hints?", {"library/typing": 2}, "TypeVar"),
    (
        "How do I replace a function with a fake during a test and check how it was called?",
        {"library/unittest.mock": 2, "library/unittest.mock-examples": 1},
        "patch",
    ),
    ("How do I prepare a fresh fixture before each test method runs?", {"library/unittest": 2}, "setUp"),
    ("How do I turn warnings into errors, or silence one particular warning?", {"library/warnings": 2}, "filter"),
    ("How can a cache hold objects without keeping them alive?", {"library/weakref": 2}, "cache"),
    (
        "How do I parse an XML file and walk over its elements?",
        {"library/xml.etree.elementtree": 2, "library/xml.dom": 1},
        "parse",
    ),
    ("How do I bundle my application into one runnable archive file?", {"library/zipapp": 2}, "archive"),
    (
        "Why do scripts test whether __name__ equals '__main__'?",
        {"library/__main__": 2, "tutorial/modules": 1},
        "top-level",
    ),
    ("How do I create a compressed tar archive and extract it again?", {"library/tarfile": 2}, "compression"),
    ("How do I draw shapes by moving a pen around the screen?", {"library/turtle": 2}, "turtle"),
    (
        "How do I choose how encoding errors are handled, for example replaced or ignored?",
        {"library/codecs": 2, "howto/unicode": 1},
        "error handler",
    ),
    ("How can a web script read the fields of a submitted form?", {"library/cgi": 2}, "form"),
    ("How do I read and change environment variables of the current process?", {"library/os": 2}, "environ"),
    ("How should I write a unit test that checks an exception is raised?", {"library/unittest": 2}, "assertRaises"),
    (
        "Can a mock object check that it is called with the right arguments, like the real function's signature?",
        {"library/unittest.mock": 2, "library/unittest.mock-examples": 1},
        "autospec",
    ),
]


def pages(src: Path) -> dict[str, tuple[str, str]]:
    """page id (part/name) -> (title, prose) for the pages kept."""
    out = {}
    for part, least in PARTS:
        for f in sorted((src / part).glob("*.rst.txt")):
            secs = pydocs.sections(f.read_text(encoding="utf-8"))
            text = " ".join(p for _t, _l, paras in secs for p in paras)
            if f.name != "index.rst.txt" and len(text.split()) >= least:
                title = next((t for t, _l, _p in secs if t), f.stem)
                out[f"{part}/{f.name.removesuffix('.rst.txt')}"] = (title, text)
    return out


def build(src: Path, out: Path) -> dict[str, int]:
    docs = pages(src)
    problems = []
    for i, (_question, rels, evidence) in enumerate(QUESTIONS):
        for page in rels:
            if page not in docs:
                problems.append(f"q{i:03d}: page {page} is not in the corpus")
        main = next(p for p, g in rels.items() if g == 2)
        if main in docs and evidence.lower() not in docs[main][1].lower():
            problems.append(f"q{i:03d}: {evidence!r} is not in {main}")
    if problems:
        raise SystemExit("\n".join(problems))
    (out / "qrels").mkdir(parents=True, exist_ok=True)
    with (out / "corpus.jsonl").open("w", encoding="utf-8") as fh:
        fh.writelines(
            json.dumps({"_id": d, "title": t, "text": x}, ensure_ascii=False) + "\n" for d, (t, x) in docs.items()
        )
    with (out / "queries.jsonl").open("w", encoding="utf-8") as fh:
        fh.writelines(
            json.dumps({"_id": f"q{i:03d}", "text": q}, ensure_ascii=False) + "\n"
            for i, (q, _r, _e) in enumerate(QUESTIONS)
        )
    with (out / "qrels" / "test.tsv").open("w", encoding="utf-8") as fh:
        fh.write("query-id\tcorpus-id\tscore\n")
        fh.writelines(f"q{i:03d}\t{d}\t{g}\n" for i, (_q, rels, _e) in enumerate(QUESTIONS) for d, g in rels.items())
    return {"documents": len(docs), "words": sum(len(x.split()) for _t, x in docs.values()), "queries": len(QUESTIONS)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", type=Path, help="the documentation's _sources folder (*.rst.txt)")
    ap.add_argument("out", type=Path, help="output folder (BEIR format)")
    a = ap.parse_args()
    print(build(a.src, a.out))


if __name__ == "__main__":
    main()
