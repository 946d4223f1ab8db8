//! An OCI `Process` (the container's or an exec's) turned into the process
//! half of a [`crate::spawn::plan::ChildPlan`].

use super::mounts::secure_join;
use super::SpecError;
use crate::spawn::plan::{c_string, CStringArray, CapabilitySets, Credentials};
use oci_spec::runtime::{Capabilities, IOPriorityClass, PosixRlimitType, Process};
use std::ffi::CString;
use std::path::Path;
use std::str::FromStr;

/// runc's PATH when the spec's environment has none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The process part of a plan, ready for the child.
pub struct PreparedProcess {
    pub argv: CStringArray,
    pub envp: CStringArray,
    pub exec_candidates: Vec<CString>,
    pub cwd: CString,
    pub credentials: Credentials,
    pub capabilities: Option<CapabilitySets>,
    pub no_new_privileges: bool,
    pub rlimits: Vec<(libc::c_int, libc::rlimit)>,
    pub rlimit_labels: Vec<String>,
    pub io_priority: Option<libc::c_int>,
    pub umask: Option<libc::mode_t>,
    pub terminal: bool,
    /// (rows, columns); zero when the spec gives none.
    pub console_size: (u16, u16),
    pub oom_score_adj: Option<i32>,
    /// For messages: the program as given and the PATH searched.
    pub program: String,
    pub search_path: String,
}

/// `rootfs` (as the agent sees it) is where /etc/passwd gives HOME.
pub fn prepare(
    process: &Process,
    rootfs: Option<&Path>,
    last_capability: u32,
) -> Result<PreparedProcess, SpecError> {
    let args = process.args().as_deref().unwrap_or_default();
    let Some(program) = args.first() else {
        return Err(SpecError::InvalidValue {
            field: "process.args".into(),
            reason: "empty: there is no program to run".into(),
        });
    };
    if program.is_empty() {
        return Err(SpecError::InvalidValue {
            field: "process.args[0]".into(),
            reason: "empty program name".into(),
        });
    }
    let cwd = process.cwd();
    if !cwd.is_absolute() {
        return Err(SpecError::InvalidValue {
            field: "process.cwd".into(),
            reason: format!("{} is not absolute", cwd.display()),
        });
    }

    let mut env: Vec<String> = process.env().clone().unwrap_or_default();
    let user = process.user();
    if !env.iter().any(|entry| entry.starts_with("HOME=")) {
        let home = rootfs
            .and_then(|root| home_from_passwd(root, user.uid()))
            .unwrap_or_else(|| "/".to_owned());
        env.push(format!("HOME={home}"));
    }
    let search_path = env
        .iter()
        .rev()
        .find_map(|entry| entry.strip_prefix("PATH="))
        .unwrap_or(DEFAULT_PATH)
        .to_owned();
    let exec_candidates = exec_candidates(program, &search_path)?;

    let argv = args
        .iter()
        .enumerate()
        .map(|(index, arg)| c_string(&format!("process.args[{index}]"), arg))
        .collect::<Result<Vec<_>, _>>()?;
    let envp = env
        .iter()
        .enumerate()
        .map(|(index, entry)| c_string(&format!("process.env[{index}]"), entry))
        .collect::<Result<Vec<_>, _>>()?;

    let capabilities = capability_sets(process, last_capability)?;

    let (rlimits, rlimit_labels) = rlimits(process)?;

    let io_priority = io_priority(process)?;

    let console_size = process
        .console_size()
        .map(|size| {
            (
                u16::try_from(size.height()).unwrap_or(u16::MAX),
                u16::try_from(size.width()).unwrap_or(u16::MAX),
            )
        })
        .unwrap_or((0, 0));

    Ok(PreparedProcess {
        argv: CStringArray::new(argv),
        envp: CStringArray::new(envp),
        exec_candidates,
        cwd: super::mounts::path_c_string("process.cwd", cwd)?,
        credentials: Credentials {
            uid: user.uid(),
            gid: user.gid(),
            additional_gids: user.additional_gids().clone().unwrap_or_default(),
        },
        capabilities,
        no_new_privileges: process.no_new_privileges().unwrap_or(false),
        rlimits,
        rlimit_labels,
        io_priority,
        umask: user.umask(),
        terminal: process.terminal().unwrap_or(false),
        console_size,
        oom_score_adj: process.oom_score_adj(),
        program: program.clone(),
        search_path,
    })
}

/// Paths tried in order for execve: the program itself if it has a slash,
/// else the program in each directory of `search_path`.
fn exec_candidates(program: &str, search_path: &str) -> Result<Vec<CString>, SpecError> {
    if program.contains('/') {
        return Ok(vec![c_string("process.args[0]", program)?]);
    }
    Ok(search_path
        .split(':')
        .map(|dir| {
            let dir = if dir.is_empty() { "." } else { dir };
            c_string("PATH", &format!("{dir}/{program}"))
        })
        .collect::<Result<_, _>>()?)
}

/// process.capabilities as bit masks (None: the spec gives none).
fn capability_sets(
    process: &Process,
    last_capability: u32,
) -> Result<Option<CapabilitySets>, SpecError> {
    process
        .capabilities()
        .as_ref()
        .map(|caps| {
            Ok(CapabilitySets {
                bounding: capability_mask(caps.bounding().as_ref(), last_capability)?,
                effective: capability_mask(caps.effective().as_ref(), last_capability)?,
                permitted: capability_mask(caps.permitted().as_ref(), last_capability)?,
                inheritable: capability_mask(caps.inheritable().as_ref(), last_capability)?,
                ambient: capability_mask(caps.ambient().as_ref(), last_capability)?,
            })
        })
        .transpose()
}

/// process.rlimits as (resource, limit) pairs, and their names.
fn rlimits(process: &Process) -> Result<RlimitPlan, SpecError> {
    let mut rlimits = Vec::new();
    let mut labels = Vec::new();
    for limit in process.rlimits().as_deref().unwrap_or_default() {
        if limit.soft() > limit.hard() {
            return Err(SpecError::InvalidValue {
                field: "process.rlimits".into(),
                reason: format!(
                    "{:?}: soft limit {} is above the hard limit {}",
                    limit.typ(),
                    limit.soft(),
                    limit.hard()
                ),
            });
        }
        rlimits.push((
            rlimit_resource(limit.typ()),
            libc::rlimit {
                rlim_cur: limit.soft(),
                rlim_max: limit.hard(),
            },
        ));
        labels.push(format!("{:?}", limit.typ()));
    }
    Ok((rlimits, labels))
}

/// (resource, limit) pairs for setrlimit, and the names of the resources.
type RlimitPlan = (Vec<(libc::c_int, libc::rlimit)>, Vec<String>);

/// process.ioPriority as the ioprio_set value.
fn io_priority(process: &Process) -> Result<Option<libc::c_int>, SpecError> {
    process
        .io_priority()
        .as_ref()
        .map(|priority| {
            let class = match priority.class() {
                IOPriorityClass::IoprioClassRt => 1,
                IOPriorityClass::IoprioClassBe => 2,
                IOPriorityClass::IoprioClassIdle => 3,
            };
            let level = libc::c_int::try_from(priority.priority())
                .ok()
                .filter(|level| (0..8).contains(level))
                .ok_or_else(|| SpecError::InvalidValue {
                    field: "process.ioPriority.priority".into(),
                    reason: format!("{} is not 0-7", priority.priority()),
                })?;
            Ok((class << 13) | level)
        })
        .transpose()
}

/// Bit mask of `caps`; names the running kernel does not know are left out
/// (as runc does), names no kernel knows are an error.
pub fn capability_mask(caps: Option<&Capabilities>, last: u32) -> Result<u64, SpecError> {
    let mut mask = 0u64;
    for cap in caps.into_iter().flatten() {
        // oci-spec prints "KILL"; caps parses "CAP_KILL".
        let name = match cap.to_string() {
            name if name.starts_with("CAP_") => name,
            name => format!("CAP_{name}"),
        };
        let known = caps::Capability::from_str(&name).map_err(|_| SpecError::InvalidValue {
            field: "process.capabilities".into(),
            reason: format!("unknown capability {name}"),
        })?;
        let index = u32::from(known.index());
        if index <= last && index < 64 {
            mask |= 1u64 << index;
        }
    }
    Ok(mask)
}

fn rlimit_resource(kind: PosixRlimitType) -> libc::c_int {
    let resource = match kind {
        PosixRlimitType::RlimitCpu => libc::RLIMIT_CPU,
        PosixRlimitType::RlimitFsize => libc::RLIMIT_FSIZE,
        PosixRlimitType::RlimitData => libc::RLIMIT_DATA,
        PosixRlimitType::RlimitStack => libc::RLIMIT_STACK,
        PosixRlimitType::RlimitCore => libc::RLIMIT_CORE,
        PosixRlimitType::RlimitRss => libc::RLIMIT_RSS,
        PosixRlimitType::RlimitNproc => libc::RLIMIT_NPROC,
        PosixRlimitType::RlimitNofile => libc::RLIMIT_NOFILE,
        PosixRlimitType::RlimitMemlock => libc::RLIMIT_MEMLOCK,
        PosixRlimitType::RlimitAs => libc::RLIMIT_AS,
        PosixRlimitType::RlimitLocks => libc::RLIMIT_LOCKS,
        PosixRlimitType::RlimitSigpending => libc::RLIMIT_SIGPENDING,
        PosixRlimitType::RlimitMsgqueue => libc::RLIMIT_MSGQUEUE,
        PosixRlimitType::RlimitNice => libc::RLIMIT_NICE,
        PosixRlimitType::RlimitRtprio => libc::RLIMIT_RTPRIO,
        PosixRlimitType::RlimitRttime => libc::RLIMIT_RTTIME,
    };
    resource as libc::c_int
}

/// HOME of `uid` in the rootfs's /etc/passwd, if it has one.
fn home_from_passwd(rootfs: &Path, uid: u32) -> Option<String> {
    let passwd = secure_join(rootfs, Path::new("/etc/passwd")).ok()?;
    let text = std::fs::read_to_string(passwd).ok()?;
    text.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        match fields.as_slice() {
            [_, _, entry_uid, _, _, home, ..] if entry_uid.parse::<u32>().ok()? == uid => {
                Some((*home).to_owned())
            }
            _ => None,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn process(json: serde_json::Value) -> Process {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn path_search_env_home_and_credentials() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("etc")).unwrap();
        std::fs::write(
            dir.path().join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n",
        )
        .unwrap();
        let prepared = prepare(
            &process(serde_json::json!({
                "user": {"uid": 1000, "gid": 1000, "additionalGids": [10, 20], "umask": 18},
                "args": ["sh", "-c", "true"],
                "env": ["PATH=/bin:/usr/bin"],
                "cwd": "/tmp",
                "noNewPrivileges": true,
                "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 512}],
                "capabilities": {"bounding": ["CAP_KILL", "CAP_CHOWN"], "effective": ["CAP_KILL"]}
            })),
            Some(dir.path()),
            40,
        )
        .unwrap();
        assert_eq!(
            prepared.exec_candidates,
            vec![c"/bin/sh".to_owned(), c"/usr/bin/sh".to_owned()]
        );
        assert!(prepared
            .envp
            .strings()
            .contains(&c"HOME=/home/user".to_owned()));
        assert_eq!(prepared.credentials.additional_gids, vec![10, 20]);
        assert_eq!(prepared.umask, Some(18));
        assert!(prepared.no_new_privileges);
        assert_eq!(
            prepared.rlimits,
            vec![(
                libc::RLIMIT_NOFILE as libc::c_int,
                libc::rlimit {
                    rlim_cur: 512,
                    rlim_max: 1024
                }
            )]
        );
        let caps = prepared.capabilities.unwrap();
        assert_eq!(caps.bounding, (1u64 << 5) | (1u64 << 0));
        assert_eq!(caps.effective, 1u64 << 5);
        assert_eq!(caps.ambient, 0);
    }

    #[test]
    fn bad_processes_are_refused() {
        let empty_args = prepare(
            &process(serde_json::json!({"user": {"uid": 0, "gid": 0}, "args": [], "cwd": "/"})),
            None,
            40,
        );
        assert!(matches!(empty_args, Err(SpecError::InvalidValue { .. })));
        let relative_cwd = prepare(
            &process(
                serde_json::json!({"user": {"uid": 0, "gid": 0}, "args": ["x"], "cwd": "tmp"}),
            ),
            None,
            40,
        );
        assert!(matches!(relative_cwd, Err(SpecError::InvalidValue { .. })));
        let soft_over_hard = prepare(
            &process(
                serde_json::json!({"user": {"uid": 0, "gid": 0}, "args": ["x"], "cwd": "/",
                "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1, "soft": 2}]}),
            ),
            None,
            40,
        );
        assert!(matches!(
            soft_over_hard,
            Err(SpecError::InvalidValue { .. })
        ));
    }

    #[test]
    fn absolute_program_is_the_only_candidate_and_home_defaults_to_root() {
        let prepared = prepare(
            &process(serde_json::json!({"user": {"uid": 5, "gid": 5}, "args": ["/bin/true"], "cwd": "/"})),
            None,
            40,
        )
        .unwrap();
        assert_eq!(prepared.exec_candidates, vec![c"/bin/true".to_owned()]);
        assert!(prepared.envp.strings().contains(&c"HOME=/".to_owned()));
        assert!(prepared.capabilities.is_none());
    }

    #[test]
    fn capabilities_beyond_the_kernel_are_left_out() {
        let mut caps = Capabilities::new();
        caps.insert(oci_spec::runtime::Capability::Chown);
        caps.insert(oci_spec::runtime::Capability::CheckpointRestore);
        // CHECKPOINT_RESTORE is 40: left out on a kernel whose last is 39.
        assert_eq!(capability_mask(Some(&caps), 39).unwrap(), 1u64);
        assert_eq!(capability_mask(Some(&caps), 40).unwrap(), (1 << 40) | 1);
    }
}
