//! The spec's seccomp profile compiled to BPF with `seccompiler` (pure
//! Rust; libseccomp does not survive the static build).
//!
//! seccompiler gives each filter one match action, while a profile gives
//! one per rule. So the profile becomes a stack of filters, relying on the
//! kernel taking the most restrictive verdict of all installed filters:
//! - one filter returns the default action for every syscall that no rule
//!   names (and ALLOW for the rest);
//! - one filter per other action returns that action for its rules' syscalls
//!   (and ALLOW for the rest).
//!
//! Syscall names this architecture does not have are skipped, as libseccomp
//! does for runc. Filters check the architecture (x86-64 here) and kill a
//! process that makes a syscall of another one.

use super::SpecError;
use crate::spawn::plan::SeccompProgram;
use oci_spec::runtime::{
    LinuxSeccomp, LinuxSeccompAction, LinuxSeccompArg, LinuxSeccompFilterFlag, LinuxSeccompOperator,
};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use std::collections::BTreeMap;
use std::str::FromStr;

/// EPERM: what SCMP_ACT_ERRNO returns without an explicit errnoRet.
const DEFAULT_ERRNO: u32 = libc::EPERM as u32;

#[cfg(target_arch = "x86_64")]
const TARGET_ARCH: TargetArch = TargetArch::x86_64;
#[cfg(target_arch = "aarch64")]
const TARGET_ARCH: TargetArch = TargetArch::aarch64;

/// The compiled profile: programs in install order and seccomp() flags.
pub struct CompiledSeccomp {
    pub programs: Vec<SeccompProgram>,
    pub flags: libc::c_ulong,
    /// Names in the profile unknown on this architecture (skipped).
    pub skipped_syscalls: Vec<String>,
}

fn action(
    action: LinuxSeccompAction,
    errno_ret: Option<u32>,
    field: &str,
) -> Result<SeccompAction, SpecError> {
    Ok(match action {
        LinuxSeccompAction::ScmpActKill | LinuxSeccompAction::ScmpActKillThread => {
            SeccompAction::KillThread
        }
        LinuxSeccompAction::ScmpActKillProcess => SeccompAction::KillProcess,
        LinuxSeccompAction::ScmpActTrap => SeccompAction::Trap,
        LinuxSeccompAction::ScmpActErrno => {
            SeccompAction::Errno(errno_ret.unwrap_or(DEFAULT_ERRNO))
        }
        LinuxSeccompAction::ScmpActTrace => SeccompAction::Trace(errno_ret.unwrap_or(0)),
        LinuxSeccompAction::ScmpActLog => SeccompAction::Log,
        LinuxSeccompAction::ScmpActAllow => SeccompAction::Allow,
        LinuxSeccompAction::ScmpActNotify => {
            return Err(SpecError::Unsupported(format!(
                "{field}: SCMP_ACT_NOTIFY (no seccomp agent runs in the VM)"
            )))
        }
    })
}

fn condition(arg: &LinuxSeccompArg, field: &str) -> Result<SeccompCondition, SpecError> {
    let index = u8::try_from(arg.index())
        .ok()
        .filter(|index| *index < 6)
        .ok_or_else(|| SpecError::InvalidValue {
            field: field.to_owned(),
            reason: format!("argument index {} is not 0-5", arg.index()),
        })?;
    let (operator, value) = match arg.op() {
        LinuxSeccompOperator::ScmpCmpNe => (SeccompCmpOp::Ne, arg.value()),
        LinuxSeccompOperator::ScmpCmpLt => (SeccompCmpOp::Lt, arg.value()),
        LinuxSeccompOperator::ScmpCmpLe => (SeccompCmpOp::Le, arg.value()),
        LinuxSeccompOperator::ScmpCmpEq => (SeccompCmpOp::Eq, arg.value()),
        LinuxSeccompOperator::ScmpCmpGe => (SeccompCmpOp::Ge, arg.value()),
        LinuxSeccompOperator::ScmpCmpGt => (SeccompCmpOp::Gt, arg.value()),
        // libseccomp: value is the mask, valueTwo the expected result.
        LinuxSeccompOperator::ScmpCmpMaskedEq => (
            SeccompCmpOp::MaskedEq(arg.value()),
            arg.value_two().unwrap_or(0),
        ),
    };
    SeccompCondition::new(index, SeccompCmpArgLen::Qword, operator, value).map_err(|err| {
        SpecError::InvalidValue {
            field: field.to_owned(),
            reason: err.to_string(),
        }
    })
}

/// Rules per syscall number; an empty list matches the syscall whatever
/// its arguments.
type RuleMap = BTreeMap<i64, Vec<SeccompRule>>;

/// Adds one rule (None: unconditional) for `number`. An empty list is
/// already unconditional and stays so.
fn add_rule(map: &mut RuleMap, number: i64, rule: Option<SeccompRule>) {
    match (map.get_mut(&number), rule) {
        (_, None) => {
            map.insert(number, Vec::new());
        }
        (Some(rules), Some(rule)) => {
            if !rules.is_empty() {
                rules.push(rule);
            }
        }
        (None, Some(rule)) => {
            map.insert(number, vec![rule]);
        }
    }
}

pub fn compile(profile: &LinuxSeccomp) -> Result<CompiledSeccomp, SpecError> {
    if profile.listener_path().is_some() {
        return Err(SpecError::Unsupported(
            "linux.seccomp.listenerPath (no seccomp agent runs in the VM)".into(),
        ));
    }
    let default_action = action(
        profile.default_action(),
        profile.default_errno_ret(),
        "linux.seccomp.defaultAction",
    )?;

    let mut flags: libc::c_ulong = 0;
    for flag in profile.flags().as_deref().unwrap_or_default() {
        flags |= match flag {
            LinuxSeccompFilterFlag::SeccompFilterFlagLog => libc::SECCOMP_FILTER_FLAG_LOG,
            LinuxSeccompFilterFlag::SeccompFilterFlagSpecAllow => {
                libc::SECCOMP_FILTER_FLAG_SPEC_ALLOW
            }
            // The process is single-threaded when the filter goes in.
            LinuxSeccompFilterFlag::SeccompFilterFlagTsync => 0,
            LinuxSeccompFilterFlag::SeccompFilterFlagWaitKillableRecv => {
                return Err(SpecError::Unsupported(
                    "linux.seccomp.flags SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV (notify only)"
                        .into(),
                ))
            }
        };
    }

    // Every syscall any rule names (for the default filter), and the rules
    // per non-ALLOW action.
    let mut named: RuleMap = BTreeMap::new();
    let mut per_action: Vec<(SeccompAction, RuleMap)> = Vec::new();
    let mut skipped = Vec::new();
    for (rule_index, syscall) in profile
        .syscalls()
        .as_deref()
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        let field = format!("linux.seccomp.syscalls[{rule_index}]");
        let rule_action = action(syscall.action(), syscall.errno_ret(), &field)?;
        let conditions = syscall
            .args()
            .as_deref()
            .unwrap_or_default()
            .iter()
            .map(|arg| condition(arg, &format!("{field}.args")))
            .collect::<Result<Vec<_>, _>>()?;
        let rule = if conditions.is_empty() {
            None
        } else {
            Some(
                SeccompRule::new(conditions).map_err(|err| SpecError::InvalidValue {
                    field: field.clone(),
                    reason: err.to_string(),
                })?,
            )
        };
        for name in syscall.names() {
            let Ok(sysno) = syscalls::Sysno::from_str(name) else {
                skipped.push(name.clone());
                continue;
            };
            let number = i64::from(sysno.id());
            add_rule(&mut named, number, rule.clone());
            if rule_action == SeccompAction::Allow {
                continue;
            }
            let slot = match per_action.iter().position(|(a, _)| *a == rule_action) {
                Some(position) => position,
                None => {
                    per_action.push((rule_action.clone(), BTreeMap::new()));
                    per_action.len() - 1
                }
            };
            if let Some((_, map)) = per_action.get_mut(slot) {
                add_rule(map, number, rule.clone());
            }
        }
    }

    let build = |rules: RuleMap, mismatch: SeccompAction, on_match: SeccompAction| {
        let filter = SeccompFilter::new(rules, mismatch, on_match, TARGET_ARCH).map_err(|err| {
            SpecError::InvalidValue {
                field: "linux.seccomp".into(),
                reason: err.to_string(),
            }
        })?;
        let program: BpfProgram = filter
            .try_into()
            .map_err(|err: seccompiler::BackendError| SpecError::InvalidValue {
                field: "linux.seccomp".into(),
                reason: err.to_string(),
            })?;
        Ok::<_, SpecError>(SeccompProgram {
            filter: program
                .into_iter()
                .map(|insn| libc::sock_filter {
                    code: insn.code,
                    jt: insn.jt,
                    jf: insn.jf,
                    k: insn.k,
                })
                .collect(),
        })
    };

    let mut programs = Vec::new();
    if default_action != SeccompAction::Allow {
        programs.push(build(named, default_action, SeccompAction::Allow)?);
    }
    for (rule_action, rules) in per_action {
        programs.push(build(rules, SeccompAction::Allow, rule_action)?);
    }
    Ok(CompiledSeccomp {
        programs,
        flags,
        skipped_syscalls: skipped,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(json: serde_json::Value) -> LinuxSeccomp {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn allow_list_profile_gives_one_filter() {
        let compiled = compile(&profile(serde_json::json!({
            "defaultAction": "SCMP_ACT_ERRNO",
            "syscalls": [
                {"names": ["read", "write", "exit_group", "no_such_syscall"], "action": "SCMP_ACT_ALLOW"}
            ]
        })))
        .unwrap();
        assert_eq!(compiled.programs.len(), 1);
        assert_eq!(compiled.skipped_syscalls, vec!["no_such_syscall"]);
        // The program ends in returns; ERRNO|EPERM must be one of them.
        let errno_eperm = libc::SECCOMP_RET_ERRNO | libc::EPERM as u32;
        assert!(compiled.programs[0]
            .filter
            .iter()
            .any(|insn| insn.code == 0x06 && insn.k == errno_eperm));
    }

    #[test]
    fn deny_list_profile_gives_one_filter_per_action() {
        let compiled = compile(&profile(serde_json::json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "flags": ["SECCOMP_FILTER_FLAG_LOG"],
            "syscalls": [
                {"names": ["mkdir"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1},
                {"names": ["personality"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1,
                 "args": [{"index": 0, "value": 8, "op": "SCMP_CMP_NE"}]},
                {"names": ["reboot"], "action": "SCMP_ACT_KILL_PROCESS"}
            ]
        })))
        .unwrap();
        assert_eq!(compiled.programs.len(), 2);
        assert_eq!(compiled.flags, libc::SECCOMP_FILTER_FLAG_LOG);
    }

    #[test]
    fn notify_and_bad_args_are_refused() {
        let notify = compile(&profile(serde_json::json!({
            "defaultAction": "SCMP_ACT_NOTIFY"
        })));
        assert!(matches!(notify, Err(SpecError::Unsupported(_))));
        let bad_index = compile(&profile(serde_json::json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ERRNO",
                          "args": [{"index": 9, "value": 0, "op": "SCMP_CMP_EQ"}]}]
        })));
        assert!(matches!(bad_index, Err(SpecError::InvalidValue { .. })));
    }
}
