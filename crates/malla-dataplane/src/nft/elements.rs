//! Set and map element changes sent straight to the kernel over nfnetlink, as one atomic
//! batch. The `nft` command reads the table's chains and sets back from the kernel before
//! every command it runs: with 30k services that costs ~130 ms for a one-element change,
//! while the kernel's own work is well under a millisecond. The agent's incremental updates
//! that only add or delete elements go through here; everything else still goes through
//! [`crate::nft::cmd`] as text.
//!
//! Elements are the calculation's typed elements ([`malla_calc::nft::element`]: a key of
//! typed parts, a value of data or a verdict) with the set's [`Layout`], and encoded from
//! their parts as nft does (no text is parsed): each part of a concatenation padded to 4
//! bytes, integers of `typeof numgen …` in host byte order, addresses and ports in network
//! order. A set's own expressions (e.g. `counter`) are attached to new elements by the kernel.

use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

pub use malla_calc::nft::element::Kind;
use malla_calc::nft::element::{self, Key, Verdict};

use crate::netns::NetNs;
use crate::nft::NftError;

/// An interface name's bytes in a key (`IFNAMSIZ`).
const IFNAMSIZ: usize = 16;

/// The byte length of a part of `kind`.
fn kind_len(kind: Kind) -> usize {
    match kind {
        Kind::HostU32 | Kind::Ipv4 => 4,
        Kind::Ipv6 => 16,
        Kind::Port => 2,
        Kind::Proto => 1,
        Kind::Ifname => IFNAMSIZ,
    }
}

/// Appends the bytes of `part` as a part of `kind`.
fn encode_part(kind: Kind, part: element::Part, out: &mut Vec<u8>) -> Result<(), String> {
    use element::Part as P;
    let bad = |what: &str| format!("{part} is not {what}");
    match (kind, part) {
        (Kind::HostU32, P::Int(n)) => out.extend(n.to_ne_bytes()),
        (Kind::Ipv4, P::Addr(IpAddr::V4(a))) => out.extend(a.octets()),
        (Kind::Ipv6, P::Addr(IpAddr::V6(a))) => out.extend(a.octets()),
        (Kind::Port, P::Int(n)) => {
            out.extend(u16::try_from(n).map_err(|_| bad("a port"))?.to_be_bytes())
        }
        (Kind::Proto, P::Proto(p)) => out.push(p),
        (Kind::Proto, P::Int(n)) => out.push(u8::try_from(n).map_err(|_| bad("a protocol"))?),
        (Kind::Ifname, P::Iface(name)) => {
            let mut b = [0u8; IFNAMSIZ];
            b[..name.as_str().len()].copy_from_slice(name.as_str().as_bytes());
            out.extend(b);
        }
        (Kind::HostU32, _) => return Err(bad("an integer")),
        (Kind::Ipv4, _) => return Err(bad("an IPv4 address")),
        (Kind::Ipv6, _) => return Err(bad("an IPv6 address")),
        (Kind::Port, _) => return Err(bad("a port")),
        (Kind::Proto, _) => return Err(bad("a protocol")),
        (Kind::Ifname, _) => return Err(bad("an interface name")),
    }
    Ok(())
}

/// What a map's elements carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// A set: keys only.
    None,
    /// Data of these parts (`ip daddr . tcp dport`).
    Data(Vec<Kind>),
    /// A verdict (`goto CHAIN`, `jump CHAIN`, `accept`, `drop`, `return`).
    Verdict,
}

/// The type of a set or map's elements.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub key: Vec<Kind>,
    pub value: Value,
}

/// Encodes the parts of `key` (`a . b . c`) as nft does: one part alone is its bare bytes;
/// the parts of a concatenation are each padded to a 4-byte register.
fn encode_parts(kinds: &[Kind], key: &Key) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(kinds.len() * 4);
    let mut given = key.parts();
    for &kind in kinds {
        let p = given
            .next()
            .ok_or_else(|| format!("{key} does not have {} part(s)", kinds.len()))?;
        encode_part(kind, p, &mut out)?;
        if kinds.len() > 1 {
            out.resize(out.len() + (4 - kind_len(kind) % 4) % 4, 0);
        }
    }
    if given.next().is_some() {
        return Err(format!("{key} does not have {} part(s)", kinds.len()));
    }
    Ok(out)
}

/// An element to add or delete; `value` only for maps, and only when adding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Element {
    pub key: Key,
    pub value: Option<element::Value>,
    /// The end of an interval (an interval set's prefix is two elements: its first address,
    /// and the address after its last with this flag, as nft sends them).
    pub interval_end: bool,
}

impl Element {
    /// A set's element, or a map's key to delete.
    pub fn key(key: Key) -> Element {
        Element {
            key,
            value: None,
            interval_end: false,
        }
    }

    /// The two elements of an interval set's address or prefix `key` (one part): its first
    /// address, and the end (the address after its last). None for other keys, and for a
    /// prefix reaching the top of its address space (its end cannot be written; the caller
    /// falls back to text).
    pub fn interval(key: &Key) -> Option<[Element; 2]> {
        let mut parts = key.parts();
        let net = match (parts.next()?, parts.next()) {
            (element::Part::Addr(a), None) => ipnet::IpNet::from(a),
            (element::Part::Net(n), None) => n,
            _ => return None,
        };
        let end = match net.broadcast() {
            IpAddr::V4(b) => IpAddr::V4(u32::from(b).checked_add(1)?.into()),
            IpAddr::V6(b) => IpAddr::V6(u128::from(b).checked_add(1)?.into()),
        };
        Some([
            Element::key(Key::one(element::Part::addr(net.network()))),
            Element {
                key: Key::one(element::Part::addr(end)),
                value: None,
                interval_end: true,
            },
        ])
    }

    /// A map's element.
    pub fn pair(key: Key, value: element::Value) -> Element {
        Element {
            key,
            value: Some(value),
            interval_end: false,
        }
    }
}

/// Element changes to one set of a table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetChange {
    pub set: String,
    pub layout: Layout,
    pub delete: Vec<Element>,
    pub add: Vec<Element>,
}

impl SetChange {
    /// Gives map key `key` the value `value`; a key already there (`replaces`) is deleted
    /// first, in the same batch (the kernel refuses to add a key that is there).
    pub fn put(&mut self, key: &Key, value: &element::Value, replaces: bool) {
        if replaces {
            self.delete.push(Element::key(key.clone()));
        }
        self.add.push(Element::pair(key.clone(), value.clone()));
    }
}

/// Elements to add to one set, made one at a time as the batch is encoded: a node's first load
/// adds 300k elements at 30k services, which need not all exist at once (as text they did, and
/// were a third of the agent's peak memory).
pub struct LazyAdditions<'a> {
    pub set: String,
    pub layout: Layout,
    pub elements: Box<dyn Iterator<Item = Element> + 'a>,
}

// Netlink and nf_tables constants (linux/netlink.h, linux/netfilter/nfnetlink.h,
// linux/netfilter/nf_tables.h).
const NETLINK_NETFILTER: i32 = 12;
const SOL_NETLINK: i32 = 270;
const NETLINK_CAP_ACK: i32 = 10;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_CREATE: u16 = 0x400;
const NLMSG_ERROR: u16 = 0x2;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELSETELEM: u16 = 14;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_DATA: u16 = 2;
const NFTA_SET_ELEM_TIMEOUT: u16 = 4;
const NFTA_SET_ELEM_FLAGS: u16 = 3;
/// `NFT_SET_ELEM_INTERVAL_END`: the element ends an interval.
const NFT_SET_ELEM_INTERVAL_END: u32 = 1;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
const NFTA_VERDICT_CHAIN: u16 = 2;
const NLA_F_NESTED: u16 = 0x8000;
const NF_DROP: i32 = 0;
const NF_ACCEPT: i32 = 1;
const NFT_JUMP: i32 = -3;
const NFT_GOTO: i32 = -4;
const NFT_RETURN: i32 = -5;
/// Elements per message: the largest (IPv6 key, verdict with a long chain name) take ~200
/// bytes, and the list attribute's length must stay below 64 KiB.
const ELEMENTS_PER_MESSAGE: usize = 256;
/// `nfgenmsg.family` of an `inet` table.
pub const NFPROTO_INET: u8 = 1;

/// A netlink message under construction.
struct Msg {
    buf: Vec<u8>,
    nests: Vec<usize>,
}

impl Msg {
    fn new(kind: u16, flags: u16, seq: u32, family: u8, res_id: u16) -> Msg {
        let mut buf = Vec::with_capacity(256);
        buf.extend(0u32.to_ne_bytes()); // length, set by `finish`
        buf.extend(kind.to_ne_bytes());
        buf.extend(flags.to_ne_bytes());
        buf.extend(seq.to_ne_bytes());
        buf.extend(0u32.to_ne_bytes()); // port id: the kernel
        buf.push(family);
        buf.push(0); // NFNETLINK_V0
        buf.extend(res_id.to_be_bytes());
        Msg {
            buf,
            nests: Vec::new(),
        }
    }

    fn pad(&mut self) {
        let n = self.buf.len().next_multiple_of(4);
        self.buf.resize(n, 0);
    }

    fn attr(&mut self, kind: u16, data: &[u8]) {
        self.buf.extend(((4 + data.len()) as u16).to_ne_bytes());
        self.buf.extend(kind.to_ne_bytes());
        self.buf.extend(data);
        self.pad();
    }

    fn attr_str(&mut self, kind: u16, s: &str) {
        let mut d = s.as_bytes().to_vec();
        d.push(0);
        self.attr(kind, &d);
    }

    fn begin(&mut self, kind: u16) {
        self.nests.push(self.buf.len());
        self.buf.extend(0u16.to_ne_bytes());
        self.buf.extend((kind | NLA_F_NESTED).to_ne_bytes());
    }

    fn end(&mut self) {
        if let Some(at) = self.nests.pop() {
            let len = (self.buf.len() - at) as u16;
            self.buf[at..at + 2].copy_from_slice(&len.to_ne_bytes());
        }
    }

    fn finish(mut self) -> Vec<u8> {
        self.pad();
        let len = self.buf.len() as u32;
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf
    }
}

fn verdict(msg: &mut Msg, v: &Verdict) {
    let (code, chain) = match v {
        Verdict::Goto(c) => (NFT_GOTO, Some(c)),
        Verdict::Jump(c) => (NFT_JUMP, Some(c)),
        Verdict::Accept => (NF_ACCEPT, None),
        Verdict::Drop => (NF_DROP, None),
        Verdict::Return => (NFT_RETURN, None),
    };
    msg.begin(NFTA_DATA_VERDICT);
    msg.attr(NFTA_VERDICT_CODE, &code.to_be_bytes());
    if let Some(c) = chain {
        msg.attr_str(NFTA_VERDICT_CHAIN, c);
    }
    msg.end();
}

/// A batch under construction: its bytes, the next sequence number, the elements so far.
struct Batch {
    out: Vec<u8>,
    seq: u32,
    elements: usize,
    /// The timeout (ms) given to elements added next (sets with `flags timeout`).
    timeout_ms: Option<u64>,
}

/// An encoded batch, ready to send.
struct Encoded {
    bytes: Vec<u8>,
    /// The messages that will be acknowledged.
    acks: u32,
    elements: usize,
}

impl Batch {
    fn new() -> Batch {
        Batch {
            out: Msg::new(
                NFNL_MSG_BATCH_BEGIN,
                NLM_F_REQUEST,
                0,
                0,
                NFNL_SUBSYS_NFTABLES,
            )
            .finish(),
            seq: 1,
            elements: 0,
            timeout_ms: None,
        }
    }

    /// Appends the messages deleting (`add` false) or adding `elements` of `set`, a chunk
    /// of elements per message.
    fn push<E: std::borrow::Borrow<Element>>(
        &mut self,
        family: u8,
        table: &str,
        set: &str,
        layout: &Layout,
        add: bool,
        elements: impl Iterator<Item = E>,
    ) -> Result<(), String> {
        let timeout_ms = self.timeout_ms;
        let (kind, flags) = if add {
            (NFT_MSG_NEWSETELEM, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE)
        } else {
            (NFT_MSG_DELSETELEM, NLM_F_REQUEST | NLM_F_ACK)
        };
        let mut elements = elements.peekable();
        // A nested attribute's length is 16 bits: a message carries a chunk of elements.
        while elements.peek().is_some() {
            let mut m = Msg::new(
                (NFNL_SUBSYS_NFTABLES << 8) | kind,
                flags,
                self.seq,
                family,
                0,
            );
            self.seq += 1;
            m.attr_str(NFTA_SET_ELEM_LIST_TABLE, table);
            m.attr_str(NFTA_SET_ELEM_LIST_SET, set);
            m.begin(NFTA_SET_ELEM_LIST_ELEMENTS);
            for e in elements.by_ref().take(ELEMENTS_PER_MESSAGE) {
                let e = e.borrow();
                self.elements += 1;
                let key =
                    encode_parts(&layout.key, &e.key).map_err(|err| format!("{set} key: {err}"))?;
                m.begin(NFTA_LIST_ELEM);
                if e.interval_end {
                    m.attr(
                        NFTA_SET_ELEM_FLAGS,
                        &NFT_SET_ELEM_INTERVAL_END.to_be_bytes(),
                    );
                }
                m.begin(NFTA_SET_ELEM_KEY);
                m.attr(NFTA_DATA_VALUE, &key);
                m.end();
                if let (true, Some(t)) = (add, timeout_ms) {
                    m.attr(NFTA_SET_ELEM_TIMEOUT, &t.to_be_bytes());
                }
                if add {
                    match (&layout.value, &e.value) {
                        (Value::None, _) => {}
                        (Value::Data(parts), Some(element::Value::Data(v))) => {
                            let data = encode_parts(parts, v)
                                .map_err(|err| format!("{set} value: {err}"))?;
                            m.begin(NFTA_SET_ELEM_DATA);
                            m.attr(NFTA_DATA_VALUE, &data);
                            m.end();
                        }
                        (Value::Verdict, Some(element::Value::Verdict(v))) => {
                            m.begin(NFTA_SET_ELEM_DATA);
                            verdict(&mut m, v);
                            m.end();
                        }
                        (Value::Data(_), Some(v)) => {
                            return Err(format!("{set} value: {v} is not data"))
                        }
                        (Value::Verdict, Some(v)) => {
                            return Err(format!("{set} value: {v} is not a verdict"))
                        }
                        (_, None) => return Err(format!("{set}: element {} needs a value", e.key)),
                    }
                }
                m.end();
            }
            m.end();
            self.out.extend(m.finish());
        }
        Ok(())
    }

    fn finish(mut self) -> Encoded {
        let acks = self.seq - 1;
        self.out.extend(
            Msg::new(
                NFNL_MSG_BATCH_END,
                NLM_F_REQUEST,
                self.seq,
                0,
                NFNL_SUBSYS_NFTABLES,
            )
            .finish(),
        );
        Encoded {
            bytes: self.out,
            acks,
            elements: self.elements,
        }
    }
}

/// The batch's messages: begin, one per set and direction (deletes first), then the lazy
/// additions, end.
fn encode(
    family: u8,
    table: &str,
    changes: &[SetChange],
    lazy: Vec<LazyAdditions<'_>>,
) -> Result<Encoded, String> {
    let mut b = Batch::new();
    for c in changes {
        b.push(family, table, &c.set, &c.layout, false, c.delete.iter())?;
        b.push(family, table, &c.set, &c.layout, true, c.add.iter())?;
    }
    for l in lazy {
        b.push(family, table, &l.set, &l.layout, true, l.elements)?;
    }
    Ok(b.finish())
}

/// Sends the changes to `table` (of `family`) as one transaction, inside `netns` when given:
/// all of them apply or none does. Deleting an element that is not there fails the batch, as
/// does adding one that is (with a different value). Opens a socket for this one batch: see
/// [`ElementSocket`] for a caller that sends again.
pub fn apply(
    netns: Option<&NetNs>,
    family: u8,
    table: &str,
    changes: &[SetChange],
) -> Result<(), NftError> {
    apply_lazy(netns, family, table, changes, Vec::new()).map(|_| ())
}

/// [`apply`] with additions made as they are encoded, in the same transaction; returns how
/// many elements the batch carried.
pub fn apply_lazy(
    netns: Option<&NetNs>,
    family: u8,
    table: &str,
    changes: &[SetChange],
    lazy: Vec<LazyAdditions<'_>>,
) -> Result<usize, NftError> {
    let batch = encode(family, table, changes, lazy).map_err(NftError::Rejected)?;
    let elements = batch.elements;
    ElementSocket::open(netns)
        .map_err(NftError::Spawn)?
        .send(table, batch)?;
    Ok(elements)
}

/// A netfilter netlink socket kept open across batches. Closing one after a batch that
/// deleted elements waits for the kernel to free them (an RCU grace period, 10–20 ms), so a
/// caller sending changes again and again keeps its socket. After an error, drop it and open
/// another.
pub struct ElementSocket {
    fd: OwnedFd,
}

impl ElementSocket {
    /// A socket in `netns` (the caller's namespace when None).
    pub fn open(netns: Option<&NetNs>) -> std::io::Result<Self> {
        let fd = match netns {
            Some(ns) => {
                let ns = ns.file().try_clone()?;
                std::thread::scope(|s| {
                    s.spawn(move || {
                        // SAFETY: setns on this short-lived thread only; the socket keeps the
                        // namespace.
                        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                        socket()
                    })
                    .join()
                    .unwrap_or_else(|_| Err(std::io::Error::other("netlink thread panicked")))
                })
            }
            None => socket(),
        }?;
        Ok(Self { fd })
    }

    /// Sends the changes as one transaction (see [`apply`]).
    pub fn apply(&self, family: u8, table: &str, changes: &[SetChange]) -> Result<(), NftError> {
        let batch = encode(family, table, changes, Vec::new()).map_err(NftError::Rejected)?;
        self.send(table, batch)
    }

    /// Adds `elements` to set `set` (of a `flags timeout` set) as one transaction, each group
    /// with its own timeout in milliseconds; an element already there takes the new timeout
    /// (the kernel updates it). DNS-learned addresses go this way.
    pub fn add_with_timeouts(
        &self,
        family: u8,
        table: &str,
        layout: &Layout,
        groups: &[(&str, u64, Vec<Element>)],
    ) -> Result<(), NftError> {
        let mut b = Batch::new();
        for (set, timeout_ms, elements) in groups {
            b.timeout_ms = Some(*timeout_ms);
            b.push(family, table, set, layout, true, elements.iter())
                .map_err(NftError::Rejected)?;
        }
        self.send(table, b.finish())
    }

    /// Sends an encoded batch and waits for every acknowledgement.
    fn send(&self, table: &str, batch: Encoded) -> Result<(), NftError> {
        let Encoded {
            bytes: batch, acks, ..
        } = batch;
        if acks == 0 {
            return Ok(());
        }
        let sock = &self.fd;
        self.drain();
        // The batch goes in one send, and every message's ack must fit the receive queue.
        sockopt(
            sock,
            libc::SOL_SOCKET,
            libc::SO_SNDBUFFORCE,
            batch.len() + 65536,
        )
        .and_then(|_| {
            sockopt(
                sock,
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                (acks as usize).saturating_mul(1024).max(1 << 20),
            )
        })
        .map_err(NftError::Spawn)?;
        // SAFETY: plain send/recv on a socket we own, with buffers of the lengths given.
        let sent = unsafe { libc::send(sock.as_raw_fd(), batch.as_ptr().cast(), batch.len(), 0) };
        if sent < 0 || sent as usize != batch.len() {
            return Err(NftError::Spawn(std::io::Error::last_os_error()));
        }
        let mut buf = vec![0u8; 64 * 1024];
        let mut pending = acks;
        let mut failures = Vec::new();
        while pending > 0 {
            let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(NftError::Spawn(std::io::Error::last_os_error()));
            }
            let mut at = 0usize;
            let n = n as usize;
            while at + 16 <= n {
                let len =
                    u32::from_ne_bytes(buf[at..at + 4].try_into().unwrap_or_default()) as usize;
                let kind = u16::from_ne_bytes(buf[at + 4..at + 6].try_into().unwrap_or_default());
                let seq = u32::from_ne_bytes(buf[at + 8..at + 12].try_into().unwrap_or_default());
                if len < 16 || at + len > n {
                    break;
                }
                if kind == NLMSG_ERROR && len >= 20 {
                    let errno =
                        i32::from_ne_bytes(buf[at + 16..at + 20].try_into().unwrap_or_default());
                    if errno != 0 {
                        failures.push(format!(
                            "message {seq}: {}",
                            std::io::Error::from_raw_os_error(-errno)
                        ));
                    }
                    pending = pending.saturating_sub(1);
                }
                at += len.next_multiple_of(4);
            }
        }
        if failures.is_empty() {
            Ok(())
        } else {
            Err(NftError::Rejected(format!(
                "element changes to {table}: {}",
                failures.join("; ")
            )))
        }
    }

    /// Discards anything left in the receive queue (acks of an earlier batch that failed
    /// half-way), so the next batch counts only its own.
    fn drain(&self) {
        let mut buf = [0u8; 4096];
        // SAFETY: recv into a buffer of the length given, without waiting.
        while unsafe {
            libc::recv(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        } > 0
        {}
    }
}

/// A netfilter netlink socket (nf_tables, ctnetlink) in the caller's namespace, answers waited
/// for at most 5 s.
pub fn socket() -> std::io::Result<OwnedFd> {
    // SAFETY: socket(2) returns a new descriptor we take ownership of, or -1.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            NETLINK_NETFILTER,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // Every answer comes at once; never wait forever for one that does not.
    let timeout = libc::timeval {
        tv_sec: 5,
        tv_usec: 0,
    };
    // SAFETY: setsockopt with a timeval of the size given.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&timeout as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // Acks carry only the request's header, not the whole request back.
    sockopt(&fd, SOL_NETLINK, NETLINK_CAP_ACK, 1)?;
    Ok(fd)
}

/// Sets an integer socket option.
fn sockopt(fd: &OwnedFd, level: i32, name: i32, value: usize) -> std::io::Result<()> {
    let v = i32::try_from(value).unwrap_or(i32::MAX);
    // SAFETY: setsockopt with an int of the size given.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&v as *const i32).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests;
