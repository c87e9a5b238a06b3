//! The node agent: registers its node, then keeps the kernel equal to the calculation's desired
//! state — routes to other nodes' blocks (direct or VXLAN), the host side of local pods, and the
//! masquerade table — from a copy of the cluster kept current by a datastore watch
//! ([`mirror`]), applying each change as it comes and resyncing periodically.
//!
//! A restart adopts what the kernel has: it diffs against the routes stamped with Malla's
//! protocol, the VXLAN device's neighbours and FDB, and only adds what is missing and removes
//! what is stale. Nothing is torn down at start or exit, so established traffic never notices.

pub mod bgp;
pub mod cni_housekeeping;
pub mod config_dir;
pub mod dns;
pub mod flows;
pub mod health;
pub mod http;
pub mod metrics;
pub mod mirror;
pub mod registration;
pub mod uninstall;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use malla_calc::ClusterView;
use malla_dataplane::driver::{Driver, Update};
use malla_dataplane::linux::LinuxDriver;
use malla_ipam::node_cache::NodeCache;
use malla_store::{Store, Syncer};

/// How the agent is started.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub node: String,
    pub datastore: malla_store::DatastoreSpec,
    /// The interface facing the other nodes.
    pub underlay_interface: String,
    /// Full resync period, repairing drift even without datastore changes.
    pub resync: Duration,
    /// A directory of cluster settings (a mounted ConfigMap: `routing`, `pools.yaml`, …) whose
    /// missing parts the agent writes to the datastore at start ([`config_dir`]).
    pub config_dir: Option<PathBuf>,
    /// Written once the first full sync is applied (readiness for the CNI plugin's STATUS), then
    /// whenever the newest convergence barrier applied through changes
    /// ([`malla_store::barrier::ReadyFile`]; how the lab and tests wait for convergence).
    pub ready_file: Option<PathBuf>,
    /// Where the agent serves `/healthz`, `/readyz` and `/metrics` ([`http`]); None: nowhere.
    pub http_listen: Option<SocketAddr>,
    /// The host's CNI configuration directory, whose plugin kubeconfig the agent keeps current
    /// with its rotating service-account token ([`cni_housekeeping`]); None: not refreshed.
    pub cni_conf_dir: Option<PathBuf>,
    /// Collect flow logs ([`flows`]): conntrack accounting on in the node's namespace, the
    /// NFLOG group of the ruleset's log statements read, `/flows` served.
    pub flow_logs: bool,
    /// The host's CNI plugin directory (as mounted in the agent's pod): the plugin an uninstall
    /// removes ([`uninstall`]); None: left alone.
    pub cni_bin_dir: Option<PathBuf>,
    /// The DaemonSet running this agent: on SIGTERM, when it is gone, the agent cleans the node
    /// ([`uninstall`]); None: SIGTERM ends the agent and the node keeps its dataplane.
    pub uninstall_with: Option<uninstall::Owner>,
    /// Serve Services (ClusterIPs, NodePorts, external and LoadBalancer addresses); false: the
    /// agent ignores Services and EndpointSlices and another proxy (kube-proxy) serves them.
    pub services: bool,
}

/// The agent's default HTTP address (the node's loopback: a hostNetwork pod's probes reach it).
pub const DEFAULT_HTTP_LISTEN: &str = "127.0.0.1:9099";

/// Reads everything the calculation needs (one list per kind; malformed records are skipped
/// with a warning, as the agent's [`mirror::Mirror`] does).
pub fn read_view(store: &dyn Store) -> anyhow::Result<ClusterView> {
    Ok(mirror::Mirror::load(store, "")?.into_view())
}

/// How long one turn of the loop waits for the feed. It only bounds a turn (the heartbeat, the
/// resync period); nothing is inferred from the feed being quiet.
const FEED_WAIT: Duration = Duration::from_millis(250);

/// What the feed delivered that the ready file reports once it is applied: the newest
/// convergence barrier ([`malla_store::barrier`]) and the last change's revision.
#[derive(Debug, Default)]
struct Received {
    barrier: u64,
    revision: Option<malla_store::Version>,
}

impl Received {
    /// Notes a batch before the mirror takes it.
    fn note(&mut self, events: &[malla_store::SyncEvent]) {
        use malla_store::{Resource, SyncEvent, Version};
        for e in events {
            let SyncEvent::Update(u) = e else { continue };
            if let Some(Resource::Barrier(b)) = &u.resource {
                self.barrier = self.barrier.max(b.seq);
            }
            self.revision = match (&u.revision, self.revision.take()) {
                // A re-list's deletion has no revision of its own.
                (Version::Relisted, last) => last,
                // A listing comes in key order: the newest counted revision is the largest.
                (Version::Revision(r), Some(Version::Revision(last))) => {
                    Some(Version::Revision(last.max(*r)))
                }
                (v, _) => Some(v.clone()),
            };
        }
    }

    /// The ready file saying so.
    fn ready_file(&self) -> malla_store::barrier::ReadyFile {
        use malla_store::Version;
        malla_store::barrier::ReadyFile {
            barrier: self.barrier,
            revision: self.revision.as_ref().map(|v| match v {
                Version::Revision(r) => r.to_string(),
                Version::ResourceVersion(rv) => format!("rv:{rv}"),
                Version::Relisted => "re-list".to_string(),
            }),
        }
    }
}

/// Runs the agent until the process is killed.
///
/// The loop: follow the datastore's [`Syncer`] into a [`mirror::Mirror`]; nothing is applied
/// until it says `InSync` (the mirror then holds the whole cluster), then each batch of
/// changes updates the mirror and the calculation graph's nodes, and the driver gets their
/// deltas: the links node's (routes, VXLAN peers, local pods: [`Update::Links`]), the services'
/// and the policy node's element changes ([`Update::Endpoints`]). The whole node is computed
/// and applied again ([`Update::Full`]) at the first sync and for a change no node follows
/// (the cluster config, a pool, this node's own record, more than set members of a policy);
/// every `resync` the kernel is checked against what was applied, repairing drift. When the datastore is
/// away the kernel is left as it is and the syncer resumes by itself; if the history it needs
/// is gone, it lists again and says `InSync` again.
///
/// Readiness and "applied through" come from the feed and the driver, never from timers:
/// `/readyz` turns 200 once `InSync` was seen and the driver acknowledged the full apply that
/// followed, and stays 200 while the datastore is away or the feed re-lists (the kernel keeps
/// the last state applied, and traffic flows). The ready file appears at that first apply and
/// then reports the newest convergence barrier ([`malla_store::barrier`]) the feed delivered
/// once everything before it is acknowledged by the driver.
/// A datastore that cannot be opened at start is retried every second; the HTTP server
/// ([`http`]) answers from the start (`/readyz` 503 until the first sync is applied).
pub fn run(cfg: AgentConfig) -> anyhow::Result<()> {
    // Held for the agent's lifetime: the CNI plugin's STATUS knows the agent runs while it is
    // locked, and a second agent for the same node refuses to start.
    let _lock = match &cfg.ready_file {
        Some(ready) => Some(hold_agent_lock(ready)?),
        None => None,
    };
    uninstall::watch_sigterm(&cfg)?;
    // Serving before anything waits on the datastore: probes and metrics answer while it is away.
    cni_housekeeping::write_node_name_file(&cfg);
    cni_housekeeping::start_token_refresh(&cfg);
    let health = health::Health::default();
    let metrics = Arc::new(metrics::Metrics::new());
    let flow_service = if cfg.flow_logs {
        match flows::FlowService::start(&cfg.node, metrics.flows.clone()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "flow logs are off");
                None
            }
        }
    } else {
        None
    };
    if let Some(addr) = cfg.http_listen {
        http::spawn_with(addr, health.clone(), metrics.clone(), flow_service.clone())?;
    }
    // The feed's revision the flow directory was built at: rebuilt at the top of the turn after
    // a change arrived, so before the apply (and the ready file) that reports it.
    let mut flow_view: Option<String> = None;
    let beat = || health.heartbeat.beat();
    let store = loop {
        beat();
        match cfg.datastore.open() {
            Ok(store) => break store,
            Err(e) => {
                tracing::warn!(error = %e, "opening datastore {}; retrying", cfg.datastore);
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    };
    // Shared with the CNI housekeeping thread: one connection to the datastore per agent.
    let store: Arc<dyn Store> = Arc::from(store);
    cni_housekeeping::start_reclaimer(&cfg, store.clone());
    let store: &dyn Store = &*store;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    rt.block_on(async {
        let mut plane = LinuxDriver::connect(&cfg.node, &cfg.underlay_interface)?;
        // DNS-name policy rules learn addresses from the pods' answers ([`dns`]).
        let dns_proxy = dns::DnsProxy::start()
            .map_err(|e| tracing::warn!(error = %format!("{e:#}"), "DNS proxy is off"))
            .ok();
        plane.start().await?;
        // IPv4 anti-spoofing is the kernel's reverse-path filter unless this node's
        // `conf.all.rp_filter` makes it loose (then the nft chain checks IPv4 too).
        let kernel_reverse_path = malla_dataplane::linux::guard::kernel_reverse_path_usable();
        if !kernel_reverse_path {
            tracing::info!(node = %cfg.node, "net.ipv4.conf.all.rp_filter is 2 (loose): anti-spoofing checks IPv4 in nft");
        }
        if let Some(dir) = &cfg.config_dir {
            while let Err(e) = config_dir::apply(store, dir) {
                beat();
                tracing::warn!(error = %format!("{e:#}"), "applying cluster settings from {}; retrying", dir.display());
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
        while let Err(e) = registration::register(store, &cfg.node, &plane).await {
            beat();
            tracing::warn!(node = %cfg.node, error = %format!("{e:#}"), "registering the node failed; retrying");
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let node_cache = match &cfg.ready_file {
            Some(f) => {
                let path = NodeCache::path_beside(f);
                Some(NodeCache::open(&path).with_context(|| format!("opening {}", path.display()))?)
            }
            None => None,
        };
        let mut synced: Option<(mirror::Mirror, Box<dyn Syncer + '_>)> = None;
        // Whether the syncer has delivered the whole cluster once.
        let mut in_sync = false;
        // Whether the kernel reflects the mirror (after the first apply), what the feed
        // delivered, and what the ready file says.
        let mut applied = false;
        let mut received = Received::default();
        let mut reported: Option<malla_store::barrier::ReadyFile> = None;
        // What changed since the last apply: services whose Service or slices changed, or
        // anything else (which needs the whole node computed).
        let mut pending_services: std::collections::BTreeSet<String> = Default::default();
        // Policy inputs changed since the last apply, and the policy node (the program kept
        // current change by change; built by the first full apply) that follows them.
        let mut pending_policy = malla_calc::policy::PolicyInputs::default();
        let mut policy_node: Option<malla_calc::policy::PolicyNode> = None;
        // Node, block or endpoint records changed: the links node has a delta.
        let mut pending_links = false;
        // A pool or this node's own record changed: the pool sets and the service map's
        // addresses follow.
        let mut pending_pools = false;
        let mut pending_own_node = false;
        let mut other_dirty = true;
        let mut cache_dirty = true;
        // After a full list: the listing's buffers are garbage once the first apply is done.
        let mut trim_due = false;
        // A full apply ran since the heap was last trimmed: it is trimmed once the feed goes
        // quiet (a burst of changes computes the node many times; its peak is not kept).
        let mut trim_when_quiet = false;
        let mut last_full = Instant::now();
        // Since when changes wait to be applied (the sync latency's start); whether the
        // datastore was lost since the agent last heard from it.
        let mut pending_since: Option<Instant> = None;
        let mut lost = false;
        // `routing: bgp`: the node's BIRD, configured from the mirror.
        let mut bgp = bgp::BgpNode::new(cfg.ready_file.as_deref());
        loop {
            if uninstall::stop_requested() {
                uninstall::park().await;
            }
            beat();
            metrics.pending(pending_since.map(|t| t.elapsed()).unwrap_or_default());
            if let (Some(fs), Some((mirror, _)), true) = (&flow_service, synced.as_ref(), in_sync) {
                let rev = format!("{:?}", received.revision);
                if flow_view.as_ref() != Some(&rev) {
                    fs.set_view(mirror.view());
                    flow_view = Some(rev);
                }
            }
            if let Some(cache) = &node_cache {
                // What pods got while the datastore was away goes in before anything else.
                if cache.has_pending().unwrap_or(false) {
                    match cache.settle(store) {
                        Ok(done) => {
                            tracing::info!(node = %cfg.node, added = done.added, released = done.released, "settled offline IPAM changes");
                            for (ip, handle) in &done.conflicts {
                                tracing::error!(node = %cfg.node, %ip, %handle, "an address given out offline was taken meanwhile");
                            }
                            if cache.has_pending().unwrap_or(false) {
                                // Written again meanwhile (a plugin offline still): not a spin.
                                tokio::time::sleep(Duration::from_millis(200)).await;
                            }
                        }
                        Err(e) => {
                            tracing::warn!(node = %cfg.node, error = %e, "settling offline IPAM changes; retrying");
                            tokio::time::sleep(Duration::from_millis(500)).await;
                        }
                    }
                    continue;
                }
            }
            let Some((mirror, syncer)) = synced.as_mut() else {
                // The datastore may be away (restarting, partitioned): keep what the kernel
                // has, which keeps established traffic flowing, and retry until it answers.
                match store.syncer() {
                    Ok(s) => {
                        synced = Some((mirror::Mirror::new(&cfg.node), s));
                        pending_since = Some(Instant::now());
                    }
                    Err(e) => {
                        tracing::warn!(node = %cfg.node, error = %e, "datastore unreachable; keeping the dataplane as it is");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
                continue;
            };
            if !in_sync {
                // Listing: nothing is computed from a partial cluster.
                match syncer.next(FEED_WAIT) {
                    Ok(events) => {
                        received.note(&events);
                        let (_, done) = mirror.apply_sync(served(cfg.services, events));
                        if done {
                            in_sync = true;
                            tracing::info!(node = %cfg.node, "listed the cluster");
                            if std::mem::take(&mut lost) {
                                metrics.reconnected();
                            }
                            other_dirty = true;
                            trim_due = true;
                            cache_dirty = true;
                        }
                    }
                    Err(e) => {
                        lost = true;
                        tracing::warn!(node = %cfg.node, error = %e, "listing the cluster; keeping the dataplane as it is");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
                continue;
            }
            if let (Some(cache), true, Some(me)) = (&node_cache, cache_dirty, mirror.me()) {
                match cache.snapshot(me, &mirror.view().config, mirror.own_blocks().cloned().collect()) {
                    Ok(()) => cache_dirty = false,
                    Err(e) => tracing::warn!(node = %cfg.node, error = %e, "writing the node cache"),
                }
            }
            // Changes take their paths even when a resync is due (a busy cluster would
            // otherwise compute the whole node every period); the check against the kernel
            // follows once nothing is pending.
            {
                // Host endpoint policy is rendered with the whole node: pods' addresses feed
                // its selector sets, other nodes' addresses its VXLAN exemption.
                let view = mirror.view();
                let hosts = !view.calico.host_endpoints.is_empty() || view.config.auto_host_endpoints;
                // With tiered policy, pods alone changed: the tier member path may follow them
                // (it declines, and the whole node is computed, when it cannot).
                let tier_members = policy_node.is_some()
                    && malla_calc::policy::tiermembers::followable(view, &pending_policy);
                if (!pending_policy.is_empty()
                    && (view.calico.reads_endpoints() || view.calico.applies_to_workloads())
                    && !tier_members)
                    || (pending_links && hosts && view.config.routing == malla_api::RoutingMode::Vxlan)
                {
                    other_dirty = true;
                }
            }
            let resync_due = last_full.elapsed() >= cfg.resync;
            if !pending_services.is_empty() && !other_dirty && applied {
                // Only Services or slices changed: the service path, which touches those
                // services' own objects alone (created, deleted or changed).
                let view = mirror.view();
                let started = Instant::now();
                let plan = plane.service_model().and_then(|(table, map)| {
                    malla_calc::services::plan_service_changes(table, map, &view.services, &view.endpoint_slices, &cfg.node, &pending_services)
                });
                if let Some(plan) = plan {
                    let done = plane.apply(Update::Endpoints(plan)).await;
                    metrics.applied(metrics::ApplyPath::Endpoints, started.elapsed());
                    match done {
                        Ok(_) => {
                            if let Some((table, map)) = plane.service_model() {
                                metrics.programmed_model(table, map, view.policies.len());
                            }
                            tracing::info!(node = %cfg.node, services = ?pending_services, "services updated in place");
                            applied = true;
                            pending_services.clear();
                            if let Some(since) = pending_since.take() {
                                metrics.synced(since.elapsed());
                            }
                        }
                        Err(e) => {
                            metrics.apply_failed();
                            tracing::warn!(node = %cfg.node, error = %format!("{e:#}"), "endpoint update failed; computing everything");
                        }
                    }
                }
            }
            if pending_links && !other_dirty && applied {
                // Routes, VXLAN peers or local pods: the links node's delta, and nothing else.
                let delta = mirror.links_mut().take_delta();
                pending_links = false;
                for p in &delta.new_problems {
                    tracing::warn!(node = %cfg.node, problem = %p, "cannot route");
                }
                if !delta.is_empty() {
                    let started = Instant::now();
                    let done = plane.apply(Update::Links(delta)).await;
                    metrics.applied(metrics::ApplyPath::Links, started.elapsed());
                    match done {
                        Ok(stats) => {
                            metrics.programmed_links(mirror.links_mut());
                            tracing::info!(node = %cfg.node, ?stats, "links updated in place");
                        }
                        Err(e @ malla_dataplane::driver::DriverError::Recompute(_)) => {
                            tracing::info!(node = %cfg.node, reason = %e, "links update left to a full computation");
                            other_dirty = true;
                        }
                        Err(e) => {
                            metrics.apply_failed();
                            tracing::warn!(node = %cfg.node, error = %format!("{e:#}"), "links update failed; computing everything");
                            other_dirty = true;
                        }
                    }
                }
                if !other_dirty && pending_services.is_empty() && pending_policy.is_empty() {
                    if let Some(since) = pending_since.take() {
                        metrics.synced(since.elapsed());
                    }
                }
            }
            if (pending_pools || pending_own_node) && !other_dirty && applied {
                // A pool: its sets patched (text: they are interval sets). This node's own
                // record: its addresses in the model's service map, which no rule reads.
                let view = mirror.view();
                let started = Instant::now();
                let plan = plane.service_model().map(|(table, map)| {
                    if pending_own_node {
                        let ips: std::collections::BTreeSet<std::net::IpAddr> =
                            malla_calc::routes::node_ips(view, &cfg.node).into_iter().collect();
                        map.node_ips = ips.into_iter().collect();
                    }
                    let patch = if pending_pools {
                        let cidrs: std::collections::BTreeSet<ipnet::IpNet> =
                            view.pools.iter().map(|p| p.cidr).collect();
                        map.pod_cidrs = cidrs.into_iter().collect();
                        malla_calc::masquerade::pools_patch(table, &view.pools)
                    } else {
                        malla_calc::nft::patch::Patch::new(&table.family, &table.name)
                    };
                    patch.apply_to(table);
                    malla_calc::services::EndpointPlan::patch(patch)
                });
                let done = match plan {
                    Some(plan) => apply_plan(&mut plane, &metrics, plan, started, &cfg.node, "pool").await,
                    None => false,
                };
                if done {
                    tracing::info!(node = %cfg.node, pools = pending_pools, own_node = pending_own_node, "pools and node addresses updated in place");
                    pending_pools = false;
                    pending_own_node = false;
                    if pending_services.is_empty() && pending_policy.is_empty() && !pending_links {
                        if let Some(since) = pending_since.take() {
                            metrics.synced(since.elapsed());
                        }
                    }
                } else {
                    other_dirty = true;
                }
            }
            if !pending_policy.is_empty()
                && pending_policy.policies.is_empty()
                && mirror.view().policies.is_empty()
                && !mirror.view().calico.applies_to_workloads()
            {
                // No NetworkPolicy exists: pods' and namespaces' labels program nothing (the
                // routes and local pods read endpoint records, which count as `other_dirty`).
                pending_policy.clear();
                if !other_dirty && pending_services.is_empty() {
                    if let Some(since) = pending_since.take() {
                        metrics.synced(since.elapsed());
                    }
                }
            }
            if !pending_policy.is_empty() && !other_dirty && applied {
                // Only policy inputs changed: the policy node follows them; set members that
                // moved are changed in place, anything else re-renders the policy part of the
                // table alone (a patch of what differs).
                let view = mirror.view();
                let started = Instant::now();
                // No node yet (no NetworkPolicy before this batch): built now, one compile, and
                // the policy part of the table rendered from it.
                let tiered = view.calico.applies_to_workloads();
                let built = policy_node.is_none() && !view.policies.is_empty() && !tiered;
                if built {
                    policy_node = Some(malla_calc::policy::PolicyNode::new(view, &cfg.node));
                }
                let plan = policy_node.as_mut().and_then(|node| {
                    let (table, _) = plane.service_model()?;
                    if built {
                        return Some(node.plan_render(table));
                    }
                    if tiered {
                        // The tier chains' selector sets too, or the whole node.
                        return node.plan_tiered(view, &pending_policy, table);
                    }
                    let delta = node.follow(view, &pending_policy)?;
                    node.plan(table, &delta)
                });
                // Set members moved in place, or the policy objects patched.
                let rendered = plan
                    .as_ref()
                    .is_some_and(|p| p.changes.iter().any(|c| c.patch.is_some()));
                let done = match plan {
                    Some(plan) => apply_plan(&mut plane, &metrics, plan, started, &cfg.node, "policy").await,
                    None => false,
                };
                if view.policies.is_empty() && !tiered {
                    // The last NetworkPolicy went: the node would keep a copy of every pod for
                    // nothing (the next one builds it again).
                    policy_node = None;
                }
                if done {
                    if let Some((table, map)) = plane.service_model() {
                        metrics.programmed_model(table, map, view.policies.len());
                    }
                    tracing::info!(node = %cfg.node, pods = pending_policy.pods.len(), policies = pending_policy.policies.len(), namespaces = pending_policy.namespaces.len(), "{}", if rendered { "policy objects patched in place" } else { "policy set members updated in place" });
                    pending_policy.clear();
                    if let Some(since) = pending_since.take() {
                        metrics.synced(since.elapsed());
                    }
                }
            }
            if !pending_policy.is_empty() {
                // More than set members: the full path, with the policy node as it follows the
                // view (following the same inputs again changes nothing).
                other_dirty = true;
            }
            let dirty = other_dirty
                || pending_links
                || pending_pools
                || pending_own_node
                || !pending_services.is_empty();
            if resync_due && !dirty {
                // Nothing changed since the last apply: check the kernel against it, without
                // computing the whole node again (at 30k services that is ~0.5 s of CPU).
                let started = Instant::now();
                let repaired = plane.resync().await;
                metrics.applied(metrics::ApplyPath::Repair, started.elapsed());
                match repaired {
                    Ok(stats) => {
                        if stats.changed() {
                            tracing::info!(node = %cfg.node, ?stats, "repaired drift");
                        }
                        last_full = Instant::now();
                    }
                    Err(e) => {
                        metrics.apply_failed();
                        tracing::error!(node = %cfg.node, error = %format!("{e:#}"), "repair failed; computing everything");
                        other_dirty = true;
                    }
                }
            }
            if other_dirty
                || pending_links
                || pending_pools
                || pending_own_node
                || !pending_services.is_empty()
            {
                // The policy program from the policy node: it follows the batch's changes, and
                // is built (one full compile) only at the first apply or when it cannot follow.
                // Without any NetworkPolicy there is no node: it would hold a copy of every pod
                // (~2 KiB each) for nothing.
                let view = mirror.view();
                // With tiered policy the node is kept too: its tier member path follows pods.
                let node = (!view.policies.is_empty() || view.calico.applies_to_workloads()).then(|| {
                    let mut n = policy_node
                        .take()
                        .and_then(|mut n| n.follow(view, &pending_policy).map(|_| n))
                        .unwrap_or_else(|| malla_calc::policy::PolicyNode::new(view, &cfg.node));
                    // Calico's objects may have changed: their selector sets are read again.
                    n.calico_changed();
                    n
                });
                let program = match &node {
                    Some(node) => node.program(),
                    None => malla_calc::policy::compile(&view.policies, &view.namespaces, &malla_calc::routes::policy_pods(view), &cfg.node),
                };
                // The links as the links node has them (it followed every change; the delta it
                // holds is in them).
                let links = {
                    let links = mirror.links_mut();
                    links.take_delta();
                    malla_calc::links::Links {
                        kernel_reverse_path,
                        ..links.links()
                    }
                };
                pending_links = false;
                let view = mirror.view();
                let desired = malla_calc::routes::compute_with_links(view, &cfg.node, &program, links);
                if let Some(p) = &dns_proxy {
                    let (sets, ip) = malla_calc::policy::dns::node_dns_sets(view, &cfg.node);
                    p.update(&sets, ip);
                }
                for p in &desired.problems {
                    tracing::warn!(node = %cfg.node, problem = %p, "cannot route");
                }
                let programmed = metrics::Programmed::of(&desired, mirror.view());
                let started = Instant::now();
                let done = plane.apply(Update::Full(Box::new(desired))).await;
                metrics.applied(metrics::ApplyPath::Full, started.elapsed());
                match done {
                    Ok(stats) => {
                        metrics.programmed(&programmed);
                        if let Some(since) = pending_since.take() {
                            metrics.synced(since.elapsed());
                        }
                        if stats.changed() {
                            tracing::info!(node = %cfg.node, ?stats, "dataplane converged");
                        }
                        if std::mem::take(&mut trim_due) {
                            trim_heap();
                        } else {
                            trim_when_quiet = true;
                        }
                        applied = true;
                        other_dirty = false;
                        pending_pools = false;
                        pending_own_node = false;
                        pending_services.clear();
                        pending_policy.clear();
                        policy_node = node;
                        last_full = Instant::now();
                        if !health.readiness.is_ready() {
                            health.readiness.set_ready();
                            tracing::info!(node = %cfg.node, "in sync");
                        }
                    }
                    Err(e) => {
                        metrics.apply_failed();
                        tracing::error!(node = %cfg.node, error = %format!("{e:#}"), "apply failed; retrying");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            }
            if applied {
                bgp.sync(mirror, &cfg.node);
            }
            if let (Some(f), true) = (&cfg.ready_file, applied) {
                // Everything the feed delivered is acknowledged by the driver: the newest
                // barrier it carried is applied through.
                let behind = other_dirty
                    || pending_links
                    || pending_pools
                    || pending_own_node
                    || !pending_services.is_empty();
                let now = received.ready_file();
                if !behind && reported.as_ref() != Some(&now) {
                    now.write(f)
                        .with_context(|| format!("writing {}", f.display()))?;
                    reported = Some(now);
                }
            }
            // Blocking here is fine: netlink replies are only awaited inside `apply`.
            match syncer.next(FEED_WAIT) {
                Ok(events) if events.is_empty() => {
                    let settled = !other_dirty && pending_policy.is_empty() && pending_services.is_empty();
                    if settled && std::mem::take(&mut trim_when_quiet) {
                        trim_heap();
                    }
                }
                Ok(events) => {
                    // The datastore answers again: its feed delivered.
                    if std::mem::take(&mut lost) {
                        metrics.reconnected();
                    }
                    received.note(&events);
                    let (changed, _) = mirror.apply_sync(served(cfg.services, events));
                    if changed.other || !changed.services.is_empty() || !changed.policy.is_empty() {
                        pending_since.get_or_insert_with(Instant::now);
                    }
                    if changed.links || changed.pools || changed.own_node {
                        pending_since.get_or_insert_with(Instant::now);
                    }
                    pending_pools |= changed.pools;
                    pending_own_node |= changed.own_node;
                    cache_dirty |= changed.node_cache;
                    if changed.links || changed.other || changed.own_node || !changed.services.is_empty() {
                        bgp.mark();
                    }
                    pending_links |= changed.links;
                    other_dirty |= changed.other;
                    pending_services.extend(changed.services);
                    pending_policy.extend(changed.policy);
                }
                Err(e) => {
                    lost = true;
                    tracing::warn!(node = %cfg.node, error = %e, "watching the datastore; keeping the dataplane as it is");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    })
}

/// A batch without its Services and EndpointSlices when another proxy serves them
/// ([`AgentConfig::services`] off): the service map stays empty.
fn served(services: bool, mut events: Vec<malla_store::SyncEvent>) -> Vec<malla_store::SyncEvent> {
    if !services {
        events.retain(|e| {
            !matches!(e, malla_store::SyncEvent::Update(u)
                if u.key.starts_with(malla_api::keys::SERVICES)
                    || u.key.starts_with(malla_api::keys::ENDPOINT_SLICES))
        });
    }
    events
}

/// Applies a plan made against the driver's model (an `Update::Endpoints`), recording its
/// duration, or its failure (`what` names it in the warning); whether it was applied. On
/// failure the driver has put the model back and the caller computes the whole node.
async fn apply_plan(
    plane: &mut LinuxDriver,
    metrics: &metrics::Metrics,
    plan: malla_calc::services::EndpointPlan,
    started: Instant,
    node: &str,
    what: &str,
) -> bool {
    let done = plane.apply(Update::Endpoints(plan)).await;
    metrics.applied(metrics::ApplyPath::Endpoints, started.elapsed());
    done.inspect_err(|e| {
        metrics.apply_failed();
        tracing::warn!(%node, error = %format!("{e:#}"), "{what} update failed; computing everything");
    })
    .is_ok()
}

/// Hands freed heap back to the kernel. glibc keeps it otherwise, and the agent's resident
/// size would stay at the peak of its last full list instead of what it holds.
fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory of the allocator's own arenas.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Takes the agent's exclusive lock beside its ready file.
fn hold_agent_lock(ready: &std::path::Path) -> anyhow::Result<std::fs::File> {
    let mut path = ready.as_os_str().to_owned();
    path.push(".lock");
    let f = std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(std::fs::TryLockError::WouldBlock) => {
            anyhow::bail!(
                "another agent holds {}",
                std::path::Path::new(&path).display()
            )
        }
        Err(std::fs::TryLockError::Error(e)) => Err(e).context("locking the agent lock file"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use malla_store::barrier::{Barrier, ReadyFile};
    use malla_store::{Resource, SyncEvent, Update, Version};

    fn update(key: &str, resource: Option<Resource>, revision: Version) -> SyncEvent {
        SyncEvent::Update(Update {
            key: key.into(),
            resource,
            revision,
        })
    }

    #[test]
    fn the_ready_file_reports_the_newest_barrier_and_revision_received() {
        let barrier = |seq| Some(Resource::Barrier(Barrier { seq }));
        let key = malla_api::keys::SYNC_BARRIER;
        let mut r = Received::default();
        assert_eq!(r.ready_file(), ReadyFile::default());
        // A listing: key order, not revision order; a barrier listed at 7.
        r.note(&[
            update(key, barrier(7), Version::Revision(40)),
            update("/malla/pools/a", None, Version::Revision(52)),
            update("/malla/pools/b", None, Version::Revision(12)),
            SyncEvent::InSync,
        ]);
        assert_eq!(
            r.ready_file(),
            ReadyFile {
                barrier: 7,
                revision: Some("52".into())
            }
        );
        // A re-list's deletions keep the revision; a barrier never goes back.
        r.note(&[
            update("/malla/pools/c", None, Version::Relisted),
            update(key, barrier(5), Version::Revision(60)),
        ]);
        assert_eq!(r.ready_file().barrier, 7);
        assert_eq!(r.ready_file().revision.as_deref(), Some("60"));
        // Kubernetes: opaque, the last one received.
        r.note(&[update(
            key,
            barrier(8),
            Version::ResourceVersion("x9".into()),
        )]);
        assert_eq!(
            r.ready_file(),
            ReadyFile {
                barrier: 8,
                revision: Some("rv:x9".into())
            }
        );
    }

    #[test]
    fn without_services_the_batch_loses_services_and_slices_only() {
        let batch = vec![
            update(
                &malla_api::keys::service("default", "web"),
                None,
                Version::Revision(1),
            ),
            update(
                &malla_api::keys::endpoint_slice("default", "web-abc"),
                None,
                Version::Revision(2),
            ),
            update(
                &malla_api::keys::pod("default", "a"),
                None,
                Version::Revision(3),
            ),
            SyncEvent::InSync,
        ];
        assert_eq!(served(true, batch.clone()), batch);
        assert_eq!(
            served(false, batch.clone()),
            vec![batch[2].clone(), SyncEvent::InSync]
        );
    }
}
