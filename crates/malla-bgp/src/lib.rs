//! BGP for `routing: bgp`: what each node's speaker announces and to whom, rendered as a BIRD 2
//! configuration ([`render`]), the speaker process inside the node's namespace started, adopted
//! after a restart and reloaded with `birdc configure` ([`speaker`]), its sessions read back
//! from `birdc show protocols all` ([`status`]), and the configurations of a top-of-rack router
//! (BIRD or FRR) for the lab ([`router`]).
//!
//! Why BIRD: it is what Calico runs on every node, small (one ~1 MB process per node, a few MB
//! of memory at thousands of routes), speaks iBGP/eBGP, route reflection, graceful restart and
//! IPv6, and installs what it learns with its kernel protocol. The Rust BGP crates (netgauze's
//! speaker, zettabgp, bgp-rs) are parsers or early speakers without a kernel side or graceful
//! restart; holo is a whole routing suite, not a library. A hand-written state machine was not
//! an option.
//!
//! The split follows holo's northbound/southbound shape: [`render`] is pure (inputs to text,
//! tested with goldens), [`speaker`] owns the process and its control socket.

pub mod render;
pub mod router;
pub mod services;
pub mod speaker;
pub mod status;

pub use render::{NodeSpeaker, Peer, PeerKind};

/// Compares `text` with `tests/golden/NAME` (`MALLA_BLESS=1` rewrites it).
#[cfg(test)]
pub(crate) fn golden(name: &str, text: &str) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    if std::env::var_os("MALLA_BLESS").is_some() {
        std::fs::write(&path, text).unwrap();
    }
    let want = std::fs::read_to_string(&path)
        .unwrap_or_else(|_| panic!("{} missing (MALLA_BLESS=1 writes it)", path.display()));
    assert_eq!(
        text,
        want,
        "{} differs (MALLA_BLESS=1 rewrites it)",
        path.display()
    );
}
