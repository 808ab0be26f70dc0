//! The proxy's last good state, kept on its node (`--state-dir`), so that a
//! proxy that restarts (a crash, an OOM kill, an upgrade, a node reboot)
//! serves and enforces what it served before, also while the control plane
//! is unreachable, instead of starting with nothing.
//!
//! These files, both written whole to a temporary file and renamed
//! into place (a reader never sees half of one), readable by the proxy's
//! user only, in a directory only it can enter:
//! - `config.pb`: the applied config as one full state, in the wire format
//!   (`weft.v1.ConfigUpdate`). [`StoredConfig::fold_in`] folds every applied
//!   update into it; reading it back goes through [`NodeView::apply`]
//!   (crate::NodeView::apply) like any full state from the control plane,
//!   so a damaged or foreign file is refused the same way.
//! - `certs/<trust domain>_<namespace>_<service account>.pem`: each workload
//!   certificate with its private key. The key never leaves the node; it
//!   stays on it across restarts. A stored certificate is used only while
//!   it verifies against the restored roots (so never after it expires).
//! - `pods.json`: the node's pods and their network namespaces (capture
//!   mode `pod`), so that a restarted proxy serves its pods again without
//!   waiting for anyone to announce them; `meshed-namespaces.json`, which
//!   the CNI plugin reads when the proxy is down.
//!
//! This module reads and writes those files; it does not decide when.

use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use prost::Message;
use weft_api::v1::ConfigUpdate;
use weft_certs::{Identity, TrustBundle, WorkloadCertificate};

use crate::Error;
use crate::node_view::NodeView;
use crate::pod_directory::AnnouncedPod;

/// The stored config's file name.
const CONFIG_FILE: &str = "config.pb";

/// The node's pods and their network namespaces (JSON).
const PODS_FILE: &str = "pods.json";

/// The namespaces whose pods are meshed (JSON), for the CNI plugin.
pub const MESHED_NAMESPACES_FILE: &str = "meshed-namespaces.json";
/// The directory of stored certificates.
const CERTS_DIR: &str = "certs";

/// The state directory on the node.
#[derive(Clone, Debug)]
pub struct NodeState {
    dir: PathBuf,
    /// Set by [`NodeState::clear`]; every write after it is refused, so
    /// that a write already under way (the config writer is a task of its
    /// own) cannot put a file back.
    cleared: std::sync::Arc<std::sync::Mutex<bool>>,
}

impl NodeState {
    /// Opens (creating it if needed) the state directory `dir`, and makes
    /// it and its certificate directory private to the proxy's user.
    pub fn open(dir: &Path) -> Result<NodeState, Error> {
        let state = NodeState {
            dir: dir.to_owned(),
            cleared: std::sync::Arc::default(),
        };
        for path in [dir.to_owned(), state.certs_dir()] {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&path)
                .and_then(|()| fs::set_permissions(&path, fs::Permissions::from_mode(0o700)))
                .map_err(|source| Error::WriteState {
                    path: path.clone(),
                    source,
                })?;
        }
        Ok(state)
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The stored config, if there is one that decodes; a file that does
    /// not (or is larger than `max_bytes`) is an error, to be logged and
    /// left behind: the next write replaces it.
    pub fn load_config(&self, max_bytes: usize) -> Result<Option<ConfigUpdate>, Error> {
        let path = self.dir.join(CONFIG_FILE);
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(Error::ReadState { path, source }),
        };
        if bytes.len() > max_bytes {
            return Err(Error::DecodeState {
                path,
                reason: format!(
                    "{} bytes is more than the largest config accepted ({max_bytes})",
                    bytes.len()
                ),
            });
        }
        let config = ConfigUpdate::decode(bytes.as_slice()).map_err(|e| Error::DecodeState {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        if !config.full_state {
            return Err(Error::DecodeState {
                path,
                reason: "it is not a full state".into(),
            });
        }
        Ok(Some(config))
    }

    /// Replaces the stored config (nothing once [cleared](NodeState::clear)).
    pub fn store_config(&self, config: &ConfigUpdate) -> Result<(), Error> {
        self.write(&self.dir.join(CONFIG_FILE), &config.encode_to_vec())
    }

    /// The stored pods of the node (see `dataplane::pods`); an unreadable
    /// file is an error, to be logged (the next write replaces it).
    pub fn load_pods(&self) -> Result<Vec<AnnouncedPod>, Error> {
        let path = self.dir.join(PODS_FILE);
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => {
                return Err(Error::DecodeState {
                    path,
                    reason: e.to_string(),
                });
            }
        };
        serde_json::from_str(&text).map_err(|e| Error::DecodeState {
            path,
            reason: e.to_string(),
        })
    }

    /// Replaces the stored pods of the node (nothing once
    /// [cleared](NodeState::clear)).
    pub fn store_pods(&self, pods: &[AnnouncedPod]) -> Result<(), Error> {
        self.write_json(PODS_FILE, &pods)
    }

    /// Replaces the stored meshed namespaces: weft's CNI plugin reads them
    /// when it cannot reach the proxy, to refuse to start a pod of a meshed
    /// namespace that nobody would capture.
    pub fn store_meshed_namespaces(&self, namespaces: &BTreeSet<String>) -> Result<(), Error> {
        self.write_json(MESHED_NAMESPACES_FILE, namespaces)
    }

    fn write_json(&self, file: &str, value: &impl serde::Serialize) -> Result<(), Error> {
        let path = self.dir.join(file);
        let text = serde_json::to_vec(value).map_err(|e| Error::DecodeState {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        self.write(&path, &text)
    }

    /// Writes unless cleared, holding the guard so `clear` waits for it.
    fn write(&self, path: &Path, contents: &[u8]) -> Result<(), Error> {
        let cleared = self
            .cleared
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if *cleared {
            return Ok(());
        }
        write_private(path, contents)
    }

    /// The stored certificates of `wanted` identities that still verify
    /// against `trust` at `now`. The files of every other identity, and of
    /// certificates that no longer verify, are removed (each one logged).
    pub fn load_certificates(
        &self,
        wanted: &BTreeSet<Identity>,
        trust: &TrustBundle,
        now: SystemTime,
    ) -> Vec<WorkloadCertificate> {
        let entries = match fs::read_dir(self.certs_dir()) {
            Ok(entries) => entries,
            Err(error) => {
                tracing::warn!(dir = %self.certs_dir().display(), %error, "cannot list the stored certificates");
                return Vec::new();
            }
        };
        let mut restored = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path();
            let identity = wanted
                .iter()
                .find(|identity| self.certificate_path(identity) == path);
            let loaded = match identity {
                None => Err("no meshed pod of the node has its identity".to_owned()),
                Some(identity) => fs::read_to_string(&path)
                    .map_err(|e| e.to_string())
                    .and_then(|pem| {
                        WorkloadCertificate::from_private_pem(identity, &pem, trust.clone(), now)
                            .map_err(|e| e.to_string())
                    }),
            };
            match loaded {
                Ok(certificate) => restored.push(certificate),
                Err(reason) => {
                    tracing::info!(file = %path.display(), %reason, "not using a stored certificate; removing it");
                    let _ = fs::remove_file(&path);
                }
            }
        }
        restored
    }

    /// Stores `certificate` with its key, replacing the identity's last
    /// (nothing once [cleared](NodeState::clear)).
    pub fn store_certificate(&self, certificate: &WorkloadCertificate) -> Result<(), Error> {
        self.write(
            &self.certificate_path(certificate.identity()),
            certificate.to_private_pem().as_bytes(),
        )
    }

    /// Removes the stored certificate of `identity`, if there is one.
    pub fn remove_certificate(&self, identity: &Identity) -> Result<(), Error> {
        let path = self.certificate_path(identity);
        match fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(Error::WriteState { path, source: e })
            }
            _ => Ok(()),
        }
    }

    /// Stops writing, leaving what is stored: a new proxy process on the
    /// node took over and keeps the state from now on (two writers would
    /// undo each other's files).
    pub fn retire(&self) {
        *self
            .cleared
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = true;
    }

    /// Removes everything stored (the mesh is being uninstalled: no key
    /// may stay behind on the node). The directory itself stays, empty:
    /// on Kubernetes it is the mount point of a hostPath volume.
    pub fn clear(&self) -> Result<(), Error> {
        let mut cleared = self
            .cleared
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *cleared = true;
        let error = |path: &Path, source| Error::WriteState {
            path: path.to_owned(),
            source,
        };
        let entries = fs::read_dir(&self.dir).map_err(|e| error(&self.dir, e))?;
        for entry in entries {
            let path = entry.map_err(|e| error(&self.dir, e))?.path();
            let removed = if path.is_dir() {
                fs::remove_dir_all(&path)
            } else {
                fs::remove_file(&path)
            };
            removed.map_err(|e| error(&path, e))?;
        }
        Ok(())
    }

    /// After [`NodeState::clear`], when weft-cni could not be taken out of
    /// the node's network configuration: an empty list of meshed
    /// namespaces, so that the plugin lets pods start rather than hold
    /// every one of them for a proxy that is not coming back.
    pub fn store_nothing_meshed(&self) -> Result<(), Error> {
        write_private(&self.dir.join(MESHED_NAMESPACES_FILE), b"[]")
    }

    fn certs_dir(&self) -> PathBuf {
        self.dir.join(CERTS_DIR)
    }

    /// One file per identity. Namespaces and service accounts are DNS names
    /// (no `_`, no `/`) and a trust domain has no `/`, so splitting at the
    /// last two `_` gives the identity back: the name is unique and safe.
    fn certificate_path(&self, identity: &Identity) -> PathBuf {
        self.certs_dir().join(format!(
            "{}_{}_{}.pem",
            identity.trust_domain(),
            identity.namespace(),
            identity.service_account()
        ))
    }
}

/// Writes `contents` to `path` through a temporary sibling that only the
/// owner can read, synced and renamed into place.
fn write_private(path: &Path, contents: &[u8]) -> Result<(), Error> {
    let error = |source| Error::WriteState {
        path: path.to_owned(),
        source,
    };
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".tmp");
    let temporary = PathBuf::from(temporary);
    let _ = fs::remove_file(&temporary);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temporary)
        .map_err(error)?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .map_err(error)?;
    drop(file);
    fs::rename(&temporary, path).map_err(error)
}

/// Keys of the entries of an update that the proxy refused, by list.
#[derive(Clone, Debug, Default)]
pub struct RefusedKeys {
    /// Local workloads, by uid.
    pub local_workloads: BTreeSet<String>,
    /// Authorization policies, by `<namespace>/<name>`.
    pub authorization_policies: BTreeSet<String>,
}

/// The applied config as the node keeps it: entries by key, brought along
/// update by update. Its maps are persistent, so that folding a delta in
/// costs the delta (not the cluster), and the writer takes a snapshot of it
/// without a copy; [`StoredConfig::to_update`] makes the one full state
/// stored on the node.
///
/// Entries are kept in the wire format they came in, except the remote
/// workloads and the Services, most of any large cluster's config: those
/// are the applied view's own (shared, so they cost nothing more), turned
/// back into the wire format only when the config is written out.
#[derive(Clone, Debug, Default)]
pub struct StoredConfig {
    version: u64,
    trust: Option<weft_api::v1::TrustBundle>,
    meshed_namespaces: Option<weft_api::v1::MeshedNamespaces>,
    local_workloads: Stored<weft_api::v1::Workload>,
    remote_workloads: crate::node_view::Keyed<crate::node_view::Workload>,
    services: crate::node_view::Keyed<crate::node_view::Service>,
    authorization_policies: Stored<weft_api::v1::AuthorizationPolicy>,
}

/// Wire entries by key.
type Stored<T> = imbl::OrdMap<std::sync::Arc<str>, std::sync::Arc<T>>;

impl StoredConfig {
    /// Folds an applied `update` in: a full state replaces everything; a
    /// delta replaces and removes entries by key, and the roots and meshed
    /// namespaces when it carries them. An entry the proxy `refused` keeps
    /// its stored value, if it had one, as the applied view keeps its last
    /// good value: a local pod whose update was refused stays captured
    /// after a restart, not dropped. (What a restart does not keep is the
    /// refusal itself: such a pod is served with its last good config, not
    /// quarantined.) One it had none for is stored as sent: a restart
    /// decides about it again. Remote workloads and Services are those of
    /// `applied`, the view the update gave: a refused remote workload is
    /// dropped there (its addresses vouch for no identity), and is not
    /// kept either; a refused Service keeps its last good value, and a new
    /// one refused is left out (the next full state brings it again). The announcement of
    /// an uninstall is never stored: a proxy restarted from disk has not
    /// been told (see `NodeView::uninstalling`), and keeps its capture when
    /// it stops.
    pub fn fold_in(&mut self, update: &ConfigUpdate, refused: &RefusedKeys, applied: &NodeView) {
        let full = update.full_state;
        self.version = update.version;
        if full || update.trust.is_some() {
            self.trust = update.trust.clone();
        }
        if full || update.meshed_namespaces.is_some() {
            self.meshed_namespaces = update.meshed_namespaces.clone();
        }
        let wire = |w: &weft_api::v1::Workload| w.uid.clone();
        let named = |namespace: &str, name: &str| format!("{namespace}/{name}");
        fold_keyed(
            &mut self.local_workloads,
            (
                full,
                &update.local_workloads,
                &update.removed_local_workloads,
            ),
            &refused.local_workloads,
            wire,
        );
        self.remote_workloads = applied.remote_workloads().clone();
        self.services = applied.services().clone();
        fold_keyed(
            &mut self.authorization_policies,
            (
                full,
                &update.authorization_policies,
                &update.removed_authorization_policies,
            ),
            &refused.authorization_policies,
            |p| named(&p.namespace, &p.name),
        );
    }

    /// The version of the update folded in last.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The config as one full state, as it is stored.
    pub fn to_update(&self) -> ConfigUpdate {
        fn entries<T: Clone>(map: &Stored<T>) -> Vec<T> {
            map.values().map(|entry| (**entry).clone()).collect()
        }
        ConfigUpdate {
            version: self.version,
            full_state: true,
            trust: self.trust.clone(),
            meshed_namespaces: self.meshed_namespaces.clone(),
            local_workloads: entries(&self.local_workloads),
            remote_workloads: self
                .remote_workloads
                .values()
                .map(|workload| workload.to_wire())
                .collect(),
            services: self
                .services
                .values()
                .map(|service| service.to_wire())
                .collect(),
            authorization_policies: entries(&self.authorization_policies),
            ..ConfigUpdate::default()
        }
    }
}

/// One keyed map of [`StoredConfig::fold_in`]: emptied by a full state,
/// trimmed of a delta's removals; then each listed entry is stored (the
/// first of a key listed twice, none of a key also removed: as the view
/// takes them), and each refused key
/// that had a stored entry gets it back.
fn fold_keyed<T: Clone>(
    map: &mut Stored<T>,
    (full, listed, removed): (bool, &[T], &[String]),
    refused: &BTreeSet<String>,
    key: impl Fn(&T) -> String,
) {
    let previous = map.clone();
    if full {
        map.clear();
    } else {
        for gone in removed {
            map.remove(gone.as_str());
        }
    }
    // As the view: a key both listed and removed is removed.
    let mut seen: std::collections::HashSet<String> = if full {
        Default::default()
    } else {
        removed.iter().cloned().collect()
    };
    for entry in listed {
        let key = key(entry);
        if seen.insert(key.clone()) {
            map.insert(key.into(), std::sync::Arc::new(entry.clone()));
        }
    }
    for key in refused {
        if let Some(kept) = previous.get(key.as_str()) {
            map.insert(key.as_str().into(), kept.clone());
        }
    }
}

#[cfg(test)]
#[path = "node_state_tests.rs"]
mod tests;
