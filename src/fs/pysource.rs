//! The import statements of Python source: a script python runs (`python3 app.py`, a `#!`
//! script such as `/usr/bin/pip3`) or a module shipped without bytecode. Python compiles
//! them at their open, so their imports, like those of bytecode (`pyc.rs`), are known
//! before python gets to them.
//!
//! Source is untrusted input (any layer may hold any bytes under any name). At most
//! [`MAX_SOURCE`] bytes are scanned, at most [`MAX_STATEMENTS`] statements kept, each with at
//! most [`MAX_NAMES`] names; a statement longer than [`MAX_STATEMENT`] bytes is skipped. The
//! scan is a tokenizer of strings, comments, brackets and indentation, not a parser: a wrong
//! answer (an import inside a string the scan took for code) costs bandwidth only.

use super::pyc::Import;

/// Most bytes of source scanned.
pub const MAX_SOURCE: usize = 256 << 10;
/// Most import statements kept.
pub const MAX_STATEMENTS: usize = 512;
/// Most names kept from one `from … import` statement.
pub const MAX_NAMES: usize = 64;
/// Longest statement looked at, in bytes (a logical line: brackets and `\` join lines).
pub const MAX_STATEMENT: usize = 16 << 10;

/// The import statements of the module body of `source` (its first [`MAX_SOURCE`] bytes), in
/// order: those at the top level and inside its `if`, `try`, `with`, `for` and `while`
/// blocks (a conditional import may run), not those of a function's or class's body (they
/// run later, if ever), as for bytecode.
pub fn source_imports(source: &[u8]) -> Vec<Import> {
    let source = String::from_utf8_lossy(&source[..source.len().min(MAX_SOURCE)]);
    let mut out = Vec::new();
    // Indentation of each open block header, and whether it is a `def` or `class`; how many
    // of them are.
    let mut blocks: Vec<(usize, bool)> = Vec::new();
    let mut definitions = 0usize;
    statements(&source, |indent, statement| {
        while blocks.last().is_some_and(|&(i, _)| i >= indent) {
            if blocks.pop().is_some_and(|(_, d)| d) {
                definitions -= 1;
            }
        }
        let words: Vec<&str> = statement.split_whitespace().collect();
        if statement.ends_with(':') {
            let definition = matches!(words.first(), Some(&"def" | &"class"))
                || words.starts_with(&["async", "def"]);
            // Python itself refuses deeper nesting.
            if blocks.len() < MAX_BLOCKS {
                blocks.push((indent, definition));
                definitions += usize::from(definition);
            }
            return true;
        }
        if definitions == 0 {
            out.extend(parse(&words));
        }
        out.len() < MAX_STATEMENTS
    });
    out.truncate(MAX_STATEMENTS);
    out
}

/// Most blocks open at once that are followed (CPython's own limit on nesting).
const MAX_BLOCKS: usize = 100;

/// The imports one statement makes (`words`: its text split at whitespace, strings and
/// comments removed).
fn parse(words: &[&str]) -> Vec<Import> {
    match words {
        ["import", ..] => words[1..]
            .join(" ")
            .split(',')
            .filter_map(|item| item.split_whitespace().next())
            .filter(|m| dotted(m))
            .map(|m| Import {
                level: 0,
                module: m.to_string(),
                names: Vec::new(),
            })
            .collect(),
        ["from", module, "import", ..] => {
            let level = module.chars().take_while(|&c| c == '.').count();
            let name = &module[level..];
            if !(name.is_empty() && level > 0 || dotted(name)) {
                return Vec::new();
            }
            let list = words[3..].join(" ");
            let names = list
                .trim_matches(|c: char| c == '(' || c == ')' || c.is_whitespace())
                .split(',')
                .filter_map(|item| item.split_whitespace().next())
                .filter(|n| dotted(n) && !n.contains('.'))
                .take(MAX_NAMES)
                .map(str::to_string)
                .collect();
            vec![Import {
                level: level as u32,
                module: name.to_string(),
                names,
            }]
        }
        _ => Vec::new(),
    }
}

/// A module name: identifiers joined by dots.
pub(super) fn dotted(name: &str) -> bool {
    !name.is_empty()
        && name.split('.').all(|part| {
            part.chars()
                .next()
                .is_some_and(|c| c.is_alphabetic() || c == '_')
                && part.chars().all(|c| c.is_alphanumeric() || c == '_')
        })
}

/// Calls `each` with the statements of `source` and their indentation, in order, until it
/// returns false: logical lines (brackets and a trailing `\` join physical ones) split at
/// `;`, with comments and string literals left out, trimmed; a statement longer than
/// [`MAX_STATEMENT`] is skipped. A statement after a block header on its line (`try: import
/// x`) is its own, one deeper than the header. Linear in the source's length: each character
/// is looked at a bounded number of times.
fn statements(source: &str, mut each: impl FnMut(usize, &str) -> bool) {
    let mut current = String::new();
    // Whether the statement so far starts with a block's keyword, once a `:` asked.
    let mut header: Option<bool> = None;
    let mut indent = 0;
    let mut at_line_start = true;
    let mut depth = 0usize;
    let mut chars = source.chars().peekable();
    // Hands the statement so far to `each`; false once `each` wants no more.
    let mut push = |current: &mut String, header: &mut Option<bool>, indent: usize| {
        let statement = current.trim();
        let go_on =
            statement.is_empty() || current.len() > MAX_STATEMENT || each(indent, statement);
        current.clear();
        *header = None;
        go_on
    };
    while let Some(mut c) = chars.next() {
        if at_line_start {
            // Indentation of a new logical line (blank and comment-only lines have none).
            let mut width = 0usize;
            loop {
                match c {
                    ' ' => width = width.saturating_add(1),
                    '\t' => width = (width / 8).saturating_add(1).saturating_mul(8),
                    _ => break,
                }
                match chars.next() {
                    Some(n) => c = n,
                    None => return,
                }
            }
            if c == '\n' || c == '#' || c == '\r' {
                if c == '#' {
                    skip_comment(&mut chars);
                }
                continue;
            }
            indent = width;
            at_line_start = false;
        }
        if !consume(c, &mut chars, &mut current, &mut depth) {
            continue;
        }
        // `consume` returned true: `c` ends a statement or a line.
        let go_on = match c {
            ';' => push(&mut current, &mut header, indent),
            ':' => {
                // A block header with its body on the same line.
                let body_follows = matches!(
                    chars.clone().find(|c| !c.is_whitespace() || *c == '\n'),
                    Some(n) if n != '\n' && n != '#'
                );
                add(&mut current, ":");
                let opens = *header.get_or_insert_with(|| header_start(&current));
                if body_follows && opens {
                    let go_on = push(&mut current, &mut header, indent);
                    indent = indent.saturating_add(1);
                    go_on
                } else {
                    true
                }
            }
            _ => {
                // End of a logical line.
                at_line_start = true;
                push(&mut current, &mut header, indent)
            }
        };
        if !go_on {
            return;
        }
    }
    push(&mut current, &mut header, indent);
}

/// Appends `s` to the statement so far unless that is already over [`MAX_STATEMENT`] (then
/// it is skipped whole).
fn add(current: &mut String, s: &str) {
    if current.len() <= MAX_STATEMENT {
        current.push_str(s);
    }
}

/// Whether statement text `s` so far opens a block (its first word a compound statement's).
fn header_start(s: &str) -> bool {
    matches!(
        s.split_whitespace().next(),
        Some(
            "if" | "elif"
                | "else:"
                | "else"
                | "try:"
                | "try"
                | "except"
                | "except:"
                | "finally:"
                | "finally"
                | "with"
                | "for"
                | "while"
                | "def"
                | "class"
                | "async"
        )
    )
}

/// Skips to the end of a comment (the newline stays).
fn skip_comment(chars: &mut std::iter::Peekable<std::str::Chars>) {
    while chars.peek().is_some_and(|&c| c != '\n') {
        chars.next();
    }
}

/// Adds code character `c` to `current` (a string literal becomes `""`, a comment nothing,
/// a `\` line join a space) and tracks bracket depth. True if `c` may end the statement: a
/// `;`, a `:` or a newline outside brackets (the caller decides), false otherwise.
fn consume(
    c: char,
    chars: &mut std::iter::Peekable<std::str::Chars>,
    current: &mut String,
    depth: &mut usize,
) -> bool {
    match c {
        '#' => {
            skip_comment(chars);
            false
        }
        '\\' if matches!(chars.peek(), Some('\n' | '\r')) => {
            // A line join (`\r\n` line ends too).
            if chars.next() == Some('\r') && chars.peek() == Some(&'\n') {
                chars.next();
            }
            add(current, " ");
            false
        }
        '\'' | '"' => {
            skip_string(c, chars);
            add(current, "\"\"");
            false
        }
        '(' | '[' | '{' => {
            *depth = depth.saturating_add(1);
            add(current, c.encode_utf8(&mut [0; 4]));
            false
        }
        ')' | ']' | '}' => {
            *depth = depth.saturating_sub(1);
            add(current, c.encode_utf8(&mut [0; 4]));
            false
        }
        '\n' | '\r' if *depth > 0 => {
            add(current, " ");
            false
        }
        '\n' => true,
        '\r' => false,
        ';' | ':' if *depth == 0 => true,
        _ => {
            add(current, c.encode_utf8(&mut [0; 4]));
            false
        }
    }
}

/// Skips a string literal opened by `quote` (triple-quoted if two more follow), escapes
/// included; an unterminated single-quoted one ends before its line's end.
fn skip_string(quote: char, chars: &mut std::iter::Peekable<std::str::Chars>) {
    let mut ahead = chars.clone();
    let triple = ahead.next() == Some(quote) && ahead.next() == Some(quote);
    if triple {
        chars.next();
        chars.next();
    } else if chars.peek() == Some(&quote) {
        chars.next(); // the empty string
        return;
    }
    let mut run = 0;
    while let Some(&c) = chars.peek() {
        if c == '\n' && !triple {
            return;
        }
        chars.next();
        match c {
            '\\' => {
                chars.next();
                run = 0;
            }
            c if c == quote => {
                run += 1;
                if !triple || run == 3 {
                    return;
                }
            }
            _ => run = 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn imports(source: &str) -> Vec<(u32, String, Vec<String>)> {
        source_imports(source.as_bytes())
            .into_iter()
            .map(|i| (i.level, i.module, i.names))
            .collect()
    }

    fn abs(m: &str) -> (u32, String, Vec<String>) {
        (0, m.to_string(), Vec::new())
    }

    #[test]
    fn a_scripts_module_level_imports_in_order() {
        let source = r#"#!/usr/bin/python3
"""A docstring that mentions
import not_this
"""
import re, os.path as p  # import not_a_comment
import sys; import json
from pip._internal.cli.main import main
from . import sibling
from ..pkg.mod import (
    first,
    second as s,  # a comment
)
from x import *
try: import simplejson as js
except ImportError: import json as js
if sys.version_info >= (3, 8):
    import importlib.metadata
else:
    import importlib_metadata
x = "import not_code"; y = 'from a import b'
def later():
    import not_at_import_time
    if True:
        import nor_this
class Later:
    import not_this_either
    def method(self):
        import nor_here
import \
    joined
with open(__file__) as f:
    import in_with
"#;
        assert_eq!(
            imports(source),
            vec![
                abs("re"),
                abs("os.path"),
                abs("sys"),
                abs("json"),
                (0, "pip._internal.cli.main".into(), vec!["main".into()]),
                (1, "".into(), vec!["sibling".into()]),
                (2, "pkg.mod".into(), vec!["first".into(), "second".into()]),
                (0, "x".into(), vec![]),
                abs("simplejson"),
                abs("json"),
                abs("importlib.metadata"),
                abs("importlib_metadata"),
                abs("joined"),
                abs("in_with"),
            ]
        );
    }

    #[test]
    fn bounds_hold_on_hostile_source() {
        let many: String = (0..2000).map(|k| format!("import m{k}\n")).collect();
        assert_eq!(source_imports(many.as_bytes()).len(), MAX_STATEMENTS);
        let late = format!("{}\nimport late\n", "#".repeat(MAX_SOURCE));
        assert!(source_imports(late.as_bytes()).is_empty());
        let names: String = (0..1000).map(|k| format!("n{k}, ")).collect();
        let wide = format!("from m import ({names})\n");
        assert_eq!(source_imports(wide.as_bytes())[0].names.len(), MAX_NAMES);
        let long = format!("import a{}\nimport b\n", "a".repeat(MAX_STATEMENT));
        assert_eq!(imports(&long), vec![abs("b")]);
        // Unterminated strings and brackets, bytes that are no UTF-8, nothing at all.
        for junk in [
            &b"import a\n'''never closed\nimport b"[..],
            b"import a\n(((\nimport b",
            b"\xff\xfeimport \xc3",
            b"",
            b"\\",
            b"from",
            b"from . import",
        ] {
            let _ = source_imports(junk);
        }
        assert_eq!(imports("import a\n(((\nimport b"), vec![abs("a")]);
        assert_eq!(
            imports("x = 'open\nimport b"),
            vec![abs("b")],
            "a string ends at its line"
        );
        assert_eq!(
            imports("import \\\r\n  a\r\n"),
            vec![abs("a")],
            "CRLF line join"
        );
    }

    #[test]
    fn the_scan_is_linear_in_hostile_source() {
        let n = MAX_SOURCE;
        let inputs = [
            ":".repeat(n),
            "a:".repeat(n / 2),
            format!("{}{}", " ".repeat(MAX_STATEMENT), ":".repeat(n)),
            format!("{}{}", "if 1:".repeat(n / 10), "x;".repeat(n / 4)),
            "(".repeat(n),
            "'''".repeat(n / 3),
            "x;".repeat(n / 2),
            format!("{}import a", "\\\n".repeat(n / 2)),
        ];
        let started = std::time::Instant::now();
        for input in &inputs {
            let _ = source_imports(input.as_bytes());
        }
        // Quadratic work on any of these takes minutes; linear, milliseconds (debug build).
        assert!(
            started.elapsed() < std::time::Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
    }
}
