//! [`PodUid`]: a pod's key in the view, `<namespace>/<pod name>`, held in
//! 16 bytes with no allocation of its own.
//!
//! A node holds every pod of the cluster, and the uid was the largest thing
//! a remote pod held alone: about 40 characters behind an `Arc`, 64 bytes
//! of heap. But the pods of one ReplicaSet, DaemonSet, StatefulSet or Job
//! differ only in the last few characters of their names
//! (`shop/web-7d9f8b6c5d-x2k9p`, `shop/web-7d9f8b6c5d-q4m7z`). So a uid is
//! held as a *stem* (up to and including its last `-` or `/`), shared
//! through a process-wide set (see `names`) like the other names, and a
//! *tail* of at most [`TAIL_MAX`] bytes kept inline. A uid whose last part
//! is longer keeps all of it in its stem: correct, just not shared.
//!
//! Uids compare, hash and print as the strings they are.

use std::cmp::Ordering;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, LazyLock};

use super::names;

/// The longest tail kept inline: the 5 letters Kubernetes appends to a
/// generated name fit, and so do most ordinals.
pub const TAIL_MAX: usize = 7;

/// A pod's uid. Cloning it is an `Arc` increment.
#[derive(Clone)]
pub struct PodUid {
    stem: Arc<Stem>,
    tail: Tail,
}

/// The shared front of uids.
#[derive(Debug, PartialEq, Eq, Hash)]
struct Stem(Box<str>);

/// The rest of a uid, inline.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Tail {
    len: u8,
    bytes: [u8; TAIL_MAX],
}

static STEMS: names::Shared<Stem> = LazyLock::new(names::new_set);

impl PodUid {
    /// `uid`, its stem shared with every other holder of the same.
    pub fn new(uid: &str) -> PodUid {
        let (stem, tail) = split(uid);
        let stem = names::share_owned(&STEMS, Stem(stem.into()));
        PodUid { stem, tail }
    }

    /// How it compares with the uid written `text`, as the strings do.
    pub fn cmp_text(&self, text: &str) -> Ordering {
        let (stem, tail) = self.parts();
        let text = text.as_bytes();
        let common = stem.len().min(text.len());
        match stem.as_bytes()[..common].cmp(&text[..common]) {
            Ordering::Equal if stem.len() > text.len() => Ordering::Greater,
            Ordering::Equal => tail.as_bytes().cmp(&text[stem.len()..]),
            unequal => unequal,
        }
    }

    /// The uid's two parts, whose concatenation it is.
    fn parts(&self) -> (&str, &str) {
        (&self.stem.0, self.tail.as_str())
    }

    /// Whether it holds its stem with `other` (one string for both).
    #[cfg(test)]
    pub(crate) fn shares_stem(&self, other: &PodUid) -> bool {
        Arc::ptr_eq(&self.stem, &other.stem)
    }

    /// The pod's name: what follows the first `/` (all of it without one).
    pub fn name(&self) -> String {
        let (stem, tail) = self.parts();
        format!("{}{tail}", &stem[self.name_starts()..])
    }

    /// Whether the pod's name is `name`.
    pub fn name_is(&self, name: &str) -> bool {
        let (stem, tail) = self.parts();
        let in_stem = &stem[self.name_starts()..];
        name.len() == in_stem.len() + tail.len()
            && name.starts_with(in_stem)
            && name.ends_with(tail)
    }

    /// Where the name starts: after the first `/`, which (a tail holds
    /// none) is in the stem if anywhere.
    fn name_starts(&self) -> usize {
        self.stem.0.find('/').map_or(0, |at| at + 1)
    }
}

/// Where a uid splits: after its last `-` or `/` when what follows fits
/// inline, else not at all.
fn split(uid: &str) -> (&str, Tail) {
    let at = uid.rfind(['-', '/']).map_or(0, |at| at + 1);
    let (stem, tail) = if uid.len() - at <= TAIL_MAX {
        uid.split_at(at)
    } else {
        (uid, "")
    };
    let mut bytes = [0; TAIL_MAX];
    bytes[..tail.len()].copy_from_slice(tail.as_bytes());
    let len = u8::try_from(tail.len()).unwrap_or(0);
    (stem, Tail { len, bytes })
}

impl Tail {
    fn as_str(&self) -> &str {
        // Cut from a string after an ASCII byte (or at its start), so it is
        // always UTF-8; the empty string stands for the impossible.
        std::str::from_utf8(&self.bytes[..usize::from(self.len)]).unwrap_or_default()
    }
}

impl PartialEq for PodUid {
    fn eq(&self, other: &Self) -> bool {
        // The split is a function of the string: equal uids have equal
        // stems, which (shared) are mostly the same one.
        self.tail == other.tail && (Arc::ptr_eq(&self.stem, &other.stem) || self.stem == other.stem)
    }
}

impl Eq for PodUid {}

impl PartialEq<str> for PodUid {
    fn eq(&self, other: &str) -> bool {
        let (stem, tail) = self.parts();
        other.len() == stem.len() + tail.len() && other.starts_with(stem) && other.ends_with(tail)
    }
}

impl PartialEq<&str> for PodUid {
    fn eq(&self, other: &&str) -> bool {
        *self == **other
    }
}

impl Hash for PodUid {
    fn hash<H: Hasher>(&self, state: &mut H) {
        let (stem, tail) = self.parts();
        state.write(stem.as_bytes());
        state.write(tail.as_bytes());
        state.write_u8(0xff);
    }
}

impl PartialOrd for PodUid {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// The order of the strings.
impl Ord for PodUid {
    fn cmp(&self, other: &Self) -> Ordering {
        let ((a_stem, a_tail), (b_stem, b_tail)) = (self.parts(), other.parts());
        if Arc::ptr_eq(&self.stem, &other.stem) {
            return a_tail.cmp(b_tail);
        }
        let common = a_stem.len().min(b_stem.len());
        match a_stem.as_bytes()[..common].cmp(&b_stem.as_bytes()[..common]) {
            Ordering::Equal => {}
            unequal => return unequal,
        }
        // One stem begins the other: what follows decides.
        let a = a_stem.bytes().skip(common).chain(a_tail.bytes());
        let b = b_stem.bytes().skip(common).chain(b_tail.bytes());
        a.cmp(b)
    }
}

impl fmt::Display for PodUid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (stem, tail) = self.parts();
        if f.width().is_none() && f.precision().is_none() {
            f.write_str(stem)?;
            return f.write_str(tail);
        }
        f.pad(&format!("{stem}{tail}"))
    }
}

impl fmt::Debug for PodUid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.to_string(), f)
    }
}

impl From<&str> for PodUid {
    fn from(uid: &str) -> PodUid {
        PodUid::new(uid)
    }
}

impl From<String> for PodUid {
    fn from(uid: String) -> PodUid {
        PodUid::new(&uid)
    }
}

impl serde::Serialize for PodUid {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_uid_is_its_string_in_16_bytes() {
        assert_eq!(std::mem::size_of::<PodUid>(), 16);
        assert_eq!(std::mem::size_of::<Option<PodUid>>(), 16);
        for text in [
            "shop/web-7d9f8b6c5d-x2k9p",
            "shop/db-0",
            "shop/solo",
            "shop/a-name-whose-last-part-is-long",
            "shop/",
            "no-namespace",
            "x",
            "shop/ünïcode-é",
            "shop/ends-with-",
        ] {
            let uid = PodUid::new(text);
            assert_eq!(uid.to_string(), text);
            assert_eq!(uid, *text);
            let name = text.split_once('/').map_or(text, |(_, name)| name);
            assert_eq!(uid.name(), name);
            assert!(uid.name_is(name), "{text}");
            assert!(!uid.name_is("other"));
        }
        assert_eq!(format!("[{:>8}]", PodUid::new("a/b-c")), "[   a/b-c]");
    }

    #[test]
    fn the_pods_of_a_replica_set_share_one_stem() {
        let a = PodUid::new("uid-test/web-7d9f8b6c5d-x2k9p");
        let b = PodUid::new("uid-test/web-7d9f8b6c5d-q4m7z");
        assert!(Arc::ptr_eq(&a.stem, &b.stem));
        assert_ne!(a, b);
    }

    #[test]
    fn uids_order_hash_and_compare_as_their_strings() {
        use std::collections::hash_map::DefaultHasher;
        let texts = [
            "a/b",
            "a/b-",
            "a/b-c",
            "a/b-cd",
            "a/b-c-d",
            "a/bc",
            "a/b-longer-than-seven",
            "a/b-l",
            "a-/b",
            "a",
            "",
            "a/b-c/d",
            "a/ba-c",
        ];
        let hash = |uid: &PodUid| {
            let mut hasher = DefaultHasher::new();
            uid.hash(&mut hasher);
            hasher.finish()
        };
        for x in texts {
            for y in texts {
                let (a, b) = (PodUid::new(x), PodUid::new(y));
                assert_eq!(a.cmp(&b), x.cmp(y), "{x:?} against {y:?}");
                assert_eq!(a.cmp_text(y), x.cmp(y), "{x:?} against the text {y:?}");
                assert_eq!(a == b, x == y);
                if x == y {
                    assert_eq!(hash(&a), hash(&b));
                }
            }
        }
    }
}
