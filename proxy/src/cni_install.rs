//! Installing weft's CNI plugin on the node (the proxy does it when it
//! starts, and undoes it when the mesh is uninstalled): the `weft-cni`
//! binary goes into the runtime's CNI binary directory, and an entry for
//! it at the end of the plugin list of the node's network configuration
//! (the first `.conflist` in the CNI configuration directory, the one the
//! runtime uses), so that the runtime runs it for every new pod after the
//! network plugin.
//!
//! The edits are pure functions of the file's text ([`with_plugin`],
//! [`without_plugin`]), each file replaced whole (written beside it, then
//! renamed): the runtime never reads half a file.

use std::path::{Path, PathBuf};

use serde_json::{Value, json};

/// The plugin's `type`, which is also its binary's name.
pub const PLUGIN_TYPE: &str = "weft-cni";

/// What the plugin's entry says (see `cni_plugin` for the keys).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PluginEntry {
    /// The proxy's CNI socket, as the runtime sees it on the node.
    pub socket: PathBuf,
    /// The proxy's state directory, as the runtime sees it on the node.
    pub state_dir: PathBuf,
    /// Namespaces the plugin leaves alone.
    pub exclude_namespaces: Vec<String>,
}

/// Why the plugin could not be installed or removed.
#[derive(Debug, thiserror::Error)]
#[error("{operation}: {reason}")]
pub struct CniInstallError {
    /// What was being done.
    pub operation: String,
    /// What went wrong.
    pub reason: String,
}

fn error(operation: impl Into<String>, reason: impl ToString) -> CniInstallError {
    CniInstallError {
        operation: operation.into(),
        reason: reason.to_string(),
    }
}

/// `conflist` with weft's entry last in its `plugins` (replacing any entry
/// of weft's already there).
pub fn with_plugin(conflist: &[u8], entry: &PluginEntry) -> Result<Vec<u8>, String> {
    let mut config = parse(conflist)?;
    let plugins = plugins_of(&mut config)?;
    plugins.retain(|plugin| plugin["type"] != PLUGIN_TYPE);
    plugins.push(json!({
        "type": PLUGIN_TYPE,
        "socket": entry.socket,
        "state_dir": entry.state_dir,
        "exclude_namespaces": entry.exclude_namespaces,
    }));
    serde_json::to_vec_pretty(&config).map_err(|e| e.to_string())
}

/// `conflist` without weft's entry; `None` if it had none.
pub fn without_plugin(conflist: &[u8]) -> Result<Option<Vec<u8>>, String> {
    let mut config = parse(conflist)?;
    let plugins = plugins_of(&mut config)?;
    let before = plugins.len();
    plugins.retain(|plugin| plugin["type"] != PLUGIN_TYPE);
    if plugins.len() == before {
        return Ok(None);
    }
    serde_json::to_vec_pretty(&config)
        .map(Some)
        .map_err(|e| e.to_string())
}

fn parse(conflist: &[u8]) -> Result<Value, String> {
    let config: Value = serde_json::from_slice(conflist).map_err(|e| format!("not JSON: {e}"))?;
    if !config.is_object() {
        return Err("not a JSON object".to_owned());
    }
    Ok(config)
}

fn plugins_of(config: &mut Value) -> Result<&mut Vec<Value>, String> {
    config
        .get_mut("plugins")
        .and_then(Value::as_array_mut)
        .ok_or_else(|| "it has no \"plugins\" list (a .conflist is needed)".to_owned())
}

/// The network configuration the runtime uses: the first `.conflist` of
/// `conf_dir` by name (runtimes take the first file in name order; weft
/// chains onto a configuration list only).
pub fn primary_conflist(conf_dir: &Path) -> Result<PathBuf, CniInstallError> {
    let operation = format!("finding the CNI configuration in {}", conf_dir.display());
    let mut files: Vec<PathBuf> = std::fs::read_dir(conf_dir)
        .map_err(|e| error(&operation, e))?
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| {
            matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("conflist" | "conf" | "json")
            )
        })
        .collect();
    files.sort();
    let first = files.into_iter().next().ok_or_else(|| {
        error(
            &operation,
            "there is none (is the network plugin installed?)",
        )
    })?;
    if first.extension().and_then(|e| e.to_str()) != Some("conflist") {
        return Err(error(
            &operation,
            format!(
                "{} is not a .conflist: weft-cni chains onto a list",
                first.display()
            ),
        ));
    }
    Ok(first)
}

/// The node's CNI directories as this proxy keeps weft-cni in them: the
/// installs and the uninstall take turns, and once the uninstall ran
/// nothing installs again (a recheck that raced the drain must not chain
/// the plugin back after it was taken out).
#[derive(Debug)]
pub struct NodeCni {
    bin_dir: PathBuf,
    conf_dir: PathBuf,
    uninstalled: std::sync::Mutex<bool>,
}

impl NodeCni {
    /// The binary and configuration directories.
    pub fn new(bin_dir: PathBuf, conf_dir: PathBuf) -> NodeCni {
        NodeCni {
            bin_dir,
            conf_dir,
            uninstalled: std::sync::Mutex::new(false),
        }
    }

    /// [`install`]s `plugin` with `entry`, unless the uninstall ran:
    /// the network configuration it went into, or `None`.
    pub fn install(
        &self,
        plugin: &Path,
        entry: &PluginEntry,
    ) -> Result<Option<PathBuf>, CniInstallError> {
        let uninstalled = self
            .uninstalled
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if *uninstalled {
            return Ok(None);
        }
        install(plugin, &self.bin_dir, &self.conf_dir, entry).map(Some)
    }

    /// [`uninstall`]s, for good: no install follows.
    pub fn uninstall(&self) -> Result<(), CniInstallError> {
        let mut uninstalled = self
            .uninstalled
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *uninstalled = true;
        uninstall(&self.bin_dir, &self.conf_dir)
    }
}

/// Copies the `weft-cni` binary `plugin` into `bin_dir` and adds its entry
/// to the node's network configuration in `conf_dir`.
pub fn install(
    plugin: &Path,
    bin_dir: &Path,
    conf_dir: &Path,
    entry: &PluginEntry,
) -> Result<PathBuf, CniInstallError> {
    let binary =
        std::fs::read(plugin).map_err(|e| error(format!("reading {}", plugin.display()), e))?;
    let installed = bin_dir.join(PLUGIN_TYPE);
    if std::fs::read(&installed).ok().as_deref() != Some(binary.as_slice()) {
        replace_file(&installed, &binary, 0o755)?;
    }
    let conflist = primary_conflist(conf_dir)?;
    let text = std::fs::read(&conflist)
        .map_err(|e| error(format!("reading {}", conflist.display()), e))?;
    let updated = with_plugin(&text, entry)
        .map_err(|reason| error(format!("adding weft-cni to {}", conflist.display()), reason))?;
    if updated != text {
        replace_file(&conflist, &updated, 0o644)?;
    }
    Ok(conflist)
}

/// Takes weft's entry out of every network configuration in `conf_dir`,
/// then its binary out of `bin_dir` (in that order: the runtime must never
/// be told to run a plugin that is gone). What is not there is no error.
pub fn uninstall(bin_dir: &Path, conf_dir: &Path) -> Result<(), CniInstallError> {
    let operation = format!("removing weft-cni from {}", conf_dir.display());
    let entries = match std::fs::read_dir(conf_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(error(&operation, e)),
    };
    for path in entries.flatten().map(|entry| entry.path()) {
        if path.extension().and_then(|e| e.to_str()) != Some("conflist") {
            continue;
        }
        let text = match std::fs::read(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(error(format!("reading {}", path.display()), e)),
        };
        match without_plugin(&text) {
            Ok(Some(updated)) => replace_file(&path, &updated, 0o644)?,
            Ok(None) => {}
            // Not ours to fix, unless it may name us: then the binary
            // stays, so that the runtime is never told to run a plugin
            // that is gone.
            Err(reason) if contains(&text, PLUGIN_TYPE.as_bytes()) => {
                return Err(error(
                    format!("taking weft-cni out of {}", path.display()),
                    reason,
                ));
            }
            Err(_) => {}
        }
    }
    match std::fs::remove_file(bin_dir.join(PLUGIN_TYPE)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(error(
            format!("removing {}", bin_dir.join(PLUGIN_TYPE).display()),
            e,
        )),
        _ => Ok(()),
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}

/// Writes `contents` beside `path` and renames it into place.
fn replace_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), CniInstallError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let operation = format!("writing {}", path.display());
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temporary = path.with_file_name(format!(".{name}.weft-tmp"));
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&temporary)
        .and_then(|mut file| {
            file.write_all(contents)?;
            file.sync_all()
        })
        .and_then(|()| std::fs::rename(&temporary, path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&temporary);
        return Err(error(operation, e));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> PluginEntry {
        PluginEntry {
            socket: "/var/run/weft/cni.sock".into(),
            state_dir: "/var/lib/weft/proxy".into(),
            exclude_namespaces: vec!["kube-system".into(), "weft-system".into()],
        }
    }

    const BRIDGE: &str = r#"{"cniVersion": "0.4.0", "name": "k8s", "plugins": [{"type": "bridge"}, {"type": "portmap"}]}"#;

    #[test]
    fn the_entry_goes_last_once_and_comes_out_again() {
        let with = with_plugin(BRIDGE.as_bytes(), &entry()).expect("added");
        let twice = with_plugin(&with, &entry()).expect("added again");
        let parsed: Value = serde_json::from_slice(&twice).expect("JSON");
        let types: Vec<&str> = parsed["plugins"]
            .as_array()
            .expect("a list")
            .iter()
            .filter_map(|p| p["type"].as_str())
            .collect();
        assert_eq!(types, ["bridge", "portmap", "weft-cni"]);
        assert_eq!(parsed["name"], "k8s");
        let without = without_plugin(&twice).expect("parsed").expect("removed");
        let parsed: Value = serde_json::from_slice(&without).expect("JSON");
        assert_eq!(parsed["plugins"].as_array().map(Vec::len), Some(2));
        assert_eq!(without_plugin(&without).expect("parsed"), None);
        assert!(with_plugin(br#"{"type": "bridge"}"#, &entry()).is_err());
        assert!(with_plugin(b"[1]", &entry()).is_err());
    }

    #[test]
    fn nothing_installs_after_the_uninstall() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let (bin, conf) = (dir.path().join("bin"), dir.path().join("net.d"));
        std::fs::create_dir_all(&bin).expect("created");
        std::fs::create_dir_all(&conf).expect("created");
        let conflist = conf.join("10-bridge.conflist");
        std::fs::write(
            &conflist,
            r#"{"cniVersion":"1.0.0","name":"k8s","plugins":[{"type":"bridge"}]}"#,
        )
        .expect("written");
        let plugin = dir.path().join("weft-cni");
        std::fs::write(&plugin, b"binary").expect("written");
        let node = NodeCni::new(bin.clone(), conf.clone());
        assert_eq!(
            node.install(&plugin, &entry()).expect("installed"),
            Some(conflist.clone())
        );
        node.uninstall().expect("uninstalled");
        assert_eq!(node.install(&plugin, &entry()).expect("no error"), None);
        let text = std::fs::read_to_string(&conflist).expect("read");
        assert!(!text.contains(PLUGIN_TYPE), "{text}");
        assert!(!bin.join(PLUGIN_TYPE).exists());
    }

    #[test]
    fn a_configuration_that_may_name_weft_but_cannot_be_read_keeps_the_binary() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let (bin, conf) = (dir.path().join("bin"), dir.path().join("net.d"));
        std::fs::create_dir_all(&bin).expect("created");
        std::fs::create_dir_all(&conf).expect("created");
        std::fs::write(bin.join(PLUGIN_TYPE), b"binary").expect("written");
        // Hand-edited into something that is not JSON, weft's entry in it.
        std::fs::write(
            conf.join("10-bridge.conflist"),
            r#"{"plugins":[{"type":"weft-cni"},"#,
        )
        .expect("written");
        assert!(uninstall(&bin, &conf).is_err());
        assert!(
            bin.join(PLUGIN_TYPE).exists(),
            "the runtime would run a plugin that is gone"
        );
        // One that does not name weft is not ours to judge.
        std::fs::write(
            conf.join("10-bridge.conflist"),
            r#"{"plugins":[{"type":"bridge"},"#,
        )
        .expect("written");
        uninstall(&bin, &conf).expect("uninstalled");
        assert!(!bin.join(PLUGIN_TYPE).exists());
    }

    #[test]
    fn install_and_uninstall_on_a_node() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let (bin, conf) = (dir.path().join("bin"), dir.path().join("net.d"));
        std::fs::create_dir_all(&bin).expect("bin dir");
        std::fs::create_dir_all(&conf).expect("conf dir");
        std::fs::write(conf.join("10-k8s.conflist"), BRIDGE).expect("written");
        std::fs::write(conf.join("99-other.conflist"), BRIDGE).expect("written");
        let plugin = dir.path().join("weft-cni-build");
        std::fs::write(&plugin, b"#!/bin/true").expect("written");

        let chosen = install(&plugin, &bin, &conf, &entry()).expect("installed");
        assert_eq!(chosen, conf.join("10-k8s.conflist"));
        assert!(bin.join("weft-cni").is_file());
        let text = std::fs::read_to_string(&chosen).expect("read");
        assert!(text.contains("weft-cni") && text.contains("weft-system"));
        let other = std::fs::read_to_string(conf.join("99-other.conflist")).expect("read");
        assert!(!other.contains("weft-cni"));

        uninstall(&bin, &conf).expect("uninstalled");
        assert!(!bin.join("weft-cni").exists());
        let text = std::fs::read_to_string(&chosen).expect("read");
        assert!(!text.contains("weft-cni"));
        // Again: nothing left to do is no error.
        uninstall(&bin, &conf).expect("uninstalled again");
    }
}
