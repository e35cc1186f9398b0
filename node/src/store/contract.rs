//! The contract every StateStore adapter passes (instantiated once per adapter).

use super::{Op, StateStore, Tree};

pub(crate) fn run(store: &dyn StateStore) {
    assert_eq!(store.get(Tree::Jobs, b"a").expect("get"), None);
    assert_eq!(store.last(Tree::Audit).expect("last"), None);
    store
        .apply(vec![
            Op::Put(Tree::Jobs, b"b".to_vec(), b"2".to_vec()),
            Op::Put(Tree::Jobs, b"a".to_vec(), b"1".to_vec()),
            Op::Put(Tree::Meta, b"a".to_vec(), b"meta".to_vec()),
        ])
        .expect("apply");
    assert_eq!(store.get(Tree::Jobs, b"a").expect("get"), Some(b"1".to_vec()));
    assert_eq!(store.get(Tree::Meta, b"a").expect("get"), Some(b"meta".to_vec()), "trees are separate");
    let keys: Vec<Vec<u8>> = store.scan(Tree::Jobs).expect("scan").into_iter().map(|(k, _)| k).collect();
    assert_eq!(keys, vec![b"a".to_vec(), b"b".to_vec()], "scan is in key order");
    assert_eq!(store.last(Tree::Jobs).expect("last"), Some((b"b".to_vec(), b"2".to_vec())));
    store
        .apply(vec![Op::Delete(Tree::Jobs, b"a".to_vec()), Op::Put(Tree::Jobs, b"b".to_vec(), b"3".to_vec())])
        .expect("apply");
    assert_eq!(store.get(Tree::Jobs, b"a").expect("get"), None);
    assert_eq!(store.get(Tree::Jobs, b"b").expect("get"), Some(b"3".to_vec()));

    // Every tree takes part in one atomic batch and keeps its own keys.
    let ops = Tree::ALL.iter().map(|&t| Op::Put(t, b"same".to_vec(), t.name().as_bytes().to_vec())).collect();
    store.apply(ops).expect("apply to every tree");
    for t in Tree::ALL {
        assert_eq!(store.get(t, b"same").expect("get"), Some(t.name().as_bytes().to_vec()), "{}", t.name());
    }
    store
        .apply(vec![
            Op::Put(Tree::Events, 1u64.to_be_bytes().to_vec(), b"e1".to_vec()),
            Op::Put(Tree::Events, 256u64.to_be_bytes().to_vec(), b"e256".to_vec()),
            Op::Delete(Tree::Relay, b"same".to_vec()),
        ])
        .expect("apply");
    assert_eq!(store.get(Tree::Relay, b"same").expect("get"), None);
    assert_eq!(store.get(Tree::Events, b"same").expect("get"), Some(b"events".to_vec()));
    assert_eq!(
        store.last(Tree::Events).expect("last").map(|(_, v)| v),
        Some(b"events".to_vec()),
        "b\"same\" sorts after the 8-byte big-endian keys"
    );
}

#[test]
fn memory_store_passes_the_contract() {
    run(&super::memory::MemoryStore::new());
}
