//! Node names as small numbers: the proxy keeps the node of every endpoint (300k of them in a
//! large cluster), and a 4-byte [`NodeName`] costs a quarter of a shared string's handle.
//!
//! Names are interned once per process and never freed: a cluster has a bounded set of node
//! names (even with churn, thousands of short strings), and in exchange the same name is the
//! same number everywhere, whatever order the names arrived in, so views built by different
//! routes compare equal.

use std::collections::HashMap;
use std::fmt;
use std::num::NonZeroU32;
use std::sync::{OnceLock, RwLock};

use serde::{Serialize, Serializer};

/// An interned node name. Ordered by when the name was first seen (any fixed order will do:
/// it only breaks ties between endpoints of the same address and port).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeName(NonZeroU32);

#[derive(Default)]
struct Names {
    /// Index `i` holds the name of `NodeName(i + 1)`.
    names: Vec<&'static str>,
    ids: HashMap<&'static str, NodeName>,
}

fn names() -> &'static RwLock<Names> {
    static NAMES: OnceLock<RwLock<Names>> = OnceLock::new();
    NAMES.get_or_init(Default::default)
}

impl NodeName {
    /// The number of `name`, given one if it has none yet.
    pub fn intern(name: &str) -> NodeName {
        if let Some(id) = NodeName::find(name) {
            return id;
        }
        let mut t = names().write().unwrap_or_else(|e| e.into_inner());
        if let Some(id) = t.ids.get(name) {
            return *id;
        }
        let leaked: &'static str = Box::leak(name.into());
        let n = u32::try_from(t.names.len() + 1).expect("fewer than 2^32 node names");
        let id = NodeName(NonZeroU32::new(n).expect("n >= 1"));
        t.names.push(leaked);
        t.ids.insert(leaked, id);
        id
    }

    /// The number of `name` if it has one (no node of that name was seen: no endpoint is on it).
    pub fn find(name: &str) -> Option<NodeName> {
        let t = names().read().unwrap_or_else(|e| e.into_inner());
        t.ids.get(name).copied()
    }

    pub fn as_str(self) -> &'static str {
        let t = names().read().unwrap_or_else(|e| e.into_inner());
        t.names[self.0.get() as usize - 1]
    }
}

impl fmt::Display for NodeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for NodeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl Serialize for NodeName {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_is_one_number_and_reads_back() {
        let a = NodeName::intern("node-name-test-a");
        let b = NodeName::intern("node-name-test-b");
        assert_ne!(a, b);
        assert_eq!(NodeName::intern("node-name-test-a"), a);
        assert_eq!(NodeName::find("node-name-test-b"), Some(b));
        assert_eq!(NodeName::find("node-name-test-never"), None);
        assert_eq!(a.as_str(), "node-name-test-a");
        assert_eq!(serde_json::to_string(&b).unwrap(), "\"node-name-test-b\"");
        assert_eq!(std::mem::size_of::<Option<NodeName>>(), 4);
    }
}
