//! The task ids of one service, in id order: a tight sorted vector while there are few of them
//! (most services run a handful of replicas), a B-tree beyond that.
//!
//! A `BTreeSet<String>` allocates a whole node for its first id: 280 bytes for one 24-byte id,
//! held by every service in the store. The vector holds exactly what it has. A set that once
//! grew past [`FEW`] stays a B-tree (a service scaled down keeps it; it is one node per service).

use std::collections::BTreeSet;

/// Ids a [`IdSet`] keeps in a sorted vector before it moves them to a B-tree.
const FEW: usize = 16;

#[derive(Debug)]
pub(super) enum IdSet {
    /// Sorted, without duplicates, at most [`FEW`].
    Few(Vec<String>),
    Many(BTreeSet<String>),
}

impl Default for IdSet {
    fn default() -> Self {
        Self::Few(Vec::new())
    }
}

impl IdSet {
    /// Adds `id`; false if it was there already.
    pub(super) fn insert(&mut self, id: String) -> bool {
        match self {
            Self::Few(ids) => match ids.binary_search(&id) {
                Ok(_) => false,
                Err(at) if ids.len() < FEW => {
                    ids.reserve_exact(1);
                    ids.insert(at, id);
                    true
                }
                Err(_) => {
                    let mut many: BTreeSet<String> = std::mem::take(ids).into_iter().collect();
                    many.insert(id);
                    *self = Self::Many(many);
                    true
                }
            },
            Self::Many(ids) => ids.insert(id),
        }
    }

    /// Removes `id`; false if it was not there.
    pub(super) fn remove(&mut self, id: &str) -> bool {
        match self {
            Self::Few(ids) => match ids.binary_search_by(|probe| probe.as_str().cmp(id)) {
                Ok(at) => {
                    ids.remove(at);
                    true
                }
                Err(_) => false,
            },
            Self::Many(ids) => ids.remove(id),
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        match self {
            Self::Few(ids) => ids.is_empty(),
            Self::Many(ids) => ids.is_empty(),
        }
    }

    /// The ids in order.
    pub(super) fn iter(&self) -> impl Iterator<Item = &String> + '_ {
        let (few, many) = match self {
            Self::Few(ids) => (Some(ids.iter()), None),
            Self::Many(ids) => (None, Some(ids.iter())),
        };
        few.into_iter().flatten().chain(many.into_iter().flatten())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(set: &IdSet) -> Vec<&str> {
        set.iter().map(String::as_str).collect()
    }

    #[test]
    fn keeps_ids_in_order_without_duplicates() {
        let mut set = IdSet::default();
        assert!(set.is_empty());
        assert!(set.insert("web.2.b".into()));
        assert!(set.insert("web.1.a".into()));
        assert!(!set.insert("web.2.b".into()));
        assert!(set.insert("web.10.c".into()));
        assert_eq!(ids(&set), ["web.1.a", "web.10.c", "web.2.b"]);
        assert!(set.remove("web.10.c"));
        assert!(!set.remove("web.10.c"));
        assert_eq!(ids(&set), ["web.1.a", "web.2.b"]);
        assert!(set.remove("web.1.a") && set.remove("web.2.b"));
        assert!(set.is_empty());
    }

    #[test]
    fn a_few_ids_take_only_their_own_room() {
        let mut set = IdSet::default();
        set.insert("web.1.a".into());
        let IdSet::Few(few) = &set else {
            panic!("one id in a B-tree");
        };
        assert_eq!(few.capacity(), 1);
    }

    #[test]
    fn many_ids_move_to_a_b_tree_in_the_same_order() {
        let mut set = IdSet::default();
        let mut want: Vec<String> = (0..3 * FEW).map(|i| format!("svc.{i}.x")).collect();
        for id in want.iter().rev() {
            assert!(set.insert(id.clone()));
        }
        assert!(matches!(set, IdSet::Many(_)));
        want.sort();
        assert_eq!(
            ids(&set),
            want.iter().map(String::as_str).collect::<Vec<_>>()
        );
        assert!(!set.insert(want[5].clone()));
        for id in &want {
            assert!(set.remove(id));
        }
        assert!(set.is_empty());
    }
}
