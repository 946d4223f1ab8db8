//! Registers the `microvm` runtime in containerd's config (version 2, as
//! containerd 1.6 and 1.7 read it), editing the TOML in place: comments,
//! layout and the other runtimes stay as they were.

use toml_edit::{value, Array, DocumentMut, Item, Table};

pub const RUNTIME_NAME: &str = "microvm";
pub const RUNTIME_TYPE: &str = "io.containerd.microvm.v2";
const CRI_PLUGIN: &str = "io.containerd.grpc.v1.cri";

#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    #[error("containerd's config is not valid TOML")]
    Parse(#[source] toml_edit::TomlError),
    #[error("containerd's config has version = {0}; this merges version 2 (containerd 1.6/1.7). For containerd 2.x (version 3) add the runtime under plugins.\"io.containerd.cri.v1.runtime\".containerd.runtimes.microvm by hand (docs/ctl.md)")]
    Version(i64),
    #[error("containerd's config has `{0}` that is not a table")]
    NotATable(String),
}

fn table<'a>(parent: &'a mut Table, key: &str, path: &str) -> Result<&'a mut Table, MergeError> {
    let item = parent.entry(key).or_insert_with(|| {
        let mut table = Table::new();
        table.set_implicit(true);
        Item::Table(table)
    });
    item.as_table_mut()
        .ok_or_else(|| MergeError::NotATable(path.to_owned()))
}

/// `text` with the runtime registered; `None` when it already is, as
/// install would write it.
pub fn merge(text: &str, config_path: &str) -> Result<Option<String>, MergeError> {
    let mut document: DocumentMut = text.parse().map_err(MergeError::Parse)?;
    match document.get("version").and_then(Item::as_integer) {
        Some(2) => {}
        Some(other) => return Err(MergeError::Version(other)),
        None if text.trim().is_empty() => {
            document.insert("version", value(2));
        }
        None => return Err(MergeError::Version(1)),
    }
    let plugins = table(document.as_table_mut(), "plugins", "plugins")?;
    let cri = table(plugins, CRI_PLUGIN, "plugins.cri")?;
    let containerd = table(cri, "containerd", "plugins.cri.containerd")?;
    let runtimes = table(containerd, "runtimes", "plugins.cri.containerd.runtimes")?;
    let existing = runtimes.get(RUNTIME_NAME).cloned();
    let mut runtime = Table::new();
    runtime.insert("runtime_type", value(RUNTIME_TYPE));
    let mut annotations = Array::new();
    annotations.push("io.microvm.*");
    runtime.insert("pod_annotations", value(annotations));
    // The guest's devices for a privileged container, never the host's.
    runtime.insert("privileged_without_host_devices", value(true));
    let mut options = Table::new();
    options.insert("ConfigPath", value(config_path));
    runtime.insert("options", Item::Table(options));
    let same = existing
        .as_ref()
        .and_then(Item::as_table)
        .is_some_and(|old| old.to_string() == runtime.to_string());
    if same {
        return Ok(None);
    }
    runtimes.insert(RUNTIME_NAME, Item::Table(runtime));
    Ok(Some(document.to_string()))
}

/// Whether `text` registers the runtime (for `check`).
pub fn registered(text: &str) -> Option<String> {
    let document: DocumentMut = text.parse().ok()?;
    let runtime = document
        .get("plugins")?
        .get(CRI_PLUGIN)?
        .get("containerd")?
        .get("runtimes")?
        .get(RUNTIME_NAME)?;
    runtime
        .get("runtime_type")
        .and_then(Item::as_str)
        .map(str::to_owned)
}

/// The cgroup driver the runc runtime is configured with: `systemd` when
/// `SystemdCgroup = true`, else `cgroupfs`.
pub fn runc_cgroup_driver(text: &str) -> &'static str {
    let systemd = text.parse::<DocumentMut>().ok().is_some_and(|document| {
        document
            .get("plugins")
            .and_then(|p| p.get(CRI_PLUGIN))
            .and_then(|c| c.get("containerd"))
            .and_then(|c| c.get("runtimes"))
            .and_then(|r| r.get("runc"))
            .and_then(|r| r.get("options"))
            .and_then(|o| o.get("SystemdCgroup"))
            .and_then(Item::as_bool)
            .unwrap_or(false)
    });
    if systemd {
        "systemd"
    } else {
        "cgroupfs"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXISTING: &str = r#"# The node's containerd config.
version = 2

[plugins."io.containerd.grpc.v1.cri"]
  # keep this comment
  sandbox_image = "registry.k8s.io/pause:3.9"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
      SystemdCgroup = true
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.kata]
    runtime_type = "io.containerd.kata.v2"
"#;

    #[test]
    fn the_merge_keeps_comments_and_other_runtimes() {
        let merged = merge(EXISTING, "/etc/microvm/config.toml")
            .unwrap()
            .unwrap();
        assert!(
            merged.starts_with("# The node's containerd config.\nversion = 2\n"),
            "{merged}"
        );
        assert!(merged.contains("# keep this comment"));
        assert!(merged.contains("sandbox_image = \"registry.k8s.io/pause:3.9\""));
        let parsed: toml::Value = toml::from_str(&merged).unwrap();
        let runtimes = &parsed["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"];
        assert_eq!(
            runtimes["runc"]["runtime_type"].as_str(),
            Some("io.containerd.runc.v2")
        );
        assert_eq!(
            runtimes["runc"]["options"]["SystemdCgroup"].as_bool(),
            Some(true)
        );
        assert_eq!(
            runtimes["kata"]["runtime_type"].as_str(),
            Some("io.containerd.kata.v2")
        );
        assert_eq!(
            runtimes["microvm"]["runtime_type"].as_str(),
            Some(RUNTIME_TYPE)
        );
        assert_eq!(
            runtimes["microvm"]["options"]["ConfigPath"].as_str(),
            Some("/etc/microvm/config.toml")
        );
        assert_eq!(registered(&merged).as_deref(), Some(RUNTIME_TYPE));
        assert_eq!(registered(EXISTING), None);
        assert_eq!(runc_cgroup_driver(EXISTING), "systemd");
        // Merging again changes nothing.
        assert_eq!(merge(&merged, "/etc/microvm/config.toml").unwrap(), None);
    }

    #[test]
    fn an_empty_config_gets_version_2_and_other_versions_are_refused() {
        let merged = merge("", "/c.toml").unwrap().unwrap();
        assert!(merged.contains("version = 2"), "{merged}");
        assert_eq!(registered(&merged).as_deref(), Some(RUNTIME_TYPE));
        let err = merge("version = 3\n", "/c.toml").unwrap_err();
        assert!(err.to_string().contains("containerd 2.x"), "{err}");
    }
}
