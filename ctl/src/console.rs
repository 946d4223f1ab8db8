//! `microvm-ctl console POD`: a shell inside the pod's VM, outside every
//! container, over the agent's vsock (the agent serves the host's CID
//! only). Refused here when the pod's shim config had the console off, and
//! by the agent too (the shim gives it the policy at boot).

use crate::pods;
use microvm_proto::abi::vsock;
use microvm_proto::agent::v1 as api;
use microvm_proto::CONSOLE_SHELL_CHUNK_BYTES;
use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Pod id (or a unique prefix), or its Kubernetes name (NAME or NS/NAME).
    pod: String,
    /// The busybox applet and arguments to run instead of an interactive sh.
    #[arg(last = true)]
    command: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error("the debug console is disabled for pod {0}: set console.enabled = true in the shim config (it takes effect for pods started after the change)")]
    Disabled(String),
    #[error("pod {0} is not running (state {1})")]
    NotRunning(String, &'static str),
    #[error(
        "reading the console shell {path} (console.shell; busybox-static provides /bin/busybox)"
    )]
    Shell {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("connecting to the pod's agent")]
    Agent(#[source] microvm_shim::agent::AgentError),
    #[error("the agent refused the console: {0}")]
    Refused(tonic::Status),
}

/// Raw mode on a terminal stdin, restored on drop.
struct RawTerminal(Option<nix::sys::termios::Termios>);

impl RawTerminal {
    fn enter() -> Self {
        use nix::sys::termios;
        let stdin = std::io::stdin();
        let Ok(saved) = termios::tcgetattr(&stdin) else {
            return Self(None);
        };
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        let _ = termios::tcsetattr(&stdin, termios::SetArg::TCSANOW, &raw);
        Self(Some(saved))
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if let Some(saved) = &self.0 {
            let _ = nix::sys::termios::tcsetattr(
                std::io::stdin(),
                nix::sys::termios::SetArg::TCSANOW,
                saved,
            );
        }
    }
}

fn window_size() -> Option<api::WindowSize> {
    let mut size = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes a winsize into the pointer, valid for the call.
    let ok = unsafe { libc::ioctl(libc::STDIN_FILENO, libc::TIOCGWINSZ, &mut size) } == 0;
    ok.then(|| api::WindowSize {
        rows: u32::from(size.ws_row),
        columns: u32::from(size.ws_col),
    })
}

pub fn run(config: &Path, args: &Args) -> anyhow::Result<ExitCode> {
    let config = pods::load_config(config)?;
    let pod = pods::find(&config.paths.state_dir, &args.pod)?;
    let record = pod.record;
    if !record.console_enabled || !config.console.enabled {
        return Err(ConsoleError::Disabled(record.pod_id).into());
    }
    let state = pods::state(&record);
    if state != "running" {
        return Err(ConsoleError::NotRunning(record.pod_id, state).into());
    }
    let shell = std::fs::read(&record.console_shell).map_err(|source| ConsoleError::Shell {
        path: record.console_shell.clone(),
        source,
    })?;
    let argv = if args.command.is_empty() {
        vec!["sh".to_owned()]
    } else {
        args.command.clone()
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(session(&record.agent_socket, shell, argv))?;
    Ok(ExitCode::SUCCESS)
}

async fn session(
    agent_socket: &Path,
    shell: Vec<u8>,
    argv: Vec<String>,
) -> Result<(), ConsoleError> {
    use api::console_input::Kind;
    let agent = microvm_shim::agent::AgentClient::connect(agent_socket, vsock::AGENT_PORT)
        .await
        .map_err(ConsoleError::Agent)?;
    let message = |kind| api::ConsoleInput { kind: Some(kind) };
    let interactive = nix::unistd::isatty(std::io::stdin()).unwrap_or(false);
    let open = api::ConsoleOpen {
        argv,
        term: std::env::var("TERM").unwrap_or_else(|_| "xterm".into()),
        size: window_size(),
    };
    let chunks: Vec<_> = shell
        .chunks(CONSOLE_SHELL_CHUNK_BYTES)
        .map(|chunk| chunk.to_vec())
        .collect();
    let (input, receiver) = tokio::sync::mpsc::channel::<api::ConsoleInput>(16);
    let feeder = input.clone();
    tokio::spawn(async move {
        for chunk in chunks {
            if feeder
                .send(message(Kind::ShellChunk(chunk.into())))
                .await
                .is_err()
            {
                return;
            }
        }
        let _ = feeder.send(message(Kind::Open(open))).await;
        // Stdin on a thread: tokio's stdin is a blocking thread anyway,
        // and this one can end with the process.
        let (bytes, mut from_stdin) = tokio::sync::mpsc::channel::<Vec<u8>>(16);
        std::thread::spawn(move || {
            use std::io::Read;
            let mut stdin = std::io::stdin();
            let mut buffer = vec![0u8; 4096];
            loop {
                match stdin.read(&mut buffer) {
                    Ok(0) | Err(_) => {
                        // End of a piped stdin: end of input for the shell.
                        let _ = bytes.blocking_send(vec![0x04]);
                        return;
                    }
                    Ok(count) => {
                        if bytes.blocking_send(buffer[..count].to_vec()).is_err() {
                            return;
                        }
                    }
                }
            }
        });
        while let Some(data) = from_stdin.recv().await {
            if feeder
                .send(message(Kind::Stdin(data.into())))
                .await
                .is_err()
            {
                return;
            }
        }
    });
    drop(input);
    let _raw = interactive.then(RawTerminal::enter);
    let mut output = agent
        .debug
        .clone()
        .console(tokio_stream::wrappers::ReceiverStream::new(receiver))
        .await
        .map_err(ConsoleError::Refused)?
        .into_inner();
    let mut stdout = std::io::stdout();
    while let Ok(Some(message)) = output.message().await {
        if let Some(api::console_output::Kind::Output(data)) = message.kind {
            let _ = stdout.write_all(&data);
            let _ = stdout.flush();
        }
    }
    Ok(())
}
