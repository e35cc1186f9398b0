use proptest::prelude::*;

use super::*;

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
}

#[test]
fn every_operator_of_the_grammar_selects_as_kubernetes_does() {
    let icu = labels(&[("site", "icu"), ("gpu", "l4")]);
    let lab = labels(&[("site", "lab")]);
    let bare = Labels::new();
    let cases: &[(&str, [bool; 3])] = &[
        ("site=icu", [true, false, false]),
        ("site==icu", [true, false, false]),
        ("site!=lab", [true, false, true]),
        ("gpu in (a100, l4)", [true, false, false]),
        ("gpu notin (l4)", [false, true, true]),
        ("gpu", [true, false, false]),
        ("!gpu", [false, true, true]),
        ("site, !gpu", [false, true, false]),
        ("site in (icu,lab),site!=lab", [true, false, false]),
        ("example.org/tier notin (x)", [true, true, true]),
    ];
    for (text, want) in cases {
        let s = Selector::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
        let got = [s.matches(&icu), s.matches(&lab), s.matches(&bare)];
        assert_eq!(&got, want, "{text}");
    }
}

#[test]
fn an_empty_value_is_a_value() {
    let s = Selector::parse("role=,site").expect("parses");
    assert!(s.matches(&labels(&[("role", ""), ("site", "x")])));
    assert!(!s.matches(&labels(&[("site", "x")])));
    assert_eq!(s.to_string(), "role=,site");
}

#[test]
fn parse_errors_name_the_column_and_what_was_expected() {
    let cases: &[(&str, usize, &str)] = &[
        ("", 1, "a label key"),
        ("site=icu,", 10, "a label key"),
        ("site in icu", 9, "'('"),
        ("site in (a b)", 12, "',' or ')'"),
        ("site in ()", 10, "a label value"),
        ("site in (a", 11, "',' or ')'"),
        ("site icu", 6, "'='"),
        ("site=icu lab", 10, "',' or the end"),
        ("si te", 4, "'='"),
        ("=icu", 1, "a label key"),
        ("site=ic$u", 8, "',' or the end"),
        ("-site=a", 1, "a valid label key"),
        ("site=-a", 6, "a valid label value"),
        ("Example.org/x=1", 1, "a valid label key"),
    ];
    for (text, column, expected) in cases {
        let e = Selector::parse(text).expect_err(text);
        assert_eq!(e.column, *column, "{text}: {e}");
        assert!(e.expected.contains(expected), "{text}: {e}");
        assert!(e.to_string().contains(&format!("column {column}")), "{e}");
    }
}

#[test]
fn label_keys_and_values_follow_the_kubernetes_rules() {
    for ok in ["site", "a", "gpu.model", "example.org/tier", "a-b_c.d", &"k".repeat(63)] {
        assert_eq!(check_label_key(ok), Ok(()), "{ok}");
    }
    for bad in ["", "/x", "x/", "-a", "a-", "a b", "Ex.org/a", "a/b/c", &"k".repeat(64), "ü"] {
        assert!(check_label_key(bad).is_err(), "{bad:?} accepted");
    }
    assert_eq!(check_label_value(""), Ok(()));
    assert!(check_label_value("a=b").is_err());
    assert_eq!(parse_label_assignment("site=icu"), Ok(("site".into(), "icu".into())));
    assert!(parse_label_assignment("site").unwrap_err().contains("--remove"));
    let many: Labels = (0..=MAX_LABELS).map(|i| (format!("k{i}"), String::new())).collect();
    assert!(check_labels(&many).is_err());
}

fn name() -> impl Strategy<Value = String> {
    "[a-z0-9]([a-z0-9._-]{0,6}[a-z0-9])?"
}

fn key() -> impl Strategy<Value = String> {
    (proptest::option::of("[a-z]{1,4}(\\.[a-z]{1,3})?"), name())
        .prop_map(|(prefix, name)| prefix.map_or(name.clone(), |p| format!("{p}/{name}")))
}

fn value() -> impl Strategy<Value = String> {
    prop_oneof![Just(String::new()), name(), "[a-c]"]
}

fn op() -> impl Strategy<Value = Op> {
    let set = proptest::collection::btree_set(prop_oneof![name(), "[a-c]"], 1..4);
    prop_oneof![
        value().prop_map(Op::Equals),
        value().prop_map(Op::NotEquals),
        set.clone().prop_map(Op::In),
        set.prop_map(Op::NotIn),
        Just(Op::Exists),
        Just(Op::DoesNotExist),
    ]
}

fn selector() -> impl Strategy<Value = Selector> {
    proptest::collection::vec((key(), op()).prop_map(|(key, op)| Requirement { key, op }), 1..5)
        .prop_map(|requirements| Selector { requirements })
}

fn label_set() -> impl Strategy<Value = Labels> {
    proptest::collection::btree_map(prop_oneof![key(), "[a-c]"], value(), 0..6)
}

/// The meaning of each operator written out once more, independently of `Requirement::matches`.
fn reference(s: &Selector, labels: &Labels) -> bool {
    s.requirements().iter().all(|r| match (&r.op, labels.get(&r.key)) {
        (Op::Equals(v), Some(have)) => have == v,
        (Op::Equals(_), None) => false,
        (Op::NotEquals(v), Some(have)) => have != v,
        (Op::NotEquals(_), None) => true,
        (Op::In(set), Some(have)) => set.iter().any(|v| v == have),
        (Op::In(_), None) => false,
        (Op::NotIn(set), Some(have)) => set.iter().all(|v| v != have),
        (Op::NotIn(_), None) => true,
        (Op::Exists, have) => have.is_some(),
        (Op::DoesNotExist, have) => have.is_none(),
    })
}

proptest! {
    #[test]
    fn the_canonical_form_parses_back_to_the_same_selector(s in selector()) {
        let text = s.to_string();
        prop_assert_eq!(Selector::parse(&text), Ok(s), "{}", text);
    }

    #[test]
    fn spacing_between_tokens_changes_nothing(s in selector()) {
        let spaced = s.to_string().replace(',', " , ").replace('(', " ( ").replace(")", " ) ").replace("!=", " != ");
        prop_assert_eq!(Selector::parse(&spaced), Ok(s));
    }

    #[test]
    fn the_matcher_agrees_with_the_written_out_rules(s in selector(), l in label_set()) {
        prop_assert_eq!(s.matches(&l), reference(&s, &l));
    }

    #[test]
    fn a_label_set_is_selected_by_its_own_equalities(l in label_set()) {
        prop_assume!(!l.is_empty());
        let text = l.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",");
        let s = Selector::parse(&text).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert!(s.matches(&l));
    }

    #[test]
    fn arbitrary_text_parses_or_fails_with_a_column_inside_it(text in "\\PC{0,40}") {
        match Selector::parse(&text) {
            Ok(s) => prop_assert_eq!(Selector::parse(&s.to_string()), Ok(s)),
            Err(e) => prop_assert!(e.column >= 1 && e.column <= text.chars().count() + 1, "{}", e),
        }
    }

    #[test]
    fn selector_shaped_noise_never_panics(text in "[a-c!=,() ]{0,30}(in|notin)?[a-c!=,() ]{0,10}") {
        let _ = Selector::parse(&text);
    }
}
