//! A hash map whose growth comes in small steps spread over time, not in one large rehash.
//!
//! A hashbrown table doubles when it is 7/8 full and moves everything it holds on the spot. The
//! store's three large maps (services, tasks, tasks by service) grow together, one entry each
//! a service in the controller benchmark, and every replica applies the same entries: at about
//! 460,000 services the doubling took each replica 0.36 s, during which nothing committed: in
//! four-round 256-client runs of the benchmark, rounds with such a doubling had a p99 of up to
//! 130 ms, against about 25 ms.
//!
//! [`StaggeredMap`] keeps its entries in [`SHARDS`] tables. A key's table is picked by a hash of
//! its own (another seed than the tables'), with shares that grow geometrically from one table
//! to the next over one octave: the last table gets just under twice the share of the first
//! (2^(31/32)), so no two tables double at the same size of the map. Each table
//! doubles once while the whole map doubles, at its own size of the whole map, so one doubling
//! of the map is [`SHARDS`] rehashes, evenly spread, each of at most 1/23 of the entries. The
//! total work is the same; lookups hash the key twice (a few nanoseconds).

use std::fmt;
use std::hash::{BuildHasher, Hash};
use std::sync::LazyLock;

use hashbrown::{DefaultHashBuilder, Equivalent, HashMap};

/// Tables per map.
pub(super) const SHARDS: usize = 32;

/// `BOUNDS[i]`: the largest 32-bit pick that goes to table `i` (cumulative shares), the same
/// for every map.
static BOUNDS: LazyLock<[u32; SHARDS]> = LazyLock::new(share_bounds);

/// A hash map of `SHARDS` hashbrown tables of unequal shares (see the module docs). Iteration
/// order is arbitrary, as a `HashMap`'s.
pub(super) struct StaggeredMap<K, V> {
    shards: Box<[HashMap<K, V>]>,
    /// Picks a key's table; independent of the tables' own hasher.
    picker: DefaultHashBuilder,
}

impl<K, V> StaggeredMap<K, V> {
    pub fn new() -> Self {
        let hasher = DefaultHashBuilder::default();
        Self {
            shards: (0..SHARDS).map(|_| HashMap::with_hasher(hasher)).collect(),
            picker: DefaultHashBuilder::default(),
        }
    }

    pub fn len(&self) -> usize {
        self.shards.iter().map(HashMap::len).sum()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.shards.iter().flat_map(HashMap::iter)
    }

    pub fn keys(&self) -> impl Iterator<Item = &K> {
        self.shards.iter().flat_map(HashMap::keys)
    }

    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.shards.iter().flat_map(HashMap::values)
    }

    /// The table `key` lives in. Keys that are [`Equivalent`] hash alike (hashbrown's rule), so
    /// a borrowed form of a key picks the key's table.
    fn shard_of<Q: Hash + ?Sized>(&self, key: &Q) -> usize {
        // The high half: the tables' control bytes come from the top bits of *their* hash,
        // which is independent of this one anyway.
        let pick = (self.picker.hash_one(key) >> 32) as u32;
        BOUNDS.partition_point(|&bound| bound < pick)
    }

    #[cfg(test)]
    fn shards(&self) -> &[HashMap<K, V>] {
        &self.shards
    }
}

impl<K: Hash + Eq, V> StaggeredMap<K, V> {
    pub fn get<Q: Hash + Equivalent<K> + ?Sized>(&self, key: &Q) -> Option<&V> {
        self.shards[self.shard_of(key)].get(key)
    }

    pub fn get_mut<Q: Hash + Equivalent<K> + ?Sized>(&mut self, key: &Q) -> Option<&mut V> {
        let shard = self.shard_of(key);
        self.shards[shard].get_mut(key)
    }

    pub fn contains_key<Q: Hash + Equivalent<K> + ?Sized>(&self, key: &Q) -> bool {
        self.shards[self.shard_of(key)].contains_key(key)
    }

    pub fn insert(&mut self, key: K, value: V) -> Option<V> {
        let shard = self.shard_of(&key);
        self.shards[shard].insert(key, value)
    }

    pub fn remove<Q: Hash + Equivalent<K> + ?Sized>(&mut self, key: &Q) -> Option<V> {
        let shard = self.shard_of(key);
        self.shards[shard].remove(key)
    }

    /// The value at `key`, a default one inserted first if there is none.
    pub fn get_or_insert_default(&mut self, key: K) -> &mut V
    where
        V: Default,
    {
        let shard = self.shard_of(&key);
        self.shards[shard].entry(key).or_default()
    }
}

impl<K, V> Default for StaggeredMap<K, V> {
    fn default() -> Self {
        Self::new()
    }
}

impl<K: Hash + Eq, V> FromIterator<(K, V)> for StaggeredMap<K, V> {
    /// Each table is sized up front for its share of what the iterator says it holds (a
    /// snapshot's services), so none grows while it is filled.
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        let iter = iter.into_iter();
        let mut map = Self::new();
        let expected = iter.size_hint().0 as f64;
        if expected > 0.0 {
            for (i, shard) in map.shards.iter_mut().enumerate() {
                // (10% over the share: the keys fall on the tables by chance.)
                shard.reserve((expected * share(i) * 1.1) as usize);
            }
        }
        for (key, value) in iter {
            map.insert(key, value);
        }
        map
    }
}

impl<K: fmt::Debug, V: fmt::Debug> fmt::Debug for StaggeredMap<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

/// Table `i`'s share of the keys: proportional to `2^(i / SHARDS)`.
fn share(i: usize) -> f64 {
    let weight = |i: usize| (i as f64 / SHARDS as f64).exp2();
    weight(i) / (0..SHARDS).map(weight).sum::<f64>()
}

/// Cumulative shares as 32-bit bounds; the last bound is `u32::MAX`, so every pick has a
/// table.
fn share_bounds() -> [u32; SHARDS] {
    let mut bounds = [u32::MAX; SHARDS];
    let mut cumulative = 0.0;
    for (i, bound) in bounds.iter_mut().enumerate().take(SHARDS - 1) {
        cumulative += share(i);
        // (Saturating float-to-int conversion; cumulative < 1 here.)
        *bound = (cumulative * 4_294_967_296.0) as u32;
    }
    bounds
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap as StdMap;

    use super::{SHARDS, StaggeredMap};

    /// A small deterministic generator (xorshift), for reproducible operation sequences.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    #[test]
    fn behaves_as_a_hash_map() {
        let mut map: StaggeredMap<String, u64> = StaggeredMap::new();
        let mut model: StdMap<String, u64> = StdMap::new();
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for step in 0..50_000u64 {
            let key = format!("key-{}", rng.next() % 5_000);
            match rng.next() % 4 {
                0 => assert_eq!(map.remove(key.as_str()), model.remove(&key), "step {step}"),
                1 => {
                    *map.get_or_insert_default(key.clone()) += 1;
                    *model.entry(key).or_default() += 1;
                }
                2 => {
                    if let Some(v) = map.get_mut(key.as_str()) {
                        *v += 10;
                    }
                    if let Some(v) = model.get_mut(&key) {
                        *v += 10;
                    }
                }
                _ => assert_eq!(map.insert(key.clone(), step), model.insert(key, step)),
            }
        }
        assert_eq!(map.len(), model.len());
        for (key, value) in &model {
            assert_eq!(map.get(key.as_str()), Some(value));
            assert!(map.contains_key(key.as_str()));
        }
        let mut seen: Vec<(&String, &u64)> = map.iter().collect();
        seen.sort();
        let mut expected: Vec<(&String, &u64)> = model.iter().collect();
        expected.sort();
        assert_eq!(seen, expected);
        assert_eq!(map.keys().count(), model.len());
        assert_eq!(map.values().sum::<u64>(), model.values().sum::<u64>());
        let copy: StaggeredMap<String, u64> = model.clone().into_iter().collect();
        assert_eq!(copy.len(), model.len());
        for (key, value) in &model {
            assert_eq!(copy.get(key.as_str()), Some(value));
        }
        assert!(!map.contains_key("absent"));
        assert_eq!(map.get("absent"), None);
    }

    #[test]
    fn a_doubling_is_spread_over_many_small_rehashes() {
        let mut map: StaggeredMap<u64, u64> = StaggeredMap::new();
        let n = 400_000u64;
        // The largest number of entries one insert moved to a new table, from 20,000 entries
        // on (earlier, every table is small).
        let mut largest_move = 0usize;
        // The map's size at each growth while it doubles from n/2 to n.
        let mut growths_in_last_doubling = Vec::new();
        for key in 0..n {
            let shard = map.shard_of(&key);
            let (before, held) = {
                let table = &map.shards()[shard];
                (table.capacity(), table.len())
            };
            map.insert(key, key);
            if map.shards()[shard].capacity() != before && key >= 20_000 {
                largest_move = largest_move.max(held);
                if key >= n / 2 {
                    growths_in_last_doubling.push(key);
                }
            }
        }
        // An unsharded map would have moved about 229,000 entries at once (7/8 of 2^18).
        assert!(
            largest_move <= n as usize / 20,
            "one insert moved {largest_move} entries"
        );
        // Each table doubles once as the map doubles, and the growths are spread over the
        // doubling: no stretch without one is more than three times the even spacing (tables
        // of only two distinct shares would leave a gap of about n/4).
        let grown = growths_in_last_doubling.len();
        assert!(
            (SHARDS - 4..=SHARDS + 4).contains(&grown),
            "{grown} tables grew while the map went from {} to {n}",
            n / 2
        );
        let mut points = vec![n / 2];
        points.extend(&growths_in_last_doubling);
        points.push(n);
        let widest = points.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
        assert!(
            widest <= 3 * (n / 2) / SHARDS as u64,
            "growths at {growths_in_last_doubling:?}"
        );
        let sizes: Vec<usize> = map.shards().iter().map(|t| t.len()).collect();
        let (small, large) = (
            sizes.iter().copied().min().unwrap_or(0),
            sizes.iter().copied().max().unwrap_or(0),
        );
        assert!(
            (1.6..=2.4).contains(&(large as f64 / small as f64)),
            "table sizes {sizes:?}"
        );
    }
}
