//! `containerd-shim-microvm-v2`: containerd runs it as
//! `--runtime io.containerd.microvm.v2`. See docs/shim.md.

use microvm_shim::shim::{MicrovmShim, RUNTIME_ID};

/// One glibc malloc arena: the shim is one runtime thread plus short-lived
/// blocking threads, and every extra arena keeps its own touched pages.
const MALLOC_ARENAS: i32 = 1;
/// Fixed thresholds (setting them turns glibc's dynamic growth off, which
/// otherwise lets the heap keep up to 32 MiB after one large buffer).
const MALLOC_MMAP_THRESHOLD: i32 = 128 << 10;
const MALLOC_TRIM_THRESHOLD: i32 = 128 << 10;

fn tune_malloc() {
    for (param, value) in [
        (libc::M_ARENA_MAX, MALLOC_ARENAS),
        (libc::M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD),
        (libc::M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD),
    ] {
        // SAFETY: mallopt takes two integers; called before any thread
        // exists, as glibc asks. A refusal (returns 0) only costs memory.
        unsafe { libc::mallopt(param, value) };
    }
}

/// A panic in a task would otherwise vanish (containerd points the shim's
/// stderr at /dev/null) and leave the call it served waiting for ever: it
/// goes to the shim's log, containerd's, with where it happened.
fn log_panics() {
    std::panic::set_hook(Box::new(|info| {
        let location = info
            .location()
            .map(|at| format!(" at {}:{}", at.file(), at.line()))
            .unwrap_or_default();
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|text| (*text).to_owned())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(no message)".to_owned());
        tracing::error!("panic{location}: {message}");
        eprintln!("{RUNTIME_ID}: panic{location}: {message}");
    }));
}

fn main() {
    microvm_shim::version::answer_and_exit_if_asked(); // microvm-ctl issue: -v / --help
    tune_malloc();
    log_panics();
    // One thread runs every task: a shim serves one pod, its work is I/O
    // bound, and each runtime thread costs resident memory. It also keeps
    // the VM processes' parent-death signal tied to a thread that lives as
    // long as the shim (PR_SET_PDEATHSIG fires when the spawning thread
    // exits). Blocking work (FIFO opens, writes) goes to the blocking pool.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("{RUNTIME_ID}: building the tokio runtime: {err}");
            std::process::exit(1);
        }
    };
    let config = containerd_shim::Config {
        // Logging is ours (tracing, to containerd's log FIFO).
        no_setup_logger: true,
        // The crate's reaper calls waitpid(-1) on every SIGCHLD, which
        // steals the exit status of the VM processes tokio waits for; and
        // the shim has no container processes to adopt as a subreaper
        // (they run in the guest).
        no_reaper: true,
        no_sub_reaper: true,
        ..Default::default()
    };
    runtime.block_on(containerd_shim::asynchronous::run::<MicrovmShim>(
        RUNTIME_ID,
        Some(config),
    ));
}
