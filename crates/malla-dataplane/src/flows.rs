//! Flow collection from the kernel, in the calling thread's namespace: conntrack events (NEW and
//! DESTROY, with packets and bytes each way once [`enable_accounting`] turned the namespace's
//! `nf_conntrack_acct` on) and the NFLOG samples of the ruleset's verdict points
//! ([`malla_calc::policy::flowlog`]), read from two raw nfnetlink sockets and delivered as
//! [`malla_flows::KernelEvent`]s.
//!
//! Pace: the reader wakes at most every [`READ_PACE`] and then reads everything queued, so a
//! busy node's agent is woken a few hundred times a second, not once per connection. Every
//! [`DUMP_EVERY`] it reads the counters of the connections still open ([`Refresh`]: none, a
//! GET for each of a few, or a dump of the table), which spreads a long connection's bytes
//! over the windows it lasts.
//!
//! Order: the kernel queues an allow sample (forward hook) before the conntrack NEW of the
//! same connection (confirmation, later on the packet's path); [`Collector::run`] reads a
//! batch of conntrack events, then drains the NFLOG socket, then delivers the samples before
//! the events, so a NEW never overtakes its samples.
//!
//! Loss, delivered as [`KernelEvent::Lost`] with its reason:
//! - `overrun`: NFLOG numbers its samples (`NFULA_SEQ`): a gap is that many samples lost. A
//!   conntrack socket overrun (`ENOBUFS`) loses an unknown number of events: it counts as one.
//! - `rate-limit`: what the deny log points did not log because of their limit goes through the
//!   ruleset's lost chains ([`malla_calc::policy::flowlog::LOST_CHAINS`]), each with a
//!   `counter`; the collector reads those counters every second (an nftables rule dump of the
//!   two chains, [`LOST_EVERY`]) and delivers what they grew by.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use malla_calc::policy::flowlog::LogPoint;
use malla_flows::{ConnEvent, Counters, KernelEvent, LogSample, LostReason, Phase, Tuple};

const NETLINK_NETFILTER: libc::c_int = 12;
const SOL_NETLINK: libc::c_int = 270;
const NETLINK_ADD_MEMBERSHIP: libc::c_int = 1;
const NFNLGRP_CONNTRACK_NEW: u32 = 1;
const NFNLGRP_CONNTRACK_DESTROY: u32 = 3;
const SUBSYS_CTNETLINK: u16 = 1;
const SUBSYS_ULOG: u16 = 4;
const SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_GETRULE: u16 = 7;
const NFPROTO_INET: u8 = 1;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLA_TYPE_MASK: u16 = 0x3fff;

/// Errors opening the collector's sockets.
#[derive(Debug, thiserror::Error)]
pub enum FlowsError {
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        source: io::Error,
    },
    #[error("binding NFLOG group {group}: the kernel answered errno {errno}")]
    Bind { group: u16, errno: i32 },
}

fn io_err(what: &'static str) -> impl FnOnce(io::Error) -> FlowsError {
    move |source| FlowsError::Io { what, source }
}

/// Turns conntrack accounting on in the calling thread's namespace (it is per namespace), so
/// that DESTROY events carry packets and bytes.
pub fn enable_accounting() -> io::Result<()> {
    crate::sysctl::set("net.netfilter.nf_conntrack_acct", "1")
}

fn netlink_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the fd is owned right away.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            NETLINK_NETFILTER,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a new, valid descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: a zeroed sockaddr_nl is valid; bind(2) with its size.
    let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    sa.nl_family = libc::AF_NETLINK as u16;
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            &sa as *const libc::sockaddr_nl as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // A large receive buffer absorbs bursts; forcing it needs CAP_NET_ADMIN, else the
    // ordinary limit applies.
    let size: libc::c_int = 8 << 20;
    for opt in [libc::SO_RCVBUFFORCE, libc::SO_RCVBUF] {
        // SAFETY: setsockopt(2) with an int option.
        let r = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                &size as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as u32,
            )
        };
        if r == 0 {
            break;
        }
    }
    Ok(fd)
}

fn put_attr(buf: &mut Vec<u8>, ty: u16, payload: &[u8]) {
    let len = 4 + payload.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(payload);
    while !buf.len().is_multiple_of(4) {
        buf.push(0);
    }
}

/// An NFLOG configuration request for `group` with one attribute.
fn nflog_config(group: u16, seq: u32, ty: u16, payload: &[u8]) -> Vec<u8> {
    let mut m = vec![0u8; 16];
    m.extend_from_slice(&[libc::AF_UNSPEC as u8, 0]);
    m.extend_from_slice(&group.to_be_bytes());
    put_attr(&mut m, ty, payload);
    let len = m.len() as u32;
    m[0..4].copy_from_slice(&len.to_ne_bytes());
    m[4..6].copy_from_slice(&((SUBSYS_ULOG << 8) | 1).to_ne_bytes());
    m[6..8].copy_from_slice(&((libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16).to_ne_bytes());
    m[8..12].copy_from_slice(&seq.to_ne_bytes());
    m
}

/// Sends `msg` and waits for its acknowledgement; the errno the kernel answered, 0 for success.
fn request(fd: &OwnedFd, msg: &[u8]) -> io::Result<i32> {
    // SAFETY: send(2) of a buffer we own.
    let r = unsafe { libc::send(fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = vec![0u8; 8192];
    loop {
        let mut p = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll(2) on one descriptor.
        if unsafe { libc::poll(&mut p, 1, 2000) } <= 0 {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no answer from the kernel",
            ));
        }
        let n = recv(fd, &mut buf)?;
        for (ty, _, body) in messages(&buf[..n]) {
            if ty == NLMSG_ERROR && body.len() >= 4 {
                let code = i32::from_ne_bytes([body[0], body[1], body[2], body[3]]);
                return Ok(-code);
            }
        }
    }
}

fn recv(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: recv(2) into a buffer we own.
    let r = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r as usize)
}

/// The netlink messages of a datagram: (type, flags, body after the header). Malformed
/// lengths end the walk.
fn messages(mut b: &[u8]) -> Vec<(u16, u16, &[u8])> {
    let mut out = Vec::new();
    while b.len() >= 16 {
        let len = u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as usize;
        if len < 16 || len > b.len() {
            break;
        }
        let ty = u16::from_ne_bytes([b[4], b[5]]);
        let flags = u16::from_ne_bytes([b[6], b[7]]);
        out.push((ty, flags, &b[16..len]));
        b = &b[len.next_multiple_of(4).min(b.len())..];
    }
    out
}

/// The attributes of a body: (type without flags, payload).
fn attrs(mut b: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while b.len() >= 4 {
        let len = u16::from_ne_bytes([b[0], b[1]]) as usize;
        if len < 4 || len > b.len() {
            break;
        }
        let ty = u16::from_ne_bytes([b[2], b[3]]) & NLA_TYPE_MASK;
        out.push((ty, &b[4..len]));
        b = &b[len.next_multiple_of(4).min(b.len())..];
    }
    out
}

fn attr<'a>(list: &[(u16, &'a [u8])], ty: u16) -> Option<&'a [u8]> {
    list.iter().find(|(t, _)| *t == ty).map(|(_, p)| *p)
}

fn be16(p: &[u8]) -> Option<u16> {
    Some(u16::from_be_bytes(p.get(..2)?.try_into().ok()?))
}

fn be32(p: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(p.get(..4)?.try_into().ok()?))
}

fn be64(p: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(p.get(..8)?.try_into().ok()?))
}

fn addr(p: &[u8]) -> Option<IpAddr> {
    match p.len() {
        4 => Some(IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(p).ok()?))),
        16 => Some(IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(p).ok()?))),
        _ => None,
    }
}

/// A `CTA_TUPLE_*` nest.
fn ct_tuple(p: &[u8]) -> Option<Tuple> {
    let a = attrs(p);
    let ip = attrs(attr(&a, 1)?);
    let proto = attrs(attr(&a, 2)?);
    let (src, dst) = match (attr(&ip, 1), attr(&ip, 2)) {
        (Some(s), Some(d)) => (addr(s)?, addr(d)?),
        _ => (addr(attr(&ip, 3)?)?, addr(attr(&ip, 4)?)?),
    };
    Some(Tuple {
        proto: *attr(&proto, 1)?.first()?,
        src,
        dst,
        sport: attr(&proto, 2).and_then(be16).unwrap_or(0),
        dport: attr(&proto, 3).and_then(be16).unwrap_or(0),
    })
}

fn ct_counters(p: &[u8]) -> Option<Counters> {
    let a = attrs(p);
    Some(Counters {
        packets: be64(attr(&a, 1)?)?,
        bytes: be64(attr(&a, 2)?)?,
    })
}

/// The (original, reply) tuples of a conntrack attribute list.
fn ct_tuples(a: &[(u16, &[u8])]) -> Option<(Tuple, Tuple)> {
    Some((ct_tuple(attr(a, 1)?)?, ct_tuple(attr(a, 2)?)?))
}

/// A conntrack event message (after the netlink header).
pub fn parse_ct_event(ty: u16, body: &[u8]) -> Option<ConnEvent> {
    let phase = match ty {
        t if t == SUBSYS_CTNETLINK << 8 => Phase::New,
        t if t == (SUBSYS_CTNETLINK << 8) | 2 => Phase::Destroy,
        _ => return None,
    };
    ct_entry(phase, body)
}

/// A conntrack entry (event or dump reply) after the netlink header. `closed` from the TCP
/// state (`CTA_PROTOINFO` / `CTA_PROTOINFO_TCP` / `CTA_PROTOINFO_TCP_STATE`: `TIME_WAIT` 7,
/// `CLOSE` 8).
fn ct_entry(phase: Phase, body: &[u8]) -> Option<ConnEvent> {
    let a = attrs(body.get(4..)?);
    let (orig, reply) = ct_tuples(&a)?;
    let tcp_state = attr(&a, 4)
        .and_then(|p| attr(&attrs(p), 1).map(attrs))
        .and_then(|t| attr(&t, 1).and_then(|s| s.first().copied()));
    Some(ConnEvent {
        phase,
        orig,
        reply,
        orig_counters: attr(&a, 9).and_then(ct_counters),
        reply_counters: attr(&a, 10).and_then(ct_counters),
        closed: matches!(tcp_state, Some(7 | 8)),
    })
}

/// How often the collector reads every entry's counters ([`Phase::Update`]).
pub const DUMP_EVERY: std::time::Duration = std::time::Duration::from_secs(3);

/// A request for every conntrack entry of both families.
fn dump_request(seq: u32) -> Vec<u8> {
    let mut m = vec![0u8; 16];
    m.extend_from_slice(&[libc::AF_UNSPEC as u8, 0, 0, 0]);
    let len = m.len() as u32;
    m[0..4].copy_from_slice(&len.to_ne_bytes());
    m[4..6].copy_from_slice(&((SUBSYS_CTNETLINK << 8) | 1).to_ne_bytes());
    m[6..8].copy_from_slice(&((libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16).to_ne_bytes());
    m[8..12].copy_from_slice(&seq.to_ne_bytes());
    m
}

/// Reads every conntrack entry (non-loopback) as [`Phase::Update`] events.
fn dump(fd: &OwnedFd, seq: u32, buf: &mut [u8], out: &mut Vec<KernelEvent>) -> io::Result<()> {
    let msg = dump_request(seq);
    // SAFETY: send(2) of a buffer we own.
    if unsafe { libc::send(fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut done = false;
    read_answers(fd, std::time::Duration::from_secs(2), buf, |ty, body| {
        match ty {
            NLMSG_DONE | NLMSG_ERROR => done = true,
            t if t == SUBSYS_CTNETLINK << 8 => {
                if let Some(ev) = ct_entry(Phase::Update, body) {
                    if !loopback(&ev.orig) {
                        out.push(KernelEvent::Conn(ev));
                    }
                }
            }
            _ => {}
        }
        done
    })
}

/// Reads the answers to requests sent on `fd` for at most `within`, handing each message
/// (type, body) to `take` until it says they are all in.
fn read_answers(
    fd: &OwnedFd,
    within: std::time::Duration,
    buf: &mut [u8],
    mut take: impl FnMut(u16, &[u8]) -> bool,
) -> io::Result<()> {
    let deadline = std::time::Instant::now() + within;
    while std::time::Instant::now() < deadline {
        let mut p = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll(2) on one descriptor.
        if unsafe { libc::poll(&mut p, 1, 200) } <= 0 {
            continue;
        }
        let n = match recv(fd, buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        for (ty, _, body) in messages(&buf[..n]) {
            if take(ty, body) {
                return Ok(());
            }
        }
    }
    Ok(())
}

/// How often the collector reads the lost chains' counters.
pub const LOST_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// A request for the rules of chain `chain` of table `inet table`.
fn rules_request(seq: u32, table: &str, chain: &str) -> Vec<u8> {
    let mut m = vec![0u8; 16];
    m.extend_from_slice(&[NFPROTO_INET, 0, 0, 0]);
    for (ty, name) in [(1u16, table), (2, chain)] {
        let mut z = name.as_bytes().to_vec();
        z.push(0);
        put_attr(&mut m, ty, &z);
    }
    let len = m.len() as u32;
    m[0..4].copy_from_slice(&len.to_ne_bytes());
    m[4..6].copy_from_slice(&((SUBSYS_NFTABLES << 8) | NFT_MSG_GETRULE).to_ne_bytes());
    m[6..8].copy_from_slice(&((libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16).to_ne_bytes());
    m[8..12].copy_from_slice(&seq.to_ne_bytes());
    m
}

/// The packets of the `counter` expressions of a rule message (after the netlink header):
/// `NFTA_RULE_EXPRESSIONS` / `NFTA_LIST_ELEM` / `NFTA_EXPR_NAME` "counter", `NFTA_EXPR_DATA` /
/// `NFTA_COUNTER_PACKETS`.
pub fn rule_counter_packets(body: &[u8]) -> u64 {
    let Some(a) = body.get(4..).map(attrs) else {
        return 0;
    };
    let Some(exprs) = attr(&a, 4) else {
        return 0;
    };
    attrs(exprs)
        .into_iter()
        .filter(|(t, _)| *t == 1)
        .map(|(_, e)| attrs(e))
        .filter(|e| attr(e, 1).is_some_and(|n| n.strip_suffix(b"\0").unwrap_or(n) == b"counter"))
        .filter_map(|e| attr(&e, 2).and_then(|d| attr(&attrs(d), 2)).and_then(be64))
        .sum()
}

/// The packets the counters of chain `chain` of `inet table` counted: None when the chain or
/// table is not there (or the kernel did not answer in time).
fn chain_packets(
    fd: &OwnedFd,
    seq: u32,
    table: &str,
    chain: &str,
    buf: &mut [u8],
) -> io::Result<Option<u64>> {
    let msg = rules_request(seq, table, chain);
    // SAFETY: send(2) of a buffer we own.
    if unsafe { libc::send(fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut total = 0u64;
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(500);
    while std::time::Instant::now() < deadline {
        let mut p = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll(2) on one descriptor.
        if unsafe { libc::poll(&mut p, 1, 100) } <= 0 {
            continue;
        }
        let n = match recv(fd, buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        // A datagram answers one request: one with another sequence number answered an
        // earlier request that timed out.
        if n < 12 || u32::from_ne_bytes([buf[8], buf[9], buf[10], buf[11]]) != seq {
            continue;
        }
        for (ty, _, body) in messages(&buf[..n]) {
            match ty {
                NLMSG_DONE => return Ok(Some(total)),
                NLMSG_ERROR => return Ok(None),
                t if t == (SUBSYS_NFTABLES << 8) | NFT_MSG_NEWRULE => {
                    total += rule_counter_packets(body);
                }
                _ => {}
            }
        }
    }
    Ok(None)
}

/// The addresses and ports of an IP packet (from its network header).
fn packet_tuple(p: &[u8]) -> Option<Tuple> {
    let (proto, src, dst, l4) = match p.first()? >> 4 {
        4 => {
            let ihl = usize::from(p.first()? & 0x0f) * 4;
            (
                *p.get(9)?,
                addr(p.get(12..16)?)?,
                addr(p.get(16..20)?)?,
                p.get(ihl..).unwrap_or(&[]),
            )
        }
        6 => (
            *p.get(6)?,
            addr(p.get(8..24)?)?,
            addr(p.get(24..40)?)?,
            p.get(40..).unwrap_or(&[]),
        ),
        _ => return None,
    };
    let ports = matches!(proto, 6 | 17 | 132);
    Some(Tuple {
        proto,
        src,
        dst,
        sport: if ports { be16(l4).unwrap_or(0) } else { 0 },
        dport: if ports {
            l4.get(2..).and_then(be16).unwrap_or(0)
        } else {
            0
        },
    })
}

/// An NFLOG packet message (after the netlink header): the sample and its sequence number.
/// None for another message or a prefix that is not Malla's.
pub fn parse_nflog(ty: u16, body: &[u8]) -> Option<(LogSample, Option<u32>)> {
    if ty != SUBSYS_ULOG << 8 {
        return None;
    }
    let a = attrs(body.get(4..)?);
    let prefix = attr(&a, 10)?;
    let prefix = std::str::from_utf8(prefix).ok()?.trim_end_matches('\0');
    let point = LogPoint::parse(prefix)?;
    let seq = attr(&a, 12).and_then(be32);
    let ct = attr(&a, 18).and_then(|c| ct_tuples(&attrs(c)));
    let (orig, reply) = match ct {
        Some((o, r)) => (o, Some(r)),
        None => (packet_tuple(attr(&a, 9)?)?, None),
    };
    Some((LogSample { point, orig, reply }, seq))
}

/// Whose counters the collector reads every [`DUMP_EVERY`] ([`Collector::run_refreshing`]):
/// the aggregator knows which connections are still open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refresh {
    /// No connection open: nothing is read.
    Nothing,
    /// These connections' entries, one GET each: cheaper than a dump when few are open, since
    /// the table also holds every closed connection (TIME_WAIT lasts two minutes).
    Tuples(Vec<Tuple>),
    /// Every entry (a dump).
    All,
}

/// The most connections [`Refresh::Tuples`] asks for one by one; more take a dump.
pub const GET_AT_MOST: usize = 128;

/// A conntrack GET of the entry whose original tuple is `t` (TCP, UDP and SCTP: ports name
/// it); None for other protocols.
fn get_request(seq: u32, t: &Tuple) -> Option<Vec<u8>> {
    if !matches!(t.proto, 6 | 17 | 132) {
        return None;
    }
    const NESTED: u16 = 0x8000;
    let mut ip = Vec::new();
    let family = match (t.src, t.dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            put_attr(&mut ip, 1, &s.octets());
            put_attr(&mut ip, 2, &d.octets());
            libc::AF_INET
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            put_attr(&mut ip, 3, &s.octets());
            put_attr(&mut ip, 4, &d.octets());
            libc::AF_INET6
        }
        _ => return None,
    };
    let mut proto = Vec::new();
    put_attr(&mut proto, 1, &[t.proto]);
    put_attr(&mut proto, 2, &t.sport.to_be_bytes());
    put_attr(&mut proto, 3, &t.dport.to_be_bytes());
    let mut tuple = Vec::new();
    put_attr(&mut tuple, 1 | NESTED, &ip);
    put_attr(&mut tuple, 2 | NESTED, &proto);
    let mut m = vec![0u8; 16];
    m.extend_from_slice(&[family as u8, 0, 0, 0]);
    put_attr(&mut m, 1 | NESTED, &tuple);
    let len = m.len() as u32;
    m[0..4].copy_from_slice(&len.to_ne_bytes());
    m[4..6].copy_from_slice(&((SUBSYS_CTNETLINK << 8) | 1).to_ne_bytes());
    m[6..8].copy_from_slice(&(libc::NLM_F_REQUEST as u16).to_ne_bytes());
    m[8..12].copy_from_slice(&seq.to_ne_bytes());
    Some(m)
}

/// Reads the entries of `tuples` as [`Phase::Update`] events (a connection already gone
/// answers ENOENT and yields nothing).
fn get_each(
    fd: &OwnedFd,
    seq: u32,
    tuples: &[Tuple],
    buf: &mut [u8],
    out: &mut Vec<KernelEvent>,
) -> io::Result<()> {
    let mut asked = 0usize;
    for t in tuples {
        let Some(msg) = get_request(seq, t) else {
            continue;
        };
        // SAFETY: send(2) of a buffer we own.
        if unsafe { libc::send(fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) } < 0 {
            return Err(io::Error::last_os_error());
        }
        asked += 1;
    }
    let mut answered = 0usize;
    if asked == 0 {
        return Ok(());
    }
    read_answers(fd, std::time::Duration::from_secs(1), buf, |ty, body| {
        match ty {
            NLMSG_ERROR => answered += 1,
            t if t == SUBSYS_CTNETLINK << 8 => {
                answered += 1;
                if let Some(ev) = ct_entry(Phase::Update, body) {
                    out.push(KernelEvent::Conn(ev));
                }
            }
            _ => {}
        }
        answered >= asked
    })
}

/// The reader wakes at most once per this long: between wake-ups the kernel queues events
/// (the sockets' 8 MiB buffers hold ~8000 connections' worth at the most), so a busy node's
/// agent is not woken once per new connection.
pub const READ_PACE: std::time::Duration = std::time::Duration::from_millis(5);

/// The most conntrack messages read per wake-up (before the NFLOG socket is drained).
const CT_READS_PER_WAKE: usize = 8192;

/// The sockets, open in one namespace.
pub struct Collector {
    ct: OwnedFd,
    log: OwnedFd,
    dump: OwnedFd,
    /// nftables requests: the lost chains' counters.
    nft: OwnedFd,
    last_seq: Option<u32>,
    /// The lost chains' counters at the last reading (None before the first).
    lost_seen: Option<u64>,
}

fn loopback(t: &Tuple) -> bool {
    t.src.is_loopback() || t.dst.is_loopback()
}

impl Collector {
    /// Opens both sockets in the calling thread's namespace and binds NFLOG group `group`
    /// (copying 128 bytes of each packet, with sequence numbers and the conntrack entry).
    pub fn open(group: u16) -> Result<Self, FlowsError> {
        let ct = netlink_socket().map_err(io_err("opening the conntrack events socket"))?;
        for g in [NFNLGRP_CONNTRACK_NEW, NFNLGRP_CONNTRACK_DESTROY] {
            // SAFETY: setsockopt(2) with a u32 group number.
            let r = unsafe {
                libc::setsockopt(
                    ct.as_raw_fd(),
                    SOL_NETLINK,
                    NETLINK_ADD_MEMBERSHIP,
                    &g as *const u32 as *const libc::c_void,
                    4,
                )
            };
            if r < 0 {
                return Err(FlowsError::Io {
                    what: "subscribing to conntrack events",
                    source: io::Error::last_os_error(),
                });
            }
        }
        let log = netlink_socket().map_err(io_err("opening the NFLOG socket"))?;
        let copy_range: u32 = 128;
        let mut mode = copy_range.to_be_bytes().to_vec();
        mode.extend_from_slice(&[2, 0]); // NFULNL_COPY_PACKET
        let flags: u16 = 0x1 | 0x2; // NFULNL_CFG_F_SEQ | NFULNL_CFG_F_CONNTRACK
                                    // Each sample is sent at once (the default batches 100 samples or one second), so
                                    // that it is queued before its connection's NEW.
        let steps: [(u16, Vec<u8>); 4] = [
            (1, vec![1]),                      // NFULA_CFG_CMD: NFULNL_CFG_CMD_BIND
            (2, mode),                         // NFULA_CFG_MODE
            (5, 1u32.to_be_bytes().to_vec()),  // NFULA_CFG_QTHRESH
            (6, flags.to_be_bytes().to_vec()), // NFULA_CFG_FLAGS
        ];
        for (i, (ty, payload)) in steps.iter().enumerate() {
            let msg = nflog_config(group, i as u32 + 1, *ty, payload);
            let errno = request(&log, &msg).map_err(io_err("configuring NFLOG"))?;
            if errno != 0 {
                return Err(FlowsError::Bind { group, errno });
            }
        }
        let dump = netlink_socket().map_err(io_err("opening the conntrack dump socket"))?;
        let nft = netlink_socket().map_err(io_err("opening the nftables socket"))?;
        let mut c = Collector {
            ct,
            log,
            dump,
            nft,
            last_seq: None,
            lost_seen: None,
        };
        // The base reading: from now on, what the lost chains count is delivered.
        c.read_lost(0, &mut vec![0u8; 1 << 16], &mut Vec::new());
        Ok(c)
    }

    /// Reads the lost chains' counters and delivers what they grew by since the last reading
    /// (the first reading is the base: what was lost before the agent started is not its). A
    /// chain missing counts 0; counters that went down (the table was replaced) grew from 0.
    fn read_lost(&mut self, seq: u32, buf: &mut [u8], out: &mut Vec<KernelEvent>) {
        let mut now = 0u64;
        for chain in malla_calc::policy::flowlog::LOST_CHAINS {
            match chain_packets(&self.nft, seq, malla_calc::masquerade::TABLE, chain, buf) {
                Ok(n) => now += n.unwrap_or(0),
                Err(e) => {
                    tracing::warn!(error = %e, chain, "reading a flow-log lost chain");
                    return;
                }
            }
        }
        if let Some(before) = self.lost_seen {
            let grew = if now >= before { now - before } else { now };
            if grew > 0 {
                out.push(KernelEvent::Lost(LostReason::RateLimit, grew));
            }
        }
        self.lost_seen = Some(now);
    }

    /// Reads what is queued on the NFLOG socket into `out`.
    fn drain_log(&mut self, buf: &mut [u8], out: &mut Vec<KernelEvent>) {
        loop {
            match recv(&self.log, buf) {
                Ok(n) => {
                    for (ty, _, body) in messages(&buf[..n]) {
                        let Some((sample, seq)) = parse_nflog(ty, body) else {
                            continue;
                        };
                        if let (Some(last), Some(seq)) = (self.last_seq, seq) {
                            let gap = seq.wrapping_sub(last).wrapping_sub(1);
                            if gap > 0 && gap < u32::MAX / 2 {
                                out.push(KernelEvent::Lost(LostReason::Overrun, u64::from(gap)));
                            }
                        }
                        if seq.is_some() {
                            self.last_seq = seq;
                        }
                        out.push(KernelEvent::Log(sample));
                    }
                }
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    // The sequence gap counts what was lost.
                }
                Err(_) => return,
            }
        }
    }

    /// Reads events until `sink` returns false, delivering them in batches (an empty one at
    /// least every second). Blocks the
    /// calling thread: run it on a thread of its own (in the namespace the sockets belong to).
    pub fn run(self, sink: impl FnMut(Vec<KernelEvent>) -> bool) {
        self.run_refreshing(sink, || Refresh::All)
    }

    /// [`Collector::run`], reading every [`DUMP_EVERY`] the counters `refresh` names.
    pub fn run_refreshing(
        mut self,
        mut sink: impl FnMut(Vec<KernelEvent>) -> bool,
        mut refresh: impl FnMut() -> Refresh,
    ) {
        let mut buf = vec![0u8; 1 << 16];
        let mut last_dump = std::time::Instant::now();
        let mut dumps = 0u32;
        let mut last_lost = std::time::Instant::now();
        let mut lost_reads = 0u32;
        let mut woke = std::time::Instant::now();
        loop {
            // Paced: what arrives meanwhile waits in the sockets.
            if let Some(rest) = READ_PACE.checked_sub(woke.elapsed()) {
                std::thread::sleep(rest);
            }
            let mut fds = [
                libc::pollfd {
                    fd: self.ct.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.log.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: poll(2) on two descriptors we own.
            let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, 1000) };
            if r < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                tracing::error!(error = %io::Error::last_os_error(), "flow collection stopped");
                return;
            }
            woke = std::time::Instant::now();
            let mut conns = Vec::new();
            let mut lost = 0u64;
            for _ in 0..CT_READS_PER_WAKE {
                match recv(&self.ct, &mut buf) {
                    Ok(n) => {
                        for (ty, _, body) in messages(&buf[..n]) {
                            if ty == NLMSG_DONE || ty == NLMSG_ERROR {
                                continue;
                            }
                            if let Some(ev) = parse_ct_event(ty, body) {
                                if !loopback(&ev.orig) {
                                    conns.push(KernelEvent::Conn(ev));
                                }
                            }
                        }
                    }
                    Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => lost += 1,
                    Err(_) => break,
                }
            }
            let mut batch = Vec::new();
            self.drain_log(&mut buf, &mut batch);
            if lost > 0 {
                batch.push(KernelEvent::Lost(LostReason::Overrun, lost));
            }
            if last_lost.elapsed() >= LOST_EVERY {
                last_lost = std::time::Instant::now();
                lost_reads = lost_reads.wrapping_add(1);
                self.read_lost(lost_reads, &mut buf, &mut batch);
            }
            batch.extend(conns);
            if last_dump.elapsed() >= DUMP_EVERY {
                last_dump = std::time::Instant::now();
                dumps = dumps.wrapping_add(1);
                let read = match refresh() {
                    Refresh::Nothing => Ok(()),
                    Refresh::Tuples(t) => get_each(&self.dump, dumps, &t, &mut buf, &mut batch),
                    Refresh::All => dump(&self.dump, dumps, &mut buf, &mut batch),
                };
                if let Err(e) = read {
                    tracing::warn!(error = %e, "reading conntrack counters");
                }
            }
            // Called at least once a second, so that the sink can stop the collector.
            if !sink(batch) {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nest(ty: u16, inner: &[u8]) -> Vec<u8> {
        let mut b = Vec::new();
        put_attr(&mut b, ty | 0x8000, inner);
        b
    }

    fn tuple_attr(ty: u16, src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
        let mut ip = Vec::new();
        put_attr(&mut ip, 1, &src);
        put_attr(&mut ip, 2, &dst);
        let mut proto = Vec::new();
        put_attr(&mut proto, 1, &[6]);
        put_attr(&mut proto, 2, &sport.to_be_bytes());
        put_attr(&mut proto, 3, &dport.to_be_bytes());
        let mut t = nest(1, &ip);
        t.extend(nest(2, &proto));
        nest(ty, &t)
    }

    #[test]
    fn a_destroy_event_reads_tuples_and_counters() {
        let mut body = vec![2, 0, 0, 0];
        body.extend(tuple_attr(1, [198, 18, 0, 2], [198, 19, 0, 10], 40000, 80));
        body.extend(tuple_attr(2, [198, 18, 0, 4], [198, 18, 0, 2], 8080, 40000));
        let mut c = Vec::new();
        put_attr(&mut c, 1, &7u64.to_be_bytes());
        put_attr(&mut c, 2, &900u64.to_be_bytes());
        body.extend(nest(9, &c));
        let ev = parse_ct_event((1 << 8) | 2, &body).expect("an event");
        assert_eq!(ev.phase, Phase::Destroy);
        assert_eq!(ev.orig.dport, 80);
        assert_eq!(ev.reply.src, "198.18.0.4".parse::<IpAddr>().unwrap());
        assert_eq!(
            ev.orig_counters,
            Some(Counters {
                packets: 7,
                bytes: 900
            })
        );
        assert_eq!(ev.reply_counters, None);
        // Truncated or foreign input is no event, never a panic.
        for n in 0..body.len() {
            let _ = parse_ct_event((1 << 8) | 2, &body[..n]);
        }
        assert_eq!(parse_ct_event(5, &body), None);
    }

    #[test]
    fn a_rule_message_reads_its_counters_packets() {
        let mut counter = Vec::new();
        put_attr(&mut counter, 1, &900u64.to_be_bytes());
        put_attr(&mut counter, 2, &42u64.to_be_bytes());
        let mut elem = Vec::new();
        put_attr(&mut elem, 1, b"counter\0");
        elem.extend(nest(2, &counter));
        let mut other = Vec::new();
        put_attr(&mut other, 1, b"immediate\0");
        let mut list = nest(1, &other);
        list.extend(nest(1, &elem));
        let mut body = vec![1, 0, 0, 0];
        put_attr(&mut body, 1, b"malla\0");
        body.extend(nest(4, &list));
        assert_eq!(rule_counter_packets(&body), 42);
        // Truncated input reads as less, never a panic.
        for n in 0..body.len() {
            assert!(rule_counter_packets(&body[..n]) <= 42);
        }
        let req = rules_request(9, "malla", "flowlog-lost-drop");
        assert_eq!(req.len() % 4, 0);
        assert_eq!(
            u32::from_ne_bytes(req[0..4].try_into().unwrap()) as usize,
            req.len()
        );
    }

    #[test]
    fn an_nflog_sample_without_conntrack_reads_the_packet() {
        let mut body = vec![2, 0, 0, 30];
        put_attr(&mut body, 10, b"malla:D:in\0");
        put_attr(&mut body, 12, &5u32.to_be_bytes());
        let mut pkt = vec![0x45, 0, 0, 40, 0, 0, 0, 0, 64, 6, 0, 0];
        pkt.extend([198, 18, 0, 2, 198, 18, 0, 3]);
        pkt.extend(40001u16.to_be_bytes());
        pkt.extend(5432u16.to_be_bytes());
        put_attr(&mut body, 9, &pkt);
        let (s, seq) = parse_nflog(4 << 8, &body).expect("a sample");
        assert_eq!(seq, Some(5));
        assert_eq!(
            s.point,
            LogPoint::Deny {
                dir: malla_calc::policy::flowlog::Dir::In
            }
        );
        assert_eq!((s.orig.sport, s.orig.dport, s.orig.proto), (40001, 5432, 6));
        for n in 0..body.len() {
            let _ = parse_nflog(4 << 8, &body[..n]);
        }
        let mut other = vec![2, 0, 0, 30];
        put_attr(&mut other, 10, b"someone else\0");
        put_attr(&mut other, 9, &pkt);
        assert_eq!(parse_nflog(4 << 8, &other), None);
    }
}
