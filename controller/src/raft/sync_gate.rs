//! Test only: holds the syncs a leader runs on tokio's blocking pool ([`super::LeaderSyncs`])
//! for the data dirs under a path until released, so a test can watch what a leader does while
//! its own log is not durable yet. Followers sync in place and are never held.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

static GATES: Mutex<Vec<Arc<Gate>>> = Mutex::new(Vec::new());

struct Gate {
    under: PathBuf,
    state: Mutex<State>,
    opened: Condvar,
}

#[derive(Default)]
struct State {
    open: bool,
    /// Syncs waiting at the gate now.
    held: usize,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Holds syncs of logs under `under` until [`Held::open`] or drop.
pub(crate) fn hold(under: &Path) -> Held {
    let gate = Arc::new(Gate {
        under: under.to_path_buf(),
        state: Mutex::new(State::default()),
        opened: Condvar::new(),
    });
    lock(&GATES).push(Arc::clone(&gate));
    Held(gate)
}

/// Called by a leader's sync before it runs: waits while a gate holds `dir`.
pub(super) fn wait(dir: &Path) {
    let gate = lock(&GATES)
        .iter()
        .find(|g| dir.starts_with(&g.under))
        .cloned();
    let Some(gate) = gate else {
        return;
    };
    let mut state = lock(&gate.state);
    state.held += 1;
    while !state.open {
        state = gate
            .opened
            .wait(state)
            .unwrap_or_else(PoisonError::into_inner);
    }
    state.held -= 1;
}

pub(crate) struct Held(Arc<Gate>);

impl Held {
    /// Syncs waiting at the gate now.
    pub fn held(&self) -> usize {
        lock(&self.0.state).held
    }

    /// Lets every held sync, and every later one, run.
    pub fn open(&self) {
        lock(&self.0.state).open = true;
        self.0.opened.notify_all();
        lock(&GATES).retain(|g| !Arc::ptr_eq(g, &self.0));
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.open();
    }
}
