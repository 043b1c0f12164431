//! What a Python module imports, read from its bytecode (`__pycache__/mod.TAG.pyc`):
//! [`pyc_imports`] decodes the module body's `import` statements (level, module, names
//! imported from it) from its instructions, in the order they run (but those of blocks that
//! never run on import: `if TYPE_CHECKING:`, `if __name__ == "__main__":`), and keeps the
//! attributes the body reads (of the packages it imports, some of them submodules imported
//! on first use), and, for a body that calls `__import__` or
//! `import_module`, its string constants that could name a module ([`Imports::dynamic`]).
//! For bytecode whose instructions it does not decode
//! (CPython 3.13 and later renumbered them) the names are all there is, and
//! [`super::imports::Resolver`] tries each as a module wherever one could be.
//!
//! A `.pyc` is untrusted input (any layer may hold any bytes under that name). The parser
//! reads at most [`MAX_PYC`] bytes, nests at most [`MAX_DEPTH`] objects deep, keeps at most
//! [`MAX_NAMES`] strings (and as many names it may import by name) and [`MAX_IMPORTS`]
//! import statements of the module's own code and
//! never allocates more than the input could hold; anything it does not understand ends
//! the parse with what was found so far. A wrong guess wastes bandwidth, nothing more: every
//! byte fetched is verified like any read, and the guesses only pick which files are fetched
//! ahead.

use std::rc::Rc;

/// Bytecode files larger than this are not parsed (the largest of the benchmark image's 3,444
/// is 762 KB, a test module): at most [`IMPORT_FETCHES`](super::imports::IMPORT_FETCHES) of
/// them are in memory at once.
pub const MAX_PYC: u64 = 1 << 20;
/// Deepest nesting of marshal objects the parser follows.
pub const MAX_DEPTH: usize = 64;
/// Most names kept from one module (of its body's names, and of all its import statements).
pub const MAX_NAMES: usize = 4096;
/// Longest name kept, in bytes: module names are a few path components, and every kept name
/// is a copy (a marshal back reference can repeat one string many times at 5 bytes each).
pub const MAX_NAME_LEN: usize = 256;
/// Most import statements kept from one module.
pub const MAX_IMPORTS: usize = 1024;

/// One `import` statement of a module's body: `import a.b` is level 0, module `a.b`, no
/// names; `from ..c import d, e` is level 2, module `c`, names `d` and `e` (each perhaps a
/// submodule of `..c`); `from . import f` is level 1, module `""`, names `f`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Import {
    /// 0 for an absolute import, else how many packages up a relative one starts.
    pub level: u32,
    /// The dotted module name as written (empty for `from . import …`).
    pub module: String,
    /// The names of a `from … import` (`*` left out).
    pub names: Vec<String>,
}

/// What a module's bytecode says it imports.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Imports {
    /// Its import statements, decoded from the body's instructions, in the order they run;
    /// `None` for bytecode whose instructions are not decoded here (CPython 3.13 and later,
    /// or a body whose instructions could not be read).
    pub statements: Option<Vec<Import>>,
    /// With statements, the attributes its body reads (`np.random` imports `numpy.random`
    /// on first use), and for a module with a module `__getattr__` (PEP 562: submodules
    /// imported on first use, listed in constants such as `__all__`) its string constants,
    /// alone or in tuples; without, the names its body refers to (`co_names`, and the strings of
    /// its constant tuples of strings, where `from e import f, g` keeps `f` and `g`): the best
    /// guess at what it imports.
    pub names: Vec<String>,
    /// With a body that calls `__import__` or `import_module`, the strings of its constants
    /// (alone or in tuples of strings) that could name a module: what it may import by name
    /// at run time (`requests.packages` imports `urllib3` and `idna` in a loop over such a
    /// tuple). Empty otherwise.
    pub dynamic: Vec<String>,
}

/// The import statements of `pyc`'s module body, in the order they run (those of its
/// functions and classes are left out: they run later, if ever), conditional ones included
/// (`try: import x`) but for blocks that never run on import ([`Body`]), and the attributes
/// the body reads (or, undecoded, its names). Empty for input that is not CPython 3.8–3.13
/// bytecode.
pub fn pyc_imports(pyc: &[u8]) -> Imports {
    let Some(top) = parse(pyc) else {
        return Imports::default();
    };
    let magic = u16::from_le_bytes([pyc[0], pyc[1]]);
    let body = top
        .code
        .filter(|_| magic < 3550)
        .map(|(start, end)| statements(&pyc[start..end], &top, magic));
    let dynamic = dynamic_of(&top);
    match body {
        Some(body) => {
            // A module that imports its submodules on first use through a module
            // `__getattr__` (PEP 562) usually lists them in its constants (`__all__`): any
            // code may then import one by reading it, a C extension included (pandas'
            // `tslibs` so import `dateutil.parser` and `dateutil.tz`).
            let mut names = body.attributes;
            if top.names.iter().any(|n| &**n == "__getattr__") {
                let single = top.consts.iter().filter_map(|c| match c {
                    Obj::Str(s) => Some(s),
                    _ => None,
                });
                names.extend(
                    single
                        .chain(constant_strings(&top))
                        .filter(|s| !s.is_empty() && s.len() <= MAX_NAME_LEN)
                        .take(MAX_NAMES.saturating_sub(names.len()))
                        .map(|s| s.to_string()),
                );
            }
            Imports {
                statements: Some(body.imports),
                names,
                dynamic,
            }
        }
        None => Imports {
            statements: None,
            names: names_of(top),
            dynamic,
        },
    }
}

/// Instructions of CPython 3.8–3.12 (`Lib/opcode.py`; 3.13 renumbered them).
const CACHE: u8 = 0;
const LOAD_CONST: u8 = 100;
const LOAD_NAME: u8 = 101;
const LOAD_ATTR: u8 = 106;
const COMPARE_OP: u8 = 107;
const IMPORT_NAME: u8 = 108;
/// `POP_JUMP_IF_FALSE` (3.8–3.10: to an absolute offset, in bytes before 3.10 and in
/// instructions since; 3.12: forward, in instructions), `POP_JUMP_FORWARD_IF_FALSE` (3.11).
const POP_JUMP_IF_FALSE: u8 = 114;
const EXTENDED_ARG: u8 = 144;
/// `LOAD_METHOD` (3.7–3.11; 3.12 folds it into `LOAD_ATTR`).
const LOAD_METHOD: u8 = 160;

/// What a module body's instructions say: its import statements, in the order they run, and
/// the attributes it reads (`np.random`: perhaps a submodule its package imports lazily, on
/// first use) — leaving out the blocks that never run on import: `if TYPE_CHECKING:` (only
/// type checkers take that branch) and `if __name__ == "__main__":` (only a module run as a
/// script does). In the benchmark image, `heapq`'s `__main__` block imports `doctest` (and
/// through it `unittest` and `pdb`), and the strings of `Literal[…]` option lists
/// (`"polynomial"`) named `numpy` submodules nothing imports.
struct Body {
    imports: Vec<Import>,
    attributes: Vec<String>,
}

/// The [`Body`] of instructions `code` of bytecode with magic number `magic`: each
/// `IMPORT_NAME` and the two `LOAD_CONST`s before it (the level, then the names imported
/// from it or `None`), and each `LOAD_ATTR`'s or `LOAD_METHOD`'s name.
fn statements(code: &[u8], top: &Top, magic: u16) -> Body {
    let mut out = Vec::new();
    let mut attributes: Vec<String> = Vec::new();
    let mut kept = 0;
    // The last two instructions (opcode, argument) before the current one, and the last
    // three that are not inline caches (3.11 and later).
    let mut last: [Option<(u8, u32)>; 2] = [None, None];
    let mut recent: [Option<(u8, u32)>; 3] = [None, None, None];
    let mut ext = 0u32;
    // Instructions before this unit index belong to a block that does not run on import.
    let mut skip_to = 0usize;
    for (k, unit) in code.chunks_exact(2).enumerate() {
        let (op, arg) = (unit[0], ext << 8 | u32::from(unit[1]));
        if op == EXTENDED_ARG {
            ext = arg;
            continue;
        }
        ext = 0;
        let running = k >= skip_to;
        if op == IMPORT_NAME && running {
            let module = top
                .names
                .get(arg as usize)
                .filter(|m| m.len() <= MAX_NAME_LEN);
            let konst = |i: Option<(u8, u32)>| match i {
                Some((LOAD_CONST, k)) => top.consts.get(k as usize),
                _ => None,
            };
            if let (Some(module), Some(Obj::Int(level))) = (module, konst(last[0])) {
                let names: Vec<String> = match konst(last[1]) {
                    Some(Obj::Tuple(items)) => items
                        .iter()
                        .filter_map(|i| match i {
                            Obj::Str(s) if &**s != "*" && s.len() <= MAX_NAME_LEN => {
                                Some(s.to_string())
                            }
                            _ => None,
                        })
                        .take(MAX_NAMES - kept)
                        .collect(),
                    _ => Vec::new(),
                };
                kept += names.len();
                out.push(Import {
                    level: u32::try_from(*level).unwrap_or(0),
                    module: module.to_string(),
                    names,
                });
                if out.len() >= MAX_IMPORTS {
                    break;
                }
            }
        }
        let index = match op {
            LOAD_ATTR => Some(attr_index(magic, arg)),
            LOAD_METHOD if magic < 3500 => Some(arg),
            _ => None,
        };
        if let Some(a) = index.filter(|_| running).and_then(|i| top.name(i)) {
            if !a.is_empty() && a.len() <= MAX_NAME_LEN && attributes.len() < MAX_NAMES {
                attributes.push(a.to_string());
            }
        }
        if op == POP_JUMP_IF_FALSE && running && skipped_when_false(&recent, top, magic) {
            skip_to = match magic {
                // 3.8 and 3.9: an absolute offset in bytes.
                ..=3429 => arg as usize / 2,
                // 3.10: an absolute offset in instructions.
                3430..=3494 => arg as usize,
                // 3.11 and 3.12: forward, from the next instruction.
                _ => k + 1 + arg as usize,
            };
        }
        last = [last[1], Some((op, arg))];
        if op != CACHE {
            recent = [recent[1], recent[2], Some((op, arg))];
        }
    }
    attributes.sort_unstable();
    attributes.dedup();
    Body {
        imports: out,
        attributes,
    }
}

/// Whether the condition the last instructions `recent` computed, jumped over when false,
/// guards a block that does not run on import: `TYPE_CHECKING` (a name, or an attribute:
/// `typing.TYPE_CHECKING`), or `__name__ == "__main__"`.
fn skipped_when_false(recent: &[Option<(u8, u32)>; 3], top: &Top, magic: u16) -> bool {
    match *recent {
        [_, _, Some((LOAD_NAME, n))] => top.name(n) == Some("TYPE_CHECKING"),
        [_, _, Some((LOAD_ATTR, n))] => top.name(attr_index(magic, n)) == Some("TYPE_CHECKING"),
        [Some((LOAD_NAME, n)), Some((LOAD_CONST, c)), Some((COMPARE_OP, _))] => {
            top.name(n) == Some("__name__")
                && matches!(top.consts.get(c as usize), Some(Obj::Str(s)) if &**s == "__main__")
        }
        _ => false,
    }
}

/// The `co_names` index a `LOAD_ATTR` with argument `arg` names (3.12 keeps a flag in its
/// low bit).
fn attr_index(magic: u16, arg: u32) -> u32 {
    if magic >= 3500 {
        arg >> 1
    } else {
        arg
    }
}

/// The top-level code object of `pyc`, as far as it parses; `None` for input that is not
/// CPython 3.8–3.13 bytecode.
fn parse(pyc: &[u8]) -> Option<Top> {
    if pyc.len() < 16 || pyc.len() as u64 > MAX_PYC || pyc[2..4] != *b"\r\n" {
        return None;
    }
    let layout = match u16::from_le_bytes([pyc[0], pyc[1]]) {
        3413..=3494 => Layout::Py38,
        3495..=3599 => Layout::Py311,
        _ => return None,
    };
    let mut p = Parser {
        data: pyc,
        pos: 16,
        refs: Vec::new(),
        layout,
        top: None,
    };
    let _ = p.object(0);
    p.top
}

/// The strings of a module body's constant tuples of strings.
fn constant_strings(top: &Top) -> impl Iterator<Item = &Rc<str>> {
    top.consts
        .iter()
        .filter_map(|c| match c {
            Obj::Tuple(items)
                if !items.is_empty() && items.iter().all(|i| matches!(i, Obj::Str(_))) =>
            {
                Some(items.iter().filter_map(|i| match i {
                    Obj::Str(s) => Some(s),
                    _ => None,
                }))
            }
            _ => None,
        })
        .flatten()
}

/// The names a module's top-level code refers to that may name modules it imports: its
/// `co_names` (where `import a.b` and `from .c import d` keep `a.b` and `c`, and `a.b`
/// keeps `b`) and the strings of its constant tuples of strings (where `from e import f, g`
/// keeps `("f", "g")`).
fn names_of(top: Top) -> Vec<String> {
    top.names
        .iter()
        .chain(constant_strings(&top))
        .filter(|s| !s.is_empty() && s.len() <= MAX_NAME_LEN)
        .take(MAX_NAMES)
        .map(|s| s.to_string())
        .collect()
}

/// [`Imports::dynamic`] of a module body.
fn dynamic_of(top: &Top) -> Vec<String> {
    if !top
        .names
        .iter()
        .any(|n| matches!(&**n, "__import__" | "import_module"))
    {
        return Vec::new();
    }
    let module_name = |s: &str| {
        !s.is_empty()
            && s.len() <= MAX_NAME_LEN
            && s.split('.').all(|part| {
                part.chars()
                    .next()
                    .is_some_and(|c| c == '_' || c.is_ascii_alphabetic())
                    && part.chars().all(|c| c == '_' || c.is_ascii_alphanumeric())
            })
    };
    let mut out = Vec::new();
    for c in &top.consts {
        let strings: &[Obj] = match c {
            Obj::Tuple(items) => items,
            single @ Obj::Str(_) => std::slice::from_ref(single),
            _ => continue,
        };
        for s in strings {
            if let Obj::Str(s) = s {
                if module_name(s) && out.len() < MAX_NAMES {
                    out.push(s.to_string());
                }
            }
        }
    }
    out
}

/// The order of a code object's fields.
#[derive(Clone, Copy)]
enum Layout {
    /// 3.8–3.10: six 32-bit fields, then code, consts, names, varnames, freevars, cellvars,
    /// filename, name, a 32-bit first line, lnotab.
    Py38,
    /// 3.11–3.13: five 32-bit fields, then code, consts, names, localsplusnames,
    /// localspluskinds, filename, name, qualname, a 32-bit first line, linetable,
    /// exceptiontable.
    Py311,
}

/// What the parser keeps of an object: shared, so that a back reference costs a count, not
/// a copy (what the parse holds stays within a small multiple of the input).
#[derive(Clone, Debug)]
enum Obj {
    Int(i32),
    Str(Rc<str>),
    Tuple(Rc<[Obj]>),
    Other,
}

/// What the parser keeps of the module's own code object.
#[derive(Default)]
struct Top {
    /// Its `co_names`, in order (anything but a string as an empty one).
    names: Vec<Rc<str>>,
    consts: Vec<Obj>,
    /// Where its instructions (`co_code`, a bytes object) lie in the input.
    code: Option<(usize, usize)>,
}

impl Top {
    /// `co_names[i]`, if there is one.
    fn name(&self, i: u32) -> Option<&str> {
        self.names.get(i as usize).map(|n| &**n)
    }
}

/// Input that ends the parse.
struct Stop;

struct Parser<'a> {
    data: &'a [u8],
    pos: usize,
    /// Objects stored for back references (marshal's `FLAG_REF`), `None` while being read.
    refs: Vec<Option<Obj>>,
    layout: Layout,
    /// The top-level code object's names, constants and instructions, once read.
    top: Option<Top>,
}

impl Parser<'_> {
    fn bytes(&mut self, n: usize) -> Result<&[u8], Stop> {
        let end = self.pos.checked_add(n).ok_or(Stop)?;
        let b = self.data.get(self.pos..end).ok_or(Stop)?;
        self.pos = end;
        Ok(b)
    }

    fn u8(&mut self) -> Result<u8, Stop> {
        Ok(self.bytes(1)?[0])
    }

    fn i32(&mut self) -> Result<i32, Stop> {
        let b = self.bytes(4)?;
        Ok(i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A length that the rest of the input could hold (each item takes a byte at least).
    fn len(&mut self) -> Result<usize, Stop> {
        let n = usize::try_from(self.i32()?).map_err(|_| Stop)?;
        if n > self.data.len() - self.pos {
            return Err(Stop);
        }
        Ok(n)
    }

    fn string(&mut self, n: usize) -> Result<Obj, Stop> {
        let b = self.bytes(n)?;
        Ok(match std::str::from_utf8(b) {
            Ok(s) => Obj::Str(Rc::from(s)),
            Err(_) => Obj::Other,
        })
    }

    fn items(&mut self, n: usize, depth: usize) -> Result<Vec<Obj>, Stop> {
        let mut items = Vec::with_capacity(n.min(1024));
        for _ in 0..n {
            items.push(self.object(depth + 1)?);
        }
        Ok(items)
    }

    fn object(&mut self, depth: usize) -> Result<Obj, Stop> {
        if depth > MAX_DEPTH {
            return Err(Stop);
        }
        let code = self.u8()?;
        let (kind, flagged) = (code & 0x7f, code & 0x80 != 0);
        let slot = flagged.then(|| {
            self.refs.push(None);
            self.refs.len() - 1
        });
        let obj = match kind {
            b'0' | b'N' | b'F' | b'T' | b'S' | b'.' => Obj::Other,
            b'i' => Obj::Int(self.i32()?),
            b'I' | b'g' => self.bytes(8).map(|_| Obj::Other)?,
            b'y' => self.bytes(16).map(|_| Obj::Other)?,
            b'f' => {
                let n = self.u8()? as usize;
                self.bytes(n).map(|_| Obj::Other)?
            }
            b'x' => {
                for _ in 0..2 {
                    let n = self.u8()? as usize;
                    self.bytes(n)?;
                }
                Obj::Other
            }
            b'l' => {
                let n = self.i32()?.unsigned_abs() as usize;
                self.bytes(n.checked_mul(2).ok_or(Stop)?)
                    .map(|_| Obj::Other)?
            }
            b's' => {
                let n = self.len()?;
                self.bytes(n).map(|_| Obj::Other)?
            }
            b'u' | b't' | b'a' | b'A' => {
                let n = self.len()?;
                self.string(n)?
            }
            b'z' | b'Z' => {
                let n = self.u8()? as usize;
                self.string(n)?
            }
            b')' => {
                let n = self.u8()? as usize;
                Obj::Tuple(Rc::from(self.items(n, depth)?))
            }
            b'(' | b'[' | b'<' | b'>' => {
                let n = self.len()?;
                let items = self.items(n, depth)?;
                if kind == b'(' {
                    Obj::Tuple(Rc::from(items))
                } else {
                    Obj::Other
                }
            }
            b'{' => {
                loop {
                    if self.data.get(self.pos) == Some(&b'0') {
                        self.pos += 1;
                        break;
                    }
                    self.object(depth + 1)?;
                    self.object(depth + 1)?;
                }
                Obj::Other
            }
            b'r' => {
                let i = usize::try_from(self.i32()?).map_err(|_| Stop)?;
                self.refs.get(i).cloned().flatten().unwrap_or(Obj::Other)
            }
            b'c' => self.code(depth)?,
            _ => return Err(Stop),
        };
        if let Some(slot) = slot {
            self.refs[slot] = Some(obj.clone());
        }
        Ok(obj)
    }

    /// A code object: the first one read (the module's) keeps its names, constants and
    /// where its instructions lie.
    fn code(&mut self, depth: usize) -> Result<Obj, Stop> {
        let (ints, objects_before_line, objects_after_line) = match self.layout {
            Layout::Py38 => (6, 8, 1),
            Layout::Py311 => (5, 8, 2),
        };
        self.bytes(4 * ints)?;
        let is_top = self.top.is_none();
        if is_top {
            // Claimed now, so nested code objects (functions, classes) are not the module's.
            self.top = Some(Top::default());
        }
        let mut top = Top::default();
        for k in 0..objects_before_line {
            let start = self.pos;
            let obj = self.object(depth + 1)?;
            match (k, obj) {
                // A bytes object (not a back reference): its 4-byte length, then the bytes.
                (0, _) if self.data[start] & 0x7f == b's' => top.code = Some((start + 5, self.pos)),
                (1, Obj::Tuple(items)) => top.consts = items.to_vec(),
                (2, Obj::Tuple(items)) => {
                    top.names = items
                        .iter()
                        .map(|i| match i {
                            Obj::Str(s) => s.clone(),
                            _ => Rc::from(""),
                        })
                        .collect();
                    if is_top {
                        // All the module's import statements need: keep them even if the
                        // rest of the file does not parse.
                        self.top = Some(Top {
                            names: top.names.clone(),
                            consts: top.consts.clone(),
                            code: top.code,
                        });
                    }
                }
                _ => {}
            }
        }
        self.bytes(4)?;
        for _ in 0..objects_after_line {
            self.object(depth + 1)?;
        }
        if is_top {
            self.top = Some(top);
        }
        Ok(Obj::Other)
    }
}
#[cfg(test)]
mod tests;
