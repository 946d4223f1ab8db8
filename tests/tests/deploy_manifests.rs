//! deploy/'s manifests parse, and every field they set is one of the
//! Kubernetes API's (node.k8s.io/v1 RuntimeClass, apps/v1 DaemonSet): the
//! structs below copy the API's field names and types for the parts the
//! manifests use, and refuse any other field, so a misspelt or misplaced
//! key fails here rather than on `kubectl apply`.

use serde::Deserialize;
use std::collections::BTreeMap;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ObjectMeta {
    name: String,
    namespace: Option<String>,
    labels: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RuntimeClass {
    api_version: String,
    kind: String,
    metadata: ObjectMeta,
    handler: String,
    overhead: Option<Overhead>,
    scheduling: Option<Scheduling>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Overhead {
    pod_fixed: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Scheduling {
    node_selector: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct DaemonSet {
    api_version: String,
    kind: String,
    metadata: ObjectMeta,
    spec: DaemonSetSpec,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct DaemonSetSpec {
    selector: LabelSelector,
    template: PodTemplate,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct LabelSelector {
    match_labels: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PodTemplateMeta {
    labels: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PodTemplate {
    metadata: PodTemplateMeta,
    spec: PodSpec,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PodSpec {
    node_selector: Option<BTreeMap<String, String>>,
    #[serde(rename = "hostPID")]
    host_pid: Option<bool>,
    tolerations: Option<Vec<Toleration>>,
    init_containers: Option<Vec<Container>>,
    containers: Vec<Container>,
    volumes: Vec<Volume>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Toleration {
    operator: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Container {
    name: String,
    image: String,
    image_pull_policy: Option<String>,
    command: Vec<String>,
    args: Vec<String>,
    security_context: Option<SecurityContext>,
    volume_mounts: Vec<VolumeMount>,
    resources: Option<Resources>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct SecurityContext {
    privileged: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Resources {
    requests: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct VolumeMount {
    name: String,
    mount_path: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Volume {
    name: String,
    host_path: HostPath,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct HostPath {
    path: String,
    #[serde(rename = "type")]
    kind: String,
}

fn read(name: &str) -> String {
    let path = microvm_tests::harness::repo_root()
        .join("deploy")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|err| panic!("{}: {err}", path.display()))
}

/// A Kubernetes quantity ("160Mi", "100m", "1").
fn is_quantity(text: &str) -> bool {
    let digits = text.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let suffix = &text[digits.len()..];
    !digits.is_empty()
        && digits.parse::<f64>().is_ok()
        && ["", "m", "Ki", "Mi", "Gi", "k", "M", "G"].contains(&suffix)
}

#[test]
fn the_runtime_class_names_the_microvm_handler() {
    let class: RuntimeClass = serde_yaml::from_str(&read("runtimeclass.yaml")).unwrap();
    assert_eq!(class.api_version, "node.k8s.io/v1");
    assert_eq!(class.kind, "RuntimeClass");
    assert_eq!(class.metadata.name, "microvm");
    // The runtime name microvm-ctl install registers in containerd.
    assert_eq!(class.handler, "microvm");
    for (resource, quantity) in class.overhead.unwrap().pod_fixed {
        assert!(["cpu", "memory"].contains(&resource.as_str()), "{resource}");
        assert!(is_quantity(&quantity), "{quantity}");
    }
    let selector = class.scheduling.unwrap().node_selector.unwrap();
    assert_eq!(
        selector.get("microvm.io/runtime").map(String::as_str),
        Some("true")
    );
}

#[test]
fn the_daemon_set_installs_into_the_host_root() {
    let set: DaemonSet = serde_yaml::from_str(&read("daemonset.yaml")).unwrap();
    assert_eq!(set.api_version, "apps/v1");
    assert_eq!(set.kind, "DaemonSet");
    assert!(set.metadata.namespace.is_some() && set.metadata.labels.is_some());
    assert!(!set.metadata.name.is_empty());
    let template = &set.spec.template;
    // The selector must match the template's labels, or the API refuses it.
    for (key, value) in &set.spec.selector.match_labels {
        assert_eq!(template.metadata.labels.get(key), Some(value), "{key}");
    }
    let pod = &template.spec;
    assert_eq!(pod.host_pid, Some(false));
    assert!(pod
        .tolerations
        .as_ref()
        .is_some_and(|t| t.iter().all(|t| t.operator == "Exists")));
    assert_eq!(
        pod.node_selector
            .as_ref()
            .and_then(|s| s.get("microvm.io/runtime"))
            .map(String::as_str),
        Some("true")
    );
    let install = &pod.init_containers.as_ref().unwrap()[0];
    assert_eq!(install.name, "install");
    assert!(install.command[0].ends_with("microvm-ctl"));
    assert_eq!(&install.args[..3], ["install", "--root", "/host"]);
    assert!(install.security_context.as_ref().unwrap().privileged);
    assert!(install.image_pull_policy.is_some() && !install.image.is_empty());
    let volume_names: Vec<&str> = pod.volumes.iter().map(|v| v.name.as_str()).collect();
    for container in pod
        .containers
        .iter()
        .chain(pod.init_containers.iter().flatten())
    {
        for mount in &container.volume_mounts {
            assert!(
                volume_names.contains(&mount.name.as_str()),
                "{}",
                mount.name
            );
            assert_eq!(mount.mount_path, "/host");
        }
        for quantity in container.resources.iter().flat_map(|r| r.requests.values()) {
            assert!(is_quantity(quantity), "{quantity}");
        }
    }
    let host = &pod.volumes[0].host_path;
    assert_eq!((host.path.as_str(), host.kind.as_str()), ("/", "Directory"));
    // Every flag the install args pass is one microvm-ctl install takes.
    let help = std::process::Command::new(microvm_tests::harness::binary("microvm-ctl"))
        .args(["install", "--help"])
        .output()
        .expect("run microvm-ctl install --help");
    let help = String::from_utf8_lossy(&help.stdout);
    for flag in install.args.iter().filter(|arg| arg.starts_with("--")) {
        assert!(
            help.contains(flag.as_str()),
            "install has no {flag}:\n{help}"
        );
    }
}
