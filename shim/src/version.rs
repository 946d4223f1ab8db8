//! `-v`/`--version` and `-h`/`--help`, answered before the containerd shim
//! crate parses flags (it knows neither: `-v` failed on a missing
//! environment, `--help` on an undefined flag).

/// The shim's version (the workspace's) and the git commit it was built
/// from.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
pub const REVISION: &str = env!("MICROVM_GIT_COMMIT");
/// `<version> (shim revision <commit>)`, for the workspace's other
/// binaries' `--version` (one build script finds the commit).
pub const VERSION_AND_REVISION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (shim revision ",
    env!("MICROVM_GIT_COMMIT"),
    ")"
);

/// What the command line asks of this module, if anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Query {
    Version,
    Help,
}

pub fn query(args: &[String]) -> Option<Query> {
    args.iter().skip(1).find_map(|arg| match arg.as_str() {
        "-v" | "-version" | "--version" => Some(Query::Version),
        "-h" | "-help" | "--help" => Some(Query::Help),
        _ => None,
    })
}

/// The runc shim's form: the binary name, then indented Version and
/// Revision lines.
pub fn version_text(program: &str) -> String {
    format!(
        "{program}:\n  Version:  {VERSION}\n  Revision: {REVISION}\n  Runtime:  {}\n",
        crate::shim::RUNTIME_ID
    )
}

pub const HELP: &str = "\
containerd-shim-microvm-v2: the containerd shim v2 of runtime io.containerd.microvm.v2
(RuntimeClass handler `microvm`): each pod runs in its own microVM.

containerd starts it; it is not run by hand except for:
  -v, --version   print the version and git revision, and exit
  -h, --help      print this help, and exit

Flags containerd passes: -namespace NS -id ID -address ADDR [-publish-binary BIN]
[-bundle DIR] [-socket ADDR] [-debug] [start|delete].

Config: /etc/microvm/config.toml (or the CRI runtime option ConfigPath, or
$MICROVM_SHIM_CONFIG). Node tools: microvm-ctl check|install|ps|logs|console|metrics.
See docs/shim.md and docs/ctl.md.
";

/// Prints the answer and exits when the command line asks for the version
/// or help; returns otherwise.
pub fn answer_and_exit_if_asked() {
    let args: Vec<String> = std::env::args().collect();
    match query(&args) {
        Some(Query::Version) => {
            let program = args
                .first()
                .and_then(|path| std::path::Path::new(path).file_name())
                .map_or("containerd-shim-microvm-v2".into(), |name| {
                    name.to_string_lossy().into_owned()
                });
            print!("{}", version_text(&program));
            std::process::exit(0);
        }
        Some(Query::Help) => {
            print!("{HELP}");
            std::process::exit(0);
        }
        None => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_and_help_flags_are_recognised() {
        let args = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(query(&args(&["shim", "-v"])), Some(Query::Version));
        assert_eq!(query(&args(&["shim", "--version"])), Some(Query::Version));
        assert_eq!(query(&args(&["shim", "--help"])), Some(Query::Help));
        assert_eq!(
            query(&args(&[
                "shim",
                "-namespace",
                "k8s.io",
                "-id",
                "x",
                "start"
            ])),
            None
        );
        let text = version_text("containerd-shim-microvm-v2");
        assert!(text.starts_with("containerd-shim-microvm-v2:\n  Version:  "));
        assert!(text.contains("  Revision: "));
    }
}
