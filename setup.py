"""Builds callguard's Cython extensions.

Compiler directives and flags live here, in one place.  ``CALLGUARD_DEBUG=1``
builds with line tracing, bounds checks and assertions for debugging.
"""

import os

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = bool(os.environ.get("CALLGUARD_DEBUG"))

directives = {
    "language_level": 3,
    "boundscheck": DEBUG,
    "wraparound": False,
    "cdivision": True,
    "initializedcheck": DEBUG,
    "embedsignature": True,
    "linetrace": DEBUG,
    "profile": DEBUG,
}

cflags = ["-O2", "-Wno-unused-function", "-Wno-unreachable-code"]
macros = [("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")]
if DEBUG:
    cflags = ["-O0", "-g"]
    macros.append(("CYTHON_TRACE_NOGIL", "1"))

MODULES = ["callguard._core", "callguard.sip._sipcore", "callguard.sip._fastpath", "callguard._recwriter"]
# Extra link arguments per module.  The records inserter links the system's SQLite (the library
# Python's sqlite3 module uses) by its run-time name, so no -dev package is needed; it is optional:
# without it the records are written through Python's sqlite3 module.
LINK = {"callguard._recwriter": ["-l:libsqlite3.so.0", "-ldl"]}
OPTIONAL = {"callguard._recwriter"}

extensions = []
for name in MODULES:
    path = os.path.join("src", *name.split(".")) + ".pyx"
    if os.path.exists(path):
        extensions.append(Extension(name, [path], include_dirs=[numpy.get_include()],
                                    extra_compile_args=cflags, define_macros=macros,
                                    extra_link_args=LINK.get(name, []), optional=name in OPTIONAL))

setup(ext_modules=cythonize(extensions, compiler_directives=directives, annotate=False))
