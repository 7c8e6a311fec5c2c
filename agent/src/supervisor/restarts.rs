//! Restart policy with exponential back-off (capped), a restart count, and a reset once a
//! container has run long enough to count as healthy. Pure logic: time comes in as arguments.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartPolicy {
    Always,
    /// Restart after a non-zero exit or a signal, at most `max_retries` times if given.
    OnFailure {
        max_retries: Option<u32>,
    },
    Never,
}

impl FromStr for RestartPolicy {
    type Err = String;
    /// Docker's spelling: `no`, `always`, `on-failure`, `on-failure:N`.
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "no" | "never" => Ok(RestartPolicy::Never),
            "always" => Ok(RestartPolicy::Always),
            "on-failure" => Ok(RestartPolicy::OnFailure { max_retries: None }),
            _ => match s.strip_prefix("on-failure:").map(str::parse::<u32>) {
                Some(Ok(n)) => Ok(RestartPolicy::OnFailure {
                    max_retries: Some(n),
                }),
                _ => Err(format!(
                    "invalid restart policy {s:?}: use no, always, on-failure or on-failure:N"
                )),
            },
        }
    }
}

impl fmt::Display for RestartPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RestartPolicy::Always => f.write_str("always"),
            RestartPolicy::OnFailure { max_retries: None } => f.write_str("on-failure"),
            RestartPolicy::OnFailure {
                max_retries: Some(n),
            } => write!(f, "on-failure:{n}"),
            RestartPolicy::Never => f.write_str("no"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
    /// A run at least this long resets the delay to `initial`.
    pub reset_after: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(60),
            reset_after: Duration::from_secs(10),
        }
    }
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub ran_for: Duration,
}

impl Exit {
    pub fn failed(&self) -> bool {
        self.signal.is_some() || self.code != Some(0)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Restart { after: Duration },
    Stop,
}

#[derive(Debug, Clone)]
pub struct RestartTracker {
    policy: RestartPolicy,
    backoff: Backoff,
    restarts: u32,
    next_delay: Duration,
}

impl RestartTracker {
    pub fn new(policy: RestartPolicy, backoff: Backoff) -> RestartTracker {
        RestartTracker {
            policy,
            backoff,
            restarts: 0,
            next_delay: backoff.initial,
        }
    }

    /// Restarts so far.
    pub fn restarts(&self) -> u32 {
        self.restarts
    }

    /// What to do after `exit`; `stopping` means someone asked the container to stop.
    pub fn on_exit(&mut self, exit: Exit, stopping: bool) -> Decision {
        let restart = !stopping
            && match self.policy {
                RestartPolicy::Never => false,
                RestartPolicy::Always => true,
                RestartPolicy::OnFailure { max_retries } => {
                    exit.failed() && max_retries.is_none_or(|m| self.restarts < m)
                }
            };
        if !restart {
            return Decision::Stop;
        }
        if exit.ran_for >= self.backoff.reset_after {
            self.next_delay = self.backoff.initial;
        }
        let after = self.next_delay;
        self.next_delay = (self.next_delay * 2).min(self.backoff.max);
        self.restarts += 1;
        Decision::Restart { after }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exit(code: i32, secs: u64) -> Exit {
        Exit {
            code: Some(code),
            signal: None,
            ran_for: Duration::from_secs(secs),
        }
    }

    fn delays(t: &mut RestartTracker, exits: &[Exit]) -> Vec<Option<u64>> {
        exits
            .iter()
            .map(|e| match t.on_exit(*e, false) {
                Decision::Restart { after } => Some(after.as_millis() as u64),
                Decision::Stop => None,
            })
            .collect()
    }

    #[test]
    fn policies_parse_and_print() {
        for s in ["no", "always", "on-failure", "on-failure:5"] {
            assert_eq!(
                s.parse::<RestartPolicy>().map(|p| p.to_string()),
                Ok(s.to_string())
            );
        }
        assert!("sometimes".parse::<RestartPolicy>().is_err());
        assert!("on-failure:x".parse::<RestartPolicy>().is_err());
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_and_resets_after_a_long_run() {
        let b = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_millis(1000),
            reset_after: Duration::from_secs(10),
        };
        let mut t = RestartTracker::new(RestartPolicy::Always, b);
        let quick = exit(1, 0);
        assert_eq!(
            delays(&mut t, &[quick; 6]),
            [
                Some(100),
                Some(200),
                Some(400),
                Some(800),
                Some(1000),
                Some(1000)
            ]
        );
        assert_eq!(
            delays(&mut t, &[exit(0, 30), quick]),
            [Some(100), Some(200)],
            "a healthy run resets the delay"
        );
        assert_eq!(t.restarts(), 8);
    }

    #[test]
    fn on_failure_counts_and_never_and_stopping_stop() {
        let mut t = RestartTracker::new(
            RestartPolicy::OnFailure {
                max_retries: Some(2),
            },
            Backoff::default(),
        );
        assert_eq!(
            delays(&mut t, &[exit(1, 0), exit(1, 0), exit(1, 0)]),
            [Some(100), Some(200), None]
        );
        let mut t = RestartTracker::new(
            RestartPolicy::OnFailure { max_retries: None },
            Backoff::default(),
        );
        assert_eq!(
            delays(&mut t, &[exit(0, 0)]),
            [None],
            "success is not a failure"
        );
        let killed = Exit {
            code: None,
            signal: Some(9),
            ran_for: Duration::ZERO,
        };
        assert_eq!(delays(&mut t, &[killed]), [Some(100)]);
        let mut t = RestartTracker::new(RestartPolicy::Never, Backoff::default());
        assert_eq!(delays(&mut t, &[exit(1, 0)]), [None]);
        let mut t = RestartTracker::new(RestartPolicy::Always, Backoff::default());
        assert_eq!(
            t.on_exit(exit(1, 0), true),
            Decision::Stop,
            "a requested stop is never undone"
        );
    }
}
