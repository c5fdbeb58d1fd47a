//! `is_complete`, answered by the kernel itself, at once (pure: no I/O).
//!
//! A console (jupyter console, JupyterLab's code console) asks on every
//! Enter whether the cell is finished and gives the kernel about a second
//! (jupyter console gives up for good after one late reply). An engine's
//! answer would cost a round trip through the hub, wait behind a running
//! cell, and on first use import IPython (~0.9 s). So the kernel answers
//! from the text alone:
//!
//! * a cell magic (`%%px …` on the first line) ends with a blank line, as
//!   in IPython; the body's own rules give the indent;
//! * line magics (`%…` at column 0) and `!cmd` lines are complete lines;
//! * Python is checked at the level of its tokenizer: brackets, strings
//!   (triple-quoted ones may span lines; f-string replacement fields may hold
//!   strings), comments, backslash continuations, a trailing `:` (a block
//!   opens: indent + 4), an indented last line (a block goes on until a line
//!   ends with a newline, the console's blank line), a trailing decorator,
//!   and a trailing operator or keyword (`1+`: invalid, as IPython says);
//! * Rust: [`parallax_engine::rust_syntax::is_complete`].
//!
//! IPython's `TransformerManager.check_complete` is the reference; it also
//! compiles the cell, which a lexer cannot, so code that only the compiler
//! rejects (`x = 1 if y`) is "complete" here and the engine reports the
//! SyntaxError when it runs — what a console does with "invalid" anyway.

use serde_json::{Value, json};

use crate::kernelspec::Language;

/// The answer: `Incomplete` carries the indent of the next line, in columns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Completeness {
    Complete,
    Incomplete(usize),
    Invalid,
}

impl Completeness {
    /// The `is_complete_reply` content (ipykernel's: `indent` only when
    /// incomplete).
    pub fn reply(&self) -> Value {
        match self {
            Completeness::Complete => json!({"status": "complete"}),
            Completeness::Incomplete(n) => {
                json!({"status": "incomplete", "indent": " ".repeat(*n)})
            }
            Completeness::Invalid => json!({"status": "invalid"}),
        }
    }
}

/// The `is_complete_reply` content for `code`.
pub fn is_complete_reply(code: &str, language: Language) -> Value {
    is_complete(code, language).reply()
}

pub fn is_complete(code: &str, language: Language) -> Completeness {
    let lines: Vec<&str> = code.split('\n').collect();
    let first = lines.iter().position(|l| !l.trim().is_empty());
    if let Some(first) = first
        && lines[first].starts_with("%%")
    {
        return cell_magic(&lines[first + 1..], language);
    }
    let code = neutralize_magics(&lines, language);
    if code.trim().is_empty() {
        return Completeness::Complete;
    }
    code_completeness(&code, language)
}

fn code_completeness(code: &str, language: Language) -> Completeness {
    match language {
        Language::Python => python(code),
        Language::Rust => match parallax_engine::rust_syntax::is_complete(code) {
            ("complete", _) => Completeness::Complete,
            ("incomplete", indent) => Completeness::Incomplete(indent.len()),
            _ => Completeness::Invalid,
        },
    }
}

/// `%%px …` then its body: complete once the last line is blank (the body
/// not empty and not inside a bracket or string).
fn cell_magic(body: &[&str], language: Language) -> Completeness {
    if body.iter().all(|l| l.trim().is_empty()) {
        return Completeness::Incomplete(0);
    }
    let text = neutralize_magics(body, language);
    let verdict = code_completeness(&text, language);
    let ends_blank = body.last().is_some_and(|l| l.trim().is_empty());
    match verdict {
        // an open bracket or string: a blank line does not end it
        Completeness::Incomplete(n) if open_construct(&text, language) => {
            Completeness::Incomplete(n)
        }
        _ if ends_blank => Completeness::Complete,
        Completeness::Incomplete(n) => Completeness::Incomplete(n),
        _ => Completeness::Incomplete(last_indent(body.last().copied().unwrap_or(""))),
    }
}

/// Whether the code ends inside a bracket, a string or after a backslash
/// (as opposed to inside an indented block, which a blank line closes).
fn open_construct(code: &str, language: Language) -> bool {
    match language {
        Language::Rust => true,
        Language::Python => matches!(scan_python(code), Err(Stop::Open)),
    }
}

/// Line magics (`%…` at column 0, as `magics::parse_cell` reads them) become
/// blank lines; Python's `!cmd` lines a plain name at the same indent (they
/// may sit inside a block).
fn neutralize_magics(lines: &[&str], language: Language) -> String {
    let mut out = Vec::with_capacity(lines.len());
    for l in lines {
        if l.starts_with('%') {
            out.push(String::new());
        } else if language == Language::Python && l.trim_start().starts_with('!') {
            let indent = &l[..l.len() - l.trim_start().len()];
            out.push(format!("{indent}shell"));
        } else {
            out.push((*l).to_owned());
        }
    }
    out.join("\n")
}

/// IPython's `find_last_indent`: the last line's leading blanks, a tab as 4.
fn last_indent(line: &str) -> usize {
    line.chars()
        .take_while(|c| *c == ' ' || *c == '\t')
        .map(|c| if c == '\t' { 4 } else { 1 })
        .sum()
}

/// The line IPython measures for the indent: the last one, or the one before
/// a final newline.
fn last_line(code: &str) -> &str {
    let mut it = code.rsplit('\n');
    let last = it.next().unwrap_or("");
    if last.is_empty() {
        it.next().unwrap_or("")
    } else {
        last
    }
}

/// How the last significant token of a logical line ends it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// A name, number, string, closing bracket, `,` or `;`.
    Operand,
    /// `:` — a block opens.
    Colon,
    /// An operator or keyword that needs a right-hand side.
    Operator,
}

/// A logical line with at least one token.
#[derive(Debug, Clone, Copy)]
struct Logical {
    /// Columns of blanks before its first token.
    indent: usize,
    end: End,
    decorator: bool,
}

/// Why a scan stopped before the end.
#[derive(Debug, PartialEq, Eq)]
enum Stop {
    /// Inside a bracket, a string or after a backslash at the end.
    Open,
    Invalid,
}

/// What the whole scan found: the logical lines with tokens, in order.
struct Scan {
    lines: Vec<Logical>,
}

/// Keywords that cannot end a statement (`x if`, `import`, `not`).
const OPEN_KEYWORDS: &[&str] = &[
    "and", "as", "assert", "async", "await", "class", "def", "del", "elif", "else", "except",
    "finally", "for", "from", "global", "if", "import", "in", "is", "lambda", "nonlocal", "not",
    "or", "try", "while", "with",
];

fn python(code: &str) -> Completeness {
    let last = last_indent(last_line(code));
    let scan = match scan_python(code) {
        Ok(s) => s,
        Err(Stop::Open) => return Completeness::Incomplete(last),
        Err(Stop::Invalid) => return Completeness::Invalid,
    };
    let Some(l) = scan.lines.last() else {
        // comments only
        return Completeness::Complete;
    };
    match l.end {
        End::Colon => return Completeness::Incomplete(l.indent + 4),
        End::Operator => return Completeness::Invalid,
        End::Operand => {}
    }
    if l.decorator {
        return Completeness::Incomplete(l.indent);
    }
    // Indentation relative to the first statement (IPython strips a common
    // leading indent first).
    let base = scan.lines[0].indent;
    if l.indent > base {
        let opened = scan.lines[..scan.lines.len() - 1]
            .iter()
            .any(|p| p.end == End::Colon && p.indent < l.indent);
        if !opened {
            return Completeness::Invalid; // unexpected indent
        }
        // Inside a block: it ends with a line ended by a newline (the
        // console's Enter on the empty, auto-indented line).
        let ends_with_newline = code
            .trim_end_matches([' ', '\t', '\r', '\x0c'])
            .ends_with('\n');
        if !ends_with_newline {
            return Completeness::Incomplete(last);
        }
    }
    Completeness::Complete
}

fn is_ident(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c >= 0x80
}

/// Walk Python source at the tokenizer's level. Bytes, not chars: every
/// byte of a multi-byte UTF-8 character is ≥ 0x80 and counts as a name
/// character, which is what Python's tokenizer does with them.
fn scan_python(code: &str) -> Result<Scan, Stop> {
    let b = code.as_bytes();
    let mut lines = Vec::new();
    let mut brackets: Vec<u8> = Vec::new();
    // the logical line being read: its first token's indent, once seen
    let mut cur: Option<Logical> = None;
    let mut line_start = 0;
    let mut i = 0;
    let set_end = |cur: &mut Option<Logical>, at: usize, line_start: usize, end: End| {
        let l = cur.get_or_insert_with(|| Logical {
            indent: last_indent(&code[line_start..at]),
            end,
            decorator: false,
        });
        l.end = end;
    };
    while i < b.len() {
        let c = b[i];
        match c {
            b'#' => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
                continue;
            }
            b'\\' => {
                // a line continuation: only a newline may follow
                match b.get(i + 1) {
                    None => return Err(Stop::Open),
                    Some(b'\n') => {
                        i += 2;
                        continue;
                    }
                    Some(b'\r') if b.get(i + 2) == Some(&b'\n') => {
                        i += 3;
                        continue;
                    }
                    Some(_) => return Err(Stop::Invalid),
                }
            }
            b'\n' => {
                i += 1;
                if brackets.is_empty() {
                    if let Some(l) = cur.take() {
                        lines.push(l);
                    }
                    line_start = i;
                }
                continue;
            }
            b' ' | b'\t' | b'\r' | b'\x0c' => {}
            b'\'' | b'"' => {
                set_end(&mut cur, i, line_start, End::Operand);
                i = scan_string(b, i, false)?;
                continue;
            }
            b'(' | b'[' | b'{' => {
                set_end(&mut cur, i, line_start, End::Operand);
                brackets.push(c);
            }
            b')' | b']' | b'}' => {
                let open = match c {
                    b')' => b'(',
                    b']' => b'[',
                    _ => b'{',
                };
                if brackets.pop() != Some(open) {
                    return Err(Stop::Invalid);
                }
                set_end(&mut cur, i, line_start, End::Operand);
            }
            b':' => {
                let end = if b.get(i + 1) == Some(&b'=') {
                    i += 1;
                    End::Operator
                } else {
                    End::Colon
                };
                set_end(&mut cur, i, line_start, end);
            }
            b',' | b';' => set_end(&mut cur, i, line_start, End::Operand),
            b'.' if b.get(i + 1).is_some_and(u8::is_ascii_digit) => {
                set_end(&mut cur, i, line_start, End::Operand);
                i = scan_number(b, i);
                if matches!(b[i - 1], b'+' | b'-') {
                    set_end(&mut cur, i, line_start, End::Operator); // `1e-`
                }
                continue;
            }
            b'+' | b'-' | b'*' | b'/' | b'%' | b'@' | b'&' | b'|' | b'^' | b'~' | b'<' | b'>'
            | b'=' | b'.' => {
                let first = cur.is_none();
                set_end(&mut cur, i, line_start, End::Operator);
                if first && c == b'@' && brackets.is_empty() {
                    // a decorator line, unless `@` is followed by nothing
                    if let Some(l) = cur.as_mut() {
                        l.decorator = true;
                    }
                }
            }
            b'!' => {
                let end = if b.get(i + 1) == Some(&b'=') {
                    End::Operator
                } else {
                    End::Operand
                };
                set_end(&mut cur, i, line_start, end);
            }
            c if c.is_ascii_digit() => {
                set_end(&mut cur, i, line_start, End::Operand);
                i = scan_number(b, i);
                if matches!(b[i - 1], b'+' | b'-') {
                    set_end(&mut cur, i, line_start, End::Operator); // `1e-`
                }
                continue;
            }
            c if is_ident(c) => {
                let start = i;
                while i < b.len() && is_ident(b[i]) {
                    i += 1;
                }
                let word = &code[start..i];
                if matches!(b.get(i), Some(b'\'' | b'"')) && is_string_prefix(word) {
                    set_end(&mut cur, start, line_start, End::Operand);
                    let f = word.bytes().any(|p| matches!(p, b'f' | b'F' | b't' | b'T'));
                    i = scan_string(b, i, f)?;
                    continue;
                }
                let end = if OPEN_KEYWORDS.contains(&word) {
                    End::Operator
                } else {
                    End::Operand
                };
                set_end(&mut cur, start, line_start, end);
                // a decorator is `@` then a name: still a decorator line
                if let Some(l) = cur.as_mut()
                    && l.decorator
                    && end == End::Operand
                {
                    l.end = End::Operand;
                }
                continue;
            }
            // `?` (IPython's help), `$`, a backtick: left to the engine
            _ => set_end(&mut cur, i, line_start, End::Operand),
        }
        i += 1;
    }
    if !brackets.is_empty() {
        return Err(Stop::Open);
    }
    if let Some(l) = cur.take() {
        lines.push(l);
    }
    Ok(Scan { lines })
}

/// `r`, `b`, `u`, `f`, `t` and their pairs, any case.
fn is_string_prefix(w: &str) -> bool {
    w.len() <= 2
        && w.bytes()
            .all(|c| matches!(c.to_ascii_lowercase(), b'r' | b'b' | b'u' | b'f' | b't'))
}

/// A number from `i` (digits, `.`, `_`, letters for hex/exponent/`j`, a sign
/// after an exponent); returns the index after it.
fn scan_number(b: &[u8], mut i: usize) -> usize {
    let hex = b.get(i) == Some(&b'0') && matches!(b.get(i + 1), Some(b'x' | b'X'));
    while i < b.len() {
        let c = b[i];
        let exponent_sign = matches!(c, b'+' | b'-') && !hex && matches!(b[i - 1], b'e' | b'E');
        if !(c.is_ascii_alphanumeric() || c == b'_' || c == b'.' || exponent_sign) {
            break;
        }
        i += 1;
    }
    i
}

/// A string literal whose opening quote is at `i`; returns the index after
/// its closing quote. `f`: an f-string (or t-string), whose replacement
/// fields are code and may hold strings of any quote (PEP 701).
fn scan_string(b: &[u8], i: usize, f: bool) -> Result<usize, Stop> {
    let q = b[i];
    let triple = b.get(i + 1) == Some(&q) && b.get(i + 2) == Some(&q);
    let mut j = if triple { i + 3 } else { i + 1 };
    while j < b.len() {
        let c = b[j];
        if c == b'\\' {
            j += 2;
            continue;
        }
        if c == q && (!triple || (b.get(j + 1) == Some(&q) && b.get(j + 2) == Some(&q))) {
            return Ok(if triple { j + 3 } else { j + 1 });
        }
        if c == b'\n' && !triple {
            return Err(Stop::Invalid); // unterminated string literal
        }
        if f && c == b'{' {
            if b.get(j + 1) == Some(&b'{') {
                j += 2;
                continue;
            }
            j = scan_field(b, j + 1)?;
            continue;
        }
        j += 1;
    }
    if triple {
        Err(Stop::Open)
    } else {
        Err(Stop::Invalid)
    }
}

/// An f-string replacement field from after its `{`; returns the index after
/// its `}`. Brackets nest (a format spec's `{width}` too); strings are
/// skipped whole.
fn scan_field(b: &[u8], mut j: usize) -> Result<usize, Stop> {
    let mut depth = 0usize;
    while j < b.len() {
        match b[j] {
            b'\'' | b'"' => {
                let f = j > 0 && matches!(b[j - 1], b'f' | b'F' | b't' | b'T');
                j = scan_string(b, j, f)?;
                continue;
            }
            b'(' | b'[' | b'{' => depth += 1,
            b')' | b']' => depth = depth.saturating_sub(1),
            b'}' if depth == 0 => return Ok(j + 1),
            b'}' => depth -= 1,
            _ => {}
        }
        j += 1;
    }
    Err(Stop::Open)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn show(c: &Completeness) -> String {
        match c {
            Completeness::Complete => "complete".into(),
            Completeness::Incomplete(n) => format!("incomplete {n}"),
            Completeness::Invalid => "invalid".into(),
        }
    }

    /// `(code, expected)`; the expected answers are IPython 9's
    /// `check_complete`'s, except: a nested same-quote string in an
    /// f-string is valid (Python 3.12's PEP 701; 3.11 says invalid), `if x:`
    /// followed by blank lines still asks for the block's indent, and a
    /// cell magic ends with one blank line (IPython wants the text to end
    /// with one, which a console's Enter on an empty line does not send).
    fn check(language: Language, cases: &[(&str, &str)]) {
        let mut wrong = Vec::new();
        for (code, want) in cases {
            let got = show(&is_complete(code, language));
            if got != *want {
                wrong.push(format!("{code:?}: got {got}, want {want}"));
            }
        }
        assert!(wrong.is_empty(), "\n{}", wrong.join("\n"));
    }

    #[test]
    fn python_statements() {
        check(
            Language::Python,
            &[
                ("", "complete"),
                ("   ", "complete"),
                ("x = 1", "complete"),
                ("import os; print(os.getpid())", "complete"),
                ("print('hello, world')", "complete"),
                ("1+2", "complete"),
                ("x = 1e-5 + 0xE + 1.5j - 1_000 + .5", "complete"),
                ("x = 1e-", "invalid"),
                ("x = [1,\n     2]", "complete"),
                ("a, b = 1, 2", "complete"),
                ("x = 1;", "complete"),
                ("f(x) if y else z", "complete"),
                ("x?", "complete"),
                ("# just a comment", "complete"),
                ("x = 1  # a comment with ( and '", "complete"),
                ("1+", "invalid"),
                ("x = )", "invalid"),
                ("x = (]", "invalid"),
                ("x = 1 and", "invalid"),
                ("import", "invalid"),
                ("x.", "invalid"),
                ("'abc", "invalid"),
                ("'abc\nd'", "invalid"),
                ("x = 1 \\ y", "invalid"),
            ],
        );
    }

    #[test]
    fn python_open_brackets_strings_and_continuations() {
        check(
            Language::Python,
            &[
                ("x = [1,", "incomplete 0"),
                ("x = (1,\n     2,", "incomplete 5"),
                ("f(a,\n  b", "incomplete 2"),
                ("d = {'a': 1,", "incomplete 0"),
                ("s = \"\"\"abc", "incomplete 0"),
                ("s = '''abc\ndef", "incomplete 0"),
                ("s = '''abc\ndef'''", "complete"),
                ("s = r'''\\'''", "incomplete 0"),
                ("s = 'a\\'b'", "complete"),
                ("s = '(('", "complete"),
                ("s = b'['", "complete"),
                ("s = rb'\\['", "complete"),
                ("x = 1 + \\", "incomplete 0"),
                ("x = 1 + \\\n    2", "complete"),
                ("s = f'{x}'", "complete"),
                ("s = f'{x:{w}}'", "complete"),
                ("s = f'{{'", "complete"),
                ("s = f\"{d[\"k\"]}\"", "complete"),
                ("s = f'''{x\n", "incomplete 0"),
                ("x = [\n    1,\n    ", "incomplete 4"),
            ],
        );
    }

    #[test]
    fn python_blocks() {
        check(
            Language::Python,
            &[
                ("for i in range(3):", "incomplete 4"),
                ("def f(x):", "incomplete 4"),
                ("if x:  # why", "incomplete 4"),
                ("if x:\n    if y:", "incomplete 8"),
                ("for i in range(3):\n    print(i)", "incomplete 4"),
                ("def f(x):\n    return x", "incomplete 4"),
                ("for i in range(3):\n    print(i)\n    ", "complete"),
                ("for i in range(3):\n    print(i)\n", "complete"),
                ("for i in range(3):\n    print(i)\n\n", "complete"),
                ("if x:\n    a\nelse:", "incomplete 4"),
                ("if x:\n    a\nb = 1", "complete"),
                ("if x: pass", "complete"),
                ("if x:\n\n", "incomplete 4"),
                (
                    "class A:\n    def f(self):\n        return (1,\n",
                    "incomplete 8",
                ),
                ("lambda:", "incomplete 4"),
                ("x = 1\n    y = 2", "invalid"),
                ("@decorator", "incomplete 0"),
                ("@functools.cache\ndef f():", "incomplete 4"),
                ("a @ b", "complete"),
                ("  x = 1", "complete"),
                ("if (x and\n    y):", "incomplete 4"),
                ("for i in range(3):\n    !echo $i", "incomplete 4"),
                ("while True:\n\tpass", "incomplete 4"),
            ],
        );
    }

    #[test]
    fn magics() {
        check(
            Language::Python,
            &[
                ("%engines", "complete"),
                ("%px import os", "complete"),
                ("%pxconfig --targets ::2", "complete"),
                ("%pxconfig --verbose\nx = (1,", "incomplete 0"),
                ("%px x = 1\nfor i in y:", "incomplete 4"),
                ("!ls -la", "complete"),
                ("%%px", "incomplete 0"),
                ("%%px --targets ::2", "incomplete 0"),
                ("%%px --targets ::2\n", "incomplete 0"),
                ("%%px --targets ::2\nprint('hi')", "incomplete 0"),
                ("%%px --targets ::2\nprint('hi')\n", "complete"),
                ("%%px --targets ::2\nprint('hi')\n\n", "complete"),
                ("%%px\nfor i in x:", "incomplete 4"),
                ("%%px\nfor i in x:\n    print(i)", "incomplete 4"),
                ("%%px\nfor i in x:\n    print(i)\n    ", "complete"),
                ("%%px\nx = (1,\n", "incomplete 0"),
                ("%%px\ns = '''\n\n", "incomplete 0"),
                ("%%px\n1+\n", "complete"),
                ("\n%%px\nx = 1\n", "complete"),
            ],
        );
    }

    #[test]
    fn rust() {
        check(
            Language::Rust,
            &[
                ("let x = 1;", "complete"),
                (":dep rand", "complete"),
                ("fn f() {", "incomplete 4"),
                ("for i in 0..3 {\n    println!(\"{i}\");", "incomplete 4"),
                ("for i in 0..3 {\n    println!(\"{i}\");\n}", "complete"),
                ("}", "invalid"),
                ("%engines", "complete"),
                ("%%px --targets ::2", "incomplete 0"),
                ("%%px --targets ::2\nlet v = vec![1,", "incomplete 4"),
                ("%%px --targets ::2\nlet v = vec![1,\n", "incomplete 4"),
                ("%%px --targets ::2\nprintln!(\"hi\");", "incomplete 0"),
                ("%%px --targets ::2\nprintln!(\"hi\");\n", "complete"),
            ],
        );
    }

    #[test]
    fn reply_content() {
        assert_eq!(
            is_complete_reply("for i in x:", Language::Python),
            json!({"status": "incomplete", "indent": "    "})
        );
        assert_eq!(
            is_complete_reply("x = 1", Language::Python),
            json!({"status": "complete"})
        );
        assert_eq!(
            is_complete_reply("x = )", Language::Python),
            json!({"status": "invalid"})
        );
    }
}
