//! The first programming of a node's table when the kernel has none (a node starting): `nft`
//! creates the table with everything except the proxy's map elements, then one nfnetlink batch
//! ([`crate::nft::elements`]) adds those, with the dispatch maps' elements, which
//! come from the service map and are made one at a time as the batch is encoded. At 30k
//! services that is 300k endpoint elements, which `nft` spends seconds parsing and encoding
//! (and which, all made first as text, were a third of the agent's peak memory). The two transactions are each
//! atomic; between them the proxy's maps are empty, so service addresses are not yet
//! translated, exactly as before the agent ran. Policy sets and everything else are filled in
//! the first transaction, so no policy is ever seen half-built.

use crate::netns::NetNs;
use crate::nft::elements::{self as nft_elements, Element, LazyAdditions, SetChange};
use crate::nft::NftError;
use malla_calc::nft::{Map, Table};
use malla_calc::services::{dispatch, ServiceMap};

use crate::nft::diff as element_diff;

/// The table without the proxy maps' elements, and those elements as additions; a map whose
/// layout cannot be encoded keeps its elements in the table. (The dispatch maps' elements are
/// not in the table: see [`dispatch_additions`].)
pub fn split(table: &Table) -> (Table, Vec<SetChange>) {
    let mut rest = Table {
        family: table.family.clone(),
        name: table.name.clone(),
        sets: table.sets.clone(),
        maps: Default::default(),
        chains: table.chains.clone(),
    };
    let mut batch = Vec::new();
    for (name, m) in &table.maps {
        let layout = malla_calc::services::is_proxy_map(name)
            .then(|| element_diff::map_layout(m))
            .flatten();
        match layout {
            Some(layout) if !m.flags.iter().any(|f| f == "interval") => {
                rest.maps.insert(
                    name.clone(),
                    Map {
                        type_: m.type_.clone(),
                        value: m.value.clone(),
                        flags: m.flags.clone(),
                        counter: m.counter,
                        size: m.size,
                        elements: Default::default(),
                    },
                );
                if !m.elements.is_empty() {
                    batch.push(SetChange {
                        set: name.clone(),
                        layout,
                        delete: Vec::new(),
                        add: m
                            .elements
                            .iter()
                            .map(|(k, v)| Element::pair(k.clone(), v.clone()))
                            .collect(),
                    });
                }
            }
            _ => {
                rest.maps.insert(name.clone(), m.clone());
            }
        }
    }
    (rest, batch)
}

/// The dispatch maps' elements, which follow from `services` (see
/// [`malla_calc::services::dispatch`]), made as the batch is encoded.
pub fn dispatch_additions<'a>(table: &Table, services: &'a ServiceMap) -> Vec<LazyAdditions<'a>> {
    let mut out = Vec::new();
    for (name, lists) in dispatch::by_map(services) {
        let Some(layout) = table.maps.get(&name).and_then(element_diff::map_layout) else {
            continue;
        };
        out.push(LazyAdditions {
            set: name,
            layout,
            elements: Box::new(
                dispatch::lazy_elements(lists).map(|(key, value)| Element::pair(key, value)),
            ),
        });
    }
    out
}

/// How long each part of a cold load took.
#[derive(Debug, Clone, Copy)]
pub struct Timings {
    /// Splitting and rendering the table without the proxy maps' elements, and `nft -f`.
    pub table: std::time::Duration,
    /// The elements' nfnetlink batch.
    pub elements: std::time::Duration,
    /// How many elements the batch carried.
    pub element_count: usize,
}

/// Creates `table`, rendered from `services`, in two transactions (see the module doc).
pub fn apply(
    netns: Option<&NetNs>,
    table: &Table,
    services: &ServiceMap,
) -> Result<Timings, NftError> {
    let family = element_diff::family(&table.family)
        .ok_or_else(|| NftError::Rejected(format!("table family {}", table.family)))?;
    let start = std::time::Instant::now();
    let (rest, batch) = split(table);
    crate::nft::apply(netns, &malla_calc::nft::render_full(&rest))?;
    drop(rest);
    let table_done = start.elapsed();
    let lazy = dispatch_additions(table, services);
    let element_count = nft_elements::apply_lazy(netns, family, &table.name, &batch, lazy)?;
    Ok(Timings {
        table: table_done,
        elements: start.elapsed() - table_done,
        element_count,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nft::elements::{Layout, Value};
    use malla_calc::nft::Set;

    /// A plain service's endpoints, which the table does not hold, are added lazily.
    #[test]
    fn the_dispatch_elements_come_from_the_service_map() {
        use malla_api::service::*;
        let svc = Service {
            namespace: "default".into(),
            name: "web".into(),
            cluster_ips: vec!["198.19.64.10".parse().unwrap()],
            ports: vec![ServicePort {
                port: 80,
                ..ServicePort::default()
            }],
            ..Service::default()
        };
        let endpoint = |ip: &str| Endpoint {
            addresses: [ip.parse().unwrap()].into_iter().collect(),
            conditions: EndpointConditions::default(),
            node_name: Some("node-b".into()),
            target: None,
        };
        let slice = EndpointSlice {
            namespace: "default".into(),
            name: "web-1".into(),
            service: "web".into(),
            address_type: AddressType::IPv4,
            endpoints: vec![endpoint("198.18.0.1"), endpoint("198.18.0.2")],
            ports: vec![EndpointPort {
                name: String::new(),
                protocol: Protocol::Tcp,
                port: 8080,
            }],
        };
        let map =
            malla_calc::services::build(&[(&svc).into()], &[(&slice).into()], "node-a", &[], &[]);
        let table = malla_calc::masquerade::node_table(&[], &map);
        assert!(table.maps["dispatch-v4-tcp"].elements.is_empty());
        let (rest, batch) = split(&table);
        assert!(rest.maps["dispatch-v4-tcp"].elements.is_empty());
        assert!(batch.iter().all(|c| c.set != "dispatch-v4-tcp"));
        let lazy = dispatch_additions(&table, &map);
        let names: Vec<&str> = lazy.iter().map(|l| l.set.as_str()).collect();
        assert_eq!(names, ["dispatch-v4-tcp"]);
        let added: Vec<(String, Option<String>)> = lazy
            .into_iter()
            .flat_map(|l| l.elements)
            .map(|e| (e.key.to_string(), e.value.map(|v| v.to_string())))
            .collect();
        let expected = [
            ("198.19.64.10 . 80 . 0", "198.18.0.1 . 8080"),
            ("198.19.64.10 . 80 . 1", "198.18.0.2 . 8080"),
        ]
        .map(|(k, v)| (k.to_string(), Some(v.to_string())));
        assert_eq!(added, expected);
    }

    #[test]
    fn only_the_proxy_maps_lose_their_elements() {
        let mut t = Table::new("inet", "malla");
        for (name, value) in [
            ("endpoints-v4-tcp-00", "ip daddr . tcp dport"),
            ("service-ips-v4", "verdict"),
            ("pol-in-x-tcp", "verdict"),
        ] {
            t.maps.insert(
                name.into(),
                Map {
                    type_: if name.starts_with("endpoints") {
                        "typeof numgen random mod 2".into()
                    } else if name.starts_with("pol") {
                        "inet_service".into()
                    } else {
                        "ipv4_addr . inet_proto . inet_service".into()
                    },
                    value: value.into(),
                    flags: if name.starts_with("pol") {
                        vec!["interval".into()]
                    } else {
                        Vec::new()
                    },
                    counter: false,
                    size: None,
                    elements: [(
                        if name.starts_with("endpoints") {
                            "0"
                        } else if name.starts_with("pol") {
                            "80-90"
                        } else {
                            "198.19.64.2 . tcp . 80"
                        }
                        .parse()
                        .unwrap(),
                        if value == "verdict" {
                            "goto x"
                        } else {
                            "198.18.0.5 . 80"
                        }
                        .parse()
                        .unwrap(),
                    )]
                    .into(),
                },
            );
        }
        t.sets.insert(
            "peers".into(),
            Set {
                type_: "ipv4_addr".into(),
                elements: ["198.18.0.9".parse().unwrap()].into(),
                ..Set::default()
            },
        );
        let (rest, batch) = split(&t);
        assert!(rest.maps["endpoints-v4-tcp-00"].elements.is_empty());
        assert!(rest.maps["service-ips-v4"].elements.is_empty());
        assert_eq!(rest.maps["pol-in-x-tcp"], t.maps["pol-in-x-tcp"]);
        assert_eq!(rest.sets, t.sets);
        let names: Vec<&str> = batch.iter().map(|c| c.set.as_str()).collect();
        assert_eq!(names, ["endpoints-v4-tcp-00", "service-ips-v4"]);
        assert_eq!(batch[1].layout.value, Value::Verdict);
        assert_eq!(
            batch[0].layout,
            Layout {
                key: vec![crate::nft::elements::Kind::HostU32],
                value: Value::Data(vec![
                    crate::nft::elements::Kind::Ipv4,
                    crate::nft::elements::Kind::Port
                ]),
            }
        );
    }
}
