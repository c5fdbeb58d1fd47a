//! Job-script templates with ipyparallel's fields: `{n}`, `{queue}`,
//! `{account}`, `{qos}`, `{timelimit}`, `{profile_dir}`, `{cluster_id}`,
//! `{output_file}`, `{program}`, `{program_args}`, `{program_and_args}`, …
//!
//! Python's `str.format` syntax for plain names: `{name}` is replaced,
//! `{{` and `}}` are literal braces. ipyparallel's `EvalFormatter` also
//! evaluates expressions (`{n//4}`); those are refused here with an error
//! naming the field, rather than guessed.

use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    #[error("template field {{{field}}} is unknown (known fields: {known})")]
    UnknownField { field: String, known: String },
    #[error("template has an unmatched '{brace}' at byte {at}")]
    Unmatched { brace: char, at: usize },
}

/// The values a template can use.
pub type Context = BTreeMap<String, String>;

/// Renders `template` with `ctx`.
pub fn render(template: &str, ctx: &Context) -> Result<String, TemplateError> {
    let mut out = String::with_capacity(template.len() + 64);
    let mut chars = template.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        match c {
            '{' if chars.peek().map(|p| p.1) == Some('{') => {
                chars.next();
                out.push('{');
            }
            '}' if chars.peek().map(|p| p.1) == Some('}') => {
                chars.next();
                out.push('}');
            }
            '{' => {
                let mut field = String::new();
                loop {
                    match chars.next() {
                        Some((_, '}')) => break,
                        Some((_, ch)) => field.push(ch),
                        None => return Err(TemplateError::Unmatched { brace: '{', at: i }),
                    }
                }
                match ctx.get(field.trim()) {
                    Some(v) => out.push_str(v),
                    None => {
                        return Err(TemplateError::UnknownField {
                            field,
                            known: ctx.keys().cloned().collect::<Vec<_>>().join(", "),
                        });
                    }
                }
            }
            '}' => return Err(TemplateError::Unmatched { brace: '}', at: i }),
            c => out.push(c),
        }
    }
    Ok(out)
}

/// Does the template use `{field}`?
pub fn uses_field(template: &str, field: &str) -> bool {
    template.replace("{{", "").contains(&format!("{{{field}}}"))
}

/// One argument quoted for a POSIX shell (Python's `shlex.quote`).
pub fn shell_quote(arg: &str) -> String {
    let safe = !arg.is_empty()
        && arg
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"@%+=:,./-_".contains(&b));
    if safe {
        arg.to_owned()
    } else {
        format!("'{}'", arg.replace('\'', "'\"'\"'"))
    }
}

/// `shlex.join`.
pub fn shell_join<S: AsRef<str>>(args: &[S]) -> String {
    args.iter()
        .map(|a| shell_quote(a.as_ref()))
        .collect::<Vec<_>>()
        .join(" ")
}

/// `shlex.split` for what users write: words split on whitespace, `'…'`
/// literal, `"…"` with `\"`/`\\` escapes, `\` escaping one character
/// outside quotes. An unclosed quote is an error.
pub fn shell_split(text: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            c if c.is_whitespace() => {
                if in_word {
                    out.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => word.push(c),
                        None => return Err(format!("unclosed ' in {text:?}")),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c @ ('"' | '\\' | '$' | '`')) => word.push(c),
                            Some(c) => {
                                word.push('\\');
                                word.push(c);
                            }
                            None => return Err(format!("unclosed \" in {text:?}")),
                        },
                        Some(c) => word.push(c),
                        None => return Err(format!("unclosed \" in {text:?}")),
                    }
                }
            }
            '\\' => {
                in_word = true;
                if let Some(c) = chars.next() {
                    word.push(c);
                }
            }
            c => {
                in_word = true;
                word.push(c);
            }
        }
    }
    if in_word {
        out.push(word);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(pairs: &[(&str, &str)]) -> Context {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn fields_and_braces() {
        let c = ctx(&[("n", "4"), ("queue", "debug")]);
        assert_eq!(
            render("#SBATCH -n {n} -p {queue}\necho ${{HOME}}", &c).unwrap(),
            "#SBATCH -n 4 -p debug\necho ${HOME}"
        );
        assert_eq!(render("{ n }", &c).unwrap(), "4");
    }

    #[test]
    fn errors_name_the_field() {
        let c = ctx(&[("n", "4")]);
        let e = render("x {n//2}", &c).unwrap_err();
        assert_eq!(
            e.to_string(),
            "template field {n//2} is unknown (known fields: n)"
        );
        assert_eq!(
            render("x {n", &c).unwrap_err(),
            TemplateError::Unmatched { brace: '{', at: 2 }
        );
        assert_eq!(
            render("x }", &c).unwrap_err(),
            TemplateError::Unmatched { brace: '}', at: 2 }
        );
    }

    #[test]
    fn splitting_matches_shlex() {
        assert_eq!(
            shell_split(r#"--queue=debug  --mpi-cmd='tail -f /dev/null' "a \"b\"" c\ d ''"#)
                .unwrap(),
            [
                "--queue=debug",
                "--mpi-cmd=tail -f /dev/null",
                "a \"b\"",
                "c d",
                ""
            ]
        );
        assert_eq!(shell_split("  ").unwrap(), Vec::<String>::new());
        assert!(shell_split("'open").is_err());
        assert!(shell_split("\"open").is_err());
        // what shell_quote writes comes back whole
        for w in ["it's", "a b", "", "$x \\ \"q\""] {
            assert_eq!(shell_split(&shell_quote(w)).unwrap(), [w]);
        }
    }

    #[test]
    fn quoting_matches_shlex() {
        assert_eq!(shell_quote("--file=/a/b.json"), "--file=/a/b.json");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), "'it'\"'\"'s'");
        assert_eq!(
            shell_join(&["parallax", "engine", "x y"]),
            "parallax engine 'x y'"
        );
        assert!(uses_field("#SBATCH -p {queue}", "queue"));
        assert!(!uses_field("{{queue}}", "queue"));
    }
}
