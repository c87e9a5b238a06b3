//! Typed decoding of a native object into its k8s-openapi type, with every unknown field found
//! (`serde_ignored`) and every type error placed (`serde_path_to_error`): the strictness of
//! `kubectl apply --validate=strict`, and the hint of the valid names at an unknown field.

use std::cell::Cell;

use serde::de::{self, DeserializeOwned, IntoDeserializer, Visitor};
use serde_json::Value;

use super::{FieldError, Strictness};

/// One step of a path into a document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Seg {
    Key(String),
    Index(usize),
}

/// `spec.containers[0].ports[1].containerPort`.
pub(crate) fn path_text(segs: &[Seg]) -> String {
    let mut out = String::new();
    for s in segs {
        match s {
            Seg::Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(k);
            }
            Seg::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

fn ignored_path(p: &serde_ignored::Path<'_>, out: &mut Vec<Seg>) {
    use serde_ignored::Path;
    match p {
        Path::Root => {}
        Path::Seq { parent, index } => {
            ignored_path(parent, out);
            out.push(Seg::Index(*index));
        }
        Path::Map { parent, key } => {
            ignored_path(parent, out);
            out.push(Seg::Key(key.clone()));
        }
        Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => ignored_path(parent, out),
    }
}

fn error_path(p: &serde_path_to_error::Path) -> Vec<Seg> {
    use serde_path_to_error::Segment;
    p.iter()
        .filter_map(|s| match s {
            Segment::Seq { index } => Some(Seg::Index(*index)),
            Segment::Map { key } => Some(Seg::Key(key.clone())),
            Segment::Enum { .. } | Segment::Unknown => None,
        })
        .collect()
}

/// `T` from `v`. Strict: a field `T` does not have is an error naming it, with the valid names.
/// Lenient (objects an API server gave, which may be newer than k8s-openapi): unknown fields are
/// ignored. A value of the wrong type is an error either way.
pub(crate) fn typed<T: DeserializeOwned>(
    v: Value,
    strictness: Strictness,
) -> Result<T, FieldError> {
    let mut unknown: Vec<Vec<Seg>> = Vec::new();
    let mut found = |p: serde_ignored::Path<'_>| {
        let mut segs = Vec::new();
        ignored_path(&p, &mut segs);
        unknown.push(segs);
    };
    let result: Result<T, _> =
        serde_path_to_error::deserialize(serde_ignored::Deserializer::new(v, &mut found));
    if strictness == Strictness::Strict {
        if let Some(first) = unknown.first() {
            return Err(unknown_field::<T>(first, unknown.len() - 1));
        }
    }
    result.map_err(|e| {
        let mut segs = error_path(e.path());
        let reason = e.into_inner().to_string();
        // "missing field `spec`" names the field itself.
        if let Some(missing) = reason
            .strip_prefix("missing field `")
            .and_then(|r| r.split('`').next())
        {
            segs.push(Seg::Key(missing.to_string()));
            return FieldError::new(path_text(&segs), "is required");
        }
        let path = if segs.is_empty() {
            "(document)".to_string()
        } else {
            path_text(&segs)
        };
        FieldError::new(path, reason)
    })
}

fn unknown_field<T: DeserializeOwned>(path: &[Seg], more: usize) -> FieldError {
    let Some((last, parent)) = path.split_last() else {
        return FieldError::new("(document)", "unexpected value");
    };
    let name = match last {
        Seg::Key(k) => k.as_str(),
        Seg::Index(_) => "",
    };
    let mut reason = "unknown field".to_string();
    if let Some(valid) = fields_at::<T>(parent) {
        let valid: Vec<&str> = valid.to_vec();
        if let Some(best) = closest(name, &valid) {
            reason.push_str(&format!(" (did you mean {best:?}?)"));
        }
        reason.push_str(&format!("; valid fields here: {}", valid.join(", ")));
    }
    if more > 0 {
        reason.push_str(&format!(" (and {more} more unknown field(s))"));
    }
    FieldError::new(path_text(path), reason)
}

/// The closest valid name: the same but for case, or within a small edit distance.
fn closest<'a>(name: &str, valid: &[&'a str]) -> Option<&'a str> {
    if let Some(v) = valid.iter().find(|v| v.eq_ignore_ascii_case(name)) {
        return Some(v);
    }
    let limit = (name.len() / 3).clamp(1, 3);
    valid
        .iter()
        .map(|v| (edit_distance(name, v), *v))
        .filter(|(d, _)| *d <= limit)
        .min()
        .map(|(_, v)| v)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

/// The field names of the struct `T` holds at `path`, found by walking `T`'s own `Deserialize`
/// down the path with a deserializer that offers exactly that path and stops at the struct.
fn fields_at<T: DeserializeOwned>(path: &[Seg]) -> Option<&'static [&'static str]> {
    let out = Cell::new(None);
    let _ = T::deserialize(Walk { path, out: &out });
    out.get()
}

struct Walk<'a> {
    path: &'a [Seg],
    out: &'a Cell<Option<&'static [&'static str]>>,
}

type WalkError = de::value::Error;

fn stop() -> WalkError {
    de::Error::custom("stop")
}

impl<'de> de::Deserializer<'de> for Walk<'_> {
    type Error = WalkError;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, WalkError> {
        Err(stop())
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, WalkError> {
        if self.path.is_empty() {
            self.out.set(Some(fields));
            return Err(stop());
        }
        self.deserialize_map(visitor)
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, WalkError> {
        match self.path.split_first() {
            Some((Seg::Key(k), rest)) => visitor.visit_map(OneEntry {
                key: Some(k.clone()),
                rest,
                out: self.out,
            }),
            _ => Err(stop()),
        }
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, WalkError> {
        match self.path.split_first() {
            Some((Seg::Index(_), rest)) => visitor.visit_seq(OneElement {
                rest: Some(rest),
                out: self.out,
            }),
            _ => Err(stop()),
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, WalkError> {
        visitor.visit_some(self)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        visitor: V,
    ) -> Result<V::Value, WalkError> {
        visitor.visit_newtype_struct(self)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        unit unit_struct tuple tuple_struct enum identifier ignored_any
    }
}

struct OneEntry<'a> {
    key: Option<String>,
    rest: &'a [Seg],
    out: &'a Cell<Option<&'static [&'static str]>>,
}

impl<'de> de::MapAccess<'de> for OneEntry<'_> {
    type Error = WalkError;

    fn next_key_seed<K: de::DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, WalkError> {
        match self.key.take() {
            Some(k) => seed.deserialize(k.into_deserializer()).map(Some),
            None => Ok(None),
        }
    }

    fn next_value_seed<V: de::DeserializeSeed<'de>>(
        &mut self,
        seed: V,
    ) -> Result<V::Value, WalkError> {
        seed.deserialize(Walk {
            path: self.rest,
            out: self.out,
        })
    }
}

struct OneElement<'a> {
    rest: Option<&'a [Seg]>,
    out: &'a Cell<Option<&'static [&'static str]>>,
}

impl<'de> de::SeqAccess<'de> for OneElement<'_> {
    type Error = WalkError;

    fn next_element_seed<T: de::DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, WalkError> {
        match self.rest.take() {
            Some(path) => seed
                .deserialize(Walk {
                    path,
                    out: self.out,
                })
                .map(Some),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_suggested() {
        let valid = ["matchExpressions", "matchLabels"];
        assert_eq!(closest("matchLabel", &valid), Some("matchLabels"));
        assert_eq!(
            closest("nodename", &["nodeName", "nodeSelector"]),
            Some("nodeName")
        );
        assert_eq!(closest("zzz", &valid), None);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }
}
