//! Element changes over nfnetlink against the real kernel: the table is made and read back by
//! `nft`, in a namespace of the test's own.

use super::*;

/// A key from nft's text.
fn key(s: &str) -> Key {
    s.parse().unwrap()
}

/// A map value from nft's text.
fn val(s: &str) -> element::Value {
    s.parse().unwrap()
}

/// A throwaway namespace, deleted on drop.
struct Scratch(String);

impl Scratch {
    fn new(tag: &str) -> Option<Scratch> {
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipping: not root");
            return None;
        }
        let name = format!("malla-nfte-{}-{tag}", std::process::id());
        crate::netns::create(&name).expect("creating the namespace");
        Some(Scratch(name))
    }

    fn ns(&self) -> NetNs {
        NetNs::open_named(&self.0).unwrap()
    }
}

/// A scratch namespace holding [`TABLE`], and a handle on it; None when not root.
fn with_table(tag: &str) -> Option<(Scratch, NetNs)> {
    let s = Scratch::new(tag)?;
    let ns = s.ns();
    crate::nft::apply(Some(&ns), TABLE).unwrap();
    Some((s, ns))
}

/// The `i`th of many distinct `address . port` values (198.18.0.1 onwards, 250 per /24).
fn many(i: u32) -> String {
    format!("198.18.{}.{} . 80", i / 250, i % 250 + 1)
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = crate::netns::delete(&self.0);
    }
}

const TABLE: &str = "table inet t {
  map ep4 { typeof numgen random mod 2 : ip daddr . tcp dport; counter; }
  map ep6 { typeof numgen random mod 2 : ip6 daddr . udp dport; }
  map ips { type ipv4_addr . inet_proto . inet_service : verdict; }
  set hairpin { type ipv4_addr . ipv4_addr; }
  set ports { type inet_service; }
  chain svc-a { }
}
";

fn numgen_map(name: &str, key_text_value: Vec<(&str, &str)>, six: bool) -> SetChange {
    SetChange {
        set: name.into(),
        layout: Layout {
            key: vec![Kind::HostU32],
            value: Value::Data(vec![if six { Kind::Ipv6 } else { Kind::Ipv4 }, Kind::Port]),
        },
        delete: Vec::new(),
        add: key_text_value
            .into_iter()
            .map(|(k, v)| Element {
                key: key(k),
                value: Some(val(v)),
                interval_end: false,
            })
            .collect(),
    }
}

/// `port` added to the set `ports`.
fn port_added(port: &str) -> SetChange {
    SetChange {
        set: "ports".into(),
        layout: Layout {
            key: vec![Kind::Port],
            value: Value::None,
        },
        delete: Vec::new(),
        add: vec![Element::key(key(port))],
    }
}

fn listed(ns: &NetNs) -> String {
    crate::nft::list_table(Some(ns), "inet", "t").unwrap()
}

#[test]
fn elements_of_every_layout_read_back_as_nft_wrote_them() {
    let Some((_s, ns)) = with_table("all") else {
        return;
    };
    let changes = vec![
        numgen_map(
            "ep4",
            vec![("0", "198.18.0.5 . 8080"), ("70000", "198.18.0.6 . 80")],
            false,
        ),
        numgen_map("ep6", vec![("3", "fd00::5 . 53")], true),
        SetChange {
            set: "ips".into(),
            layout: Layout {
                key: vec![Kind::Ipv4, Kind::Proto, Kind::Port],
                value: Value::Verdict,
            },
            delete: Vec::new(),
            add: vec![
                Element {
                    key: key("198.19.64.2 . tcp . 80"),
                    value: Some(val("goto svc-a")),
                    interval_end: false,
                },
                Element {
                    key: key("198.19.64.3 . udp . 53"),
                    value: Some(val("drop")),
                    interval_end: false,
                },
            ],
        },
        SetChange {
            set: "hairpin".into(),
            layout: Layout {
                key: vec![Kind::Ipv4, Kind::Ipv4],
                value: Value::None,
            },
            delete: Vec::new(),
            add: vec![Element {
                key: key("198.18.0.5 . 198.18.0.5"),
                value: None,
                interval_end: false,
            }],
        },
        port_added("30080"),
    ];
    apply(Some(&ns), NFPROTO_INET, "t", &changes).unwrap();
    let text = listed(&ns);
    for want in [
        "0 counter packets 0 bytes 0 : 198.18.0.5 . 8080",
        "70000 counter packets 0 bytes 0 : 198.18.0.6 . 80",
        "3 : fd00::5 . 53",
        "198.19.64.2 . tcp . 80 : goto svc-a",
        "198.19.64.3 . udp . 53 : drop",
        "198.18.0.5 . 198.18.0.5",
        "30080",
    ] {
        assert!(text.contains(want), "{want:?} missing from:\n{text}");
    }
    // Deleting and replacing: the endpoint at index 0 moves.
    let mut moved = numgen_map("ep4", vec![("0", "198.18.0.9 . 8080")], false);
    moved.delete = vec![Element {
        key: key("0"),
        value: None,
        interval_end: false,
    }];
    apply(Some(&ns), NFPROTO_INET, "t", &[moved]).unwrap();
    let text = listed(&ns);
    assert!(
        text.contains("0 counter packets 0 bytes 0 : 198.18.0.9 . 8080"),
        "{text}"
    );
    assert!(!text.contains("198.18.0.5 . 8080"), "{text}");
}

#[test]
fn a_failing_change_applies_nothing_and_says_why() {
    let Some((_s, ns)) = with_table("atomic") else {
        return;
    };
    let mut bad = numgen_map("ep4", vec![("1", "198.18.0.7 . 81")], false);
    // Not there: the whole batch is refused, the add above included.
    bad.delete = vec![Element {
        key: key("99"),
        value: None,
        interval_end: false,
    }];
    let err = apply(Some(&ns), NFPROTO_INET, "t", &[bad]).unwrap_err();
    assert!(err.to_string().contains("No such file"), "{err}");
    assert!(!listed(&ns).contains("198.18.0.7"));
    // An element that is not of the layout is refused before anything is sent, naming the set.
    let err = apply(
        Some(&ns),
        NFPROTO_INET,
        "t",
        &[numgen_map("ep4", vec![("1", "fd00::7 . 81")], false)],
    )
    .unwrap_err();
    assert!(err.to_string().contains("ep4 value"), "{err}");
    assert!(!listed(&ns).contains("fd00::7"));
    // A set that does not exist.
    let err = apply(
        Some(&ns),
        NFPROTO_INET,
        "t",
        &[numgen_map("nope", vec![("1", "198.18.0.7 . 81")], false)],
    )
    .unwrap_err();
    assert!(err.to_string().contains("element changes to t"), "{err}");
}

#[test]
fn a_large_batch_is_split_into_messages_and_every_element_lands() {
    let Some((_s, ns)) = with_table("large") else {
        return;
    };
    // 20 000 elements: ~80 messages, far past one attribute's 64 KiB.
    let add: Vec<(String, String)> = (0..20_000u32).map(|i| (i.to_string(), many(i))).collect();
    let change = numgen_map(
        "ep4",
        add.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect(),
        false,
    );
    apply(Some(&ns), NFPROTO_INET, "t", &[change]).unwrap();
    let text = crate::nft::run(Some(&ns), &["list", "map", "inet", "t", "ep4"], "").unwrap();
    assert_eq!(text.matches(" : 198.18.").count(), 20_000);
    assert!(text.contains("19999 counter packets 0 bytes 0 : 198.18.79.250 . 80"));
}

/// One socket carries batch after batch, a failed one included: each batch counts only its
/// own acks, and an element replaced (deleted, then added with a new value) reads back new.
#[test]
fn a_kept_socket_sends_batch_after_batch() {
    let Some((_s, ns)) = with_table("kept") else {
        return;
    };
    let sock = ElementSocket::open(Some(&ns)).unwrap();
    sock.apply(
        NFPROTO_INET,
        "t",
        &[numgen_map("ep4", vec![("0", "198.18.0.5 . 80")], false)],
    )
    .unwrap();
    let mut bad = numgen_map("ep4", vec![("1", "198.18.0.6 . 80")], false);
    bad.delete = vec![Element {
        key: key("99"),
        value: None,
        interval_end: false,
    }];
    assert!(sock.apply(NFPROTO_INET, "t", &[bad]).is_err());
    for round in 1..=3u8 {
        let mut replace = numgen_map("ep4", vec![("0", &format!("198.18.0.{round} . 81"))], false);
        replace.delete = vec![Element {
            key: key("0"),
            value: None,
            interval_end: false,
        }];
        sock.apply(NFPROTO_INET, "t", &[replace]).unwrap();
        let text = listed(&ns);
        assert!(
            text.contains(&format!("0 : 198.18.0.{round} . 81")),
            "{text}"
        );
    }
    assert!(!listed(&ns).contains("198.18.0.6"));
}

/// Additions made as they are encoded give the same batch as the same elements given whole,
/// across message boundaries, and land in the same transaction as the eager changes.
#[test]
fn lazy_additions_encode_as_eager_ones_and_land() {
    let element = |i: u32| Element {
        key: key(&i.to_string()),
        value: Some(val(&many(i))),
        interval_end: false,
    };
    let layout = numgen_map("ep4", vec![], false).layout;
    let eager = SetChange {
        set: "ep4".into(),
        layout: layout.clone(),
        delete: Vec::new(),
        add: (0..600).map(element).collect(),
    };
    let lazy = || LazyAdditions {
        set: "ep4".into(),
        layout: layout.clone(),
        elements: Box::new((0..600).map(element)),
    };
    let a = encode(NFPROTO_INET, "t", std::slice::from_ref(&eager), Vec::new()).unwrap();
    let b = encode(NFPROTO_INET, "t", &[], vec![lazy()]).unwrap();
    assert_eq!((a.bytes, a.acks, a.elements), (b.bytes, b.acks, b.elements));
    assert_eq!((b.acks, b.elements), (3, 600), "600 elements: 3 messages");

    let Some((_s, ns)) = with_table("lazy") else {
        return;
    };
    let ports = port_added("8080");
    let n = apply_lazy(Some(&ns), NFPROTO_INET, "t", &[ports], vec![lazy()]).unwrap();
    assert_eq!(n, 601);
    let text = listed(&ns);
    assert_eq!(text.matches(" : 198.18.").count(), 600);
    assert!(text.contains("8080"));
}

/// `ifname . ipv4_addr`: the name NUL-padded to 16 bytes, then the address.
#[test]
fn interface_names_are_padded_to_ifnamsiz() {
    let bytes = encode_parts(&[Kind::Ifname, Kind::Ipv4], &key("\"mla0\" . 198.18.0.5")).unwrap();
    let mut want = b"mla0".to_vec();
    want.resize(16, 0);
    want.extend([198, 18, 0, 5]);
    assert_eq!(bytes, want);
    assert!(encode_parts(&[Kind::Ifname], &key("80")).is_err());
}

/// Interval address sets (the tier chains' selector sets): each address or prefix goes in and
/// out as its interval's two elements, adjacent intervals stay apart, and `nft` lists them as
/// it wrote them.
#[test]
fn interval_address_sets_take_prefixes_as_two_elements() {
    let Some(s) = Scratch::new("interval") else {
        return;
    };
    let ns = s.ns();
    crate::nft::apply(
        Some(&ns),
        "table inet t {
  set sel4 { type ipv4_addr; flags interval; elements = { 198.18.0.1, 198.18.1.0/24 } }
  set sel6 { type ipv6_addr; flags interval; elements = { fd00::1 } }
}
",
    )
    .unwrap();
    let change = |set: &str, v6: bool, delete: &[&str], add: &[&str]| {
        let bounds = |keys: &[&str]| -> Vec<Element> {
            keys.iter()
                .flat_map(|k| Element::interval(&key(k)).expect("encodable"))
                .collect()
        };
        SetChange {
            set: set.into(),
            layout: Layout {
                key: vec![if v6 { Kind::Ipv6 } else { Kind::Ipv4 }],
                value: Value::None,
            },
            delete: bounds(delete),
            add: bounds(add),
        }
    };
    apply(
        Some(&ns),
        NFPROTO_INET,
        "t",
        &[
            change("sel4", false, &[], &["198.18.0.2", "198.18.2.0/23"]),
            change("sel6", true, &[], &["fd00::2"]),
        ],
    )
    .unwrap();
    // nft wraps long element lists: compare with the whitespace collapsed.
    let flat = |t: &str| t.split_whitespace().collect::<Vec<_>>().join(" ");
    let text = flat(&listed(&ns));
    for want in [
        "198.18.0.1, 198.18.0.2, 198.18.1.0/24, 198.18.2.0/23",
        "fd00::1, fd00::2",
    ] {
        assert!(text.contains(want), "{want:?} missing from:\n{text}");
    }
    apply(
        Some(&ns),
        NFPROTO_INET,
        "t",
        &[change("sel4", false, &["198.18.0.1", "198.18.1.0/24"], &[])],
    )
    .unwrap();
    let text = flat(&listed(&ns));
    assert!(
        text.contains("elements = { 198.18.0.2, 198.18.2.0/23 }"),
        "after the deletes:\n{text}"
    );
    // Deleting what is not there is refused, and changes nothing.
    assert!(apply(
        Some(&ns),
        NFPROTO_INET,
        "t",
        &[change("sel4", false, &["198.18.0.1"], &[])],
    )
    .is_err());
    assert_eq!(flat(&listed(&ns)), text);
}

#[test]
fn an_interval_reaching_the_top_of_the_address_space_is_not_encoded() {
    assert!(Element::interval(&key("255.255.255.255")).is_none());
    assert!(Element::interval(&key("0.0.0.0/0")).is_none());
    assert!(Element::interval(&key("198.18.0.0 . 80")).is_none());
    let [start, end] = Element::interval(&key("198.18.4.0/22")).unwrap();
    assert_eq!((start.key, start.interval_end), (key("198.18.4.0"), false));
    assert_eq!((end.key, end.interval_end), (key("198.18.8.0"), true));
}
