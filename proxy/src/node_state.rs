//! The proxy's last good state, kept on its node (`--state-dir`), so that a
//! proxy that restarts (a crash, an OOM kill, an upgrade, a node reboot)
//! serves and enforces what it served before, also while the control plane
//! is unreachable, instead of starting with nothing.
//!
//! Two kinds of files, both written whole to a temporary file and renamed
//! into place (a reader never sees half of one), readable by the proxy's
//! user only, in a directory only it can enter:
//! - `config.pb`: the applied config as one full state, in the wire format
//!   (`weft.v1.ConfigUpdate`). [`merge`] folds every applied update into
//!   it; reading it back goes through [`NodeView::apply`]
//!   (crate::NodeView::apply) like any full state from the control plane,
//!   so a damaged or foreign file is refused the same way.
//! - `certs/<trust domain>_<namespace>_<service account>.pem`: each workload
//!   certificate with its private key. The key never leaves the node; it
//!   stays on it across restarts. A stored certificate is used only while
//!   it verifies against the restored roots (so never after it expires).
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

/// The stored config's file name.
const CONFIG_FILE: &str = "config.pb";
/// The directory of stored certificates.
const CERTS_DIR: &str = "certs";

/// The state directory on the node.
#[derive(Clone, Debug)]
pub struct NodeState {
    dir: PathBuf,
}

impl NodeState {
    /// Opens (creating it if needed) the state directory `dir`, and makes
    /// it and its certificate directory private to the proxy's user.
    pub fn open(dir: &Path) -> Result<NodeState, Error> {
        let state = NodeState {
            dir: dir.to_owned(),
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

    /// Replaces the stored config.
    pub fn store_config(&self, config: &ConfigUpdate) -> Result<(), Error> {
        write_private(&self.dir.join(CONFIG_FILE), &config.encode_to_vec())
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

    /// Stores `certificate` with its key, replacing the identity's last.
    pub fn store_certificate(&self, certificate: &WorkloadCertificate) -> Result<(), Error> {
        write_private(
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

    /// Removes everything stored (the mesh is being uninstalled: no key
    /// may stay behind on the node). The directory itself stays, empty:
    /// on Kubernetes it is the mount point of a hostPath volume.
    pub fn clear(&self) -> Result<(), Error> {
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

    fn certs_dir(&self) -> PathBuf {
        self.dir.join(CERTS_DIR)
    }

    /// One file per identity. Trust domains, namespaces and service accounts
    /// are DNS names (no `_`, no `/`), so the name is unique and safe.
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

/// Folds an applied `update` into `stored`, the applied config as one full
/// state in the wire format: a full state replaces it; a delta replaces and
/// removes entries by key, and the roots when it carries them. This is the
/// full state the control plane would send at the update's version.
pub fn merge(stored: &mut ConfigUpdate, update: &ConfigUpdate) {
    if update.full_state {
        *stored = update.clone();
        return;
    }
    stored.version = update.version;
    merge_keyed(
        &mut stored.local_workloads,
        &update.local_workloads,
        &update.removed_local_workloads,
        |w| w.uid.clone(),
    );
    merge_keyed(
        &mut stored.remote_workloads,
        &update.remote_workloads,
        &update.removed_remote_workloads,
        |w| w.uid.clone(),
    );
    merge_keyed(
        &mut stored.services,
        &update.services,
        &update.removed_services,
        |s| format!("{}/{}", s.namespace, s.name),
    );
    merge_keyed(
        &mut stored.authorization_policies,
        &update.authorization_policies,
        &update.removed_authorization_policies,
        |p| format!("{}/{}", p.namespace, p.name),
    );
    if update.trust.is_some() {
        stored.trust = update.trust.clone();
    }
    if update.uninstalling.is_some() {
        stored.uninstalling = update.uninstalling;
    }
}

/// Removes the entries of `list` named in `removed` or replaced by one of
/// `changed`, then appends `changed`.
fn merge_keyed<T: Clone>(
    list: &mut Vec<T>,
    changed: &[T],
    removed: &[String],
    key: impl Fn(&T) -> String,
) {
    if changed.is_empty() && removed.is_empty() {
        return;
    }
    let gone: BTreeSet<String> = removed
        .iter()
        .cloned()
        .chain(changed.iter().map(&key))
        .collect();
    list.retain(|entry| !gone.contains(&key(entry)));
    list.extend(changed.iter().cloned());
}

#[cfg(test)]
#[path = "node_state_tests.rs"]
mod tests;
