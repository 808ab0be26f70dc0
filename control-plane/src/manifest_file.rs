//! One manifest file read into cluster objects, parsing again only what
//! changed. A file's text is cut before each line that is a bare `---`
//! into chunks that each parse alone to the documents they held in the
//! whole (YAML allows no such line inside a document); what came of each
//! chunk is kept by a hash of its text ([`KnownChunks`]). So an edit to one
//! document of a large file parses that document again, not the file: at
//! 50,000 pods, YAML was most of the control plane's cost per pod change.
//!
//! Whatever is cut or kept, the outcome is the whole file's: the same
//! objects, the same problems with the same document indices. A file whose
//! chunks do not parse is parsed whole again, for its error message; one
//! with directives or document-end markers (whose reach a cut could change)
//! is always parsed whole. One difference: the YAML parser's limits (on
//! documents, nodes, aliases) apply to each chunk, not to the file, which
//! only the file's size limit bounds as a whole. A large file of many
//! small documents is read, where a whole parse would have refused it at
//! 1,024 documents.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{BuildHasher, RandomState};
use std::path::{Path, PathBuf};

use serde_json::Value;
use tracing::debug;

use crate::cluster::{ClusterObject, ObjectKey, ObjectProblem};

/// Largest manifest file read; bigger files are refused, not truncated.
pub(crate) const MAX_FILE_BYTES: u64 = 16 * 1024 * 1024;

/// One problem found in a manifest file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManifestProblem {
    /// The file.
    pub file: PathBuf,
    /// The document's index in the file (0-based), if the problem is in one document.
    pub document: Option<usize>,
    /// What is wrong.
    pub reason: String,
}

impl std::fmt::Display for ManifestProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.document {
            Some(doc) => write!(f, "{} document {doc}: {}", self.file.display(), self.reason),
            None => write!(f, "{}: {}", self.file.display(), self.reason),
        }
    }
}

/// An object's identity across files: its kind and key.
pub(crate) type ObjectId = (&'static str, ObjectKey);

/// What each chunk of a file's text gave when the file was last read
/// good, by the chunk's length and a hash of its text (keyed per process,
/// see [`RandomState`]).
#[derive(Debug, Default)]
pub(crate) struct KnownChunks {
    by_hash: HashMap<(usize, u64), Vec<Outcome>>,
}

/// What one document gave.
#[derive(Clone, Debug)]
enum Outcome {
    /// An empty document.
    Empty,
    /// This object.
    Object(ObjectId),
    /// A kind weft does not use.
    Ignored(String),
}

/// A file read good.
#[derive(Debug, Default)]
pub(crate) struct FileContents {
    /// Its objects (a later document replaces an earlier one of the same
    /// kind and key).
    pub objects: BTreeMap<ObjectId, ClusterObject>,
    /// Notes on the documents it skipped (kinds weft does not use).
    pub ignored: Vec<ManifestProblem>,
    /// The objects of chunks whose text had not changed since the file was
    /// last read good: the same objects as then.
    pub unchanged: BTreeSet<ObjectId>,
    /// What to reuse when the file is read next.
    pub chunks: KnownChunks,
}

/// Reads the file at `path`. `known` and `previous` are what its last good
/// read gave (empty for a new file); a chunk whose text is unchanged takes
/// its objects from `previous` instead of being parsed. Every problem that
/// refuses the file, if any.
pub(crate) fn read_file(
    path: &Path,
    known: &KnownChunks,
    previous: Option<&BTreeMap<ObjectId, ClusterObject>>,
    hasher: &RandomState,
) -> Result<FileContents, Vec<ManifestProblem>> {
    let problem = |document: Option<usize>, reason: String| ManifestProblem {
        file: path.to_owned(),
        document,
        reason,
    };
    let text = std::fs::metadata(path)
        .map_err(|e| e.to_string())
        .and_then(|meta| {
            if meta.len() > MAX_FILE_BYTES {
                Err(format!(
                    "{} bytes, the limit is {MAX_FILE_BYTES}",
                    meta.len()
                ))
            } else {
                std::fs::read_to_string(path).map_err(|e| e.to_string())
            }
        })
        .map_err(|reason| vec![problem(None, reason)])?;
    let whole = || {
        let documents = parse_documents(&text).map_err(|reason| vec![problem(None, reason)])?;
        let mut reading = Reading::new(path);
        reading.documents(documents);
        reading.finish(false)
    };
    let Some(pieces) = chunks(&text) else {
        return whole();
    };
    let empty = BTreeMap::new();
    let previous = previous.unwrap_or(&empty);
    let mut reading = Reading::new(path);
    for piece in pieces {
        let hash = (piece.len(), hasher.hash_one(piece));
        let reusable = known.by_hash.get(&hash).filter(|outcomes| {
            outcomes.iter().all(|outcome| match outcome {
                Outcome::Object(id) => previous.contains_key(id),
                Outcome::Empty | Outcome::Ignored(_) => true,
            })
        });
        let first = reading.outcomes.len();
        match reusable {
            Some(outcomes) => reading.reuse(outcomes, previous),
            None => match parse_documents(piece) {
                Ok(documents) => reading.documents(documents),
                // Parsed whole, the file says where it is broken.
                Err(_) => return whole(),
            },
        }
        reading.chunks.push((hash, first..reading.outcomes.len()));
    }
    reading.finish(true)
}

/// A file's documents as they are read, in order.
struct Reading<'a> {
    path: &'a Path,
    outcomes: Vec<Outcome>,
    /// Each chunk's length and hash, and its documents' range in
    /// `outcomes`.
    chunks: Vec<((usize, u64), std::ops::Range<usize>)>,
    objects: BTreeMap<ObjectId, ClusterObject>,
    unchanged: BTreeSet<ObjectId>,
    /// An object defined twice in the file: its chunks are not reused.
    repeated: bool,
    problems: Vec<ManifestProblem>,
    ignored: Vec<ManifestProblem>,
}

impl<'a> Reading<'a> {
    fn new(path: &'a Path) -> Reading<'a> {
        Reading {
            path,
            outcomes: Vec::new(),
            chunks: Vec::new(),
            objects: BTreeMap::new(),
            unchanged: BTreeSet::new(),
            repeated: false,
            problems: Vec::new(),
            ignored: Vec::new(),
        }
    }

    fn problem(&self, document: usize, reason: String) -> ManifestProblem {
        ManifestProblem {
            file: self.path.to_owned(),
            document: Some(document),
            reason,
        }
    }

    fn object(&mut self, object: ClusterObject, unchanged: bool) {
        let id = (object.kind(), object.key());
        self.outcomes.push(Outcome::Object(id.clone()));
        if unchanged {
            self.unchanged.insert(id.clone());
        }
        self.repeated |= self.objects.insert(id, object).is_some();
    }

    fn ignored(&mut self, kind: &str) {
        let index = self.outcomes.len();
        debug!(file = %self.path.display(), index, kind, "ignoring object of an unused kind");
        let note = self.problem(index, format!("ignored: weft does not use kind {kind}"));
        self.ignored.push(note);
        self.outcomes.push(Outcome::Ignored(kind.to_owned()));
    }

    /// Takes a chunk's documents as its last read gave them.
    fn reuse(&mut self, outcomes: &[Outcome], previous: &BTreeMap<ObjectId, ClusterObject>) {
        for outcome in outcomes {
            match outcome {
                Outcome::Empty => self.outcomes.push(Outcome::Empty),
                Outcome::Ignored(kind) => self.ignored(kind),
                Outcome::Object(id) => {
                    if let Some(object) = previous.get(id) {
                        self.object(object.clone(), true);
                    }
                }
            }
        }
    }

    /// Takes parsed documents.
    fn documents(&mut self, documents: Vec<Value>) {
        for document in documents {
            let index = self.outcomes.len();
            if document.is_null() {
                self.outcomes.push(Outcome::Empty);
                continue;
            }
            // What an API server would refuse on admission, refused here too.
            if let Err(reason) = crate::crd::check_against_crd(&document) {
                let reason = format!("{}: {reason}", describe(&document));
                self.problems.push(self.problem(index, reason));
                self.outcomes.push(Outcome::Empty);
                continue;
            }
            match ClusterObject::from_value(apply_defaults(document)) {
                Ok(object) => self.object(object, false),
                Err(ObjectProblem::Ignored { kind }) => self.ignored(&kind),
                Err(ObjectProblem::Invalid { reason }) => {
                    self.problems.push(self.problem(index, reason));
                    self.outcomes.push(Outcome::Empty);
                }
            }
        }
    }

    /// The file's contents, or its problems; what to reuse next time if
    /// `keep` (and no object was defined twice: reuse takes an object by
    /// its id, which would then name the later one).
    fn finish(self, keep: bool) -> Result<FileContents, Vec<ManifestProblem>> {
        if !self.problems.is_empty() {
            return Err(self.problems);
        }
        let mut chunks = KnownChunks::default();
        if keep && !self.repeated {
            for (hash, range) in self.chunks {
                chunks.by_hash.insert(hash, self.outcomes[range].to_vec());
            }
        }
        Ok(FileContents {
            objects: self.objects,
            ignored: self.ignored,
            unchanged: if self.repeated {
                BTreeSet::new()
            } else {
                self.unchanged
            },
            chunks,
        })
    }
}

/// `text` cut before each line that is a bare `---` (a document start
/// marker with nothing after it on the line); `None` when the text has a
/// directive (`%...`) or a document end marker (`...`), which a cut could
/// separate from the documents they apply to.
pub fn chunks(text: &str) -> Option<Vec<&str>> {
    let mut cuts = vec![0];
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        // What the YAML parser takes as the end of a marker: not any
        // Unicode space (a no-break space after `---` is content).
        let bare = line.trim_end_matches([' ', '\t', '\r', '\n']);
        if bare.starts_with('%') || bare == "..." || bare.starts_with("... ") {
            return None;
        }
        if bare == "---" && offset > 0 {
            cuts.push(offset);
        }
        offset += line.len();
    }
    cuts.push(text.len());
    Some(cuts.windows(2).map(|w| &text[w[0]..w[1]]).collect())
}

/// `Kind namespace/name` of a document, for messages.
fn describe(document: &Value) -> String {
    let text = |value: Option<&Value>| value.and_then(Value::as_str).unwrap_or("").to_owned();
    let metadata = document.get("metadata");
    let namespace = text(metadata.and_then(|m| m.get("namespace")));
    let name = text(metadata.and_then(|m| m.get("name")));
    let kind = text(document.get("kind"));
    if namespace.is_empty() {
        format!("{kind} {name}")
    } else {
        format!("{kind} {namespace}/{name}")
    }
}

/// The namespace of an object written without one, as `kubectl apply`
/// without `-n` would give it.
pub const DEFAULT_NAMESPACE: &str = "default";

/// What the API server (and kubectl) would fill in before anyone saw the
/// object: the namespace of a namespaced object written without one, and
/// the ServiceAccount of a pod without one (the ServiceAccount admission
/// plugin's `default`; never for a static pod's mirror, which it skips).
/// Demo applications' YAML (Online Boutique, bookinfo, httpbin) relies on
/// both.
fn apply_defaults(mut document: Value) -> Value {
    let kind = document.get("kind").and_then(Value::as_str).unwrap_or("");
    let is_namespace = kind == "Namespace";
    let is_pod = kind == "Pod" && document.get("apiVersion").and_then(Value::as_str) == Some("v1");
    let Some(object) = document.as_object_mut() else {
        return document;
    };
    if !is_namespace {
        let metadata = object
            .entry("metadata")
            .or_insert_with(|| Value::Object(Default::default()));
        if let Some(metadata) = metadata.as_object_mut() {
            let namespace = metadata.get("namespace").and_then(Value::as_str);
            if namespace.is_none_or(str::is_empty) {
                metadata.insert("namespace".into(), DEFAULT_NAMESPACE.into());
            }
        }
    }
    if is_pod {
        let mirror = object
            .get("metadata")
            .and_then(|m| m.get("annotations"))
            .and_then(|a| a.get(crate::cluster::MIRROR_POD_ANNOTATION))
            .is_some();
        if let Some(spec) = object.get_mut("spec").and_then(Value::as_object_mut)
            && !mirror
        {
            let account = spec.get("serviceAccountName").and_then(Value::as_str);
            if account.is_none_or(str::is_empty) {
                spec.insert("serviceAccountName".into(), "default".into());
            }
        }
    }
    document
}

/// Splits a multi-document YAML text into JSON values.
pub fn parse_documents(text: &str) -> Result<Vec<Value>, String> {
    serde_saphyr::from_multiple::<Value>(text).map_err(|e| format!("invalid YAML: {e}"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed assertion

    use super::*;

    fn pod(name: &str, ip: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: shop}}\n\
             spec: {{nodeName: node-1, serviceAccountName: web, containers: []}}\n\
             status: {{phase: Running, podIP: {ip}}}\n"
        )
    }

    #[test]
    fn text_is_cut_only_before_bare_document_markers() {
        let text = "a: 1\n---\nb: 2\n--- # not bare\nc: 3\n---  \nd: |\n  ---x\n";
        assert_eq!(
            chunks(text).unwrap(),
            [
                "a: 1\n",
                "---\nb: 2\n--- # not bare\nc: 3\n",
                "---  \nd: |\n  ---x\n"
            ]
        );
        // A leading marker starts the first chunk; no empty chunk before it.
        assert_eq!(chunks("---\na: 1\n").unwrap(), ["---\na: 1\n"]);
        // Directives and end markers: read whole.
        assert!(chunks("%YAML 1.2\n---\na: 1\n").is_none());
        assert!(chunks("a: 1\n...\n---\nb: 2\n").is_none());
        // Line ends of either kind; a no-break space is not a marker's end.
        assert_eq!(chunks("a: 1\r\n---\r\nb: 2\r\n").unwrap().len(), 2);
        assert_eq!(chunks("a\n---\u{a0}\n").unwrap(), ["a\n---\u{a0}\n"]);
    }

    #[test]
    fn an_edit_to_one_document_parses_that_document_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shop.yaml");
        let write = |docs: &[String]| std::fs::write(&path, docs.join("---\n")).unwrap();
        let mut docs: Vec<String> = (0..4).map(|i| pod(&format!("p{i}"), "10.0.0.1")).collect();
        write(&docs);
        let hasher = RandomState::new();
        let first = read_file(&path, &KnownChunks::default(), None, &hasher).unwrap();
        assert_eq!(first.objects.len(), 4);
        assert!(first.unchanged.is_empty());

        docs[2] = pod("p2", "10.0.0.2");
        write(&docs);
        let second = read_file(&path, &first.chunks, Some(&first.objects), &hasher).unwrap();
        let names: Vec<&str> = second
            .unchanged
            .iter()
            .map(|(_, key)| key.as_str())
            .collect();
        assert_eq!(names, ["shop/p0", "shop/p1", "shop/p3"]);
        let fresh = read_file(&path, &KnownChunks::default(), None, &hasher).unwrap();
        assert_eq!(
            format!("{:?}", second.objects),
            format!("{:?}", fresh.objects)
        );

        // A file that defines an object twice reuses nothing next time.
        docs[3] = pod("p0", "10.0.0.3");
        write(&docs);
        let third = read_file(&path, &second.chunks, Some(&second.objects), &hasher).unwrap();
        assert!(third.unchanged.is_empty());
        assert!(third.chunks.by_hash.is_empty());
    }
}
