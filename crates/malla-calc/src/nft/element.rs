//! The typed elements of nftables sets and maps: a [`Key`] is a short sequence of typed
//! [`Part`]s (`198.19.64.10 . tcp . 80`), a map's [`Value`] is data of the same kind
//! (`198.18.0.5 . 8080`) or a [`Verdict`] (`goto svc-…`).
//!
//! They are kept as values, not text: the netlink encoder (`malla_dataplane::nft::elements`)
//! writes their bytes from the parts, and they become text only for `nft -f` (their
//! [`Display`](std::fmt::Display) is nft's syntax). A key holds its parts packed in a few
//! bytes inline (no allocation for any key Malla makes but an IPv6 `addr . addr`), and a
//! verdict shares its chain's name ([`Arc<str>`]) with every other element naming it: at 30k
//! services the proxy's maps hold ~30k keys each. [`FromStr`](std::str::FromStr) reads nft's
//! syntax back, for tests and tools; nothing in the agent's path parses element text.
//!
//! Integers are one kind of part ([`Part::Int`]): whether an integer is a port (2 bytes,
//! network order) or a `numgen` index (4 bytes, host order) is the set's type, which the
//! encoder is given. A protocol ([`Part::Proto`]) is its own kind, as nft writes it by name.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;
use std::sync::Arc;

use ipnet::IpNet;

/// The longest interface name the kernel takes (`IFNAMSIZ` less the NUL).
pub const IFNAME_MAX: usize = 15;

/// One part of a key or of a map's data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Part {
    /// An address (`ipv4_addr`, `ipv6_addr`).
    Addr(IpAddr),
    /// A prefix shorter than its address (an interval set's element), e.g. `10.0.0.0/8`.
    Net(IpNet),
    /// A layer-4 protocol number (`inet_proto`), written `tcp`, `udp`, `sctp` or as a number.
    Proto(u8),
    /// An integer: a port (`inet_service`) or an index (`numgen … mod N`).
    Int(u32),
    /// An inclusive range of integers, e.g. ports `80-90` (interval maps).
    Range(u32, u32),
    /// An interface name (`ifname`), written quoted.
    Iface(IfName),
}

/// An interface name of at most [`IFNAME_MAX`] bytes, stored inline.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct IfName {
    len: u8,
    bytes: [u8; IFNAME_MAX],
}

impl IfName {
    /// The name, or None when it is empty or longer than the kernel takes.
    pub fn new(name: &str) -> Option<IfName> {
        let b = name.as_bytes();
        if b.is_empty() || b.len() > IFNAME_MAX {
            return None;
        }
        let mut bytes = [0u8; IFNAME_MAX];
        bytes[..b.len()].copy_from_slice(b);
        Some(IfName {
            len: b.len() as u8,
            bytes,
        })
    }

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.bytes[..usize::from(self.len)]).unwrap_or("")
    }
}

impl fmt::Debug for IfName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

/// `IPPROTO_TCP`, `IPPROTO_UDP`, `IPPROTO_SCTP`.
pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const SCTP: u8 = 132;

impl Part {
    /// A port.
    pub fn port(p: u16) -> Part {
        Part::Int(u32::from(p))
    }

    /// An address.
    pub fn addr(a: impl Into<IpAddr>) -> Part {
        Part::Addr(a.into())
    }

    /// A network: its address alone when the prefix is the whole address (as nft writes it).
    pub fn net(n: &IpNet) -> Part {
        if n.prefix_len() == n.max_prefix_len() {
            Part::Addr(n.addr())
        } else {
            Part::Net(*n)
        }
    }

    /// The protocol named `tcp`, `udp` or `sctp` (or a number).
    pub fn proto_named(name: &str) -> Option<Part> {
        Some(Part::Proto(match name {
            "tcp" => TCP,
            "udp" => UDP,
            "sctp" => SCTP,
            n => n.parse().ok()?,
        }))
    }

    /// Appends the part's packed form (a tag byte, then its bytes).
    fn pack(&self, out: &mut Packer) {
        match self {
            Part::Addr(IpAddr::V4(a)) => out.put(0, &a.octets()),
            Part::Addr(IpAddr::V6(a)) => out.put(1, &a.octets()),
            Part::Net(IpNet::V4(n)) => {
                out.put(2, &n.addr().octets());
                out.push(n.prefix_len());
            }
            Part::Net(IpNet::V6(n)) => {
                out.put(3, &n.addr().octets());
                out.push(n.prefix_len());
            }
            Part::Proto(p) => out.put(4, &[*p]),
            Part::Int(n) => out.put(5, &n.to_be_bytes()),
            Part::Range(lo, hi) => {
                out.put(6, &lo.to_be_bytes());
                out.extend(&hi.to_be_bytes());
            }
            Part::Iface(n) => {
                out.put(7, &[n.len]);
                out.extend(&n.bytes[..usize::from(n.len)]);
            }
        }
    }

    /// Reads one packed part from the front of `b`; returns it and the rest.
    fn unpack(b: &[u8]) -> Option<(Part, &[u8])> {
        let (&tag, b) = b.split_first()?;
        let arr4 = |b: &[u8]| <[u8; 4]>::try_from(b).ok();
        let arr16 = |b: &[u8]| <[u8; 16]>::try_from(b).ok();
        Some(match tag {
            0 => {
                let (a, rest) = take(b, 4)?;
                (Part::Addr(Ipv4Addr::from(arr4(a)?).into()), rest)
            }
            1 => {
                let (a, rest) = take(b, 16)?;
                (Part::Addr(Ipv6Addr::from(arr16(a)?).into()), rest)
            }
            2 => {
                let (a, rest) = take(b, 5)?;
                let n = ipnet::Ipv4Net::new(Ipv4Addr::from(arr4(&a[..4])?), a[4]).ok()?;
                (Part::Net(n.into()), rest)
            }
            3 => {
                let (a, rest) = take(b, 17)?;
                let n = ipnet::Ipv6Net::new(Ipv6Addr::from(arr16(&a[..16])?), a[16]).ok()?;
                (Part::Net(n.into()), rest)
            }
            4 => {
                let (p, rest) = take(b, 1)?;
                (Part::Proto(p[0]), rest)
            }
            5 => {
                let (n, rest) = take(b, 4)?;
                (Part::Int(u32::from_be_bytes(arr4(n)?)), rest)
            }
            6 => {
                let (n, rest) = take(b, 8)?;
                let lo = u32::from_be_bytes(arr4(&n[..4])?);
                let hi = u32::from_be_bytes(arr4(&n[4..])?);
                (Part::Range(lo, hi), rest)
            }
            7 => {
                let (&len, b) = b.split_first()?;
                let (name, rest) = take(b, usize::from(len))?;
                let name = IfName::new(std::str::from_utf8(name).ok()?)?;
                (Part::Iface(name), rest)
            }
            _ => return None,
        })
    }
}

/// The first `n` bytes of `b` and the rest, if `b` has them.
fn take(b: &[u8], n: usize) -> Option<(&[u8], &[u8])> {
    (b.len() >= n).then(|| b.split_at(n))
}

/// Dotted-quad text of an IPv4 address, without the formatting machinery (a node's table
/// holds one element per pod address).
fn write_v4(f: &mut impl fmt::Write, a: Ipv4Addr) -> fmt::Result {
    for (i, o) in a.octets().into_iter().enumerate() {
        if i > 0 {
            f.write_char('.')?;
        }
        if o >= 100 {
            f.write_char(char::from(b'0' + o / 100))?;
        }
        if o >= 10 {
            f.write_char(char::from(b'0' + o / 10 % 10))?;
        }
        f.write_char(char::from(b'0' + o % 10))?;
    }
    Ok(())
}

impl fmt::Display for Part {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Part::Addr(IpAddr::V4(a)) => write_v4(f, *a),
            Part::Addr(a) => write!(f, "{a}"),
            Part::Net(n) => write!(f, "{n}"),
            Part::Proto(TCP) => f.write_str("tcp"),
            Part::Proto(UDP) => f.write_str("udp"),
            Part::Proto(SCTP) => f.write_str("sctp"),
            Part::Proto(p) => write!(f, "{p}"),
            Part::Int(n) => write!(f, "{n}"),
            Part::Range(lo, hi) => write!(f, "{lo}-{hi}"),
            Part::Iface(n) => write!(f, "\"{}\"", n.as_str()),
        }
    }
}

impl FromStr for Part {
    type Err = String;

    /// nft's text of one part: an address or prefix, `tcp`/`udp`/`sctp`, an integer, a range
    /// `lo-hi`, a quoted interface name.
    fn from_str(s: &str) -> Result<Part, String> {
        let bad = || format!("{s:?} is not an element part");
        if let Some(q) = s.strip_prefix('"') {
            let name = q.strip_suffix('"').ok_or_else(bad)?;
            return IfName::new(name).map(Part::Iface).ok_or_else(bad);
        }
        if let Ok(a) = s.parse::<IpAddr>() {
            return Ok(Part::Addr(a));
        }
        if let Ok(n) = s.parse::<IpNet>() {
            return Ok(Part::net(&n));
        }
        if let Ok(n) = s.parse::<u32>() {
            return Ok(Part::Int(n));
        }
        if let Some((lo, hi)) = s.split_once('-') {
            if let (Ok(lo), Ok(hi)) = (lo.parse(), hi.parse()) {
                return Ok(Part::Range(lo, hi));
            }
        }
        match s {
            "tcp" | "udp" | "sctp" => Part::proto_named(s).ok_or_else(bad),
            _ => Err(bad()),
        }
    }
}

/// Packed parts kept inline up to this many bytes (every key Malla makes but an IPv6
/// `addr . addr`: `addr . proto . port` is 22 for IPv6).
const INLINE: usize = 22;

/// A key (or a map's data): its parts, packed.
#[derive(Clone)]
pub struct Key(Repr);

#[derive(Clone)]
enum Repr {
    Inline(u8, [u8; INLINE]),
    Heap(Box<[u8]>),
}

/// Packs parts into a buffer on the stack first.
struct Packer {
    buf: [u8; 64],
    len: usize,
    spill: Vec<u8>,
}

impl Packer {
    fn new() -> Packer {
        Packer {
            buf: [0; 64],
            len: 0,
            spill: Vec::new(),
        }
    }

    fn push(&mut self, b: u8) {
        self.extend(&[b]);
    }

    fn put(&mut self, tag: u8, b: &[u8]) {
        self.push(tag);
        self.extend(b);
    }

    fn extend(&mut self, b: &[u8]) {
        if self.spill.is_empty() && self.len + b.len() <= self.buf.len() {
            self.buf[self.len..self.len + b.len()].copy_from_slice(b);
            self.len += b.len();
        } else {
            if self.spill.is_empty() {
                self.spill.extend_from_slice(&self.buf[..self.len]);
            }
            self.spill.extend_from_slice(b);
        }
    }

    fn finish(self) -> Key {
        let bytes = if self.spill.is_empty() {
            &self.buf[..self.len]
        } else {
            &self.spill[..]
        };
        if bytes.len() <= INLINE {
            let mut inline = [0u8; INLINE];
            inline[..bytes.len()].copy_from_slice(bytes);
            Key(Repr::Inline(bytes.len() as u8, inline))
        } else {
            Key(Repr::Heap(bytes.into()))
        }
    }
}

impl Key {
    /// The key of these parts, in order.
    pub fn new(parts: impl IntoIterator<Item = Part>) -> Key {
        let mut p = Packer::new();
        for part in parts {
            part.pack(&mut p);
        }
        p.finish()
    }

    /// A key of one part.
    pub fn one(part: Part) -> Key {
        Key::new([part])
    }

    fn bytes(&self) -> &[u8] {
        match &self.0 {
            Repr::Inline(len, b) => &b[..usize::from(*len)],
            Repr::Heap(b) => b,
        }
    }

    /// The parts, in order.
    pub fn parts(&self) -> Parts<'_> {
        Parts(self.bytes())
    }

    /// How many parts.
    pub fn len(&self) -> usize {
        self.parts().count()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes().is_empty()
    }
}

/// The parts of a [`Key`].
pub struct Parts<'a>(&'a [u8]);

impl Iterator for Parts<'_> {
    type Item = Part;

    fn next(&mut self) -> Option<Part> {
        let (p, rest) = Part::unpack(self.0)?;
        self.0 = rest;
        Some(p)
    }
}

impl PartialEq for Key {
    fn eq(&self, other: &Key) -> bool {
        self.bytes() == other.bytes()
    }
}

impl Eq for Key {}

impl std::hash::Hash for Key {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.bytes().hash(state)
    }
}

/// An order of keys (by their packed bytes), not nft's text order: renderings sort the text.
impl Ord for Key {
    fn cmp(&self, other: &Key) -> std::cmp::Ordering {
        self.bytes().cmp(other.bytes())
    }
}

impl PartialOrd for Key {
    fn partial_cmp(&self, other: &Key) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl From<Part> for Key {
    fn from(p: Part) -> Key {
        Key::one(p)
    }
}

impl fmt::Display for Key {
    /// nft's text: the parts joined by ` . `.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.parts().enumerate() {
            if i > 0 {
                f.write_str(" . ")?;
            }
            fmt::Display::fmt(&p, f)?;
        }
        Ok(())
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key({self})")
    }
}

impl FromStr for Key {
    type Err = String;

    /// nft's text of a key: parts joined by ` . `.
    fn from_str(s: &str) -> Result<Key, String> {
        let parts: Vec<Part> = s
            .split(" . ")
            .map(|p| p.trim().parse())
            .collect::<Result<_, _>>()?;
        Ok(Key::new(parts))
    }
}

/// A verdict, as a verdict map's value.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Verdict {
    Accept,
    Drop,
    Return,
    /// `goto CHAIN`.
    Goto(Arc<str>),
    /// `jump CHAIN`.
    Jump(Arc<str>),
}

impl Verdict {
    /// The chain it names, if any.
    pub fn chain(&self) -> Option<&str> {
        match self {
            Verdict::Goto(c) | Verdict::Jump(c) => Some(c),
            _ => None,
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Accept => f.write_str("accept"),
            Verdict::Drop => f.write_str("drop"),
            Verdict::Return => f.write_str("return"),
            Verdict::Goto(c) => write!(f, "goto {c}"),
            Verdict::Jump(c) => write!(f, "jump {c}"),
        }
    }
}

impl FromStr for Verdict {
    type Err = String;

    fn from_str(s: &str) -> Result<Verdict, String> {
        let w: Vec<&str> = s.split_whitespace().collect();
        Ok(match w.as_slice() {
            ["accept"] => Verdict::Accept,
            ["drop"] => Verdict::Drop,
            ["return"] => Verdict::Return,
            ["goto", c] => Verdict::Goto(Arc::from(*c)),
            ["jump", c] => Verdict::Jump(Arc::from(*c)),
            _ => return Err(format!("{s:?} is not a verdict")),
        })
    }
}

/// A map element's value: data (`address . port`) or a verdict.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Value {
    Data(Key),
    Verdict(Verdict),
}

impl Value {
    /// `goto chain`.
    pub fn goto(chain: impl Into<Arc<str>>) -> Value {
        Value::Verdict(Verdict::Goto(chain.into()))
    }

    /// `jump chain`.
    pub fn jump(chain: impl Into<Arc<str>>) -> Value {
        Value::Verdict(Verdict::Jump(chain.into()))
    }

    /// The chain a verdict names, if any.
    pub fn chain(&self) -> Option<&str> {
        match self {
            Value::Verdict(v) => v.chain(),
            Value::Data(_) => None,
        }
    }
}

impl From<Verdict> for Value {
    fn from(v: Verdict) -> Value {
        Value::Verdict(v)
    }
}

impl From<Key> for Value {
    fn from(k: Key) -> Value {
        Value::Data(k)
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Data(k) => fmt::Display::fmt(k, f),
            Value::Verdict(v) => fmt::Display::fmt(v, f),
        }
    }
}

impl FromStr for Value {
    type Err = String;

    /// A verdict's text, else data's.
    fn from_str(s: &str) -> Result<Value, String> {
        match s.parse::<Verdict>() {
            Ok(v) => Ok(Value::Verdict(v)),
            Err(_) => Ok(Value::Data(s.parse()?)),
        }
    }
}

/// Whether `x`'s text is `s`, without making the text.
fn text_is(x: &impl fmt::Display, s: &str) -> bool {
    struct Rest<'a>(&'a str);
    impl fmt::Write for Rest<'_> {
        fn write_str(&mut self, chunk: &str) -> fmt::Result {
            match self.0.strip_prefix(chunk) {
                Some(rest) => {
                    self.0 = rest;
                    Ok(())
                }
                None => Err(fmt::Error),
            }
        }
    }
    let mut rest = Rest(s);
    fmt::write(&mut rest, format_args!("{x}")).is_ok() && rest.0.is_empty()
}

/// Compares nft's text (tests and tools: `key == "10.96.0.10 . tcp . 80"`).
macro_rules! text_eq {
    ($t:ty) => {
        impl PartialEq<str> for $t {
            fn eq(&self, other: &str) -> bool {
                text_is(self, other)
            }
        }

        impl PartialEq<&str> for $t {
            fn eq(&self, other: &&str) -> bool {
                text_is(self, other)
            }
        }

        impl PartialEq<String> for $t {
            fn eq(&self, other: &String) -> bool {
                text_is(self, other)
            }
        }
    };
}

text_eq!(Key);
text_eq!(Value);

/// nft's text of a key, for tests; panics on text that is not one.
#[cfg(test)]
pub(crate) fn k(s: &str) -> Key {
    s.parse().expect("a key's text")
}

/// nft's text of a map value, for tests; panics on text that is not one.
#[cfg(test)]
pub(crate) fn v(s: &str) -> Value {
    s.parse().expect("a value's text")
}

impl serde::Serialize for Key {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl serde::Serialize for Value {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// What one part of a set's key or a map's data is to the kernel, from the set's declaration
/// (how its bytes are encoded).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// An integer in host byte order (`typeof numgen random mod N`): 4 bytes.
    HostU32,
    Ipv4,
    Ipv6,
    /// `inet_service` / `th dport`: 2 bytes, network order.
    Port,
    /// `inet_proto`: 1 byte.
    Proto,
    /// `ifname`: the name, NUL-padded to `IFNAMSIZ` (16 bytes).
    Ifname,
}

impl Kind {
    /// The kinds of a key's declaration: type names (`ipv4_addr . inet_proto . inet_service`)
    /// or, after `typeof `, expressions (`typeof ip daddr . tcp dport . numgen random mod 2`);
    /// None when one is not a kind here.
    pub fn of_key(decl: &str) -> Option<Vec<Kind>> {
        match decl.strip_prefix("typeof ") {
            Some(expr) => Kind::of_exprs(expr),
            None => Kind::of_names(decl),
        }
    }

    /// The kinds of a map's data declaration (`ip daddr . tcp dport`, or type names).
    pub fn of_data(decl: &str) -> Option<Vec<Kind>> {
        Kind::of_exprs(decl).or_else(|| Kind::of_names(decl))
    }

    fn of_names(t: &str) -> Option<Vec<Kind>> {
        t.split(" . ")
            .map(|p| match p.trim() {
                "ipv4_addr" => Some(Kind::Ipv4),
                "ipv6_addr" => Some(Kind::Ipv6),
                "inet_service" => Some(Kind::Port),
                "inet_proto" => Some(Kind::Proto),
                "ifname" => Some(Kind::Ifname),
                _ => None,
            })
            .collect()
    }

    fn of_exprs(t: &str) -> Option<Vec<Kind>> {
        t.split(" . ")
            .map(|p| {
                let w: Vec<&str> = p.split_whitespace().collect();
                match w.as_slice() {
                    ["numgen", "random", "mod", _] | ["numgen", "inc", "mod", _] => {
                        Some(Kind::HostU32)
                    }
                    ["ip", "saddr" | "daddr"] => Some(Kind::Ipv4),
                    ["ip6", "saddr" | "daddr"] => Some(Kind::Ipv6),
                    ["tcp" | "udp" | "sctp" | "th", "sport" | "dport"] => Some(Kind::Port),
                    ["meta", "l4proto"] => Some(Kind::Proto),
                    _ => None,
                }
            })
            .collect()
    }
}

/// Shares chain names among the verdicts of one rendering (`goto pick-v4-tcp-10` for every
/// plain service with 10 endpoints).
#[derive(Debug, Default)]
pub struct Chains(std::collections::HashMap<String, Arc<str>>);

impl Chains {
    /// The shared name of `chain`.
    pub fn get(&mut self, chain: &str) -> Arc<str> {
        if let Some(c) = self.0.get(chain) {
            return c.clone();
        }
        let c: Arc<str> = Arc::from(chain);
        self.0.insert(chain.to_string(), c.clone());
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_reads_back_as_written() {
        for s in [
            "198.19.64.10 . tcp . 80",
            "fd00::10 . udp . 53",
            "198.18.0.5 . 198.18.0.5",
            "fd00::5 . fd00::5",
            "0",
            "70000",
            "10.0.0.0/8",
            "fd00::/64",
            "80-90",
            "\"veth1234\"",
            "tcp . 30080",
            "198.19.64.10 . 80 . 3",
            "47 . 1",
        ] {
            let k: Key = s.parse().unwrap();
            assert_eq!(k.to_string(), s);
        }
        for s in [
            "goto svc-a",
            "jump x",
            "accept",
            "drop",
            "return",
            "1.2.3.4 . 80",
        ] {
            assert_eq!(s.parse::<Value>().unwrap().to_string(), s);
        }
        assert!("not-an-address . 81".parse::<Key>().is_err());
        let k: Key = "10.96.0.10 . tcp . 80".parse().unwrap();
        assert!(k == "10.96.0.10 . tcp . 80" && k != "10.96.0.10 . tcp . 8" && k != "10.96.0.10");
        assert!("\"a-name-far-too-long\"".parse::<Key>().is_err());
    }

    #[test]
    fn parts_come_back_typed() {
        let k = Key::new([
            Part::addr(Ipv4Addr::new(10, 96, 0, 10)),
            Part::Proto(TCP),
            Part::port(80),
        ]);
        assert_eq!(
            k.parts().collect::<Vec<_>>(),
            [
                Part::Addr("10.96.0.10".parse().unwrap()),
                Part::Proto(6),
                Part::Int(80)
            ]
        );
        assert_eq!(k.len(), 3);
        let v6 = Key::new([Part::addr("fd00::1".parse::<IpAddr>().unwrap()); 2]);
        assert!(matches!(v6.0, Repr::Heap(_)));
        assert_eq!(v6.to_string(), "fd00::1 . fd00::1");
        assert_eq!(
            Part::net(&"10.0.0.1/32".parse().unwrap()).to_string(),
            "10.0.0.1"
        );
    }

    #[test]
    fn declarations_give_kinds() {
        use Kind::*;
        assert_eq!(
            Kind::of_key("ipv4_addr . inet_proto . inet_service"),
            Some(vec![Ipv4, Proto, Port])
        );
        assert_eq!(
            Kind::of_key("typeof ip6 daddr . udp dport . numgen random mod 2"),
            Some(vec![Ipv6, Port, HostU32])
        );
        assert_eq!(
            Kind::of_data("ip daddr . tcp dport"),
            Some(vec![Ipv4, Port])
        );
        assert_eq!(Kind::of_key("ether_addr"), None);
        assert_eq!(Kind::of_key("ifname . ipv4_addr"), Some(vec![Ifname, Ipv4]));
    }

    /// Elements stay small: they are most of a large node table.
    #[test]
    fn elements_are_compact() {
        assert!(std::mem::size_of::<Key>() <= 24);
        assert!(std::mem::size_of::<Value>() <= 32);
    }
}
