//! `microvm-ctl ps`: the node's microVM pods, from the shims' records.

use crate::pods::{self, FoundPod};
use serde::Serialize;
use std::path::Path;
use std::time::{Duration, SystemTime};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// JSON (one object per pod) instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Serialize)]
pub struct ProcessRow {
    pub name: String,
    pub pid: u32,
    pub pss_bytes: Option<u64>,
}

#[derive(Debug, Serialize)]
pub struct PodRow {
    pub pod_id: String,
    pub pod_name: String,
    pub pod_namespace: String,
    pub namespace: String,
    pub backend: String,
    pub vm_pid: Option<u32>,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub uptime_seconds: f64,
    pub pss_bytes_total: u64,
    pub processes: Vec<ProcessRow>,
    pub state: String,
    /// Why the pod's state dir could not be removed (`teardown-failed`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub teardown_error: Option<String>,
}

pub fn row(pod: &FoundPod) -> PodRow {
    let record = &pod.record;
    let created = SystemTime::UNIX_EPOCH + Duration::from_millis(record.created_unix_ms);
    let processes: Vec<ProcessRow> = record
        .processes
        .iter()
        .map(|process| ProcessRow {
            name: process.name.clone(),
            pid: process.pid,
            pss_bytes: pods::pss_bytes(process.pid, process.start_time),
        })
        .collect();
    PodRow {
        pod_id: record.pod_id.clone(),
        pod_name: record.pod_name.clone(),
        pod_namespace: record.pod_namespace.clone(),
        namespace: record.namespace.clone(),
        backend: record.backend.clone(),
        vm_pid: pods::vm_process(record).map(|process| process.pid),
        vcpus: record.vcpus,
        memory_mib: record.memory_mib,
        uptime_seconds: SystemTime::now()
            .duration_since(created)
            .map_or(0.0, |age| age.as_secs_f64()),
        pss_bytes_total: processes.iter().filter_map(|p| p.pss_bytes).sum(),
        processes,
        state: pods::state(record).to_owned(),
        teardown_error: record.teardown_error.clone(),
    }
}

fn human_duration(seconds: f64) -> String {
    let seconds = seconds as u64;
    match seconds {
        0..=119 => format!("{seconds}s"),
        120..=7199 => format!("{}m", seconds / 60),
        _ => format!("{}h", seconds / 3600),
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1}Mi", bytes as f64 / (1024.0 * 1024.0))
}

pub fn table(rows: &[PodRow]) -> String {
    let mut lines = vec![vec![
        "POD ID".to_owned(),
        "NAME".into(),
        "NAMESPACE".into(),
        "BACKEND".into(),
        "VM PID".into(),
        "VCPUS".into(),
        "MEMORY".into(),
        "UPTIME".into(),
        "HOST PSS".into(),
        "STATE".into(),
    ]];
    for row in rows {
        let pss = row
            .processes
            .iter()
            .map(|p| format!("{}={}", p.name, p.pss_bytes.map_or("-".to_owned(), mib)))
            .collect::<Vec<_>>()
            .join(",");
        lines.push(vec![
            row.pod_id.chars().take(12).collect(),
            if row.pod_name.is_empty() {
                "-".into()
            } else {
                row.pod_name.clone()
            },
            if row.pod_namespace.is_empty() {
                row.namespace.clone()
            } else {
                row.pod_namespace.clone()
            },
            row.backend.clone(),
            row.vm_pid.map_or("-".into(), |pid| pid.to_string()),
            row.vcpus.to_string(),
            format!("{}Mi", row.memory_mib),
            human_duration(row.uptime_seconds),
            format!("{} ({pss})", mib(row.pss_bytes_total)),
            row.state.clone(),
        ]);
    }
    let widths: Vec<usize> = (0..lines[0].len())
        .map(|column| {
            lines
                .iter()
                .map(|line| line[column].len())
                .max()
                .unwrap_or(0)
        })
        .collect();
    lines
        .iter()
        .map(|line| {
            line.iter()
                .zip(&widths)
                .map(|(cell, width)| format!("{cell:<width$}"))
                .collect::<Vec<_>>()
                .join("  ")
                .trim_end()
                .to_owned()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

pub fn run(config: &Path, args: &Args) -> anyhow::Result<()> {
    let config = pods::load_config(config)?;
    let rows: Vec<PodRow> = pods::all(&config.paths.state_dir).iter().map(row).collect();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        println!("{}", table(&rows));
        // The reason is too long for a column.
        for row in &rows {
            if let Some(error) = &row.teardown_error {
                println!("{}: teardown failed: {error}", row.pod_id);
            }
        }
    }
    Ok(())
}
