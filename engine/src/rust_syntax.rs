//! Rust text the kernel reads without the Rust engine (built with or
//! without the `rust-engine` feature): `rustc --version`'s output, and
//! whether a Rust cell is complete (Jupyter's `is_complete`), for the engine
//! and for the kernel's answer while its engines are busy. evcxr has no
//! parser entry point for this, so it is lexical: a cell is complete when
//! its brackets balance outside comments, strings (raw, byte, escaped) and
//! character literals.

/// `("complete" | "incomplete" | "invalid", indent)`.
pub fn is_complete(code: &str) -> (&'static str, &'static str) {
    let b = code.as_bytes();
    let mut depth: i64 = 0;
    let mut i = 0;
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    while i < b.len() {
        let c = b[i];
        let prev_ident = i > 0 && ident(b[i - 1]);
        match c {
            b'/' if b.get(i + 1) == Some(&b'/') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
                continue;
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                // block comments nest
                let mut nest = 1;
                i += 2;
                while i < b.len() && nest > 0 {
                    if b[i..].starts_with(b"/*") {
                        nest += 1;
                        i += 2;
                    } else if b[i..].starts_with(b"*/") {
                        nest -= 1;
                        i += 2;
                    } else {
                        i += 1;
                    }
                }
                if nest > 0 {
                    return ("incomplete", "");
                }
                continue;
            }
            b'r' | b'b' if !prev_ident => {
                // r"…", r#"…"#, br"…", b"…" (a plain b"…" is a string below)
                let mut j = i + 1;
                if c == b'b' && b.get(j) == Some(&b'r') {
                    j += 1;
                }
                if c == b'r' || j > i + 1 {
                    let hashes_start = j;
                    while b.get(j) == Some(&b'#') {
                        j += 1;
                    }
                    if b.get(j) == Some(&b'"') {
                        let hashes = j - hashes_start;
                        let mut close = Vec::with_capacity(hashes + 1);
                        close.push(b'"');
                        close.extend(std::iter::repeat_n(b'#', hashes));
                        match b[j + 1..].windows(close.len()).position(|w| w == close) {
                            Some(p) => {
                                i = j + 1 + p + close.len();
                                continue;
                            }
                            None => return ("incomplete", ""),
                        }
                    }
                }
            }
            b'"' => {
                i += 1;
                while i < b.len() && b[i] != b'"' {
                    if b[i] == b'\\' {
                        i += 1;
                    }
                    i += 1;
                }
                if i >= b.len() {
                    return ("incomplete", "");
                }
            }
            b'\'' => {
                // a character literal ('x', '\n', '\u{1F600}', '"'), or a
                // lifetime / label ('a), which has no closing quote
                if b.get(i + 1) == Some(&b'\\') {
                    if let Some(p) = b[i + 2..].iter().position(|&x| x == b'\'') {
                        i += 2 + p + 1;
                        continue;
                    }
                } else if let Some(ch) = code[i + 1..].chars().next()
                    && code[i + 1 + ch.len_utf8()..].starts_with('\'')
                {
                    i += 1 + ch.len_utf8() + 1;
                    continue;
                }
            }
            b'(' | b'[' | b'{' => depth += 1,
            b')' | b']' | b'}' => depth -= 1,
            _ => {}
        }
        if depth < 0 {
            return ("invalid", "");
        }
        i += 1;
    }
    match depth {
        0 => ("complete", ""),
        _ => ("incomplete", "    "),
    }
}

/// The version number in `rustc --version`'s output:
/// `rustc 1.95.0 (59807616e 2026-04-14)` → `1.95.0` (also `1.96.0-nightly`).
pub fn rustc_version(out: &str) -> Option<String> {
    let mut words = out.split_whitespace();
    if words.next()? != "rustc" {
        return None;
    }
    let v = words.next()?;
    v.starts_with(|c: char| c.is_ascii_digit())
        .then(|| v.to_owned())
}

#[cfg(test)]
mod tests {
    use super::{is_complete, rustc_version};

    #[test]
    fn rustc_versions() {
        assert_eq!(
            rustc_version("rustc 1.95.0 (59807616e 2026-04-14)\n").as_deref(),
            Some("1.95.0")
        );
        assert_eq!(
            rustc_version("rustc 1.96.0-nightly (abc 2026-05-01)").as_deref(),
            Some("1.96.0-nightly")
        );
        assert_eq!(rustc_version("error: no such command"), None);
        assert_eq!(rustc_version(""), None);
    }

    #[test]
    fn brackets_outside_strings_comments_and_chars() {
        for (code, want) in [
            ("let x = 1;", "complete"),
            ("fn f() {", "incomplete"),
            ("fn f() {\n    1\n}", "complete"),
            ("let s = \"{\";", "complete"),
            ("let s = \"a\\\"{\";", "complete"),
            ("// {\nlet x = 1;", "complete"),
            ("/* { /* } */ */ 1", "complete"),
            ("/* {", "incomplete"),
            ("let s = \"abc", "incomplete"),
            ("}", "invalid"),
            ("let c = '{';", "complete"),
            ("let c = '\"';", "complete"),
            ("let q = '}';", "complete"),
            ("let n = '\\n'; let u = '\\u{7b}';", "complete"),
            ("let e = 'é';", "complete"),
            ("fn f<'a>(x: &'a str) -> &'a str { x }", "complete"),
            ("'outer: loop { break 'outer; }", "complete"),
            ("let path = r\"C:\\\";", "complete"),
            ("let j = r#\"{\"a\": 1}\"#;", "complete"),
            ("let j = r#\"{\"#;", "complete"),
            ("let j = br##\"}\"# still\"##;", "complete"),
            ("let j = r#\"{", "incomplete"),
            ("let b = b\"{\";", "complete"),
            ("let bar = 1; let r = (bar);", "complete"),
            (":dep rand", "complete"),
        ] {
            assert_eq!(is_complete(code).0, want, "{code}");
        }
    }
}
