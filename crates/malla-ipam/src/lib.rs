//! Malla's IP address management: pools cut into blocks that nodes claim (affinity), and
//! allocation of pod addresses from them, over any [`malla_store::Store`].
//!
//! Semantics follow Calico IPAM:
//! - A node allocates from its own (affine) blocks first, then claims the lowest unclaimed
//!   block of an enabled pool, then borrows a free address from another node's block.
//! - Every change to a block is a compare-and-swap on that block's key, so no address is ever
//!   handed out twice, even with many processes allocating at once.
//! - Every reservation is made under a handle, stored with the allocation in the block.
//!
//! Cost of one [`Ipam::auto_assign`]: with [`AutoAssign::affine_hint`] (the node's blocks, as
//! the agent's node cache holds them) it reads the pools and the hinted blocks and writes once
//! (the block's compare-and-swap); only when no hinted block has room does it list every
//! block's summary, and claiming a new block is still one write (its creation).
//!
//! Crash safety (nothing allocated can become unfindable):
//! - An address in a block affine to the requesting node has no other record: the block's
//!   allocation names the handle, and the node's affine blocks are where
//!   [`Ipam::release_by_handle_hinted`] looks for it (the caller passes them, e.g. from the node
//!   cache, with the addresses it knows from the endpoint record). A crash between the
//!   allocation and the endpoint record leaves an allocation in one of the node's blocks, which
//!   the runtime's DEL (retried until it succeeds) finds there, or GC
//!   ([`Ipam::release_unless`], which scans every block) frees.
//! - An address borrowed from another node's block (rare) is found through the handle record
//!   (`keys::handle(id)`), which lists the non-affine blocks the handle may hold addresses in:
//!   it is written *before* the allocation and deleted *after* the release, as in Calico.
//! - [`Ipam::release_by_handle`] without hints, when the handle has no record, scans every
//!   block for the handle's allocations, so it needs no knowledge of where they are.

mod block;
pub mod node_cache;

use block::BlockSummary;
pub use block::{Allocation, Block};

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;
use malla_api::{keys, IpPool};
use malla_store::{get_json, list_json, to_json, Revision, Store, StoreError};
use serde::{Deserialize, Serialize};

/// Compare-and-swap attempts on one key before giving up with [`IpamError::Contention`].
const MAX_ATTEMPTS: usize = 100;

/// Attribute key the allocator fills with the node name when the caller does not.
pub const ATTR_NODE: &str = "node";

/// Why an IPAM operation failed.
#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    /// No free address in any enabled pool of the family.
    #[error("no free {family} address in any enabled pool")]
    Exhausted { family: &'static str },
    /// The requested address is held by another handle.
    #[error("address {0} is already in use")]
    AddressInUse(IpAddr),
    /// The requested address is outside every pool.
    #[error("address {0} is in no pool")]
    NotInPool(IpAddr),
    /// The requested address is in a disabled pool (named).
    #[error("pool {0} is disabled")]
    PoolDisabled(String),
    /// Too many compare-and-swap conflicts in a row on one key.
    #[error("too much contention on {0}, giving up")]
    Contention(String),
    /// The pool definition is invalid or overlaps another pool.
    #[error("invalid pool: {0}")]
    InvalidPool(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A request for one address per requested family under one handle.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AutoAssign {
    pub handle: String,
    pub node: String,
    pub ipv4: bool,
    pub ipv6: bool,
    /// Stored with each allocation (e.g. namespace, pod); `node` is added if missing.
    pub attrs: BTreeMap<String, String>,
    /// Blocks the caller believes are affine to `node` (e.g. the node cache's snapshot), best
    /// first. They are tried first, each read alone and checked (affine to `node`, in an
    /// enabled pool, room left); only when none serves does the allocator list every block.
    /// Empty: the full path.
    pub affine_hint: Vec<IpNet>,
}

/// Where [`Ipam::release_by_handle_hinted`] should look besides the handle record.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ReleaseHints {
    /// Blocks to search, e.g. the node's affine blocks.
    pub blocks: Vec<IpNet>,
    /// Addresses the handle is believed to hold (e.g. from its endpoint record); their blocks
    /// are searched.
    pub addrs: Vec<IpAddr>,
}

impl ReleaseHints {
    fn is_empty(&self) -> bool {
        self.blocks.is_empty() && self.addrs.is_empty()
    }
}

/// Whether an allocation attempt may go into a block not affine to the node (after writing
/// the handle record), or must give up there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Affinity {
    /// Only a block affine to the node (the hinted fast path).
    Required,
    /// Any block; a non-affine one is first listed in the handle record.
    Any,
}

/// An address handed out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assigned {
    pub addr: IpAddr,
    pub block: IpNet,
    pub pool: String,
}

/// Everything one handle holds (for GC).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handle {
    pub id: String,
    /// Sorted; empty for a handle record whose allocation never happened (crash leftover).
    pub addrs: Vec<IpAddr>,
    pub attrs: BTreeMap<String, String>,
}

/// The record stored at `keys::handle(id)`: the blocks the handle may hold addresses in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
struct HandleRecord {
    blocks: Vec<IpNet>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    attrs: BTreeMap<String, String>,
}

/// Handles from their records and from the allocations of `blocks`: each with its addresses
/// (sorted) and the blocks they are in.
fn collect_handles(
    records: impl IntoIterator<Item = (String, HandleRecord)>,
    blocks: impl IntoIterator<Item = Block>,
) -> BTreeMap<String, (Handle, Vec<IpNet>)> {
    let mut out: BTreeMap<String, (Handle, Vec<IpNet>)> = BTreeMap::new();
    for (key, rec) in records {
        let id = key.strip_prefix(keys::HANDLES).unwrap_or(&key).to_string();
        let h = Handle {
            id: id.clone(),
            addrs: Vec::new(),
            attrs: rec.attrs,
        };
        out.insert(id, (h, Vec::new()));
    }
    for b in blocks {
        for (o, a) in &b.allocations {
            let Some(addr) = b.addr_of(*o) else { continue };
            let (h, blocks) = out.entry(a.handle.clone()).or_insert_with(|| {
                (
                    Handle {
                        id: a.handle.clone(),
                        addrs: Vec::new(),
                        attrs: a.attrs.clone(),
                    },
                    Vec::new(),
                )
            });
            h.addrs.push(addr);
            if !blocks.contains(&b.cidr) {
                blocks.push(b.cidr);
            }
        }
    }
    for (h, _) in out.values_mut() {
        h.addrs.sort();
    }
    out
}

/// An address family, named as in errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

impl Family {
    fn of(net: &IpNet) -> Self {
        match net {
            IpNet::V4(_) => Family::V4,
            IpNet::V6(_) => Family::V6,
        }
    }
    fn name(self) -> &'static str {
        match self {
            Family::V4 => "ipv4",
            Family::V6 => "ipv6",
        }
    }
}

fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// The allocator, borrowing a store.
pub struct Ipam<'a> {
    store: &'a dyn Store,
}

impl<'a> Ipam<'a> {
    pub fn new(store: &'a dyn Store) -> Self {
        Self { store }
    }

    /// Validates the pool and creates or replaces it; rejects a pool overlapping another.
    /// Writes nothing if the stored pool is identical.
    pub fn ensure_pool(&self, pool: &IpPool) -> Result<(), IpamError> {
        pool.validate()
            .map_err(|e| IpamError::InvalidPool(format!("{}: {e}", pool.name)))?;
        for other in self.pools()? {
            if other.name == pool.name {
                if &other == pool {
                    return Ok(());
                }
                continue;
            }
            if overlaps(&other.cidr, &pool.cidr) {
                return Err(IpamError::InvalidPool(format!(
                    "{} ({}) overlaps pool {} ({})",
                    pool.name, pool.cidr, other.name, other.cidr
                )));
            }
        }
        let key = keys::pool(&pool.name);
        self.store.put(&key, &to_json(&key, pool)?)?;
        Ok(())
    }

    /// Every pool, sorted by name.
    pub fn pools(&self) -> Result<Vec<IpPool>, IpamError> {
        let (items, _) = list_json::<IpPool>(self.store, keys::POOLS)?;
        let mut pools: Vec<IpPool> = items.into_iter().map(|(_, p, _)| p).collect();
        pools.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(pools)
    }

    /// Every block, sorted by cidr.
    pub fn blocks(&self) -> Result<Vec<Block>, IpamError> {
        let (items, _) = list_json::<Block>(self.store, keys::BLOCKS)?;
        let mut blocks: Vec<Block> = items.into_iter().map(|(_, b, _)| b).collect();
        blocks.sort_by_key(|b| b.cidr);
        Ok(blocks)
    }

    /// Every block's summary, sorted by cidr.
    fn summaries(&self) -> Result<Vec<BlockSummary>, IpamError> {
        let (items, _) = list_json::<BlockSummary>(self.store, keys::BLOCKS)?;
        let mut blocks: Vec<BlockSummary> = items.into_iter().map(|(_, b, _)| b).collect();
        blocks.sort_by_key(|b| b.cidr);
        Ok(blocks)
    }

    /// One address per requested family (IPv4 first). All-or-nothing: if a later family
    /// fails, the addresses already assigned by this call are released.
    pub fn auto_assign(&self, req: &AutoAssign) -> Result<Vec<Assigned>, IpamError> {
        if !req.ipv4 && !req.ipv6 {
            return Ok(Vec::new());
        }
        self.auto_assign_in(req, &self.pools()?)
    }

    /// [`Ipam::auto_assign`] with the pools the caller has just read ([`Ipam::pools`]), so
    /// that they are not read twice.
    pub fn auto_assign_in(
        &self,
        req: &AutoAssign,
        pools: &[IpPool],
    ) -> Result<Vec<Assigned>, IpamError> {
        let mut attrs = req.attrs.clone();
        attrs
            .entry(ATTR_NODE.to_string())
            .or_insert_with(|| req.node.clone());
        let families = [(req.ipv4, Family::V4), (req.ipv6, Family::V6)];
        // Every block's summary, listed only if the hinted blocks do not serve.
        let mut blocks: Option<Vec<BlockSummary>> = None;
        let mut done: Vec<Assigned> = Vec::new();
        for (want, family) in families {
            if !want {
                continue;
            }
            let got = self.assign_family(
                &req.handle,
                &req.node,
                &attrs,
                family,
                pools,
                &req.affine_hint,
                &mut blocks,
            );
            match got {
                Ok(a) => done.push(a),
                Err(e) => {
                    for a in &done {
                        self.release_addr(a, &req.handle)?;
                    }
                    self.prune_handle(&req.handle)?;
                    return Err(e);
                }
            }
        }
        Ok(done)
    }

    #[allow(clippy::too_many_arguments)]
    fn assign_family(
        &self,
        handle: &str,
        node: &str,
        attrs: &BTreeMap<String, String>,
        family: Family,
        pools: &[IpPool],
        hint: &[IpNet],
        blocks: &mut Option<Vec<BlockSummary>>,
    ) -> Result<Assigned, IpamError> {
        let exhausted = IpamError::Exhausted {
            family: family.name(),
        };
        let enabled: Vec<&IpPool> = pools
            .iter()
            .filter(|p| !p.disabled && Family::of(&p.cidr) == family)
            .collect();
        let pool_of = |cidr: &IpNet| enabled.iter().find(|p| p.cidr.contains(cidr)).copied();

        // 0. The blocks the caller believes are the node's: each read alone, none listed.
        for cidr in hint {
            let Some(pool) = pool_of(cidr) else { continue };
            let got =
                self.alloc_in_block(*cidr, None, pool, node, Affinity::Required, handle, attrs)?;
            if let Some(a) = got {
                return Ok(a);
            }
        }

        let blocks: &[BlockSummary] = match blocks {
            Some(b) => b,
            None => blocks.insert(self.summaries()?),
        };
        let usable: Vec<(&BlockSummary, &IpPool)> = blocks
            .iter()
            .filter_map(|b| Some((b, pool_of(&b.cidr)?)))
            .collect();

        // 1. The node's own blocks.
        for (b, pool) in &usable {
            if b.affinity.as_deref() == Some(node) && b.has_room() && !hint.contains(&b.cidr) {
                let got =
                    self.alloc_in_block(b.cidr, None, pool, node, Affinity::Any, handle, attrs)?;
                if let Some(a) = got {
                    return Ok(a);
                }
            }
        }

        // 2. Claim a new block.
        let mut taken: Vec<IpNet> = blocks.iter().map(|b| b.cidr).collect();
        for pool in &enabled {
            for _ in 0..MAX_ATTEMPTS {
                let Some(cidr) = block::lowest_free_block(pool.cidr, pool.block_size, &taken)
                else {
                    break;
                };
                taken.push(cidr);
                if let Some(a) = self.claim_block(cidr, pool, node, handle, attrs)? {
                    return Ok(a);
                }
            }
        }

        // 3. Borrow from any other block.
        for (b, pool) in &usable {
            if b.affinity.as_deref() != Some(node) && b.has_room() {
                let got =
                    self.alloc_in_block(b.cidr, None, pool, node, Affinity::Any, handle, attrs)?;
                if let Some(a) = got {
                    return Ok(a);
                }
            }
        }
        // Blocks claimed since our snapshot (e.g. by the node itself in a race we lost).
        self.assign_from_fresh_blocks(handle, node, attrs, &enabled, blocks)?
            .ok_or(exhausted)
    }

    /// Last resort: blocks that appeared after the caller's snapshot.
    fn assign_from_fresh_blocks(
        &self,
        handle: &str,
        node: &str,
        attrs: &BTreeMap<String, String>,
        enabled: &[&IpPool],
        seen: &[BlockSummary],
    ) -> Result<Option<Assigned>, IpamError> {
        let mut fresh: Vec<BlockSummary> = self
            .summaries()?
            .into_iter()
            .filter(|b| !seen.iter().any(|s| s.cidr == b.cidr))
            .collect();
        // Own blocks first.
        fresh.sort_by_key(|b| b.affinity.as_deref() != Some(node));
        for b in fresh {
            if !b.has_room() {
                continue;
            }
            let Some(pool) = enabled.iter().find(|p| p.cidr.contains(&b.cidr)) else {
                continue;
            };
            let got =
                self.alloc_in_block(b.cidr, None, pool, node, Affinity::Any, handle, attrs)?;
            if let Some(a) = got {
                return Ok(Some(a));
            }
        }
        Ok(None)
    }

    /// Creates `cidr` with affinity to `node` and the first address allocated to `handle`
    /// (one write: the block is affine, so no handle record). None if someone else created it
    /// first (and it has no room for us).
    fn claim_block(
        &self,
        cidr: IpNet,
        pool: &IpPool,
        node: &str,
        handle: &str,
        attrs: &BTreeMap<String, String>,
    ) -> Result<Option<Assigned>, IpamError> {
        let key = keys::block(&cidr);
        let mut b = Block::new(cidr, &pool.name, Some(node));
        b.allocations.insert(
            0,
            Allocation {
                handle: handle.to_string(),
                attrs: attrs.clone(),
            },
        );
        match self.store.create(&key, &to_json(&key, &b)?) {
            Ok(_) => Ok(b.addr_of(0).map(|addr| Assigned {
                addr,
                block: cidr,
                pool: pool.name.clone(),
            })),
            Err(StoreError::AlreadyExists(_)) => {
                // Lost the race. If the winner is this node, use the block.
                match get_json::<Block>(self.store, &key)? {
                    Some((b, rev)) if b.affinity.as_deref() == Some(node) => self.alloc_in_block(
                        cidr,
                        Some((b, rev)),
                        pool,
                        node,
                        Affinity::Required,
                        handle,
                        attrs,
                    ),
                    _ => Ok(None),
                }
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Allocates the lowest free address of an existing block (compare-and-swap with retry).
    /// `known` is a recent read of the block. None if the block is full or gone, or (with
    /// [`Affinity::Required`]) not affine to `node`. A block not affine to `node` is first
    /// listed in the handle record: the compare-and-swap succeeds only on the block as read,
    /// so the affinity checked is the one the allocation lands under.
    #[allow(clippy::too_many_arguments)]
    fn alloc_in_block(
        &self,
        cidr: IpNet,
        mut known: Option<(Block, Revision)>,
        pool: &IpPool,
        node: &str,
        affinity: Affinity,
        handle: &str,
        attrs: &BTreeMap<String, String>,
    ) -> Result<Option<Assigned>, IpamError> {
        let key = keys::block(&cidr);
        let mut recorded = false;
        for _ in 0..MAX_ATTEMPTS {
            let (mut b, rev) = match known.take() {
                Some(k) => k,
                None => match get_json::<Block>(self.store, &key)? {
                    Some(k) => k,
                    None => return Ok(None),
                },
            };
            let Some(ordinal) = b.first_free() else {
                return Ok(None);
            };
            let Some(addr) = b.addr_of(ordinal) else {
                return Ok(None);
            };
            if b.affinity.as_deref() != Some(node) {
                match affinity {
                    Affinity::Required => return Ok(None),
                    Affinity::Any if !recorded => {
                        self.add_block_to_handle(handle, cidr, attrs)?;
                        recorded = true;
                    }
                    Affinity::Any => {}
                }
            }
            b.allocations.insert(
                ordinal,
                Allocation {
                    handle: handle.to_string(),
                    attrs: attrs.clone(),
                },
            );
            match self.store.update(&key, &to_json(&key, &b)?, rev) {
                Ok(_) => {
                    return Ok(Some(Assigned {
                        addr,
                        block: cidr,
                        pool: pool.name.clone(),
                    }))
                }
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(IpamError::Contention(key))
    }

    /// Makes the handle record list `cidr` (creating the record if needed).
    fn add_block_to_handle(
        &self,
        handle: &str,
        cidr: IpNet,
        attrs: &BTreeMap<String, String>,
    ) -> Result<(), IpamError> {
        let key = keys::handle(handle);
        for _ in 0..MAX_ATTEMPTS {
            match get_json::<HandleRecord>(self.store, &key)? {
                None => {
                    let rec = HandleRecord {
                        blocks: vec![cidr],
                        attrs: attrs.clone(),
                    };
                    match self.store.create(&key, &to_json(&key, &rec)?) {
                        Ok(_) => return Ok(()),
                        Err(StoreError::AlreadyExists(_)) => continue,
                        Err(e) => return Err(e.into()),
                    }
                }
                Some((mut rec, rev)) => {
                    if rec.blocks.contains(&cidr) {
                        return Ok(());
                    }
                    rec.blocks.push(cidr);
                    rec.blocks.sort();
                    rec.attrs
                        .extend(attrs.iter().map(|(k, v)| (k.clone(), v.clone())));
                    match self.store.update(&key, &to_json(&key, &rec)?, rev) {
                        Ok(_) => return Ok(()),
                        Err(StoreError::Conflict { .. }) => continue,
                        Err(e) => return Err(e.into()),
                    }
                }
            }
        }
        Err(IpamError::Contention(key))
    }

    /// Assigns a specific address. Claims its block for `node` if the block does not exist
    /// yet. Assigning an address already held by the same handle succeeds (idempotent).
    pub fn assign_ip(
        &self,
        ip: IpAddr,
        handle: &str,
        node: &str,
        attrs: &BTreeMap<String, String>,
    ) -> Result<Assigned, IpamError> {
        let mut attrs = attrs.clone();
        attrs
            .entry(ATTR_NODE.to_string())
            .or_insert_with(|| node.to_string());
        let pools = self.pools()?;
        let pool = pools
            .iter()
            .find(|p| p.cidr.contains(&ip))
            .ok_or(IpamError::NotInPool(ip))?;
        if pool.disabled {
            return Err(IpamError::PoolDisabled(pool.name.clone()));
        }
        let result = self.assign_ip_in_pool(ip, pool, handle, node, &attrs);
        if result.is_err() {
            self.prune_handle(handle)?;
        }
        result
    }

    fn assign_ip_in_pool(
        &self,
        ip: IpAddr,
        pool: &IpPool,
        handle: &str,
        node: &str,
        attrs: &BTreeMap<String, String>,
    ) -> Result<Assigned, IpamError> {
        let mut cidr = IpNet::new(ip, pool.block_size)
            .map_err(|e| IpamError::InvalidPool(format!("{}: {e}", pool.name)))?
            .trunc();
        if self.store.get(&keys::block(&cidr))?.is_none() {
            // A block of another size (older pool definition) may hold the address.
            if let Some(b) = self.blocks()?.into_iter().find(|b| b.cidr.contains(&ip)) {
                cidr = b.cidr;
            }
        }
        let key = keys::block(&cidr);
        let mut recorded = false;
        let alloc = Allocation {
            handle: handle.to_string(),
            attrs: attrs.clone(),
        };
        let assigned = Assigned {
            addr: ip,
            block: cidr,
            pool: pool.name.clone(),
        };
        for _ in 0..MAX_ATTEMPTS {
            match get_json::<Block>(self.store, &key)? {
                None => {
                    let mut b = Block::new(cidr, &pool.name, Some(node));
                    let ordinal = b.ordinal_of(ip).ok_or(IpamError::NotInPool(ip))?;
                    b.allocations.insert(ordinal, alloc.clone());
                    match self.store.create(&key, &to_json(&key, &b)?) {
                        Ok(_) => return Ok(assigned),
                        Err(StoreError::AlreadyExists(_)) => continue,
                        Err(e) => return Err(e.into()),
                    }
                }
                Some((mut b, rev)) => {
                    let ordinal = b.ordinal_of(ip).ok_or(IpamError::NotInPool(ip))?;
                    match b.allocations.get(&ordinal) {
                        Some(a) if a.handle == handle => return Ok(assigned),
                        Some(_) => return Err(IpamError::AddressInUse(ip)),
                        None => {}
                    }
                    // Only an address in another node's block needs the handle record.
                    if b.affinity.as_deref() != Some(node) && !recorded {
                        self.add_block_to_handle(handle, cidr, attrs)?;
                        recorded = true;
                    }
                    b.allocations.insert(ordinal, alloc.clone());
                    match self.store.update(&key, &to_json(&key, &b)?, rev) {
                        Ok(_) => return Ok(assigned),
                        Err(StoreError::Conflict { .. }) => continue,
                        Err(e) => return Err(e.into()),
                    }
                }
            }
        }
        Err(IpamError::Contention(key))
    }

    /// Frees one address if `handle` holds it.
    fn release_addr(&self, a: &Assigned, handle: &str) -> Result<(), IpamError> {
        self.update_block(a.block, |b| {
            let o = b.ordinal_of(a.addr)?;
            if b.allocations.get(&o)?.handle != handle {
                return None;
            }
            b.allocations.remove(&o);
            Some(())
        })
        .map(|_| ())
    }

    /// Read-modify-CAS of a block. `f` returns None for "no change". Returns f's result.
    fn update_block<R>(
        &self,
        cidr: IpNet,
        mut f: impl FnMut(&mut Block) -> Option<R>,
    ) -> Result<Option<R>, IpamError> {
        let key = keys::block(&cidr);
        for _ in 0..MAX_ATTEMPTS {
            let Some((mut b, rev)) = get_json::<Block>(self.store, &key)? else {
                return Ok(None);
            };
            let Some(r) = f(&mut b) else {
                return Ok(None);
            };
            match self.store.update(&key, &to_json(&key, &b)?, rev) {
                Ok(_) => return Ok(Some(r)),
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(IpamError::Contention(key))
    }

    /// Frees everything `handle` holds in `blocks`.
    fn release_in_blocks(&self, handle: &str, blocks: &[IpNet]) -> Result<Vec<IpAddr>, IpamError> {
        let mut freed = Vec::new();
        for cidr in blocks {
            let got = self.update_block(*cidr, |b| {
                let mine: Vec<u32> = b
                    .allocations
                    .iter()
                    .filter(|(_, a)| a.handle == handle)
                    .map(|(o, _)| *o)
                    .collect();
                if mine.is_empty() {
                    return None;
                }
                let addrs: Vec<IpAddr> = mine.iter().filter_map(|o| b.addr_of(*o)).collect();
                for o in mine {
                    b.allocations.remove(&o);
                }
                Some(addrs)
            })?;
            freed.extend(got.unwrap_or_default());
        }
        Ok(freed)
    }

    /// Releases everything held by the handle in `extra` and in the blocks of its record, and
    /// deletes the record. Idempotent: an unknown handle gives Ok(empty). Also says whether a
    /// record existed.
    fn release_handle(
        &self,
        handle: &str,
        extra: &[IpNet],
    ) -> Result<(Vec<IpAddr>, bool), IpamError> {
        let key = keys::handle(handle);
        let mut freed = self.release_in_blocks(handle, extra)?;
        let mut had_record = false;
        for _ in 0..MAX_ATTEMPTS {
            let Some((rec, rev)) = get_json::<HandleRecord>(self.store, &key)? else {
                freed.sort();
                freed.dedup();
                return Ok((freed, had_record));
            };
            had_record = true;
            let more: Vec<IpNet> = rec
                .blocks
                .iter()
                .filter(|b| !extra.contains(b))
                .copied()
                .collect();
            freed.extend(self.release_in_blocks(handle, &more)?);
            match self.store.delete(&key, Some(rev)) {
                Ok(_) => {
                    freed.sort();
                    freed.dedup();
                    return Ok((freed, had_record));
                }
                // The record changed (a concurrent assign under the same handle): go again.
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(IpamError::Contention(key))
    }

    /// Releases every address held by the handle, then deletes its handle record (if any).
    /// A second call returns Ok(empty). Without hints, a handle with no record is looked for
    /// in every block (see [`Ipam::release_by_handle_hinted`] to avoid that).
    pub fn release_by_handle(&self, handle: &str) -> Result<Vec<IpAddr>, IpamError> {
        self.release_by_handle_hinted(handle, &ReleaseHints::default())
    }

    /// [`Ipam::release_by_handle`] searching the hinted blocks (and those of the hinted
    /// addresses) plus the blocks of the handle's record. Only when that frees nothing, the
    /// handle has no record, and the hints were empty or named an address outside the hinted
    /// blocks (its block was derived from its pool's block size, which may have changed),
    /// every block is scanned. An address in a block affine to the caller's node is found if
    /// the hints name that block or the address.
    pub fn release_by_handle_hinted(
        &self,
        handle: &str,
        hints: &ReleaseHints,
    ) -> Result<Vec<IpAddr>, IpamError> {
        let mut blocks = hints.blocks.clone();
        let stray: Vec<IpAddr> = hints
            .addrs
            .iter()
            .filter(|ip| !blocks.iter().any(|b| b.contains(*ip)))
            .copied()
            .collect();
        if !stray.is_empty() {
            let pools = self.pools()?;
            for ip in stray.iter().copied() {
                let Some(pool) = pools.iter().find(|p| p.cidr.contains(&ip)) else {
                    continue;
                };
                if let Ok(net) = IpNet::new(ip, pool.block_size) {
                    let net = net.trunc();
                    if !blocks.contains(&net) {
                        blocks.push(net);
                    }
                }
            }
        }
        let (mut freed, had_record) = self.release_handle(handle, &blocks)?;
        if freed.is_empty() && !had_record && (hints.is_empty() || !stray.is_empty()) {
            let held: Vec<IpNet> = self
                .blocks()?
                .into_iter()
                .filter(|b| b.allocations.values().any(|a| a.handle == handle))
                .map(|b| b.cidr)
                .collect();
            freed = self.release_in_blocks(handle, &held)?;
            freed.sort();
            freed.dedup();
        }
        Ok(freed)
    }

    /// Releases exactly `addrs` where `handle` still holds them (an address released meanwhile,
    /// or held by another handle, is left alone), then prunes the handle's record of blocks it
    /// holds nothing in. For reclaiming a leak without racing a new reservation made under the
    /// same handle (its address is another one: the leaked ones are still held when it is made).
    /// Returns what was released, sorted.
    pub fn release_addrs_of_handle(
        &self,
        handle: &str,
        addrs: &[IpAddr],
    ) -> Result<Vec<IpAddr>, IpamError> {
        let mut freed = Vec::new();
        if !addrs.is_empty() {
            let blocks: Vec<IpNet> = self
                .blocks()?
                .into_iter()
                .map(|b| b.cidr)
                .filter(|c| addrs.iter().any(|a| c.contains(a)))
                .collect();
            for cidr in blocks {
                let got = self.update_block(cidr, |b| {
                    let mine: Vec<(u32, IpAddr)> = addrs
                        .iter()
                        .filter_map(|a| Some((b.ordinal_of(*a)?, *a)))
                        .filter(|(o, _)| b.allocations.get(o).is_some_and(|al| al.handle == handle))
                        .collect();
                    if mine.is_empty() {
                        return None;
                    }
                    for (o, _) in &mine {
                        b.allocations.remove(o);
                    }
                    Some(mine.into_iter().map(|(_, a)| a).collect::<Vec<_>>())
                })?;
                freed.extend(got.unwrap_or_default());
            }
        }
        self.prune_handle(handle)?;
        freed.sort();
        Ok(freed)
    }

    /// Drops blocks the handle holds nothing in from its record; deletes an empty record.
    /// Best effort: a concurrent change to the record wins.
    fn prune_handle(&self, handle: &str) -> Result<(), IpamError> {
        let key = keys::handle(handle);
        let Some((mut rec, rev)) = get_json::<HandleRecord>(self.store, &key)? else {
            return Ok(());
        };
        let mut keep = Vec::new();
        for cidr in &rec.blocks {
            if let Some((b, _)) = get_json::<Block>(self.store, &keys::block(cidr))? {
                if b.allocations.values().any(|a| a.handle == handle) {
                    keep.push(*cidr);
                }
            }
        }
        if keep.len() == rec.blocks.len() {
            return Ok(());
        }
        let result = if keep.is_empty() {
            self.store.delete(&key, Some(rev)).map(|_| ())
        } else {
            rec.blocks = keep;
            self.store
                .update(&key, &to_json(&key, &rec)?, rev)
                .map(|_| ())
        };
        match result {
            Ok(()) | Err(StoreError::Conflict { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Every handle with its addresses and attributes, sorted by id: handle records plus
    /// allocations whose record is missing.
    pub fn handles(&self) -> Result<Vec<Handle>, IpamError> {
        Ok(self
            .handles_with_blocks()?
            .into_values()
            .map(|(h, _)| h)
            .collect())
    }

    fn handles_with_blocks(&self) -> Result<BTreeMap<String, (Handle, Vec<IpNet>)>, IpamError> {
        // Records first: an allocation made after this read still shows up from its block.
        let (recs, _) = list_json::<HandleRecord>(self.store, keys::HANDLES)?;
        let recs = recs.into_iter().map(|(key, rec, _)| (key, rec));
        Ok(collect_handles(recs, self.blocks()?))
    }

    /// The handles of node `node` (attribute [`ATTR_NODE`]): those with addresses in
    /// `own_blocks` (the node's affine blocks, e.g. from its node cache) and those with a
    /// handle record (addresses borrowed from other nodes' blocks, which the record names).
    /// Reads those blocks one by one and the handle records, never every block of the cluster:
    /// what a node's periodic reclaimer can afford at any cluster size.
    pub fn handles_of_node(
        &self,
        node: &str,
        own_blocks: &[IpNet],
    ) -> Result<Vec<Handle>, IpamError> {
        let (recs, _) = list_json::<HandleRecord>(self.store, keys::HANDLES)?;
        let recs: Vec<(String, HandleRecord)> = recs
            .into_iter()
            .filter(|(_, r, _)| r.attrs.get(ATTR_NODE).is_some_and(|n| n == node))
            .map(|(key, rec, _)| (key, rec))
            .collect();
        let cidrs: BTreeSet<IpNet> = own_blocks
            .iter()
            .copied()
            .chain(recs.iter().flat_map(|(_, r)| r.blocks.iter().copied()))
            .collect();
        let mut blocks = Vec::with_capacity(cidrs.len());
        for cidr in cidrs {
            if let Some((b, _)) = get_json::<Block>(self.store, &keys::block(&cidr))? {
                blocks.push(b);
            }
        }
        // Other nodes' handles stand in these blocks too (addresses they borrowed from ours).
        Ok(collect_handles(recs, blocks)
            .into_values()
            .map(|(h, _)| h)
            .filter(|h| h.attrs.get(ATTR_NODE).is_some_and(|n| n == node))
            .collect())
    }

    /// Releases every allocation whose handle is not in `valid` (GC of leaks), and deletes
    /// the handle records of such handles. Returns what was released, sorted.
    ///
    /// The caller decides validity; a handle whose CNI ADD is still in flight looks invalid
    /// (no endpoint yet), so callers should apply a grace period.
    pub fn release_unless(
        &self,
        valid: &dyn Fn(&Handle) -> bool,
    ) -> Result<Vec<IpAddr>, IpamError> {
        let mut freed = Vec::new();
        for (h, blocks) in self.handles_with_blocks()?.into_values() {
            if !valid(&h) {
                freed.extend(self.release_handle(&h.id, &blocks)?.0);
            }
        }
        freed.sort();
        Ok(freed)
    }
}

#[cfg(test)]
mod tests;
