//! Node labels and label selectors in the Kubernetes label-selector grammar: the one parser
//! and matcher that the control plane, the operator CLI and the node all use. It never guesses:
//! input that is not a selector is an error that names the column and what was expected.
//!
//! ```text
//! selector    := requirement ( "," requirement )*
//! requirement := key | "!" key | key ( "=" | "==" | "!=" ) value
//!              | key ( "in" | "notin" ) "(" value ( "," value )* ")"
//! ```
//! Keys are `[prefix/]name`: a name of 1-63 characters (letters, digits, `-`, `_`, `.`,
//! starting and ending with a letter or digit) after an optional DNS-subdomain prefix of at
//! most 253 characters. Values follow the name rules but may be empty. Whitespace between
//! tokens is ignored.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// A node's labels: key → value.
pub type Labels = BTreeMap<String, String>;

/// Longest label name and value.
pub const MAX_LABEL_NAME: usize = 63;
/// Longest key prefix (a DNS subdomain).
pub const MAX_LABEL_PREFIX: usize = 253;
/// Most labels a node may carry (from its config and from operators together).
pub const MAX_LABELS: usize = 64;
/// Longest selector text accepted.
pub const MAX_SELECTOR_LEN: usize = 4096;

/// A parsed selector: every requirement must hold (comma means "and").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selector {
    requirements: Vec<Requirement>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requirement {
    pub key: String,
    pub op: Op,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Equals(String),
    NotEquals(String),
    In(BTreeSet<String>),
    NotIn(BTreeSet<String>),
    Exists,
    DoesNotExist,
}

/// Where a selector stops making sense, and what would have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelectorError {
    /// 1-based column (in characters) of the offending token.
    pub column: usize,
    pub expected: String,
    pub found: String,
}

impl fmt::Display for SelectorError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "selector: at column {}: expected {}, found {}", self.column, self.expected, self.found)
    }
}

impl std::error::Error for SelectorError {}

impl Selector {
    /// Parses `text`. An empty selector is an error: a selector that matches everything by
    /// accident would send work to the whole fleet.
    pub fn parse(text: &str) -> Result<Self, SelectorError> {
        if text.chars().count() > MAX_SELECTOR_LEN {
            return Err(SelectorError {
                column: MAX_SELECTOR_LEN + 1,
                expected: format!("at most {MAX_SELECTOR_LEN} characters"),
                found: "a longer selector".into(),
            });
        }
        Parser::new(text).selector()
    }

    pub fn requirements(&self) -> &[Requirement] {
        &self.requirements
    }

    /// Whether a node with these labels is selected.
    pub fn matches(&self, labels: &Labels) -> bool {
        self.requirements.iter().all(|r| r.matches(labels))
    }
}

impl Requirement {
    pub fn matches(&self, labels: &Labels) -> bool {
        let value = labels.get(&self.key);
        match &self.op {
            Op::Equals(v) => value == Some(v),
            Op::NotEquals(v) => value != Some(v),
            Op::In(set) => value.is_some_and(|v| set.contains(v)),
            Op::NotIn(set) => value.is_none_or(|v| !set.contains(v)),
            Op::Exists => value.is_some(),
            Op::DoesNotExist => value.is_none(),
        }
    }
}

impl std::str::FromStr for Selector {
    type Err = SelectorError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// The canonical form: requirements in the given order, set values sorted, no spaces but
/// the one around `in`/`notin`. Parsing it gives the same selector back.
impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, r) in self.requirements.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            let set = |f: &mut fmt::Formatter<'_>, s: &BTreeSet<String>| {
                f.write_str("(")?;
                for (j, v) in s.iter().enumerate() {
                    if j > 0 {
                        f.write_str(",")?;
                    }
                    f.write_str(v)?;
                }
                f.write_str(")")
            };
            match &r.op {
                Op::Equals(v) => write!(f, "{}={v}", r.key)?,
                Op::NotEquals(v) => write!(f, "{}!={v}", r.key)?,
                Op::In(s) => {
                    write!(f, "{} in ", r.key)?;
                    set(f, s)?;
                }
                Op::NotIn(s) => {
                    write!(f, "{} notin ", r.key)?;
                    set(f, s)?;
                }
                Op::Exists => f.write_str(&r.key)?,
                Op::DoesNotExist => write!(f, "!{}", r.key)?,
            }
        }
        Ok(())
    }
}

/// Checks a label key; the error completes "label key … ".
pub fn check_label_key(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(prefix) = prefix {
        if prefix.is_empty() || prefix.len() > MAX_LABEL_PREFIX {
            return Err(format!(
                "{key:?} has a prefix that is empty or longer than {MAX_LABEL_PREFIX} characters"
            ));
        }
        let dns_ok = prefix.split('.').all(|part| {
            !part.is_empty()
                && part.len() <= 63
                && part.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !part.starts_with('-')
                && !part.ends_with('-')
        });
        if !dns_ok {
            return Err(format!("{key:?} has a prefix that is not a lowercase DNS subdomain"));
        }
    }
    if name.is_empty() {
        return Err(format!("{key:?} has an empty name"));
    }
    check_name(name).map_err(|why| format!("{key:?} {why}"))
}

/// Checks a label value (may be empty); the error completes "label value … ".
pub fn check_label_value(value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Ok(());
    }
    check_name(value).map_err(|why| format!("{value:?} {why}"))
}

/// Checks a whole label set (keys, values, count).
pub fn check_labels(labels: &Labels) -> Result<(), String> {
    if labels.len() > MAX_LABELS {
        return Err(format!("{} labels; at most {MAX_LABELS}", labels.len()));
    }
    for (k, v) in labels {
        check_label_key(k).map_err(|why| format!("label key {why}"))?;
        check_label_value(v).map_err(|why| format!("label {k}: value {why}"))?;
    }
    Ok(())
}

fn check_name(name: &str) -> Result<(), String> {
    if name.len() > MAX_LABEL_NAME {
        return Err(format!("is longer than {MAX_LABEL_NAME} characters"));
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')) {
        return Err("may hold only letters, digits, '-', '_' and '.'".into());
    }
    let edge_ok = |b: Option<u8>| b.is_some_and(|b| b.is_ascii_alphanumeric());
    if !edge_ok(name.bytes().next()) || !edge_ok(name.bytes().last()) {
        return Err("must start and end with a letter or digit".into());
    }
    Ok(())
}

/// `key=value` as an operator types it; `key=` sets an empty value.
pub fn parse_label_assignment(text: &str) -> Result<(String, String), String> {
    let (k, v) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?} is not KEY=VALUE (use --remove KEY to remove a label)"))?;
    check_label_key(k).map_err(|why| format!("label key {why}"))?;
    check_label_value(v).map_err(|why| format!("label value {why}"))?;
    Ok((k.to_owned(), v.to_owned()))
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Word(String),
    Comma,
    Bang,
    Eq,
    NotEq,
    Open,
    Close,
    End,
}

impl Token {
    fn describe(&self) -> String {
        match self {
            Token::Word(w) => format!("{w:?}"),
            Token::Comma => "','".into(),
            Token::Bang => "'!'".into(),
            Token::Eq => "'='".into(),
            Token::NotEq => "'!='".into(),
            Token::Open => "'('".into(),
            Token::Close => "')'".into(),
            Token::End => "the end of the selector".into(),
        }
    }
}

struct Parser {
    /// Tokens with their 1-based start column.
    tokens: Vec<(usize, Result<Token, char>)>,
    at: usize,
}

fn is_word_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/')
}

impl Parser {
    fn new(text: &str) -> Self {
        let chars: Vec<char> = text.chars().collect();
        let mut tokens = Vec::new();
        let mut i = 0;
        while i < chars.len() {
            let c = chars[i];
            let column = i + 1;
            if c.is_whitespace() {
                i += 1;
                continue;
            }
            let (token, len) = match c {
                ',' => (Ok(Token::Comma), 1),
                '(' => (Ok(Token::Open), 1),
                ')' => (Ok(Token::Close), 1),
                '=' if chars.get(i + 1) == Some(&'=') => (Ok(Token::Eq), 2),
                '=' => (Ok(Token::Eq), 1),
                '!' if chars.get(i + 1) == Some(&'=') => (Ok(Token::NotEq), 2),
                '!' => (Ok(Token::Bang), 1),
                c if is_word_char(c) => {
                    let len = chars[i..].iter().take_while(|c| is_word_char(**c)).count();
                    (Ok(Token::Word(chars[i..i + len].iter().collect())), len)
                }
                other => (Err(other), 1),
            };
            tokens.push((column, token));
            i += len;
        }
        tokens.push((chars.len() + 1, Ok(Token::End)));
        Self { tokens, at: 0 }
    }

    fn peek(&self) -> (usize, Result<Token, char>) {
        self.tokens.get(self.at).cloned().unwrap_or((usize::MAX, Ok(Token::End)))
    }

    fn next(&mut self) -> (usize, Result<Token, char>) {
        let t = self.peek();
        self.at += 1;
        t
    }

    fn fail<T>(column: usize, token: &Result<Token, char>, expected: &str) -> Result<T, SelectorError> {
        let found = match token {
            Ok(t) => t.describe(),
            Err(c) => format!("the character {c:?}"),
        };
        Err(SelectorError { column, expected: expected.into(), found })
    }

    fn selector(mut self) -> Result<Selector, SelectorError> {
        let mut requirements = vec![self.requirement()?];
        loop {
            match self.next() {
                (_, Ok(Token::End)) => return Ok(Selector { requirements }),
                (_, Ok(Token::Comma)) => requirements.push(self.requirement()?),
                (col, t) => return Self::fail(col, &t, "',' or the end of the selector"),
            }
        }
    }

    fn key(&mut self) -> Result<String, SelectorError> {
        match self.next() {
            (col, Ok(Token::Word(w))) => {
                check_label_key(&w).map_err(|why| SelectorError {
                    column: col,
                    expected: "a valid label key".into(),
                    found: format!("label key {why}"),
                })?;
                Ok(w)
            }
            (col, t) => Self::fail(col, &t, "a label key"),
        }
    }

    fn value(&mut self) -> Result<String, SelectorError> {
        match self.peek() {
            (col, Ok(Token::Word(w))) => {
                self.at += 1;
                check_label_value(&w).map_err(|why| SelectorError {
                    column: col,
                    expected: "a valid label value".into(),
                    found: format!("label value {why}"),
                })?;
                Ok(w)
            }
            // An empty value: `key=` or `key!=` at the end or before a comma.
            (_, Ok(Token::End | Token::Comma)) => Ok(String::new()),
            (col, t) => Self::fail(col, &t, "a label value"),
        }
    }

    fn requirement(&mut self) -> Result<Requirement, SelectorError> {
        if let (_, Ok(Token::Bang)) = self.peek() {
            self.at += 1;
            let key = self.key()?;
            return Ok(Requirement { key, op: Op::DoesNotExist });
        }
        let key = self.key()?;
        let op = match self.peek() {
            (_, Ok(Token::End | Token::Comma)) => Op::Exists,
            (_, Ok(Token::Eq)) => {
                self.at += 1;
                Op::Equals(self.value()?)
            }
            (_, Ok(Token::NotEq)) => {
                self.at += 1;
                Op::NotEquals(self.value()?)
            }
            (_, Ok(Token::Word(w))) if w == "in" || w == "notin" => {
                self.at += 1;
                let set = self.set()?;
                if w == "in" { Op::In(set) } else { Op::NotIn(set) }
            }
            (col, t) => {
                return Self::fail(col, &t, "'=', '==', '!=', 'in', 'notin', ',' or the end of the selector");
            }
        };
        Ok(Requirement { key, op })
    }

    fn set(&mut self) -> Result<BTreeSet<String>, SelectorError> {
        match self.next() {
            (_, Ok(Token::Open)) => {}
            (col, t) => return Self::fail(col, &t, "'(' opening a set of values"),
        }
        let mut set = BTreeSet::new();
        loop {
            match self.peek() {
                (_, Ok(Token::Word(_))) => {
                    set.insert(self.value()?);
                }
                (col, t) => return Self::fail(col, &t, "a label value"),
            }
            match self.next() {
                (_, Ok(Token::Comma)) => continue,
                (_, Ok(Token::Close)) => return Ok(set),
                (col, t) => return Self::fail(col, &t, "',' or ')'"),
            }
        }
    }
}

#[cfg(test)]
#[path = "selector_tests.rs"]
mod tests;
