//! The local-manifests source: a directory of Kubernetes YAML files, read at
//! start and re-read when it changes. It is the embedded default when there
//! is no cluster, and it behaves like one: objects appear, change and vanish
//! as files are edited.
//!
//! A file is taken whole or not at all: if any document in it is broken, the
//! file's last good objects stay in force and the problem is reported with the
//! file name, document index and reason. Other files are unaffected.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use crate::Error;
use crate::cluster::{ClusterObject, ClusterState};
pub use crate::manifest_file::{DEFAULT_NAMESPACE, ManifestProblem, chunks, parse_documents};
use crate::manifest_file::{KnownChunks, ObjectId, read_file};
/// Editors write a file in several steps; wait this long for quiet.
const SETTLE: Duration = Duration::from_millis(10);

/// The directory's content as last read: good objects per file, the
/// cluster they make, and problems. The cluster is kept up to date file by
/// file: a change to one file of thousands touches that file's objects.
#[derive(Debug, Default)]
pub struct ManifestDir {
    dir: PathBuf,
    /// The last good objects of each file (a later document of a file
    /// replaces an earlier one of the same kind and key).
    files: BTreeMap<PathBuf, BTreeMap<ObjectId, ClusterObject>>,
    /// What the chunks of each file gave when it was last read good.
    chunks: BTreeMap<PathBuf, KnownChunks>,
    /// Hashes chunks of text, with keys of this process's own.
    hasher: std::hash::RandomState,
    /// The files that define each object; the last by name wins.
    defined_in: BTreeMap<ObjectId, BTreeSet<PathBuf>>,
    /// The cluster the files make.
    state: ClusterState,
    /// Problems of the last read, by file.
    problems: BTreeMap<PathBuf, Vec<ManifestProblem>>,
    /// Documents of a kind weft does not use, by file (not problems: the
    /// file is still read, but nothing is dropped without a word).
    ignored: BTreeMap<PathBuf, Vec<ManifestProblem>>,
}

impl ManifestDir {
    /// A source for `dir`; nothing is read until [`ManifestDir::reload`].
    pub fn new(dir: &Path) -> ManifestDir {
        ManifestDir {
            dir: dir.to_owned(),
            ..ManifestDir::default()
        }
    }

    /// Re-reads every `*.yaml` / `*.yml` file. Files that vanished drop their
    /// objects; files with problems keep their last good objects.
    pub fn reload(&mut self) -> Result<(), Error> {
        let entries = std::fs::read_dir(&self.dir).map_err(|source| Error::ReadManifests {
            path: self.dir.clone(),
            source,
        })?;
        let present: BTreeSet<PathBuf> = entries
            .flatten()
            .map(|entry| entry.path())
            .filter(|path| is_manifest(path))
            .collect();
        let gone: Vec<PathBuf> = self
            .files
            .keys()
            .filter(|path| !present.contains(*path))
            .cloned()
            .collect();
        for path in &gone {
            self.set_objects(path, None, &BTreeSet::new());
        }
        self.problems.retain(|path, _| present.contains(path));
        self.ignored.retain(|path, _| present.contains(path));
        for path in present {
            self.read(path);
        }
        Ok(())
    }

    /// Re-reads just `paths` (those a change event named): each is read
    /// again, or forgotten if it is gone or no manifest. A change to one
    /// file of thousands costs that file. A path outside the directory
    /// means the event was not about its files: everything is read again.
    pub fn reload_files(&mut self, paths: &BTreeSet<PathBuf>) -> Result<(), Error> {
        if paths
            .iter()
            .any(|path| path.parent() != Some(self.dir.as_path()))
        {
            return self.reload();
        }
        for path in paths {
            if is_manifest(path) {
                self.read(path.clone());
            } else {
                self.set_objects(path, None, &BTreeSet::new());
                self.problems.remove(path);
                self.ignored.remove(path);
            }
        }
        Ok(())
    }

    fn read(&mut self, path: PathBuf) {
        let known = self.chunks.get(&path);
        let empty = KnownChunks::default();
        let read = read_file(
            &path,
            known.unwrap_or(&empty),
            self.files.get(&path),
            &self.hasher,
        );
        match read {
            Ok(contents) => {
                self.problems.remove(&path);
                self.ignored.insert(path.clone(), contents.ignored);
                self.chunks.insert(path.clone(), contents.chunks);
                self.set_objects(&path, Some(contents.objects), &contents.unchanged);
            }
            Err(problems) => {
                for problem in &problems {
                    warn!(%problem, "manifest refused; keeping the file's last good objects");
                }
                self.problems.insert(path, problems);
            }
        }
    }

    /// Replaces the objects of the file at `path` (`None`: it has none),
    /// and brings the cluster up to date for every object it defined or
    /// defines, except those `unchanged` (the file defined them before
    /// exactly so).
    fn set_objects(
        &mut self,
        path: &Path,
        objects: Option<BTreeMap<ObjectId, ClusterObject>>,
        unchanged: &BTreeSet<ObjectId>,
    ) {
        let old = match objects {
            Some(objects) => self.files.insert(path.to_owned(), objects),
            None => {
                self.chunks.remove(path);
                self.files.remove(path)
            }
        };
        let mut touched: BTreeSet<ObjectId> = BTreeSet::new();
        let old = old.into_iter().flat_map(BTreeMap::into_keys);
        for id in old.filter(|id| !unchanged.contains(id)) {
            if let Some(files) = self.defined_in.get_mut(&id) {
                files.remove(path);
                if files.is_empty() {
                    self.defined_in.remove(&id);
                }
            }
            touched.insert(id);
        }
        let new = self.files.get(path).into_iter().flat_map(BTreeMap::keys);
        for id in new.filter(|id| !unchanged.contains(*id)) {
            self.defined_in
                .entry(id.clone())
                .or_default()
                .insert(path.to_owned());
            touched.insert(id.clone());
        }
        for id in touched {
            let files = self.defined_in.get(&id);
            let winner = files
                .and_then(|files| files.last())
                .and_then(|file| self.files.get(file))
                .and_then(|objects| objects.get(&id));
            match winner {
                Some(object) => {
                    if files.is_some_and(|files| files.len() > 1) {
                        warn!(object = %object.describe(), files = ?files, "object defined in more than one file; the last by name wins");
                    }
                    self.state.insert(object.clone());
                }
                None => self.state.remove(id.0, &id.1),
            }
        }
    }

    /// The cluster as the good objects of all files describe it. When two
    /// files define the same object, the later file (by name) wins. A
    /// copy shares everything with the directory's own (O(1)).
    pub fn state(&self) -> ClusterState {
        self.state.clone()
    }

    /// Problems found by the last reload.
    pub fn problems(&self) -> Vec<ManifestProblem> {
        self.problems.values().flatten().cloned().collect()
    }

    /// The problems, then the documents skipped as kinds weft does not use:
    /// what `/debug/manifests` lists.
    pub fn notes(&self) -> Vec<ManifestProblem> {
        let ignored = self.ignored.values().flatten().cloned();
        self.problems().into_iter().chain(ignored).collect()
    }
}

/// Whether `path` is a file the directory's cluster is read from: a
/// `*.yaml` or `*.yml` file that is not hidden (editors and atomic writers
/// keep their temporary files hidden).
fn is_manifest(path: &Path) -> bool {
    let is_yaml = path
        .extension()
        .is_some_and(|ext| ext == "yaml" || ext == "yml");
    let hidden = path
        .file_name()
        .is_some_and(|name| name.to_string_lossy().starts_with('.'));
    is_yaml && !hidden && path.is_file()
}

/// The current problems of a watched directory.
pub type ProblemsReceiver = watch::Receiver<Vec<ManifestProblem>>;

/// Watches `dir` and publishes a new [`ClusterState`] after every change.
/// Returns the receiver of states (the first one already read) and of the
/// current problems; counts each re-read in `reloads`. The watcher runs
/// until the returned receivers are gone.
pub fn watch_dir(
    dir: &Path,
    reloads: prometheus_client::metrics::counter::Counter,
) -> Result<(watch::Receiver<Arc<ClusterState>>, ProblemsReceiver), Error> {
    let mut source = ManifestDir::new(dir);
    source.reload()?;
    info!(dir = %dir.display(), files = source.files.len(), "read local manifests");
    let (state_tx, state_rx) = watch::channel(Arc::new(source.state()));
    let (problems_tx, problems_rx) = watch::channel(source.notes());

    // Each event names the files it is about; `None` when it cannot (the
    // kernel's queue overflowed, or an event without paths): read them all.
    let (event_tx, mut event_rx) = mpsc::unbounded_channel::<Option<Vec<PathBuf>>>();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let paths = match event {
            // Reads (ours included) are not changes; reacting to them would
            // make every reload trigger the next.
            Ok(event) if matches!(event.kind, notify::EventKind::Access(_)) => return,
            Ok(event) if !event.need_rescan() && !event.paths.is_empty() => Some(event.paths),
            Ok(_) | Err(_) => None,
        };
        let _ = event_tx.send(paths);
    })
    .map_err(|source| Error::WatchManifests {
        path: dir.to_owned(),
        source,
    })?;
    notify::Watcher::watch(&mut watcher, dir, notify::RecursiveMode::NonRecursive).map_err(
        |source| Error::WatchManifests {
            path: dir.to_owned(),
            source,
        },
    )?;

    tokio::spawn(async move {
        let _watcher = watcher; // dropping it stops the watch
        while let Some(first) = event_rx.recv().await {
            // Coalesce a burst of events into one reload.
            tokio::time::sleep(SETTLE).await;
            let mut changed: Option<BTreeSet<PathBuf>> = first.map(BTreeSet::from_iter);
            while let Ok(paths) = event_rx.try_recv() {
                changed = changed.zip(paths).map(|(mut all, more)| {
                    all.extend(more);
                    all
                });
            }
            reloads.inc();
            // Reading and parsing files, and copying the cluster out, cost
            // in proportion to them: not on the async workers, which answer
            // the proxies meanwhile.
            let read = tokio::task::spawn_blocking(move || {
                let read = match &changed {
                    Some(paths) => source.reload_files(paths),
                    None => source.reload(),
                };
                let state = read.is_ok().then(|| source.state());
                (source, read, state)
            })
            .await;
            let Ok((returned, read, state)) = read else {
                break; // the runtime is shutting down
            };
            source = returned;
            if let Err(error) = read {
                warn!(%error, "re-reading manifests failed; keeping the last state");
                continue;
            }
            let problems = source.notes();
            problems_tx.send_if_modified(|current| {
                let changed = *current != problems;
                *current = problems;
                changed
            });
            if let Some(state) = state
                && state_tx.send(Arc::new(state)).is_err()
            {
                break;
            }
        }
    });
    Ok((state_rx, problems_rx))
}
