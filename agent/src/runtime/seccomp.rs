//! The spec's seccomp section compiled to BPF with seccompiler (pure Rust, no libseccomp).
//!
//! OCI lets every rule have its own action; a seccompiler filter has one. So the profile becomes
//! a stack of filters: one with the default action for what no rule allows (matching the
//! allow rules), and one per other action, allowing what it does not match. The kernel runs
//! them all and takes the most restrictive answer, which is the OCI meaning. Syscall names this
//! architecture does not have are skipped, as libseccomp does.

use std::collections::{BTreeMap, HashSet};

use oci_spec::runtime::{LinuxSeccomp, LinuxSeccompAction, LinuxSeccompOperator};
use seccompiler::{BpfProgram, TargetArch};
use serde_json::{Value, json};

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("seccomp action {0:?} is not supported")]
    Action(LinuxSeccompAction),
    #[error("cannot compile the seccomp profile: {0}")]
    Compile(String),
    #[error("cannot apply the seccomp filter: {0}")]
    Apply(String),
}

#[cfg(target_arch = "x86_64")]
const ARCH: TargetArch = TargetArch::x86_64;
#[cfg(target_arch = "aarch64")]
const ARCH: TargetArch = TargetArch::aarch64;
#[cfg(target_arch = "riscv64")]
const ARCH: TargetArch = TargetArch::riscv64;

fn action_json(action: LinuxSeccompAction, errno: Option<u32>) -> Result<Value, SeccompError> {
    use LinuxSeccompAction as A;
    Ok(match action {
        A::ScmpActAllow => json!("allow"),
        A::ScmpActErrno => json!({ "errno": errno.unwrap_or(nix::errno::Errno::EPERM as u32) }),
        A::ScmpActKill | A::ScmpActKillThread => json!("kill_thread"),
        A::ScmpActKillProcess => json!("kill_process"),
        A::ScmpActTrap => json!("trap"),
        A::ScmpActLog => json!("log"),
        A::ScmpActTrace => json!({ "trace": errno.unwrap_or(0) }),
        other => return Err(SeccompError::Action(other)),
    })
}

/// Whether seccompiler knows `name` on this architecture.
fn known(name: &str) -> bool {
    let probe = json!({ "p": { "mismatch_action": "allow", "match_action": "log", "filter": [{ "syscall": name }] } });
    seccompiler::compile_from_json(probe.to_string().as_bytes(), ARCH).is_ok()
}

/// The BPF programs for `profile`, to be installed in order.
pub fn compile(profile: &LinuxSeccomp) -> Result<Vec<BpfProgram>, SeccompError> {
    compile_without(profile, HashSet::new())
}

/// Every name of `profile` seccompiler does not know on this architecture (one probe each).
fn unknown_syscalls(profile: &LinuxSeccomp) -> HashSet<String> {
    profile
        .syscalls()
        .iter()
        .flatten()
        .flat_map(|r| r.names().iter())
        .filter(|n| !known(n))
        .cloned()
        .collect()
}

fn compile_without(
    profile: &LinuxSeccomp,
    unknown: HashSet<String>,
) -> Result<Vec<BpfProgram>, SeccompError> {
    let default = action_json(profile.default_action(), profile.default_errno_ret())?;
    // Rules grouped by their action (as JSON, so equal actions group together).
    let mut groups: BTreeMap<String, (Value, Vec<Value>)> = BTreeMap::new();

    for rule in profile.syscalls().iter().flatten() {
        let action = action_json(rule.action(), rule.errno_ret())?;
        let conditions: Vec<Value> = rule
            .args()
            .iter()
            .flatten()
            .map(|a| {
                let (op, val) = match a.op() {
                    LinuxSeccompOperator::ScmpCmpNe => (json!("ne"), a.value()),
                    LinuxSeccompOperator::ScmpCmpLt => (json!("lt"), a.value()),
                    LinuxSeccompOperator::ScmpCmpLe => (json!("le"), a.value()),
                    LinuxSeccompOperator::ScmpCmpEq => (json!("eq"), a.value()),
                    LinuxSeccompOperator::ScmpCmpGe => (json!("ge"), a.value()),
                    LinuxSeccompOperator::ScmpCmpGt => (json!("gt"), a.value()),
                    LinuxSeccompOperator::ScmpCmpMaskedEq => (
                        json!({ "masked_eq": a.value() }),
                        a.value_two().unwrap_or(0),
                    ),
                };
                json!({ "index": a.index(), "type": "qword", "op": op, "val": val })
            })
            .collect();
        for name in rule.names() {
            if unknown.contains(name) {
                continue;
            }
            let mut r = json!({ "syscall": name });
            if !conditions.is_empty() {
                r["args"] = Value::Array(conditions.clone());
            }
            groups
                .entry(action.to_string())
                .or_insert_with(|| (action.clone(), Vec::new()))
                .1
                .push(r);
        }
    }
    if !unknown.is_empty() {
        tracing::debug!(
            ?unknown,
            "seccomp: skipping syscalls this architecture does not have"
        );
    }
    let allow = json!("allow");
    let allow_key = allow.to_string();
    let mut filters = serde_json::Map::new();
    // The default filter: everything gets the default action except the allowed rules.
    if default != allow {
        let rules = groups
            .get(&allow.to_string())
            .map(|g| g.1.clone())
            .unwrap_or_default();
        filters.insert(
            "0-default".into(),
            json!({ "mismatch_action": default, "match_action": "allow", "filter": rules }),
        );
    }
    for (i, (key, (action, rules))) in groups.into_iter().enumerate() {
        if key == allow_key {
            continue;
        }
        filters.insert(
            format!("{}-rule", i + 1),
            json!({ "mismatch_action": "allow", "match_action": action, "filter": rules }),
        );
    }
    let json = Value::Object(filters).to_string();
    let map = match seccompiler::compile_from_json(json.as_bytes(), ARCH) {
        Ok(map) => map,
        // An unknown name: find them all (one probe each) and compile without them.
        Err(e) if unknown.is_empty() && e.to_string().contains("Invalid syscall name") => {
            return compile_without(profile, unknown_syscalls(profile));
        }
        Err(e) => return Err(SeccompError::Compile(e.to_string())),
    };
    let mut named: Vec<(String, BpfProgram)> = map.into_iter().collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(named
        .into_iter()
        .map(|(_, p)| p)
        .filter(|p| !p.is_empty())
        .collect())
}

/// Install `programs` on the calling thread (needs no_new_privs or CAP_SYS_ADMIN).
pub fn apply(programs: &[BpfProgram]) -> Result<(), SeccompError> {
    for p in programs {
        seccompiler::apply_filter(p).map_err(|e| SeccompError::Apply(e.to_string()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::spec::default_seccomp;

    #[test]
    fn the_default_profile_compiles_to_one_filter() -> Result<(), SeccompError> {
        let programs = compile(&default_seccomp())?;
        assert_eq!(programs.len(), 1);
        assert!(programs[0].len() > 50);
        Ok(())
    }

    #[test]
    fn a_default_deny_profile_with_rules_of_several_actions()
    -> Result<(), Box<dyn std::error::Error>> {
        let profile: LinuxSeccomp = serde_json::from_value(json!({
            "defaultAction": "SCMP_ACT_ERRNO",
            "syscalls": [
                { "names": ["read", "write", "exit_group", "not_a_syscall"], "action": "SCMP_ACT_ALLOW" },
                { "names": ["personality"], "action": "SCMP_ACT_ALLOW", "args": [{ "index": 0, "value": 8, "op": "SCMP_CMP_EQ" }] },
                { "names": ["ptrace"], "action": "SCMP_ACT_KILL_PROCESS" }
            ]
        }))?;
        assert_eq!(compile(&profile)?.len(), 2);
        let notify: LinuxSeccomp =
            serde_json::from_value(json!({ "defaultAction": "SCMP_ACT_NOTIFY" }))?;
        assert!(matches!(compile(&notify), Err(SeccompError::Action(_))));
        Ok(())
    }
}
