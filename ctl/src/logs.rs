//! `microvm-ctl logs POD`: the pod's guest console and agent log (one file:
//! the agent logs to the console).

use crate::pods;
use std::io::{Read, Seek, Write};
use std::path::Path;
use std::time::Duration;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Pod id (or a unique prefix), or its Kubernetes name (NAME or NS/NAME).
    pod: String,
    /// Keep printing what is appended, until the pod is gone.
    #[arg(short, long)]
    follow: bool,
}

const FOLLOW_POLL: Duration = Duration::from_millis(200);

pub fn run(config: &Path, args: &Args) -> anyhow::Result<()> {
    let config = pods::load_config(config)?;
    let pod = pods::find(&config.paths.state_dir, &args.pod)?;
    let path = &pod.record.console_log;
    let mut file = std::fs::File::open(path).map_err(|err| {
        anyhow::anyhow!("opening the pod's console log {}: {err}", path.display())
    })?;
    let mut stdout = std::io::stdout().lock();
    std::io::copy(&mut file, &mut stdout)?;
    stdout.flush()?;
    if !args.follow {
        return Ok(());
    }
    let record_file = microvm_shim::record::PodRecord::path_in(&pod.dir);
    let mut position = file.stream_position()?;
    let mut buffer = vec![0u8; 64 << 10];
    loop {
        let count = file.read(&mut buffer)?;
        if count > 0 {
            position += count as u64;
            stdout.write_all(&buffer[..count])?;
            stdout.flush()?;
            continue;
        }
        if !record_file.exists() {
            return Ok(());
        }
        std::thread::sleep(FOLLOW_POLL);
        // The shim removes the log with the pod: that ends the follow too.
        let length = match std::fs::metadata(path) {
            Ok(meta) => meta.len(),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(err) => return Err(err.into()),
        };
        // A truncated or replaced log starts over.
        if length < position {
            file = match std::fs::File::open(path) {
                Ok(file) => file,
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                Err(err) => return Err(err.into()),
            };
            position = 0;
        }
    }
}
