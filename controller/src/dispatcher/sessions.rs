//! Agent sessions and their heartbeats, in the leader's memory only (never Raft writes): a
//! session id per registered node and when it was last heard from. A new leader starts with none,
//! so every agent registers again with it.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher, RandomState};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

#[derive(Debug, Clone)]
struct Session {
    id: String,
    last_seen: Instant,
}

/// The sessions of the nodes that registered with this leader.
#[derive(Debug, Clone, Default)]
pub struct Sessions {
    inner: Arc<Mutex<HashMap<String, Session>>>,
    random: RandomState,
}

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A fresh session for `node`, replacing any earlier one.
    pub fn open(&self, node: &str) -> String {
        let mut hasher = self.random.build_hasher();
        hasher.write(node.as_bytes());
        hasher.write_u128(Instant::now().elapsed().as_nanos());
        hasher.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        let id = format!("{:016x}", hasher.finish());
        self.lock().insert(
            node.to_string(),
            Session {
                id: id.clone(),
                last_seen: Instant::now(),
            },
        );
        id
    }

    /// Records a heartbeat; false if `id` is not the node's current session.
    pub fn touch(&self, node: &str, id: &str) -> bool {
        match self.lock().get_mut(node) {
            Some(session) if session.id == id => {
                session.last_seen = Instant::now();
                true
            }
            _ => false,
        }
    }

    pub fn is_current(&self, node: &str, id: &str) -> bool {
        self.lock().get(node).is_some_and(|s| s.id == id)
    }

    pub fn last_seen(&self, node: &str) -> Option<Instant> {
        self.lock().get(node).map(|s| s.last_seen)
    }

    pub fn close(&self, node: &str) {
        self.lock().remove(node);
    }

    pub fn clear(&self) {
        self.lock().clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_current_session_is_accepted() {
        let sessions = Sessions::default();
        let first = sessions.open("n1");
        assert!(sessions.touch("n1", &first));
        let second = sessions.open("n1");
        assert_ne!(first, second);
        assert!(!sessions.touch("n1", &first));
        assert!(sessions.touch("n1", &second));
        assert!(!sessions.touch("n2", &second));
        sessions.close("n1");
        assert!(!sessions.is_current("n1", &second));
        assert!(sessions.last_seen("n1").is_none());
    }
}
