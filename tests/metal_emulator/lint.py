"""Metal language rules that a C++ compiler would not enforce.

Runs on the prepass output (macros expanded, includes from metal/ inlined, the
`#ifdef __METAL_VERSION__` branches taken), so it sees exactly what Metal compiles.
"""

from __future__ import annotations

from dataclasses import dataclass

from .translate import _Translator

# Token -> why Metal rejects it.
FORBIDDEN = {
    "double": "Apple GPUs have no double; use float",
    "throw": "no exceptions in Metal",
    "try": "no exceptions in Metal",
    "catch": "no exceptions in Metal",
    "virtual": "no virtual functions in Metal",
    "new": "no dynamic allocation in Metal",
    "delete": "no dynamic allocation in Metal",
    "goto": "no goto in Metal",
    "printf": "no printf in Metal kernels",
    "malloc": "no dynamic allocation in Metal",
}
_AFTER_PARAMS = {")", "const", "noexcept", "override", "final", "mutable"}


@dataclass
class LintIssue:
    where: str
    rule: str
    message: str

    def __str__(self):
        return f"{self.where}: [{self.rule}] {self.message}"


def lint_preprocessed(text: str) -> list[LintIssue]:
    t = _Translator(text)
    toks = [i for i in range(t.n) if t.toks[i].sig]
    issues: list[LintIssue] = []

    def add(i, rule, msg):
        issues.append(LintIssue(t.where(i), rule, msg))

    # Braces: is each one a function body (or inside one)?
    in_func = []  # per open brace: True if inside a function body
    funcs = {}  # name -> list of body token ranges
    current = None  # (name, start) of the function body being scanned
    for pos, i in enumerate(toks):
        x = t.text(i)
        if x == "{":
            inside = bool(in_func and in_func[-1])
            if not inside and t.text(toks[pos - 1]) in _AFTER_PARAMS and pos > 0:
                name = _function_name(t, toks, pos)
                current = (name, i)
                in_func.append(True)
            else:
                in_func.append(inside)
        elif x == "}":
            if in_func:
                was = in_func.pop()
                if was and not (in_func and in_func[-1]) and current:
                    funcs.setdefault(current[0], []).append((current[1], i))
                    current = None
        elif t.toks[i].kind == "id":
            if x in FORBIDDEN:
                add(i, x, FORBIDDEN[x])
            elif x == "std" and pos + 1 < len(toks) and t.text(toks[pos + 1]) == "::":
                add(i, "std", "the C++ standard library does not exist in Metal")
            elif x == "static" and in_func and in_func[-1] and not _in_constant(t, toks, pos):
                add(
                    i,
                    "static-local",
                    "function-local static variables must be in the "
                    "constant address space in Metal (static constant constexpr ...)",
                )
        elif t.toks[i].kind == "num" and x.endswith(("l", "L")) and "." in x:
            add(i, "double", "long double literal")

    # Recursion: cycles in the call graph between functions defined here, by name.
    calls = {}
    for name, bodies in funcs.items():
        callees = set()
        for a, b in bodies:
            for i in range(a, b):
                if t.toks[i].kind == "id" and t.text(i) in funcs:
                    nxt = t.next_sig(i)
                    if t.text(nxt) in ("(", "<"):
                        callees.add(t.text(i))
        calls[name] = callees
    for cycle in _cycles(calls):
        start = funcs[cycle[0]][0][0]
        add(start, "recursion", "recursion is not allowed in Metal: " + " -> ".join(cycle))
    return issues


def _in_constant(t, toks, pos):
    """Whether the declaration starting at toks[pos] is in the constant address space."""
    for i in toks[pos:]:
        x = t.text(i)
        if x == ";":
            return False
        if x == "__msl_constant":
            return True
    return False


def _function_name(t, toks, pos):
    """Name of the function whose body opens at toks[pos] ('{')."""
    k = pos - 1
    while k >= 0 and t.text(toks[k]) != ")":
        k -= 1
    depth = 0
    while k >= 0:
        x = t.text(toks[k])
        depth += x == ")"
        depth -= x == "("
        if depth == 0:
            break
        k -= 1
    k -= 1
    if k >= 0 and t.text(toks[k]) == ">":  # f<...>( in a specialization
        depth = 0
        while k >= 0:
            depth += t.text(toks[k]) == ">"
            depth -= t.text(toks[k]) == "<"
            if depth == 0:
                break
            k -= 1
        k -= 1
    return t.text(toks[k]) if k >= 0 else "?"


def _cycles(graph):
    found, seen = [], set()

    def dfs(node, path):
        for nxt in sorted(graph.get(node, ())):
            if nxt in path:
                cyc = path[path.index(nxt) :] + [nxt]
                key = frozenset(cyc)
                if key not in seen:
                    seen.add(key)
                    found.append(cyc)
            elif len(path) < 64:
                dfs(nxt, path + [nxt])

    for n in sorted(graph):
        dfs(n, [n])
    return found
