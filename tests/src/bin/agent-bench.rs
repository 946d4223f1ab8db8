//! Guest agent benchmark on the host: idle RSS, create+start+wait of a
//! `/bin/true` container against `runc run` of the same bundle in the same
//! run, exec round trip, and stdout throughput over the gRPC stream.
//!
//! Usage: cargo build --release -p microvm-agent &&
//!        cargo run --release -p microvm-tests --bin agent-bench [-- --runs N]

use anyhow::{bail, Context, Result};
use microvm_proto::agent::v1 as api;
use microvm_tests::agent::{process, process_ref, rootfs, spec, AgentOptions, AgentUnderTest};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

struct Options {
    runs: usize,
    stream_bytes: u64,
}

fn parse_args() -> Result<Options> {
    let mut options = Options {
        runs: 100,
        stream_bytes: 2 << 30,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--runs" => options.runs = args.next().context("--runs needs a number")?.parse()?,
            "--stream-mib" => {
                let mib: u64 = args
                    .next()
                    .context("--stream-mib needs a number")?
                    .parse()?;
                options.stream_bytes = mib << 20;
            }
            "-h" | "--help" => {
                println!("usage: agent-bench [--runs N] [--stream-mib M]");
                println!("Medians over N runs (default 100); stdout throughput over M MiB (default 2048).");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} (see --help)"),
        }
    }
    if options.runs == 0 {
        bail!("--runs must be at least 1");
    }
    Ok(options)
}

fn median(samples: &mut [Duration]) -> Duration {
    samples.sort_unstable();
    samples.get(samples.len() / 2).copied().unwrap_or_default()
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

fn status(result: Result<impl Sized, tonic::Status>) -> Result<()> {
    result
        .map(drop)
        .map_err(|status| anyhow::anyhow!("{status:?}"))
}

/// `runc run` of `bundle`, `runs` times; None when runc is not installed.
fn runc_runs(bundle: &Path, state: &Path, runs: usize) -> Result<Option<Vec<Duration>>> {
    if Command::new("runc").arg("--version").output().is_err() {
        return Ok(None);
    }
    let mut samples = Vec::with_capacity(runs);
    for run in 0..runs {
        let id = format!("bench-{}-{run}", std::process::id());
        let started = Instant::now();
        let output = Command::new("runc")
            .arg("--root")
            .arg(state)
            .args(["run", "--bundle"])
            .arg(bundle)
            .arg(&id)
            .stdin(Stdio::null())
            .output()
            .context("runc run")?;
        samples.push(started.elapsed());
        if !output.status.success() {
            bail!(
                "runc run failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
    }
    Ok(Some(samples))
}

struct Row {
    metric: &'static str,
    value: String,
    target: String,
    verdict: &'static str,
}

fn verdict(pass: bool) -> &'static str {
    if pass {
        "ok"
    } else {
        "MISSED"
    }
}

/// Idle RSS (KiB) of the static build that goes into the initramfs
/// (target/guest/...), when it has been built.
async fn static_agent_idle_rss() -> Option<u64> {
    let binary = microvm_tests::harness::repo_root()
        .join("target/guest/x86_64-unknown-linux-gnu/release/microvm-agent");
    if !binary.is_file() {
        return None;
    }
    let agent = AgentUnderTest::start_with(
        "bench-static",
        AgentOptions {
            log_filter: "warn".into(),
            binary: Some(binary),
            ..AgentOptions::default()
        },
    );
    let mut client = agent.client().await;
    let check = client
        .health
        .check(api::CheckRequest {
            client_version: Some(api::ApiVersion::current()),
        })
        .await;
    check.ok()?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    agent.rss_kib()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let options = parse_args()?;
    let agent = AgentUnderTest::start_with(
        "bench",
        AgentOptions {
            log_filter: "warn".into(),
            ..AgentOptions::default()
        },
    );
    let rootfs = rootfs(&agent.dir);
    let mut client = agent.client().await;
    status(
        client
            .health
            .check(api::CheckRequest {
                client_version: Some(api::ApiVersion::current()),
            })
            .await,
    )?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let idle_rss = agent.rss_kib().context("agent RSS")?;
    let idle_anon = agent.status_kib("RssAnon:").unwrap_or(0);
    let static_rss = static_agent_idle_rss().await;

    // create + start + wait of /bin/true, removal outside the timing.
    let true_spec = spec(&rootfs, &["/bin/true"]);
    let mut samples = Vec::with_capacity(options.runs);
    for run in 0..options.runs {
        let id = format!("true-{run}");
        let started = Instant::now();
        status(client.create(&id, &true_spec, false).await)?;
        status(client.start(&id).await)?;
        let code = client
            .wait(&id, "")
            .await
            .map_err(|s| anyhow::anyhow!("{s:?}"))?;
        samples.push(started.elapsed());
        if code != 0 {
            bail!("/bin/true exited {code}");
        }
        status(client.remove(&id, false).await)?;
    }
    let agent_true = median(&mut samples);

    // The same bundle under runc.
    let bundle = agent.dir.join("bundle");
    std::fs::create_dir_all(&bundle)?;
    let mut runc_spec = spec(Path::new("rootfs"), &["/bin/true"]);
    runc_spec["root"]["path"] = "rootfs".into();
    std::fs::write(
        bundle.join("config.json"),
        serde_json::to_vec_pretty(&runc_spec)?,
    )?;
    // runc wants a real directory, not a symlink: the same fixture again.
    microvm_tests::rootfs::build_busybox_rootfs(&bundle.join("rootfs"))?;
    let runc_state = agent.dir.join("runc-state");
    let runc =
        runc_runs(&bundle, &runc_state, options.runs)?.map(|mut samples| median(&mut samples));

    // Exec round trip: exec /bin/true in a running container and wait.
    status(
        client
            .create("sleeper", &spec(&rootfs, &["sleep", "100000"]), false)
            .await,
    )?;
    status(client.start("sleeper").await)?;
    let exec_true = process(&["/bin/true"]);
    let mut samples = Vec::with_capacity(options.runs);
    for run in 0..options.runs {
        let exec_id = format!("e{run}");
        let started = Instant::now();
        status(client.exec("sleeper", &exec_id, &exec_true, false).await)?;
        client
            .wait("sleeper", &exec_id)
            .await
            .map_err(|s| anyhow::anyhow!("{s:?}"))?;
        samples.push(started.elapsed());
    }
    let exec_round_trip = median(&mut samples);
    status(client.remove("sleeper", true).await)?;

    // stdout throughput over the stream.
    let count = options.stream_bytes >> 20;
    let script = format!("dd if=/dev/zero bs=1M count={count} 2>/dev/null");
    status(
        client
            .create("stream", &spec(&rootfs, &["sh", "-c", &script]), false)
            .await,
    )?;
    status(client.start("stream").await)?;
    let started = Instant::now();
    let mut response = client
        .processes
        .read_output(api::ReadOutputRequest {
            process: process_ref("stream", ""),
            stream: api::OutputStream::Stdout as i32,
        })
        .await
        .map_err(|s| anyhow::anyhow!("{s:?}"))?
        .into_inner();
    let mut received: u64 = 0;
    while let Some(chunk) = response
        .message()
        .await
        .map_err(|s| anyhow::anyhow!("{s:?}"))?
    {
        received += chunk.data.len() as u64;
    }
    let elapsed = started.elapsed();
    if received != count << 20 {
        bail!(
            "stdout stream carried {received} bytes, expected {}",
            count << 20
        );
    }
    let throughput = received as f64 / elapsed.as_secs_f64() / 1e6;
    status(client.remove("stream", true).await)?;
    let busy_rss = agent.rss_kib().unwrap_or(0);

    let mut rows = vec![
        Row {
            metric: "agent idle RSS",
            value: format!("{:.2} MiB", idle_rss as f64 / 1024.0),
            target: "<= 4 MiB".into(),
            verdict: verdict(idle_rss <= 4096),
        },
        Row {
            metric: "  of which anonymous (heap, stacks)",
            value: format!("{:.2} MiB", idle_anon as f64 / 1024.0),
            target: "-".into(),
            verdict: "",
        },
        Row {
            metric: "static guest build idle RSS",
            value: static_rss.map_or("not built".into(), |kib| {
                format!("{:.2} MiB", kib as f64 / 1024.0)
            }),
            target: "<= 4 MiB".into(),
            verdict: static_rss.map_or("", |kib| verdict(kib <= 4096)),
        },
        Row {
            metric: "agent RSS after the runs",
            value: format!("{:.2} MiB", busy_rss as f64 / 1024.0),
            target: "-".into(),
            verdict: "",
        },
        Row {
            metric: "create+start+wait /bin/true (median)",
            value: format!("{:.2} ms", ms(agent_true)),
            target: "<= 15 ms".into(),
            verdict: verdict(agent_true <= Duration::from_millis(15)),
        },
    ];
    match runc {
        Some(runc) => {
            rows.push(Row {
                metric: "runc run /bin/true, same bundle (median)",
                value: format!("{:.2} ms", ms(runc)),
                target: "-".into(),
                verdict: "",
            });
            let ratio = agent_true.as_secs_f64() / runc.as_secs_f64().max(1e-9);
            rows.push(Row {
                metric: "agent / runc",
                value: format!("{ratio:.2}x"),
                target: "<= 2x".into(),
                verdict: verdict(ratio <= 2.0),
            });
        }
        None => rows.push(Row {
            metric: "runc run /bin/true",
            value: "runc not installed (apt-get install runc)".into(),
            target: "-".into(),
            verdict: "",
        }),
    }
    rows.push(Row {
        metric: "exec /bin/true round trip (median)",
        value: format!("{:.2} ms", ms(exec_round_trip)),
        target: "-".into(),
        verdict: "",
    });
    rows.push(Row {
        metric: "stdout throughput over the stream",
        value: format!("{throughput:.0} MB/s ({} MiB)", count),
        target: ">= 500 MB/s".into(),
        verdict: verdict(throughput >= 500.0),
    });

    println!(
        "agent-bench: {} runs, host {}",
        options.runs,
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
    );
    println!(
        "{:<42} {:>28} {:>12} {:>7}",
        "metric", "value", "target", ""
    );
    for row in rows {
        println!(
            "{:<42} {:>28} {:>12} {:>7}",
            row.metric, row.value, row.target, row.verdict
        );
    }
    Ok(())
}
