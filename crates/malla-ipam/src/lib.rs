//! Malla's IP address management: pools cut into blocks that nodes claim (affinity), and
//! allocation of pod addresses from them, over any [`malla_store::Store`].
//!
//! Semantics follow Calico IPAM:
//! - A node allocates from its own (affine) blocks first, then claims the lowest unclaimed
//!   block of an enabled pool, then borrows a free address from another node's block.
//! - Every change to a block is a compare-and-swap on that block's key, so no address is ever
//!   handed out twice, even with many processes allocating at once.
//! - Every reservation is made under a handle. The handle record (`keys::handle(id)`) lists
//!   the blocks the handle may hold addresses in and is written *before* the allocation, and
//!   deleted *after* the release, so a crash at any point leaves nothing that
//!   [`Ipam::release_by_handle`] or [`Ipam::release_unless`] cannot find.

mod block;
pub mod node_cache;

use block::BlockSummary;
pub use block::{Allocation, Block};

use std::collections::BTreeMap;
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
        let mut attrs = req.attrs.clone();
        attrs
            .entry(ATTR_NODE.to_string())
            .or_insert_with(|| req.node.clone());
        let families = [(req.ipv4, Family::V4), (req.ipv6, Family::V6)];
        if !families.iter().any(|(want, _)| *want) {
            return Ok(Vec::new());
        }
        let pools = self.pools()?;
        let blocks = self.summaries()?;
        let mut done: Vec<Assigned> = Vec::new();
        for (want, family) in families {
            if !want {
                continue;
            }
            match self.assign_family(&req.handle, &req.node, &attrs, family, &pools, &blocks) {
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

    fn assign_family(
        &self,
        handle: &str,
        node: &str,
        attrs: &BTreeMap<String, String>,
        family: Family,
        pools: &[IpPool],
        blocks: &[BlockSummary],
    ) -> Result<Assigned, IpamError> {
        let exhausted = IpamError::Exhausted {
            family: family.name(),
        };
        let enabled: Vec<&IpPool> = pools
            .iter()
            .filter(|p| !p.disabled && Family::of(&p.cidr) == family)
            .collect();
        let pool_of = |b: &BlockSummary| enabled.iter().find(|p| p.cidr.contains(&b.cidr)).copied();
        let usable: Vec<(&BlockSummary, &IpPool)> = blocks
            .iter()
            .filter_map(|b| Some((b, pool_of(b)?)))
            .collect();

        // 1. The node's own blocks.
        for (b, pool) in &usable {
            if b.affinity.as_deref() == Some(node) && b.has_room() {
                if let Some(a) = self.alloc_in_block(b.cidr, None, pool, handle, attrs)? {
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
                if let Some(a) = self.alloc_in_block(b.cidr, None, pool, handle, attrs)? {
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
            if let Some(a) = self.alloc_in_block(b.cidr, None, pool, handle, attrs)? {
                return Ok(Some(a));
            }
        }
        Ok(None)
    }

    /// Creates `cidr` with affinity to `node` and the first address allocated to `handle`.
    /// None if someone else created it first (and it has no room for us).
    fn claim_block(
        &self,
        cidr: IpNet,
        pool: &IpPool,
        node: &str,
        handle: &str,
        attrs: &BTreeMap<String, String>,
    ) -> Result<Option<Assigned>, IpamError> {
        self.add_block_to_handle(handle, cidr, attrs)?;
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
                    Some((b, rev)) if b.affinity.as_deref() == Some(node) => {
                        self.alloc_in_block(cidr, Some((b, rev)), pool, handle, attrs)
                    }
                    _ => Ok(None),
                }
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Allocates the lowest free address of an existing block (compare-and-swap with retry).
    /// `known` is a recent read of the block. None if the block is full or gone.
    fn alloc_in_block(
        &self,
        cidr: IpNet,
        mut known: Option<(Block, Revision)>,
        pool: &IpPool,
        handle: &str,
        attrs: &BTreeMap<String, String>,
    ) -> Result<Option<Assigned>, IpamError> {
        self.add_block_to_handle(handle, cidr, attrs)?;
        let key = keys::block(&cidr);
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
        self.add_block_to_handle(handle, cidr, attrs)?;
        let key = keys::block(&cidr);
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

    /// Releases everything held by the handle and deletes its record. Idempotent: an unknown
    /// handle gives Ok(empty). `extra` lists more blocks to search (GC of records lost).
    fn release_handle(&self, handle: &str, extra: &[IpNet]) -> Result<Vec<IpAddr>, IpamError> {
        let key = keys::handle(handle);
        let mut freed = self.release_in_blocks(handle, extra)?;
        for _ in 0..MAX_ATTEMPTS {
            let Some((rec, rev)) = get_json::<HandleRecord>(self.store, &key)? else {
                freed.sort();
                freed.dedup();
                return Ok(freed);
            };
            freed.extend(self.release_in_blocks(handle, &rec.blocks)?);
            match self.store.delete(&key, Some(rev)) {
                Ok(_) => {
                    freed.sort();
                    freed.dedup();
                    return Ok(freed);
                }
                // The record changed (a concurrent assign under the same handle): go again.
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(IpamError::Contention(key))
    }

    /// Releases every address held by the handle, then deletes the handle record. A second
    /// call returns Ok(empty).
    pub fn release_by_handle(&self, handle: &str) -> Result<Vec<IpAddr>, IpamError> {
        self.release_handle(handle, &[])
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
        let mut out: BTreeMap<String, (Handle, Vec<IpNet>)> = BTreeMap::new();
        // Records first: an allocation made after this read still shows up from its block.
        let (recs, _) = list_json::<HandleRecord>(self.store, keys::HANDLES)?;
        for (key, rec, _) in recs {
            let id = key.strip_prefix(keys::HANDLES).unwrap_or(&key).to_string();
            let h = Handle {
                id: id.clone(),
                addrs: Vec::new(),
                attrs: rec.attrs,
            };
            out.insert(id, (h, Vec::new()));
        }
        for b in self.blocks()? {
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
        Ok(out)
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
                freed.extend(self.release_handle(&h.id, &blocks)?);
            }
        }
        freed.sort();
        Ok(freed)
    }
}

#[cfg(test)]
mod tests;
