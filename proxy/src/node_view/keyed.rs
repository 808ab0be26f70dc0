//! [`Keyed`]: the view's maps of workloads and Services, whose entries carry
//! their own key (a workload its uid, a Service its `<namespace>/<name>`).
//!
//! A node holds an entry for every pod of the cluster, so the map stores
//! each entry once, as one pointer, and reads its key from it: a map of key
//! and value would hold the key's pointer beside the value's, 16 more bytes
//! per pod. Underneath it is a [`PackedMap`] (persistent, packed, diffed in
//! proportion to what differs) of those pointers, ordered by key.

use std::borrow::Borrow;
use std::cmp::Ordering;
use std::fmt;
use std::hash::Hash;
use std::sync::Arc;

use crate::packed_map::{Change, PackedMap, last_change_of_each_key};

use super::PodUid;

/// An entry that carries its key.
pub trait HasKey {
    /// What its key is held as.
    type Key: ViewKey;
    /// The entry's key in the view.
    fn key(&self) -> &Self::Key;
}

/// A key of the view's maps: a string, held as the map's entries need.
pub trait ViewKey:
    Ord + Clone + Hash + fmt::Display + fmt::Debug + serde::Serialize + for<'a> From<&'a str>
{
    /// How the key compares with the key written `text` (as the strings
    /// do: the map is in the order of its keys' strings).
    fn cmp_text(&self, text: &str) -> Ordering;
}

impl ViewKey for Arc<str> {
    fn cmp_text(&self, text: &str) -> Ordering {
        (**self).cmp(text)
    }
}

impl ViewKey for PodUid {
    fn cmp_text(&self, text: &str) -> Ordering {
        PodUid::cmp_text(self, text)
    }
}

/// Entries by their key. Cloning it is O(1) and shares every entry.
pub struct Keyed<T> {
    entries: PackedMap<ByKey<T>, ()>,
}

/// An entry, compared by its key alone (the map's order). Whether two
/// entries of one key are the same is [`Keyed::diff`]'s business.
struct ByKey<T>(Arc<T>);

impl<T> Clone for ByKey<T> {
    fn clone(&self) -> Self {
        ByKey(self.0.clone())
    }
}

impl<T: HasKey> PartialEq for ByKey<T> {
    fn eq(&self, other: &Self) -> bool {
        self.0.key() == other.0.key()
    }
}

impl<T: HasKey> Eq for ByKey<T> {}

impl<T: HasKey> PartialOrd for ByKey<T> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl<T: HasKey> Ord for ByKey<T> {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.key().cmp(other.0.key())
    }
}

/// What an entry is looked up by in the [`PackedMap`]: a key as held, a
/// key's text, or an entry (by its key). The map finds entries by what they
/// borrow as, and `ByKey<T>` cannot borrow as `T::Key` itself (the standard
/// library's `Borrow<Self>` might be that), so all borrow as this.
trait KeyLike<K> {
    fn probe(&self) -> Probe<'_, K>;
}

/// A key as held, or as text.
enum Probe<'a, K> {
    Held(&'a K),
    Text(&'a str),
}

impl<K: ViewKey> KeyLike<K> for K {
    fn probe(&self) -> Probe<'_, K> {
        Probe::Held(self)
    }
}

impl<K> KeyLike<K> for &str {
    fn probe(&self) -> Probe<'_, K> {
        Probe::Text(self)
    }
}

impl<T: HasKey> KeyLike<T::Key> for ByKey<T> {
    fn probe(&self) -> Probe<'_, T::Key> {
        Probe::Held(self.0.key())
    }
}

impl<K: ViewKey> PartialEq for dyn KeyLike<K> + '_ {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl<K: ViewKey> Eq for dyn KeyLike<K> + '_ {}

impl<K: ViewKey> PartialOrd for dyn KeyLike<K> + '_ {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl<K: ViewKey> Ord for dyn KeyLike<K> + '_ {
    fn cmp(&self, other: &Self) -> Ordering {
        match (self.probe(), other.probe()) {
            (Probe::Held(a), Probe::Held(b)) => a.cmp(b),
            (Probe::Held(a), Probe::Text(b)) => a.cmp_text(b),
            (Probe::Text(a), Probe::Held(b)) => b.cmp_text(a).reverse(),
            (Probe::Text(a), Probe::Text(b)) => a.cmp(b),
        }
    }
}

impl<'a, T: HasKey + 'a> Borrow<dyn KeyLike<T::Key> + 'a> for ByKey<T> {
    fn borrow(&self) -> &(dyn KeyLike<T::Key> + 'a) {
        self
    }
}

impl<T: HasKey + PartialEq> Keyed<T> {
    /// An empty map.
    pub fn new() -> Self {
        Keyed {
            entries: PackedMap::new(),
        }
    }

    /// How many entries it holds.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entry of `key`, with its key.
    pub fn get_key_value(&self, key: &str) -> Option<(&T::Key, &Arc<T>)> {
        let (entry, ()) = self.entries.get_key_value(&key as &dyn KeyLike<T::Key>)?;
        Some((entry.0.key(), &entry.0))
    }

    /// The entry of `key`, with its key, looked up by the key as held.
    pub fn get_by_key(&self, key: &T::Key) -> Option<(&T::Key, &Arc<T>)> {
        let (entry, ()) = self.entries.get_key_value(key as &dyn KeyLike<T::Key>)?;
        Some((entry.0.key(), &entry.0))
    }

    /// The entry of `key`.
    pub fn get(&self, key: &str) -> Option<&Arc<T>> {
        self.get_key_value(key).map(|(_, value)| value)
    }

    /// Whether `key` has an entry.
    pub fn contains_key(&self, key: &str) -> bool {
        self.get_key_value(key).is_some()
    }

    /// Every entry with its key, by key.
    pub fn iter(&self) -> impl Iterator<Item = (&T::Key, &Arc<T>)> {
        self.entries.keys().map(|entry| (entry.0.key(), &entry.0))
    }

    /// Every key, in order.
    pub fn keys(&self) -> impl Iterator<Item = &T::Key> {
        self.iter().map(|(key, _)| key)
    }

    /// Every entry, by key.
    pub fn values(&self) -> impl Iterator<Item = &Arc<T>> {
        self.iter().map(|(_, value)| value)
    }

    /// Applies many changes at once: an entry put in (replacing the one of
    /// its key, if any; `key` must be the entry's), or a key's entry
    /// removed; for a key given twice, the last stands (see
    /// [`PackedMap::apply`]), also when it removes an entry the batch put in.
    pub fn apply(&mut self, mut changes: Vec<(T::Key, Option<Arc<T>>)>) {
        // Decided before a removal is matched to the entry it removes,
        // which the map holds only if it held it before the batch.
        last_change_of_each_key(&mut changes);
        let entries = &self.entries;
        let changes: Vec<_> = changes
            .into_iter()
            .filter_map(|(key, value)| match value {
                Some(value) => {
                    debug_assert_eq!(key, *value.key(), "an entry put in under another key");
                    Some((ByKey(value), Some(())))
                }
                // A removal names its entry by the one the map holds.
                None => {
                    let (held, ()) = entries.get_key_value(&key as &dyn KeyLike<T::Key>)?;
                    Some((held.clone(), None))
                }
            })
            .collect();
        self.entries.apply_sorted(changes);
    }

    /// How `self` (the earlier map) and `other` (the later one) differ,
    /// key by key in order, in proportion to what differs (see
    /// [`PackedMap::diff`]). Two entries of one key differ unless they are
    /// one, or equal.
    pub fn diff<'a>(
        &'a self,
        other: &'a Self,
    ) -> impl Iterator<Item = Change<'a, T::Key, Arc<T>>> + 'a {
        let same = |(old, ()): &(ByKey<T>, ()), (new, ()): &(ByKey<T>, ())| {
            Arc::ptr_eq(&old.0, &new.0) || old.0 == new.0
        };
        self.entries
            .diff_by(&other.entries, same)
            .filter_map(|sides| match sides {
                (Some((old, ())), Some((new, ()))) => Some(Change::Updated {
                    key: new.0.key(),
                    old: &old.0,
                    new: &new.0,
                }),
                (Some((old, ())), None) => Some(Change::Removed(old.0.key(), &old.0)),
                (None, Some((new, ()))) => Some(Change::Added(new.0.key(), &new.0)),
                (None, None) => None,
            })
    }

    /// How many runs hold the entries (for tests of the packing).
    #[cfg(test)]
    pub fn runs(&self) -> usize {
        self.entries.runs()
    }
}

impl<T: HasKey + PartialEq> Default for Keyed<T> {
    fn default() -> Self {
        Keyed::new()
    }
}

impl<T> Clone for Keyed<T> {
    fn clone(&self) -> Self {
        Keyed {
            entries: self.entries.clone(),
        }
    }
}

/// Equal when they hold equal entries (not just the same keys).
impl<T: HasKey + PartialEq> PartialEq for Keyed<T> {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.values().eq(other.values())
    }
}

impl<T: HasKey + PartialEq + fmt::Debug> fmt::Debug for Keyed<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl<T: HasKey + PartialEq + serde::Serialize> serde::Serialize for Keyed<T> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.iter())
    }
}

impl<T: HasKey + PartialEq> std::ops::Index<&str> for Keyed<T> {
    type Output = Arc<T>;

    /// Panics if `key` has no entry, as the standard maps do.
    fn index(&self, key: &str) -> &Arc<T> {
        match self.get(key) {
            Some(value) => value,
            None => panic!("no entry for the key"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq)]
    struct Entry {
        key: Arc<str>,
        value: u32,
    }

    impl HasKey for Entry {
        type Key = Arc<str>;
        fn key(&self) -> &Arc<str> {
            &self.key
        }
    }

    fn entry(key: &str, value: u32) -> (Arc<str>, Option<Arc<Entry>>) {
        let key: Arc<str> = key.into();
        (key.clone(), Some(Arc::new(Entry { key, value })))
    }

    /// The key lives in the entry: a new entry of a key is a change the
    /// diff sees and equality tells apart, though the key is the same.
    #[test]
    fn an_entry_replaced_under_its_key_is_a_change() {
        let mut before = Keyed::new();
        before.apply(vec![entry("a", 1), entry("b", 2), entry("c", 3)]);
        let mut after = before.clone();
        after.apply(vec![entry("b", 20), ("c".into(), None), ("z".into(), None)]);
        let said: Vec<String> = before
            .diff(&after)
            .map(|change| match change {
                Change::Added(key, new) => format!("+{key}={}", new.value),
                Change::Updated { key, old, new } => format!("{key}:{}->{}", old.value, new.value),
                Change::Removed(key, old) => format!("-{key}={}", old.value),
            })
            .collect();
        assert_eq!(
            said,
            ["b:2->20", "-c=3"],
            "removing a missing key is nothing"
        );
        assert_ne!(before, after);
        assert_eq!(after.len(), 2);
        assert_eq!(after["b"].value, 20);
        // An equal entry made anew is no change.
        let mut again = after.clone();
        again.apply(vec![entry("b", 20)]);
        assert_eq!(after.diff(&again).count(), 0);
        assert_eq!(after, again);
    }

    /// As in a map of keys: the last change of a key in one batch stands,
    /// also a removal of an entry the same batch put in.
    #[test]
    fn the_last_change_of_a_key_in_a_batch_stands() {
        let mut map = Keyed::new();
        map.apply(vec![entry("a", 1), ("a".into(), None), entry("b", 2)]);
        assert!(!map.contains_key("a"), "put in, then removed");
        map.apply(vec![
            ("b".into(), None),
            entry("b", 3),
            entry("c", 4),
            ("c".into(), None),
        ]);
        assert_eq!(map.len(), 1);
        assert_eq!(map["b"].value, 3);
    }
}
