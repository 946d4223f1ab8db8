//! The agent's cgroup v2 figures as containerd's v2 `Metrics` message
//! (what CRI decodes Stats into).

use containerd_shim::protos::cgroups_v2::metrics as cg2;
use containerd_shim::protos::protobuf::MessageField;
use microvm_proto::agent::v1 as agent_api;

/// The agent's cgroup v2 figures in containerd's v2 Metrics message.
pub fn cgroup_v2_metrics(stats: &agent_api::ContainerStatsResponse) -> cg2::Metrics {
    let mut metrics = cg2::Metrics::new();
    if let Some(cpu) = &stats.cpu {
        let mut out = cg2::CPUStat::new();
        out.usage_usec = cpu.usage_usec;
        out.user_usec = cpu.user_usec;
        out.system_usec = cpu.system_usec;
        out.nr_periods = cpu.nr_periods;
        out.nr_throttled = cpu.nr_throttled;
        out.throttled_usec = cpu.throttled_usec;
        metrics.cpu = MessageField::some(out);
    }
    if let Some(memory) = &stats.memory {
        let stat = |key: &str| memory.stat.get(key).copied().unwrap_or(0);
        let mut out = cg2::MemoryStat::new();
        out.usage = memory.usage_bytes;
        out.usage_limit = memory.limit_bytes;
        out.swap_usage = memory.swap_usage_bytes;
        out.anon = stat("anon");
        out.file = stat("file");
        out.kernel_stack = stat("kernel_stack");
        out.slab = stat("slab");
        out.sock = stat("sock");
        out.shmem = stat("shmem");
        out.file_mapped = stat("file_mapped");
        out.file_dirty = stat("file_dirty");
        out.file_writeback = stat("file_writeback");
        out.inactive_anon = stat("inactive_anon");
        out.active_anon = stat("active_anon");
        out.inactive_file = stat("inactive_file");
        out.active_file = stat("active_file");
        out.unevictable = stat("unevictable");
        out.pgfault = stat("pgfault");
        out.pgmajfault = stat("pgmajfault");
        metrics.memory = MessageField::some(out);
        let mut events = cg2::MemoryEvents::new();
        events.oom = memory.oom_events;
        events.oom_kill = memory.oom_kill_events;
        metrics.memory_events = MessageField::some(events);
    }
    if let Some(pids) = &stats.pids {
        let mut out = cg2::PidsStat::new();
        out.current = pids.current;
        out.limit = pids.limit;
        metrics.pids = MessageField::some(out);
    }
    if !stats.io.is_empty() {
        let mut io = cg2::IOStat::new();
        io.usage = stats
            .io
            .iter()
            .map(|device| {
                let mut entry = cg2::IOEntry::new();
                entry.major = u64::from(device.major);
                entry.minor = u64::from(device.minor);
                entry.rbytes = device.read_bytes;
                entry.wbytes = device.write_bytes;
                entry.rios = device.read_ios;
                entry.wios = device.write_ios;
                entry
            })
            .collect();
        metrics.io = MessageField::some(io);
    }
    metrics.network = stats
        .network
        .iter()
        .map(|net| {
            let mut out = cg2::NetworkStat::new();
            out.name = net.name.clone();
            out.rx_bytes = net.rx_bytes;
            out.rx_packets = net.rx_packets;
            out.rx_errors = net.rx_errors;
            out.rx_dropped = net.rx_dropped;
            out.tx_bytes = net.tx_bytes;
            out.tx_packets = net.tx_packets;
            out.tx_errors = net.tx_errors;
            out.tx_dropped = net.tx_dropped;
            out
        })
        .collect();
    metrics
}

#[cfg(test)]
mod tests {
    use super::*;
    use containerd_shim::protos::protobuf::Message;
    use std::collections::HashMap;

    #[test]
    fn metrics_carry_the_agent_figures() {
        let stats = agent_api::ContainerStatsResponse {
            cpu: Some(agent_api::CpuStats {
                usage_usec: 1234,
                ..Default::default()
            }),
            memory: Some(agent_api::MemoryStats {
                usage_bytes: 4096,
                limit_bytes: 8192,
                oom_kill_events: 1,
                stat: HashMap::from([("anon".to_owned(), 100)]),
                ..Default::default()
            }),
            pids: Some(agent_api::PidsStats {
                current: 3,
                limit: 0,
            }),
            io: vec![],
            network: vec![],
        };
        let metrics = cgroup_v2_metrics(&stats);
        let bytes = metrics.write_to_bytes().unwrap();
        let decoded = cg2::Metrics::parse_from_bytes(&bytes).unwrap();
        assert_eq!(decoded.cpu.usage_usec, 1234);
        assert_eq!(decoded.memory.usage, 4096);
        assert_eq!(decoded.memory.usage_limit, 8192);
        assert_eq!(decoded.memory.anon, 100);
        assert_eq!(decoded.memory_events.oom_kill, 1);
        assert_eq!(decoded.pids.current, 3);
    }
}
