//! The selector language: Calico's documented examples, errors that name the place, and
//! property tests (printing then parsing gives the same selector; evaluation follows the
//! operators' documented meaning, checked against a label-by-label reference).

use super::*;
use proptest::prelude::*;

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn sel(s: &str) -> Selector {
    Selector::parse(s).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn calicos_examples_parse_and_match() {
    let web = labels(&[("app", "web"), ("tier", "frontend"), ("env", "prod-eu")]);
    for (text, want) in [
        ("app == 'web'", true),
        ("app != 'web'", false),
        ("app != \"db\"", true),
        ("missing != 'x'", true),
        ("tier in {'frontend', 'backend'}", true),
        ("tier not in {'frontend'}", false),
        ("missing not in {'a'}", true),
        ("missing in {}", false),
        ("has(app)", true),
        ("!has(app)", false),
        ("!has(missing)", true),
        ("all()", true),
        ("", true),
        ("app == 'web' && tier == 'frontend'", true),
        ("app == 'db' || tier == 'frontend'", true),
        ("!(app == 'web' && tier == 'backend')", true),
        ("env contains 'od-'", true),
        ("env starts with 'prod'", true),
        ("env ends with '-eu'", true),
        ("env ends with '-us'", false),
        ("  ( app == 'web' )  &&has( env )", true),
        ("example.com/owner == 'x'", false),
    ] {
        assert_eq!(sel(text).matches(&web, true), want, "{text}");
    }
    // global() matches resources outside namespaces only.
    assert!(!sel("global()").matches(&web, true));
    assert!(sel("global()").matches(&web, false));
    // && binds tighter than ||.
    assert_eq!(
        sel("a == '1' || b == '2' && c == '3'"),
        sel("a == '1' || (b == '2' && c == '3')")
    );
}

#[test]
fn errors_name_the_place_and_what_was_expected() {
    for (text, offset, expect) in [
        ("app = 'web'", 4, "operator"),
        ("app == web", 7, "quoted value"),
        ("has(app", 7, ")"),
        ("app == 'web' &&", 15, "selector"),
        ("tier in {'a' 'b'}", 13, "}"),
        ("(app == 'x'", 11, ")"),
        ("== 'x'", 0, "selector"),
        ("app == 'x' junk", 11, ""),
    ] {
        let e = Selector::parse(text).expect_err(text);
        assert_eq!(e.offset, offset, "{text}: {e}");
        assert!(e.message.contains(expect), "{text}: {e}");
    }
}

fn arb_key() -> impl Strategy<Value = String> {
    prop::sample::select(vec!["app", "tier", "env", "k8s.io/name", "a_b-c"]).prop_map(String::from)
}

fn arb_value() -> impl Strategy<Value = String> {
    prop::sample::select(vec!["web", "db", "", "prod-eu", "it's", "x y"]).prop_map(String::from)
}

fn arb_selector() -> impl Strategy<Value = Selector> {
    let leaf = prop_oneof![
        Just(Selector::All),
        Just(Selector::Global),
        arb_key().prop_map(Selector::Has),
        (arb_key(), arb_value()).prop_map(|(k, v)| Selector::Equals(k, v)),
        (arb_key(), arb_value()).prop_map(|(k, v)| Selector::NotEquals(k, v)),
        (arb_key(), prop::collection::btree_set(arb_value(), 0..3))
            .prop_map(|(k, v)| Selector::In(k, v)),
        (arb_key(), prop::collection::btree_set(arb_value(), 0..3))
            .prop_map(|(k, v)| Selector::NotIn(k, v)),
        (arb_key(), arb_value()).prop_map(|(k, v)| Selector::Contains(k, v)),
        (arb_key(), arb_value()).prop_map(|(k, v)| Selector::StartsWith(k, v)),
        (arb_key(), arb_value()).prop_map(|(k, v)| Selector::EndsWith(k, v)),
    ];
    leaf.prop_recursive(4, 24, 2, |inner| {
        prop_oneof![
            inner.clone().prop_map(|s| Selector::Not(Box::new(s))),
            (inner.clone(), inner.clone())
                .prop_map(|(a, b)| Selector::And(Box::new(a), Box::new(b))),
            (inner.clone(), inner).prop_map(|(a, b)| Selector::Or(Box::new(a), Box::new(b))),
        ]
    })
}

fn arb_labels() -> impl Strategy<Value = BTreeMap<String, String>> {
    prop::collection::btree_map(arb_key(), arb_value(), 0..4)
}

/// The documented meaning of one comparison, written from the label's presence and value.
fn reference_leaf(s: &Selector, labels: &BTreeMap<String, String>, namespaced: bool) -> bool {
    match s {
        Selector::All => true,
        Selector::Global => !namespaced,
        Selector::Has(k) => labels.contains_key(k),
        Selector::Equals(k, v) => labels.get(k) == Some(v),
        Selector::NotEquals(k, v) => labels.get(k) != Some(v),
        Selector::In(k, vs) => labels.get(k).is_some_and(|x| vs.contains(x)),
        Selector::NotIn(k, vs) => labels.get(k).is_none_or(|x| !vs.contains(x)),
        Selector::Contains(k, v) => labels.get(k).is_some_and(|x| x.contains(v.as_str())),
        Selector::StartsWith(k, v) => labels.get(k).is_some_and(|x| x.starts_with(v.as_str())),
        Selector::EndsWith(k, v) => labels.get(k).is_some_and(|x| x.ends_with(v.as_str())),
        Selector::Not(a) => !reference_leaf(a, labels, namespaced),
        Selector::And(a, b) => {
            reference_leaf(a, labels, namespaced) && reference_leaf(b, labels, namespaced)
        }
        Selector::Or(a, b) => {
            reference_leaf(a, labels, namespaced) || reference_leaf(b, labels, namespaced)
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    /// Printing a selector and parsing it back gives the same selector, and the text of the
    /// parse matches exactly what the selector matches.
    #[test]
    fn printed_selectors_parse_back(s in arb_selector(), l in arb_labels(), namespaced in any::<bool>()) {
        let text = s.to_string();
        let back = Selector::parse(&text).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(&back, &s, "{}", text);
        prop_assert_eq!(back.matches(&l, namespaced), reference_leaf(&s, &l, namespaced), "{}", text);
    }

    /// `!` and `!=`/`not in` are complements; De Morgan holds through the parser.
    #[test]
    fn negations_are_complements(s in arb_selector(), t in arb_selector(), l in arb_labels(), ns in any::<bool>()) {
        let not = Selector::parse(&format!("!({s})")).unwrap();
        prop_assert_eq!(not.matches(&l, ns), !s.matches(&l, ns));
        let left = Selector::parse(&format!("!({s} && {t})")).unwrap();
        let right = Selector::parse(&format!("!({s}) || !({t})")).unwrap();
        prop_assert_eq!(left.matches(&l, ns), right.matches(&l, ns));
    }

    /// Any text: an error or a selector, never a panic.
    #[test]
    fn any_text_is_an_error_or_a_selector(text in "[ -~]{0,40}") {
        let _ = Selector::parse(&text);
    }
}
