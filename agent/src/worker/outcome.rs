//! What an exit of a container that should run means for its task: restart it after a delay
//! (EXITED meanwhile), or report it done: EXITED for a clean exit, FAILED otherwise. Pure, on
//! top of the supervisor's `RestartTracker`.

use std::time::Duration;

use tug_api::v1::TaskState;

use crate::runtime::state::State;
use crate::supervisor::restarts::{Decision, Exit, RestartPolicy, RestartTracker};

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Outcome {
    /// Restart after this delay; `None`: the policy is done with the task.
    pub restart_after: Option<Duration>,
    pub state: TaskState,
    pub exit_code: i32,
    pub message: String,
}

/// Decide on `state` (stopped); `unhealthy`: the runner stopped it for failing its health
/// check, which counts as a failure whatever the exit code.
pub(crate) fn on_exit(
    tracker: &mut RestartTracker,
    policy: RestartPolicy,
    state: &State,
    unhealthy: bool,
    restarts_so_far: u32,
) -> Outcome {
    let code = state.exit_status().unwrap_or(255);
    let ran_for = match (state.started_at, state.finished_at) {
        (Some(a), Some(b)) => Duration::from_secs(b.saturating_sub(a)),
        _ => Duration::ZERO,
    };
    let exit = Exit {
        code: if unhealthy { None } else { state.exit_code },
        signal: if unhealthy {
            Some(nix::libc::SIGTERM)
        } else {
            state.signal
        },
        ran_for,
    };
    let why = if unhealthy {
        "failed its health check".to_string()
    } else if state.oom_killed {
        format!("was killed for using too much memory ({code})")
    } else {
        format!("exited with code {code}")
    };
    match tracker.on_exit(exit, false) {
        Decision::Restart { after } => Outcome {
            restart_after: Some(after),
            state: TaskState::Exited,
            exit_code: code,
            message: format!("{why}; restart {} in {after:?}", restarts_so_far + 1),
        },
        Decision::Stop if code == 0 && !unhealthy => Outcome {
            restart_after: None,
            state: TaskState::Exited,
            exit_code: code,
            message: String::new(),
        },
        Decision::Stop => Outcome {
            restart_after: None,
            state: TaskState::Failed,
            exit_code: code,
            message: format!("{why}; restart policy {policy} does not restart it"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::state::Status;
    use crate::supervisor::restarts::Backoff;

    fn stopped(code: Option<i32>, signal: Option<i32>) -> State {
        let mut s = State::created("t".into(), 1);
        s.status = Status::Stopped;
        s.exit_code = code;
        s.signal = signal;
        s
    }

    fn decide(policy: RestartPolicy, s: &State, unhealthy: bool) -> Outcome {
        let mut t = RestartTracker::new(policy, Backoff::default());
        on_exit(&mut t, policy, s, unhealthy, 0)
    }

    #[test]
    fn policies_decide_restart_exited_or_failed() {
        let ok = stopped(Some(0), None);
        let bad = stopped(Some(3), None);
        let killed = stopped(None, Some(9));
        let always = RestartPolicy::Always;
        let on_failure = RestartPolicy::OnFailure { max_retries: None };
        let never = RestartPolicy::Never;

        let o = decide(always, &ok, false);
        assert_eq!(
            (o.restart_after.is_some(), o.state),
            (true, TaskState::Exited)
        );
        assert!(o.message.contains("restart 1"), "{}", o.message);

        let o = decide(on_failure, &ok, false);
        assert_eq!((o.restart_after, o.state), (None, TaskState::Exited));
        let o = decide(on_failure, &killed, false);
        assert_eq!((o.restart_after.is_some(), o.exit_code), (true, 137));

        let o = decide(never, &bad, false);
        assert_eq!((o.restart_after, o.state), (None, TaskState::Failed));
        assert!(o.message.contains("exited with code 3"), "{}", o.message);
        let o = decide(never, &ok, false);
        assert_eq!((o.restart_after, o.state), (None, TaskState::Exited));

        let o = decide(on_failure, &ok, true);
        assert!(
            o.restart_after.is_some(),
            "unhealthy is a failure even if the process exited 0"
        );
        assert!(o.message.contains("health check"));
    }
}
