"""Turns a preprocessed .metal source into C++20 that compiles against the shim.

The rewrite is mechanical and token-based; line markers are kept so that compiler
errors point at the .metal lines. What it resolves:

* Metal attributes: `[[kernel]]` / `kernel`, parameter bindings (`[[buffer(n)]]`,
  `[[threadgroup(n)]]`, builtins), `[[host_name("...")]]` on explicit instantiations.
  They are recorded and removed (clang rejects attributes where MSL puts them).
* Address spaces: `device T*` / `constant T*` become checked pointer types
  (msl::device_ptr / msl::constant_ptr), `constant T&` a plain const reference.
* The three roles of `threadgroup`: kernel-scope storage becomes per-threadgroup
  storage from the runtime, a qualifier becomes MSL_TG_AS (a clang address space in
  strict mode, nothing otherwise), and the attribute binds a threadgroup argument.
* `1.5h` half literals.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

BUILTINS = {
    # attribute name -> msl::Builtin enumerator (runtime/msl_rt.h)
    "thread_position_in_grid": "B_THREAD_POSITION_IN_GRID",
    "thread_position_in_threadgroup": "B_THREAD_POSITION_IN_THREADGROUP",
    "thread_index_in_threadgroup": "B_THREAD_INDEX_IN_THREADGROUP",
    "threadgroup_position_in_grid": "B_THREADGROUP_POSITION_IN_GRID",
    "threads_per_threadgroup": "B_THREADS_PER_THREADGROUP",
    "dispatch_threads_per_threadgroup": "B_THREADS_PER_THREADGROUP",
    "threadgroups_per_grid": "B_THREADGROUPS_PER_GRID",
    "threads_per_grid": "B_THREADS_PER_GRID",
    "dispatch_threads_per_grid": "B_THREADS_PER_GRID",
    "thread_index_in_simdgroup": "B_THREAD_INDEX_IN_SIMDGROUP",
    "simdgroup_index_in_threadgroup": "B_SIMDGROUP_INDEX_IN_THREADGROUP",
    "simdgroups_per_threadgroup": "B_SIMDGROUPS_PER_THREADGROUP",
    "threads_per_simdgroup": "B_THREADS_PER_SIMDGROUP",
    "thread_execution_width": "B_THREADS_PER_SIMDGROUP",
}
# Attributes that only mean something to Metal; all are removed from the output.
METAL_ATTRS = set(BUILTINS) | {
    "kernel",
    "host_name",
    "buffer",
    "__msl_threadgroup",
    "max_total_threads_per_threadgroup",
}
UNSUPPORTED_ATTRS = {"function_constant", "stage_in", "texture", "sampler", "visible"}

TG, DEV, CONST, THR = "__msl_threadgroup", "__msl_device", "__msl_constant", "__msl_thread"


class TranslateError(Exception):
    """A construct the emulator cannot translate, with the .metal location."""


_TOKEN = re.compile(
    r"""
    (?P<marker>^\#[^\n]*)
  | (?P<nl>\n)
  | (?P<ws>[ \t\r\f\v]+)
  | (?P<str>"(?:\\.|[^"\\\n])*")
  | (?P<chr>'(?:\\.|[^'\\\n])*')
  | (?P<num>\.?\d(?:[eEpP][+-]|[\w.'])*)
  | (?P<id>[A-Za-z_]\w*)
  | (?P<op>::|->|\.\.\.|<=>|<<=|>>=|\+\+|--|<<|>>|<=|>=|==|!=|&&|\|\||[-+*/%&|^]=|.)
    """,
    re.VERBOSE | re.MULTILINE,
)


@dataclass
class Tok:
    kind: str
    text: str
    line: int  # line in the preprocessed text, for locating errors
    out: str | None = None  # replacement text; None keeps `text`

    @property
    def sig(self) -> bool:
        return self.kind not in ("ws", "nl", "marker")


def tokenize(text: str) -> list[Tok]:
    toks, line = [], 1
    for m in _TOKEN.finditer(text):
        toks.append(Tok(m.lastgroup, m.group(), line))
        line += m.group().count("\n")
    return toks


@dataclass
class Attr:
    start: int  # index of the first '['
    end: int  # index one past the last ']'
    name: str
    args: list[Tok]


@dataclass
class Param:
    name: str
    binding: str  # C++ binder type


@dataclass
class KernelDef:
    name: str
    params: list[Param]


@dataclass
class Translation:
    cpp: str
    kernels: dict[str, str] = field(default_factory=dict)  # host name -> C++ function id
    bindings: dict[str, list[Param]] = field(default_factory=dict)  # function name -> params


class _Translator:
    def __init__(self, text: str, only=None):
        self.only = None if only is None else set(only)
        self.toks = tokenize(text)
        self.n = len(self.toks)
        self.line_map = self._line_map()

    # ---- helpers ------------------------------------------------------------------------
    def _line_map(self):
        """(first preprocessed line after a line marker, file, its line in that file)."""
        marks = []
        for t in self.toks:
            if t.kind == "marker":
                m = re.match(r'#\s*(?:line\s+)?(\d+)\s+"([^"]*)"', t.text)
                if m:
                    marks.append((t.line + 1, m.group(2), int(m.group(1))))
        return marks

    def where(self, i: int) -> str:
        """file:line in the original sources of token i."""
        line = self.toks[min(i, self.n - 1)].line
        marks = [m for m in self.line_map if m[0] <= line]
        if not marks:
            return f"<preprocessed>:{line}"
        start, file, first = marks[-1]
        return f"{file}:{first + line - start}"

    def fail(self, i: int, msg: str):
        raise TranslateError(f"{self.where(i)}: {msg}")

    def next_sig(self, i: int) -> int:
        i += 1
        while i < self.n and not self.toks[i].sig:
            i += 1
        return i

    def prev_sig(self, i: int) -> int:
        i -= 1
        while i >= 0 and not self.toks[i].sig:
            i -= 1
        return i

    def text(self, i: int) -> str:
        return self.toks[i].text if 0 <= i < self.n else ""

    def match_close(self, i: int) -> int:
        """Index of the bracket closing the one at i ('(', '[', '{')."""
        pairs = {"(": ")", "[": "]", "{": "}"}
        open_, close, depth = self.text(i), pairs[self.text(i)], 0
        for j in range(i, self.n):
            t = self.toks[j].text
            if t == open_:
                depth += 1
            elif t == close:
                depth -= 1
                if depth == 0:
                    return j
        self.fail(i, f"unbalanced '{open_}'")

    def erase(self, i: int, j: int):
        """Remove tokens [i, j) but keep newlines and line markers, so lines stay aligned."""
        for k in range(i, j):
            t = self.toks[k]
            if t.kind not in ("nl", "marker"):
                t.out = ""

    def span_text(self, i: int, j: int) -> str:
        return "".join(
            (t.out if t.out is not None else t.text) for t in self.toks[i:j] if t.kind != "nl"
        ).strip()

    # ---- attributes ---------------------------------------------------------------------
    def find_attrs(self) -> dict[int, Attr]:
        attrs = {}
        i = 0
        while i < self.n:
            if self.text(i) == "[" and self.text(self.next_sig(i)) == "[":
                inner = self.next_sig(i)
                close = self.match_close(inner)
                end_outer = self.next_sig(close)
                if self.text(end_outer) != "]":
                    i += 1
                    continue
                body = [t for t in self.toks[inner + 1 : close] if t.sig]
                if body and body[0].kind == "id":
                    args = []
                    if len(body) > 1 and body[1].text == "(":
                        args = body[2:-1]
                    attrs[i] = Attr(i, end_outer + 1, body[0].text, args)
                i = end_outer + 1
                continue
            i += 1
        return attrs

    def attr_arg_int(self, a: Attr) -> int:
        try:
            return int("".join(t.text for t in a.args), 0)
        except ValueError:
            self.fail(a.start, f"[[{a.name}(...)]] needs an integer literal")

    # ---- kernels ------------------------------------------------------------------------
    def binding(self, a: Attr | None, pname: str, i: int) -> str:
        if a is None:
            self.fail(i, f"kernel parameter '{pname}' has no binding attribute")
        if a.name == "buffer":
            n = self.attr_arg_int(a)
            if not 0 <= n < 31:
                self.fail(a.start, f"[[buffer({n})]] is out of range (0-30)")
            return f"::msl::BindBuffer<{n}>"
        if a.name == TG:
            return f"::msl::BindThreadgroup<{self.attr_arg_int(a)}>"
        if a.name in BUILTINS:
            return f"::msl::BindBuiltin<::msl::{BUILTINS[a.name]}>"
        self.fail(a.start, f"unsupported kernel parameter attribute [[{a.name}]]")

    def parse_kernel(self, i: int, attrs: dict[int, Attr]) -> KernelDef:
        """i: first token after [[kernel]] / `kernel`; expects `void name(params)`."""
        j = i if self.toks[i].sig else self.next_sig(i)
        if self.text(j) != "void":
            self.fail(j, "a kernel must return void")
        name_i = self.next_sig(j)
        name = self.text(name_i)
        lp = self.next_sig(name_i)
        if self.text(lp) != "(":
            self.fail(lp, f"expected '(' after kernel name {name}")
        rp = self.match_close(lp)
        params, start, depth, angle = [], lp + 1, 0, 0
        seen_buffers, seen_tg = {}, {}
        for k in range(lp + 1, rp + 1):
            t = self.text(k)
            if t in ("(", "[", "{"):
                depth += 1
            elif t in (")", "]", "}") and k != rp:
                depth -= 1
            elif t == "<":
                angle += 1
            elif t == ">":
                angle -= 1
            elif t == ">>":
                angle -= 2
            if (t == "," and depth == 0 and angle == 0) or k == rp:
                seg = [x for x in range(start, k) if self.toks[x].sig]
                start = k + 1
                if not seg:
                    continue
                attr = next((attrs[x] for x in seg if x in attrs), None)
                names = [x for x in seg if self.toks[x].kind == "id" and (attr is None or x < attr.start)]
                pname = self.text(names[-1]) if names else "?"
                b = self.binding(attr, pname, seg[0])
                seen = seen_buffers if "BindBuffer" in b else seen_tg if "Threadgroup" in b else None
                if seen is not None:
                    if b in seen:
                        self.fail(seg[0], f"parameters '{seen[b]}' and '{pname}' bind the same index")
                    seen[b] = pname
                params.append(Param(pname, b))
        return KernelDef(name, params)

    def run(self) -> Translation:
        attrs = self.find_attrs()
        kernels: dict[str, str] = {}
        defs: dict[str, list[Param]] = {}
        for start, a in sorted(attrs.items()):
            if a.name in UNSUPPORTED_ATTRS:
                self.fail(start, f"[[{a.name}]] is not supported by the emulator")
            if a.name != "kernel":
                continue
            # Walk back over attributes to see whether this is an explicit instantiation.
            k = self.prev_sig(start)
            host = None
            while self.text(k) == "]":
                prev = next((s for s, b in attrs.items() if b.end - 1 == k), None)
                if prev is None:
                    break
                if attrs[prev].name == "host_name":
                    host = "".join(t.text[1:-1] for t in attrs[prev].args if t.kind == "str")
                k = self.prev_sig(prev)
            if self.text(k) == "template":
                self.record_instantiation(a.end, host, kernels, start)
            else:
                kd = self.parse_kernel(a.end, attrs)
                defs[kd.name] = kd.params
                if host:
                    kernels[host] = kd.name
                elif not self.is_template(start):
                    kernels[kd.name] = kd.name
        for i, t in enumerate(self.toks):
            if t.kind == "id" and t.text == "kernel" and self.text(self.next_sig(i)) == "void":
                kd = self.parse_kernel(self.next_sig(i), attrs)
                defs[kd.name] = kd.params
                if not self.is_template(i):
                    kernels[kd.name] = kd.name
                self.erase(i, i + 1)
        if self.only is not None and set(self.only) - set(kernels):
            raise TranslateError(f"no kernels named {sorted(set(self.only) - set(kernels))}")
        for fid in kernels.values():
            base = re.sub(r"<.*", "", fid).split("::")[-1].strip()
            if base not in defs:
                raise TranslateError(f"kernel {fid}: no [[kernel]] definition found")
        for a in attrs.values():
            if a.name in METAL_ATTRS:
                self.erase(a.start, a.end)
        self.address_spaces()
        self.literals()
        self.line_markers()
        cpp = "".join(t.out if t.out is not None else t.text for t in self.toks)
        return Translation(cpp, kernels, defs)

    def is_template(self, i: int) -> bool:
        """Whether the declaration containing token i starts with `template <`."""
        k = self.prev_sig(i)
        while k >= 0 and self.text(k) not in (";", "}", "{"):
            if self.text(k) == "template":
                return True
            k = self.prev_sig(k)
        return False

    def record_instantiation(self, i: int, host: str | None, kernels: dict, at: int):
        j = self.next_sig(i - 1) if self.toks[i].sig else self.next_sig(i)
        if self.text(j) != "decltype":
            self.fail(j, "expected `decltype(f<...>) f<...>;` after [[kernel]]")
        close = self.match_close(self.next_sig(j))
        semi = close
        while self.text(semi) != ";":
            semi += 1
        fid = " ".join(t.text for t in self.toks[close + 1 : semi] if t.sig)
        if not host:
            self.fail(at, f"explicit instantiation {fid} has no [[host_name(...)]]")
        if host in kernels:
            self.fail(at, f"host name {host} is used twice")
        if self.only is not None and host not in self.only:
            # Not compiled at all: fewer instantiations, faster builds for focused tests.
            k = self.prev_sig(at)
            while self.text(k) != "template":
                k = self.prev_sig(k)
            self.erase(k, semi + 1)
            return
        kernels[host] = fid

    # ---- address spaces -------------------------------------------------------------
    def address_spaces(self):
        tg_id = 0
        for i in range(self.n):
            t = self.toks[i]
            if t.kind != "id" or t.out is not None:
                continue
            if t.text == THR:
                t.out = ""
            elif t.text in (DEV, CONST):
                self.pointer_space(i)
            elif t.text == TG:
                if self.tg_storage(i, tg_id):
                    tg_id += 1
                else:
                    t.out = "MSL_TG_AS"

    def pointer_space(self, i: int):
        space = self.text(i)
        lead = []
        k = self.prev_sig(i)
        while self.text(k) in ("const", "volatile"):
            lead.append(k)
            k = self.prev_sig(k)
        depth, j = 0, self.next_sig(i)
        while j < self.n:
            x = self.text(j)
            if x in ("<", "("):
                depth += 1
            elif x in (">", ")") and depth > 0:
                depth -= 1
            elif x == ">>" and depth > 0:
                depth -= 2
            elif depth == 0 and x in ("*", "&"):
                break
            elif depth == 0 and x in (",", ";", ")", "{", "=", "[", "]"):
                j = -1
                break
            j = self.next_sig(j)
        if j < 0 or j >= self.n:
            if space == CONST:
                # A program-scope constant variable: plain const data.
                k2 = self.next_sig(i)
                qualified = any(
                    self.text(x) in ("const", "constexpr") for x in (k2, self.prev_sig(i), self.next_sig(k2))
                )
                self.toks[i].out = "" if qualified else "const"
                return
            self.fail(i, "`device` must qualify a pointer or reference")
        cv = " ".join(self.text(x) for x in reversed(lead))
        inner = self.span_text(self.next_sig(i), j)
        elem = f"{cv} {inner}".strip()
        if self.text(j) == "*":
            tmpl = "::msl::device_ptr" if space == DEV else "::msl::constant_ptr"
            repl = f"{tmpl}<{elem}>"
        elif space == DEV:
            repl = f"::msl::gref<{elem}, ::msl::AS_DEVICE>"
        else:
            repl = f"const {elem}&"
        first = lead[-1] if lead else i
        self.erase(first, j + 1)
        self.toks[first].out = (self.toks[first].out or "") + repl + " "

    def tg_storage(self, i: int, tg_id: int) -> bool:
        """Rewrites kernel-scope `threadgroup T name[dims];`; False for other roles."""
        if self.text(self.prev_sig(i)) not in (";", "{", "}"):
            return False
        semi, depth = i, 0
        while self.text(semi) != ";" or depth:
            x = self.text(semi)
            depth += x in ("(", "[", "{") and 1 or 0
            depth -= x in (")", "]", "}") and 1 or 0
            semi += 1
        decl = [k for k in range(self.next_sig(i), semi) if self.toks[k].sig]
        first_bracket = next((k for k in decl if self.text(k) == "["), None)
        head = [k for k in decl if first_bracket is None or k < first_bracket]
        if any(self.text(k) in ("*", "&") for k in head):
            return False  # a threadgroup pointer or reference: the qualifier role
        if any(self.text(k) == "=" for k in decl):
            self.fail(i, "threadgroup variables cannot have initializers in Metal")
        if any(self.text(k) == "," for k in head):
            self.fail(i, "declare one threadgroup variable per statement")
        name_k = head[-1]
        type_text = self.span_text(head[0], name_k)
        dims = self.span_text(first_bracket, semi) if first_bracket is not None else ""
        name = self.text(name_k)
        self.erase(i, semi)
        self.toks[i].out = (
            self.toks[i].out or ""
        ) + f'MSL_TG_AS auto& {name} = ::msl::tg_var<{type_text} {dims}, {tg_id}>("{name}")'
        return True

    # ---- literals and line markers ------------------------------------------------------
    def literals(self):
        for t in self.toks:
            if t.kind == "num":
                m = re.fullmatch(r"((?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)[hH]", t.text)
                if m and not t.text.lower().startswith("0x"):
                    t.out = f"half({m.group(1)}f)"

    def line_markers(self):
        for t in self.toks:
            if t.kind == "marker":
                m = re.match(r'#\s*(\d+)\s+("[^"]*")', t.text)
                if m:
                    t.out = f"#line {m.group(1)} {m.group(2)}"


def translate(preprocessed: str, only=None) -> Translation:
    """only: host names to keep; other explicit instantiations are dropped."""
    return _Translator(preprocessed, only).run()


def launch_glue(tr: Translation) -> str:
    """The extern "C" entry points of a compiled library, one thunk per host name."""
    out = ["", '#line 1 "<metal-emulator glue>"', "namespace {"]
    names = list(tr.kernels)
    for k, host in enumerate(names):
        fid = tr.kernels[host]
        base = re.sub(r"<.*", "", fid).split("::")[-1].strip()
        binders = ", ".join(p.binding for p in tr.bindings[base])
        out.append(
            f"void msl_thunk_{k}(const ::msl::ThreadInfo& ti, ::msl::Launch& L) {{ "
            f"::msl::call<{binders}>(&{fid}, ti, L); }}"
        )
        out.append(f"int msl_params_{k}(MslParam* o) {{ return ::msl::params<{binders}>(&{fid}, o); }}")
    out.append("}")
    quoted = ", ".join(f'"{h}"' for h in names) or "nullptr"
    thunks = ", ".join(f"msl_thunk_{k}" for k in range(len(names))) or "nullptr"
    pfns = ", ".join(f"msl_params_{k}" for k in range(len(names))) or "nullptr"
    out.append(
        f"""
static const char* const msl_names[] = {{{quoted}}};
static const ::msl::Thunk msl_thunks[] = {{{thunks}}};
static int (*const msl_param_fns[])(MslParam*) = {{{pfns}}};
#define MSL_EXPORT extern "C" __attribute__((visibility("default")))
MSL_EXPORT int msl_kernel_count() {{ return {len(names)}; }}
MSL_EXPORT const char* msl_kernel_name(int k) {{ return msl_names[k]; }}
MSL_EXPORT int msl_kernel_params(int k, MslParam* out) {{ return msl_param_fns[k](out); }}
MSL_EXPORT int msl_kernel_launch(int k, MslLaunch* d) {{
  MslParam ps[64];
  int n = msl_param_fns[k](ps);
  return ::msl::run(d, msl_thunks[k], ps, n);
}}
"""
    )
    return "\n".join(out)
