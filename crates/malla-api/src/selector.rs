//! Calico's label selector language (`projectcalico.org/v3` policies, network sets, host
//! endpoints): parsed into a [`Selector`], printed back in one canonical form, evaluated
//! against a label map.
//!
//! The grammar, as Calico documents it, loosest binding first:
//!
//! ```text
//! expr    := and ( "||" and )*
//! and     := unary ( "&&" unary )*
//! unary   := "!" unary | "(" expr ")" | "all()" | "global()" | "has(" key ")"
//!          | key ( "==" | "!=" ) value | key "in" set | key "not" "in" set
//!          | key "contains" value | key "starts" "with" value | key "ends" "with" value
//! set     := "{" [ value ( "," value )* ] "}"
//! value   := a string in single or double quotes (no escapes)
//! key     := a label key: [A-Za-z0-9] then [A-Za-z0-9_./-]*
//! ```
//!
//! Semantics, as Calico's: `k == v`, `k in {…}`, `contains`, `starts with` and `ends with`
//! need the label; `k != v` and `k not in {…}` also match when it is absent; `all()` matches
//! everything; `global()` matches only resources that are not namespaced (a selector's
//! namespace context says which).
//!
//! The parser is written with `winnow` (a maintained parser-combinator library), so the grammar
//! above reads as the code; errors name the byte offset and what was expected there.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use winnow::ascii::multispace0;
use winnow::combinator::{alt, cut_err, delimited, preceded, repeat, separated, terminated};
use winnow::error::{ContextError, ErrMode, StrContext, StrContextValue};
use winnow::prelude::*;
use winnow::token::{one_of, take_till, take_while};

/// A parsed selector.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Selector {
    All,
    Global,
    Has(String),
    Equals(String, String),
    NotEquals(String, String),
    In(String, BTreeSet<String>),
    NotIn(String, BTreeSet<String>),
    Contains(String, String),
    StartsWith(String, String),
    EndsWith(String, String),
    Not(Box<Selector>),
    And(Box<Selector>, Box<Selector>),
    Or(Box<Selector>, Box<Selector>),
}

/// Why a selector does not parse: where, and what was expected there.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("selector {text:?}: at byte {offset}: {message}")]
pub struct SelectorError {
    pub text: String,
    pub offset: usize,
    pub message: String,
}

impl Selector {
    /// Parses `text` (surrounding white space allowed; an empty selector is `all()`, as Calico
    /// reads an omitted one).
    pub fn parse(text: &str) -> Result<Selector, SelectorError> {
        if text.trim().is_empty() {
            return Ok(Selector::All);
        }
        delimited(multispace0, expr, multispace0)
            .parse(text)
            .map_err(|e| SelectorError {
                text: text.to_string(),
                offset: e.offset(),
                message: {
                    let m = e.inner().to_string();
                    if m.is_empty() {
                        "unexpected input".into()
                    } else {
                        m
                    }
                },
            })
    }

    /// Whether labels `labels` of a resource match; `namespaced` says whether the resource is
    /// namespaced (for `global()`).
    pub fn matches(&self, labels: &BTreeMap<String, String>, namespaced: bool) -> bool {
        let get = |k: &str| labels.get(k).map(String::as_str);
        match self {
            Selector::All => true,
            Selector::Global => !namespaced,
            Selector::Has(k) => get(k).is_some(),
            Selector::Equals(k, v) => get(k) == Some(v),
            Selector::NotEquals(k, v) => get(k) != Some(v),
            Selector::In(k, vs) => get(k).is_some_and(|x| vs.contains(x)),
            Selector::NotIn(k, vs) => !get(k).is_some_and(|x| vs.contains(x)),
            Selector::Contains(k, v) => get(k).is_some_and(|x| x.contains(v.as_str())),
            Selector::StartsWith(k, v) => get(k).is_some_and(|x| x.starts_with(v.as_str())),
            Selector::EndsWith(k, v) => get(k).is_some_and(|x| x.ends_with(v.as_str())),
            Selector::Not(s) => !s.matches(labels, namespaced),
            Selector::And(a, b) => a.matches(labels, namespaced) && b.matches(labels, namespaced),
            Selector::Or(a, b) => a.matches(labels, namespaced) || b.matches(labels, namespaced),
        }
    }
}

/// The canonical form: every binary operation parenthesized, values in single quotes unless
/// they hold one (then double).
impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fn q(v: &str) -> String {
            if v.contains('\'') {
                format!("\"{v}\"")
            } else {
                format!("'{v}'")
            }
        }
        fn set(vs: &BTreeSet<String>) -> String {
            let items: Vec<String> = vs.iter().map(|v| q(v)).collect();
            format!("{{{}}}", items.join(", "))
        }
        match self {
            Selector::All => write!(f, "all()"),
            Selector::Global => write!(f, "global()"),
            Selector::Has(k) => write!(f, "has({k})"),
            Selector::Equals(k, v) => write!(f, "{k} == {}", q(v)),
            Selector::NotEquals(k, v) => write!(f, "{k} != {}", q(v)),
            Selector::In(k, vs) => write!(f, "{k} in {}", set(vs)),
            Selector::NotIn(k, vs) => write!(f, "{k} not in {}", set(vs)),
            Selector::Contains(k, v) => write!(f, "{k} contains {}", q(v)),
            Selector::StartsWith(k, v) => write!(f, "{k} starts with {}", q(v)),
            Selector::EndsWith(k, v) => write!(f, "{k} ends with {}", q(v)),
            Selector::Not(s) => write!(f, "!({s})"),
            Selector::And(a, b) => write!(f, "({a} && {b})"),
            Selector::Or(a, b) => write!(f, "({a} || {b})"),
        }
    }
}

type In<'a> = &'a str;

/// `p`, then any white space.
fn tok<'a, O>(
    p: impl Parser<In<'a>, O, ErrMode<ContextError>>,
) -> impl Parser<In<'a>, O, ErrMode<ContextError>> {
    terminated(p, multispace0)
}

fn expected(what: &'static str) -> StrContext {
    StrContext::Expected(StrContextValue::Description(what))
}

fn expr(i: &mut In<'_>) -> ModalResult<Selector> {
    let first = and.parse_next(i)?;
    let rest: Vec<Selector> = repeat(0.., preceded(tok("||"), cut_err(and))).parse_next(i)?;
    Ok(rest
        .into_iter()
        .fold(first, |a, b| Selector::Or(Box::new(a), Box::new(b))))
}

fn and(i: &mut In<'_>) -> ModalResult<Selector> {
    let first = unary.parse_next(i)?;
    let rest: Vec<Selector> = repeat(0.., preceded(tok("&&"), cut_err(unary))).parse_next(i)?;
    Ok(rest
        .into_iter()
        .fold(first, |a, b| Selector::And(Box::new(a), Box::new(b))))
}

fn unary(i: &mut In<'_>) -> ModalResult<Selector> {
    alt((
        preceded(tok("!"), cut_err(unary)).map(|s| Selector::Not(Box::new(s))),
        delimited(
            tok("("),
            cut_err(expr),
            cut_err(tok(")")).context(expected("`)`")),
        ),
        tok("all()").value(Selector::All),
        tok("global()").value(Selector::Global),
        delimited(
            tok("has("),
            cut_err(tok(key)),
            cut_err(tok(")")).context(expected("`)`")),
        )
        .map(|k: &str| Selector::Has(k.to_string())),
        comparison,
    ))
    .context(expected(
        "a selector: `key == 'value'`, `has(key)`, `all()`, `!`, `(`",
    ))
    .parse_next(i)
}

fn comparison(i: &mut In<'_>) -> ModalResult<Selector> {
    let k = tok(key).parse_next(i)?.to_string();
    let op = cut_err(
        alt((
            tok("=="),
            tok("!="),
            tok("in"),
            terminated(tok("not"), tok("in")),
            tok("contains"),
            terminated(tok("starts"), tok("with")),
            terminated(tok("ends"), tok("with")),
        ))
        .context(expected(
            "an operator: ==, !=, in, not in, contains, starts with, ends with",
        )),
    )
    .parse_next(i)?;
    Ok(match op {
        "in" => Selector::In(k, cut_err(set).parse_next(i)?),
        "not" => Selector::NotIn(k, cut_err(set).parse_next(i)?),
        _ => {
            let v = cut_err(tok(value)).parse_next(i)?.to_string();
            match op {
                "==" => Selector::Equals(k, v),
                "!=" => Selector::NotEquals(k, v),
                "contains" => Selector::Contains(k, v),
                "starts" => Selector::StartsWith(k, v),
                _ => Selector::EndsWith(k, v),
            }
        }
    })
}

fn set(i: &mut In<'_>) -> ModalResult<BTreeSet<String>> {
    let values: Vec<&str> = delimited(
        tok("{").context(expected("`{`")),
        separated(0.., tok(value), tok(",")),
        tok("}").context(expected("`}` or `,`")),
    )
    .parse_next(i)?;
    Ok(values.into_iter().map(str::to_string).collect())
}

/// A label key: a letter or digit first, then letters, digits, `_`, `.`, `/`, `-`.
fn key<'a>(i: &mut In<'a>) -> ModalResult<&'a str> {
    (
        one_of(|c: char| c.is_ascii_alphanumeric()),
        take_while(0.., |c: char| {
            c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '/' | '-')
        }),
    )
        .take()
        .context(expected("a label key"))
        .parse_next(i)
}

/// A quoted string, single or double quotes, no escapes.
fn value<'a>(i: &mut In<'a>) -> ModalResult<&'a str> {
    alt((
        delimited('\'', take_till(0.., '\''), '\''),
        delimited('"', take_till(0.., '"'), '"'),
    ))
    .context(expected("a quoted value"))
    .parse_next(i)
}

#[cfg(test)]
mod tests;
