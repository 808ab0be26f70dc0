//! A persistent sorted map packed densely, for the maps a node holds an
//! entry in for every pod of the cluster (the view's workloads, the route
//! table's addresses).
//!
//! `imbl::OrdMap` gives cheap copies and diffs, but its B-tree leaves are
//! arrays of 16 slots, half empty once entries have arrived in order (as a
//! full state's do): a 24-byte entry cost 70 bytes. Here the entries sit in
//! sorted runs of at most [`RUN_MAX`], each an exact-size slice behind an
//! `Arc`, and an `imbl::OrdMap` indexes the runs by their first key (one
//! index entry per run, not per entry). A copy of the map shares every run;
//! a change copies the one run it touches; two maps are compared run by
//! run, skipping the runs they share, so a diff costs what differs.
//!
//! Not for maps written many times a second: every insert or removal copies
//! its run (up to 64 entries).

use std::borrow::Borrow;
use std::fmt;
use std::ops::Bound;
use std::sync::Arc;

/// Entries in a run at most: a run that would hold more splits in two.
pub const RUN_MAX: usize = 64;

/// The map. Cloning it is O(1) and shares every entry.
pub struct PackedMap<K, V> {
    /// The runs by their first key.
    runs: imbl::OrdMap<K, Run<K, V>>,
    len: usize,
}

/// One run: entries sorted by key. Compared by identity: two maps share a
/// run or differ in it.
struct Run<K, V>(Arc<[(K, V)]>);

impl<K, V> Clone for Run<K, V> {
    fn clone(&self) -> Self {
        Run(self.0.clone())
    }
}

impl<K, V> PartialEq for Run<K, V> {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

/// One key's entries in two maps, where they differ: the earlier map's and
/// the later one's, `None` where a map has no such key (see
/// [`PackedMap::diff_by`]).
pub type Sides<'a, K, V> = (Option<&'a (K, V)>, Option<&'a (K, V)>);

/// How one key differs between two maps (see [`PackedMap::diff`]).
#[derive(Debug)]
pub enum Change<'a, K, V> {
    /// Only the second map has it.
    Added(&'a K, &'a V),
    /// Both have it, with different values.
    Updated {
        /// The key (the second map's).
        key: &'a K,
        /// The first map's value.
        old: &'a V,
        /// The second map's.
        new: &'a V,
    },
    /// Only the first map has it.
    Removed(&'a K, &'a V),
}

impl<K: Ord + Clone, V: Clone> PackedMap<K, V> {
    /// An empty map.
    pub fn new() -> Self {
        PackedMap {
            runs: imbl::OrdMap::new(),
            len: 0,
        }
    }

    /// How many entries it holds.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The entry of `key`, with the map's own key.
    pub fn get_key_value<Q>(&self, key: &Q) -> Option<(&K, &V)>
    where
        K: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        let (_, run) = self.runs.get_prev(key)?;
        let at = position(&run.0, key).ok()?;
        let (key, value) = &run.0[at];
        Some((key, value))
    }

    /// The value of `key`.
    pub fn get<Q>(&self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        self.get_key_value(key).map(|(_, value)| value)
    }

    /// Whether `key` has an entry.
    pub fn contains_key<Q>(&self, key: &Q) -> bool
    where
        K: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        self.get_key_value(key).is_some()
    }

    /// Every entry, by key.
    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.runs
            .values()
            .flat_map(|run| run.0.iter().map(|(key, value)| (key, value)))
    }

    /// Every key, in order.
    pub fn keys(&self) -> impl Iterator<Item = &K> {
        self.iter().map(|(key, _)| key)
    }

    /// Every value, by key.
    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.iter().map(|(_, value)| value)
    }

    /// Sets `key` to `value`; returns the value it replaces.
    pub fn insert(&mut self, key: K, value: V) -> Option<V> {
        let replaced = self.get(&key).cloned();
        self.apply(vec![(key, Some(value))]);
        replaced
    }

    /// Removes the entry of `key`; returns its value.
    pub fn remove<Q>(&mut self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        let (key, value) = self
            .get_key_value(key)
            .map(|(key, value)| (key.clone(), value.clone()))?;
        self.apply(vec![(key, None)]);
        Some(value)
    }

    /// Applies many changes at once: a key set to `Some` value, or removed
    /// by `None`; for a key given twice, the last stands. Each run they
    /// touch is rebuilt once, so a full state builds the whole map in one
    /// pass and a delta costs the runs it touches.
    pub fn apply(&mut self, mut changes: Vec<(K, Option<V>)>) {
        last_change_of_each_key(&mut changes);
        self.apply_sorted(changes);
    }

    /// [`PackedMap::apply`] for changes already in key order, each key
    /// once: taken one at a time from an iterator, so that the caller can
    /// make them as they are taken (the address book settles each address
    /// then) instead of collecting them first.
    pub fn apply_sorted(&mut self, changes: impl IntoIterator<Item = (K, Option<V>)>) {
        if self.runs.is_empty() {
            // A full state: the runs are cut straight from the changes,
            // with no copy of the whole map in between.
            let mut run = Vec::with_capacity(RUN_MAX * 3 / 4);
            for (key, value) in changes {
                if let Some(value) = value {
                    run.push((key, value));
                }
                if run.len() == RUN_MAX * 3 / 4 {
                    self.len += run.len();
                    self.settle(std::mem::take(&mut run));
                }
            }
            self.len += run.len();
            self.settle(run);
            return;
        }
        let mut changes = changes.into_iter().peekable();
        while let Some(key) = changes.peek().map(|(key, _)| key.clone()) {
            // The run the key falls in: the last one starting at or before
            // it, or the first if it comes before every run; the changes up
            // to where the next run starts go into it.
            let run = self
                .runs
                .get_prev(&key)
                .or_else(|| self.runs.get_min().map(|(first, run)| (first, run)))
                .map(|(first, run)| (first.clone(), run.clone()));
            let end = run.as_ref().and_then(|(first, _)| {
                self.runs
                    .range((Bound::Excluded(first.clone()), Bound::Unbounded))
                    .next()
                    .map(|(next, _)| next.clone())
            });
            let held: &[(K, V)] = run.as_ref().map_or(&[], |(_, run)| &run.0);
            let mut entries = Vec::with_capacity(held.len() + 1);
            let mut held = held.iter().peekable();
            while let Some((key, value)) =
                changes.next_if(|(key, _)| end.as_ref().is_none_or(|end| key < end))
            {
                while let Some(kept) = held.next_if(|(held, _)| *held < key) {
                    entries.push(kept.clone());
                }
                let replaced = held.next_if(|(held, _)| *held == key).is_some();
                match (value, replaced) {
                    (Some(value), true) => entries.push((key, value)),
                    (Some(value), false) => {
                        entries.push((key, value));
                        self.len += 1;
                    }
                    (None, true) => self.len -= 1,
                    (None, false) => {}
                }
            }
            entries.extend(held.cloned());
            if let Some((first, _)) = &run {
                self.runs.remove(first);
            }
            self.settle(entries);
        }
    }

    /// Puts a rebuilt run back: joined with a neighbour that has room if it
    /// is small (so that churn does not leave many tiny runs behind), cut
    /// in pieces if it is large.
    fn settle(&mut self, mut entries: Vec<(K, V)>) {
        if entries.len() < RUN_MAX / 4
            && let Some(first) = entries.first().map(|(first, _)| first.clone())
        {
            let room = |run: &Run<K, V>| entries.len() + run.0.len() <= RUN_MAX * 3 / 4;
            let previous = self
                .runs
                .range(..first.clone())
                .next_back()
                .filter(|(_, run)| room(run))
                .map(|(key, run)| (key.clone(), run.clone()));
            let next = self
                .runs
                .get_next(&first)
                .filter(|(_, run)| room(run))
                .map(|(key, run)| (key.clone(), run.clone()));
            if let Some((key, run)) = previous {
                self.runs.remove(&key);
                entries.splice(0..0, run.0.iter().cloned());
            } else if let Some((key, run)) = next {
                self.runs.remove(&key);
                entries.extend_from_slice(&run.0);
            }
        }
        // Runs cut from many entries are three quarters full: room for
        // later inserts before a run splits.
        let pieces = if entries.len() <= RUN_MAX {
            1
        } else {
            entries.len().div_ceil(RUN_MAX * 3 / 4)
        };
        let size = entries.len().div_ceil(pieces).max(1);
        for piece in entries.chunks(size) {
            if let Some((first, _)) = piece.first() {
                self.runs.insert(first.clone(), Run(Arc::from(piece)));
            }
        }
    }

    /// How `self` (the earlier map) and `other` (the later one) differ,
    /// key by key in order. Runs the two share are skipped whole: the cost
    /// is the size of the runs that differ. Lazy: comparing two maps holds
    /// nothing in proportion to them (a first full state differs from the
    /// empty map in every entry).
    pub fn diff<'a>(&'a self, other: &'a Self) -> impl Iterator<Item = Change<'a, K, V>> + 'a
    where
        V: PartialEq,
    {
        self.diff_by(other, |(_, old), (_, new)| old == new)
            .filter_map(|sides| match sides {
                (Some((key, old)), Some((_, new))) => Some(Change::Updated { key, old, new }),
                (Some((key, old)), None) => Some(Change::Removed(key, old)),
                (None, Some((key, new))) => Some(Change::Added(key, new)),
                // `diff_by` yields no key that neither map has.
                (None, None) => None,
            })
    }

    /// The entries that differ between `self` and `other`, key by key in
    /// order: each as (the earlier map's entry, the later one's), either
    /// missing where that map has no such key. Two entries of one key
    /// differ unless `same` says they do not.
    pub fn diff_by<'a>(
        &'a self,
        other: &'a Self,
        same: impl Fn(&(K, V), &(K, V)) -> bool + 'a,
    ) -> impl Iterator<Item = Sides<'a, K, V>> + 'a {
        // A key outside the differing runs sits in a run both maps share,
        // with the same value: comparing the differing runs' entries
        // (each side in key order) finds every change.
        let side = |earlier: bool| {
            self.runs.diff(&other.runs).flat_map(move |item| {
                let run = match (item, earlier) {
                    (imbl::ordmap::DiffItem::Add(_, run), false)
                    | (imbl::ordmap::DiffItem::Remove(_, run), true) => Some(run),
                    (imbl::ordmap::DiffItem::Update { old, .. }, true) => Some(old.1),
                    (imbl::ordmap::DiffItem::Update { new, .. }, false) => Some(new.1),
                    _ => None,
                };
                run.map_or(&[][..], |run| &run.0[..]).iter()
            })
        };
        let (mut before, mut after) = (side(true).peekable(), side(false).peekable());
        std::iter::from_fn(move || {
            loop {
                let sides = match (before.peek(), after.peek()) {
                    (None, None) => return None,
                    (Some(_), None) => (before.next(), None),
                    (None, Some(_)) => (None, after.next()),
                    (Some(old), Some(new)) => match old.0.cmp(&new.0) {
                        std::cmp::Ordering::Less => (before.next(), None),
                        std::cmp::Ordering::Greater => (None, after.next()),
                        std::cmp::Ordering::Equal => {
                            let (old, new) = (before.next(), after.next());
                            if let (Some(old), Some(new)) = (old, new)
                                && same(old, new)
                            {
                                continue;
                            }
                            (old, new)
                        }
                    },
                };
                return Some(sides);
            }
        })
    }

    /// How many runs hold the entries (for tests of the packing).
    pub fn runs(&self) -> usize {
        self.runs.len()
    }
}

/// Sorts `changes` by key and keeps only the last change given for each
/// key (in a batch, as in a map, the last change of a key stands).
pub fn last_change_of_each_key<K: Ord, V>(changes: &mut Vec<(K, V)>) {
    // The sort is stable: of each run of equal keys, keep the last, in place.
    changes.sort_by(|a, b| a.0.cmp(&b.0));
    changes.reverse();
    changes.dedup_by(|later, earlier| later.0 == earlier.0);
    changes.reverse();
}

/// Where `key` is in the sorted `entries`, or would be.
fn position<K: Borrow<Q>, V, Q: Ord + ?Sized>(entries: &[(K, V)], key: &Q) -> Result<usize, usize> {
    entries.binary_search_by(|(held, _)| held.borrow().cmp(key))
}

impl<K: Ord + Clone, V: Clone> Default for PackedMap<K, V> {
    fn default() -> Self {
        PackedMap::new()
    }
}

impl<K: Clone, V> Clone for PackedMap<K, V> {
    fn clone(&self) -> Self {
        PackedMap {
            runs: self.runs.clone(),
            len: self.len,
        }
    }
}

impl<K: Ord + Clone, V: Clone + PartialEq> PartialEq for PackedMap<K, V> {
    fn eq(&self, other: &Self) -> bool {
        self.len == other.len && self.iter().eq(other.iter())
    }
}

impl<K: Ord + Clone + fmt::Debug, V: Clone + fmt::Debug> fmt::Debug for PackedMap<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl<K: Ord + Clone + serde::Serialize, V: Clone + serde::Serialize> serde::Serialize
    for PackedMap<K, V>
{
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.iter())
    }
}

impl<K: Ord + Clone, V: Clone> FromIterator<(K, V)> for PackedMap<K, V> {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(entries: I) -> Self {
        let mut map = PackedMap::new();
        for (key, value) in entries {
            map.insert(key, value);
        }
        map
    }
}

impl<K, V, Q> std::ops::Index<&Q> for PackedMap<K, V>
where
    K: Ord + Clone + Borrow<Q>,
    V: Clone,
    Q: Ord + ?Sized,
{
    type Output = V;

    /// Panics if `key` has no entry, as the standard maps do.
    fn index(&self, key: &Q) -> &V {
        match self.get(key) {
            Some(value) => value,
            None => panic!("no entry for the key"),
        }
    }
}

#[cfg(test)]
#[path = "packed_map_tests.rs"]
mod tests;
