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
}

#[test]
fn memory_store_passes_the_contract() {
    run(&super::memory::MemoryStore::new());
}
